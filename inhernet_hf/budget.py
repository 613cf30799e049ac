"""From `r` / `target_ratio` / `rank_pattern` to per-layer ranks: uniform per shape, or allocated greedily
from singular spectra under the global parameter budget."""

from __future__ import annotations

import heapq
import math
import re
from typing import Callable, Optional

import torch
from torch import nn

from .config import InherConfig
from .layer import inher_num_params
from .report import LayerRecord, dense_param_count
from .targets import dense_weight


def pattern_matches(key: str, name: str) -> bool:
    """PEFT's rank_pattern rule: the key, a regex, matches the end of the full module name at a dot boundary."""
    return re.fullmatch(rf"(.*\.)?(?:{key})", name) is not None


def rank_request(name: str, config: InherConfig) -> tuple[int | float, bool]:
    """(rank or ratio, whether it comes from `rank_pattern`): the first matching key, else the global value."""
    for key, value in config.rank_pattern.items():
        if pattern_matches(key, name):
            return value, True
    return (config.r if config.r is not None else config.target_ratio), False


def param_counter(record: LayerRecord, config: InherConfig) -> Callable[[int], int]:
    """params(rank) of an InherLinear replacing this layer (affine in the rank)."""
    return lambda rank: inher_num_params(record.in_features, record.out_features, rank, config.num_heads,
                                         record.bias, config.gate, config.gate_input, config.structure)


def _round_rank(rank: float, config: InherConfig) -> int:
    step = config.rank_multiple
    return max(math.ceil(config.min_rank / step) * step, int(round(rank / step)) * step)


def plan_layer(name: str, module: nn.Module, config: InherConfig) -> LayerRecord:
    """Rank and parameter count of one target under uniform allocation; a ratio's rank depends on the shape only."""
    out_f, in_f = dense_weight(module).shape
    has_bias = module.bias is not None
    dense = dense_param_count(in_f, out_f, has_bias)
    record = LayerRecord(name, in_f, out_f, has_bias, None, config.num_heads, dense, dense)
    count = param_counter(record, config)
    request, _ = rank_request(name, config)
    set_rank(record, request if isinstance(request, int) else _ratio_rank(request, record, count, config), count)
    return record


def _ratio_rank(ratio: float, record: LayerRecord, count: Callable[[int], int], config: InherConfig) -> int:
    """The allowed rank nearest to the solution of params(rank) = ratio * dense."""
    return _round_rank((ratio * record.dense_params - count(0)) / (count(1) - count(0)), config)


def fit_uniform_ranks(records: list[LayerRecord], config: InherConfig) -> None:
    """Bring uniform ranks within their budget: rounding to the nearest allowed rank can keep more than the ratio asks
    (SmolLM2 at 0.8 with 3 heads and rank_multiple 16: 0.827). For each requested ratio (`target_ratio`, or a float in
    `rank_pattern`), while its layers hold more than ratio * their dense parameters, one layer shape goes down one
    `rank_multiple` step: of the shapes rounded up (or kept dense) the one freeing the fewest parameters that still
    closes the gap, else the one furthest above its share; only when none is left do the others go below the ratio.
    Every layer of a shape keeps one rank. Raises when `min_rank` stops it above the budget. Mutates `records`."""
    shapes: dict[tuple[float, bool], dict[tuple, list[LayerRecord]]] = {}
    for record in records:
        request, from_pattern = rank_request(record.name, config)
        if not isinstance(request, int):
            key = (record.in_features, record.out_features, record.bias)
            shapes.setdefault((request, from_pattern), {}).setdefault(key, []).append(record)
    floor = _round_rank(config.min_rank, config)
    for (ratio, from_pattern), groups in shapes.items():
        count = {key: param_counter(group[0], config) for key, group in groups.items()}
        rank = {key: _ratio_rank(ratio, group[0], count[key], config) for key, group in groups.items()}

        def excess(key: tuple) -> float:
            return sum(r.params - ratio * r.dense_params for r in groups[key])

        while (over := sum(excess(key) for key in groups)) > 0:
            lowerable = [key for key in groups if rank[key] - config.rank_multiple >= floor]
            if not lowerable:
                held = sum(r.params for g in groups.values() for r in g)
                budget = ratio * sum(r.dense_params for g in groups.values() for r in g)
                asked = f"the rank_pattern ratio {ratio}" if from_pattern else f"target_ratio={ratio}"
                raise ValueError(f"{asked} cannot be met with rank_allocation='uniform': at "
                                 f"min_rank={config.min_rank} (rank_multiple={config.rank_multiple}) its layers hold "
                                 f"{held:,} parameters, above the budget of {int(budget):,}. Lower min_rank / "
                                 f"rank_multiple or raise the ratio.")
            rounded_up = [key for key in lowerable if excess(key) > 0]
            candidates = rounded_up or lowerable  # others go below the ratio only to pay for shapes that cannot
            saved = {k: sum(r.params for r in groups[k]) - len(groups[k]) * count[k](rank[k] - config.rank_multiple)
                     for k in candidates}  # what one step down frees (a dense-kept layer: all it holds beyond that)
            enough = [k for k in candidates if saved[k] >= over]
            key = min(enough, key=saved.get) if enough else max(candidates, key=excess)
            rank[key] -= config.rank_multiple
            for record in groups[key]:
                set_rank(record, rank[key], count[key])


