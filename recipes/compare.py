"""Does an inherited network beat a student of the same size? One command trains every method on equal terms (same
data, steps, optimiser, learning rate and seeds; InherNet matched to the student's total parameter count) through
`recipes/glue.py` (a GLUE task, a transformer teacher) or `recipes/image_classification.py` (`--recipe
image_classification`, a CNN teacher with stages) and writes a table (markdown + JSON) and a bar chart with error
bars (PNG, and as text in compare.md).

    python recipes/compare.py --task_name sst2 --teacher_name_or_path out/glue/sst2/teacher \\
        --data_dir ../shared/data/glue --student_num_layers 3 --seeds 1 2 3 --output_dir out/compare/sst2
    python recipes/compare.py --recipe image_classification --teacher_name_or_path out/fmnist/teacher \\
        --idx_dir /usr/share/datasets/fashion-mnist --student_depths 1 1 --learning_rate 3e-3 \\
        --output_dir out/compare/fmnist

Methods (--methods, default all that apply): teacher (evaluated only); student (CE), student_kd (Hinton),
student_hkt, student_hcd; lowrank (1 head, no gate, SVD init); inher, inher_kd; inher_whitened (activation-aware
init and rank allocation from 128 training examples, no KD); ablations inher_no_svd (random init), inher_no_gate,
inher_symmetric. Convolutions take the asymmetric layer with the SVD or random init only: --recipe
image_classification runs neither inher_whitened nor inher_symmetric. HKT and HCD need a classification task: on
STS-B (a regression) leave student_hkt and student_hcd out of --methods.
Budget: a transformer student keeps --student_num_layers evenly spaced layers (or --target_ratio R picks the layer
count whose student is closest in size to InherNet at R); a CNN student keeps --student_depths evenly spaced blocks
per stage (default: half of each stage's, at least 1). Either way InherNet then runs at the ratio that matches the
student's parameter count (printed), not at R. Columns: score (mean +- std over seeds), parameters, train time, and
the score after 25% of the steps (convergence), the steps counted for the --num_processes of --launcher. A finished
run is reused if it was made with the same flags.
"""

import argparse
import json
import math
import shlex
import statistics
from pathlib import Path
from typing import Optional

from glue import GLUE_TASKS, load_glue  # recipes/ is on sys.path when this file runs as a script
from glue_table import MAIN_METRIC, RECIPE, add_launch_args, check_table_args, kd_temperature_flag, run

IMAGE_RECIPE = RECIPE.parent / "image_classification.py"
IMAGE_DATA_FLAGS = ("idx_dir", "dataset_name", "dataset_config_name", "train_dir", "validation_dir")

STUDENT_METHODS = {"student": ["--kd_alpha", "0"], "student_kd": [], "student_hkt": ["--distill_method", "hkt"],
                   "student_hcd": ["--distill_method", "hcd"]}
# The rows compare InherNet's parts as the paper does: each SVD row names --inher_init svd (the data-free init, with
# uniform ranks) rather than taking glue.py's default (whitened init + activation ranks, the inher_whitened row).
SVD = ["--inher_init", "svd"]
INHER_METHODS = {"lowrank": [*SVD, "--inher_num_heads", "1", "--inher_gate", "none", "--kd_alpha", "0"],
                 "inher": [*SVD, "--kd_alpha", "0"], "inher_kd": SVD,
                 "inher_whitened": ["--inher_init", "whitened", "--inher_rank_allocation", "activation",
                                    "--kd_alpha", "0"],
                 "inher_no_svd": ["--inher_init", "random", "--kd_alpha", "0"],
                 "inher_no_gate": [*SVD, "--inher_gate", "none", "--kd_alpha", "0"],
                 "inher_symmetric": [*SVD, "--inher_structure", "symmetric", "--kd_alpha", "0"]}
