"""The training loop shared by the recipes (`recipes/glue.py`, `recipes/gsm8k.py`), built on Accelerate.

* inheritance for training: `inherit_model` / `inherit_for_training` (calibration examples from the training set
  only when the config needs them);
* setup: `build_accelerator`, `build_optimizer`, `prepare_training` (prepares, sizes the run, builds the scheduler);
* the loop: `train` (item-weighted gradient accumulation, scheduler, mixed precision, tracking, atomic checkpoints
  and exact resume through `inhernet_hf.checkpoints`, NaN/Inf stop) and `evaluate` (predictions gathered with
  `gather_for_metrics`, no duplicated samples);
* the end of a run: `create_hub_repo` (before training, so a bad token fails early), `run_results` (the
  all_results.json entries every recipe writes) and `finish_run` (writes them, then saves and pushes the model).

The flags live in `inhernet_hf.flags`, the losses (KD, hidden states, HKT, HCD) in `inhernet_hf.distill`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedType, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from .checkpoints import (OLD_PREFIX, TMP_PREFIX, CheckpointError, model_shapes, preserved_rng, read_checkpoint_state,
                          save_checkpoint)
from .config import InherConfig

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN/Inf; training stopped before the weights were updated."""


class TrackingError(ValueError):
    """--with_tracking asked for trackers of which none is installed."""



# ----------------------------------------------------------------------------------------------------------------
# Inheritance for training
# ----------------------------------------------------------------------------------------------------------------


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
    accelerator.print(model.inher_report)
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
        raise ValueError(f"accelerate is configured for {accelerator.distributed_type.value}, which the recipes' "
                         f"loop does not support yet (its item-weighted gradient accumulation and gradient clipping "
                         f"are written for one process or DDP): use --multi_gpu, or several CPU processes over gloo. "
                         f"For a model too large for one device, compress it streamed first (`inhernet compress`).")
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
# Train and evaluate
# ----------------------------------------------------------------------------------------------------------------


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



# ----------------------------------------------------------------------------------------------------------------
# The end of a run
# ----------------------------------------------------------------------------------------------------------------


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
        if accelerator.is_main_process and tokenizer is not None:  # a tokenizer or an image processor
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

