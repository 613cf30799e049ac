"""Inference speed of inherited models vs dense, side by side: prefill and greedy decode, eager or compiled.

    python recipes/speed.py                                   # SmolLM2-135M, CPU: the default grid
    python recipes/speed.py --model minilm --ratios 0.5 --heads 2
    python recipes/speed.py --device cuda --dtype bfloat16 --compile both

The variants (target_ratio x num_heads) are built one at a time and held in memory only next to dense (a grid of
copies would not fit for larger models). For every measurement, each repetition times dense, the variant, the variant
and dense back to back (ABBA: each model runs once first and once second, and a steady drift cancels), and each figure
is the median over repetitions of dense's mean time divided by the variant's; dense's own times are the median over
all its repetitions.
Prefill: a forward pass over `--prefill_batch_sizes` x `--seq_len` tokens. Decode (causal LMs): greedy tokens/s at
batch 1 with KV cache, (time of N+1 new tokens - time of 1) / N; compiled, decode runs generate()'s own compiled
decoding step over a static cache (on CPU too). "FLOP bound" is dense FLOPs / inherited FLOPs of one prefill
forward (torch.utils.flop_counter; attention counted over the (query, key) pairs it computes, the causal triangle
when causal, the CPU flash kernel included), the speedup a perfect implementation would reach; "of bound" is the
measured prefill speedup divided by it. Peak memory (CUDA only): the model's weights plus the growth of CUDA's
allocated memory during one prefill forward; on CPU, recipes/memory.py measures it in fresh interpreters.
"""

import argparse
import copy
import gc
import json
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode, mm_flop, sdpa_flop_count
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


def peak_memory_mib(model, batch: torch.Tensor, device: str) -> Optional[float]:
    """MiB of peak CUDA memory while running one forward: the model's weights plus the growth of allocated memory
    during the forward (so the other model held next to it, dense or a variant, is not counted). None on CPU: there
    the resident set's growth depends on the allocator's history in this process more than on the model;
    recipes/memory.py measures each model in a fresh interpreter instead."""
    if not device.startswith("cuda"):
        return None
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model(input_ids=batch)
        return (weights + torch.cuda.max_memory_allocated() - before) / 2**20


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
        heads = query_shape[1]  # CUDA kernels take GQA key/value with fewer heads, which torch < 2.13 cannot count
        key_shape, value_shape = [(*shape[:1], heads, *shape[2:]) for shape in (key_shape, value_shape)]
        every_pair = sdpa_flop_count(query_shape, key_shape, value_shape)
        if not causal:
            return every_pair
        s_q, s_k = query_shape[2], key_shape[2]
        return every_pair * sum(min(i + 1, s_k) for i in range(s_q)) // (s_q * s_k)
    return flops


