"""Fine-tune (teacher) or inherit-and-distil (student) an image classifier, with Accelerate.

Follows transformers' examples/pytorch/image-classification/run_image_classification_no_trainer.py (same flag names);
the training loop, knowledge distillation, checkpoints and evaluation gathering live in `inhernet_hf.training`.

    # 1. the teacher: a pretrained model fine-tuned on a Hub dataset
    accelerate launch recipes/image_classification.py --model_name_or_path microsoft/resnet-18 \\
        --dataset_name zalando-datasets/fashion_mnist --no_inher --output_dir out/fmnist-teacher
    # 2. the student: inherited from it (its stage convolutions at half their parameters, 2 gated heads) + Hinton KD
    accelerate launch recipes/image_classification.py --model_name_or_path out/fmnist-teacher \\
        --dataset_name zalando-datasets/fashion_mnist --inher_target_ratio 0.5 --kd_alpha 0.5 --output_dir out/fmnist-inher

Offline, `--idx_dir` reads MNIST-format files (`train-images-idx3-ubyte.gz`, `t10k-...`; Debian's
`dataset-fashion-mnist` puts Fashion-MNIST's under /usr/share/datasets/fashion-mnist), and a teacher can be trained
from scratch: `--model_type resnet --config_overrides '{"hidden_sizes": [32, 64], "depths": [1, 1]}'` (a JSON
object of config fields; the channel count and labels follow the data). Without an image processor (a model from
scratch) pixels are scaled to [-1, 1]; with one (a pretrained model) it prepares the images. Convolutions take the
SVD init (`--inher_init svd`, the default here). Results go to output_dir/all_results.json (eval_accuracy,
parameter counts, wall time).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

import inhernet_hf  # noqa: F401  (registers the inherited layers with transformers: inherited teachers load)
from inhernet_hf.checkpoints import CheckpointError, resolve_checkpoint
from inhernet_hf.distill import student_loss
from inhernet_hf.flags import (add_baseline_args, add_inher_args, add_kd_args, add_training_args, check_baseline_args,
                               check_common_args, inher_config_from_args)
from inhernet_hf.students import stage_student
from inhernet_hf.training import (NonFiniteLossError, TrackingError, build_accelerator, build_optimizer,
                                  create_hub_repo, evaluate, finish_run, inherit_for_training, param_counts,
                                  prepare_training, run_results, train)

FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot"]
IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "validation": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


class ImageRecipeError(ValueError):
    """Bad input, reported before training starts."""


def read_idx(path: Path) -> np.ndarray:
    """An MNIST-format (idx) array, gzipped or not: uint8 of shape (n,) for labels, (n, rows, cols) for images."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ImageRecipeError(f"{path} is not an unsigned-byte idx file (magic {data[:4].hex()}).")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise ImageRecipeError(f"{path}: header says {shape} but holds {body.size} bytes (truncated?).")
    return body.reshape(shape)


