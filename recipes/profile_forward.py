"""Where the time of a prefill forward goes, dense vs inherited: torch.profiler self time per aten operator.

    python recipes/profile_forward.py --ratios 0.5 --heads 2 --batch_size 4       # SmolLM2-135M, CPU, float32
    python recipes/profile_forward.py --device cuda --dtype bfloat16 --batch_size 16

Each model (dense, then each target_ratio x num_heads variant, built one at a time next to dense) runs `--warmup`
eager forwards over a (batch_size, seq_len) batch of random token ids, then `--forwards` forwards under
torch.profiler. An operator's time is its self time per forward (CPU time on a CPU; on CUDA the device time of the
kernels it launched itself, the kernels' own rows left out), so the operators' times add up to the forward without
double counting. The summary groups
them: GEMMs (mm, addmm, bmm, ...), fused attention, softmax (a gated layer's gate; dense Llama attention fuses its
own) and everything else (norms, activations, rotary, residuals, copies). "forward" is the wall time of an
unprofiled forward, median of `--forwards`. Operator times depend on shapes only, so the weights' values do not
matter; `--model` loads the real ones as speed.py does.
"""

import argparse
import copy
import gc
import json
import statistics
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from tqdm.auto import tqdm

from inhernet_hf import get_inher_model
from speed import add_variant_args, load_dense, model_dtype, timed, variant_configs

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"}
ATTENTION_MARKERS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")
SOFTMAX_OPS = {"aten::_softmax"}


def op_class(name: str) -> str:
    """The summary class of an aten operator: 'GEMM', 'attention', 'softmax' or 'other'."""
    if name in GEMM_OPS:
        return "GEMM"
    if any(marker in name for marker in ATTENTION_MARKERS):
        return "attention"
    return "softmax" if name in SOFTMAX_OPS else "other"


def profile_forward(model, batch: torch.Tensor, device: str, warmup: int, forwards: int) -> dict:
    """{"forward_s": median unprofiled wall time, "ops": {op: {"calls": per forward, "self_s": per forward}}}."""
    cuda = device.startswith("cuda")
    with torch.no_grad():
        for _ in range(warmup):
            model(input_ids=batch)
        wall = [timed(lambda: model(input_ids=batch), device) for _ in range(forwards)]
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(forwards):
                model(input_ids=batch)
            if cuda:
                torch.cuda.synchronize()
    ops = {}
    for event in prof.key_averages():
        if event.device_type != DeviceType.CPU:  # a kernel's own row: its time is already its launching operator's
            continue
        self_us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if self_us > 0:
            ops[event.key] = {"calls": event.count / forwards, "self_s": self_us / 1e6 / forwards}
    return {"forward_s": statistics.median(wall), "ops": ops}


def class_totals(ops: dict) -> dict:
    """Seconds per summary class (GEMM, attention, softmax, other) and their sum ("profiled")."""
    totals = dict.fromkeys(("GEMM", "attention", "softmax", "other"), 0.0)
    for name, op in ops.items():
        totals[op_class(name)] += op["self_s"]
    totals["profiled"] = sum(totals.values())
    return totals


def print_tables(results: dict, top: int) -> None:
    names = list(results)
    print("\n| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    print("| forward (wall) | " + " | ".join(f"{results[n]['forward_s'] * 1000:.1f} ms" for n in names) + " |")
    totals = {n: class_totals(results[n]["ops"]) for n in names}
    for key in ("profiled", "GEMM", "attention", "softmax", "other"):
        print(f"| {key} | " + " | ".join(f"{totals[n][key] * 1000:.1f} ms" for n in names) + " |")
    gemm_calls = {n: sum(op["calls"] for name, op in results[n]["ops"].items() if op_class(name) == "GEMM")
                  for n in names}
    print("| GEMM calls | " + " | ".join(f"{gemm_calls[n]:.0f}" for n in names) + " |")

    ops = sorted({op for n in names for op in results[n]["ops"]},
                 key=lambda op: -max(results[n]["ops"].get(op, {"self_s": 0.0})["self_s"] for n in names))[:top]
    print(f"\nTop {len(ops)} operators, ms per forward (calls):")
    print("| operator | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for op in ops:
        cells = []
        for n in names:
            entry = results[n]["ops"].get(op)
            cells.append("—" if entry is None else f"{entry['self_s'] * 1000:.1f} ({entry['calls']:.0f})")
        print(f"| {op} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_variant_args(parser, ratios=[0.5], heads=[1, 2])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2, help="Unprofiled forwards before measuring.")
    parser.add_argument("--forwards", type=int, default=1, help="Profiled (and timed) forwards per model.")
    parser.add_argument("--top", type=int, default=12, help="Operators listed in the second table.")
    parser.add_argument("--output_json", default=None, help="Write every model's per-operator times here.")
    args = parser.parse_args()
    for flag in ("batch_size", "seq_len", "forwards", "top"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}.")
    configs = variant_configs(parser, args)
    dtype = model_dtype(args)
    torch.manual_seed(0)

    dense = load_dense(args.model, dtype, args.device)
    batch = torch.randint(0, dense.config.vocab_size, (args.batch_size, args.seq_len), device=args.device)
    results = {"dense": profile_forward(dense, batch, args.device, args.warmup, args.forwards)}
    for name, config in tqdm(configs.items(), desc="Variants"):
        model = get_inher_model(copy.deepcopy(dense), config, progressbar=False).eval()
        results[name] = profile_forward(model, batch, args.device, args.warmup, args.forwards)
        del model
        gc.collect()

    print(f"\n{args.model} on {args.device} ({dtype}), one eager forward over ({args.batch_size}, {args.seq_len}) "
          f"tokens; operator self times per forward, mean of {args.forwards}")
    print_tables(results, args.top)
    if args.output_json:
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"args": vars(args), "models": results}, indent=2))


if __name__ == "__main__":
    main()
