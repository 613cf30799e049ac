"""The training machinery shared by the recipes (`recipes/glue.py`, `recipes/gsm8k.py`), built on Accelerate.

One copy of everything a recipe needs around its data and metrics:

* command-line flags: `add_training_args` (the `run_*_no_trainer.py` flags), `add_kd_args`, `add_inher_args`;
* setup: `build_accelerator`, `build_optimizer`, `prepare_training` (prepares, sizes the run, builds the scheduler),
  `inher_config_from_args` and `inherit_model` (passes `calibration_data` only when the config needs it);
* knowledge distillation: `kd_kl_loss`, `kd_mse_loss`, `distillation_loss`, `hidden_state_loss` and
  `DistillationLoss` (the per-batch loss of a student with an optional frozen teacher: Hinton KD for classification,
  MSE for regression, token-level KL on the answer tokens of a causal LM, optionally a layer-wise hidden-state term);
* the loop: `train` (gradient accumulation, scheduler, mixed precision, tracking, checkpoints, exact resume,
  NaN/Inf stop) and `evaluate` (predictions gathered with `gather_for_metrics`, no duplicated samples);
* checkpoints: `save_checkpoint` (atomic: written to a hidden temporary folder, renamed when complete),
  `find_latest_checkpoint`, `resolve_checkpoint`; results: `write_results`;
* the end of a run: `create_hub_repo` (before training, so a bad token fails early), `run_results` (the
  all_results.json entries every recipe writes) and `finish_run` (writes them, then `save_final_model`: InherModel
  card and eval results, or a dense model + tokenizer; pushed with `--push_to_hub`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedType, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from .config import InherConfig, calibration_needed

logger = logging.getLogger(__name__)

CHECKPOINT_STATE_FILE = "inhernet_trainer_state.json"
CHECKPOINT_NAME = re.compile(r"^(step|epoch)_(\d+)$")
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
# Test-only fault injection: "during_save:N" exits (like a kill) after the checkpoint of step N is written to its
# temporary folder but before it is renamed; "after_checkpoint:N" right after the checkpoint of step N is complete.
TEST_KILL_ENV = "_INHERNET_TEST_KILL"


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN/Inf; training stopped before the weights were updated."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing, incomplete, or written by a different setup)."""


class TrackingError(ValueError):
    """--with_tracking asked for trackers of which none is installed."""


# ----------------------------------------------------------------------------------------------------------------
# Command-line flags shared by the recipes
# ----------------------------------------------------------------------------------------------------------------


def parse_checkpointing_steps(value: Optional[str]) -> Union[None, int, str]:
    """`--checkpointing_steps`: None, a positive number of optimizer steps, or 'epoch'."""
    if value is None or value == "":
        return None
    if isinstance(value, int):
        steps = value
    elif value == "epoch":
        return "epoch"
    elif str(value).isdigit():
        steps = int(value)
    else:
        raise argparse.ArgumentTypeError(f"--checkpointing_steps must be a positive integer or 'epoch', got {value!r}.")
    if steps < 1:
        raise argparse.ArgumentTypeError(f"--checkpointing_steps must be a positive integer or 'epoch', got {value!r}.")
    return steps


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return number


# transformers' schedulers that `get_scheduler(name, optimizer, num_warmup_steps, num_training_steps)` builds and
# that step on the step count alone (reduce_lr_on_plateau and greedy need a metric, the *_min_lr and
# warmup_stable_decay ones extra arguments).
STEP_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                   "inverse_sqrt")


def add_training_args(parser: argparse.ArgumentParser, learning_rate: float = 5e-5) -> argparse.ArgumentParser:
    """The flags of transformers' `run_*_no_trainer.py` examples that drive `train` (mixed precision and the number
    of processes are `accelerate launch`'s own flags)."""
    group = parser.add_argument_group("training")
    group.add_argument("--per_device_train_batch_size", type=_positive_int, default=8)
    group.add_argument("--per_device_eval_batch_size", type=_positive_int, default=8)
    group.add_argument("--learning_rate", type=float, default=learning_rate,
                       help="Initial (after warmup) learning rate.")
    group.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (not on biases and norms).")
    group.add_argument("--num_train_epochs", type=_non_negative_int, default=3)
    group.add_argument("--max_train_steps", type=_non_negative_int, default=None,
                       help="Total optimizer steps; overrides --num_train_epochs. 0 only evaluates.")
    group.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1)
    group.add_argument("--lr_scheduler_type", default="linear", choices=STEP_SCHEDULERS,
                       help="transformers' schedulers that step on the step count alone (the others need a "
                            "metric or extra arguments).")
    group.add_argument("--num_warmup_steps", type=_non_negative_int, default=0, help="Optimizer steps of warmup.")
    group.add_argument("--max_grad_norm", type=float, default=None,
                       help="Clip gradients to this norm (default: no clipping).")
    group.add_argument("--output_dir", type=str, required=True, help="Final model, all_results.json and checkpoints.")
    group.add_argument("--seed", type=int, default=42,
                       help="Seed of the initialisation, dropout and data order (needed for exact resumption).")
    group.add_argument("--eval_steps", type=_positive_int, default=None,
                       help="Also evaluate every N optimizer steps (default: at the end of each epoch only); every "
                            "evaluation is listed in all_results.json's eval_history.")
    group.add_argument("--checkpointing_steps", type=parse_checkpointing_steps, default=None,
                       help="Save the training state every N optimizer steps, or 'epoch' at the end of each epoch.")
    group.add_argument("--resume_from_checkpoint", type=str, default=None,
                       help="A checkpoint folder (output_dir/step_N or epoch_N), or 'latest' for the most advanced "
                            "complete checkpoint in --output_dir (a fresh start when there is none).")
    group.add_argument("--with_tracking", action="store_true", help="Log metrics with the trackers of --report_to.")
    group.add_argument("--report_to", type=str, default="tensorboard",
                       help="Tracker(s) for --with_tracking: 'tensorboard', 'wandb', 'all', ... (Accelerate's names).")
    group.add_argument("--push_to_hub", action="store_true", help="Push the final model (with its card) to the Hub.")
    group.add_argument("--hub_model_id", type=str, default=None, help="Repository id; default: output_dir's name.")
    group.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the logged-in one).")
    return parser


