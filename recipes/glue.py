"""Fine-tune (teacher) or inherit-and-distil (student) a sequence classifier on a GLUE task, with Accelerate.

Follows transformers' examples/pytorch/text-classification/run_glue_no_trainer.py (same flag names); the
training loop, knowledge distillation, checkpoints and evaluation gathering live in `inhernet_hf.training`.

    # 1. the teacher: plain fine-tuning
    accelerate launch recipes/glue.py --model_name_or_path bert-base-uncased --task_name sst2 --no_inher \\
        --output_dir out/sst2-teacher
    # 2. the student: inherited from the teacher (SVD init, 2 gated heads, half the parameters) + Hinton KD
    accelerate launch recipes/glue.py --model_name_or_path out/sst2-teacher --task_name sst2 \\
        --inher_target_ratio 0.5 --kd_alpha 0.5 --kd_temperature 2 --output_dir out/sst2-inher

Data comes from the Hub (`nyu-mll/glue`) or, with `--data_dir`, from GLUE TSV folders
(<data_dir>/<SST-2|CoLA|MRPC|RTE|STS-B|QNLI|QQP|MNLI|WNLI>/{train,dev}.tsv; MNLI: dev_matched.tsv and
dev_mismatched.tsv), read with quoting disabled as the GLUE loaders do. Results go to output_dir/all_results.json
(eval_<metric>, eval_<metric>_mm for MNLI-mismatched, parameter counts, wall time). The inherited model is saved
with `InherModel.save_pretrained` (loadable with `InherModel.from_pretrained`, or with
`AutoModelForSequenceClassification.from_pretrained` after `import inhernet_hf`).
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader
from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                          default_data_collator)
from transformers.utils import cached_file

import inhernet_hf  # noqa: F401  (registers the inherited layers with transformers: inherited teachers load)
from inhernet_hf.checkpoints import CheckpointError, resolve_checkpoint
from inhernet_hf.distill import check_hidden_states_match, student_loss
from inhernet_hf.flags import (add_baseline_args, add_inher_args, add_kd_args, add_training_args, changed_flags,
                               check_baseline_args, check_common_args,
                               inher_config_from_args)
from inhernet_hf.metrics import load_metric
from inhernet_hf.students import layer_student
from inhernet_hf.training import (NonFiniteLossError, TrackingError, build_accelerator, build_optimizer,
                                  create_hub_repo, evaluate, finish_run, inherit_for_training, param_counts,
                                  prepare_training, run_results, train)

HUB_DATASET = "nyu-mll/glue"


class GlueRecipeError(ValueError):
    """Bad input, reported before training starts."""


@dataclass(frozen=True)
class GlueTask:
    name: str
    text_keys: tuple[str, ...]  # the Hub dataset's text columns, in model-input order
    label_names: Optional[tuple[str, ...]]  # None: regression (STS-B)
    metrics: tuple[str, ...]
    dir_name: str  # GLUE TSV folder
    tsv_text_columns: tuple  # header names (or, without header, column positions) of the texts
    tsv_label_column: object
    tsv_num_columns: Optional[int] = None  # headerless files (CoLA): exact number of columns
    eval_files: tuple[tuple[str, str], ...] = (("validation", "dev.tsv"),)

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_regression(self) -> bool:
        return self.label_names is None


GLUE_TASKS = {
    "cola": GlueTask("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",), "CoLA",
                     (3,), 1, tsv_num_columns=4),
    "sst2": GlueTask("sst2", ("sentence",), ("negative", "positive"), ("accuracy",), "SST-2", ("sentence",), "label"),
    "mrpc": GlueTask("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy"), "MRPC",
                     ("#1 String", "#2 String"), "Quality"),
    "qqp": GlueTask("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy"), "QQP",
                    ("question1", "question2"), "is_duplicate"),
    "stsb": GlueTask("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearmanr"), "STS-B",
                     ("sentence1", "sentence2"), "score"),
    "mnli": GlueTask("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",),
                     "MNLI", ("sentence1", "sentence2"), "gold_label",
                     eval_files=(("validation_matched", "dev_matched.tsv"),
                                 ("validation_mismatched", "dev_mismatched.tsv"))),
    "qnli": GlueTask("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",), "QNLI",
                     ("question", "sentence"), "label"),
    "rte": GlueTask("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",), "RTE",
                    ("sentence1", "sentence2"), "label"),
    "wnli": GlueTask("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",), "WNLI",
                     ("sentence1", "sentence2"), "label"),
}
# The suffix of each evaluation split's metrics in all_results.json (run_glue's convention for MNLI-mm).
SPLIT_SUFFIX = {"validation": "", "validation_matched": "", "validation_mismatched": "_mm"}


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def _parse_label(task: GlueTask, value: str, where: str):
    value = value.strip()
    if task.is_regression:
        try:
            score = float(value)
        except ValueError:
            score = float("nan")
        if not math.isfinite(score):
            raise GlueRecipeError(f"{where}: score {value!r} is not a finite number (task {task.name} is a "
                                  f"regression).")
        return score
    if value in task.label_names:
        return task.label_names.index(value)
    if value.isdigit() and int(value) < len(task.label_names):
        return int(value)
    raise GlueRecipeError(f"{where}: label {value!r} is not one of {list(task.label_names)} "
                          f"(or their indices 0..{len(task.label_names) - 1}) of task {task.name}.")


def read_glue_tsv(task: GlueTask, path: Path) -> dict[str, list]:
    """One GLUE TSV as {text columns..., 'label'} (Hub column names), read with quoting disabled and any BOM
    stripped. The header (or, for headerless CoLA, the column count) is checked against the task; rows with a
    different number of fields (a few malformed lines in QQP/MNLI) are skipped with a warning."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise GlueRecipeError(f"{path} is empty.")
    if task.tsv_num_columns is not None:  # headerless
        header, body, first_line = None, rows, 1
        width = task.tsv_num_columns
        if len(rows[0]) != width:
            raise GlueRecipeError(f"{path}: task {task.name} expects {width} tab-separated columns and no header "
                                  f"(GLUE's {task.dir_name} layout), but the first line has {len(rows[0])}: "
                                  f"{rows[0][:6]}.")
        text_idx, label_idx = list(task.tsv_text_columns), task.tsv_label_column
    else:
        header, body, first_line = [c.strip() for c in rows[0]], rows[1:], 2
        width = len(header)
        needed = [*task.tsv_text_columns, task.tsv_label_column]
        missing = [c for c in needed if c not in header]
        if missing:
            raise GlueRecipeError(f"{path}: task {task.name} needs the columns {needed} (GLUE's {task.dir_name} "
                                  f"layout), but the header has {header}; missing {missing}. Is this the "
                                  f"{task.dir_name} file?")
        text_idx = [header.index(c) for c in task.tsv_text_columns]
        label_idx = header.index(task.tsv_label_column)
    data = {key: [] for key in task.text_keys}
    data["label"] = []
    skipped = 0
    for line, row in enumerate(body, start=first_line):
        if len(row) != width:
            skipped += 1
            continue
        for key, idx in zip(task.text_keys, text_idx):
            data[key].append(row[idx])
        data["label"].append(_parse_label(task, row[label_idx], f"{path}:{line}"))
    if skipped:
        print(f"warning: {path}: skipped {skipped} malformed line(s) (not {width} fields)", file=sys.stderr)
    if not data["label"]:
        raise GlueRecipeError(f"{path} has no data rows.")
    return data


