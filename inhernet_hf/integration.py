"""Loading with plain transformers, loud or right: our own `model_type`, and a quantizer registered through
transformers' public hooks.

An inherited model's `config.json` says `"model_type": "inhernet_hf"` (the base model's type, e.g. "bert", is kept
under `inher_base_model_type`) and carries `quantization_config = {"quant_method": "inhernet", ...}` with the rank of
every targeted layer. In a process that never imported this package, transformers does not know that model type, so
every `AutoConfig` / `AutoModel*` / `pipeline()` load raises, naming `inhernet_hf`, whatever `trust_remote_code` says
(it cannot quietly build the dense model with random layers, as it would for an unknown `quant_method`). After
`import inhernet_hf`, `AutoConfig` reads such a config as the base model's own config class, so everything downstream
sees an ordinary `BertConfig`/`LlamaConfig`, and `from_pretrained` finds our quantizer, which swaps the targets for
empty `InherLinear` skeletons on the meta device (no dense weight allocated, no SVD recomputed) and checks the
checkpoint's safetensors headers before any tensor is read. Saving an inherited model, by any route
(`save_pretrained`, `push_to_hub`, Trainer), writes that model type.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .config import QUANT_METHOD, InherConfig
from .layer import InherLinear
from .skeleton import build_skeleton, densify, report_from_description

MODEL_TYPE = "inhernet_hf"  # config.json's model_type: unknown to transformers unless this package is imported
BASE_MODEL_TYPE_KEY = "inher_base_model_type"  # config.json: the base model's own model_type
# 1: model_type of the base model (loads silently wrong without this package); 2: model_type "inhernet_hf".
FORMAT_VERSION = 2
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names
logger = logging.getLogger(__name__)

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
            {"name": str, "rank": int or None (kept dense), "num_heads": int, "energy_kept": float or None,
            "note": str}, plus "fit_error": float for layers whose heads were fitted (head_init="fitted").
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
        if format_version < FORMAT_VERSION:
            logger.warning("This checkpoint is in inhernet_hf's older format %d: it loads, but a process without "
                           "inhernet_hf loads it as a dense model with random layers. Save it again (save_pretrained) "
                           "to write format %d, which such a process refuses.", format_version, FORMAT_VERSION)
        self.quant_method = quant_method
        self.format_version = FORMAT_VERSION  # what a save of the loaded model writes
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
        if model.config.__dict__.pop(BASE_MODEL_TYPE_KEY, None) is not None:
            # A concrete class's own config reader (BertConfig.from_pretrained) set config.json's model_type as an
            # instance attribute, shadowing the class's; transformers picks key renamings by it.
            model.config.__dict__.pop("model_type", None)
        build_skeleton(model, self.quantization_config)
        if checkpoint_files:
            check_checkpoint(model, checkpoint_files)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        """Check the loaded values and make the model an `InherModel` (`get_inher_model` runs this too, through
        `attach_description`)."""
        from .model import make_inherited

        check_finite(model)
        description = self.quantization_config
        make_inherited(model, InherConfig.from_dict(description.inher_config),
                       report_from_description(model, description))
        return model

    def _dequantize(self, model, dtype=None):
        """`model.dequantize()`: every InherLinear becomes the dense layer computing it exactly (M = 1, gate "none" or
        identical heads), or nothing changes and a ValueError says which layer cannot. Each dense layer keeps its
        InherLinear's dtype (transformers passes the config's dtype, which need not be the loaded one)."""
        from .model import make_dense

        densify(model)
        make_dense(model)
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """The inherited factors are ordinary float parameters: the whole model trains, no adapter needed (HF Trainer
        refuses a "quantized" model without adapters unless this holds)."""
        return True

    @property
    def is_compileable(self) -> bool:
        return True


class InherAutoConfig(PreTrainedConfig):
    """What `AutoConfig` resolves `model_type: "inhernet_hf"` to: `from_dict` returns the base model's own config
    (its class from `inher_base_model_type`), so the AutoModel* classes, pipelines and tools see the base
    architecture, and the `quantization_config` it carries brings in `InherHfQuantizer`."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        base = config_dict.get(BASE_MODEL_TYPE_KEY)
        if base not in CONFIG_MAPPING:
            raise ValueError(f"This inhernet_hf config.json names base model type {base!r} under "
                             f"{BASE_MODEL_TYPE_KEY!r}, which transformers does not know; the file is corrupt, or "
                             f"was written for a newer transformers.")
        base_dict = {k: v for k, v in config_dict.items() if k != BASE_MODEL_TYPE_KEY}
        return CONFIG_MAPPING[base].from_dict({**base_dict, "model_type": base}, **kwargs)