def addmm_inplace_flops(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    """torch's counter knows addmm, not the in-place addmm_ (InherLinear adds its head biases g @ B with it)."""
    return mm_flop(a_shape, b_shape)


FLOP_FORMULAS = {**{op: attention_flop_formula(arg) for op, arg in SDPA_IS_CAUSAL_ARG.items()},
                 torch.ops.aten.addmm_: addmm_inplace_flops}


def forward_flops(forward) -> int:
    """FLOPs of `forward()` (a no-argument callable): its matmuls, attention counted by `attention_flop_formula`
    (elementwise work such as the gate's softmax and g (x) h is not counted, in dense as in inherited models)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        forward()
    return counter.get_total_flops()


def make_room_for_compiled_models(num_models: int, shapes_per_model: int) -> None:
    """The models share their forward code, and every model instance and input shape adds a cache entry to it; past
    dynamo's `recompile_limit` (8) the remaining models would run eager inside the "compiled" rows, silently. Raise
    the limit to what the benchmark needs, and make hitting it an error rather than an eager fallback."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, num_models * shapes_per_model)
    torch._dynamo.config.fail_on_recompile_limit_hit = True


def timing_measure(runners: dict, models: dict, batches: dict, prompt: torch.Tensor, decode_tokens: int,
                   decode_config: Optional[CompileConfig], device: str):
    """`measure(name, key) -> seconds` for `paired_timings`: key "prefill_b{b}" is one forward of `runners[name]` over
    `batches[b]`; "decode" is the time per new token of greedy generation with `models[name]` at batch 1, (time of
    decode_tokens + 1 tokens - time of 1) / decode_tokens, so the prompt's prefill and the first token cancel."""
    def measure(name: str, key: str) -> float:
        if key == "decode":
            model = models[name]
            t1 = timed(lambda: greedy(model, prompt, 1, decode_config), device)
            tn = timed(lambda: greedy(model, prompt, decode_tokens + 1, decode_config), device)
            return (tn - t1) / decode_tokens
        batch = batches[int(key.removeprefix("prefill_b"))]
        return timed(lambda: runners[name](input_ids=batch), device)
    return measure


def paired_timings(measure, name: str, keys: list, repeats: int) -> dict:
    """Variant `name` timed right next to dense: in every repetition and for every key, dense, the variant, the
    variant again and dense again run back to back (ABBA), and the repetition's pair is the mean time of each. Both
    models run once first and once second of a back-to-back pair, and a steady drift of the machine's speed
    cancels, in every repetition and so for any number of them. Returns {key: [(dense s, variant s), ...]}."""
    pairs = {key: [] for key in keys}
    for _ in tqdm(range(repeats), desc="Repetitions"):
        for key in keys:
            seconds = [measure(who, key) for who in ("dense", name, name, "dense")]
            pairs[key].append(((seconds[0] + seconds[3]) / 2, (seconds[1] + seconds[2]) / 2))
    return pairs


def table_rows(facts: dict, pairs: dict, memory: dict, keys: list[str]) -> list[dict]:
    """One row per (compiled, model) measured so far: facts, peak memory, and per key the median speedup over the
    variant's pairs and its median time (dense: 1.0 and the median of every pair's dense time)."""
    rows = []
    for compiled, variants in pairs.items():
        for name in ["dense"] + list(variants):
            row = {"variant": name, "compiled": compiled, **facts[name], "peak_memory_MiB": memory[compiled][name]}
            for key in keys:
                if name == "dense":
                    dense_times = [d for variant in variants.values() for d, _ in variant[key]]
                    row[f"{key}_speedup"], row[f"{key}_s"] = 1.0, statistics.median(dense_times)
                else:
                    row[f"{key}_speedup"] = statistics.median(d / v for d, v in variants[name][key])
                    row[f"{key}_s"] = statistics.median(v for _, v in variants[name][key])
            rows.append(row)
    return rows


def write_json(args: argparse.Namespace, rows: list[dict], complete: bool, **fields) -> None:
    """The rows so far (and `fields`) to --output_json, written to a temporary file and renamed: a kill never leaves
    a half-written JSON. Shared by the benchmark recipes that rewrite their JSON after every row."""
    path = Path(args.output_json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**fields, "args": vars(args), "complete": complete, "rows": rows}, indent=2))
    tmp.replace(path)


def add_variant_args(parser: argparse.ArgumentParser, ratios: list[float], heads: list[int]) -> None:
    """--model, --ratios, --heads, --rank_multiple, --device and --dtype: the dense model and the grid of inherited
    variants compared with it (shared with profile_forward.py)."""
    parser.add_argument("--model", default="smollm2", help="'smollm2', 'minilm' (offline) or a causal LM Hub id/folder.")
    parser.add_argument("--ratios", type=float, nargs="+", default=ratios)
    parser.add_argument("--heads", type=int, nargs="+", default=heads)
    parser.add_argument("--rank_multiple", type=int, default=16,
                        help="InherConfig.rank_multiple: 16 keeps every row of the latent h on 64-byte boundaries "
                             "(one AVX-512 register of float32, two of bfloat16), which CPU and GPU GEMMs both favour.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="Default: bfloat16 on CUDA, float32 on CPU.")


def variant_configs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, InherConfig]:
    """{"r{ratio}-M{heads}": InherConfig} of every grid point, checked before minutes of loading and warm-up: a bad
    value is a parser error."""
    try:
        return {f"r{ratio}-M{heads}": InherConfig(target_ratio=ratio, num_heads=heads, rank_multiple=args.rank_multiple)
                for ratio in args.ratios for heads in args.heads}
    except (TypeError, ValueError) as err:
        parser.error(f"bad --ratios / --heads / --rank_multiple: {err}")


