"""Which modules of a model are inherited: PEFT's `target_modules` semantics, and defaults read from the model's
structure (the Linear layers of its repeated blocks)."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Optional, Union

from peft.utils.constants import SEQ_CLS_HEAD_NAMES
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from transformers.pytorch_utils import Conv1D

if TYPE_CHECKING:
    from .config import InherConfig

logger = logging.getLogger(__name__)

# Never taken by default or by "all-linear": multimodal projectors and vision-language pooling heads.
PROJECTOR_NAMES = ("multi_modal_projector", "merger", "visual_projection", "text_projection", "mm_projector")
# A Linear inside a block whose own name ends in one of these routes tokens (MoE routers, Qwen2-MoE's
# `shared_expert_gate`): a router is not a projection and its output is an argmax, never low-rank.
_ROUTER_NAME = re.compile(r"(^|_)(gate|router)$")

# Model types where the structural rule below would pick the wrong layers. Empty today: every model type tested
# (tests/test_model_types.py) is covered by the rule; add an entry here only with a test showing why.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {}

TargetSpec = Optional[Union[str, list[str]]]


def is_replaceable(module: nn.Module) -> bool:
    """A dense layer InherLinear can replace: `nn.Linear` (or a subclass computing the same x Wᵀ + b: one that keeps
    Linear's forward, or Falcon's bias-split `FalconLinear`), transformers' `Conv1D`, or (as InherConv2d) an
    `nn.Conv2d` with groups = 1. Subclasses with their own forward (MoE routers, quantised layers such as
    bitsandbytes') are not."""
    kind = type(module)
    if kind is Conv1D:
        return True
    if kind is nn.Conv2d:  # InherConv2d: dense convolutions only, never depthwise or grouped ones
        return module.groups == 1 and module.padding_mode == "zeros"
    if kind is NonDynamicallyQuantizableLinear:  # MultiheadAttention.out_proj: its weight is read, never called
        return False
    return isinstance(module, nn.Linear) and (kind.forward is nn.Linear.forward or kind.__name__ == "FalconLinear")


def matches(spec: TargetSpec, name: str) -> bool:
    """PEFT's rule: a string is a regex for the full name, a list matches exact names or dotted suffixes."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def _all_linear_excluded(model: nn.Module) -> set[str]:
    """Names that "all-linear" skips: output embeddings, classifier heads, projectors, MultiheadAttention parts."""
    excluded = set()
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if module is output_embeddings and output_embeddings is not None:
            excluded.add(name)
        elif any(part in PROJECTOR_NAMES for part in name.split(".")):
            excluded.add(name)
        elif any(part in SEQ_CLS_HEAD_NAMES for part in name.split(".")):  # the head and its layers (RoBERTa's)
            excluded.add(name)
        elif last in ("qa_outputs", "pre_classifier"):
            excluded.add(name)
        if isinstance(module, nn.MultiheadAttention):
            excluded.update(f"{name}.{child}" for child, _ in module.named_modules() if child)
    return excluded


def block_lists(model: nn.Module) -> list[str]:
    """Names of the model's block lists: the outermost `nn.ModuleList`s of blocks (modules that are not themselves
    Linear, of one class or several as in hybrid attention/SSM stacks) holding a Linear/Conv1D, e.g.
    `model.layers`, `encoder.layer`, `visual.blocks`."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(outer + ".") for outer in found):
            continue  # inside a block already found (T5's `block.N.layer`, expert lists)
        if not any(is_replaceable(item) for item in module) and any(
                is_replaceable(m) for item in module for m in item.modules()):
            found.append(name)
    return found


def infer_target_modules(model: nn.Module) -> str:
    """The default targets read from the model's structure, as a PEFT regex over full names: every Linear/Conv1D
    inside the repeated blocks (attention and MLP projections, cross-attention, shared experts), never routers,
    projectors or heads, and nothing outside the blocks (embeddings, poolers, output heads, patch mergers)."""
    lists = block_lists(model)
    skipped = _all_linear_excluded(model)
    inner: dict[str, set[str]] = {name: set() for name in lists}
    for name, module in model.named_modules():
        if not is_replaceable(module) or name in skipped or _ROUTER_NAME.search(name.rsplit(".", 1)[-1]):
            continue
        for outer in lists:
            rest = re.match(re.escape(outer) + r"\.\d+\.(.+)", name)
            if rest:
                inner[outer].add(rest.group(1))
    parts = [f"{re.escape(outer)}\\.\\d+\\.({'|'.join(map(re.escape, sorted(names)))})"
             for outer, names in inner.items() if names]
    if not parts:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(f"Could not infer default target_modules for model_type={model_type!r}: it has no list of "
                         f"repeated blocks holding Linear/Conv1D layers. Pass `target_modules` to InherConfig: a list "
                         f"such as ['q_proj', 'v_proj'], a regex, or 'all-linear'.")
    return "|".join(parts) if len(parts) == 1 else "|".join(f"(?:{p})" for p in parts)