def add_kd_args(parser: argparse.ArgumentParser, alpha: float = 0.5,
                temperature: float = 2.0) -> argparse.ArgumentParser:
    group = parser.add_argument_group("knowledge distillation (inherited runs only)")
    group.add_argument("--kd_alpha", type=float, default=alpha,
                       help="Weight of the distillation term: (1 - a) * task loss + a * KD loss. 0 disables KD.")
    group.add_argument("--kd_temperature", type=float, default=temperature,
                       help="Softmax temperature T of the KD term.")
    group.add_argument("--teacher_name_or_path", type=str, default=None,
                       help="Frozen teacher (a fine-tuned model folder or Hub id). Default: --model_name_or_path.")
    group.add_argument("--kd_hidden_weight", type=float, default=0.0,
                       help="Weight b of a layer-wise hidden-state term added to the loss: b * the mean over layers "
                            "of sum ||h_student - h_teacher||^2 / sum ||h_teacher||^2, the sums over the non-padding "
                            "tokens. The student needs the teacher's layers and hidden size (an inherited model has "
                            "them). 0 disables it.")
    return parser


def add_inher_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags mapping to `InherConfig` (validated by InherConfig itself, so new choices need no change here)."""
    group = parser.add_argument_group("inheritance (InherConfig)")
    group.add_argument("--no_inher", action="store_true", help="Train the plain (dense) model: the teacher run.")
    group.add_argument("--inher_r", type=int, default=None, help="Rank of every inherited layer.")
    group.add_argument("--inher_target_ratio", type=float, default=None,
                       help="Fraction of the targeted layers' parameters kept (default 0.5 when --inher_r is not "
                            "given).")
    group.add_argument("--inher_num_heads", type=int, default=2, help="Number of gated up-projection heads.")
    group.add_argument("--inher_init", type=str, default="svd",
                       help="'svd', 'svd_lowrank', 'random' or 'whitened' (needs calibration data, see below).")
    group.add_argument("--inher_rank_allocation", type=str, default=None,
                       help="'uniform', 'energy' or 'activation' (InherConfig.rank_allocation; default: "
                            "InherConfig's).")
    group.add_argument("--inher_min_rank", type=int, default=None,
                       help="InherConfig.min_rank (default: InherConfig's).")
    group.add_argument("--inher_rank_multiple", type=int, default=None,
                       help="InherConfig.rank_multiple (default: InherConfig's).")
    group.add_argument("--inher_gate", type=str, default=None,
                       help="'softmax' or 'none' (InherConfig.gate; default: InherConfig's).")
    group.add_argument("--inher_structure", type=str, default=None,
                       help="'asymmetric' or 'symmetric' (InherConfig.structure; default: InherConfig's).")
    group.add_argument("--inher_target_modules", type=str, nargs="+", default=None,
                       help="Module names to inherit, one regex string, or 'all-linear' (default: the model type's).")
    group.add_argument("--inher_calibration_samples", type=_positive_int, default=128,
                       help="Training examples passed as calibration_data when the config needs them "
                            "(--inher_init whitened or --inher_rank_allocation activation).")
    return parser


INHER_FLAGS = ("inher_r", "inher_target_ratio", "inher_num_heads", "inher_init", "inher_rank_allocation",
               "inher_min_rank", "inher_rank_multiple", "inher_gate", "inher_structure", "inher_target_modules",
               "inher_calibration_samples")
KD_FLAGS = ("kd_alpha", "kd_temperature", "teacher_name_or_path", "kd_hidden_weight")


def changed_flags(args: argparse.Namespace, parser: argparse.ArgumentParser, names: Iterable[str]) -> list[str]:
    """The `--name` flags among `names` set to something other than the parser's default."""
    return [f"--{name}" for name in names if getattr(args, name) != parser.get_default(name)]


def check_common_args(args: argparse.Namespace, parser: argparse.ArgumentParser, run_kind: str) -> None:
    """Cross-flag checks of the shared flags; raises ValueError with the flag names. `run_kind`: "teacher" (dense,
    --no_inher), "inherited" or "student". Nothing given is silently unused: the --inher_* flags describe only an
    inherited model, and the KD flags only a run that distils."""
    if not 0.0 <= args.kd_alpha <= 1.0:
        raise ValueError(f"--kd_alpha must lie in [0, 1], got {args.kd_alpha}.")
    if not args.kd_temperature > 0:
        raise ValueError(f"--kd_temperature must be > 0, got {args.kd_temperature}.")
    if not args.kd_hidden_weight >= 0:
        raise ValueError(f"--kd_hidden_weight must be >= 0, got {args.kd_hidden_weight}.")
    if args.max_grad_norm is not None and not args.max_grad_norm > 0:
        raise ValueError(f"--max_grad_norm must be > 0, got {args.max_grad_norm}.")
    unused = changed_flags(args, parser, INHER_FLAGS) if run_kind != "inherited" else []
    if unused:
        raise ValueError(f"this run does not inherit ({'--no_inher' if run_kind == 'teacher' else 'a student run'}): "
                         f"remove {', '.join(unused)} (options of the inherited model).")
    if run_kind == "inherited" and args.inher_r is not None and args.inher_target_ratio is not None:
        raise ValueError("Give only one of --inher_r and --inher_target_ratio.")
    calibrates = calibration_needed(args.inher_init, args.inher_rank_allocation)
    if run_kind == "inherited" and not calibrates and changed_flags(args, parser, ("inher_calibration_samples",)):
        raise ValueError("--inher_calibration_samples is used only by --inher_init whitened or --inher_rank_allocation "
                         "activation; remove it or choose one of those.")
    if run_kind == "teacher":
        unused = changed_flags(args, parser, KD_FLAGS)
        reason = "--no_inher trains the teacher without distillation"
    elif getattr(args, "distill_method", "kd") == "kd" and args.kd_alpha == 0:
        unused = changed_flags(args, parser, ("kd_temperature",) if args.kd_hidden_weight > 0
                               else ("kd_temperature", "teacher_name_or_path"))
        reason = ("--kd_alpha 0 turns the logit term off" if args.kd_hidden_weight > 0
                  else "nothing is distilled with --kd_alpha 0 (and no --kd_hidden_weight)")
    else:
        unused = []
    if unused:
        raise ValueError(f"{reason}: remove {', '.join(unused)}.")