def load_glue(task: GlueTask, data_dir: Optional[str]) -> DatasetDict:
    """Train and evaluation splits with the Hub's columns (texts + integer/float 'label'), from GLUE TSVs under
    `data_dir` or from the Hub dataset nyu-mll/glue."""
    splits = [("train", "train.tsv"), *task.eval_files]
    if data_dir is not None:
        folder = Path(data_dir) / task.dir_name
        missing = [str(folder / name) for _, name in splits if not (folder / name).is_file()]
        if missing:
            raise GlueRecipeError(f"--data_dir {data_dir}: missing data file(s) {missing} for task {task.name} "
                                  f"(expected {task.dir_name}/{', '.join(name for _, name in splits)}).")
        return DatasetDict({split: Dataset.from_dict(read_glue_tsv(task, folder / name)) for split, name in splits})
    from datasets import load_dataset

    try:
        raw = load_dataset(HUB_DATASET, task.name)
    except Exception as err:  # offline, no such config, ...
        raise GlueRecipeError(f"could not load {HUB_DATASET}/{task.name} from the Hub ({type(err).__name__}: {err}). "
                              f"Use --data_dir with GLUE TSV folders instead.") from err
    needed = [*task.text_keys, "label"]
    for split, _ in splits:
        if split not in raw or any(c not in raw[split].column_names for c in needed):
            raise GlueRecipeError(f"{HUB_DATASET}/{task.name} has no split {split!r} with columns {needed}.")
    return DatasetDict({split: raw[split] for split, _ in splits})


