"""Inference speed of inherited models vs dense, side by side: prefill and greedy decode, eager or compiled.

    python recipes/speed.py                                   # SmolLM2-135M, CPU: the default grid
    python recipes/speed.py --model minilm --ratios 0.5 --heads 2
    python recipes/speed.py --device cuda --dtype bfloat16 --compile both

For every variant (target_ratio x num_heads) the dense model and the variants run interleaved in each repetition,
and each figure is the median over repetitions of the variant's time divided by dense's in the same repetition.
Prefill: a forward pass over `--prefill_batch_sizes` x `--seq_len` tokens. Decode (causal LMs): greedy tokens/s at
batch 1 with KV cache, (time of N+1 new tokens - time of 1) / N; compiled, decode runs generate()'s own compiled
decoding step over a static cache (on CPU too). "FLOP bound" is dense FLOPs / inherited FLOPs of one prefill
forward (torch.utils.flop_counter; attention counted over the (query, key) pairs it computes, the causal triangle
when causal, the CPU flash kernel included), the speedup a perfect implementation would reach; "of bound" is the
measured prefill speedup divided by it. Peak memory: CUDA max allocated, or on CPU the growth of the resident set
(VmHWM, reset through /proc/self/clear_refs) during one prefill forward, weights included; not valid under an
allocator that keeps freed pages (tcmalloc, jemalloc), where that growth stays near zero.
"""

import argparse
import copy
import json
import re
import statistics
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from tqdm.auto import tqdm
from transformers import AutoModel, AutoModelForCausalLM, CompileConfig

from inhernet_hf import InherConfig, get_inher_model
from inhernet_hf.offline_models import minilm_path, smollm2_path



def load_dense(name: str, dtype: torch.dtype, device: str):
    if name == "smollm2":
        folder, gguf_file = smollm2_path()
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
    elif name == "minilm":
        model = AutoModel.from_pretrained(minilm_path(), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return model.to(device).eval()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _vm(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def peak_memory(model, batch: torch.Tensor, device: str) -> int:
    """Bytes of peak memory while running one forward (weights included)."""
    with torch.no_grad():
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            model(input_ids=batch)
            return torch.cuda.max_memory_allocated()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        before = _vm("VmRSS")
        model(input_ids=batch)
        return weights + _vm("VmHWM") - before


def decode_compile_config(device: str) -> CompileConfig:
    """generate()'s compilation of the decoding step: transformers does it by itself on CUDA; `_compile_all_devices`
    asks for it on CPU too (where CUDA graphs, "reduce-overhead", do not exist)."""
    config = CompileConfig(mode="reduce-overhead" if device.startswith("cuda") else "default")
    config._compile_all_devices = True
    return config


def greedy(model, prompt: torch.Tensor, new_tokens: int, compile_config: Optional[CompileConfig]):
    """Greedy generation of exactly `new_tokens` tokens; with `compile_config`, over a static KV cache with
    generate()'s compiled decoding step."""
    kwargs = {} if compile_config is None else {"cache_implementation": "static", "compile_config": compile_config}
    return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0, **kwargs)


# position of `is_causal` in each fused attention kernel's schema (query, key, value are 0-2)
SDPA_IS_CAUSAL_ARG = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: 4,
    torch.ops.aten._scaled_dot_product_flash_attention: 4,
    torch.ops.aten._scaled_dot_product_efficient_attention: 6,
    torch.ops.aten._scaled_dot_product_cudnn_attention: 6,
}


def attention_flop_formula(is_causal_arg: int):
    """FlopCounterMode formula for a fused attention kernel: QK^T and PV over the (query, key) pairs it computes,
    the top-left lower triangle when causal (torch's own formula counts every pair and has none for the CPU kernel)."""
    def flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        position = is_causal_arg - 3
        causal = kwargs.get("is_causal", args[position] if len(args) > position else False)
        every_pair = sdpa_flop_count(query_shape, key_shape, value_shape)
        if not causal:
            return every_pair
        s_q, s_k = query_shape[2], key_shape[2]
        return every_pair * sum(min(i + 1, s_k) for i in range(s_q)) // (s_q * s_k)
    return flops


ATTENTION_FLOP_FORMULAS = {op: attention_flop_formula(arg) for op, arg in SDPA_IS_CAUSAL_ARG.items()}