def inher_config_from_args(args: argparse.Namespace, task_type: str) -> InherConfig:
    """The `InherConfig` of the `--inher_*` flags (InherConfig validates the values)."""
    kwargs: dict[str, Any] = {"num_heads": args.inher_num_heads, "init": args.inher_init, "task_type": task_type}
    if args.inher_r is not None:
        kwargs["r"] = args.inher_r
    else:
        kwargs["target_ratio"] = 0.5 if args.inher_target_ratio is None else args.inher_target_ratio
    if args.inher_target_modules is not None:
        modules = args.inher_target_modules
        # One value that is 'all-linear' or looks like a regex is passed as a string, anything else as a name list.
        is_pattern = len(modules) == 1 and (modules[0] == "all-linear" or re.search(r"[\\^$*+?()\[\]|{}]", modules[0]))
        kwargs["target_modules"] = modules[0] if is_pattern else modules
    for flag, name in (("inher_rank_allocation", "rank_allocation"), ("inher_min_rank", "min_rank"),
                       ("inher_rank_multiple", "rank_multiple"), ("inher_gate", "gate"),
                       ("inher_structure", "structure")):
        if getattr(args, flag, None) is not None:
            kwargs[name] = getattr(args, flag)
    return InherConfig(**kwargs)


def calibration_batches(dataloader: Iterable[Mapping[str, Any]], num_samples: int) -> list[dict[str, Any]]:
    """The first `num_samples` examples of `dataloader` (not shuffled) as model-input dict batches (labels dropped)."""
    batches, seen = [], 0
    for batch in dataloader:
        batch = {k: v for k, v in batch.items() if k != "labels"}
        size = len(next(iter(batch.values())))
        keep = min(size, num_samples - seen)
        batches.append({k: v[:keep] for k, v in batch.items()} if keep < size else batch)
        seen += keep
        if seen >= num_samples:
            break
    return batches


def inherit_for_training(accelerator: Accelerator, model: nn.Module, inher_config: InherConfig, train_dataset,
                         collate_fn, args: argparse.Namespace):
    """The recipes' inheritance step: `inherit_model` with the (unshuffled) training set as calibration source
    (`--inher_calibration_samples` examples, used only when the config needs them), run on the accelerator's device
    (calibration forwards and SVDs on the GPU when there is one); prints the per-layer report."""
    model.to(accelerator.device)
    calibration = DataLoader(train_dataset, collate_fn=collate_fn, batch_size=args.per_device_train_batch_size)
    model = inherit_model(model, inher_config, calibration, args.inher_calibration_samples,
                          progressbar=accelerator.is_local_main_process)
    accelerator.print(model.report())
    return model


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def inherit_model(model: nn.Module, inher_config: InherConfig, calibration_loader: Optional[Iterable] = None,
                  calibration_samples: int = 128, progressbar: bool = True):
    """`get_inher_model(model, inher_config)`, with `calibration_data` (the first `calibration_samples` examples of
    `calibration_loader`, labels dropped) only when the config needs it (`InherConfig.needs_calibration`)."""
    from .model import get_inher_model

    if not inher_config.needs_calibration:
        return get_inher_model(model, inher_config, progressbar=progressbar)
    if calibration_loader is None:
        raise ValueError(f"init={inher_config.init!r} / rank_allocation={inher_config.rank_allocation!r} needs "
                         f"calibration data, but no calibration loader was given.")
    data = calibration_batches(calibration_loader, calibration_samples)
    return get_inher_model(model, inher_config, calibration_data=data, progressbar=progressbar)


# ----------------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------------


# Distributed setups whose engine steps, shards or accumulates on its own: train() does not drive them.
UNSUPPORTED_DISTRIBUTED = (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM)


def check_accelerator(accelerator: Accelerator) -> None:
    """`train` drives one process or DDP and accumulates gradients itself: refuse anything else up front."""
    if accelerator.distributed_type in UNSUPPORTED_DISTRIBUTED:
        raise ValueError(f"accelerate is configured for {accelerator.distributed_type.value}; the recipes' loop "
                         f"(item-weighted gradient accumulation, gradient clipping over the optimizer's parameters) "
                         f"is written for one process or DDP (--multi_gpu, or several CPU processes over gloo).")
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError(f"The Accelerator accumulates over {accelerator.gradient_accumulation_steps} steps (an "
                         f"ACCELERATE_GRADIENT_ACCUMULATION_STEPS variable?); the loop accumulates itself "
                         f"(--gradient_accumulation_steps): unset it.")


