"""The recipes' shared command-line flags (transformers' `run_*_no_trainer.py` names) and their cross-checks.

* `add_training_args` (the loop's flags), `add_kd_args` (Hinton KD and the hidden-state term), `add_inher_args`
  (the `--inher_*` flags of `InherConfig`; the init defaults to the measured best, whitened + activation ranks),
  `add_baseline_args` (--distill_method and the HKT / HCD weights of the student baselines);
* `check_common_args` / `check_baseline_args` refuse flags a run would not use; `inher_config_from_args` builds the
  `InherConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from typing import Any, Iterable, Literal, Optional, Union

from .config import InherConfig, calibration_needed


def parse_checkpointing_steps(value: Optional[str]) -> Union[None, int, str]:
    """`--checkpointing_steps`: None, a positive number of optimizer steps, or 'epoch'."""
    if value is None or value == "":
        return None
    if isinstance(value, int):
        steps = value
    elif value == "epoch":
        return "epoch"
    elif str(value).isdigit():
        steps = int(value)
    else:
        raise argparse.ArgumentTypeError(f"--checkpointing_steps must be a positive integer or 'epoch', got {value!r}.")
    if steps < 1:
        raise argparse.ArgumentTypeError(f"--checkpointing_steps must be a positive integer or 'epoch', got {value!r}.")
    return steps


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return number


# transformers' schedulers that `get_scheduler(name, optimizer, num_warmup_steps, num_training_steps)` builds and
# that step on the step count alone (reduce_lr_on_plateau and greedy need a metric, the *_min_lr and
# warmup_stable_decay ones extra arguments).
STEP_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                   "inverse_sqrt")


def add_training_args(parser: argparse.ArgumentParser, learning_rate: float = 5e-5) -> argparse.ArgumentParser:
    """The flags of transformers' `run_*_no_trainer.py` examples that drive `train` (mixed precision and the number
    of processes are `accelerate launch`'s own flags)."""
    group = parser.add_argument_group("training")
    group.add_argument("--per_device_train_batch_size", type=_positive_int, default=8)
    group.add_argument("--per_device_eval_batch_size", type=_positive_int, default=8)
    group.add_argument("--learning_rate", type=float, default=learning_rate,
                       help="Initial (after warmup) learning rate.")
    group.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (not on biases and norms).")
    group.add_argument("--num_train_epochs", type=_non_negative_int, default=3)
    group.add_argument("--max_train_steps", type=_non_negative_int, default=None,
                       help="Total optimizer steps; overrides --num_train_epochs. 0 only evaluates.")
    group.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1)
    group.add_argument("--lr_scheduler_type", default="linear", choices=STEP_SCHEDULERS,
                       help="transformers' schedulers that step on the step count alone (the others need a "
                            "metric or extra arguments).")
    group.add_argument("--num_warmup_steps", type=_non_negative_int, default=0, help="Optimizer steps of warmup.")
    group.add_argument("--max_grad_norm", type=float, default=None,
                       help="Clip gradients to this norm (default: no clipping).")
    group.add_argument("--output_dir", type=str, required=True, help="Final model, all_results.json and checkpoints.")
    group.add_argument("--seed", type=int, default=42,
                       help="Seed of the initialisation, dropout and data order (needed for exact resumption).")
    group.add_argument("--eval_steps", type=_positive_int, default=None,
                       help="Also evaluate every N optimizer steps (default: at the end of each epoch only); every "
                            "evaluation is listed in all_results.json's eval_history.")
    group.add_argument("--checkpointing_steps", type=parse_checkpointing_steps, default=None,
                       help="Save the training state every N optimizer steps, or 'epoch' at the end of each epoch.")
    group.add_argument("--resume_from_checkpoint", type=str, default=None,
                       help="A checkpoint folder (output_dir/step_N or epoch_N), or 'latest' for the most advanced "
                            "complete checkpoint in --output_dir (a fresh start when there is none).")
    group.add_argument("--with_tracking", action="store_true", help="Log metrics with the trackers of --report_to.")
    group.add_argument("--report_to", type=str, default="tensorboard",
                       help="Tracker(s) for --with_tracking: 'tensorboard', 'wandb', 'all', ... (Accelerate's names).")
    group.add_argument("--push_to_hub", action="store_true", help="Push the final model (with its card) to the Hub.")
    group.add_argument("--hub_model_id", type=str, default=None, help="Repository id; default: output_dir's name.")
    group.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the logged-in one).")
    return parser


