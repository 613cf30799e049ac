"""Which modules of a model are inherited: PEFT's `target_modules` semantics plus per-model defaults."""

from __future__ import annotations

import re
from typing import Optional, Union

from peft.utils.constants import SEQ_CLS_HEAD_NAMES
from torch import nn
from transformers.pytorch_utils import Conv1D

_BERT_LIKE = ["query", "key", "value", "output.dense", "intermediate.dense"]
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_CLIP_LIKE = ["q_proj", "k_proj", "v_proj", "self_attn.out_proj", "fc1", "fc2"]

# Default targets per `config.model_type`: the attention and MLP projections, never embeddings,
# classification heads, lm_head or multimodal projectors. Lists use PEFT's exact-or-dotted-suffix rule.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    # ViT was rewritten in transformers 5.x: `layers.N.attention.{q,k,v,o}_proj` and `layers.N.mlp.fc1/fc2`
    # (older 5.x releases used the BERT names, kept so both layouts work; neither matches the pooler/classifier).
    "vit": _BERT_LIKE + ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                         "mlp.fc1", "mlp.fc2"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "ffn.lin1", "ffn.lin2"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "self_attn.out_proj", "fc1", "fc2"],
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "t5": ["SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o",
           "EncDecAttention.q", "EncDecAttention.k", "EncDecAttention.v", "EncDecAttention.o",
           "DenseReluDense.wi", "DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo"],
    "clip": _CLIP_LIKE,
    "siglip": _CLIP_LIKE,
    # llava: a llama-like language model and a CLIP/SigLIP vision tower; `multi_modal_projector` and lm_head stay dense.
    "llava": _LLAMA_LIKE + ["self_attn.out_proj", "mlp.fc1", "mlp.fc2"],
    # Qwen-VL: the vision blocks use attn.qkv / attn.proj and an MLP (fc1/fc2 in Qwen2-VL, *_proj in Qwen2.5-VL);
    # the patch merger (`merger.mlp.*`) and lm_head stay dense.
    "qwen2_vl": _LLAMA_LIKE + ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"],
    "qwen2_5_vl": _LLAMA_LIKE + ["attn.qkv", "attn.proj"],
}

# Never taken by "all-linear": multimodal projectors and vision-language pooling heads.
PROJECTOR_NAMES = ("multi_modal_projector", "merger", "visual_projection", "text_projection", "mm_projector")

TargetSpec = Optional[Union[str, list[str]]]


def is_replaceable(module: nn.Module) -> bool:
    """A dense layer InherLinear can replace: exactly `nn.Linear` or transformers' `Conv1D`."""
    return type(module) in (nn.Linear, Conv1D)


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


def resolve_target_spec(model: nn.Module, target_modules: TargetSpec) -> TargetSpec:
    """The spec to use: the user's, or the model type's default (an error if there is none)."""
    if target_modules is not None:
        return target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"No default target_modules for model_type={model_type!r}. Pass `target_modules` to InherConfig: a "
            f"list such as ['q_proj', 'v_proj'], a regex, or 'all-linear'. Models with defaults: "
            f"{', '.join(sorted(DEFAULT_TARGET_MODULES))}."
        )
    return DEFAULT_TARGET_MODULES[model_type]


def find_targets(
    model: nn.Module,
    target_modules: TargetSpec,
    exclude_modules: TargetSpec = None,
    modules_to_save: Optional[list[str]] = None,
    task_type: Optional[str] = None,
) -> list[str]:
    """Full names of the modules to inherit, in `named_modules` order.

    Raises if nothing matches (listing the Linear layers that exist) or if a matched module is not a
    plain `nn.Linear`/`Conv1D` (quantised layers, embeddings, convolutions...).
    """
    spec = resolve_target_spec(model, target_modules)
    keep_dense = list(modules_to_save or [])
    if task_type == "SEQ_CLS":
        keep_dense += [n for n in SEQ_CLS_HEAD_NAMES if n not in keep_dense]
    all_linear = spec == "all-linear"
    skipped = _all_linear_excluded(model) if all_linear else set()
    targets = []
    for name, module in model.named_modules():
        if not name or matches(exclude_modules, name) or matches(keep_dense, name):
            continue
        if any(matches(keep_dense, prefix) for prefix in _prefixes(name)):
            continue  # inside a module kept dense
        if all_linear:
            if isinstance(module, (nn.Linear, Conv1D)) and name not in skipped:
                targets.append(name)
        elif matches(spec, name):
            targets.append(name)
    if not targets:
        names = _linear_names(model)
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
        raise ValueError(
            f"target_modules={spec!r} matched no module (after exclude_modules={exclude_modules!r}). "
            f"Linear layers in this model: {shown or 'none'}."
        )
    for name in targets:
        module = model.get_submodule(name)
        if not is_replaceable(module):
            raise TypeError(
                f"Module {name!r} of type {type(module).__module__}.{type(module).__name__} matched "
                f"target_modules but cannot be inherited: only torch.nn.Linear and transformers Conv1D "
                f"(unquantised) are supported. Narrow `target_modules` or add it to `exclude_modules`."
            )
    return targets


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def dense_weight(module: nn.Module):
    """The weight as (out, in), whatever the layer's storage convention (Conv1D stores (in, out))."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight
