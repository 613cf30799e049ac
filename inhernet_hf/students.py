"""Same-size comparisons: a same-family student made of some of the teacher's blocks (DistilBERT-style init) --
`layer_student` for transformers (a subset of the layer stack), `stage_student` for CNNs with `config.depths`
(fewer blocks in each stage) -- and the InherNet target ratio whose model has the same total parameter count as a
given student (or model size)."""

from __future__ import annotations

import copy
from typing import Optional, Sequence

from torch import nn

from .config import InherConfig
from .report import dense_param_count
from .targets import dense_weight, find_targets


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the transformer blocks: the ModuleList with `config.num_hidden_layers` entries."""
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    stacks = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.ModuleList) and len(module) == num_layers]
    if num_layers is None or len(stacks) != 1:
        found = [name for name, _ in stacks]
        raise ValueError(f"cannot find the layer stack of {type(model).__name__}: need exactly one ModuleList with "
                         f"config.num_hidden_layers={num_layers} entries, found {found or 'none'}.")
    return stacks[0]


def evenly_spaced_layers(num_layers: int, keep: int) -> list[int]:
    """`keep` layer indices spread over `num_layers`, starting at 0: 6 -> 3 gives [0, 2, 4] (DistilBERT's choice)."""
    if not 1 <= keep <= num_layers:
        raise ValueError(f"a student keeps between 1 and {num_layers} of the teacher's layers, got {keep}.")
    return [i * num_layers // keep for i in range(keep)]


def layer_student(teacher: nn.Module, num_layers: Optional[int] = None,
                  layers: Optional[Sequence[int]] = None) -> nn.Module:
    """A copy of `teacher` keeping only the blocks `layers` (default: `num_layers` evenly spaced ones), in order;
    every other weight (embeddings, head) is the teacher's. The teacher is not modified."""
    name, stack = layer_stack(teacher)
    if layers is None:
        if num_layers is None:
            raise ValueError("give num_layers or layers.")
        layers = evenly_spaced_layers(len(stack), num_layers)
    layers = list(layers)
    if not layers or sorted(set(layers)) != layers or not all(0 <= i < len(stack) for i in layers):
        raise ValueError(f"layers must be distinct increasing indices in [0, {len(stack) - 1}], got {layers}.")
    student = copy.deepcopy(teacher)
    kept = nn.ModuleList(student.get_submodule(name)[i] for i in layers)
    parent, _, attr = name.rpartition(".")
    setattr(student.get_submodule(parent) if parent else student, attr, kept)
    for new_index, block in enumerate(kept):  # decoder blocks index their KV cache by layer_idx
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    student.config.num_hidden_layers = len(layers)
    if isinstance(getattr(student.config, "layer_types", None), list):
        student.config.layer_types = [student.config.layer_types[i] for i in layers]
    return student


def layer_student_param_count(teacher: nn.Module, num_layers: int) -> int:
    """Parameters of `layer_student(teacher, num_layers)`, without building it: the teacher's minus the dropped
    blocks'."""
    _, stack = layer_stack(teacher)
    kept = set(evenly_spaced_layers(len(stack), num_layers))
    dropped = sum(p.numel() for i, block in enumerate(stack) if i not in kept for p in block.parameters())
    return sum(p.numel() for p in teacher.parameters()) - dropped


def stage_lists(model: nn.Module) -> list[nn.Module]:
    """The block list (`layers`, a Sequential or ModuleList) of each stage of a CNN whose config has `depths`
    (HF ResNet, RegNet, ConvNeXt): the one ModuleList of stages whose i-th stage has `depths[i]` blocks."""
    depths = list(getattr(getattr(model, "config", None), "depths", None) or [])
    found = [stages for _, stages in model.named_modules()
             if isinstance(stages, nn.ModuleList) and len(stages) == len(depths) and depths
             and all(isinstance(getattr(stage, "layers", None), (nn.Sequential, nn.ModuleList))
                     and len(stage.layers) == depth for stage, depth in zip(stages, depths))]
    if len(found) != 1:
        raise ValueError(f"cannot find the stages of {type(model).__name__}: need a config with `depths` and exactly "
                         f"one ModuleList of stages with those many `layers` (depths={depths or None}, found "
                         f"{len(found)}).")
    return [stage.layers for stage in found[0]]


def _kept_blocks(teacher: nn.Module, depths: Sequence[int]) -> list[list[int]]:
    stages = stage_lists(teacher)
    depths = list(depths)
    if len(depths) != len(stages) or not all(1 <= d <= len(s) for d, s in zip(depths, stages)):
        raise ValueError(f"a stage student keeps between 1 and the teacher's blocks in each of its {len(stages)} "
                         f"stages (teacher depths {[len(s) for s in stages]}), got depths {depths}.")
    return [evenly_spaced_layers(len(s), d) for s, d in zip(stages, depths)]


def stage_student(teacher: nn.Module, depths: Sequence[int]) -> nn.Module:
    """A copy of a CNN `teacher` keeping `depths[i]` evenly spaced blocks of stage i (always its first, which changes
    the width and stride); the stem, the head and every kept block are the teacher's. The teacher is not modified."""
    kept = _kept_blocks(teacher, depths)
    student = copy.deepcopy(teacher)
    for stage, keep in zip(stage_lists(student), kept):
        blocks = list(stage)
        for index in reversed(range(len(blocks))):
            if index not in keep:
                del stage[index]
    student.config.depths = [len(keep) for keep in kept]
    return student


def stage_student_param_count(teacher: nn.Module, depths: Sequence[int]) -> int:
    """Parameters of `stage_student(teacher, depths)`, without building it."""
    kept = _kept_blocks(teacher, depths)
    dropped = sum(p.numel() for stage, keep in zip(stage_lists(teacher), kept) for i, block in enumerate(stage)
                  if i not in keep for p in block.parameters())
    return sum(p.numel() for p in teacher.parameters()) - dropped


def targeted_param_count(model: nn.Module, config: InherConfig) -> int:
    """Parameters (weights and biases) of the dense layers `config` targets in `model`."""
    names = find_targets(model, config)
    total = 0
    for name in names:
        module = model.get_submodule(name)
        out_features, in_features = dense_weight(module).shape
        total += dense_param_count(in_features, out_features, getattr(module, "bias", None) is not None)
    return total


def matched_target_ratio(model: nn.Module, num_params: int, config: Optional[InherConfig] = None) -> float:
    """The `target_ratio` at which `get_inher_model(model, config)` has `num_params` parameters in total: the
    untargeted parameters stay, the targeted ones shrink to the ratio (realised at or below it, within 1%), so the
    inherited model is never larger than the student it is matched to."""
    config = config or InherConfig(target_ratio=0.5)  # only the target modules matter here
    total = sum(p.numel() for p in model.parameters())
    targeted = targeted_param_count(model, config)
    ratio = (num_params - (total - targeted)) / targeted
    if not 0 < ratio <= 1:
        raise ValueError(f"{num_params:,} parameters cannot be reached by inheritance: the model has {total:,}, of "
                         f"which {total - targeted:,} are not targeted (ratio would be {ratio:.3f}).")
    return ratio