def load_idx(idx_dir: str, label_names: list[str]) -> DatasetDict:
    """The train / validation splits of an MNIST-format folder: "image" (H, W) uint8 arrays and ClassLabel labels."""
    splits = {}
    for split, (images_file, labels_file) in IDX_FILES.items():
        paths = [Path(idx_dir) / name for name in (images_file, labels_file)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ImageRecipeError(f"--idx_dir {idx_dir}: missing {missing} (expected {sum(IDX_FILES.values(), ())}).")
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        if len(images) != len(labels) or int(labels.max()) >= len(label_names):
            raise ImageRecipeError(f"--idx_dir {idx_dir} {split}: {len(images)} images, {len(labels)} labels, largest "
                                   f"label {int(labels.max())} for {len(label_names)} --idx_label_names.")
        splits[split] = Dataset.from_dict({"image": images, "label": labels.astype(np.int64)}).cast_column(
            "label", ClassLabel(names=label_names))
    return DatasetDict(splits)


def load_images(args: argparse.Namespace, columns: Optional[list[str]] = None) -> DatasetDict:
    """train / validation splits from --idx_dir, --train_dir/--validation_dir (imagefolder) or --dataset_name;
    `columns` (default: --image_column_name and --label_column_name) must be in them."""
    if args.idx_dir:
        return load_idx(args.idx_dir, args.idx_label_names)
    if args.dataset_name:
        data = load_dataset(args.dataset_name, args.dataset_config_name)
    else:
        files = {"train": os.path.join(args.train_dir, "**")}
        if args.validation_dir:
            files["validation"] = os.path.join(args.validation_dir, "**")
        data = load_dataset("imagefolder", data_files=files)
    if "validation" not in data:
        if "test" not in data:
            raise ImageRecipeError(f"the dataset has splits {list(data)}: it needs a 'validation' or 'test' split.")
        data["validation"] = data.pop("test")
    for column in columns or (args.image_column_name, args.label_column_name):
        if column not in data["train"].column_names:
            raise ImageRecipeError(f"no column {column!r} in the dataset (columns: {data['train'].column_names}); "
                                   f"set the --*_column flags.")
    return data


def check_source_args(args: argparse.Namespace) -> None:
    """One data source and one model source (a pretrained model, or a --model_type trained from scratch as the
    teacher); raises ValueError naming the flags."""
    if sum(x is not None for x in (args.dataset_name, args.train_dir, args.idx_dir)) != 1:
        raise ValueError("Give exactly one of --dataset_name, --train_dir and --idx_dir.")
    if (args.model_name_or_path is None) == (args.model_type is None):
        raise ValueError("Give exactly one of --model_name_or_path and --model_type (training from scratch).")
    if args.config_overrides and args.model_type is None:
        raise ValueError("--config_overrides configures a model trained from scratch: give --model_type too.")
    if not isinstance(args.config_overrides, dict):
        raise ValueError(f"--config_overrides must be a JSON object, got {args.config_overrides!r}.")
    if args.model_type is not None and not args.no_inher:
        raise ValueError("--model_type trains a teacher from scratch: add --no_inher (inherit from its output_dir "
                         "afterwards).")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data (one of --dataset_name, --train_dir, --idx_dir)")
    data.add_argument("--dataset_name", type=str, default=None, help="A Hub image-classification dataset.")
    data.add_argument("--dataset_config_name", type=str, default=None)
    data.add_argument("--train_dir", type=str, default=None, help="An imagefolder of training images.")
    data.add_argument("--validation_dir", type=str, default=None, help="An imagefolder of validation images.")
    data.add_argument("--idx_dir", type=str, default=os.environ.get("INHERNET_IDX_DIR"),
                      help="A folder of MNIST-format idx files (default: $INHERNET_IDX_DIR).")
    data.add_argument("--idx_label_names", nargs="+", default=FASHION_MNIST_LABELS,
                      help="Class names of the idx labels (default: Fashion-MNIST's).")
    data.add_argument("--image_column_name", type=str, default="image")
    data.add_argument("--label_column_name", type=str, default="label")
    data.add_argument("--max_train_samples", type=int, default=None, help="Use the first N training examples.")
    data.add_argument("--max_eval_samples", type=int, default=None, help="Use the first N validation examples.")
    model = parser.add_argument_group("model (one of --model_name_or_path, --model_type)")
    model.add_argument("--model_name_or_path", type=str, default=None,
                       help="Model to fine-tune (--no_inher) or to inherit from (a Hub id or a folder).")
    model.add_argument("--model_type", type=str, default=None, help="Train this architecture from scratch.")
    model.add_argument("--config_overrides", type=json.loads, default={},
                       help="With --model_type: a JSON object of config fields.")
    model.add_argument("--ignore_mismatched_sizes", action="store_true",
                       help="Re-initialise a classifier head whose size differs from the dataset's labels.")
    add_training_args(parser)
    add_inher_args(parser)
    add_kd_args(parser)
    parser.set_defaults(inher_init="svd")  # Conv2d layers take the SVD init only
    baselines = add_baseline_args(parser, "a CNN's own stages, all of them")
    baselines.add_argument("--student_depths", type=int, nargs="+", default=None,
                           help="Train a student keeping this many evenly spaced blocks of each stage of "
                                "--model_name_or_path (a CNN with config.depths; the first block of each stage is "
                                "always kept) instead of inheriting.")
    args = parser.parse_args(argv)
    try:
        check_source_args(args)
        for flag in ("max_train_samples", "max_eval_samples"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
        is_student = args.student_depths is not None
        if is_student and args.model_name_or_path is None:
            raise ValueError("--student_depths keeps blocks of a trained teacher: give --model_name_or_path.")
        check_common_args(args, parser, "student" if is_student else "teacher" if args.no_inher else "inherited")
        check_baseline_args(args, parser, is_student)
    except ValueError as err:
        parser.error(str(err))
    if args.push_to_hub and args.hub_model_id is None:
        args.hub_model_id = Path(args.output_dir).absolute().name
    return args


def pixel_transform(processor, image_column: str, label_column: str, channels: int):
    """Batch transform: images -> "pixel_values" (the processor's, or [-1, 1]-scaled (C, H, W) float tensors)."""
    def transform(batch):
        images = batch[image_column]
        if processor is not None:
            pixels = processor([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images],
                               return_tensors="pt")["pixel_values"]
        else:
            arrays = [np.asarray(im, dtype=np.float32) for im in images]
            arrays = [a[None] if a.ndim == 2 else a.transpose(2, 0, 1) for a in arrays]  # (C, H, W)
            pixels = torch.from_numpy(np.stack(arrays)) / 127.5 - 1.0
            if pixels.shape[1] != channels:
                raise ImageRecipeError(f"images have {pixels.shape[1]} channels, the model {channels}.")
        return {"pixel_values": pixels, "labels": torch.tensor(batch[label_column])}
    return transform


def build_model(args: argparse.Namespace, label_names: list[str], channels: int):
    """(model, image processor or None): the pretrained model with this dataset's labels, or a new one."""
    labels = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
              "label2id": {n: i for i, n in enumerate(label_names)}}
    if args.model_type is not None:
        try:
            config = AutoConfig.for_model(args.model_type, **labels, **{"num_channels": channels,
                                                                        **args.config_overrides})
        except (ValueError, TypeError) as err:
            raise ImageRecipeError(f"--model_type {args.model_type} / --config_overrides: {err}") from err
        torch.manual_seed(args.seed if args.seed is not None else 0)
        return AutoModelForImageClassification.from_config(config), None
    config = AutoConfig.from_pretrained(args.model_name_or_path, **labels)
    model = AutoModelForImageClassification.from_pretrained(args.model_name_or_path, config=config,
                                                            ignore_mismatched_sizes=args.ignore_mismatched_sizes)
    try:
        processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
    except OSError:
        processor = None  # a model trained from scratch by this recipe
    return model, processor


def run(args: argparse.Namespace) -> dict:
    wall_start = time.perf_counter()
    is_student = args.student_depths is not None
    use_kd = (is_student or not args.no_inher) and (args.kd_alpha > 0 or args.kd_hidden_weight > 0
                                                    or args.distill_method != "kd")
    inher_config = None
    if not args.no_inher and not is_student:
        try:
            inher_config = inher_config_from_args(args, task_type=None)
        except (TypeError, ValueError) as err:
            raise ImageRecipeError(f"bad inheritance options: {err}") from err
    data = load_images(args)
    resume_path = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    label_names = data["train"].features[args.label_column_name].names
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit is not None:
            data[split] = data[split].select(range(min(limit, len(data[split]))))
    first = np.asarray(data["train"][0][args.image_column_name])
    channels = 1 if first.ndim == 2 else first.shape[-1]

    accelerator = build_accelerator(args)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    repo_id = create_hub_repo(accelerator, args)
    model, processor = build_model(args, label_names, channels)
    teacher = None
    if use_kd:
        teacher_path = args.teacher_name_or_path or args.model_name_or_path
        teacher = AutoModelForImageClassification.from_pretrained(teacher_path).to(accelerator.device)
        if teacher.config.num_labels != len(label_names):
            raise ImageRecipeError(f"the KD teacher {teacher_path} has {teacher.config.num_labels} labels, the data "
                                   f"{len(label_names)}: fine-tune a teacher on this dataset first (--no_inher).")
    transform = pixel_transform(processor, args.image_column_name, args.label_column_name,
                                getattr(model.config, "num_channels", channels))
    data = data.with_transform(transform)
    collate = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    train_dataloader = DataLoader(data["train"], shuffle=True, collate_fn=collate,
                                  batch_size=args.per_device_train_batch_size)
    eval_dataloader = DataLoader(data["validation"], collate_fn=collate, batch_size=args.per_device_eval_batch_size)

    dense_params = model.num_parameters()
    if is_student:
        try:
            model = stage_student(model, args.student_depths)
        except ValueError as err:
            raise ImageRecipeError(f"bad student options: {err}") from err
    if inher_config is not None:
        model = inherit_for_training(accelerator, model, inher_config, data["train"], collate, args)
    total_params, trainable_params = param_counts(model)
    try:  # HCD's branches are training-only: optimised with the student (same weight-decay rule), never saved
        loss_fn, branches = student_loss(teacher, model, args, use_kd, len(label_names), autocast=accelerator.autocast)
    except ValueError as err:
        raise ImageRecipeError(str(err)) from err
    trained = model if branches is None else torch.nn.ModuleList([model, branches])
    optimizer = build_optimizer(trained, args.learning_rate, args.weight_decay)
    model, optimizer, train_dataloader, eval_dataloaders, lr_scheduler, plan = prepare_training(
        accelerator, model, optimizer, train_dataloader, {"validation": eval_dataloader}, args)
    if branches is not None:
        loss_fn.branches = accelerator.prepare(branches)

    def eval_fn() -> dict:
        predictions, references = evaluate(accelerator, model, eval_dataloaders["validation"],
                                           lambda outputs, batch: outputs.logits.argmax(dim=-1))
        return {"accuracy": float((predictions == references).mean()), "samples": int(len(predictions))}

    accelerator.print(f"{len(data['train'])} train / {len(data['validation'])} validation images, "
                      f"{len(label_names)} classes; {plan.max_train_steps} optimizer steps; "
                      f"{'inherited' if inher_config else 'student' if is_student else 'dense'} model with "
                      f"{total_params:,} params; " + (f"distillation {args.distill_method}" if use_kd else
                                                      "no distillation"))
    result = train(accelerator, model, optimizer, lr_scheduler, train_dataloader, loss_fn, plan, args.output_dir,
                   checkpointing_steps=args.checkpointing_steps, resume_from_checkpoint=resume_path,
                   max_grad_norm=args.max_grad_norm, eval_fn=eval_fn, eval_steps=args.eval_steps, seed=args.seed,
                   with_tracking=args.with_tracking, project_name="image_classification", tracker_args=args)
    results = run_results(accelerator, result, result.eval_metrics, total_params, trainable_params, dense_params,
                          len(data["train"]), wall_start)
    results.update({"inherited": inher_config is not None, "kd": use_kd, "num_labels": len(label_names),
                    "distill_method": args.distill_method if use_kd else None,
                    "student_depths": list(model.config.depths) if is_student else None})
    card_metrics = {k: v for k, v in result.eval_metrics.items() if k != "samples"}
    finish_run(accelerator, args, model, processor, results, card_metrics,
               args.dataset_name or args.idx_dir or args.train_dir, repo_id)
    return results


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    try:
        return run(args)
    except (ImageRecipeError, CheckpointError, NonFiniteLossError, TrackingError) as err:
        sys.exit(f"image_classification.py: error: {err}")


if __name__ == "__main__":
    main()
