"""Calibration statistics X^T X of the targets' inputs, gathered block by block (GPTQ-style, true-sequential).

The inputs of the first transformer block, and the other arguments of every block (masks, rotary tables), are
captured once. Within each block the targets are taken in
execution order, in groups that read the same input (q/k/v, then o, then gate/up, then down): the block runs on
the calibration inputs with hooks that accumulate the group's input second moments and stop the block right
after, the caller factors (and replaces) the group, and the next group sees inputs that flowed through the
replaced layers. Then the block runs once more to produce the next block's inputs. Peak extra memory is one
group's statistics plus the calibration hidden states. Models whose targets do not all sit in one list of
blocks (encoder-decoders, multi-tower VLMs) fall back to one pass over the whole model with dense inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once what it needed is recorded."""


def prepare_calibration(calibration_data: Any, tokenizer=None, max_length: int = 256, batch_size: int = 8) -> list[dict]:
    """Normalise calibration data to a list of model-input dicts of tensors.

    Accepts an iterable of dict batches (e.g. a DataLoader of tokenized inputs), or a `datasets.Dataset`
    with an `input_ids` column (rows of different lengths are padded by `tokenizer`) or, given a `tokenizer`, a
    `text` column. Raises on empty data, non-dict batches, batches without tensors or rows, and NaN/Inf in floating
    inputs.
    """
    if calibration_data is None:
        raise ValueError("This InherConfig needs calibration data (init='whitened' or rank_allocation='activation'): "
                         "pass get_inher_model(model, config, calibration_data=...), an iterable of model-input dict "
                         "batches or a datasets.Dataset (with a tokenizer for a 'text' column).")
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(calibration_data, datasets.Dataset):
        calibration_data = _dataset_batches(calibration_data, tokenizer, max_length, batch_size)
    elif isinstance(calibration_data, (str, bytes, Mapping, torch.Tensor)) or not isinstance(calibration_data, Iterable):
        raise TypeError(f"calibration_data must be an iterable of dict batches or a datasets.Dataset, got "
                        f"{type(calibration_data).__name__}.")
    batches = []
    for i, batch in enumerate(calibration_data):
        if not isinstance(batch, Mapping):
            raise TypeError(f"calibration_data batch {i} is a {type(batch).__name__}; each batch must be a dict of "
                            f"model inputs such as {{'input_ids': ..., 'attention_mask': ...}}.")
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise TypeError(f"calibration_data batch {i} holds no tensors (keys: {sorted(batch)}).")
        for key, value in tensors.items():
            if value.dim() > 0 and value.shape[0] == 0:
                raise ValueError(f"calibration_data batch {i} has no rows: {key!r} has shape {tuple(value.shape)}.")
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"calibration_data batch {i} has NaN or Inf values in {key!r}.")
        batches.append(dict(batch))
    if not batches:
        raise ValueError("calibration_data is empty: give at least one batch of model inputs.")
    return batches


def _dataset_batches(dataset, tokenizer, max_length: int, batch_size: int) -> Iterator[dict]:
    if "input_ids" in dataset.column_names:
        columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in dataset.column_names]
        dataset = dataset.with_format("torch", columns=columns)
        for start in range(0, len(dataset), batch_size):
            batch = dataset[start:start + batch_size]
            if not isinstance(batch["input_ids"], torch.Tensor):  # rows of different lengths come back as lists
                if tokenizer is None:
                    last = min(start + batch_size, len(dataset)) - 1
                    raise ValueError(f"The calibration Dataset's rows {start}..{last} have different lengths; pass "
                                     f"`tokenizer=` to pad them, or tokenize with padding='max_length'.")
                batch = dict(tokenizer.pad(batch, return_tensors="pt"))
            yield batch
    elif "text" in dataset.column_names and tokenizer is not None:
        for start in range(0, len(dataset), batch_size):
            texts = dataset[start:start + batch_size]["text"]
            yield dict(tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length))
    else:
        raise ValueError(f"A calibration datasets.Dataset needs an 'input_ids' column, or a 'text' column and a "
                         f"tokenizer; it has columns {dataset.column_names} and tokenizer={tokenizer!r}.")