def _writes_inherited_model_type(to_json_string):
    """Wrap `PreTrainedConfig.to_json_string` (what config.json is written from): a config that carries our
    quantization_config is written with model_type "inhernet_hf", its own model type kept beside it."""

    @functools.wraps(to_json_string)
    def wrapper(self, use_diff: bool = True) -> str:
        text = to_json_string(self, use_diff)
        description = getattr(self, "quantization_config", None)
        method = description.get("quant_method") if isinstance(description, dict) else getattr(description,
                                                                                               "quant_method", None)
        if method != QUANT_METHOD:
            return text
        data = json.loads(text)
        data[BASE_MODEL_TYPE_KEY] = self.model_type
        data["model_type"] = MODEL_TYPE
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    wrapper.inhernet_wrapped = True
    return wrapper


def register_model_type() -> None:
    """Teach transformers model_type "inhernet_hf" (reading) and make inherited configs write it (saving)."""
    if MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(MODEL_TYPE, InherAutoConfig)
    if not getattr(PreTrainedConfig.to_json_string, "inhernet_wrapped", False):
        PreTrainedConfig.to_json_string = _writes_inherited_model_type(PreTrainedConfig.to_json_string)


register_model_type()


def check_finite(model: nn.Module) -> None:
    """Raise ValueError naming every inherited tensor that holds NaN or Inf after loading (meta tensors, offloaded
    by a device_map, are skipped)."""
    bad = [f"{name}.{p}" for name, module in model.named_modules() if isinstance(module, InherLinear)
           for p, t in module.named_parameters() if t.device.type != "meta" and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"The checkpoint's inherited tensors {bad[:10]}{' ...' if len(bad) > 10 else ''} hold NaN "
                         f"or Inf values: the file is damaged, or the model diverged before it was saved.")


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
    pickles = [f for f in checkpoint_files if not str(f).endswith(".safetensors")]
    if pickles and not ALLOW_PICKLE.get():
        raise ValueError(
            f"Refusing to unpickle {[Path(f).name for f in pickles]}: inhernet_hf checkpoints are safetensors. "
            f"To load a pickle you trust, call InherModel.from_pretrained(..., use_safetensors=False)."
        )
    stored, dtypes = {}, {}  # name in the checkpoint -> shape, dtype
    for file in checkpoint_files:
        if str(file).endswith(".safetensors"):
            try:
                with safe_open(str(file), framework="pt") as f:
                    for k in f.keys():
                        stored[k], dtypes[k] = tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()
            except SafetensorError as err:
                raise ValueError(f"{file} is not a complete safetensors file ({err}): the download or copy was cut "
                                 f"short or the file is damaged. Delete it and fetch or copy it again.") from None
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
            elif dtypes[shapes[tensor][0]] not in FLOAT_DTYPES:
                problems.append(f"tensor {shapes[tensor][0]} is stored as {dtypes[shapes[tensor][0]]}; an inherited "
                                f"layer's tensors are floating point ({', '.join(FLOAT_DTYPES)})")
        for tensor, (key, shape) in shapes.items():
            if tensor.startswith(name + ".inher_") and tensor not in expected:
                problems.append(f"extra tensor {key} {shape} not in the inherited layer {name}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... ({len(problems)} in all)" if len(problems) > 20 else "")
        raise ValueError(f"The checkpoint does not match the inheritance recorded in config.json:\n  {shown}\n"
                         f"(A checkpoint whose keys need a key_mapping loads with InherModel.from_pretrained(..., "
                         f"key_mapping=...): transformers does not pass key_mapping on to the check.)")