KD_METHODS = ("student_kd", "inher_kd")  # they get --kd_alpha / --kd_temperature; the others distil otherwise or not
LINEAR_ONLY_METHODS = ("inher_whitened", "inher_symmetric")  # not for Conv2d layers
CLASSIFICATION_METHODS = ("student_hkt", "student_hcd")  # glue.py refuses HKT and HCD on a regression
METHODS = ["teacher", *STUDENT_METHODS, *INHER_METHODS]
LABELS = {"teacher": "teacher", "student": "student (CE)", "student_kd": "student + KD",
          "student_hkt": "student + HKT", "student_hcd": "student + HCD", "lowrank": "plain low-rank (SVD, 1 head)",
          "inher": "InherNet", "inher_kd": "InherNet + KD",
          "inher_whitened": "InherNet, whitened init + activation ranks", "inher_no_svd": "InherNet w/o SVD init",
          "inher_no_gate": "InherNet w/o gate", "inher_symmetric": "InherNet symmetric"}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=["glue", "image_classification"], default="glue",
                        help="The recipe every run goes through.")
    parser.add_argument("--task_name", type=str.lower, default=None, choices=sorted(GLUE_TASKS),
                        help="The GLUE task (--recipe glue).")
    parser.add_argument("--teacher_name_or_path", required=True, help="The teacher fine-tuned on the task.")
    parser.add_argument("--data_dir", default=None, help="GLUE TSV folder (default: the Hub).")
    images = parser.add_argument_group("image data (--recipe image_classification; image_classification.py's flags)")
    images.add_argument("--idx_dir", default=None, help="A folder of MNIST-format idx files (Fashion-MNIST's).")
    images.add_argument("--dataset_name", default=None, help="A Hub image-classification dataset.")
    images.add_argument("--dataset_config_name", default=None)
    images.add_argument("--train_dir", default=None, help="An imagefolder of training images.")
    images.add_argument("--validation_dir", default=None, help="An imagefolder of validation images.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--student_depths", type=int, nargs="+", default=None,
                        help="Blocks a CNN student keeps in each stage (--recipe image_classification; default: "
                             "half of each of the teacher's stages, at least 1).")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--student_num_layers", type=int, default=None,
                        help="Student depth, as recipes/glue.py's --student_num_layers (default: half the teacher's).")
    budget.add_argument("--target_ratio", type=float, default=None,
                        help="In (0, 1]; only picks the student depth: the layer count whose student is closest in "
                             "size to InherNet at this targeted-parameter ratio. InherNet then runs matched to that "
                             "student's size, at the ratio printed, not at this one.")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help="Default: every method that applies to the recipe.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--num_heads", type=int, default=2, help="InherNet heads (lowrank uses 1).")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--num_train_epochs", type=int, default=3)
    parser.add_argument("--per_device_train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="One learning rate for every method.")
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--kd_alpha", type=float, default=0.5)
    parser.add_argument("--kd_temperature", type=float, default=4.0,
                        help="Hinton KD's temperature (student_kd, inher_kd); HCD's KL keeps glue.py's default, 2.")
    add_launch_args(parser)
    args = parser.parse_args(argv)
    check_table_args(parser, args)
    images = args.recipe == "image_classification"
    if args.methods is None:
        args.methods = [m for m in METHODS if not (images and m in LINEAR_ONLY_METHODS)]
    if images:
        given = [f for f in IMAGE_DATA_FLAGS if getattr(args, f) is not None]
        if not {"idx_dir", "dataset_name", "train_dir"} & set(given):
            parser.error("--recipe image_classification needs its data: --idx_dir, --dataset_name or --train_dir.")
        wrong = [f"--{f}" for f in ("task_name", "data_dir", "target_ratio", "student_num_layers")
                 if getattr(args, f) is not None] + [f"--methods {m}" for m in args.methods
                                                      if m in LINEAR_ONLY_METHODS]
        if wrong:
            parser.error(f"--recipe image_classification does not use {', '.join(wrong)} (GLUE / transformer "
                         f"options; a CNN student is sized by --student_depths, and its convolutions take the "
                         f"asymmetric layer with the SVD init only).")
        args.task_name = "image_classification"
        args.num_processes = launcher_num_processes(parser, args.launcher)
        return args
    if args.task_name is None:
        parser.error("--recipe glue needs --task_name.")
    wrong = [f"--{f}" for f in (*IMAGE_DATA_FLAGS, "student_depths") if getattr(args, f) is not None]
    if wrong:
        parser.error(f"--recipe glue does not use {', '.join(wrong)} (options of --recipe image_classification).")
    if args.target_ratio is not None and not 0 < args.target_ratio <= 1:
        parser.error(f"--target_ratio must lie in (0, 1], got {args.target_ratio}.")
    refused = [m for m in args.methods if m in CLASSIFICATION_METHODS]
    if GLUE_TASKS[args.task_name].is_regression and refused:
        kept = " ".join(m for m in args.methods if m not in refused)
        parser.error(f"{args.task_name} is a regression, and HKT and HCD need a classification task: drop "
                     f"{', '.join(refused)} from --methods (e.g. --methods {kept}).")
    args.num_processes = launcher_num_processes(parser, args.launcher)
    return args


def launcher_num_processes(parser: argparse.ArgumentParser, launcher: str) -> int:
    """The number of processes `launcher` starts: its --num_processes (accelerate launch's flag, either spelling),
    1 without it; with a --config_file, which may set another count, the flag is required."""
    reader = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    reader.add_argument("--num_processes", "--num-processes", default=None)
    reader.add_argument("--config_file", "--config-file", default=None)
    known = reader.parse_known_args(shlex.split(launcher))[0]
    if known.config_file is not None and known.num_processes is None:
        parser.error("--launcher: with --config_file, also give --num_processes N: the step count and the 25% "
                     "evaluation point are computed for it.")
    value = known.num_processes or "1"
    if not value.isdigit() or int(value) < 1:
        parser.error(f"--launcher: --num_processes must be an integer >= 1, got {value!r}.")
    return int(value)


def steps_per_run(train_size: int, batch_size: int, num_epochs: int, num_processes: int) -> int:
    """Optimizer steps of a glue.py run: each epoch's ceil(train_size / batch_size) batches are dealt out to the
    processes (Accelerate's even sharding: ceil(batches / num_processes) per process), one step per batch."""
    return num_epochs * math.ceil(math.ceil(train_size / batch_size) / num_processes)


def match_image_budget(args: argparse.Namespace) -> tuple[list[int], float, int]:
    """(student depths, InherNet target ratio, student parameters) of equal total size, for a CNN teacher."""
    from transformers import AutoModelForImageClassification

    from inhernet_hf import InherConfig
    from inhernet_hf.students import matched_target_ratio, stage_lists, stage_student_param_count

    teacher = AutoModelForImageClassification.from_pretrained(args.teacher_name_or_path)
    depths = args.student_depths or [max(1, len(stage) // 2) for stage in stage_lists(teacher)]
    try:
        student_params = stage_student_param_count(teacher, depths)
    except ValueError as err:
        raise SystemExit(f"compare.py: error: --student_depths: {err}") from err
    config = InherConfig(target_ratio=0.5, num_heads=args.num_heads)
    return depths, matched_target_ratio(teacher, student_params, config), student_params


def image_train_size(args: argparse.Namespace) -> int:
    """Training images the runs see (the first --max_train_samples)."""
    from image_classification import FASHION_MNIST_LABELS, load_images

    data_args = argparse.Namespace(**{f: getattr(args, f) for f in IMAGE_DATA_FLAGS}, image_column_name="image",
                                   label_column_name="label", idx_label_names=FASHION_MNIST_LABELS)
    size = len(load_images(data_args)["train"])
    return size if args.max_train_samples is None else min(size, args.max_train_samples)


def match_budget(args: argparse.Namespace) -> tuple[int, float, int]:
    """(student layers, InherNet target ratio, student parameters) of equal total size; with --target_ratio R the
    layers are those of the student closest in size to InherNet at R, and the returned ratio is matched to them."""
    from transformers import AutoModelForSequenceClassification

    from inhernet_hf import InherConfig
    from inhernet_hf.students import layer_student_param_count, matched_target_ratio, targeted_param_count

    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher_name_or_path)
    config = InherConfig(target_ratio=0.5, num_heads=args.num_heads, task_type="SEQ_CLS")
    depth = teacher.config.num_hidden_layers
    sizes = {n: layer_student_param_count(teacher, n) for n in range(1, depth + 1)}
    if args.target_ratio is not None:
        total, targeted = sum(p.numel() for p in teacher.parameters()), targeted_param_count(teacher, config)
        inherited = total - targeted + args.target_ratio * targeted
        layers = min(sizes, key=lambda n: abs(sizes[n] - inherited))
    else:
        layers = depth // 2 if args.student_num_layers is None else args.student_num_layers
        if layers not in sizes:
            raise SystemExit(f"compare.py: error: --student_num_layers must lie in [1, {depth}], got {layers}.")
    return layers, matched_target_ratio(teacher, sizes[layers], config), sizes[layers]


def summarise(method: str, runs: list[dict], metric: str, quarter: int) -> dict:
    scores = [r[f"eval_{metric}"] for r in runs]
    early = [h[metric] for r in runs for h in r.get("eval_history", []) if h["step"] == quarter]
    return {"method": method, "label": LABELS[method], "scores": scores, "mean": statistics.mean(scores),
            "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "early_mean": statistics.mean(early) if early else float("nan"),
            "early_std": statistics.stdev(early) if len(early) > 1 else 0.0,
            "params": runs[0]["total_params"], "train_time": statistics.mean(r["train_runtime"] for r in runs)}


def plot(rows: list[dict], metric: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(rows), 4.5))
    colors = ["#777777" if r["method"] == "teacher" else "#4c72b0" if r["method"].startswith("student")
              else "#dd8452" for r in rows]
    ax.bar(range(len(rows)), [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=4, color=colors)
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=35, ha="right")
    low = min(r["mean"] - r["std"] for r in rows)
    ax.set_ylim(max(0.0, low - 0.05), None)
    ax.set_ylabel(metric)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def text_chart(rows: list[dict], width: int = 40) -> str:
    """The bar chart as text, for READMEs: bars on a scale from the lowest mean - std to the highest mean + std,
    each ending at the mean, with `├` and `┤` at mean - std and mean + std."""
    low = min(r["mean"] - r["std"] for r in rows)
    high = max(r["mean"] + r["std"] for r in rows)
    column = lambda value: round((value - low) / ((high - low) or 1.0) * width)  # noqa: E731
    label_width = max(len(r["label"]) for r in rows)
    lines = [f"{'':{label_width}}  {low:.4f}{high:>{width - 5}.4f}"]
    for r in rows:
        end, lo, hi = column(r["mean"]), column(r["mean"] - r["std"]), column(r["mean"] + r["std"])
        bar = ["█"] * end + ["─"] * (hi - end) + [" "] * (width + 1 - hi)
        if hi > lo:
            bar[lo], bar[hi] = "├", "┤"
        lines.append(f"{r['label']:{label_width}}  {''.join(bar)} {r['mean']:.4f}")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    root = Path(args.output_dir)
    common = ["--per_device_train_batch_size", str(args.per_device_train_batch_size),
              "--num_train_epochs", str(args.num_train_epochs), "--learning_rate", str(args.learning_rate),
              "--model_name_or_path", args.teacher_name_or_path]
    if args.recipe == "image_classification":
        metric, recipe, kd_temperature = "accuracy", IMAGE_RECIPE, ["--kd_temperature", str(args.kd_temperature)]
        depths, ratio, student_params = match_image_budget(args)
        student_flags, student_name = ["--student_depths", *map(str, depths)], f"student with depths {depths}"
        student_record = {"student_depths": depths}
        train_size = image_train_size(args)
        common += ["--per_device_eval_batch_size", "500"]
        common += [x for f in IMAGE_DATA_FLAGS if getattr(args, f) is not None for x in (f"--{f}", getattr(args, f))]
    else:
        task = GLUE_TASKS[args.task_name]
        metric, recipe, kd_temperature = (MAIN_METRIC.get(task.name, "accuracy"), RECIPE,
                                          kd_temperature_flag(task.name, args.kd_temperature))
        layers, ratio, student_params = match_budget(args)
        student_flags, student_name = ["--student_num_layers", str(layers)], f"{layers}-layer student"
        student_record = {"student_layers": layers}
        train_size = len(load_glue(task, args.data_dir)["train"])
        if args.max_train_samples is not None:
            train_size = min(train_size, args.max_train_samples)
        if args.target_ratio is not None:
            print(f"--target_ratio {args.target_ratio} picked the student depth: {layers} layers, the student closest "
                  f"in size to InherNet at that ratio")
        common += ["--task_name", task.name, "--max_length", str(args.max_length), "--per_device_eval_batch_size",
                   "64"]
        if args.data_dir is not None:
            common += ["--data_dir", args.data_dir]
    total_steps = steps_per_run(train_size, args.per_device_train_batch_size, args.num_train_epochs,
                                args.num_processes)
    quarter = max(1, total_steps // 4)
    print(f"budget: {student_name} with {student_params:,} parameters; InherNet matched to it at target_ratio "
          f"{ratio:.4f} ({args.num_heads} heads); {total_steps} steps per run on {args.num_processes} process(es), "
          f"convergence read at step {quarter}")
    common += ["--num_warmup_steps", str(max(1, total_steps // 20)), "--eval_steps", str(quarter)]
    kd = ["--kd_alpha", str(args.kd_alpha)] + kd_temperature  # Hinton KD methods
    for flag in ("max_train_samples", "max_eval_samples"):
        if getattr(args, flag) is not None:
            common += [f"--{flag}", str(getattr(args, flag))]
    launcher = shlex.split(args.launcher) + [str(recipe)]
    rows, commands = [], {}
    for method in args.methods:
        if method == "teacher":
            flags, seeds = ["--no_inher", "--max_train_steps", "0"], args.seeds[:1]
        elif method in STUDENT_METHODS:
            flags, seeds = [*student_flags, *STUDENT_METHODS[method]], args.seeds
        else:
            flags, seeds = ["--inher_target_ratio", f"{ratio:.6f}", "--inher_num_heads", str(args.num_heads),
                            *INHER_METHODS[method]], args.seeds
        if method in KD_METHODS:
            flags = flags + kd
        runs = []
        for seed in seeds:  # later flags win in argparse: the method's own flags override the common ones
            output_dir = root / method / f"seed_{seed}"
            results, command = run(launcher, [*common, "--seed", str(seed), *flags, "--output_dir", str(output_dir)],
                                   output_dir, args.overwrite)
            commands.setdefault(method, command)
            runs.append(results)
        rows.append(summarise(method, runs, metric, quarter))

    lines = [f"| method | {metric} (mean ± std, {len(args.seeds)} seeds) | params | train time (s) | "
             f"{metric} at 25% of steps |", "|---|---|---|---|---|"]
    for r in rows:
        early = "—" if r["method"] == "teacher" else f"{r['early_mean']:.4f} ± {r['early_std']:.4f}"
        lines.append(f"| {r['label']} | {r['mean']:.4f} ± {r['std']:.4f} | {r['params']:,} | {r['train_time']:.0f} | "
                     f"{early} |")
    table = "\n".join(lines)
    print("\n" + table)
    chart = text_chart(rows)
    print("\n" + chart)
    root.mkdir(parents=True, exist_ok=True)
    (root / "compare.md").write_text(f"{table}\n\n```\n{chart}\n```\n")
    (root / "compare.json").write_text(json.dumps({"task": args.task_name, "metric": metric, **student_record,
                                                   "target_ratio": ratio, "total_steps": total_steps,
                                                   "num_processes": args.num_processes,
                                                   "rows": rows, "commands": commands}, indent=2))
    plot(rows, metric, f"{args.task_name}: {student_name} vs InherNet (equal parameters)", root / "compare.png")
    print(f"wrote {root / 'compare.md'}, compare.json and compare.png")


if __name__ == "__main__":
    main()