def sample_windows(token_ids: torch.Tensor, num_samples: int, seq_len: int, seed: int = 0,
                   batch_size: int = 8) -> list[dict]:
    """`num_samples` random windows of `seq_len` tokens from a 1-D stream of token ids, as input_ids batches."""
    if len(token_ids) <= seq_len:
        raise ValueError(f"The calibration text has {len(token_ids)} tokens; at least {seq_len + 1} are needed for "
                         f"windows of {seq_len} tokens.")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(token_ids) - seq_len, (num_samples,), generator=generator).tolist()
    windows = torch.stack([token_ids[s:s + seq_len] for s in starts])
    return [{"input_ids": windows[i:i + batch_size]} for i in range(0, num_samples, batch_size)]


def find_blocks(model: nn.Module, targets: list[str]) -> Optional[list[tuple[str, nn.Module, list[str]]]]:
    """The innermost `nn.ModuleList` holding every target, as (block name, block, its targets); None if none does."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            prefix = name + "." if name else ""
            if all(t.startswith(prefix) for t in targets) and (best is None or len(name) > len(best[0])):
                best = (name, module)
    if best is None:
        return None
    name, blocks = best
    prefix = name + "." if name else ""
    out = []
    for index, block in enumerate(blocks):
        inside = [t for t in targets if t.startswith(f"{prefix}{index}.")]
        out.append((f"{prefix}{index}", block, inside))
    return out


def _model_kwargs(model: nn.Module, batch: dict) -> dict:
    """`batch` as forward kwargs: tensors moved to the model's device (calibration data may stay on the CPU while
    the model sits on a GPU), the KV cache off."""
    device = next(model.parameters()).device
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False
    return kwargs


def _flat_mask(batch: dict) -> Optional[torch.Tensor]:
    mask = batch.get("attention_mask")
    return None if mask is None or mask.dim() != 2 else mask.reshape(-1).bool()


# batch keys of text alone: any other input (pixel_values, image_grid_thw, ...) may feed targets off the token sequence
TEXT_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids", "labels",
                         "decoder_input_ids", "decoder_attention_mask"})


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters not requiring grad inside the block (no weight gradient is built), their flags restored after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        model.requires_grad_(False)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _grad_zero(model: nn.Module) -> torch.Tensor:
    """A zero that requires grad: `_plus_zero` links a tensor to the autograd graph through it."""
    return torch.zeros((), device=next(model.parameters()).device, requires_grad=True)


def _plus_zero(tensor: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """`tensor` + `zero`: the same values, requiring grad (also under no_grad) without being a leaf, so in-place
    writes into it stay legal (Kosmos-2 writes its image features into the token embeddings)."""
    with torch.enable_grad():
        return tensor + zero.to(tensor.device, tensor.dtype)


def _off_text_targets(model: nn.Module, targets: list[str], batches: list[dict]) -> set[str]:
    """Targets whose inputs do not come from the token embeddings (a vision tower, a multimodal projector): the
    attention mask does not describe their rows, even where their number coincides with the mask's.

    One forward of the first batch with a 2-D mask and inputs besides text, stopped once every target and the token
    embeddings have run: a zero that requires grad is added to the embeddings' output (or to `inputs_embeds`), and a
    target is on the text if autograd links its input to that zero. Parameters are frozen and no activation is kept
    for a backward. No forward, and none off the text, for text-only batches; none either when the forward never
    reaches token embeddings (not found): the mask then applies wherever its number of rows matches.
    """
    batch = next((b for b in batches if _flat_mask(b) is not None and not set(b) <= TEXT_INPUTS), None)
    if batch is None:
        return set()
    kwargs = _model_kwargs(model, batch)
    marker = _grad_zero(model)
    token_ids = {kwargs[k].data_ptr() for k in ("input_ids", "decoder_input_ids")
                 if isinstance(kwargs.get(k), torch.Tensor)}
    try:
        embeddings = [model.get_input_embeddings()]
    except (AttributeError, NotImplementedError):  # CLIPModel: the embeddings that read the batch's token ids
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    embeddings = [m for m in embeddings if isinstance(m, nn.Module)]

    marked = []  # where the zero was added

    def mark(module, args, out):
        reads_ids = bool(args) and isinstance(args[0], torch.Tensor) and args[0].data_ptr() in token_ids
        if isinstance(out, torch.Tensor) and out.is_floating_point() and (len(embeddings) == 1 or reads_ids):
            marked.append(module)
            if len(seen) == len(targets):  # every target ran before the text did: none is on it
                raise _StopForward
            return _plus_zero(out, marker)
        return None

    seen, on_text, reaches = set(), set(), {}

    def hook_for(name: str):
        def hook(_module, args):
            seen.add(name)
            if args and _reaches(args[0].grad_fn, marker, reaches):
                on_text.add(name)
            if len(seen) == len(targets) and marked:
                raise _StopForward
        return hook

    handles = [model.get_submodule(t).register_forward_pre_hook(hook_for(t)) for t in targets]
    handles += [m.register_forward_hook(mark) for m in embeddings]
    try:
        with _frozen(model), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(lambda _t: None, lambda _p: None):
            for key in ("inputs_embeds", "decoder_inputs_embeds"):
                if isinstance(kwargs.get(key), torch.Tensor):
                    kwargs[key] = _plus_zero(kwargs[key], marker)
                    marked.append(key)
            _run_until_stopped(model, (), kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return seen - on_text if marked else set()  # token embeddings not found: keep the row-count rule


def _reaches(node, leaf: torch.Tensor, memo: dict) -> bool:
    """Whether autograd node `node` (a tensor's grad_fn; None for a tensor outside the graph) leads back to `leaf`.
    Iterative depth-first search over the graph, results memoised in `memo` across calls."""
    stack = [(node, False)]
    while stack:
        current, expanded = stack.pop()
        if current is None or (current in memo and not expanded):
            continue
        children = [child for child, _ in current.next_functions if child is not None]
        if expanded:
            memo[current] = getattr(current, "variable", None) is leaf or any(memo[child] for child in children)
            continue
        memo[current] = False  # in progress: a DAG never reaches it again from below
        stack.append((current, True))
        stack.extend((child, False) for child in children if child not in memo)
    return node is not None and memo[node]


def _reused_blocks(model: nn.Module, blocks: list[tuple[str, nn.Module, list[str]]], batch: dict) -> list[str]:
    """Names of the blocks that one forward pass over `batch` calls more than once (weights shared across depth, as
    in ALBERT): one block-by-block pass would see only their first call's inputs. The pass stops at the first reuse,
    or at the output head (no logits are computed)."""
    calls = {name: 0 for name, _, _ in blocks}

    def hook_for(name: str):
        def hook(_module, _args):
            calls[name] += 1
            if calls[name] > 1:
                raise _StopForward
        return hook

    def stop(_module, _args):
        if any(calls.values()):  # the output head, after the blocks (some models' "output embeddings" run first)
            raise _StopForward

    handles = [block.register_forward_pre_hook(hook_for(name)) for name, block, _ in blocks]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Module):
        handles.append(head.register_forward_pre_hook(stop))
    try:
        model(**_model_kwargs(model, batch))
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return [name for name, count in calls.items() if count > 1]


def _capture_block_calls(model: nn.Module, blocks: list[nn.Module], batches: list[dict],
                         run_blocks: bool = True) -> tuple[list[tuple], list[list[tuple]]]:
    """Per batch, the arguments each block is called with: the first block's `(args, kwargs)` in full, and the later
    blocks' as `(hidden_positional, args, kwargs)` without the hidden states (position 0, or the `hidden_states`
    keyword), which calibration computes itself through the replaced layers. Blocks of one model can get different
    arguments (the sliding-window and full-attention layers of Gemma or Qwen2: other masks, other rotary tables). The
    forward pass stops at the last block. Without `run_blocks` (blocks that hold no weights yet: streamed
    compression) each block's forward is replaced, for the pass, by one that records its arguments and returns its
    hidden states unchanged (later blocks' hidden states are discarded anyway): only the embeddings and what computes
    the blocks' other arguments (masks, rotary tables) run."""
    calls: list[list[tuple]] = []

    def record(index: int, args: tuple, kwargs: dict) -> None:
        if len(calls[-1]) != index:  # out of order: the check below reports it
            raise _StopForward
        if args:
            calls[-1].append((True, args if index == 0 else args[1:], kwargs))
        else:
            rest = kwargs if index == 0 else {k: v for k, v in kwargs.items() if k != "hidden_states"}
            calls[-1].append((False, (), rest))
        if index == len(blocks) - 1:
            raise _StopForward

    def stand_in(index: int):
        def forward(*args, **kwargs):
            record(index, args, kwargs)
            return args[0] if args else kwargs["hidden_states"]
        return forward

    if run_blocks:
        handles = [block.register_forward_pre_hook(lambda _m, args, kwargs, i=i: record(i, args, kwargs),
                                                   with_kwargs=True) for i, block in enumerate(blocks)]
    else:
        for i, block in enumerate(blocks):
            block.forward = stand_in(i)
    try:
        for i, batch in enumerate(batches):
            calls.append([])
            try:
                model(**_model_kwargs(model, batch))
            except _StopForward:
                if len(calls[i]) == len(blocks):
                    continue
            raise RuntimeError(f"Calibration batch {i} did not call the model's {len(blocks)} blocks in order, so "
                               f"they cannot be calibrated one after the other.")
    finally:
        if run_blocks:
            for handle in handles:
                handle.remove()
        else:
            for block in blocks:
                del block.forward  # the class's forward again
    return [first[1:] for first, *_ in calls], [later for _, *later in calls]


class _GramHooks:
    """Forward pre-hooks accumulating X^T X (float64) of each named Linear's input; targets that read the same input
    (q/k/v, gate/up) share one product per batch, and with `share` (each target called once per pass, on the input
    of the group's first) one sum: the same tensor in `grams`. Padding rows are dropped when a mask is set, unless
    `keeps_padding(name, x)` says the mask does not describe that input. With `stop_after`, the hook of that target
    ends the forward pass once its statistics are taken. With `rows_per_batch`, up to that many input rows of each
    batch (drawn without replacement, seeded by the batch's index) are kept too, in `samples` (float32)."""

    def __init__(self, modules: dict[str, nn.Module], stop_after: Optional[str] = None,
                 keeps_padding: Optional[Callable[[str, torch.Tensor], bool]] = None, share: bool = False,
                 rows_per_batch: int = 0) -> None:
        self.grams: dict[str, torch.Tensor] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}
        self.share = share
        self.mask: Optional[torch.Tensor] = None
        self.keeps_padding = keeps_padding
        self.rows_per_batch = rows_per_batch
        self._batch = -1
        self._products: dict = {}
        self._handles = [m.register_forward_pre_hook(self._hook(n, n == stop_after)) for n, m in modules.items()]

    def new_batch(self, mask: Optional[torch.Tensor]) -> None:
        self.mask, self._products, self._batch = mask, {}, self._batch + 1

    def _sample(self, flat: torch.Tensor) -> torch.Tensor:
        if flat.shape[0] <= self.rows_per_batch:
            return flat.clone()
        generator = torch.Generator().manual_seed(self._batch)
        return flat[torch.randperm(flat.shape[0], generator=generator)[:self.rows_per_batch].to(flat.device)]

    def _hook(self, name: str, stop: bool):
        def hook(_module, args):
            x = args[0]
            # keyed by address; the entry holds x so that address cannot be recycled by a later input this batch
            mask = None if self.keeps_padding is not None and self.keeps_padding(name, x) else self.mask
            key = (x.data_ptr(), tuple(x.shape), mask is None)
            if key not in self._products:
                flat = x.detach().reshape(-1, x.shape[-1])
                if mask is not None and flat.shape[0] == mask.numel():
                    flat = flat[mask.to(flat.device)]
                flat = flat.float()
                sample = self._sample(flat) if self.rows_per_batch else None
                # float32 product per batch, float64 sum (added in place, without a float64 copy of the product)
                self._products[key] = (x, flat.T @ flat, name, sample)
            _, product, first, sample = self._products[key]
            if self.share and first != name:  # the same input as an earlier target (q/k/v, gate/up): one sum
                self.grams[name] = self.grams[first]
                self.samples[name] = self.samples.get(first, [])
            elif name in self.grams:
                self.grams[name].add_(product)
                if sample is not None:
                    self.samples[name].append(sample)
            else:
                self.grams[name] = product.double()
                self.samples[name] = [] if sample is None else [sample]
            if stop:
                raise _StopForward
        return hook

    def remove(self) -> None:
        """Remove the hooks and drop the last batch's inputs and products (the sums stay in `grams`)."""
        for handle in self._handles:
            handle.remove()
        self._products = {}


