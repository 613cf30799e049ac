"""Training checkpoints: atomic saves, the latest complete one, exact resumption.

`save_checkpoint` writes `accelerator.save_state` plus the loop's position into a hidden temporary folder and renames
it into place when complete, so a run killed at any moment leaves only complete checkpoints; `resolve_checkpoint`
reads `--resume_from_checkpoint` ('latest' or a folder); `preserved_rng` keeps evaluation and data-iterator starts
from shifting the training RNG stream, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

logger = logging.getLogger(__name__)

CHECKPOINT_STATE_FILE = "inhernet_trainer_state.json"

CHECKPOINT_NAME = re.compile(r"^(step|epoch)_(\d+)$")

TMP_PREFIX = ".tmp-"

OLD_PREFIX = ".old-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing, incomplete, or written by a different setup)."""



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
        if final.exists():  # rename(2) cannot replace a non-empty directory: move the old one aside first
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
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

