"""Plain-transformers loading: a quantization config/quantizer pair registered through transformers' public hooks.

An inherited model's `config.json` carries `quantization_config = {"quant_method": "inhernet", ...}` with the
rank of every targeted layer. After `import inhernet_hf`, `AutoModelFor*.from_pretrained` finds our quantizer,
which swaps the targets for empty `InherLinear` skeletons on the meta device (no dense weight is allocated,
no SVD recomputed) and checks the checkpoint's safetensors headers before any tensor is read.
"""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Any, Optional

from safetensors import safe_open
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "inhernet"
FORMAT_VERSION = 1

# Set by `InherModel.from_pretrained(..., use_safetensors=False)`: the one explicit way to read a pickle.
ALLOW_PICKLE = contextvars.ContextVar("inhernet_allow_pickle", default=False)
# Set by `InherModel.from_pretrained(..., key_mapping=...)`: transformers does not pass it to quantizers.
KEY_MAPPING = contextvars.ContextVar("inhernet_key_mapping", default=None)


@register_quantization_config(QUANT_METHOD)
class InherQuantizationConfig(QuantizationConfigMixin):
    """The inheritance description stored in `config.json`.

    Args:
        inher_config: `InherConfig.to_dict()` of the run that produced the model.
        layers: every targeted module, in model order (a list: config.json is written with sorted keys):
            {"name": str, "rank": int or None (kept dense), "num_heads": int, "energy_kept": float or None, "note": str}.
        base_model_name_or_path: the teacher the model inherited from (Hub id or path), for the model card.
        format_version: layout version of this description; a newer one than this library knows is refused.
        library_version: `inhernet_hf.__version__` that wrote it.
    """

    def __init__(
        self,
        inher_config: dict[str, Any],
        layers: list[dict[str, Any]],
        base_model_name_or_path: Optional[str] = None,
        format_version: int = FORMAT_VERSION,
        library_version: Optional[str] = None,
        quant_method: str = QUANT_METHOD,
        **kwargs,
    ) -> None:
        if not isinstance(format_version, int) or format_version > FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint was written in inhernet_hf format version {format_version!r} (by inhernet_hf "
                f"{library_version}); this inhernet_hf reads versions up to {FORMAT_VERSION}. Upgrade inhernet_hf."
            )
        if kwargs:
            raise ValueError(f"Unknown fields {sorted(kwargs)} in the inhernet quantization_config of format "
                             f"version {format_version}; the file is corrupt or was edited by hand.")
        self.quant_method = quant_method
        self.format_version = format_version
        self.library_version = library_version
        self.inher_config = inher_config
        self.layers = layers
        self.base_model_name_or_path = base_model_name_or_path

    def inherited_layers(self) -> list[dict[str, Any]]:
        return [spec for spec in self.layers if spec["rank"] is not None]


@register_quantizer(QUANT_METHOD)
class InherHfQuantizer(HfQuantizer):
    """Builds the inherited skeleton before transformers loads the weights; nothing to do afterwards."""

    requires_calibration = False

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from .model import build_skeleton

        build_skeleton(model, self.quantization_config)
        if checkpoint_files:
            check_checkpoint(model, checkpoint_files)
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def checkpoint_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Checkpoint tensor name -> the model parameter it loads into, renamed as transformers renames it on load
    (the legacy layouts that LLaVA, Qwen2-VL or ViT checkpoints are saved in; a base-model prefix added or
    stripped when a checkpoint of another head is loaded)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model, key_mapping=KEY_MAPPING.get())
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None)
    meta = model.state_dict()  # the skeleton's parameters are on the meta device: no data
    names = {}
    for key in sorted(keys, key=dot_natural_key):  # transformers' order: some renamings depend on it
        renamed, _ = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in meta and key in meta:  # transformers' own fallback: the key needed no renaming
            renamed, _ = rename_source_key(key, [], [], prefix, meta)
        names[key] = renamed
    return names


def check_checkpoint(model: nn.Module, checkpoint_files: list[str]) -> None:
    """Compare the checkpoint's tensor names and shapes (read from the safetensors headers, no data) with the
    inherited layers of `model`. Missing, extra or wrongly shaped tensors raise a ValueError naming them."""
    from .layer import InherLinear

    pickles = [f for f in checkpoint_files if not str(f).endswith(".safetensors")]
    if pickles and not ALLOW_PICKLE.get():
        raise ValueError(
            f"Refusing to unpickle {[Path(f).name for f in pickles]}: inhernet_hf checkpoints are safetensors. "
            f"To load a pickle you trust, call InherModel.from_pretrained(..., use_safetensors=False)."
        )
    stored = {}  # name in the checkpoint -> shape
    for file in checkpoint_files:
        if str(file).endswith(".safetensors"):
            with safe_open(str(file), framework="pt") as f:
                stored.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    if not stored:
        return  # only trusted pickles: transformers reports their keys itself
    shapes = {target: (key, stored[key]) for key, target in checkpoint_names(model, list(stored)).items()}
    problems = []
    for name, module in model.named_modules():
        if not isinstance(module, InherLinear):
            continue
        for dense_param in ("weight", "bias"):
            if f"{name}.{dense_param}" in shapes:
                key, shape = shapes[f"{name}.{dense_param}"]
                problems.append(f"extra tensor {key} {shape}: a dense parameter where config.json records "
                                f"an inherited layer")
        expected = {f"{name}.{p}": tuple(t.shape) for p, t in module.named_parameters()}
        for tensor, shape in expected.items():
            if tensor not in shapes:
                problems.append(f"missing tensor {tensor} (expected shape {shape})")
            elif shapes[tensor][1] != shape:
                problems.append(f"tensor {shapes[tensor][0]} has shape {shapes[tensor][1]} in the checkpoint, "
                                f"{shape} in the model built from config.json")
        for tensor, (key, shape) in shapes.items():
            if tensor.startswith(name + ".inher_") and tensor not in expected:
                problems.append(f"extra tensor {key} {shape} not in the inherited layer {name}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... ({len(problems)} in all)" if len(problems) > 20 else "")
        raise ValueError(f"The checkpoint does not match the inheritance recorded in config.json:\n  {shown}\n"
                         f"(A checkpoint whose keys need a key_mapping loads with InherModel.from_pretrained(..., "
                         f"key_mapping=...): transformers does not pass key_mapping on to the check.)")
