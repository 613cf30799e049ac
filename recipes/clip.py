"""Contrastive fine-tuning of a CLIP or SigLIP model (teacher) or of an inherited one (both towers' attention and MLP
projections inherited, the projections between them dense), optionally distilled from the teacher's similarity
matrix (CLIP-KD style), with Accelerate.

Flag names follow transformers' examples/pytorch/contrastive-image-text/run_clip.py; the training loop, checkpoints
and resume live in `inhernet_hf.training`, the loss (`ContrastiveLoss`) in `inhernet_hf.distill`.

    # 1. the teacher: a pretrained CLIP fine-tuned on a Hub image-caption dataset
    accelerate launch recipes/clip.py --model_name_or_path openai/clip-vit-base-patch32 \\
        --dataset_name <image-caption dataset> --caption_column caption --no_inher --output_dir out/clip-teacher
    # 2. inherited from it at half the targeted parameters, + KD from its similarity matrix
    accelerate launch recipes/clip.py --model_name_or_path out/clip-teacher --dataset_name <...> \\
        --inher_target_ratio 0.5 --kd_alpha 0.5 --output_dir out/clip-inher

Offline, `--idx_dir` reads MNIST-format files (Fashion-MNIST from Debian's `dataset-fashion-mnist`) and captions
each image from its class name (`--caption_template`, default "a photo of a {}"); `--model_type clip` (or siglip)
with `--config_overrides` trains a small model from scratch, with a word-level tokenizer (the `tokenizers`
library) built from the training captions and saved with it. Pairs with identical captions count as positives.

Metrics on the validation split: image->text and text->image retrieval recall at 1 and 5 over its distinct
captions (a text->image query hits when one of its top-k images carries that caption), and zero-shot
classification accuracy when the data has class labels (`--label_column`; prompts from `--zero_shot_template`).
With captions built from class names, image->text R@1 is zero-shot accuracy with that one template.
Inheritance takes the whitened init with uniform ranks by default (--inher_rank_allocation energy is the other
data-aware choice; 'activation' needs a per-example classifier's logits).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from datasets import ClassLabel, DatasetDict
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModel, AutoProcessor, AutoTokenizer, PreTrainedTokenizerFast

import inhernet_hf  # noqa: F401  (registers the inherited layers with transformers: inherited teachers load)
from inhernet_hf.checkpoints import CheckpointError, resolve_checkpoint
from inhernet_hf.distill import ContrastiveLoss
from inhernet_hf.flags import (add_inher_args, add_kd_args, add_training_args, changed_flags, check_common_args,
                               inher_config_from_args)
from inhernet_hf.training import (NonFiniteLossError, TrackingError, build_accelerator, build_optimizer,
                                  create_hub_repo, finish_run, inherit_for_training, param_counts, prepare_training,
                                  run_results, train)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from image_classification import (FASHION_MNIST_LABELS, ImageRecipeError, check_source_args,  # noqa: E402
                                  load_idx, load_images)

MODEL_TYPES = ("clip", "siglip")  # the image-text models trained from scratch here (--model_type)
SPECIAL_TOKENS = ["<pad>", "<bos>", "<unk>", "<eos>"]  # ids 0-3; CLIP pools at the first eos (id != 2)


class ClipRecipeError(ImageRecipeError):
    """Bad input, reported before training starts."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data (one of --dataset_name, --train_dir, --idx_dir)")
    data.add_argument("--dataset_name", type=str, default=None, help="A Hub dataset of image-caption pairs.")
    data.add_argument("--dataset_config_name", type=str, default=None)
    data.add_argument("--train_dir", type=str, default=None,
                      help="An imagefolder of training images with a metadata.jsonl/csv holding the captions.")
    data.add_argument("--validation_dir", type=str, default=None, help="The same for the validation images.")
    data.add_argument("--idx_dir", type=str, default=os.environ.get("INHERNET_IDX_DIR"),
                      help="A folder of MNIST-format idx files, captioned from the class names "
                           "(default: $INHERNET_IDX_DIR).")
    data.add_argument("--idx_label_names", nargs="+", default=FASHION_MNIST_LABELS,
                      help="Class names of the idx labels (default: Fashion-MNIST's).")
    data.add_argument("--caption_template", default="a photo of a {}",
                      help="With --idx_dir: each image's caption, '{}' replaced by its class name.")
    data.add_argument("--image_column", default="image")
    data.add_argument("--caption_column", default="caption")
    data.add_argument("--label_column", default=None,
                      help="A ClassLabel column for zero-shot classification (default: 'label' with --idx_dir, "
                           "none otherwise).")
    data.add_argument("--zero_shot_template", default="a photo of a {}",
                      help="Zero-shot prompt of each class, '{}' replaced by its name.")
    data.add_argument("--max_seq_length", type=int, default=None,
                      help="Maximum caption length in tokens (default: the model's text positions).")
    data.add_argument("--max_train_samples", type=int, default=None, help="Use the first N training pairs.")
    data.add_argument("--max_eval_samples", type=int, default=None, help="Use the first N validation pairs.")
    model = parser.add_argument_group("model (one of --model_name_or_path, --model_type)")
    model.add_argument("--model_name_or_path", type=str, default=None,
                       help="CLIP / SigLIP model to fine-tune (--no_inher) or to inherit from (a Hub id or folder).")
    model.add_argument("--model_type", choices=MODEL_TYPES, default=None, help="Train this model from scratch.")
    model.add_argument("--config_overrides", type=json.loads, default={},
                       help="With --model_type: a JSON object of config fields, e.g. {\"text_config\": {...}, "
                            "\"vision_config\": {...}, \"projection_dim\": 64}.")
    add_training_args(parser)
    add_inher_args(parser)
    add_kd_args(parser)
    # 'activation' ranks weigh each layer by the sensitivity of a per-example classifier's logits; a contrastive
    # model's logits compare the examples of a batch with each other, so its ranks default to uniform.
    parser.set_defaults(inher_rank_allocation="uniform")
    args = parser.parse_args(argv)
    try:
        check_source_args(args)
        for name in ("caption_template", "zero_shot_template"):
            if "{}" not in getattr(args, name):
                raise ValueError(f"--{name} needs a '{{}}' where the class name goes, got {getattr(args, name)!r}.")
        if changed_flags(args, parser, ("caption_template",)) and args.idx_dir is None:
            raise ValueError("--caption_template captions --idx_dir images; other data brings its own captions.")
        for flag in ("max_seq_length", "max_train_samples", "max_eval_samples"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
        if args.kd_hidden_weight > 0:
            raise ValueError("--kd_hidden_weight is not supported here: clip.py distils the teacher's image-text "
                             "similarity matrix (--kd_alpha, --kd_temperature).")
        check_common_args(args, parser, "teacher" if args.no_inher else "inherited")
    except ValueError as err:
        parser.error(str(err))
    if args.label_column is None and args.idx_dir is not None:
        args.label_column = "label"
    if args.push_to_hub and args.hub_model_id is None:
        args.hub_model_id = Path(args.output_dir).absolute().name
    return args


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def load_pairs(args: argparse.Namespace) -> DatasetDict:
    """train / validation splits with an image column, a caption column and (optionally) a class-label column."""
    if args.idx_dir:
        data = load_idx(args.idx_dir, args.idx_label_names)
        names = data["train"].features["label"].names
        return data.map(lambda row: {args.caption_column: args.caption_template.format(names[row["label"]])})
    wanted = [args.image_column, args.caption_column] + ([args.label_column] if args.label_column else [])
    data = load_images(args, wanted)
    if args.label_column and not isinstance(data["train"].features[args.label_column], ClassLabel):
        raise ClipRecipeError(f"--label_column {args.label_column} must be a ClassLabel column (class names for the "
                              f"zero-shot prompts), got {data['train'].features[args.label_column]}.")
    return data


def build_tokenizer(captions: list[str], max_length: int) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer over `captions` ("<bos> words <eos>"), for a model trained from scratch."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer

    tokenizer = Tokenizer(WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(captions, WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                             special_tokens=[("<bos>", 1), ("<eos>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>",
                                   unk_token="<unk>", eos_token="<eos>", model_max_length=max_length)


def build_model(args: argparse.Namespace, captions: list[str], channels: int, image_size: int):
    """(model, tokenizer, image processor or None, what to save beside the model): the pretrained model and its
    processor (tokenizer + image processor), or a new model with a tokenizer built from the captions (images then
    scaled to [-1, 1]; a model trained from scratch here is saved with its tokenizer only)."""
    if args.model_type is None:
        model = AutoModel.from_pretrained(args.model_name_or_path)
        if model.config.model_type not in MODEL_TYPES:
            raise ClipRecipeError(f"{args.model_name_or_path} is a {model.config.model_type!r} model; clip.py trains "
                                  f"image-text models of type {MODEL_TYPES}.")
        try:
            processor = AutoProcessor.from_pretrained(args.model_name_or_path)
            return model, processor.tokenizer, processor.image_processor, processor
        except (OSError, ValueError, TypeError):  # a model trained from scratch by this recipe: a tokenizer only
            tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
            return model, tokenizer, None, tokenizer
    max_length = args.max_seq_length or 16
    tokenizer = build_tokenizer(captions, max_length)
    overrides = dict(args.config_overrides)
    text = {"vocab_size": len(tokenizer), "max_position_embeddings": max_length, "pad_token_id": 0,
            "bos_token_id": 1, "eos_token_id": 3, **overrides.pop("text_config", {})}
    vision = {"image_size": image_size, "num_channels": channels, **overrides.pop("vision_config", {})}
    if vision["image_size"] % vision.get("patch_size", 32):
        raise ClipRecipeError(f"vision_config: image_size {vision['image_size']} must be a multiple of patch_size "
                              f"{vision.get('patch_size', 32)} (set it in --config_overrides).")
    try:
        config = AutoConfig.for_model(args.model_type, text_config=text, vision_config=vision, **overrides)
    except (ValueError, TypeError) as err:
        raise ClipRecipeError(f"--model_type {args.model_type} / --config_overrides: {err}") from err
    torch.manual_seed(args.seed if args.seed is not None else 0)
    return AutoModel.from_config(config), tokenizer, None, tokenizer


def pixel_values(images, processor, channels: int) -> torch.Tensor:
    """(B, C, H, W) model inputs: the image processor's, or uint8 pixels scaled to [-1, 1]."""
    if processor is not None:
        rgb = [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else
               np.repeat(np.asarray(im)[..., None], 3, -1) if np.asarray(im).ndim == 2 else np.asarray(im)
               for im in images]
        return processor(rgb, return_tensors="pt")["pixel_values"]
    arrays = [np.asarray(im, dtype=np.float32) for im in images]
    arrays = [a[None] if a.ndim == 2 else a.transpose(2, 0, 1) for a in arrays]
    pixels = torch.from_numpy(np.stack(arrays)) / 127.5 - 1.0
    if pixels.shape[1] != channels:
        raise ClipRecipeError(f"images have {pixels.shape[1]} channels, the model {channels}.")
    return pixels


def make_collate(args, tokenizer, processor, channels: int, caption_ids: dict[str, int], max_length: int,
                 pad_to_max: bool):
    """Rows -> {"pixel_values", "input_ids", "attention_mask", "labels": caption ids[, "class_labels"]}."""
    def collate(rows):
        captions = [row[args.caption_column] for row in rows]
        text = tokenizer(captions, padding="max_length" if pad_to_max else True, truncation=True,
                         max_length=max_length, return_tensors="pt")
        batch = {"pixel_values": pixel_values([row[args.image_column] for row in rows], processor, channels),
                 "input_ids": text["input_ids"],
                 "labels": torch.tensor([caption_ids[c] for c in captions])}
        if not pad_to_max:  # SigLIP pools the last position and takes no attention mask
            batch["attention_mask"] = text["attention_mask"]
        if args.label_column:
            batch["class_labels"] = torch.tensor([row[args.label_column] for row in rows])
        return batch
    return collate


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def features(output) -> torch.Tensor:
    """get_image_features / get_text_features' projected embeddings (a tensor, or an output's pooler_output)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def retrieval_recalls(image_embeds: torch.Tensor, text_embeds: torch.Tensor, caption_ids: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Recall@k both ways over N pairs (image i, caption i) with L2-normalised embeddings (N, D).

    The gallery of image->text queries is the distinct captions (one embedding each, their first pair's); an image
    hits at k when its own caption is among its k most similar. Each distinct caption is a text->image query that
    hits at k when one of its k most similar images carries that caption."""
    distinct, first = np.unique(caption_ids.cpu().numpy(), return_index=True)
    distinct, first = torch.as_tensor(distinct), torch.as_tensor(first)
    gallery = text_embeds[first]  # (U, D)
    similarity = image_embeds @ gallery.T  # (N, U)
    own = (caption_ids[:, None] == distinct[None, :]).float().argmax(-1)  # index of each image's caption
    metrics = {}
    for k in ks:
        top = similarity.topk(min(k, len(distinct)), dim=-1).indices
        metrics[f"i2t_R@{k}"] = float((top == own[:, None]).any(-1).float().mean())
        top_images = similarity.T.topk(min(k, len(image_embeds)), dim=-1).indices  # (U, k)
        metrics[f"t2i_R@{k}"] = float((caption_ids[top_images] == distinct[:, None]).any(-1).float().mean())
    return metrics


def run(args: argparse.Namespace) -> dict:
    wall_start = time.perf_counter()
    use_kd = not args.no_inher and args.kd_alpha > 0
    inher_config = None
    if not args.no_inher:
        try:
            inher_config = inher_config_from_args(args, task_type=None)
        except (TypeError, ValueError) as err:
            raise ClipRecipeError(f"bad inheritance options: {err}") from err
    data = load_pairs(args)
    resume_path = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit is not None:
            data[split] = data[split].select(range(min(limit, len(data[split]))))
    first = np.asarray(data["train"][0][args.image_column])
    channels = 1 if first.ndim == 2 else first.shape[-1]
    class_names = data["train"].features[args.label_column].names if args.label_column else None
    prompts = [args.zero_shot_template.format(name) for name in class_names] if class_names else []
    captions = sorted(set(data["train"][args.caption_column]) | set(data["validation"][args.caption_column]))

    accelerator = build_accelerator(args)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    repo_id = create_hub_repo(accelerator, args)
    model, tokenizer, processor, saved_processor = build_model(args, captions + prompts, channels, first.shape[0])
    channels = model.config.vision_config.num_channels if processor is None else channels
    max_length = args.max_seq_length or min(tokenizer.model_max_length,
                                            model.config.text_config.max_position_embeddings)
    sigmoid = model.config.model_type == "siglip"
    teacher = None
    if use_kd:
        teacher = AutoModel.from_pretrained(args.teacher_name_or_path or args.model_name_or_path)
        teacher.to(accelerator.device)
    caption_ids = {caption: i for i, caption in enumerate(captions)}
    collate = make_collate(args, tokenizer, processor, channels, caption_ids, max_length, pad_to_max=sigmoid)
    train_dataloader = DataLoader(data["train"], shuffle=True, collate_fn=collate,
                                  batch_size=args.per_device_train_batch_size)
    eval_dataloader = DataLoader(data["validation"], collate_fn=collate, batch_size=args.per_device_eval_batch_size)

    dense_params = model.num_parameters()
    if inher_config is not None:
        calibration_collate = lambda rows: {k: v for k, v in collate(rows).items() if k != "class_labels"}  # noqa: E731
        model = inherit_for_training(accelerator, model, inher_config, data["train"], calibration_collate, args)
    total_params, trainable_params = param_counts(model)
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
    model, optimizer, train_dataloader, eval_dataloaders, lr_scheduler, plan = prepare_training(
        accelerator, model, optimizer, train_dataloader, {"validation": eval_dataloader}, args)
    try:
        base_loss = ContrastiveLoss(teacher, args.kd_alpha if use_kd else 0.0, args.kd_temperature, sigmoid,
                                    autocast=accelerator.autocast)
    except ValueError as err:
        raise ClipRecipeError(str(err)) from err

    def loss_fn(model, batch):
        return base_loss(model, {k: v for k, v in batch.items() if k != "class_labels"})

    prompt_inputs = tokenizer(prompts, padding="max_length" if sigmoid else True, truncation=True,
                              max_length=max_length, return_tensors="pt") if prompts else None

    def eval_fn() -> dict:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.eval()
        images, texts, ids, labels = [], [], [], []
        with torch.no_grad():
            for batch in eval_dataloaders["validation"]:
                text_inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
                image = F.normalize(features(unwrapped.get_image_features(pixel_values=batch["pixel_values"])), dim=-1)
                text = F.normalize(features(unwrapped.get_text_features(**text_inputs)), dim=-1)
                gathered = accelerator.gather_for_metrics(
                    (image, text, batch["labels"], batch.get("class_labels", batch["labels"])))
                for store, value in zip((images, texts, ids, labels), gathered):
                    store.append(value.float().cpu() if value.is_floating_point() else value.cpu())
            image_embeds, text_embeds = torch.cat(images), torch.cat(texts)
            metrics = retrieval_recalls(image_embeds, text_embeds, torch.cat(ids))
            if prompt_inputs is not None:
                prompt_embeds = F.normalize(features(unwrapped.get_text_features(
                    **{k: v.to(accelerator.device) for k, v in prompt_inputs.items()})), dim=-1).float().cpu()
                predicted = (image_embeds @ prompt_embeds.T).argmax(-1)
                metrics["zero_shot_accuracy"] = float((predicted == torch.cat(labels)).float().mean())
        metrics["samples"] = int(len(image_embeds))
        return metrics

    accelerator.print(f"{len(data['train'])} train / {len(data['validation'])} validation pairs, {len(captions)} "
                      f"distinct captions; {plan.max_train_steps} optimizer steps; "
                      f"{'inherited' if inher_config else 'dense'} {model.config.model_type} with {total_params:,} "
                      f"params; " + ("KD from the teacher's similarity matrix" if use_kd else "no distillation"))
    result = train(accelerator, model, optimizer, lr_scheduler, train_dataloader, loss_fn, plan, args.output_dir,
                   checkpointing_steps=args.checkpointing_steps, resume_from_checkpoint=resume_path,
                   max_grad_norm=args.max_grad_norm, eval_fn=eval_fn, eval_steps=args.eval_steps, seed=args.seed,
                   with_tracking=args.with_tracking, project_name="clip", tracker_args=args)
    results = run_results(accelerator, result, result.eval_metrics, total_params, trainable_params, dense_params,
                          len(data["train"]), wall_start)
    results.update({"inherited": inher_config is not None, "kd": use_kd, "model_type": model.config.model_type})
    card_metrics = {k: v for k, v in result.eval_metrics.items() if k != "samples"}
    finish_run(accelerator, args, model, saved_processor, results, card_metrics,
               args.dataset_name or args.idx_dir or args.train_dir, repo_id)
    return results


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    try:
        return run(args)
    except (ImageRecipeError, CheckpointError, NonFiniteLossError, TrackingError) as err:
        sys.exit(f"clip.py: error: {err}")


if __name__ == "__main__":
    main()