def add_kd_args(parser: argparse.ArgumentParser, alpha: float = 0.5,
                temperature: float = 2.0) -> argparse.ArgumentParser:
    group = parser.add_argument_group("knowledge distillation (inherited runs only)")
    group.add_argument("--kd_alpha", type=float, default=alpha,
                       help="Weight of the distillation term: (1 - a) * task loss + a * KD loss. 0 disables KD.")
    group.add_argument("--kd_temperature", type=float, default=temperature,
                       help="Softmax temperature T of the KD term.")
    group.add_argument("--teacher_name_or_path", type=str, default=None,
                       help="Frozen teacher (a fine-tuned model folder or Hub id). Default: --model_name_or_path.")
    group.add_argument("--kd_hidden_weight", type=float, default=0.0,
                       help="Weight b of a layer-wise hidden-state term added to the loss: b * the mean over layers "
                            "of sum ||h_student - h_teacher||^2 / sum ||h_teacher||^2, the sums over the non-padding "
                            "tokens. The student needs the teacher's layers and hidden size (an inherited model has "
                            "them). 0 disables it.")
    return parser


# The flags of the --distill_method baselines (kd's flags are add_kd_args').
BASELINE_FLAGS = {"hkt": ("hkt_lambda",), "hcd": ("hcd_k", "hcd_num_stages", "hcd_lambda", "hcd_beta", "hcd_theta")}


def add_baseline_args(parser: argparse.ArgumentParser, stages_help: str) -> argparse._ArgumentGroup:
    """The "student baselines" group: --distill_method and the HKT / HCD weights. Returns the group, to which the
    recipe adds its own student-shape flags (layers of a transformer, stage depths of a CNN)."""
    group = parser.add_argument_group("student baselines (a smaller same-family model instead of inheritance)")
    group.add_argument("--distill_method", choices=["kd", "hkt", "hcd"], default="kd",
                       help="'kd': Hinton KD weighted by --kd_alpha (0: plain cross-entropy); 'hkt': Hereditary "
                            "Knowledge Transfer; 'hcd': Heterogeneous Complementary Distillation (both "
                            "classification only, with their own weights below; HCD's KL temperature is "
                            "--kd_temperature).")
    group.add_argument("--hkt_lambda", type=float, default=0.6, help="HKT's mixing weight lambda.")
    group.add_argument("--hcd_k", type=int, default=4, help="HCD's sub-logits per stage.")
    group.add_argument("--hcd_num_stages", type=int, default=None, help=f"HCD's student stages ({stages_help}).")
    group.add_argument("--hcd_lambda", type=float, default=6.0,
                       help="HCD's KL weight (the KL's temperature: --kd_temperature).")
    group.add_argument("--hcd_beta", type=float, default=1.0, help="HCD's orthogonality-loss weight.")
    group.add_argument("--hcd_theta", type=float, default=0.5, help="HCD's cosine margin theta.")
    return group


def check_baseline_args(args: argparse.Namespace, parser: argparse.ArgumentParser, is_student: bool) -> None:
    """Cross-checks of add_baseline_args' flags (after check_common_args); raises ValueError with the flag names."""
    if args.distill_method != "kd" and (args.no_inher and not is_student):
        raise ValueError(f"--distill_method {args.distill_method} needs a student or an inherited model (it "
                         f"distils from the teacher); --no_inher trains the teacher.")
    # HKT and HCD have their own weights instead of Hinton KD's; HCD's KL term keeps --kd_temperature.
    hinton = {"kd": (), "hkt": ("kd_alpha", "kd_temperature", "kd_hidden_weight"),
              "hcd": ("kd_alpha", "kd_hidden_weight")}
    unused = changed_flags(args, parser, hinton[args.distill_method])
    if unused:
        takes = " and --kd_temperature (its KL temperature)" if args.distill_method == "hcd" else ""
        raise ValueError(f"{args.distill_method.upper()} uses its own --{args.distill_method}_* weights{takes}, "
                         f"not Hinton KD's: remove {', '.join(unused)}.")
    unused = changed_flags(args, parser, [name for method, names in BASELINE_FLAGS.items()
                                          if method != args.distill_method for name in names])
    if unused:
        raise ValueError(f"--distill_method {args.distill_method} does not use {', '.join(unused)} (the --hkt_* "
                         f"flags set HKT, the --hcd_* flags HCD): remove them.")
    if args.hcd_k < 1 or (args.hcd_num_stages is not None and args.hcd_num_stages < 1):
        raise ValueError(f"--hcd_k and --hcd_num_stages must be >= 1, got {args.hcd_k}, {args.hcd_num_stages}.")
    if not 0.0 <= args.hkt_lambda <= 1.0:
        raise ValueError(f"--hkt_lambda (a mixing weight) must lie in [0, 1], got {args.hkt_lambda}.")
    if not (args.hcd_lambda >= 0 and args.hcd_beta >= 0 and -1.0 <= args.hcd_theta < 1.0):
        raise ValueError(f"--hcd_lambda and --hcd_beta must be >= 0 and --hcd_theta (a cosine margin) in [-1, 1), "
                         f"got {args.hcd_lambda}, {args.hcd_beta}, {args.hcd_theta}.")


