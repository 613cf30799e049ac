"""Streamed compression: inherit a model whose weights stay in its safetensors checkpoint, one block at a time.

`compress_checkpoint(model, config, output_dir)` builds the model on the meta device (accelerate's
`init_empty_weights`) and gives the embeddings, norms and head their weights; with the whitened init they compute
the first block's calibration inputs (the blocks themselves do not run: their calls are recorded). Then it writes
them to one shard and frees them, and block by block reads the block's tensors from the checkpoint (safetensors'
`safe_open`, each file mapped only while it is read), runs its calibration inputs through it, factors its targets as
`get_inher_model` does, writes the compressed block to its own shard and frees it. Peak memory is about one dense
block with its factoring work and the calibration hidden states, or the non-block weights if they are larger,
whatever the depth. The output is the sharded checkpoint `InherModel.save_pretrained` writes (config.json with the
inheritance description, shards + index, generation config, tokenizer, model card) with the same tensors, bit for
bit (the same maths runs on the same inputs; tests/test_streaming.py holds them equal on SmolLM2).

Rank allocation must be "uniform" (ranks from the shapes alone): "energy" and "activation" weigh every layer
against all the others before the first one is replaced, which needs a pass over the whole dense model first.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

from .calibration import BlockStream, find_blocks
from .card import model_card
from .config import InherConfig
from .model import _finish, _inherit_planned, _plan, model_class_for


class StreamingNotSupported(ValueError):
    """This model or config cannot be compressed streamed (nothing has been read or written yet)."""


class CheckpointReader:
    """Reads of a safetensors checkpoint (one file or shards with an index; a folder or a Hub id), a few tensors at
    a time."""

    def __init__(self, model: Union[str, os.PathLike], **hub_kwargs) -> None:
        index = cached_file(model, SAFE_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if index is not None:
            weight_map = json.loads(Path(index).read_text())["weight_map"]
            files = {name: cached_file(model, name, **hub_kwargs) for name in sorted(set(weight_map.values()))}
            self.files = {key: files[name] for key, name in weight_map.items()}
        else:
            single = cached_file(model, SAFE_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
            if single is None:
                raise StreamingNotSupported(f"{model} has no safetensors checkpoint ({SAFE_WEIGHTS_NAME} or "
                                            f"{SAFE_WEIGHTS_INDEX_NAME}): streamed compression reads safetensors "
                                            f"only.")
            with safe_open(single, "pt") as f:
                self.files = {key: single for key in f.keys()}

    def name_of(self, key: str, prefix: str) -> Optional[str]:
        """The checkpoint's name for the model's `key`: itself, or with the base model's `prefix` added or
        dropped (a task model read from a base checkpoint, or the reverse, as from_pretrained allows)."""
        candidates = (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")) if prefix else (key,)
        return next((name for name in candidates if name in self.files), None)

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, copied out of their files; each file is memory-mapped only while it is read, so
        the pages of a block read earlier do not stay in the resident set."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for path, group in by_file.items():
            with safe_open(path, "pt") as f:
                out.update({name: f.get_tensor(name) for name in group})
        return out


class _CheckpointStream(BlockStream):
    """Loads each block from a `CheckpointReader`, writes each released block to its own shard and frees it. Before
    the first block loads (the calibration pass that needs the embeddings is over), everything outside the blocks
    is written to a shard of its own and freed too."""

    def __init__(self, model: nn.Module, reader: CheckpointReader, output_dir: Path, device, dtype,
                 block_names: list[str]) -> None:
        self.model, self.reader, self.output_dir, self.device, self.dtype = model, reader, output_dir, device, dtype
        self.in_blocks = tuple(f"{name}." for name in block_names)
        self.shards: list[tuple[Path, list[str], int]] = []  # (temporary file, its keys, their bytes), in order
        self.rest: Optional[tuple[Path, list[str], int]] = None  # the shard of everything outside the blocks

    def load(self, name: str, block: nn.Module) -> None:
        if self.rest is None:
            self.rest = self._free_outside()
        load_tensors(self.model, self.reader, [f"{name}.{k}" for k in block.state_dict()], self.device, self.dtype)

    def release(self, name: str, block: nn.Module) -> None:
        self.shards.append(_save({f"{name}.{k}": v for k, v in block.state_dict().items()},
                                 self.output_dir / f"tmp-block-{len(self.shards):05d}.safetensors"))
        block.to("meta")  # frees the block; it does not run again
        _return_freed_memory()

    def _free_outside(self) -> tuple[Path, list[str], int]:
        """Save the embeddings, norms and head (a tied head once, under the embeddings' name, as transformers
        does) and put their parameters on the meta device."""
        state, seen = {}, set()
        for key, value in self.model.state_dict().items():
            if key.startswith(self.in_blocks) or value.device.type == "meta":
                continue
            identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
            if identity not in seen:
                seen.add(identity)
                state[key] = value
        rest = _save(state, self.output_dir / "tmp-rest.safetensors")
        for module_name, module in self.model.named_modules():
            if not f"{module_name}.".startswith(self.in_blocks):
                for param_name, param in module.named_parameters(recurse=False):
                    set_module_tensor_to_device(module, param_name, "meta")
        return rest


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the system (glibc's `malloc_trim`): without it, blocks of a few MiB freed among
    live allocations stay resident, and the peak grows with depth. A no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _save(state: dict[str, torch.Tensor], path: Path) -> tuple[Path, list[str], int]:
    state = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    save_file(state, str(path), metadata={"format": "pt"})
    return path, list(state), sum(t.numel() * t.element_size() for t in state.values())


def load_tensors(model: nn.Module, reader: CheckpointReader, keys: list[str], device, dtype) -> None:
    """Give `model` the checkpoint's values of `keys` (floating tensors cast to `dtype`), on `device`."""
    prefix = getattr(model, "base_model_prefix", "")
    names = {key: reader.name_of(key, prefix) for key in keys}
    values = reader.tensors(list(names.values()))
    for key, name in names.items():
        value = values.pop(name)
        set_module_tensor_to_device(model, key, device, value=value,
                                    dtype=dtype if value.is_floating_point() else None)