def resolve_target_spec(model: nn.Module, target_modules: TargetSpec) -> TargetSpec:
    """The spec to use: the user's, the model type's entry in DEFAULT_TARGET_MODULES, or the inferred one."""
    if target_modules is not None:
        return target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[model_type]
    spec = infer_target_modules(model)
    logger.info("target_modules inferred from the repeated blocks of this %s model: %s", model_type, spec)
    return spec


def find_targets(model: nn.Module, config: "InherConfig", target_spec: TargetSpec = None) -> list[str]:
    """Full names of the modules `config` inherits, in `named_modules` order: its target_modules (or `target_spec`,
    already resolved; default: `resolve_target_spec`) minus exclude_modules and modules_to_save, restricted to the
    blocks `layers_to_transform` names.

    Raises if nothing matches (listing the Linear layers that exist), if a listed layer index does not exist, or if a
    matched module is not a plain `nn.Linear`/`Conv1D` (quantised layers, embeddings, convolutions...).
    """
    spec = target_spec if target_spec is not None else resolve_target_spec(model, config.target_modules)
    keep_dense = list(config.modules_to_save or [])
    if config.task_type == "SEQ_CLS":
        keep_dense += [n for n in SEQ_CLS_HEAD_NAMES if n not in keep_dense]
    all_linear = spec == "all-linear"
    skipped = _all_linear_excluded(model) if all_linear else set()
    targets = []
    for name, module in model.named_modules():
        if not name or matches(config.exclude_modules, name) or matches(keep_dense, name):
            continue
        if any(matches(keep_dense, prefix) for prefix in _prefixes(name)):
            continue  # inside a module kept dense
        if all_linear:
            if is_replaceable(module) and not isinstance(module, nn.Conv2d) and name not in skipped:
                targets.append(name)
        elif matches(spec, name):
            targets.append(name)
    if targets and config.layers_to_transform is not None:
        targets = _in_layers(targets, config.layers_to_transform, config.layers_pattern)
    if not targets:
        names = _linear_names(model)
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
        raise ValueError(
            f"target_modules={spec!r} matched no module (after exclude_modules={config.exclude_modules!r}). "
            f"Linear layers in this model: {shown or 'none'}."
        )
    for name in targets:
        module = model.get_submodule(name)
        if not is_replaceable(module):
            raise TypeError(
                f"Module {name!r} of type {type(module).__module__}.{type(module).__name__} matched "
                f"target_modules but cannot be inherited: only torch.nn.Linear, transformers Conv1D (unquantised) "
                f"and nn.Conv2d with groups=1 are supported. Narrow `target_modules` or add it to `exclude_modules`."
            )
    return targets


def layer_index(name: str, layers_pattern: Optional[list[str]]) -> Optional[int]:
    """PEFT's layer index of a module name: the number after one of `layers_pattern` (`model.layers.3.mlp` -> 3),
    or without a pattern the first numbered segment; None if there is none."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name) or re.match(r"[^.]*\.(?P<idx>\d+)\.", name)
        return int(match["idx"]) if match else None
    for pattern in layers_pattern:
        match = re.match(rf"(?:^|.*?\.){re.escape(pattern)}\.(?P<idx>\d+)\.", name)
        if match:
            return int(match["idx"])
    return None


def _in_layers(targets: list[str], layers: list[int], layers_pattern: Optional[list[str]]) -> list[str]:
    """The targets inside the listed blocks; every listed index must exist."""
    index = {name: layer_index(name, layers_pattern) for name in targets}
    present = sorted({i for i in index.values() if i is not None})
    absent = sorted(set(layers) - set(present))
    if absent:
        where = f"layers_pattern={layers_pattern!r}" if layers_pattern else "the first numbered segment"
        raise ValueError(f"layers_to_transform={layers} names layer indices {absent} that no target has (read from "
                         f"{where}); the targets' layer indices are {present or 'none'}.")
    return [name for name in targets if index[name] in layers]


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def dense_weight(module: nn.Module):
    """The weight as (out, in), whatever the layer's storage convention: Conv1D stores (in, out), a Conv2d kernel
    (out, in, k, k) is the map (out, in·k·k) on unfolded patches."""
    if isinstance(module, Conv1D):
        return module.weight.T
    return module.weight.flatten(1) if isinstance(module, nn.Conv2d) else module.weight