def add_inher_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--no_inher`, one `--inher_<field>` flag per `InherConfig` field (its help text; validated by InherConfig),
    and `--inher_calibration_samples`. Recipe defaults: the whitened init with activation ranks (the measured best)
    and target_ratio 0.5 when `--inher_r` is not given; the task type is the recipe's."""
    group = parser.add_argument_group("inheritance (InherConfig)")
    group.add_argument("--no_inher", action="store_true", help="Train the plain (dense) model: the teacher run.")
    add_config_flags(group, "recipe", defaults={"init": "whitened"}, described={
        "target_ratio": "0.5 when --inher_r is not given",
        "rank_allocation": "'activation' with --inher_init whitened and a ratio, else 'uniform'"})
    group.add_argument("--inher_calibration_samples", type=_positive_int, default=128,
                       help="Training examples passed as calibration_data when the config needs them "
                            "(--inher_init whitened or --inher_rank_allocation activation).")
    return parser


# InherConfig fields a recipe sets itself: the task type follows the recipe's model head.
RECIPE_SET_FIELDS = ("task_type",)


def config_flag(name: str, style: str) -> str:
    """The flag of InherConfig field `name`: `--inher_<name>` in the recipes, `--<name-with-dashes>` in `inhernet`."""
    return f"--inher_{name}" if style == "recipe" else "--" + name.replace("_", "-")


def _json_object(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"down_proj\": 32}}', got {value!r} "
                                         f"({err}).") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"down_proj\": 32}}', got {value!r}.")
    return parsed


def _argparse_kwargs(hint: Any) -> dict[str, Any]:
    """argparse `type` / `nargs` / `choices` for a field's type (Optional stripped)."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is Union else [hint]
    if len(options) == 1 and typing.get_origin(options[0]) is Literal:
        return {"type": str, "choices": typing.get_args(options[0])}
    if any(typing.get_origin(o) is dict or o is dict for o in options):
        return {"type": _json_object}
    lists = [typing.get_args(o)[0] for o in options if typing.get_origin(o) is list]
    if lists:
        return {"type": lists[0], "nargs": "+"}
    return {"type": options[0]}


def add_config_flags(group, style: str, defaults: Optional[dict[str, Any]] = None,
                     described: Optional[dict[str, str]] = None) -> None:
    """One flag per InherConfig field (see `config_flag`, its help from the field's metadata). Its default is None
    (InherConfig's own), or the value in `defaults`; `described` replaces the "(default: ...)" text of fields whose
    default the caller computes. The recipes skip RECIPE_SET_FIELDS."""
    defaults, described = defaults or {}, described or {}
    hints = typing.get_type_hints(InherConfig)
    for f in dataclasses.fields(InherConfig):
        if style == "recipe" and f.name in RECIPE_SET_FIELDS:
            continue
        own = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = defaults.get(f.name)
        shown = described.get(f.name, repr(default if default is not None else own))
        group.add_argument(config_flag(f.name, style), dest=f"inher_{f.name}" if style == "recipe" else f.name,
                           default=default, help=f"{f.metadata['help']} (default: {shown})",
                           **_argparse_kwargs(hints[f.name]))


def config_from_flags(args: argparse.Namespace, style: str, **fixed: Any) -> InherConfig:
    """The InherConfig of the flags `add_config_flags` made (those left at None take InherConfig's default), with
    `fixed` fields on top. One value of `target_modules` / `exclude_modules` that is 'all-linear' or looks like a
    regex is passed as a string (PEFT's regex form), anything else as a list of names."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(InherConfig):
        value = getattr(args, f"inher_{f.name}" if style == "recipe" else f.name, None)
        if value is None:
            continue
        if f.name in ("target_modules", "exclude_modules") and len(value) == 1 and (
                value[0] == "all-linear" or re.search(r"[\\^$*+?()\[\]|{}]", value[0])):
            value = value[0]
        kwargs[f.name] = value
    return InherConfig(**{**kwargs, **fixed})


INHER_FLAGS = tuple(f"inher_{f.name}" for f in dataclasses.fields(InherConfig)
                    if f.name not in RECIPE_SET_FIELDS) + ("inher_calibration_samples",)


KD_FLAGS = ("kd_alpha", "kd_temperature", "teacher_name_or_path", "kd_hidden_weight")


def changed_flags(args: argparse.Namespace, parser: argparse.ArgumentParser, names: Iterable[str]) -> list[str]:
    """The `--name` flags among `names` set to something other than the parser's default."""
    return [f"--{name}" for name in names if getattr(args, name) != parser.get_default(name)]


def check_common_args(args: argparse.Namespace, parser: argparse.ArgumentParser, run_kind: str) -> None:
    """Cross-flag checks of the shared flags; raises ValueError with the flag names. `run_kind`: "teacher" (dense,
    --no_inher), "inherited" or "student". Nothing given is silently unused: the --inher_* flags describe only an
    inherited model, and the KD flags only a run that distils."""
    if not 0.0 <= args.kd_alpha <= 1.0:
        raise ValueError(f"--kd_alpha must lie in [0, 1], got {args.kd_alpha}.")
    if not args.kd_temperature > 0:
        raise ValueError(f"--kd_temperature must be > 0, got {args.kd_temperature}.")
    if not args.kd_hidden_weight >= 0:
        raise ValueError(f"--kd_hidden_weight must be >= 0, got {args.kd_hidden_weight}.")
    if args.max_grad_norm is not None and not args.max_grad_norm > 0:
        raise ValueError(f"--max_grad_norm must be > 0, got {args.max_grad_norm}.")
    unused = changed_flags(args, parser, INHER_FLAGS) if run_kind != "inherited" else []
    if unused:
        raise ValueError(f"this run does not inherit ({'--no_inher' if run_kind == 'teacher' else 'a student run'}): "
                         f"remove {', '.join(unused)} (options of the inherited model).")
    if run_kind == "inherited" and args.inher_r is not None and args.inher_target_ratio is not None:
        raise ValueError("Give only one of --inher_r and --inher_target_ratio.")
    calibrates = calibration_needed(args.inher_init, rank_allocation_of(args))
    if run_kind == "inherited" and not calibrates and changed_flags(args, parser, ("inher_calibration_samples",)):
        raise ValueError("--inher_calibration_samples is used only by --inher_init whitened or --inher_rank_allocation "
                         "activation; remove it or choose one of those.")
    if run_kind == "teacher":
        unused = changed_flags(args, parser, KD_FLAGS)
        reason = "--no_inher trains the teacher without distillation"
    elif getattr(args, "distill_method", "kd") == "kd" and args.kd_alpha == 0:
        unused = changed_flags(args, parser, ("kd_temperature",) if args.kd_hidden_weight > 0
                               else ("kd_temperature", "teacher_name_or_path"))
        reason = ("--kd_alpha 0 turns the logit term off" if args.kd_hidden_weight > 0
                  else "nothing is distilled with --kd_alpha 0 (and no --kd_hidden_weight)")
    else:
        unused = []
    if unused:
        raise ValueError(f"{reason}: remove {', '.join(unused)}.")


def rank_allocation_of(args: argparse.Namespace) -> str:
    """`--inher_rank_allocation`, or its default: 'activation' with the whitened init and a parameter budget (both
    read the same calibration examples), else 'uniform' (`--inher_r`, or the paper's data-free SVD setting)."""
    if args.inher_rank_allocation is not None:
        return args.inher_rank_allocation
    return "activation" if args.inher_init == "whitened" and args.inher_r is None else "uniform"


def inher_config_from_args(args: argparse.Namespace, task_type: str) -> InherConfig:
    """The `InherConfig` of the `--inher_*` flags (InherConfig validates the values), with the recipe's defaults."""
    fixed: dict[str, Any] = {"task_type": task_type, "rank_allocation": rank_allocation_of(args)}
    if args.inher_r is None and args.inher_target_ratio is None:
        fixed["target_ratio"] = 0.5
    return config_from_flags(args, "recipe", **fixed)