def compress_checkpoint(
    model: Union[str, os.PathLike],
    config: InherConfig,
    output_dir: Union[str, os.PathLike],
    calibration_data=None,
    tokenizer=None,
    device: Union[str, torch.device] = "cpu",
    dtype: Union[torch.dtype, str] = torch.float32,
    progressbar: bool = True,
    **hub_kwargs,
) -> nn.Module:
    """Inherit the checkpoint `model` (a folder or Hub id with safetensors weights) block by block and write the
    inherited checkpoint to `output_dir`; returns the model skeleton (every weight freed, on the meta device)
    carrying `inher_report`. `calibration_data` as for `get_inher_model` (on `device`); `tokenizer`, when
    given, is saved with the model; `dtype` may be "auto" (the checkpoint's). Raises `StreamingNotSupported` before
    reading any weight when the config or model cannot be streamed."""
    if config.rank_allocation != "uniform":
        raise StreamingNotSupported(f"streamed compression plans ranks from the layer shapes: rank_allocation="
                                    f"'uniform' only, got {config.rank_allocation!r} (it weighs all layers before the "
                                    f"first is replaced, which needs the whole dense model; compress in memory with "
                                    f"get_inher_model for it).")
    _return_freed_memory()  # what preparing the calibration data freed (tokenising WikiText-2's test split: ~160 MiB)
    model_config = AutoConfig.from_pretrained(model, **hub_kwargs)
    if dtype == "auto":  # the checkpoint's own dtype, as from_pretrained(dtype="auto")
        dtype = getattr(model_config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    reader = CheckpointReader(model, **hub_kwargs)
    with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) real
        skeleton = model_class_for(model_config)._from_config(model_config, dtype=dtype)
    skeleton.config.name_or_path = str(model)
    plan = _plan(skeleton, config, calibration_data, tokenizer, progressbar)
    blocks = find_blocks(skeleton, plan.targets)
    if blocks is None:
        raise StreamingNotSupported("streamed compression needs every target inside one list of repeated blocks "
                                    "(decoder layers), and this model's targets are not.")
    prefix = getattr(skeleton, "base_model_prefix", "")
    keys = [k for k in skeleton.state_dict() if reader.name_of(k, prefix) or not _is_tied(skeleton, k)]
    missing = [k for k in keys if reader.name_of(k, prefix) is None]
    if missing:
        raise StreamingNotSupported(f"the checkpoint has no tensor {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                                    f"({len(missing)} in all): from_pretrained would initialise them at random, and "
                                    f"streamed compression only reads what the checkpoint holds (a model of this "
                                    f"class saved by transformers).")
    in_blocks = tuple(f"{name}." for name, _, _ in blocks)
    load_tensors(skeleton, reader, [k for k in keys if not k.startswith(in_blocks)], device, dtype)
    skeleton.tie_weights()  # a tied head shares the embeddings just loaded
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    stream = _CheckpointStream(skeleton, reader, output, device, dtype, [name for name, _, _ in blocks])
    _inherit_planned(skeleton, config, plan, progressbar, stream=stream)
    report = _finish(skeleton, config, plan, progressbar)
    _write_checkpoint(skeleton, [*stream.shards, stream.rest], output, dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    card = model_card(output.name, str(model), config.to_dict(), report, None, None)
    card.save(output / "README.md")
    return skeleton


def _is_tied(model: nn.Module, key: str) -> bool:
    """Whether `key` is a tied copy that a checkpoint may leave out (a head tied to the input embeddings)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return bool(getattr(model.config, "tie_word_embeddings", False)) and head is not None and \
        key.startswith(tuple(f"{n}." for n, m in model.named_modules() if m is head))


def _write_checkpoint(model: nn.Module, shards: list[tuple[Path, list[str], int]], output: Path,
                      dtype: torch.dtype) -> None:
    """The written shards renamed to transformers' shard names, the index, config.json (with the inheritance
    description) and the generation config."""
    weight_map = {}
    for i, (path, keys, _) in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(path, output / name)
        weight_map.update({key: name for key in keys})
    index = {"metadata": {"total_size": sum(size for _, _, size in shards)},
             "weight_map": dict(sorted(weight_map.items()))}
    (output / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    model.config.dtype = dtype
    model.config.save_pretrained(output)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(output)