def build_accelerator(args: argparse.Namespace) -> Accelerator:
    """Accelerator with trackers (when --with_tracking) under --output_dir and a seedable sampler: the shuffled
    order of epoch e depends only on (seed, e), which is what makes resumption exact. Gradient accumulation is
    `train`'s own (weighted by items, see there), so the Accelerator is built without it."""
    accelerator = Accelerator(
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    check_accelerator(accelerator)
    if args.with_tracking and not accelerator.log_with:  # accelerate drops uninstalled trackers with a debug log
        raise TrackingError(f"--with_tracking --report_to {args.report_to}: none of these trackers is installed "
                            f"(e.g. pip install tensorboard), so nothing would be logged.")
    set_seed(args.seed)
    if (accelerator.num_processes == 1 and os.environ.get("MASTER_ADDR") and "WORLD_SIZE" not in os.environ
            and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")):
        accelerator.print(
            "warning: `accelerate launch --cpu --num_processes N` starts ONE process unless mpirun is configured "
            "(accelerate issue #2741). For N CPU processes (gloo) run: ACCELERATE_USE_CPU=1 accelerate launch "
            "--multi_gpu --num_processes N ...")
    return accelerator


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and normalisation weights (HF convention)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_norm = "norm" in name.lower() or name.endswith("bias") or param.ndim < 2
        (no_decay if is_norm else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate)


@dataclass
class TrainPlan:
    """How long the run is, in per-process batches and optimizer steps (after `accelerator.prepare`)."""

    max_train_steps: int
    num_train_epochs: int
    num_update_steps_per_epoch: int
    train_batches_per_epoch: int
    gradient_accumulation_steps: int
    total_batch_size: int
    num_processes: int


def prepare_training(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                     train_dataloader, eval_dataloaders: Mapping[str, Any], args: argparse.Namespace):
    """Prepare everything, size the run from the *sharded* train loader and build the scheduler.

    Returns (model, optimizer, train_dataloader, eval_dataloaders, lr_scheduler, plan). The prepared scheduler is
    stepped `num_processes` times per optimizer step by Accelerate, so its horizon and warmup are scaled by it.
    """
    train_dataloader = accelerator.prepare(train_dataloader)
    batches = len(train_dataloader)
    accum = args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(batches / accum)
    if args.max_train_steps is None:
        max_steps = args.num_train_epochs * steps_per_epoch
    else:
        max_steps = args.max_train_steps
    epochs = math.ceil(max_steps / steps_per_epoch) if steps_per_epoch else 0
    if max_steps > 0 and steps_per_epoch == 0:
        raise ValueError("The training set is empty.")
    scheduler = get_scheduler(
        name=args.lr_scheduler_type, optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=max(max_steps, 1) * accelerator.num_processes,
    )
    names = list(eval_dataloaders)
    model, optimizer, scheduler, *evals = accelerator.prepare(model, optimizer, scheduler,
                                                              *[eval_dataloaders[n] for n in names])
    plan = TrainPlan(max_steps, epochs, steps_per_epoch, batches, accum,
                     args.per_device_train_batch_size * accelerator.num_processes * accum, accelerator.num_processes)
    return model, optimizer, train_dataloader, dict(zip(names, evals)), scheduler, plan


# ----------------------------------------------------------------------------------------------------------------
# Knowledge distillation
# ----------------------------------------------------------------------------------------------------------------


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.device, torch.bool).expand_as(values)
    count = mask.sum()
    return torch.where(mask, values, 0.0).sum() / count.clamp(min=1)


def kd_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), summed over the last (class / vocabulary) axis and averaged
    over every other position: rows of a (batch, classes) pair, or the tokens where `mask` is True of a
    (batch, length, vocab) pair. Computed in float32."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)
    return temperature**2 * _masked_mean(kl, mask)


def kd_mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error between student and teacher outputs (regression), averaged where `mask` is True."""
    err = (student_logits.float() - teacher_logits.detach().float()) ** 2
    if mask is not None:
        mask = mask.to(err.device, torch.bool)
        while mask.ndim < err.ndim:
            mask = mask.unsqueeze(-1)
    return _masked_mean(err, mask)


def hidden_state_loss(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...],
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Layer-wise relative error of the hidden states: the mean over layers l of
    sum ||h_s^l - h_t^l||^2 / sum ||h_t^l||^2, the sums over the positions where `mask` (batch, length) is 1.

    Takes the models' `hidden_states` tuples (the embeddings, then one (batch, length, hidden) entry per layer, the
    last one after the final norm in models that have one, as Llama); the embeddings are skipped. Computed in
    float32."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"hidden-state distillation matches layers one to one, but the student has "
                         f"{len(student_hidden) - 1} layers and the teacher {len(teacher_hidden) - 1}.")
    keep = None if mask is None else mask.to(student_hidden[-1].device, torch.bool)
    errors = []
    for student, teacher in zip(student_hidden[1:], teacher_hidden[1:]):
        if student.shape != teacher.shape:
            raise ValueError(f"hidden-state distillation needs equal hidden-state shapes; the student's are "
                             f"{tuple(student.shape)}, the teacher's {tuple(teacher.shape)}.")
        teacher = teacher.detach().float()
        diff = (student.float() - teacher).pow(2).sum(-1)
        norm = teacher.pow(2).sum(-1)
        if keep is not None:
            diff, norm = diff[keep], norm[keep]
        errors.append(diff.sum() / norm.sum().clamp(min=torch.finfo(torch.float32).tiny))
    return torch.stack(errors).mean()


def check_hidden_states_match(student_config, teacher_config) -> None:
    """Raises ValueError unless the student can be distilled layer by layer from the teacher (`hidden_state_loss`):
    the same number of layers and the same hidden size."""
    student = (student_config.num_hidden_layers, student_config.hidden_size)
    teacher = (teacher_config.num_hidden_layers, teacher_config.hidden_size)
    if student != teacher:
        raise ValueError(f"--kd_hidden_weight matches hidden states layer by layer, so the student needs the "
                         f"teacher's (layers, hidden size) = {teacher}; it has {student}.")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, hard_loss: torch.Tensor,
                      alpha: float, temperature: float = 1.0, kind: str = "kl",
                      mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - alpha) * hard_loss + alpha * soft, with soft = `kd_kl_loss` (kind 'kl', Hinton et al.) or `kd_mse_loss`
    (kind 'mse', regression; the temperature is unused). Returns (total, soft)."""
    if kind == "kl":
        soft = kd_kl_loss(student_logits, teacher_logits, temperature, mask)
    elif kind == "mse":
        soft = kd_mse_loss(student_logits, teacher_logits, mask)
    else:
        raise ValueError(f"kind must be 'kl' or 'mse', got {kind!r}.")
    return (1.0 - alpha) * hard_loss + alpha * soft, soft


