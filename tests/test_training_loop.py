"""Gradient accumulation in `training.train`: a step over a window of micro-batches equals one step over their
union, whatever the micro-batch sizes, the number of items each holds (a causal LM's answer tokens), a short last
window, or the number of processes. A toy token-level loss with SGD (whose update is proportional to the gradient,
so a mis-weighted micro-batch shows; Adam would hide a uniform scale).

Run as a script under `accelerate launch` (see `test_two_processes_equal_one_process`), this file trains the toy
and saves its final weights: `test_training_loop.py OUT_FILE PER_DEVICE_BATCH ACCUMULATION`.
"""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

LENGTH, WIDTH = 5, 4


def toy_data() -> list[dict[str, torch.Tensor]]:
    """6 examples of 5 positions; the next-token labels keep 1 to 4 positions each (the rest are -100)."""
    gen = torch.Generator().manual_seed(0)
    data = []
    for kept in (1, 4, 2, 3, 4, 1):
        labels = torch.full((LENGTH,), -100)
        labels[LENGTH - kept:] = 1
        data.append({"x": torch.randn(LENGTH, WIDTH, generator=gen), "labels": labels})
    return data


def token_loss(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
    """Mean over the batch's kept next-token positions, as a causal LM's loss is (what count_target_tokens counts)."""
    kept = batch["labels"][:, 1:] != -100
    values = (model(batch["x"][:, :-1]).squeeze(-1) - 1.0).pow(2)
    return values[kept].mean(), {"task_loss": values[kept].mean().detach()}


def train_toy(per_device_batch: int, accumulation: int, output_dir) -> tuple[dict[str, torch.Tensor], float]:
    """Two optimizer steps over the 6 examples in order (one epoch); returns the final weights and the mean loss."""
    from accelerate import Accelerator

    from inhernet_hf.training import count_target_tokens, prepare_training, train

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Linear(WIDTH, 1)
    loader = torch.utils.data.DataLoader(toy_data(), batch_size=per_device_batch, shuffle=False)
    args = Namespace(gradient_accumulation_steps=accumulation, max_train_steps=None, num_train_epochs=1,
                     lr_scheduler_type="constant", num_warmup_steps=0, per_device_train_batch_size=per_device_batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader, _, scheduler, plan = prepare_training(accelerator, model, optimizer, loader, {}, args)
    assert plan.max_train_steps == 2
    result = train(accelerator, model, optimizer, scheduler, loader, token_loss, plan, output_dir,
                   count_items=count_target_tokens)
    weights = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    return weights, result.train_loss


def test_accumulated_windows_equal_one_batch_per_step(tmp_path):
    # 1 x 4 examples then 1 x 2 | 2 + 2 then a short window of 2 | 3 + 1 then 2
    reference, reference_loss = train_toy(4, 1, tmp_path / "a")
    for batch, accumulation in ((2, 2), (1, 4)):
        weights, loss = train_toy(batch, accumulation, tmp_path / f"b{batch}")
        for key, value in reference.items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-6)
        assert abs(loss - reference_loss) < 1e-6


def test_two_processes_equal_one_process(tmp_path):
    """2 processes x 1 example x 2 micro-batches (process 0 holds examples 0, 2 | 4, process 1 holds 1, 3 | 5) give
    the single-process large-batch weights: the items are counted over both processes."""
    from recipes import launch_script

    reference, _ = train_toy(4, 1, tmp_path / "one")
    launch_script(Path(__file__), [tmp_path / "two.pt", 1, 2], num_processes=2, timeout=120)
    weights = torch.load(tmp_path / "two.pt")
    for key, value in reference.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("setup, message", [
    ({"distributed_type": "FSDP"}, "accelerate is configured for FSDP, which the recipes' loop does not support yet"),
    ({"distributed_type": "DEEPSPEED"}, "accelerate is configured for DEEPSPEED"),
    ({"gradient_accumulation_steps": 4}, "The Accelerator accumulates over 4 steps"),
])
def test_setups_the_loop_does_not_drive_are_refused(setup, message):
    from accelerate.utils import DistributedType

    from inhernet_hf.training import check_accelerator

    fields = {"distributed_type": "MULTI_CPU", "gradient_accumulation_steps": 1, **setup}
    accelerator = SimpleNamespace(**{**fields, "distributed_type": DistributedType(fields["distributed_type"])})
    with pytest.raises(ValueError, match=message):
        check_accelerator(accelerator)
    check_accelerator(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, gradient_accumulation_steps=1))


if __name__ == "__main__":
    out_file, batch_size, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    final, _ = train_toy(batch_size, steps, out_file.parent / "checkpoints")
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        sys.exit(0)
    torch.save(final, out_file)
