"""The `inhernet` command: `inhernet compress MODEL ...`, `inhernet report DIR`, `inhernet densify DIR --output OUT`
and `inhernet eval LM_EVAL_ARGS`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig, AutoTokenizer, set_seed

from .calibration import sample_windows
from .flags import add_config_flags, config_from_flags
from .integration import QUANT_METHOD, InherQuantizationConfig
from .model import get_inher_model, model_class_for, plan_inheritance
from .skeleton import build_skeleton, report_from_description
from .streaming import StreamingNotSupported, compress_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_calibration_text(source: str, split: str, text_column: str, dataset_config: Optional[str]) -> str:
    """The text of a .txt/.raw file, or the `text_column` of a JSON/JSONL file, a dataset folder or a Hub dataset."""
    path = Path(source)
    if path.is_file() and path.suffix in (".txt", ".raw"):
        return path.read_text(encoding="utf-8")
    from datasets import load_dataset

    if path.is_file() and path.suffix in (".json", ".jsonl"):
        dataset = load_dataset("json", data_files=str(path), split="train")
    else:
        dataset = load_dataset(source, dataset_config, split=split)
    if text_column not in dataset.column_names:
        raise ValueError(f"--calibration-text-column {text_column!r} is not a column of {source}; columns: "
                         f"{dataset.column_names}.")
    return "\n\n".join(dataset[text_column])


def compress(args: argparse.Namespace) -> None:
    if args.output is None and not args.dry_run:
        raise SystemExit("inhernet compress: --output is required (or --dry-run to only print the plan).")
    try:
        config = config_from_flags(args, "cli")
    except (TypeError, ValueError) as err:
        raise SystemExit(f"inhernet compress: {err}") from None
    for flag in ("calibration_samples", "calibration_seq_len"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"inhernet compress: --{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}.")
    if config.needs_calibration and not args.calibration_data:
        raise SystemExit(f"inhernet compress: --init {config.init} / --rank-allocation {config.rank_allocation} need "
                         f"--calibration-data (a .txt/.raw/.jsonl file, a dataset folder or a Hub dataset id).")
    if args.calibration_data and not config.needs_calibration:
        raise SystemExit("inhernet compress: --calibration-data is only used with --init whitened or "
                         "--rank-allocation activation.")
    load = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    model_config = AutoConfig.from_pretrained(args.model, **load)
    positions = getattr(model_config, "max_position_embeddings", None)
    if config.needs_calibration and positions is not None and args.calibration_seq_len > positions:
        raise SystemExit(f"inhernet compress: --calibration-seq-len {args.calibration_seq_len} exceeds the model's "
                         f"max_position_embeddings ({positions}).")
    if args.stream == "yes" and (args.gguf_file or args.dry_run):
        raise SystemExit(f"inhernet compress: --stream yes reads a safetensors checkpoint block by block; it cannot "
                         f"be combined with {'--gguf-file' if args.gguf_file else '--dry-run'}.")
    tokenizer = AutoTokenizer.from_pretrained(args.model, **load)
    calibration = None
    if config.needs_calibration:
        text = load_calibration_text(args.calibration_data, args.calibration_split, args.calibration_text_column,
                                     args.calibration_config)
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        calibration = [{k: v.to(args.device) for k, v in batch.items()}
                       for batch in sample_windows(ids, args.calibration_samples, args.calibration_seq_len, args.seed)]
    set_seed(args.seed)  # the gate's random init: the same output streamed or in memory, run after run
    start = time.perf_counter()
    if args.stream != "no" and not args.gguf_file and not args.dry_run:
        try:
            skeleton = compress_checkpoint(args.model, config, args.output, calibration_data=calibration,
                                           tokenizer=tokenizer, device=args.device, dtype=DTYPES[args.dtype])
        except StreamingNotSupported as err:
            if args.stream == "yes":
                raise SystemExit(f"inhernet compress: --stream yes: {err}") from None
            print(f"inhernet compress: compressing in memory, not streamed: {err}")
        except (TypeError, ValueError) as err:
            raise SystemExit(f"inhernet compress: {err}") from None
        else:
            print(skeleton.inher_report)
            print(f"compressed block by block (streamed) in {time.perf_counter() - start:.1f} s on {args.device}, "
                  f"reading included; saved to {args.output}")
            return
    model = model_class_for(model_config).from_pretrained(args.model, dtype=DTYPES[args.dtype], **load)
    model.to(args.device)
    if args.dry_run:
        try:
            print(plan_inheritance(model, config, calibration_data=calibration))
        except (TypeError, ValueError) as err:
            raise SystemExit(f"inhernet compress: {err}") from None
        print("dry run: nothing compressed or written (energy kept is known only once each layer is factored)")
        return
    try:
        inherited = get_inher_model(model, config, calibration_data=calibration)
    except (TypeError, ValueError) as err:  # the library's input errors (targets, budgets, calibration, heads)
        raise SystemExit(f"inhernet compress: {err}") from None
    seconds = time.perf_counter() - start
    inherited.save_pretrained(args.output, tokenizer=tokenizer)
    print(inherited.inher_report)
    print(f"compressed in memory in {seconds:.1f} s on {args.device}, loading included; saved to {args.output}")


def densify(args: argparse.Namespace) -> None:
    config = AutoConfig.from_pretrained(args.model)
    description = getattr(config, "quantization_config", None)
    if not isinstance(description, dict) or description.get("quant_method") != QUANT_METHOD:
        raise SystemExit(f"inhernet densify: {args.model} is not an inhernet_hf checkpoint (no quantization_config "
                         f"with quant_method={QUANT_METHOD!r}).")
    model = model_class_for(config).from_pretrained(args.model)
    try:
        model = model.dequantize()
    except ValueError as err:
        raise SystemExit(f"inhernet densify: {err}") from None
    model.save_pretrained(args.output)
    try:
        AutoTokenizer.from_pretrained(args.model).save_pretrained(args.output)
    except OSError:
        print(f"{args.model} has no tokenizer: none written")
    print(f"dense model ({sum(p.numel() for p in model.parameters()):,} parameters) saved to {args.output}")


def report(args: argparse.Namespace) -> None:
    """Rebuild the inherited skeleton on the meta device from config.json alone (no weights read)."""
    config = AutoConfig.from_pretrained(args.model)
    description = getattr(config, "quantization_config", None)
    if not isinstance(description, dict) or description.get("quant_method") != QUANT_METHOD:
        raise SystemExit(f"inhernet report: {args.model} is not an inhernet_hf checkpoint (no quantization_config "
                         f"with quant_method={QUANT_METHOD!r} in its config.json).")
    description = InherQuantizationConfig(**description)
    del config.quantization_config
    with torch.device("meta"):
        model = model_class_for(config)._from_config(config)
    build_skeleton(model, description)
    table = report_from_description(model, description)
    print(table)
    plot = Path(args.plot or f"{Path(args.model).name}_report.png")
    _plot(table, plot, args.model)
    print(f"plot: {plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(table.to_dict(), indent=2))


def _plot(table, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table.rows
    x = range(len(rows))
    fig, (ax_rank, ax_energy) = plt.subplots(2, 1, figsize=(max(8, len(rows) * 0.06), 7), sharex=True)
    ranks = [r.rank if r.inherited else min(r.in_features, r.out_features) for r in rows]
    ratios = [r.params / r.dense_params for r in rows]
    ax_rank.bar(x, ranks, color=["tab:blue" if r.inherited else "tab:gray" for r in rows])
    ax_rank.set_ylabel("rank (gray: kept dense, full rank)")
    ax_rank.set_title(f"{title}: {table.params:,} / {table.dense_params:,} targeted params (ratio {table.ratio:.3f})")
    ax_energy.plot(x, [r.energy_kept if r.energy_kept is not None else float("nan") for r in rows], ".-",
                   label="energy kept (weight or whitened spectrum)")
    ax_energy.plot(x, ratios, ".", alpha=0.6, label="params kept")
    ax_energy.set_ylim(0, 1.05)
    ax_energy.set_xlabel("targeted layer (model order)")
    ax_energy.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inhernet", description="Compress Hugging Face models by inheritance.")
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("compress", help="Inherit a model and save it (loadable with plain transformers).")
    c.add_argument("model", help="Hub id or folder of the dense model.")
    c.add_argument("--output", default=None, help="Folder for the inherited model (required unless --dry-run).")
    c.add_argument("--dry-run", action="store_true",
                   help="Print the per-layer plan (targets, ranks, parameters) and stop: nothing is changed or saved.")
    add_config_flags(c.add_argument_group("InherConfig (one option per field)"), "cli")
    c.add_argument("--calibration-data", default=None,
                   help="A .txt/.raw/.json/.jsonl file, a dataset folder or a Hub dataset id.")
    c.add_argument("--calibration-split", default="train")
    c.add_argument("--calibration-config", default=None, help="Dataset configuration name (e.g. wikitext-2-raw-v1).")
    c.add_argument("--calibration-text-column", default="text")
    c.add_argument("--calibration-samples", type=int, default=64)
    c.add_argument("--calibration-seq-len", type=int, default=256)
    c.add_argument("--gguf-file", default=None, help="GGUF file inside MODEL (loaded dequantised, as transformers does).")
    c.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    c.add_argument("--seed", type=int, default=0, help="Seeds the calibration windows and the gates' random init.")
    c.add_argument("--stream", choices=["auto", "yes", "no"], default="auto",
                   help="Compress block by block from the safetensors checkpoint, one dense block in memory at a "
                        "time (peak memory independent of depth; the same output). auto: streamed when the "
                        "checkpoint is safetensors, --rank-allocation uniform and the targets sit in repeated "
                        "blocks, else in memory (saying why); yes: streamed or an error; no: in memory.")
    c.set_defaults(func=compress)
    r = commands.add_parser("report", help="Per-layer table and a PNG plot of an inherited checkpoint.")
    r.add_argument("model", help="Folder or Hub id of an inherited model.")
    r.add_argument("--plot", default=None, help="PNG path (default: ./<name>_report.png).")
    r.add_argument("--json", default=None, help="Also write the table as JSON here.")
    r.set_defaults(func=report)
    d = commands.add_parser("densify", help="Export an inherited checkpoint as the dense model it computes exactly "
                                             "(M = 1, gate 'none' or identical heads; refused otherwise).")
    d.add_argument("model", help="Folder or Hub id of an inherited model.")
    d.add_argument("--output", required=True, help="Folder for the dense checkpoint (and the tokenizer, if any).")
    d.set_defaults(func=densify)
    e = commands.add_parser("eval", add_help=False,
                            help="lm-evaluation-harness on inherited checkpoints: every argument goes to lm_eval "
                                 "(e.g. --model hf --model_args pretrained=DIR --tasks inhernet_text).")
    e.set_defaults(func=None)
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:  # lm-eval parses its own arguments (including --help)
        from .evaluation import run_lm_eval

        return run_lm_eval(argv[1:])
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