@functools.lru_cache(maxsize=None)
def glue_metric(config_name: str):
    """GLUE's `evaluate` metric for a task (the Hub's `glue` module, or the identical one shipped with inhernet_hf)."""
    return load_metric("glue", config_name)


def compute_metrics(task: GlueTask, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """GLUE's metrics, `task.metrics` in order: accuracy; F1 (positive class 1) and accuracy for MRPC/QQP;
    Matthews correlation for CoLA; Pearson and Spearman correlations for STS-B."""
    scores = glue_metric(task.name).compute(predictions=predictions, references=references)
    return {name: float(scores[name]) for name in task.metrics}


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task_name", type=str.lower, required=True, choices=sorted(GLUE_TASKS),
                        help="The GLUE task.")
    parser.add_argument("--model_name_or_path", type=str, required=True,
                        help="Model to fine-tune (--no_inher) or to inherit from (a Hub id or a folder).")
    parser.add_argument("--data_dir", type=str, default=None,
                        help="Folder of GLUE TSV folders (SST-2/, MNLI/, ...); default: the Hub dataset nyu-mll/glue.")
    parser.add_argument("--max_length", type=int, default=128, help="Maximum tokenised length (longer is truncated).")
    parser.add_argument("--pad_to_max_length", action="store_true",
                        help="Pad every example to --max_length (default: pad each batch to its longest).")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Use the first N training examples.")
    parser.add_argument("--max_eval_samples", type=int, default=None,
                        help="Use the first N examples of each eval split.")
    parser.add_argument("--ignore_mismatched_sizes", action="store_true",
                        help="Re-initialise a classifier head whose size differs from the task's number of labels.")
    add_training_args(parser)
    add_inher_args(parser)
    add_kd_args(parser)
    baselines = add_baseline_args(parser, "equal groups of layers; default: min(3, layers)")
    baselines.add_argument("--student_num_layers", type=int, default=None,
                           help="Train a student made of this many evenly spaced layers of --model_name_or_path "
                                "(DistilBERT-style init) instead of inheriting.")
    baselines.add_argument("--student_layers", type=int, nargs="+", default=None,
                           help="The teacher's layer indices the student keeps (instead of --student_num_layers).")
    args = parser.parse_args(argv)
    try:
        if args.student_num_layers is not None and args.student_layers is not None:
            raise ValueError("Give only one of --student_num_layers and --student_layers.")
        is_student = args.student_num_layers is not None or args.student_layers is not None
        check_common_args(args, parser, "student" if is_student else "teacher" if args.no_inher else "inherited")
        if GLUE_TASKS[args.task_name].is_regression and changed_flags(args, parser, ("kd_temperature",)):
            raise ValueError(f"{args.task_name} is a regression: its KD term is the MSE to the teacher's outputs, "
                             f"without a temperature; remove --kd_temperature.")
        check_baseline_args(args, parser, is_student)
        for flag in ("max_length", "max_train_samples", "max_eval_samples"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    except ValueError as err:
        parser.error(str(err))
    if args.push_to_hub and args.hub_model_id is None:
        args.hub_model_id = Path(args.output_dir).absolute().name
    return args


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def _is_default_labels(id2label: dict) -> bool:
    return all(str(v) == f"LABEL_{k}" for k, v in id2label.items())


def load_teacher(path: str, task: GlueTask, tokenizer) -> torch.nn.Module:
    """The frozen KD teacher, checked to be a fine-tuned classifier for this task (same number of labels, same label
    names when it records any, no newly initialised weights) that reads the student's token ids (same vocabulary
    as `tokenizer`, when the teacher's folder has a tokenizer)."""
    try:
        teacher, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise GlueRecipeError(f"cannot load the KD teacher {path!r}: {err}") from err
    if teacher.config.num_labels != task.num_labels:
        raise GlueRecipeError(f"the KD teacher {path!r} has num_labels={teacher.config.num_labels}, but task "
                              f"{task.name} "
                              f"has {task.num_labels} label(s); pass --teacher_name_or_path a model fine-tuned on "
                              f"{task.name} (e.g. the output_dir of a --no_inher run).")
    if not task.is_regression and not _is_default_labels(teacher.config.id2label):
        ours = dict(enumerate(task.label_names))
        theirs = {int(k): v for k, v in teacher.config.id2label.items()}
        if theirs != ours:
            raise GlueRecipeError(f"the KD teacher {path!r} maps labels as {theirs}, but task {task.name} uses {ours}.")
    if info["missing_keys"]:
        raise GlueRecipeError(f"the KD teacher {path!r} is not fine-tuned on {task.name}: its weights "
                              f"{sorted(info['missing_keys'])[:4]} are newly initialised. Fine-tune a teacher first "
                              f"(--no_inher; its output_dir is the teacher) and pass it as --teacher_name_or_path, or "
                              f"disable distillation with --kd_alpha 0.")
    # Without tokenizer files (a weights-only folder) transformers would build an empty tokenizer: nothing to compare.
    if (cached_file(path, "tokenizer_config.json", _raise_exceptions_for_missing_entries=False) is not None
            and AutoTokenizer.from_pretrained(path).get_vocab() != tokenizer.get_vocab()):
        raise GlueRecipeError(f"the KD teacher {path!r} has a different vocabulary from the student's tokenizer; KD "
                              f"feeds the teacher the student's token ids, so both need the same tokenizer.")
    return teacher.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    wall_start = time.perf_counter()
    task = GLUE_TASKS[args.task_name]
    is_student = args.student_num_layers is not None or args.student_layers is not None
    use_kd = (is_student or not args.no_inher) and (args.kd_alpha > 0 or args.kd_hidden_weight > 0
                                                    or args.distill_method != "kd")
    if args.distill_method != "kd" and task.is_regression:
        raise GlueRecipeError(f"--distill_method {args.distill_method} needs a classification task; {task.name} is a "
                              f"regression (use --distill_method kd).")
    # Everything that can be checked without loading a model comes first.
    inher_config = None
    if not args.no_inher and not is_student:
        try:
            inher_config = inher_config_from_args(args, task_type="SEQ_CLS")
        except (TypeError, ValueError) as err:
            raise GlueRecipeError(f"bad inheritance options: {err}") from err
    raw = load_glue(task, args.data_dir)
    resume_path = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)

    accelerator = build_accelerator(args)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    repo_id = create_hub_repo(accelerator, args)

    label_kwargs = {} if task.is_regression else {
        "id2label": dict(enumerate(task.label_names)), "label2id": {n: i for i, n in enumerate(task.label_names)}}
    config = AutoConfig.from_pretrained(args.model_name_or_path, num_labels=task.num_labels,
                                        finetuning_task=task.name, **label_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path, config=config,
                                                               ignore_mismatched_sizes=args.ignore_mismatched_sizes)
    teacher = None
    if use_kd:
        teacher = load_teacher(args.teacher_name_or_path or args.model_name_or_path, task, tokenizer)
        teacher.to(accelerator.device)

    # Tokenise (only the examples used).
    if args.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(args.max_train_samples, len(raw["train"]))))
    for split, _ in task.eval_files:
        if args.max_eval_samples is not None:
            raw[split] = raw[split].select(range(min(args.max_eval_samples, len(raw[split]))))
    padding = "max_length" if args.pad_to_max_length else False

    def preprocess(examples):
        texts = [examples[key] for key in task.text_keys]
        result = tokenizer(*texts, padding=padding, max_length=args.max_length, truncation=True)
        result["labels"] = [float(x) for x in examples["label"]] if task.is_regression else examples["label"]
        return result

    with accelerator.main_process_first():
        processed = raw.map(preprocess, batched=True, remove_columns=raw["train"].column_names,
                            desc="Tokenizing")
    if args.pad_to_max_length:
        collator = default_data_collator
    else:
        multiple = 8 if accelerator.mixed_precision != "no" else None  # tensor-core friendly shapes
        collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)
    train_dataloader = DataLoader(processed["train"], shuffle=True, collate_fn=collator,
                                  batch_size=args.per_device_train_batch_size)
    eval_dataloaders = {split: DataLoader(processed[split], collate_fn=collator,
                                          batch_size=args.per_device_eval_batch_size)
                        for split, _ in task.eval_files}

    dense_params = model.num_parameters()
    if is_student:
        try:
            model = layer_student(model, args.student_num_layers, args.student_layers)
        except ValueError as err:
            raise GlueRecipeError(f"bad student options: {err}") from err
    if args.kd_hidden_weight > 0:
        try:
            check_hidden_states_match(model.config, teacher.config)
        except ValueError as err:
            raise GlueRecipeError(str(err)) from err
    if inher_config is not None:
        model = inherit_for_training(accelerator, model, inher_config, processed["train"], collator, args)
    total_params, trainable_params = param_counts(model)

    try:  # HCD's branches are training-only: optimised with the student (same weight-decay rule), never saved
        loss_fn, branches = student_loss(teacher, model, args, use_kd, task.num_labels,
                                         kind="mse" if task.is_regression else "kl", autocast=accelerator.autocast)
    except ValueError as err:
        raise GlueRecipeError(str(err)) from err
    trained = model if branches is None else torch.nn.ModuleList([model, branches])
    optimizer = build_optimizer(trained, args.learning_rate, args.weight_decay)
    model, optimizer, train_dataloader, eval_dataloaders, lr_scheduler, plan = prepare_training(
        accelerator, model, optimizer, train_dataloader, eval_dataloaders, args)
    if branches is not None:
        loss_fn.branches = accelerator.prepare(branches)
    predict = ((lambda outputs, batch: outputs.logits.squeeze(-1)) if task.is_regression
               else (lambda outputs, batch: outputs.logits.argmax(dim=-1)))

    def eval_fn() -> dict:
        metrics = {}
        for split, dataloader in eval_dataloaders.items():
            predictions, references = evaluate(accelerator, model, dataloader, predict)
            suffix = SPLIT_SUFFIX[split]
            metrics.update({f"{k}{suffix}": v for k, v in compute_metrics(task, predictions, references).items()})
            metrics[f"samples{suffix}"] = int(len(predictions))
        return metrics

    kind = "inherited" if inher_config else f"{model.config.num_hidden_layers}-layer student" if is_student else "dense"
    accelerator.print(f"task {task.name}: {len(processed['train'])} train examples, "
                      + ", ".join(f"{len(processed[s])} {s}" for s, _ in task.eval_files)
                      + f"; {plan.max_train_steps} optimizer steps of {plan.total_batch_size} examples "
                      + f"({plan.num_train_epochs} epoch(s)); {kind} model with {total_params:,} params; "
                      + (f"distillation {args.distill_method}" if use_kd else "no distillation"))
    result = train(accelerator, model, optimizer, lr_scheduler, train_dataloader, loss_fn, plan, args.output_dir,
                   checkpointing_steps=args.checkpointing_steps, resume_from_checkpoint=resume_path,
                   max_grad_norm=args.max_grad_norm, eval_fn=eval_fn, eval_steps=args.eval_steps, seed=args.seed,
                   with_tracking=args.with_tracking, project_name=f"glue_{task.name}", tracker_args=args)

    results = run_results(accelerator, result, result.eval_metrics, total_params, trainable_params, dense_params,
                          len(processed["train"]), wall_start)
    results.update({
        "task": task.name, "inherited": inher_config is not None, "kd": use_kd,
        "distill_method": args.distill_method if use_kd else None,
        "student_layers": model.config.num_hidden_layers if is_student else None,
        "training_only_params": sum(p.numel() for p in branches.parameters()) if branches is not None else 0,
    })
    card_metrics = {k: v for k, v in result.eval_metrics.items() if not k.startswith("samples")}
    finish_run(accelerator, args, model, tokenizer, results, card_metrics, f"glue/{task.name}", repo_id)
    return results


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    try:
        return run(args)
    except (GlueRecipeError, CheckpointError, NonFiniteLossError, TrackingError) as err:
        sys.exit(f"glue.py: error: {err}")


if __name__ == "__main__":
    main()
