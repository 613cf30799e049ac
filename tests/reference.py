"""Float64 references shared by the tests, and the offline real models they use."""

import pytest
import torch

from inhernet_hf.offline_models import SMOLLM2_GGUF, minilm_path  # noqa: F401  (re-exported for the tests)
from inhernet_hf.offline_models import smollm2_path


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_llama(vocab_size: int = 64, hidden_size: int = 32, num_hidden_layers: int = 2, **config):
    """A random LlamaForCausalLM (torch seed 0) with grouped-query attention (4 query, 2 key/value heads) and an MLP
    twice as wide as `hidden_size`; `config` adds or overrides LlamaConfig fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{
        "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_hidden_layers, "num_attention_heads": 4, "num_key_value_heads": 2, **config}))


def rank_r_reference(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """U_r S_r V_r^T in float64: the best rank-r approximation of `weight` (out, in)."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def gated_sum(layer, x: torch.Tensor, p: dict) -> torch.Tensor:
    """sum_m g_m (W_u^m h_m + b_m), head by head, from the parameters `p` (name -> tensor) of an InherLinear: h_m is
    the shared latent W_d x (asymmetric) or head m's own block of it (symmetric); g is the softmax gate on h or x
    (gate_input), or 1/M without a gate. The reference for the layer's single-matmul forward."""
    m_heads, rank = layer.num_heads, layer.rank
    h = x @ p["inher_down.weight"].T
    if "inher_gate.weight" in p:
        z = h if layer.gate_input == "latent" else x
        g = torch.softmax(z @ p["inher_gate.weight"].T + p["inher_gate.bias"], dim=-1)
    else:
        g = torch.full((*h.shape[:-1], m_heads), 1.0 / m_heads, dtype=h.dtype)
    latents = h.split(rank, dim=-1) if layer.structure == "symmetric" else [h] * m_heads
    heads = p["inher_up.weight"].split(rank, dim=1)
    bias = p.get("inher_bias")
    return sum(g[..., m : m + 1] * (latents[m] @ w.T + (0 if bias is None else bias[m])) for m, w in enumerate(heads))


def explicit_gated_sum(layer, x: torch.Tensor) -> torch.Tensor:
    """`gated_sum` in float64 on the CPU from the layer's own (possibly bfloat16, possibly CUDA) parameters."""
    return gated_sum(layer, x.double().cpu(), {n: t.detach().double().cpu() for n, t in layer.named_parameters()})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def smollm2_dir() -> str:
    """Folder of SmolLM2-135M-Instruct's GGUF file."""
    return smollm2_path()[0]


def safetensors_equal(a, b) -> bool:
    """Two safetensors files hold the same tensor names with bit-identical values."""
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