def set_rank(record: LayerRecord, rank: Optional[int], count: Callable[[int], int], note: str = "") -> None:
    """Give `record` this rank, or keep it dense (rank None) when the inherited form would not be smaller."""
    if rank is not None and rank <= min(record.in_features, record.out_features) and count(rank) < record.dense_params:
        record.rank, record.params, record.note = rank, count(rank), ""
    else:
        record.rank, record.params = None, record.dense_params
        record.note = note or f"rank {rank} would hold {count(rank):,} >= {record.dense_params:,} dense params"


def allocate_ranks(records: list[LayerRecord], gains: dict[str, torch.Tensor], config: InherConfig) -> None:
    """Distribute `target_ratio` of the targets' parameters by greedy marginal gain per parameter.

    `gains[name][k]` is what keeping rank k+1 of that layer is worth (non-increasing in k), on one scale across
    layers. Ranks move in steps of `rank_multiple` from `min_rank`; a layer whose next step would not shrink it
    can instead go back to dense (all its remaining gain for the remaining parameters). `rank_pattern` layers
    keep their exact rank. Mutates `records`.
    """
    budget = config.target_ratio * sum(r.dense_params for r in records)
    step = config.rank_multiple
    start = _round_rank(config.min_rank, config)
    used, heap, states = 0, [], {}
    pattern_params = sum(r.params for r in records if rank_request(r.name, config)[1])
    if pattern_params > budget:
        raise ValueError(f"target_ratio={config.target_ratio} cannot be met: the rank_pattern layers alone hold "
                         f"{pattern_params:,} parameters, above the budget of {int(budget):,} for all targets.")
    for record in records:
        if rank_request(record.name, config)[1]:  # rank_pattern: already planned exactly
            used += record.params
            continue
        count = param_counter(record, config)
        top = min(record.in_features, record.out_features)
        if start > top or count(start) >= record.dense_params:
            set_rank(record, start, count)
            used += record.params
            continue
        gain = gains[record.name].to(torch.float64).cpu()
        cumulative = torch.cat([torch.zeros(1, dtype=gain.dtype), gain.cumsum(0)])
        set_rank(record, start, count)
        used += record.params
        states[record.name] = (record, count, cumulative, top)
        _push_next(heap, record, count, cumulative, top, step)
    if used > budget:
        raise ValueError(
            f"target_ratio={config.target_ratio} cannot be met: min_rank={config.min_rank} (rank_multiple={step}), "
            f"the rank_pattern overrides and the layers that cannot shrink already hold {used:,} parameters, above the "
            f"budget of {int(budget):,}. Lower min_rank / rank_pattern or raise target_ratio.")
    while heap:
        _, name, new_rank = heapq.heappop(heap)
        record, count, cumulative, top = states[name]
        new_params = record.dense_params if new_rank is None else count(new_rank)
        if used + new_params - record.params > budget:
            continue  # this layer's next step does not fit; smaller steps of other layers may
        used += new_params - record.params
        if new_rank is None:
            set_rank(record, None, count, note=f"kept dense by rank_allocation={config.rank_allocation!r}")
        else:
            set_rank(record, new_rank, count)
            _push_next(heap, record, count, cumulative, top, step)


def _push_next(heap: list, record: LayerRecord, count: Callable[[int], int], cumulative: torch.Tensor, top: int,
               step: int) -> None:
    """Queue the layer's next move: `step` more ranks, or back to dense once more ranks would not shrink it."""
    rank = record.rank
    nxt = rank + step
    if nxt <= top and count(nxt) < record.dense_params:
        gain = float(cumulative[nxt] - cumulative[rank])
        heapq.heappush(heap, (-gain / (count(nxt) - record.params), record.name, nxt))
    else:
        gain = float(cumulative[-1] - cumulative[rank])
        heapq.heappush(heap, (-gain / max(record.dense_params - record.params, 1), record.name, None))