class DistillationLoss:
    """Per-batch loss for `train`: the model's own loss (`outputs.loss`, computed from `batch['labels']`), mixed
    with a KD term against the frozen `teacher` when `alpha > 0`, plus `hidden_weight` times the layer-wise
    `hidden_state_loss` (on the tokens of `batch['attention_mask']`) when `hidden_weight > 0`. Either needs a
    teacher; with neither, the teacher is not used.

    `token_level=True` is for causal LMs: logits at position i predict token i+1, so the KD term compares
    `logits[:, :-1]` on the positions whose next-token label is not `ignore_index` (the answer tokens); only those
    rows are selected before the softmaxes, so no (batch, length, vocab) float32 copy is made.
    """

    def __init__(self, teacher: Optional[nn.Module] = None, alpha: float = 0.0, temperature: float = 1.0,
                 kind: str = "kl", token_level: bool = False, ignore_index: int = -100,
                 autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
                 hidden_weight: float = 0.0) -> None:
        if kind not in ("kl", "mse"):
            raise ValueError(f"kind must be 'kl' or 'mse', got {kind!r}.")
        distils = alpha > 0 or hidden_weight > 0
        if distils and teacher is None:
            raise ValueError(f"alpha={alpha} / hidden_weight={hidden_weight} distil from a teacher, but none was "
                             f"given (pass the teacher, or alpha=0 and hidden_weight=0).")
        self.teacher = teacher if distils else None
        self.alpha, self.temperature, self.kind, self.hidden_weight = alpha, temperature, kind, hidden_weight
        self.token_level, self.ignore_index = token_level, ignore_index
        self.autocast = autocast or contextlib.nullcontext
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False)

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden_kwargs = {"output_hidden_states": True} if self.hidden_weight > 0 else {}
        outputs = model(**batch, **hidden_kwargs)
        hard = outputs.loss
        if hard is None:
            raise ValueError("The model returned no loss: the batch needs 'labels'.")
        if self.teacher is None:
            return hard, {}
        student_logits, student_hidden = outputs.logits, outputs.hidden_states if hidden_kwargs else None
        del outputs  # keep only what the terms need: no other output of either model outlives this call
        with torch.no_grad(), self.autocast():
            teacher = self.teacher(**{k: v for k, v in batch.items() if k != "labels"}, **hidden_kwargs)
        teacher_logits, teacher_hidden = teacher.logits, teacher.hidden_states if hidden_kwargs else None
        del teacher
        loss, logs = hard, {"task_loss": hard.detach()}
        if self.alpha > 0:
            if self.token_level:  # only the answer positions' rows (n_answer, vocab) go through the softmaxes
                answer = batch["labels"][:, 1:] != self.ignore_index
                student_logits, teacher_logits = student_logits[:, :-1][answer], teacher_logits[:, :-1][answer]
            loss, soft = distillation_loss(student_logits, teacher_logits, hard, self.alpha, self.temperature,
                                           self.kind)
            logs["kd_loss"] = soft.detach()
        del student_logits, teacher_logits
        if self.hidden_weight > 0:
            hidden = hidden_state_loss(student_hidden, teacher_hidden, batch.get("attention_mask"))
            loss = loss + self.hidden_weight * hidden
            logs["hidden_loss"] = hidden.detach()
        return loss, logs


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _test_kill(point: str, step: int) -> None:
    spec = os.environ.get(TEST_KILL_ENV, "")
    if spec == f"{point}:{step}":
        logger.warning("%s=%s: exiting now (test fault injection).", TEST_KILL_ENV, spec)
        os._exit(86)


def model_shapes(model: nn.Module) -> dict[str, Any]:
    """{"digest": a hash of every parameter's name and shape, "params": their count}: what a checkpoint's model must
    match to be resumed into this run's."""
    named = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    digest = hashlib.sha256("\n".join(f"{name}:{shape}" for name, shape in named).encode()).hexdigest()[:16]
    return {"digest": digest, "params": sum(math.prod(shape) for _, shape in named)}


def read_checkpoint_state(path: Union[str, Path]) -> dict[str, Any]:
    with open(Path(path) / CHECKPOINT_STATE_FILE) as f:
        return json.load(f)


