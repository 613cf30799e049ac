"""`InherConv2d`: the gated asymmetric layer for a dense `nn.Conv2d` (groups = 1).

The kernel W (C_out, C_in, k, k) is the linear map W·unfold(x) over k×k patches, so its inheritance is the Linear
one on W reshaped to (C_out, C_in·k·k):
    h = W_d * x                     W_d: a k×k conv to r channels, the original stride / padding / dilation
    g = softmax(W_g h + b_g)        per spatial position, a 1×1 conv on the latent
    y = Σ_m g_m (W_u^m h + b_m)     the M heads: one 1×1 conv (M·r -> C_out) over g ⊗ h
At the SVD init every head is U_r Σ_r^½ and W_d = Σ_r^½ V_rᵀ (reshaped to r × C_in × k × k): the layer computes the
convolution with the best rank-r approximation of the reshaped kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layer import InherLinear


class InherConv2d(InherLinear):
    """InherLinear over k×k patches: `in_features` is C_in·k·k (the reshaped kernel's width), `out_features` C_out.
    Only the asymmetric structure and a gate reading the latent exist for convolutions.

    Input (N, C_in, H, W) -> output (N, C_out, H', W'), H', W' as the dense convolution's.
    """

    def __init__(self, dense: nn.Conv2d, rank: int, num_heads: int = 2, gate: str = "softmax",
                 gate_input: str = "latent", structure: str = "asymmetric", device=None, dtype=None) -> None:
        if dense.groups != 1 or dense.padding_mode != "zeros":
            raise ValueError(f"InherConv2d replaces convolutions with groups=1 and zero padding; got groups="
                             f"{dense.groups}, padding_mode={dense.padding_mode!r} (depthwise and grouped convolutions "
                             f"are not inherited).")
        if gate_input != "latent" or structure != "asymmetric":
            raise ValueError(f"InherConv2d supports gate_input='latent' and structure='asymmetric' only; got "
                             f"gate_input={gate_input!r}, structure={structure!r}.")
        nn.Module.__init__(self)
        c_out, c_in, kh, kw = dense.weight.shape
        for name, value in (("rank", rank), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"InherConv2d.{name}={value!r} must be an int >= 1.")
        self.in_features, self.out_features = c_in * kh * kw, c_out
        self.rank, self.num_heads = rank, num_heads
        self.gate, self.gate_input, self.structure = gate, gate_input, structure
        factory = {"device": device, "dtype": dtype}
        self.inher_down = nn.Conv2d(c_in, rank, (kh, kw), stride=dense.stride, padding=dense.padding,
                                    dilation=dense.dilation, bias=False, **factory)
        self.inher_up = nn.Conv2d(num_heads * rank, c_out, 1, bias=False, **factory)
        self.inher_gate = nn.Conv2d(rank, num_heads, 1, **factory) if gate == "softmax" and num_heads > 1 else None
        self.inher_bias = nn.Parameter(torch.empty(num_heads, c_out, **factory)) if dense.bias is not None else None
        self.reset_parameters()

    # The replaced convolution's geometry, for modelling code that reads it (MobileNet's TF-style padding does).
    in_channels = property(lambda self: self.inher_down.in_channels)
    out_channels = property(lambda self: self.out_features)
    kernel_size = property(lambda self: self.inher_down.kernel_size)
    stride = property(lambda self: self.inher_down.stride)
    padding = property(lambda self: self.inher_down.padding)
    dilation = property(lambda self: self.inher_down.dilation)
    groups = property(lambda self: 1)

    def gate_weights(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Head weights g: (N, M, H', W') from the gate, or a constant (M,) of 1/M when there is none."""
        if self.inher_gate is None:
            return torch.full((self.num_heads,), 1.0 / self.num_heads, dtype=h.dtype, device=h.device)
        logits = self.inher_gate(h)
        if logits.dtype in (torch.float16, torch.bfloat16):  # half-precision softmax loses the sum-to-one property
            return torch.softmax(logits, dim=1, dtype=torch.float32).to(h.dtype)
        return torch.softmax(logits, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inher_down(x)
        bias = self.inher_bias
        if self.num_heads == 1:
            return F.conv2d(h, self.inher_up.weight, None if bias is None else bias[0])
        g = self.gate_weights(x, h)
        if g.dim() == 1:  # gate "none": the mean of the heads
            y = self.inher_up(h.repeat(1, self.num_heads, 1, 1)) / self.num_heads
            return y if bias is None else y + (g @ bias.to(y.dtype))[:, None, None]
        y = self.inher_up((g.unsqueeze(2) * h.unsqueeze(1)).flatten(1, 2))  # (N, M·r, H', W') = g ⊗ h
        return y if bias is None else y + torch.einsum("nmhw,mo->nohw", g, bias.to(y.dtype))

    def extra_repr(self) -> str:
        down = self.inher_down
        return (f"in_channels={down.in_channels}, out_channels={self.out_features}, kernel_size={down.kernel_size}, "
                f"stride={down.stride}, padding={down.padding}, rank={self.rank}, num_heads={self.num_heads}, "
                f"bias={self.inher_bias is not None}, gate={self.gate!r}")