def model_dtype(args: argparse.Namespace) -> torch.dtype:
    """--dtype, else bfloat16 on CUDA and float32 on CPU."""
    return getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_variant_args(parser, ratios=[1.0, 0.8, 0.6, 0.5, 0.4], heads=[1, 2, 3])
    parser.add_argument("--prefill_batch_sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--decode_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", choices=["no", "yes", "both"], default="no",
                        help="torch.compile the models (both: eager and compiled rows).")
    parser.add_argument("--output_json", default=None,
                        help="Write the rows here, rewritten after every variant ('complete': false until the end).")
    args = parser.parse_args()
    for flag in ("seq_len", "decode_tokens", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if min(args.prefill_batch_sizes) < 1:
        parser.error(f"--prefill_batch_sizes must all be >= 1, got {args.prefill_batch_sizes}.")
    configs = variant_configs(parser, args)
    dtype = model_dtype(args)
    torch.manual_seed(0)

    dense = load_dense(args.model, dtype, args.device)
    causal = hasattr(dense, "generate") and dense.can_generate()
    vocab = dense.config.vocab_size
    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    batches = {b: torch.randint(0, vocab, (b, args.seq_len), device=args.device) for b in args.prefill_batch_sizes}
    prompt = torch.randint(0, vocab, (1, 64), device=args.device)
    keys = [f"prefill_b{b}" for b in batches] + (["decode"] if causal else [])
    flop_batch = batches[min(batches)]  # properties of the model, the same eager or compiled
    dense_flops = forward_flops(lambda: dense(input_ids=flop_batch))
    if True in modes:  # per model: one entry per prefill shape, up to two for the decoding step
        make_room_for_compiled_models(1 + len(configs), len(batches) + 2)

    def compiled_or_not(model, compiled: bool):
        return torch.compile(model, dynamic=False) if compiled else model  # fixed shapes: no dynamic kernels

    def warm_up(model, runner, decode_config) -> None:
        for batch in batches.values():
            runner(input_ids=batch)
        if causal:  # compiles the decoding step when `decode_config` is set
            greedy(model, prompt, args.decode_tokens + 1, decode_config)

    dense_runners = {compiled: compiled_or_not(dense, compiled) for compiled in modes}
    decode_configs = {compiled: decode_compile_config(args.device) if compiled else None for compiled in modes}
    with torch.no_grad():
        for compiled in tqdm(modes, desc="Dense warm-up"):
            warm_up(dense, dense_runners[compiled], decode_configs[compiled])
    facts = {"dense": {"targeted_ratio": 1.0, "params": sum(p.numel() for p in dense.parameters()), "flop_bound": 1.0}}
    pairs = {compiled: {} for compiled in modes}  # {compiled: {variant: {key: [(dense s, variant s), ...]}}}
    memory = {compiled: {"dense": peak_memory_mib(dense_runners[compiled], batches[max(batches)], args.device)}
              for compiled in modes}
    for name, config in tqdm(configs.items(), desc="Variants"):  # one at a time in memory, next to dense
        inherited = get_inher_model(copy.deepcopy(dense), config, progressbar=False)
        model = inherited.eval()
        facts[name] = {"targeted_ratio": inherited.inher_report.ratio, "params": sum(p.numel() for p in model.parameters()),
                       "flop_bound": dense_flops / forward_flops(partial(model, input_ids=flop_batch))}
        for compiled in modes:
            runners = {"dense": dense_runners[compiled], name: compiled_or_not(model, compiled)}
            models = {"dense": dense, name: model}
            with torch.no_grad():
                warm_up(model, runners[name], decode_configs[compiled])
                measure = timing_measure(runners, models, batches, prompt, args.decode_tokens,
                                         decode_configs[compiled], args.device)
                pairs[compiled][name] = paired_timings(measure, name, keys, args.repeats)
            memory[compiled][name] = peak_memory_mib(runners[name], batches[max(batches)], args.device)
        del inherited, model, runners, models
        gc.collect()
        if args.output_json:  # after every variant: a run stopped part-way keeps what it measured
            write_json(args, table_rows(facts, pairs, memory, keys), complete=False)

    rows = table_rows(facts, pairs, memory, keys)
    if args.output_json:
        write_json(args, rows, complete=True)
    print(f"\n{args.model} on {args.device} ({dtype}), seq_len {args.seq_len}, median of {args.repeats} repetitions; "
          f"speedup = dense time / variant time, the two timed back to back")
    print("| variant | compiled | targeted ratio | params | FLOP bound | " +
          " | ".join(f"{k} speedup" for k in keys) + " | prefill of bound | peak mem (MiB) |")
    print("|" + "---|" * (7 + len(keys)))
    for r in rows:
        biggest = f"prefill_b{max(batches)}_speedup"
        memory_mib = "—" if r["peak_memory_MiB"] is None else f"{r['peak_memory_MiB']:.0f}"
        print(f"| {r['variant']} | {'yes' if r['compiled'] else 'no'} | {r['targeted_ratio']:.3f} | {r['params']:,} | "
              f"{r['flop_bound']:.2f}x | " + " | ".join(f"{r[k + '_speedup']:.2f}x" for k in keys) +
              f" | {r[biggest] / r['flop_bound']:.2f} | {memory_mib} |")
    decode_ms = {r["variant"]: 1000 * r["decode_s"] for r in rows if "decode_s" in r}
    if decode_ms:
        print("decode ms/token:", {k: round(v, 2) for k, v in decode_ms.items()})


if __name__ == "__main__":
    main()
