"""`InherConfig`: what to inherit, at which rank, and how to initialise it (PEFT-style dataclass)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args

from peft import TaskType

Init = Literal["svd", "svd_lowrank", "whitened", "random"]
RankAllocation = Literal["uniform", "energy", "activation"]
HeadInit = Literal["balanced", "paper", "demo", "fitted"]
Gate = Literal["softmax", "none"]
GateInput = Literal["latent", "input"]
Structure = Literal["asymmetric", "symmetric"]
INIT_CHOICES = get_args(Init)
RANK_ALLOCATION_CHOICES = get_args(RankAllocation)
HEAD_INIT_CHOICES = get_args(HeadInit)
GATE_CHOICES = get_args(Gate)
GATE_INPUT_CHOICES = get_args(GateInput)
STRUCTURE_CHOICES = get_args(Structure)
TASK_TYPE_CHOICES = tuple(t.value for t in TaskType)
CONFIG_NAME = "inher_config.json"
QUANT_METHOD = "inhernet"  # the quantization_config.quant_method of inherited checkpoints
logger = logging.getLogger(__name__)


def calibration_needed(init: str, rank_allocation: Optional[str]) -> bool:
    """Whether this init and rank allocation read calibration data (the whitened init, activation ranks)."""
    return init == "whitened" or rank_allocation == "activation"


def _check_choice(name: str, value: Any, allowed: tuple, owner: str = "InherConfig") -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}.")


def _check_rank_or_ratio(name: str, value: Any) -> None:
    """A rank is an int >= 1; a ratio is a float in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} must be an int rank (>= 1) or a float ratio in (0, 1].")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{name}={value} is not a valid rank; a rank must be an int >= 1.")
    elif not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"{name}={value} is not a valid ratio; a ratio must lie in (0, 1].")


def _check_module_names(name: str, value: Any, allow_all_linear: bool) -> None:
    if value is None:
        return
    if isinstance(value, str):
        if value == "all-linear" and allow_all_linear:
            return
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"InherConfig.{name}={value!r} is not a valid regular expression: {err}.") from None
        return
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) and v for v in value):
        raise TypeError(
            f"InherConfig.{name}={value!r} must be a regex string"
            + (", 'all-linear'" if allow_all_linear else "")
            + " or a list of module names."
        )