def save_checkpoint(accelerator: Accelerator, output_dir: Union[str, Path], name: str,
                    state: dict[str, Any]) -> Path:
    """`accelerator.save_state` into `output_dir/.tmp-<name>`, then `state` as its trainer-state file, then an
    atomic rename to `output_dir/<name>`. A run killed at any point leaves either the complete previous checkpoint
    set or the new one; the hidden temporary folder is never taken for a checkpoint. All processes must call it."""
    output_dir = Path(output_dir)
    final, tmp, old = output_dir / name, output_dir / f"{TMP_PREFIX}{name}", output_dir / f"{OLD_PREFIX}{name}"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a stale one from a killed run
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its RNG state
    if accelerator.is_main_process:
        with open(tmp / CHECKPOINT_STATE_FILE, "w") as f:
            json.dump(state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _test_kill("during_save", state["completed_steps"])
        if final.exists():  # rename(2) cannot replace a non-empty directory: move the old one aside first
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    _test_kill("after_checkpoint", state["completed_steps"])
    return final


def find_latest_checkpoint(output_dir: Union[str, Path]) -> Optional[Path]:
    """The complete checkpoint (`step_N` / `epoch_N` holding a trainer-state file) with the most optimizer steps
    in `output_dir`; ties go to the most recently written. None when there is none."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = []
    for child in output_dir.iterdir():
        if child.is_dir() and CHECKPOINT_NAME.match(child.name) and (child / CHECKPOINT_STATE_FILE).is_file():
            try:
                steps = int(read_checkpoint_state(child)["completed_steps"])
            except (ValueError, KeyError, json.JSONDecodeError):
                continue
            found.append((steps, (child / CHECKPOINT_STATE_FILE).stat().st_mtime, child))
    return max(found)[2] if found else None


def resolve_checkpoint(value: Optional[str], output_dir: Union[str, Path]) -> Optional[Path]:
    """`--resume_from_checkpoint`: None; 'latest' (the latest complete checkpoint of `output_dir`, or None when
    there is none yet: a fresh start); or a checkpoint folder, which must exist and be complete."""
    if not value:
        return None
    if value == "latest":
        latest = find_latest_checkpoint(output_dir)
        if latest is None:
            logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s yet; starting from scratch.",
                           output_dir)
        return latest
    path = Path(value)
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint {value}: no such folder.")
    if not (path / CHECKPOINT_STATE_FILE).is_file():
        raise CheckpointError(f"--resume_from_checkpoint {value}: not a complete checkpoint (no {CHECKPOINT_STATE_FILE}"
                              f"; folders named {TMP_PREFIX}* are interrupted saves).")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Train and evaluate
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without advancing any global RNG (python, numpy, torch CPU and CUDA): evaluation and the start
    of a data iterator (which draws a worker base seed) must not shift the dropout stream of training, or a resumed
    run would diverge from an uninterrupted one."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def count_examples(batch: Mapping[str, Any]) -> int:
    """What a sequence-level loss averages over: the batch's examples."""
    return len(next(iter(batch.values())))


def count_target_tokens(batch: Mapping[str, Any], ignore_index: int = -100) -> int:
    """What a causal LM's loss averages over: the next-token labels (labels[:, 1:]) that are not `ignore_index`."""
    return int((batch["labels"][..., 1:] != ignore_index).sum())


def _windows(batches: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """The micro-batches of each optimizer step: `size` at a time, the last window of an epoch possibly shorter."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _batches(dataloader) -> Iterator[Any]:
    """Iterate `dataloader`, starting its iterator (and fetching the first batch) under `preserved_rng`."""
    iterator = iter(dataloader)
    with preserved_rng():
        try:
            first = next(iterator)
        except StopIteration:
            return
    yield first
    yield from iterator


def evaluate(accelerator: Accelerator, model: nn.Module, dataloader,
             predict: Optional[Callable[[Any, Mapping[str, Any]], torch.Tensor]] = None,
             label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """Predictions and references over a prepared eval loader, gathered from every process with
    `gather_for_metrics` (the samples padded onto the last batches to even them out are dropped, so each example
    counts once). `predict(outputs, batch)` maps model outputs to predictions (default: argmax of the logits)."""
    predict = predict or (lambda outputs, batch: outputs.logits.argmax(dim=-1))
    model.eval()
    predictions, references = [], []
    with preserved_rng():
        for batch in dataloader:
            with torch.no_grad():
                outputs = model(**{k: v for k, v in batch.items() if k != label_key})
            preds, refs = accelerator.gather_for_metrics((predict(outputs, batch), batch[label_key]))
            predictions.append(preds.float().cpu().numpy() if preds.is_floating_point() else preds.cpu().numpy())
            references.append(refs.float().cpu().numpy() if refs.is_floating_point() else refs.cpu().numpy())
    if not predictions:
        return np.empty(0), np.empty(0)
    return np.concatenate(predictions), np.concatenate(references)


@dataclass
class TrainResult:
    completed_steps: int
    epoch: float  # optimizer steps done / steps per epoch
    train_loss: Optional[float]
    train_runtime: float
    train_steps_this_run: int
    eval_metrics: dict[str, float] = field(default_factory=dict)
    eval_history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "epoch", metrics...} of this run
    resumed_from: Optional[str] = None
    last_checkpoint: Optional[str] = None


def _tracker_config(args: Optional[argparse.Namespace]) -> dict[str, Any]:
    """Hyperparameters as trackers (TensorBoard hparams) accept them."""
    config = {}
    for key, value in vars(args or argparse.Namespace()).items():
        if hasattr(value, "value"):
            value = value.value
        if isinstance(value, (bool, int, float, str)):
            config[key] = value
        elif value is not None:
            config[key] = str(value)
    return config


def train(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer,
    lr_scheduler,
    train_dataloader,
    loss_fn: Callable[[nn.Module, Mapping[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    plan: TrainPlan,
    output_dir: Union[str, Path],
    checkpointing_steps: Union[None, int, str] = None,
    resume_from_checkpoint: Optional[Union[str, Path]] = None,
    max_grad_norm: Optional[float] = None,
    eval_fn: Optional[Callable[[], dict[str, float]]] = None,
    eval_steps: Optional[int] = None,
    seed: Optional[int] = None,
    with_tracking: bool = False,
    project_name: str = "inhernet",
    tracker_args: Optional[argparse.Namespace] = None,
    count_items: Callable[[Mapping[str, Any]], int] = count_examples,
) -> TrainResult:
    """The training loop shared by the recipes (all arguments prepared by `prepare_training`).

    Each optimizer step takes a window of `plan.gradient_accumulation_steps` micro-batches per process (the last
    window of an epoch may be shorter). `loss, logs = loss_fn(model, batch)` is the mean over the batch's items
    (`count_items(batch)`: examples, or a causal LM's target tokens); each micro-batch's loss is weighted by its
    share of the items of the whole window on all processes, so a step's gradient is that of the mean over every
    item of the window, as with one large batch: micro-batches of different sizes or answer lengths, a short last
    window and uneven processes count each item once. Every micro-batch must hold at least one item (a mean over
    none is NaN and stops the run). Terms that average over other units (`--kd_hidden_weight`'s, over all tokens)
    are weighted the same way, so for them the step is close to, not exactly, one large batch. Gradients are
    synchronised only on a window's last micro-batch, clipped (`max_grad_norm`, every parameter the optimizer
    updates), and the optimizer and scheduler step.
    Every `checkpointing_steps` optimizer steps (or at each epoch end for 'epoch') the full state is saved
    atomically with `save_checkpoint`. `resume_from_checkpoint` (a folder from `resolve_checkpoint`) restores model,
    optimizer, scheduler, scaler and RNG states (`accelerator.load_state`) and the data position: the epoch's
    seeded order is replayed and the consumed batches skipped with `accelerator.skip_first_batches`, so the result
    equals that of an uninterrupted run. A NaN/Inf loss (or, without an fp16 loss scaler, gradient norm) on any
    process raises `NonFiniteLossError` before the weights change; the last checkpoint is left as it was.
    `eval_fn()` runs (under `preserved_rng`) every `eval_steps` optimizer steps, at the end of every epoch and once
    at the end if no evaluation describes the final weights yet; its metrics are logged with an 'eval_' prefix and
    listed in `TrainResult.eval_history`.
    """
    check_accelerator(accelerator)
    output_dir = Path(output_dir)
    completed_steps, starting_epoch, skip_batches = 0, 0, 0
    resumed_from = last_checkpoint = None
    shapes = model_shapes(accelerator.unwrap_model(model))
    # what a checkpoint must share with this run to resume it exactly (max_train_steps: the lr schedule's horizon)
    setup = {"train_batches_per_epoch": plan.train_batches_per_epoch, "num_processes": plan.num_processes,
             "gradient_accumulation_steps": plan.gradient_accumulation_steps, "max_train_steps": plan.max_train_steps}
    if resume_from_checkpoint:
        path = Path(resume_from_checkpoint)
        state = read_checkpoint_state(path)
        changed = {k: (state.get(k), v) for k, v in setup.items() if state.get(k) != v}
        if changed:
            details = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in changed.items())
            raise CheckpointError(f"Cannot resume exactly from {path}: the run is set up differently ({details}). "
                                  f"Resume with the same data, batch size, accumulation, number of processes and "
                                  f"length (--max_train_steps / --num_train_epochs).")
        if state.get("model_shapes") not in (None, shapes["digest"]):
            raise CheckpointError(f"Cannot resume from {path}: it holds a model of {state['model_params']:,} "
                                  f"parameters in other shapes; this run builds {shapes['params']:,} (other --inher_* "
                                  f"or --student_* flags, or another model?). Resume with the flags of the run that "
                                  f"wrote it.")
        if seed is not None and state.get("seed") not in (None, seed):
            raise CheckpointError(f"Cannot resume exactly from {path}: it was written with --seed {state['seed']}, "
                                  f"this run has --seed {seed} (the data order depends on it).")
        accelerator.print(f"Resuming from checkpoint {path}")
        accelerator.load_state(str(path))
        completed_steps, starting_epoch, skip_batches = (int(state["completed_steps"]), int(state["epoch"]),
                                                         int(state["batches_in_epoch"]))
        resumed_from = last_checkpoint = str(path)

    if with_tracking:
        accelerator.init_trackers(project_name, _tracker_config(tracker_args))

    def position_state(epoch: int, batches_done: int) -> dict[str, Any]:
        if batches_done >= plan.train_batches_per_epoch:
            epoch, batches_done = epoch + 1, 0
        return {"completed_steps": completed_steps, "epoch": epoch, "batches_in_epoch": batches_done, **setup,
                "seed": seed, "model_shapes": shapes["digest"], "model_params": shapes["params"]}

    def run_eval(epoch: int) -> dict[str, float]:
        with preserved_rng():
            metrics = eval_fn()
        model.train()
        eval_history.append({"step": completed_steps, "epoch": epoch, **metrics})
        accelerator.print(f"epoch {epoch} step {completed_steps}: " + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        if with_tracking:
            record = {f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
            accelerator.log({**record, "epoch": epoch}, step=completed_steps)
        return metrics

    scaler_in_use = getattr(accelerator, "scaler", None) is not None
    parameters = [p for group in optimizer.param_groups for p in group["params"]]  # the model's and any others

    def optimizer_step(window: list, epoch: int) -> tuple[float, dict[str, torch.Tensor]]:
        """Forward/backward of a window's micro-batches, then the optimizer step; returns the window's loss (the
        mean over all its items on all processes) and the loss function's logs weighted the same way, local to
        this process. Non-finite values stop every process together, before the weights change."""
        counts = [count_items(batch) for batch in window]
        total = accelerator.reduce(torch.tensor(float(sum(counts)), device=accelerator.device), "sum").item()
        window_loss, window_logs = 0.0, {}
        for index, (batch, count) in enumerate(zip(window, counts)):
            sync = index == len(window) - 1  # DDP all-reduces the gradients once per window
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                loss, logs = loss_fn(model, batch)
                weight = count / total
                stats = accelerator.reduce(torch.stack([loss.detach().float() * weight,
                                                        (~torch.isfinite(loss.detach())).float()]), "sum")
                if stats[1] > 0:
                    raise NonFiniteLossError(_non_finite_message("loss", loss.item(), completed_steps + 1, epoch,
                                                                 last_checkpoint))
                accelerator.backward(loss * (weight * accelerator.num_processes))  # DDP averages over processes
            window_loss += stats[0].item()
            for key, value in logs.items():
                window_logs[key] = window_logs.get(key, 0.0) + value.float() * weight
        norm = accelerator.clip_grad_norm_(parameters, max_grad_norm or math.inf)
        if norm is not None and not scaler_in_use and not torch.isfinite(torch.as_tensor(norm)):
            raise NonFiniteLossError(_non_finite_message("gradient norm", float(norm), completed_steps + 1, epoch,
                                                         last_checkpoint))
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        return window_loss, window_logs

    progress = tqdm(range(plan.max_train_steps), initial=min(completed_steps, plan.max_train_steps),
                    disable=not accelerator.is_local_main_process, desc="Training")
    eval_metrics: dict[str, float] = {}
    eval_history: list[dict[str, Any]] = []
    eval_step = None
    loss_sum, steps_this_run = 0.0, 0  # loss_sum: of this run's window losses
    start = time.perf_counter()
    epoch = starting_epoch
    try:
        for epoch in range(starting_epoch, plan.num_train_epochs if completed_steps < plan.max_train_steps else 0):
            model.train()
            train_dataloader.set_epoch(epoch)  # the seeded order of this epoch
            skip = skip_batches if epoch == starting_epoch else 0
            loader = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
            batches_done = skip
            for window in _windows(_batches(loader), plan.gradient_accumulation_steps):
                step_loss, logs = optimizer_step(window, epoch)
                batches_done += len(window)
                loss_sum += step_loss
                completed_steps += 1
                steps_this_run += 1
                progress.update(1)
                if with_tracking:
                    record = {"train_loss": step_loss, "lr": lr_scheduler.get_last_lr()[0], "epoch": epoch}
                    record.update({k: accelerator.reduce(v, "sum").item() for k, v in logs.items()})
                    accelerator.log(record, step=completed_steps)
                if isinstance(checkpointing_steps, int) and completed_steps % checkpointing_steps == 0:
                    last_checkpoint = str(save_checkpoint(accelerator, output_dir, f"step_{completed_steps}",
                                                          position_state(epoch, batches_done)))
                if (eval_fn is not None and eval_steps and completed_steps % eval_steps == 0
                        and completed_steps < plan.max_train_steps):
                    eval_metrics, eval_step = run_eval(epoch), completed_steps
                if completed_steps >= plan.max_train_steps:
                    break
            if eval_fn is not None and eval_step != completed_steps:
                eval_metrics, eval_step = run_eval(epoch), completed_steps
            if checkpointing_steps == "epoch":
                last_checkpoint = str(save_checkpoint(accelerator, output_dir, f"epoch_{epoch}",
                                                      position_state(epoch, batches_done)))
            if completed_steps >= plan.max_train_steps:
                break
    except NonFiniteLossError:
        progress.close()
        for tracker in accelerator.trackers:  # flush what was logged up to the failure
            tracker.finish()
        raise
    progress.close()
    runtime = time.perf_counter() - start
    if eval_fn is not None and eval_step != completed_steps:
        eval_metrics = run_eval(epoch)
    epochs_done = completed_steps / plan.num_update_steps_per_epoch if plan.num_update_steps_per_epoch else 0.0
    mean_loss = loss_sum / steps_this_run if steps_this_run else None
    return TrainResult(completed_steps, round(epochs_done, 4), mean_loss, runtime, steps_this_run,
                       eval_metrics=eval_metrics, eval_history=eval_history, resumed_from=resumed_from,
                       last_checkpoint=last_checkpoint)


def _non_finite_message(what: str, value: float, step: int, epoch: int, last_checkpoint: Optional[str]) -> str:
    keep = (f"The last good checkpoint is {last_checkpoint}; resume from it (--resume_from_checkpoint) "
            if last_checkpoint else "No checkpoint was saved (see --checkpointing_steps); restart ")
    return (f"The {what} became {value} at optimizer step {step} (epoch {epoch}); training stopped before this step "
            f"changed the weights. {keep}with a lower --learning_rate, gradient clipping (--max_grad_norm) or "
            f"bf16/fp32 instead of fp16.")


def write_results(path: Union[str, Path], results: Mapping[str, Any]) -> None:
    """JSON with NaN/Inf written as null (strict JSON), keys sorted."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, (np.floating, np.integer)):
            return clean(value.item())
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    with open(path, "w") as f:
        json.dump({k: clean(v) for k, v in results.items()}, f, indent=2, sort_keys=True)


CHECKPOINT_PATTERNS = ["step_*", "epoch_*", f"{TMP_PREFIX}*", f"{OLD_PREFIX}*"]


def create_hub_repo(accelerator: Accelerator, args: argparse.Namespace) -> Optional[str]:
    """With `--push_to_hub`, create (or reuse) the `--hub_model_id` repository on the main process before any
    training, so that a bad token or repository id fails early; returns its full id (None otherwise)."""
    if not (args.push_to_hub and accelerator.is_main_process):
        return None
    from huggingface_hub import HfApi

    return HfApi(token=args.hub_token).create_repo(args.hub_model_id, exist_ok=True).repo_id


def save_final_model(accelerator: Accelerator, model: nn.Module, tokenizer, args: argparse.Namespace,
                     eval_results: Mapping[str, float], eval_dataset: str, repo_id: Optional[str] = None) -> None:
    """Save the trained model to `--output_dir` and, when `repo_id` is given, push it. An inherited model goes
    through `InherModel.save_pretrained` / `push_to_hub` (safetensors, tokenizer, model card with `eval_results` on
    `eval_dataset`); a dense one through its own `save_pretrained` plus the tokenizer, and is uploaded without the
    checkpoint folders. All processes must call it."""
    from .model import InherModel

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    results = {k: float(v) for k, v in eval_results.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if isinstance(unwrapped, InherModel):
        unwrapped.save_pretrained(args.output_dir, tokenizer=tokenizer, eval_results=results,
                                  eval_dataset=eval_dataset, is_main_process=accelerator.is_main_process)
    else:
        unwrapped.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(args.output_dir)
    if repo_id is None or not accelerator.is_main_process:
        return
    if isinstance(unwrapped, InherModel):
        unwrapped.push_to_hub(repo_id, token=args.hub_token, tokenizer=tokenizer, eval_results=results,
                              eval_dataset=eval_dataset, commit_message="End of training")
    else:
        from huggingface_hub import HfApi

        HfApi(token=args.hub_token).upload_folder(repo_id=repo_id, folder_path=args.output_dir,
                                                  commit_message="End of training",
                                                  ignore_patterns=CHECKPOINT_PATTERNS)


def run_results(accelerator: Accelerator, result: TrainResult, eval_metrics: Mapping[str, Any], total_params: int,
                trainable_params: int, dense_params: int, train_samples: int, wall_start: float) -> dict[str, Any]:
    """The all_results.json entries of every recipe: `eval_<metric>`, progress, times and parameter counts."""
    results: dict[str, Any] = {f"eval_{k}": v for k, v in eval_metrics.items()}
    results.update({
        "eval_history": result.eval_history, "train_loss": result.train_loss, "train_steps": result.completed_steps,
        "epoch": result.epoch, "train_samples": train_samples, "train_runtime": round(result.train_runtime, 3),
        "trainable_params": trainable_params, "total_params": total_params, "dense_params": dense_params,
        "params_ratio": total_params / dense_params, "resumed_from": result.resumed_from,
        "num_processes": accelerator.num_processes, "wall_time": round(time.perf_counter() - wall_start, 3),
    })
    return results


def finish_run(accelerator: Accelerator, args: argparse.Namespace, model: nn.Module, tokenizer,
               results: Mapping[str, Any], card_metrics: Mapping[str, float], eval_dataset: str,
               repo_id: Optional[str]) -> None:
    """Write `output_dir/all_results.json` first (a failed save or push keeps the measurements), then save (and
    push) the model with `save_final_model`, and end the run (trackers, process group). All processes call it."""
    if accelerator.is_main_process:
        write_results(Path(args.output_dir) / "all_results.json", results)
    save_final_model(accelerator, model, tokenizer, args, card_metrics, eval_dataset, repo_id)
    accelerator.print(f"results: {dict(results)}")
    accelerator.end_training()  # finishes the trackers, destroys the process group
