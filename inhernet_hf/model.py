"""`get_inher_model` and `InherModel`: plan ranks, replace the targets, report what was done."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import transformers
from huggingface_hub import HfApi
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, PreTrainedModel

from .budget import allocate_ranks, fit_uniform_ranks, pattern_matches, plan_layer
from .calibration import (BlockStream, block_grams, block_statistics, find_blocks, output_sensitivity,
                          prepare_calibration)
from .card import model_card
from .config import InherConfig
from .factor import spectrum
from .integration import ALLOW_PICKLE, KEY_MAPPING, QUANT_METHOD, InherHfQuantizer, InherQuantizationConfig
from .layer import InherLinear
from .report import InherReport, LayerRecord
from .skeleton import new_layer, replace_module
from .targets import dense_weight, find_targets, is_replaceable, matches, resolve_target_spec

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
logger = logging.getLogger(__name__)
# from_pretrained options that say where config.json comes from, besides revision and token
HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "proxies", "subfolder", "trust_remote_code")


def _check_weight(name: str, module: nn.Module) -> None:
    """A plain floating-point Parameter (GGUF models qualify: transformers dequantises them on load);
    integer dtypes and quantised tensor subclasses (bitsandbytes, torchao...) do not."""
    weight = module.weight
    if weight.dtype not in FLOAT_DTYPES or type(weight) not in (nn.Parameter, torch.Tensor):
        raise TypeError(
            f"Module {name!r} has a {weight.dtype} weight of type {type(weight).__name__}: quantised or integer "
            f"weights cannot be factored. Load the model in float32/float16/bfloat16 (dequantised) first."
        )
    if weight.device.type != "meta" and not torch.isfinite(weight).all():
        raise ValueError(f"Module {name!r} has NaN or Inf values in its weight; cannot factor it.")


def _shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it has in `model`, for the parameters held under more than one name (tied)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {key: value for key, value in names.items() if len(value) > 1}


def get_inher_model(
    model: nn.Module,
    config: InherConfig,
    calibration_data=None,
    tokenizer=None,
    progressbar: bool = True,
) -> nn.Module:
    """Replace the targeted projections of `model` by SVD-initialised `InherLinear` layers, in place, and return
    `model` itself, now an `InherModel` (same class, plus `inher_report`, the per-layer table).

    Args:
        model: a transformers model (or any nn.Module with `target_modules` given), dense and unquantised.
        config: the `InherConfig`.
        calibration_data: for init="whitened" / rank_allocation="activation": an iterable of model-input dict
            batches, or a `datasets.Dataset` (with `tokenizer` for a "text" column). Refused when unused.
        progressbar: tqdm bars over layers / blocks, and a one-line summary of the realised ratio.

    Everything is validated and the ranks are planned before the first layer changes; each dense weight is
    factored and dropped before the next one is touched, so the model never holds two dense copies.

    The default config is data-free (the paper's exact truncated SVD, uniform ranks). With a few hundred examples
    of the task, `InherConfig(..., init="whitened", rank_allocation="activation")` plus `calibration_data` gives a
    much better start (WikiText-2 perplexity of SmolLM2-135M at ratio 0.8: 51.5 against 4.7e7 for plain SVD;
    recipes/README.md); the recipes use it by default.
    """
    plan = _plan(model, config, calibration_data, tokenizer, progressbar)
    _inherit_planned(model, config, plan, progressbar)
    _finish(model, config, plan, progressbar)
    return model


def _inherit_planned(model: nn.Module, config: InherConfig, plan: "_Plan", progressbar: bool,
                     stream: Optional[BlockStream] = None) -> None:
    """Factor and replace every planned target, in place (one block at a time for the whitened init); with a
    `stream`, each block is loaded before and released after its targets are replaced (streamed compression)."""
    targets, modules, records, batches = plan.targets, plan.modules, plan.records, plan.batches
    modes = {name: module.training for name, module in model.named_modules()}
    model.eval()  # calibration passes without dropout; every module's mode is restored after
    try:
        by_name = {r.name: r for r in records}
        if config.init == "whitened":
            fitting = config.head_init == "fitted" and any(r.num_heads > 1 for r in records)
            for grams, samples in block_statistics(model, targets, batches, desc="Inheriting blocks (whitened)",
                                                   progressbar=progressbar,
                                                   token_samples=config.head_fit_tokens if fitting else 0,
                                                   stream=stream):
                for name in list(grams):  # popped: each X^T X is freed once its layer is factored
                    _inherit_one(model, by_name[name], modules.pop(name), config, grams.pop(name),
                                 samples.pop(name, None))
        elif stream is not None:
            for block_name, block, inside in tqdm(find_blocks(model, targets), desc="Inheriting blocks",
                                                  disable=not progressbar):
                stream.load(block_name, block)
                for name in inside:
                    _inherit_one(model, by_name[name], modules.pop(name), config)
                stream.release(block_name, block)
        else:
            for record in tqdm(records, desc="Inheriting layers", disable=not progressbar):
                _inherit_one(model, record, modules.pop(record.name), config)
    finally:
        _restore_modes(model, modes)


def _finish(model: nn.Module, config: InherConfig, plan: "_Plan", progressbar: bool) -> InherReport:
    """After the targets are replaced: trainable modules_to_save, the description, the class; prints the summary."""
    records = plan.records
    for name in config.modules_to_save or []:
        for module_name, module in model.named_modules():
            if matches([name], module_name):
                module.requires_grad_(True)
    report = InherReport(records)
    if isinstance(model, PreTrainedModel):
        attach_description(model, config, report)  # its quantizer makes the model an InherModel, as on loading
    else:
        make_inherited(model, config, report)
    if progressbar:
        n = sum(r.inherited for r in records)
        target = f"target {config.target_ratio:.4f}" if config.target_ratio is not None else f"r={config.r}"
        if config.target_modules is None:
            print(f"inhernet_hf: target_modules inferred from the model's repeated blocks: {plan.target_spec}")
        print(f"inhernet_hf: {n} layers inherited, {len(records) - n} kept dense; targeted parameters "
              f"{report.dense_params:,} -> {report.params:,} (ratio {report.ratio:.4f}, {target})")
    return report


@dataclass
class _Plan:
    target_spec: object  # the resolved target_modules
    targets: list[str]
    modules: dict[str, nn.Module]
    records: list[LayerRecord]
    batches: Optional[list]


def _plan(model: nn.Module, config: InherConfig, calibration_data, tokenizer, progressbar: bool) -> _Plan:
    """Validate the request and plan every layer's rank; the model is not changed (calibration passes only)."""
    if not isinstance(config, InherConfig):
        raise TypeError(f"config must be an InherConfig, got {type(config).__name__}.")
    if isinstance(model, InherModel) or any(isinstance(m, InherLinear) for m in model.modules()):
        raise ValueError("This model is already inherited (it contains InherLinear layers); inherit the dense model.")
    names = [n for n, _ in model.named_modules() if n]
    missing = [k for k in config.modules_to_save or [] if not any(matches([k], n) for n in names)]
    if missing:
        raise ValueError(f"modules_to_save entries {missing} match no module of this model (an entry is an exact "
                         f"name or a dotted suffix such as 'classifier').")
    linears = [n for n, m in model.named_modules() if is_replaceable(m)]
    spec = config.exclude_modules
    idle = [k for k in ([spec] if isinstance(spec, str) else spec or [])
            if not any(matches(k if isinstance(spec, str) else [k], n) for n in linears)]
    if idle:
        raise ValueError(f"exclude_modules entries {idle} match no Linear/Conv1D layer of this model. As in PEFT, an "
                         f"entry is matched against each layer's own name (a list entry: exact name or dotted suffix "
                         f"such as 'q_proj'; a string: regex for the full name), so a parent module such as "
                         f"'vision_tower' excludes nothing inside it: to keep a whole submodule dense use "
                         f"modules_to_save, or a regex such as r'.*vision_tower\\..*'.")
    if calibration_data is not None and not config.needs_calibration:
        raise ValueError(f"calibration_data was given but init={config.init!r} and rank_allocation="
                         f"{config.rank_allocation!r} do not use it; use init='whitened' or "
                         f"rank_allocation='activation', or drop calibration_data.")
    batches = prepare_calibration(calibration_data, tokenizer) if config.needs_calibration else None
    target_spec = resolve_target_spec(model, config.target_modules)
    targets = find_targets(model, config, target_spec)
    modules = {name: model.get_submodule(name) for name in targets}
    convs = [name for name, module in modules.items() if isinstance(module, nn.Conv2d)]
    if convs and (config.needs_calibration or config.structure != "asymmetric" or config.gate_input != "latent"):
        raise ValueError(f"{len(convs)} targets are Conv2d layers (e.g. {convs[0]!r}); for convolutions init="
                         f"'whitened' and rank_allocation='activation' are not supported yet, nor structure="
                         f"'symmetric' or gate_input='input'. Use init='svd' with rank_allocation 'uniform' or "
                         f"'energy', or leave the convolutions out (exclude_modules).")
    shared = _shared_parameters(model)
    for name, module in modules.items():
        _check_weight(name, module)
        tied = [n for n in shared.get(id(module.weight), []) if n != f"{name}.weight"]
        if tied:
            raise ValueError(f"{name}.weight is tied to {tied}: inheriting {name} would untie it and add parameters "
                             f"instead of removing them. Leave it out of target_modules (or untie the weights first, "
                             f"e.g. config.tie_word_embeddings=False, and load the model again).")
    unused = [key for key in config.rank_pattern if not any(pattern_matches(key, t) for t in targets)]
    if unused:
        raise ValueError(f"rank_pattern keys {unused} match no targeted module (a key must match the end of a full "
                         f"name, e.g. 'mlp\\.down_proj' or r'layers\\.0\\..*'); targets look like {targets[0]!r}.")
    records = [plan_layer(name, module, config) for name, module in modules.items()]
    if config.rank_allocation == "uniform":
        fit_uniform_ranks(records, config)
    else:
        modes = {name: module.training for name, module in model.named_modules()}
        model.eval()  # calibration passes without dropout; every module's mode is restored after
        try:
            allocate_ranks(records, _rank_gains(model, modules, batches, config, progressbar), config)
        finally:
            _restore_modes(model, modes)
    return _Plan(target_spec, targets, modules, records, batches)


def plan_inheritance(
    model: nn.Module,
    config: InherConfig,
    calibration_data=None,
    tokenizer=None,
    progressbar: bool = True,
) -> InherReport:
    """What `get_inher_model(model, config, calibration_data)` would do, without changing the model: the per-layer
    report (targets, ranks, heads, parameter counts; `energy_kept` is None, known only once factored). The same
    validation runs, and rank_allocation="activation" runs its calibration passes over the dense model."""
    return InherReport(_plan(model, config, calibration_data, tokenizer, progressbar).records)


def _restore_modes(model: nn.Module, modes: dict[str, bool]) -> None:
    """Give every module its recorded train/eval mode; a new InherLinear (and its parts) takes the mode of the
    module it replaced."""
    for name, module in model.named_modules():
        key = name
        while key not in modes:
            key = key.rpartition(".")[0]
        module.training = modes[key]


def _inherit_one(model: nn.Module, record: LayerRecord, dense: nn.Module, config: InherConfig,
                 gram: Optional[torch.Tensor] = None, inputs: Optional[torch.Tensor] = None) -> None:
    """Factor one dense layer into an InherLinear (fitting its heads on `inputs`, rows of the layer's calibration
    input, for head_init="fitted") and swap it in; the dense module is dropped here."""
    if not record.inherited:
        return
    layer = new_layer(dense, record.rank, record.num_heads, config)
    weight = dense_weight(dense)
    record.energy_kept = layer.inherit_(weight, dense.bias, config.init, config.head_init,
                                        config.svd_niter, gram, config.calibration_damping)
    if config.head_init == "fitted" and record.num_heads > 1:
        fit = layer.fit_heads_(weight, inputs)
        record.fit_error = fit.objective / fit.start if fit.start > 0 else 1.0
    replace_module(model, record.name, layer)


def _rank_gains(model: nn.Module, modules: dict[str, nn.Module], batches, config: InherConfig,
                progressbar: bool) -> dict[str, torch.Tensor]:
    """What each successive rank of each target is worth, on one scale across layers.

    "energy": sigma_k^2 / ||W||_F^2, the share of the layer's weight energy the rank keeps.
    "activation": f_l * sigma_k(W L)^2, the loss a rank saves to second order: sigma_k(W L)^2 is the output error
    it removes on the calibration inputs and f_l the layer's mean squared loss gradient per output element
    (its Fisher scalar). Statistics come from the dense model, one block at a time, nothing replaced.
    """
    if config.rank_allocation == "energy":
        gains = {}
        for name, module in tqdm(modules.items(), desc="Weight spectra", disable=not progressbar):
            energy = spectrum(dense_weight(module)).square()
            gains[name] = energy / energy.sum().clamp_min(torch.finfo(energy.dtype).tiny)
        return gains
    sensitivity = output_sensitivity(model, list(modules), batches, progressbar=progressbar)
    gains = {}
    for grams in block_grams(model, list(modules), batches, desc="Whitened spectra", progressbar=progressbar):
        for name, gram in grams.items():
            gains[name] = sensitivity[name] * spectrum(dense_weight(modules[name]), gram,
                                                       config.calibration_damping).square()
    return gains


def model_class_for(config) -> type:
    """The transformers class named by `config.architectures[0]` (AutoModel when none is named)."""
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        return AutoModel
    model_class = getattr(transformers, architectures[0], None)
    if model_class is None:
        raise ValueError(f"config.json names architecture {architectures[0]!r}, unknown to transformers "
                         f"{transformers.__version__}; pass the model class explicitly.")
    return model_class


def attach_description(model: PreTrainedModel, config: InherConfig, report: InherReport) -> None:
    """Record the inheritance in `model.config.quantization_config` and install our quantizer, exactly as
    `from_pretrained` leaves a loaded model: plain `save_pretrained` / `push_to_hub` then round-trip."""
    from . import __version__

    layers = [{"name": r.name, "rank": r.rank, "num_heads": r.num_heads, "energy_kept": r.energy_kept, "note": r.note,
               **({} if r.fit_error is None else {"fit_error": r.fit_error})} for r in report.rows]
    description = InherQuantizationConfig(config.to_dict(), layers, model.config.name_or_path or None,
                                          library_version=__version__)
    model.hf_quantizer = InherHfQuantizer(description, pre_quantized=True)
    model.quantization_method = QUANT_METHOD
    model.hf_quantizer.postprocess_model(model)


class InherModel:
    """What every inherited model is: the transformers model itself, its class swapped for a subclass of its own
    class with this mixin (same name and module, so `config.architectures` and transformers' lookups are unchanged).

    `get_inher_model` and every loader (`InherModel.from_pretrained`, `AutoModelFor*.from_pretrained` after `import
    inhernet_hf`) return one. It *is* the `PreTrainedModel` (`isinstance(model, LlamaForCausalLM)` holds), so HF
    `Trainer`, TRL and `peft.get_peft_model` take it as any transformers model; `base_model` keeps transformers'
    meaning (the backbone). Added: `inher_report` (the per-layer table), `inher_config`, PEFT's trainable-parameter
    helpers, and a `save_pretrained` / `push_to_hub` that also write the tokenizer and a model card.
    """

    inher_config: InherConfig
    inher_report: InherReport

    def report(self) -> InherReport:
        """Deprecated: `model.inher_report`."""
        warnings.warn("InherModel.report() is deprecated and will be removed in inhernet_hf 0.3; use "
                      "model.inher_report.", FutureWarning, stacklevel=2)
        return self.inher_report

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as PEFT's method of the same name."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *args,
        tokenizer=None,
        eval_results: Optional[dict[str, float]] = None,
        eval_dataset: Optional[str] = None,
        model_name: Optional[str] = None,
        **kwargs,
    ) -> None:
        """Write config.json (with the inheritance description), safetensors weights (sharded with an index above
        `max_shard_size`), the generation config, `tokenizer` (a tokenizer or processor) and a model card.

        `eval_results` ({metric: value} on `eval_dataset`) go into the card's metadata; `model_name` is the card's
        title (default: the folder's name). The other arguments are transformers' `save_pretrained`'s.
        """
        if not isinstance(self, PreTrainedModel):
            raise TypeError(f"save_pretrained needs a transformers PreTrainedModel; {type(self).__name__} is a plain "
                            f"nn.Module: save its state_dict with safetensors.torch.save_file instead.")
        if kwargs.get("safe_serialization") is False:
            raise ValueError("inhernet_hf saves safetensors only (safe_serialization=False would write a pickle).")
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)
        description = self.config.quantization_config
        card = model_card(model_name or Path(save_directory).name, description.base_model_name_or_path,
                          description.inher_config, self.inher_report, eval_results, eval_dataset)
        card.save(Path(save_directory) / "README.md")

    def push_to_hub(
        self,
        repo_id: str,
        private: Optional[bool] = None,
        commit_message: Optional[str] = None,
        token: Optional[str] = None,
        revision: Optional[str] = None,
        create_pr: bool = False,
        **save_kwargs,
    ):
        """Save to a temporary folder (as `save_pretrained`, which takes `save_kwargs`) and upload it through
        `huggingface_hub` (`create_repo` + `upload_folder`); the card is named after the repository. Returns the
        `CommitInfo`."""
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, **{"model_name": repo_id.split("/")[-1], **save_kwargs})
            return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                     commit_message=commit_message or "Upload inherited model (inhernet_hf)")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        revision: Optional[str] = None,
        dtype: Optional[torch.dtype | str] = None,
        device_map=None,
        token: Optional[str] = None,
        use_safetensors: bool = True,
        model_class: Optional[type] = None,
        **kwargs,
    ) -> PreTrainedModel:
        """Load an inherited model from a folder or the Hub (through huggingface_hub: cache, HF_HUB_OFFLINE,
        revisions and tokens apply). The skeleton is built on the meta device from config.json: no dense weight
        is allocated and no SVD recomputed. `model_class` defaults to the checkpoint's recorded architecture.
        A pickle (`.bin`) is read only with `use_safetensors=False`. The Hub options among `kwargs` (`cache_dir`,
        `subfolder`, `local_files_only`...) apply to reading config.json as well as the weights."""
        if "torch_dtype" in kwargs:
            dtype = kwargs.pop("torch_dtype")
        hub_options = {k: kwargs[k] for k in HUB_OPTIONS if k in kwargs}
        config = AutoConfig.from_pretrained(pretrained_model_name_or_path, revision=revision, token=token,
                                            **hub_options)
        description = getattr(config, "quantization_config", None)
        if not isinstance(description, dict) or description.get("quant_method") != QUANT_METHOD:
            raise ValueError(f"{pretrained_model_name_or_path} is not an inhernet_hf checkpoint (its config.json has "
                             f"no quantization_config with quant_method={QUANT_METHOD!r}). To compress a dense model "
                             f"use get_inher_model(model, InherConfig(...)).")
        model_class = model_class or model_class_for(config)
        token_var = ALLOW_PICKLE.set(not use_safetensors)
        mapping_var = KEY_MAPPING.set(kwargs.get("key_mapping"))
        try:
            model = model_class.from_pretrained(pretrained_model_name_or_path, *model_args, config=config,
                                                revision=revision, dtype=dtype, device_map=device_map, token=token,
                                                use_safetensors=use_safetensors or None, **kwargs)
        finally:
            ALLOW_PICKLE.reset(token_var)
            KEY_MAPPING.reset(mapping_var)
        return model


_INHERITED_CLASSES: dict[type, type] = {}


def make_inherited(model: nn.Module, config: InherConfig, report: InherReport) -> None:
    """Make `model` an InherModel in place: its class becomes `InherModel` + its own class (made once per class, with
    the same name and module; qualified name `InherModel[<class>]`), and it carries `inher_config` and `inher_report`."""
    cls = type(model)
    if not isinstance(model, InherModel):
        if cls not in _INHERITED_CLASSES:
            _INHERITED_CLASSES[cls] = type(cls.__name__, (InherModel, cls), {
                "__module__": cls.__module__, "__qualname__": f"InherModel[{cls.__qualname__}]", "__doc__": cls.__doc__})
        model.__class__ = _INHERITED_CLASSES[cls]
    model.inher_config = config
    model.inher_report = report


def make_dense(model: nn.Module) -> None:
    """Undo `make_inherited` (after `dequantize` replaced every inherited layer): the model's own class again."""
    if isinstance(model, InherModel):
        model.__class__ = type(model).__bases__[1]
        for name in ("inher_config", "inher_report"):
            model.__dict__.pop(name, None)
