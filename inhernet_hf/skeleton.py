"""The empty inherited structure a checkpoint describes: the recorded targets of a freshly built (usually
meta-device) model swapped for `InherLinear` layers of the recorded ranks, before any tensor is read."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import InherConfig
from .conv import InherConv2d
from .layer import InherLinear
from .report import InherReport, LayerRecord, dense_param_count
from .targets import dense_weight, is_replaceable

if TYPE_CHECKING:
    from .integration import InherQuantizationConfig

logger = logging.getLogger(__name__)


def new_layer(dense: nn.Module, rank: int, num_heads: int, config: InherConfig) -> InherLinear:
    """An (uninitialised) InherLinear shaped like `dense`, on its device and in its dtype (meta stays meta)."""
    weight = dense_weight(dense)
    if isinstance(dense, nn.Conv2d):
        return InherConv2d(dense, rank, num_heads, config.gate, config.gate_input, config.structure,
                           device=weight.device, dtype=weight.dtype)
    layer = InherLinear(weight.shape[1], weight.shape[0], rank, num_heads, dense.bias is not None, config.gate,
                        config.gate_input, config.structure, device=weight.device, dtype=weight.dtype)
    layer.replaces_conv1d = isinstance(dense, Conv1D)  # what `dequantize` gives back: Conv1D stores W transposed
    return layer


def dense_layer(layer: InherLinear) -> nn.Module:
    """The nn.Linear (Conv1D / Conv2d, if it replaced one) computing exactly `layer` (`InherLinear.dense_equivalent`), in
    the layer's dtype and on its device."""
    weight, bias = layer.dense_equivalent()
    dtype = layer.inher_up.weight.dtype
    device = layer.inher_up.weight.device
    if isinstance(layer, InherConv2d):
        down = layer.inher_down
        dense = nn.Conv2d(down.in_channels, layer.out_features, down.kernel_size, stride=down.stride,
                          padding=down.padding, dilation=down.dilation, bias=bias is not None, device=device,
                          dtype=dtype)
        weight = weight.view_as(dense.weight)
    elif getattr(layer, "replaces_conv1d", False):
        dense = Conv1D(layer.out_features, layer.in_features).to(device=device, dtype=dtype)
        weight = weight.T
    else:
        dense = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    dense.train(layer.training)
    return dense


def densify(model: nn.Module) -> nn.Module:
    """Replace every InherLinear of `model` by its exact dense layer, in place; checks every layer first, so a model
    with one layer that cannot be densified is left untouched."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, InherLinear)}
    refused = {}
    for name, layer in layers.items():
        try:
            layer.dense_equivalent()
        except ValueError as err:
            refused[name] = str(err)
    if refused:
        first = next(iter(refused))
        raise ValueError(f"Cannot dequantize exactly: {len(refused)} of {len(layers)} inherited layers, e.g. "
                         f"{first!r}: {refused[first]}")
    for name, layer in layers.items():
        replace_module(model, name, dense_layer(layer))
    return model


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def rename_layers_for(model: nn.Module, layers: list[dict]) -> list[dict]:
    """The recorded layers under `model`'s module names. Like transformers' own loading, a checkpoint saved with a
    task head loads into its base model (the `base_model_prefix` is dropped) or under another head, and one saved as
    the base model loads under a head (the prefix is added). Layers that a model of another class than the saved one
    does not have (the saved head's own, or a pooler the other head omits) are left out with a warning, as
    transformers reports their unused weights; in the saved class itself, a missing layer is an error later."""
    prefix = getattr(model, "base_model_prefix", "")
    names = dict(model.named_modules())
    if all(spec["name"] in names for spec in layers):
        return layers
    saved_with_head = bool(prefix) and any(spec["name"].startswith(prefix + ".") for spec in layers)
    saved_class = type(model).__name__ in (getattr(getattr(model, "config", None), "architectures", None) or [])
    renamed, dropped = [], []
    for spec in layers:
        name = spec["name"]
        if name in names or not prefix:
            pass
        elif saved_with_head and name.startswith(prefix + ".") and prefix not in names:  # loaded as the base model
            name = name[len(prefix) + 1:]
        elif not saved_with_head and prefix in names:  # a base model's layers, under a head
            name = f"{prefix}.{name}"
        if name not in names and not saved_class:
            dropped.append(spec["name"])
            continue
        renamed.append({**spec, "name": name})
    if dropped:
        logger.warning("Inherited layers %s of the saved model are not part of %s; their weights are not loaded.",
                       dropped, type(model).__name__)
    return renamed


def build_skeleton(model: nn.Module, description: InherQuantizationConfig) -> None:
    """Replace the recorded targets of a freshly built (usually meta-device) model by empty InherLinear layers. The
    description's layer names become the model's own (`rename_layers_for`), so a later save records them."""
    config = InherConfig.from_dict(description.inher_config)
    description.layers = rename_layers_for(model, description.layers)
    for spec in description.inherited_layers():
        name = spec["name"]
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            dense = None
        if dense is None or not is_replaceable(dense):
            raise ValueError(f"config.json records an inherited layer {name!r}, but the model built from it has "
                             f"{'no such module' if dense is None else type(dense).__name__ + ' there'}.")
        replace_module(model, name, new_layer(dense, spec["rank"], spec["num_heads"], config))


def report_from_description(model: nn.Module, description: InherQuantizationConfig) -> InherReport:
    """The report of a loaded model: shapes from its modules, ranks and energies from config.json."""
    rows = []
    for spec in description.layers:
        name = spec["name"]
        module = model.get_submodule(name)
        if isinstance(module, InherLinear):
            in_f, out_f, bias = module.in_features, module.out_features, module.inher_bias is not None
            params = module.num_params()
        else:
            out_f, in_f = dense_weight(module).shape
            bias = module.bias is not None
            params = sum(p.numel() for p in module.parameters())
        dense = dense_param_count(in_f, out_f, bias)
        rows.append(LayerRecord(name, in_f, out_f, bias, spec["rank"], spec["num_heads"], dense,
                                params if spec["rank"] is not None else dense, spec["energy_kept"], spec["note"],
                                spec.get("fit_error")))
    return InherReport(rows)

