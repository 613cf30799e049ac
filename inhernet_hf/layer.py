"""`InherLinear`: the gated asymmetric layer that replaces a dense `nn.Linear` / `Conv1D`.

    h = W_d x                       W_d: (r, in), shared            (symmetric: (M*r, in), one block per head)
    g = softmax(W_g z + b_g)        z = h (gate_input="latent") or x ("input"); M logits per token
    y = sum_m g_m (W_u^m h + b_m) = [W_u^1 ... W_u^M] (g (x) h) + g @ B

The heads are stored concatenated in one `nn.Linear(M*r, out)` so the mixture is a single matmul over
the (..., M*r) input `g (x) h`; no (..., M, out) tensor is ever built.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import (GATE_CHOICES, GATE_INPUT_CHOICES, HEAD_INIT_CHOICES, INIT_CHOICES, STRUCTURE_CHOICES,
                     _check_choice)
from .factor import truncated_svd, whitened_svd
from .heads import FittedHeads, fit_gated_heads


def inher_num_params(
    in_features: int,
    out_features: int,
    rank: int,
    num_heads: int,
    bias: bool,
    gate: str = "softmax",
    gate_input: str = "latent",
    structure: str = "asymmetric",
) -> int:
    """Exact number of parameters an `InherLinear` of this shape holds."""
    latent = rank * num_heads if structure == "symmetric" else rank
    n = latent * in_features + num_heads * rank * out_features
    if bias:
        n += num_heads * out_features
    if gate == "softmax" and num_heads > 1:
        n += num_heads * ((latent if gate_input == "latent" else in_features) + 1)
    return n


class InherLinear(nn.Module):
    """Shared down-projection, `num_heads` up-projection heads, per-token softmax gate.

    Args:
        in_features, out_features: shape of the dense layer it replaces (y = W x + b, W: (out, in)).
        rank: r, width of the latent h.
        num_heads: M. With M = 1 there is no gate (a plain rank-r factorisation).
        bias: whether each head carries a bias (the teacher's bias, copied per head).
        gate: "softmax" or "none" (unweighted mean of the heads).
        gate_input: "latent" (gate reads h) or "input" (gate reads x).
        structure: "asymmetric" (shared W_d) or "symmetric" (one W_d block per head).

    Input (..., in) -> output (..., out), any leading shape.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        num_heads: int = 2,
        bias: bool = True,
        gate: str = "softmax",
        gate_input: str = "latent",
        structure: str = "asymmetric",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("rank", rank),
                            ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"InherLinear.{name}={value!r} must be an int >= 1.")
        _check_choice("gate", gate, GATE_CHOICES, "InherLinear")
        _check_choice("gate_input", gate_input, GATE_INPUT_CHOICES, "InherLinear")
        _check_choice("structure", structure, STRUCTURE_CHOICES, "InherLinear")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.num_heads = rank, num_heads
        self.gate, self.gate_input, self.structure = gate, gate_input, structure
        factory = {"device": device, "dtype": dtype}
        latent = rank * num_heads if structure == "symmetric" else rank
        self.inher_down = nn.Linear(in_features, latent, bias=False, **factory)
        self.inher_up = nn.Linear(num_heads * rank, out_features, bias=False, **factory)
        self.inher_gate = None
        if gate == "softmax" and num_heads > 1:
            gate_in = latent if gate_input == "latent" else in_features
            self.inher_gate = nn.Linear(gate_in, num_heads, **factory)
        self.inher_bias = nn.Parameter(torch.empty(num_heads, out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform init of every part (the "random" init: same structure, no inheritance)."""
        for module in (self.inher_down, self.inher_up, self.inher_gate):
            if module is not None:
                module.reset_parameters()
        if self.inher_bias is not None:
            bound = 1.0 / math.sqrt(self.num_heads * self.rank)  # the up-projection's fan-in
            nn.init.uniform_(self.inher_bias, -bound, bound)

    @property
    def weight(self) -> torch.Tensor:
        """The up-projection's weight (out, M*r), for modelling code that reads a projection's
        `.weight.dtype` / `.device` (T5's feed-forward does). The layer holds no dense (out, in) weight."""
        return self.inher_up.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The head biases (M, out), or None: for modelling code that initialises a projection's `.bias` (SigLIP's
        `_init_weights` does; transformers skips parameters already loaded)."""
        return self.inher_bias

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def inherit_(
        self,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        init: str = "svd",
        head_init: str = "balanced",
        svd_niter: int = 4,
        gram: Optional[torch.Tensor] = None,
        damping: float = 0.0,
    ) -> Optional[float]:
        """Initialise from a teacher weight (out, in) and bias (out,). Returns the energy kept (None for "random").

        init: "svd" / "svd_lowrank" factor W; "whitened" factors W L with L L^T = `gram` (X^T X of the layer's
        calibration inputs, `damping` as in InherConfig.calibration_damping); "random" keeps the Kaiming init.
        The factorisation runs in float64 on the weight's device; the factors are cast to this layer's dtype.
        """
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"Teacher weight shape {tuple(weight.shape)} does not match InherLinear "
                f"(out={self.out_features}, in={self.in_features})."
            )
        _check_choice("init", init, INIT_CHOICES, "InherLinear.inherit_")
        _check_choice("head_init", head_init, HEAD_INIT_CHOICES, "InherLinear.inherit_")  # before the SVD, not after
        if init != "random" and self.rank > min(weight.shape):
            raise ValueError(f"rank={self.rank} exceeds min(out, in)={min(weight.shape)}: a truncated SVD of the "
                             f"{tuple(weight.shape)} teacher weight has at most that many factors.")
        if init == "random":
            self.reset_parameters()
            return None
        if init == "whitened":
            if gram is None:
                raise ValueError("init='whitened' needs `gram`, the X^T X of the layer's calibration inputs.")
            u, s, vh, energy = whitened_svd(weight, gram, self.rank, damping)
        else:
            u, s, vh, energy = truncated_svd(weight, self.rank, init, svd_niter)
        self.set_factors_(u, s, vh, bias, head_init)
        return energy

    @torch.no_grad()
    def fit_heads_(self, weight: torch.Tensor, inputs: torch.Tensor) -> FittedHeads:
        """head_init="fitted": with this (balanced, identical-heads) layer's down-projection fixed, fit the gate and
        the heads to `weight` (out, in) on `inputs` (N, in), calibration rows of the layer's input (heads.py). The
        teacher bias stays in every head. Returns the fit, its objective <= the identical heads'."""
        if self.structure != "asymmetric" or self.gate != "softmax" or self.gate_input != "latent":
            raise ValueError("fit_heads_ needs structure='asymmetric', gate='softmax' and gate_input='latent'.")
        m, r = self.num_heads, self.rank
        down = self.inher_down.weight.reshape(r, -1)
        fit = fit_gated_heads(inputs.to(down.device), weight.to(down.device), down,
                              self.inher_up.weight[:, :r], m)
        if m > 1:
            self.inher_gate.weight.copy_(fit.gate_weight)
            self.inher_gate.bias.copy_(fit.gate_bias)
            self.inher_up.weight.copy_(fit.heads.permute(1, 0, 2).reshape(self.out_features, m * r))
        return fit

    @torch.no_grad()
    def set_factors_(
        self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, bias: Optional[torch.Tensor], head_init: str
    ) -> None:
        """Write the factors of W_r = U_r diag(S_r) Vh_r (u: (out, r), s: (r,), vh: (r, in)) into the down-projection
        and every head, split as `head_init` says, and copy the teacher's bias into every head."""
        _check_choice("head_init", head_init, HEAD_INIT_CHOICES, "InherLinear.set_factors_")
        m = self.num_heads
        if head_init in ("balanced", "fitted"):  # "fitted" starts balanced; `fit_heads_` fits gate and heads after
            down, head = s.sqrt()[:, None] * vh, u * s.sqrt()
        elif head_init == "paper":
            down, head = s.sqrt()[:, None] * vh, u * s.sqrt() / m
        else:  # "demo"
            down, head = vh, u * s / m
        if self.structure == "symmetric":
            down = down.repeat(m, 1)
        self.inher_down.weight.copy_(down.view_as(self.inher_down.weight))  # a conv down-projection: (r, in, k, k)
        self.inher_up.weight.copy_(head.repeat(1, m).view_as(self.inher_up.weight))
        if self.inher_bias is not None:
            if bias is None:
                self.inher_bias.zero_()
            else:
                self.inher_bias.copy_(bias.detach().expand(m, -1))

    @torch.no_grad()
    def dense_equivalent(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(W (out, in), b (out,) or None) in float64 of the dense layer computing exactly this one, when its output
        does not depend on the gate: M = 1, gate "none" (the mean of the heads), or M identical asymmetric heads and
        biases (as after inheritance, before training). Otherwise a ValueError: a per-token softmax mixture of
        different heads is a nonlinear function of x, which no dense matrix computes."""
        m, r = self.num_heads, self.rank
        down = self.inher_down.weight.double().flatten(1)  # a conv's (r, in, k, k) as (r, in·k·k)
        heads = self.inher_up.weight.double().flatten(1).split(r, dim=1)
        bias = None if self.inher_bias is None else self.inher_bias.double()
        downs = down.split(r, dim=0) if self.structure == "symmetric" else [down] * m
        if self.inher_gate is not None:
            same = all(torch.equal(h, heads[0]) for h in heads) and (bias is None or bool((bias == bias[0]).all()))
            if self.structure == "symmetric" or not same:
                raise ValueError(f"this layer mixes {m} different heads with a per-token softmax gate: its output is "
                                 f"not a linear function of x, so no dense weight computes it exactly (only M = 1, "
                                 f"gate='none', or identical heads dequantize).")
            return heads[0] @ down, None if bias is None else bias[0]
        weight = sum(h @ d for h, d in zip(heads, downs)) / m
        return weight, None if bias is None else bias.mean(dim=0)

    def gate_weights(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Head weights g: (..., M) from the gate, or a constant (M,) of 1/M when there is none."""
        if self.inher_gate is None:
            return torch.full((self.num_heads,), 1.0 / self.num_heads, dtype=h.dtype, device=h.device)
        logits = self.inher_gate(h if self.gate_input == "latent" else x)
        if logits.dtype in (torch.float16, torch.bfloat16):  # half-precision softmax loses the sum-to-one property
            return torch.softmax(logits, dim=-1, dtype=torch.float32).to(h.dtype)
        return torch.softmax(logits, dim=-1)  # one op: batch-1 decode is bound by ops per layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inher_down(x)
        if self.num_heads == 1:
            return F.linear(h, self.inher_up.weight, None if self.inher_bias is None else self.inher_bias[0])
        g = self.gate_weights(x, h)
        if self.structure == "symmetric":
            mixed = g.unsqueeze(-1) * h.unflatten(-1, (self.num_heads, self.rank))
        else:
            mixed = g.unsqueeze(-1) * h.unsqueeze(-2)
        y = self.inher_up(mixed.flatten(-2))
        if self.inher_bias is None:
            return y
        bias = self.inher_bias.to(y.dtype)  # a no-op unless autocast made y half precision (in-place ops do not cast)
        if g.dim() == 1:  # gate "none": the same mixture of the head biases for every token
            return y + g.to(y.dtype) @ bias
        # y += g @ B in place: no (..., out) temporaries besides y (the up-projection does not need y for backward)
        y.view(-1, self.out_features).addmm_(g.reshape(-1, self.num_heads).to(y.dtype), bias)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"num_heads={self.num_heads}, bias={self.inher_bias is not None}, gate={self.gate!r}, "
            f"gate_input={self.gate_input!r}, structure={self.structure!r}"
        )