@dataclass
class InherConfig:
    """Configuration of an inherited (InherNet) model.

    Each targeted weight W (out x in) becomes `y = sum_m g_m(h) (W_u^m h + b)` with `h = W_d x`,
    `W_d` (r x in) shared and M heads `W_u^m` (out x r), initialised from the truncated SVD of W.
    Give exactly one of `r` (one rank for every target) and `target_ratio` (fraction of the targeted
    layers' parameters to keep).
    """

    r: Optional[int] = field(
        default=None, metadata={"help": "Rank of every inherited layer. Exactly one of `r` and `target_ratio`."}
    )
    target_ratio: Optional[float] = field(
        default=None,
        metadata={
            "help": "Fraction in (0, 1] of the targeted layers' dense parameters that the inherited layers keep, "
            "counting everything they hold (down-projection, heads, head biases, gate). Exactly one of `r` and "
            "`target_ratio`. Never exceeded: with rank_allocation='uniform' each layer shape gets one rank, the "
            "nearest allowed one, and shapes rounded up go down one `rank_multiple` step while the total is above it."
        },
    )
    num_heads: int = field(default=2, metadata={"help": "Number M of up-projection heads mixed by the gate."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Modules to inherit. A string is a regex matched against the full module name (re.fullmatch); "
            "a list matches exact names or dotted suffixes; 'all-linear' takes every Linear/Conv1D except the "
            "output embeddings, classification heads and multimodal projectors. None: every Linear/Conv1D inside the "
            "model's repeated blocks (attention and MLP projections), read from its structure."
        },
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={
            "help": "Only inherit the targets in these blocks: the layer index in the module name (model.layers.3.* "
            "is 3), read after `layers_pattern`. An int is one index. As in PEFT; every index must exist."
        },
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "With `layers_to_transform`: the name(s) of the block list holding the index ('layers', 'h', "
            "'block', ...). None: the first numbered segment of each module name."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Modules never to inherit, same matching rules as `target_modules`; wins over it."},
    )
    rank_pattern: dict[str, Union[int, float]] = field(
        default_factory=dict,
        metadata={
            "help": "Per-module overrides: regex (matched against the end of the module name, as in PEFT) -> "
            "int rank or float ratio in (0, 1]. The first matching key wins."
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Modules kept dense and trainable, never inherited (e.g. the classifier). For task_type "
            "'SEQ_CLS' the classification head ('classifier', 'score') is always kept."
        },
    )
    rank_allocation: RankAllocation = field(
        default="uniform",
        metadata={
            "help": "How `target_ratio` becomes per-layer ranks: 'uniform' (one rank per layer shape), 'energy' "
            "(greedy on the weights' singular spectra under the global parameter budget: each rank scored by the "
            "share of its layer's energy it keeps) or 'activation' (greedy on the loss each rank saves to second "
            "order: the output error it removes on calibration data, sigma_k(W L)^2, times the layer's Fisher "
            "scalar, its mean squared loss gradient per output; needs `calibration_data` and a model with logits)."
        },
    )
    min_rank: int = field(default=1, metadata={"help": "Smallest rank any inherited layer gets."})
    rank_multiple: int = field(
        default=1,
        metadata={
            "help": "Ranks are multiples of this. 16 keeps each latent row on 64-byte boundaries, which GEMMs favour on "
            "AVX-512 CPUs (float32) and tensor cores (bfloat16): recipes/speed.py measures it."
        },
    )
    init: Init = field(
        default="svd",
        metadata={
            "help": "'svd' (exact torch.linalg.svd), 'svd_lowrank' (randomised, see `svd_niter`), 'whitened' "
            "(activation-aware: the rank-r layer that minimises the output error on `calibration_data`, SVD-LLM "
            "style) or 'random' (same structure, Kaiming init: the paper's 'w.o. SVD' ablation)."
        },
    )
    calibration_damping: float = field(
        default=0.0,
        metadata={
            "help": "For init='whitened' / rank_allocation='activation': added to the diagonal of the calibration "
            "inputs' second moment X^T X, as a fraction of its mean diagonal."
        },
    )
    svd_niter: int = field(default=4, metadata={"help": "Subspace iterations of init='svd_lowrank'."})
    head_init: HeadInit = field(
        default="balanced",
        metadata={
            "help": "'balanced': W_d = S^1/2 V^T, every head U S^1/2, so the layer computes W_r x + b at init; "
            "'paper' (heads scaled by 1/M) and 'demo' (W_d = V^T, heads U S / M) give W_r x / M + b; 'fitted' "
            "(init='whitened' only): the balanced start, then the gate and the M heads fitted to the dense layer's "
            "outputs on `head_fit_tokens` calibration tokens, never worse there than identical heads (= 'balanced' "
            "when M = 1)."
        },
    )
    head_fit_tokens: int = field(
        default=4096,
        metadata={"help": "For head_init='fitted': calibration tokens (input rows) per layer the heads are fitted on."},
    )
    gate: Gate = field(
        default="softmax", metadata={"help": "'softmax' per-token gate, or 'none' (plain mean of the heads)."}
    )
    gate_input: GateInput = field(
        default="latent", metadata={"help": "What the gate reads: 'latent' (h = W_d x) or 'input' (x)."}
    )
    structure: Structure = field(
        default="asymmetric",
        metadata={
            "help": "'asymmetric' (one shared down-projection, M up heads) or 'symmetric' (M full down+up pairs, "
            "the paper's LoRA+MoE-like ablation; ranks are solved under the same parameter accounting)."
        },
    )
    task_type: Optional[str] = field(
        default=None, metadata={"help": f"PEFT task type, one of {TASK_TYPE_CHOICES}, or None."}
    )

    def __post_init__(self) -> None:
        if (self.r is None) == (self.target_ratio is None):
            raise ValueError(
                f"InherConfig needs exactly one of `r` and `target_ratio`; got r={self.r!r}, "
                f"target_ratio={self.target_ratio!r}."
            )
        if self.r is not None:
            if isinstance(self.r, bool) or not isinstance(self.r, int):
                raise TypeError(f"InherConfig.r={self.r!r} must be an int >= 1.")
            _check_rank_or_ratio("InherConfig.r", self.r)
        if self.target_ratio is not None:
            if isinstance(self.target_ratio, bool) or not isinstance(self.target_ratio, (int, float)):
                raise TypeError(f"InherConfig.target_ratio={self.target_ratio!r} must be a float in (0, 1].")
            self.target_ratio = float(self.target_ratio)
            _check_rank_or_ratio("InherConfig.target_ratio", self.target_ratio)
        if isinstance(self.num_heads, bool) or not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(f"InherConfig.num_heads={self.num_heads!r} must be an int >= 1.")
        if isinstance(self.svd_niter, bool) or not isinstance(self.svd_niter, int) or self.svd_niter < 0:
            raise ValueError(f"InherConfig.svd_niter={self.svd_niter!r} must be an int >= 0.")
        _check_choice("init", self.init, INIT_CHOICES)
        _check_choice("rank_allocation", self.rank_allocation, RANK_ALLOCATION_CHOICES)
        for name in ("min_rank", "rank_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"InherConfig.{name}={value!r} must be an int >= 1.")
        if self.rank_allocation != "uniform" and self.target_ratio is None:
            raise ValueError(f"InherConfig.rank_allocation={self.rank_allocation!r} distributes a parameter budget: "
                             f"give `target_ratio` instead of `r` (or use rank_allocation='uniform').")
        if (isinstance(self.calibration_damping, bool) or not isinstance(self.calibration_damping, (int, float))
                or not math.isfinite(self.calibration_damping) or self.calibration_damping < 0):
            raise ValueError(f"InherConfig.calibration_damping={self.calibration_damping!r} must be a float >= 0.")
        _check_choice("head_init", self.head_init, HEAD_INIT_CHOICES)
        if (isinstance(self.head_fit_tokens, bool) or not isinstance(self.head_fit_tokens, int)
                or self.head_fit_tokens < 1):
            raise ValueError(f"InherConfig.head_fit_tokens={self.head_fit_tokens!r} must be an int >= 1.")
        _check_choice("gate", self.gate, GATE_CHOICES)
        _check_choice("gate_input", self.gate_input, GATE_INPUT_CHOICES)
        _check_choice("structure", self.structure, STRUCTURE_CHOICES)
        if self.head_init == "fitted":
            unfit = {k: getattr(self, k) for k, v in (("init", "whitened"), ("gate", "softmax"),
                                                      ("gate_input", "latent"), ("structure", "asymmetric"))
                     if getattr(self, k) != v}
            if unfit:
                raise ValueError(f"InherConfig(head_init='fitted') fits a softmax gate on the latent of a shared "
                                 f"whitened down-projection: it needs init='whitened', gate='softmax', gate_input="
                                 f"'latent' and structure='asymmetric'; got {unfit}.")
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        if self.task_type is not None:
            _check_choice("task_type", self.task_type, TASK_TYPE_CHOICES)
        _check_module_names("target_modules", self.target_modules, allow_all_linear=True)
        _check_module_names("exclude_modules", self.exclude_modules, allow_all_linear=False)
        _check_module_names("modules_to_save", self.modules_to_save, allow_all_linear=False)
        if isinstance(self.modules_to_save, str):
            raise TypeError(f"InherConfig.modules_to_save={self.modules_to_save!r} must be a list of module names.")
        for seq_name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, seq_name)
            if isinstance(value, (tuple, set)):
                setattr(self, seq_name, sorted(value) if isinstance(value, set) else list(value))
        self._check_layers()
        if not isinstance(self.rank_pattern, dict):
            raise TypeError(f"InherConfig.rank_pattern={self.rank_pattern!r} must be a dict of regex -> rank/ratio.")
        for key, value in self.rank_pattern.items():
            _check_module_names("rank_pattern key", key, allow_all_linear=False)
            _check_rank_or_ratio(f"InherConfig.rank_pattern[{key!r}]", value)
        rank_shaping = {n: getattr(self, n) for n in ("min_rank", "rank_multiple") if getattr(self, n) != 1}
        if rank_shaping and self.r is not None and not any(isinstance(v, float) for v in self.rank_pattern.values()):
            raise ValueError(f"InherConfig {rank_shaping} shape the ranks solved from a ratio; with r={self.r} (and no "
                             f"ratio in rank_pattern) every layer gets exactly its given rank. Drop them or give "
                             f"`target_ratio`.")

    def _check_layers(self) -> None:
        layers, pattern = self.layers_to_transform, self.layers_pattern
        if layers is None:
            if pattern is not None:
                raise ValueError(f"InherConfig.layers_pattern={pattern!r} only says where `layers_to_transform` reads "
                                 f"the layer index; give layers_to_transform too, or drop it.")
            return
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            raise ValueError("InherConfig.layers_to_transform cannot be used with a regex `target_modules` (as in "
                             "PEFT): put the layer indices in the regex, or give target_modules as a list.")
        layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
        if (not isinstance(layers, (list, tuple)) or not layers
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
            raise ValueError(f"InherConfig.layers_to_transform={self.layers_to_transform!r} must be an int >= 0 or a "
                             f"non-empty list of them.")
        self.layers_to_transform = sorted(set(layers))
        if pattern is not None:
            pattern = [pattern] if isinstance(pattern, str) else pattern
            if not isinstance(pattern, (list, tuple)) or not all(isinstance(p, str) and p for p in pattern):
                raise TypeError(f"InherConfig.layers_pattern={self.layers_pattern!r} must be a name or a list of names.")
            self.layers_pattern = list(pattern)

    @property
    def needs_calibration(self) -> bool:
        """Whether `get_inher_model` needs `calibration_data` for this config."""
        return calibration_needed(self.init, self.rank_allocation)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InherConfig":
        """Inverse of `to_dict`. As PEFT reads its configs, fields this version does not know (written by a newer
        one) are dropped with a warning naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("Ignoring InherConfig field(s) %s unknown to this version of inhernet_hf (known: %s); "
                           "upgrade inhernet_hf to use them.", unknown, sorted(known))
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the config as `inher_config.json` in `save_directory` (created if needed), as PEFT writes
        `adapter_config.json`."""
        folder = Path(save_directory)
        if folder.is_file():
            raise ValueError(f"save_directory={str(folder)!r} is a file; give a folder.")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(self.to_json_string() + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs) -> "InherConfig":
        """Read `inher_config.json` from a folder or a Hub repo (`hub_kwargs`: revision, token, cache_dir, subfolder,
        local_files_only...), or, from an inherited checkpoint, the config its `config.json` records."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        source = Path(pretrained_model_name_or_path)

        def read(filename: str) -> Optional[dict]:
            if source.is_dir():
                path = source / hub_kwargs.get("subfolder", "") / filename
                return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
            try:
                return json.loads(Path(hf_hub_download(str(source), filename, **hub_kwargs)).read_text("utf-8"))
            except EntryNotFoundError:
                return None

        data = read(CONFIG_NAME)
        if data is None:
            description = (read("config.json") or {}).get("quantization_config") or {}
            data = description.get("inher_config") if description.get("quant_method") == QUANT_METHOD else None
        if data is None:
            raise ValueError(f"{source} has neither {CONFIG_NAME} nor an inherited model's config.json "
                             f"(a quantization_config with quant_method 'inhernet').")
        return cls.from_dict(data)