def _check_all_ran(targets: list[str], seen) -> None:
    missing = sorted(set(targets) - set(seen))
    if missing:
        raise RuntimeError(f"Targets {missing} never ran on the calibration data, so they cannot be calibrated "
                           f"(e.g. a vision tower given text-only batches: add its inputs, such as pixel_values, to "
                           f"the calibration data, or exclude it with exclude_modules).")


def _execution_groups(model: nn.Module, block: nn.Module, names: list[str], args: tuple, kwargs: dict) -> list[list[str]]:
    """`names` in the order the block calls them, grouped by shared input tensor (q/k/v, gate/up)."""
    calls = []  # (name, input): holding the inputs keeps their addresses from being recycled during the pass
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: calls.append((n, a[0])))
               for n in names]
    try:
        block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    _check_all_ran(names, {n for n, _ in calls})
    groups, seen = [], set()
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        pointer = (x.data_ptr(), tuple(x.shape))
        if groups and groups[-1][1] == pointer:
            groups[-1][0].append(name)
        else:
            groups.append(([name], pointer))
    return [group for group, _ in groups]


def _run_until_stopped(block: nn.Module, args: tuple, kwargs: dict) -> None:
    try:
        block(*args, **kwargs)
    except _StopForward:
        pass


def block_grams(model: nn.Module, targets: list[str], batches: list[dict], desc: str = "Calibrating",
                progressbar: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Yield {target: X^T X} one group of targets at a time, in execution order (`block_statistics` without
    samples)."""
    for grams, _ in block_statistics(model, targets, batches, desc, progressbar):
        yield grams


class BlockStream:
    """Blocks whose weights stay on disk (streamed compression): `load(name, block)` gives a block its weights
    before it first runs, `release(name, block)` writes and frees it after its last run."""

    def load(self, name: str, block: nn.Module) -> None:
        raise NotImplementedError

    def release(self, name: str, block: nn.Module) -> None:
        raise NotImplementedError


def block_statistics(model: nn.Module, targets: list[str], batches: list[dict], desc: str = "Calibrating",
                     progressbar: bool = True, token_samples: int = 0, stream: Optional[BlockStream] = None
                     ) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Yield ({target: X^T X}, {target: sampled input rows (n, in), float32}) one group of targets at a time, in
    execution order; about `token_samples` rows per target, spread evenly over the batches (none when 0). After each
    yield the caller may replace the group's layers; later groups and blocks then see inputs computed through the
    replacements. Without a list of blocks, or when a block runs more than once per forward (weights shared across
    depth), all targets' statistics come from one pass over the whole model, every call of a shared layer summed.
    With a `stream` the blocks hold no weights until `stream.load`: their calls are recorded without running them
    (`_capture_block_calls(run_blocks=False)`), each block is loaded before its first group and released once the
    next block's inputs are computed; every target must sit in the list of blocks."""
    rows_per_batch = -(-token_samples // len(batches)) if token_samples else 0

    def statistics(hooks: _GramHooks) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        samples = {n: torch.cat(rows)[:token_samples] for n, rows in hooks.samples.items() if rows}
        return hooks.grams, samples

    blocks = find_blocks(model, targets)
    if stream is not None and blocks is None:
        raise ValueError("streamed compression needs every target inside one list of blocks (decoder layers).")
    with torch.no_grad():
        off_text = _off_text_targets(model, targets, batches)
        if stream is None and blocks is not None and _reused_blocks(model, blocks, batches[0]):
            blocks = None  # a shared block's statistics are the sum over all its calls: the whole-model pass takes them
        if blocks is None:  # one pass over the whole model, every target's statistics at once
            decoder_rule, handles = _encoder_decoder_padding_rule(model)
            hooks = _GramHooks({t: model.get_submodule(t) for t in targets}, keeps_padding=lambda name, x: (
                name in off_text or (decoder_rule is not None and decoder_rule(name, x))),
                rows_per_batch=rows_per_batch)
            try:
                for batch in tqdm(batches, desc=f"{desc} (whole model)", disable=not progressbar):
                    hooks.new_batch(_flat_mask(batch))
                    model(**_model_kwargs(model, batch))
            finally:
                hooks.remove()
                for handle in handles:
                    handle.remove()
            _check_all_ran(targets, hooks.grams)
            yield statistics(hooks)
            return
        # `inputs` alone holds the hidden states: each block's advance frees the previous ones
        inputs, later_calls = _capture_block_calls(model, [block for _, block, _ in blocks], batches,
                                                   run_blocks=stream is None)
        masks = [_flat_mask(batch) for batch in batches]
        for index, (name, block, inside) in enumerate(tqdm(blocks, desc=desc, disable=not progressbar)):
            if stream is not None:
                stream.load(name, block)
            groups = _execution_groups(model, block, inside, *inputs[0]) if inside else []
            for group in groups:
                # a group is the targets that read one input tensor (_execution_groups), each once: one sum
                hooks = _GramHooks({t: model.get_submodule(t) for t in group}, stop_after=group[-1], share=True,
                                   keeps_padding=lambda name, _x: name in off_text, rows_per_batch=rows_per_batch)
                try:
                    for (args, kwargs), mask in zip(inputs, masks):
                        hooks.new_batch(mask)
                        _run_until_stopped(block, args, kwargs)
                finally:
                    hooks.remove()
                yield statistics(hooks)
            if index + 1 < len(blocks):  # later_calls[b][index]: the arguments of block index + 1
                inputs = [_advance(block, args, kwargs, later[index])
                          for (args, kwargs), later in zip(inputs, later_calls)]
            if stream is not None:
                stream.release(name, block)


def _encoder_decoder_padding_rule(model: nn.Module) -> tuple[Optional[Callable[[str, torch.Tensor], bool]], list]:
    """For an encoder-decoder: (keeps_padding, hook handles). The attention mask describes the encoder's rows and
    the encoder output that cross-attention reads, not the decoder's own inputs, which keep their padding. For other
    models: (None, [])."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False) or not hasattr(model, "get_encoder"):
        return None, []
    encoder_output = {}
    handle = model.get_encoder().register_forward_hook(
        lambda _m, _a, out: encoder_output.update(ptr=out[0].data_ptr()))

    def keeps_padding(name: str, x: torch.Tensor) -> bool:
        return "decoder" in name.split(".") and x.data_ptr() != encoder_output.get("ptr")

    return keeps_padding, [handle]


def _advance(block: nn.Module, args: tuple, kwargs: dict, next_call: tuple) -> tuple:
    """Run `block` and return the (args, kwargs) of the next block: its recorded arguments (`next_call`, from
    `_capture_block_calls`) with this block's output as the hidden states."""
    out = block(*args, **kwargs)
    hidden = out[0] if isinstance(out, (tuple, list)) else out
    positional, next_args, next_kwargs = next_call
    if positional:
        return (hidden, *next_args), next_kwargs
    return (), {**next_kwargs, "hidden_states": hidden}


def _unpadded_row(batch: dict, row: int, encoder_decoder: bool) -> Optional[dict]:
    """Row `row` of `batch` as a batch of one, its padding positions (attention_mask 0) cut from the inputs the mask
    describes: every sequence-long tensor of a decoder-only model, the encoder side (not `decoder_*`, not the
    labels) of an encoder-decoder. None when the row is all padding."""
    single = {k: v[row:row + 1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    mask = single.get("attention_mask")
    if mask is None or mask.dim() != 2 or bool(mask.all()):
        return single
    keep = mask[0].bool()
    if not keep.any():
        return None

    def described(key: str, value) -> bool:
        if encoder_decoder and (key.startswith("decoder_") or key == "labels"):
            return False
        return isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == keep.numel()

    return {k: v[:, keep] if described(k, v) else v for k, v in single.items()}


def _splits_by_row(batch: dict) -> bool:
    """Whether every tensor of `batch` has one entry per example along dim 0 (a VLM's flattened image patches, or
    several images per example, do not)."""
    return len({v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0}) <= 1


def _sampled_label_loss(logits: torch.Tensor, generator: torch.Generator, regression: bool,
                        keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The model's negative log-likelihood of targets drawn from its own predictive distribution (float32 logits
    (..., K)): a categorical over softmax(logits), or for a regression head a unit Gaussian around the outputs,
    whose loss 0.5 ||logits - y||^2 has the gradient -eps, eps ~ N(0, I) (a cross-entropy over one logit would have
    none). With `keep` (a flat mask over the positions of per-token logits), the other positions are left out."""
    if keep is not None and logits[..., 0].numel() == keep.numel():
        logits = logits.reshape(-1, logits.shape[-1])[keep.to(logits.device)]
    if regression:
        noise = torch.randn(logits.shape, generator=generator).to(logits.device)
        return 0.5 * (logits - (logits.detach() + noise)).square().sum()
    probs = logits.detach().softmax(-1).reshape(-1, logits.shape[-1])
    labels = torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device).view(-1)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, reduction="sum")


def output_sensitivity(model: nn.Module, targets: list[str], batches: list[dict], seed: int = 0,
                       progressbar: bool = True) -> dict[str, float]:
    """Mean squared loss gradient per output element of each target, E ||dL/dy||^2 / out_features: the per-layer
    Fisher scalar f_l with which an output error delta costs about f_l ||delta||^2 of loss.

    The loss is the model's own negative log-likelihood of targets sampled from its predictions (the true Fisher,
    no labels needed; `_sampled_label_loss`). Each example runs alone without its padding, so padding enters neither
    the loss nor the average. A batch whose inputs cannot be split by example (a VLM's flattened image patches) runs
    whole: its padding positions are left out of the loss, and out of the averages of the targets on the text
    (`_off_text_targets`). Parameters are frozen for the pass, so no weight gradient is allocated.
    """
    sums = {t: 0.0 for t in targets}
    counts = {t: 0 for t in targets}
    generator = torch.Generator().manual_seed(seed)
    config = getattr(model, "config", None)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    regression = getattr(config, "problem_type", None) == "regression" or getattr(config, "num_labels", 2) == 1
    zero = _grad_zero(model)
    ran = set()
    # batches that cannot be split by example run whole; their padding is left out of the text targets' averages
    whole = {"keep": None, "off_text": set()}
    if not all(_splits_by_row(batch) for batch in batches):
        whole["off_text"] = _off_text_targets(model, targets, batches)

    def grad_hook(name):
        def forward_hook(_module, _args, output):
            ran.add(name)

            def record(grad):
                rows = grad.detach().float().reshape(-1, grad.shape[-1])
                keep = whole["keep"]
                if keep is not None and name not in whole["off_text"] and rows.shape[0] == keep.numel():
                    rows = rows[keep.to(rows.device)]
                sums[name] += float(rows.square().sum())
                counts[name] += rows.numel()
            if not output.requires_grad:  # the first target on its path (parameters are frozen), or run under no_grad
                output = _plus_zero(output, zero)
            output.register_hook(record)
            return output
        return forward_hook

    handles = [model.get_submodule(t).register_forward_hook(grad_hook(t)) for t in targets]
    try:
        with _frozen(model), torch.enable_grad():  # also when called under torch.no_grad()
            for batch in tqdm(batches, desc="Output sensitivity", disable=not progressbar):
                if _splits_by_row(batch):
                    size = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
                    runs = [(_unpadded_row(batch, row, encoder_decoder), None) for row in range(size)]
                else:
                    runs = [(batch, _flat_mask(batch))]
                for inputs, keep in runs:
                    if inputs is None:  # a row of padding only
                        continue
                    whole["keep"] = keep
                    outputs = model(**_model_kwargs(model, inputs))
                    if getattr(outputs, "logits", None) is None:
                        raise ValueError(f"rank_allocation='activation' needs a model whose outputs have logits "
                                         f"(a ...ForCausalLM / ...ForSequenceClassification class); "
                                         f"{type(model).__name__} returns {type(outputs).__name__}. Load the model "
                                         f"with its head, or use rank_allocation='energy' / 'uniform'.")
                    _sampled_label_loss(outputs.logits.float(), generator, regression, keep).backward()
    finally:
        for handle in handles:
            handle.remove()
    _check_all_ran(targets, ran)
    return {t: sums[t] / max(counts[t], 1) for t in targets}  # 0 for a target whose output the logits never use