def forward_flops(forward) -> int:
    """FLOPs of `forward()` (a no-argument callable), attention counted by `attention_flop_formula`."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOP_FORMULAS) as counter:
        forward()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="'smollm2', 'minilm' (offline) or a causal LM Hub id/folder.")
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.8, 0.6, 0.5, 0.4])
    parser.add_argument("--heads", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rank_multiple", type=int, default=16,
                        help="InherConfig.rank_multiple: 16 keeps every row of the latent h on 64-byte boundaries "
                             "(one AVX-512 register of float32, two of bfloat16), which CPU and GPU GEMMs both favour.")
    parser.add_argument("--prefill_batch_sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--decode_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="Default: bfloat16 on CUDA, float32 on CPU.")
    parser.add_argument("--compile", choices=["no", "yes", "both"], default="no",
                        help="torch.compile the models (both: eager and compiled rows).")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    torch.manual_seed(0)

    dense = load_dense(args.model, dtype, args.device)
    causal = hasattr(dense, "generate") and dense.can_generate()
    vocab = dense.config.vocab_size
    variants = {"dense": (dense, None)}
    for ratio in args.ratios:
        for heads in args.heads:
            config = InherConfig(target_ratio=ratio, num_heads=heads, rank_multiple=args.rank_multiple)
            inherited = get_inher_model(copy.deepcopy(dense), config, progressbar=False)
            variants[f"r{ratio}-M{heads}"] = (inherited.base_model.eval(), inherited.report())
    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    batches = {b: torch.randint(0, vocab, (b, args.seq_len), device=args.device) for b in args.prefill_batch_sizes}
    prompt = torch.randint(0, vocab, (1, 64), device=args.device)
    flop_batch = batches[min(batches)]  # properties of the model, the same eager or compiled
    dense_flops = forward_flops(lambda: dense(input_ids=flop_batch))
    facts = {name: {"targeted_ratio": 1.0 if report is None else report.ratio,
                    "params": sum(p.numel() for p in model.parameters()),
                    "flop_bound": dense_flops / forward_flops(lambda: model(input_ids=flop_batch))}
             for name, (model, report) in variants.items()}

    rows = []
    for compiled in modes:
        runners = {name: torch.compile(model, dynamic=False) if compiled else model  # fixed shapes: no dynamic kernels
                   for name, (model, _) in variants.items()}
        decode_config = decode_compile_config(args.device) if compiled else None
        with torch.no_grad():
            for runner in tqdm(runners.values(), desc="Warm-up" + (" and compile" if compiled else "")):
                for batch in batches.values():
                    runner(input_ids=batch)
            if causal:  # compiles the decoding step when `decode_config` is set
                for model, _ in tqdm(variants.values(), desc="Decode warm-up"):
                    greedy(model, prompt, args.decode_tokens + 1, decode_config)
            times = {name: {key: [] for key in [f"prefill_b{b}" for b in batches] + ["decode"]} for name in runners}
            for _ in tqdm(range(args.repeats), desc="Repetitions"):
                for name, runner in runners.items():  # interleaved: every variant once per repetition
                    for b, batch in batches.items():
                        times[name][f"prefill_b{b}"].append(timed(lambda: runner(input_ids=batch), args.device))
                    if causal:
                        model = variants[name][0]
                        t1 = timed(lambda: greedy(model, prompt, 1, decode_config), args.device)
                        tn = timed(lambda: greedy(model, prompt, args.decode_tokens + 1, decode_config), args.device)
                        times[name]["decode"].append((tn - t1) / args.decode_tokens)
        for name, runner in runners.items():  # peak memory of the runner: the compiled module in compiled rows
            row = {"variant": name, "compiled": compiled, **facts[name],
                   "peak_memory_MiB": peak_memory(runner, batches[max(batches)], args.device) / 2**20}
            for key, values in times[name].items():
                if values:
                    row[f"{key}_speedup"] = statistics.median(
                        d / v for d, v in zip(times["dense"][key], values))
                    row[f"{key}_s"] = statistics.median(values)
            rows.append(row)

    keys = [f"prefill_b{b}" for b in batches] + (["decode"] if causal else [])
    print(f"\n{args.model} on {args.device} ({dtype}), seq_len {args.seq_len}, median of {args.repeats} interleaved runs; "
          f"speedup = dense time / variant time in the same repetition")
    print("| variant | compiled | targeted ratio | params | FLOP bound | " +
          " | ".join(f"{k} speedup" for k in keys) + " | prefill of bound | peak mem (MiB) |")
    print("|" + "---|" * (7 + len(keys)))
    for r in rows:
        biggest = f"prefill_b{max(batches)}_speedup"
        print(f"| {r['variant']} | {'yes' if r['compiled'] else 'no'} | {r['targeted_ratio']:.3f} | {r['params']:,} | "
              f"{r['flop_bound']:.2f}x | " + " | ".join(f"{r[k + '_speedup']:.2f}x" for k in keys) +
              f" | {r[biggest] / r['flop_bound']:.2f} | {r['peak_memory_MiB']:.0f} |")
    decode_ms = {r["variant"]: 1000 * r["decode_s"] for r in rows if "decode_s" in r}
    if decode_ms:
        print("decode ms/token:", {k: round(v, 2) for k, v in decode_ms.items()})
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
