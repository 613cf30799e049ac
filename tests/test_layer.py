"""InherLinear maths: the SVD init reproduces the rank-r teacher, parameter counts are exact, gradients flow."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from inhernet_hf import InherConfig, InherLinear, get_inher_model, inher_num_params, truncated_svd
from reference import explicit_gated_sum, gated_sum, rank_r_reference, rel_err


def make_layer(dense: nn.Linear, rank: int, heads: int, **kw) -> InherLinear:
    init = {k: kw.pop(k) for k in ("init", "head_init") if k in kw}
    layer = InherLinear(dense.in_features, dense.out_features, rank, heads, dense.bias is not None, **kw)
    layer.inherit_(dense.weight, dense.bias, **init)
    return layer


@pytest.mark.parametrize("structure", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("gate_input", ["latent", "input"])
@pytest.mark.parametrize("heads", [1, 2, 3])
def test_balanced_init_is_rank_r_teacher(structure, gate_input, heads):
    torch.manual_seed(0)
    dense = nn.Linear(48, 40)
    layer = make_layer(dense, 12, heads, structure=structure, gate_input=gate_input)
    x = torch.randn(3, 5, 48)  # any leading shape
    expected = x.double() @ rank_r_reference(dense.weight, 12).T + dense.bias.double()
    assert rel_err(layer(x), expected) < 1e-5


def test_gate_none_is_mean_of_heads_and_keeps_rank_r():
    torch.manual_seed(0)
    dense = nn.Linear(32, 24)
    layer = make_layer(dense, 8, 3, gate="none")
    assert layer.inher_gate is None
    x = torch.randn(7, 32)
    assert rel_err(layer(x), x.double() @ rank_r_reference(dense.weight, 8).T + dense.bias.double()) < 1e-5
    with torch.no_grad():  # after the heads diverge, the output is their plain mean
        layer.inher_up.weight.add_(torch.randn_like(layer.inher_up.weight))
        layer.inher_bias.add_(torch.randn_like(layer.inher_bias))
    h = layer.inher_down(x)
    heads = [h @ w.T + b for w, b in zip(layer.inher_up.weight.split(8, dim=1), layer.inher_bias)]
    torch.testing.assert_close(layer(x), torch.stack(heads).mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("structure", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("gate_input", ["latent", "input"])
def test_forward_equals_explicit_gated_sum_of_heads(structure, gate_input):
    """The single-matmul mixture equals sum_m g_m (W_u^m h_m + b_m) computed head by head, for both structures and
    both gate inputs, with heads that differ (random init)."""
    torch.manual_seed(0)
    layer = InherLinear(20, 16, 6, num_heads=3, structure=structure, gate_input=gate_input)
    x = torch.randn(4, 9, 20)
    torch.testing.assert_close(layer(x).double(), explicit_gated_sum(layer, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gate", ["softmax", "none"])
@pytest.mark.parametrize("heads", [1, 3])
def test_autocast_bfloat16_with_bias(heads, gate):
    """Under autocast (accelerate's --mixed_precision bf16) a biased layer computes in bfloat16, agrees with the
    float32 forward to bfloat16 precision, and its float32 parameters get float32 gradients."""
    torch.manual_seed(0)
    layer = InherLinear(20, 16, 6, num_heads=heads, gate=gate)
    x = torch.randn(4, 9, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, explicit_gated_sum(layer, x)) < 2e-2
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())


@pytest.mark.parametrize("structure, gate_input", [("asymmetric", "latent"), ("symmetric", "latent"),
                                                   ("asymmetric", "input")])
@pytest.mark.parametrize("heads", [1, 3])
def test_gradients_equal_explicit_gated_sum_of_heads(heads, structure, gate_input):
    """Backward through the fused forward (bias added in place into the up-projection's output) gives the gradients of
    the head-by-head sum_m g_m (W_u^m h_m + b_m), for every parameter and the input."""
    torch.manual_seed(0)
    layer = InherLinear(20, 16, 6, num_heads=heads, structure=structure, gate_input=gate_input)
    x = torch.randn(4, 9, 20, requires_grad=True)
    weight = torch.randn(4, 9, 16)

    grads = []
    for forward in (layer, lambda x: gated_sum(layer, x, dict(layer.named_parameters()))):
        layer.zero_grad()
        x.grad = None
        (forward(x) * weight).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
    for fused, reference in zip(*grads):
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_init", ["paper", "demo"])
def test_scaled_head_inits_give_teacher_over_m(head_init):
    torch.manual_seed(0)
    dense = nn.Linear(30, 26)
    heads = 3
    layer = make_layer(dense, 10, heads, head_init=head_init)
    x = torch.randn(6, 30)
    expected = x.double() @ rank_r_reference(dense.weight, 10).T / heads + dense.bias.double()
    assert rel_err(layer(x), expected) < 1e-5


def test_random_init_differs_from_teacher():
    torch.manual_seed(0)
    dense = nn.Linear(30, 26)
    layer = make_layer(dense, 10, 2, init="random")
    x = torch.randn(6, 30)
    expected = x.double() @ rank_r_reference(dense.weight, 10).T + dense.bias.double()
    assert rel_err(layer(x), expected) > 0.5


def test_svd_lowrank_recovers_exact_low_rank_matrix():
    torch.manual_seed(0)
    weight = torch.randn(64, 6) @ torch.randn(6, 50)  # rank 6 exactly
    u, s, vh, energy = truncated_svd(weight, 6, "svd_lowrank", niter=2)
    assert rel_err((u * s) @ vh, weight) < 1e-5
    assert energy == pytest.approx(1.0, abs=1e-6)
    u, s, vh, energy = truncated_svd(weight, 3, "svd")
    full = torch.linalg.svdvals(weight.double())
    assert energy == pytest.approx((full[:3].square().sum() / full.square().sum()).item(), rel=1e-5)


def test_conv1d_teacher_is_transposed():
    """GPT-2's Conv1D stores (in, out) and computes x @ W + b; the inherited layer matches its rank-r form."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("c_fc", Conv1D(40, 24))  # nf=40 outputs, nx=24 inputs
    nn.init.normal_(model.c_fc.weight)
    nn.init.normal_(model.c_fc.bias)
    weight_t = model.c_fc.weight.detach().T.clone()  # (out, in)
    bias = model.c_fc.bias.detach().clone()
    inherited = get_inher_model(model, InherConfig(r=8, num_heads=2, target_modules=["c_fc"]), progressbar=False)
    x = torch.randn(2, 3, 24)
    expected = x.double() @ rank_r_reference(weight_t, 8).T + bias.double()
    assert isinstance(inherited.c_fc, InherLinear)
    assert rel_err(inherited(x), expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes_factor_in_float32_or_64_and_cast_back(dtype):
    torch.manual_seed(0)
    dense = nn.Linear(64, 48).to(dtype)
    layer = InherLinear(64, 48, 16, 2, device=None, dtype=dtype)
    layer.inherit_(dense.weight, dense.bias)
    assert all(p.dtype == dtype for p in layer.parameters())
    x = torch.randn(5, 64, dtype=dtype)
    expected = x.double() @ rank_r_reference(dense.weight, 16).T + dense.bias.double()
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    assert rel_err(layer(x), expected) < tol


@pytest.mark.parametrize("structure", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("gate", ["softmax", "none"])
@pytest.mark.parametrize("gate_input", ["latent", "input"])
@pytest.mark.parametrize("heads,bias", [(1, True), (2, False), (3, True)])
def test_param_count_formula_is_exact(structure, gate, gate_input, heads, bias):
    layer = InherLinear(37, 29, 5, heads, bias, gate, gate_input, structure)
    assert layer.num_params() == sum(p.numel() for p in layer.parameters())
    assert layer.num_params() == inher_num_params(37, 29, 5, heads, bias, gate, gate_input, structure)


def test_gate_learns_once_heads_diverge():
    """At init the heads are identical and sum(g) = 1, so the gate's gradient is exactly zero; each head's
    gradient is scaled by its own g_m, so one step makes them differ and from then on every part learns."""
    torch.manual_seed(0)
    dense = nn.Linear(16, 12)
    layer = make_layer(dense, 4, 2)
    x = torch.randn(3, 5, 16)
    layer(x).pow(2).sum().backward()
    assert layer.inher_gate.weight.grad.norm() < 1e-5 * layer.inher_up.weight.grad.norm()  # zero up to rounding
    for name, p in layer.named_parameters():
        if not name.startswith("inher_gate"):
            assert p.grad.abs().sum() > 0, name
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    layer.zero_grad()
    layer(x).pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mixture_builds_no_per_head_output_tensor():
    """The forward never materialises an (..., M, out) tensor: the largest intermediate is (..., M*r)."""
    torch.manual_seed(0)
    layer = InherLinear(64, 256, 8, num_heads=4)
    x = torch.randn(10, 64)
    shapes = []

    def record(_module, _args, output):
        shapes.append(tuple(output.shape))

    hooks = [m.register_forward_hook(record) for m in layer.modules() if m is not layer]
    with torch.profiler.profile(record_shapes=True) as prof:
        layer(x)
    for hook in hooks:
        hook.remove()
    op_shapes = [tuple(s) for e in prof.events() for s in e.input_shapes if s]
    assert (10, 4, 256) not in op_shapes and (4, 10, 256) not in op_shapes
    assert (10, 4 * 8) in op_shapes  # the concatenated (g (x) h) feeds the one up-projection matmul
    assert shapes.count((10, 256)) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"gate": "sofmax"}, "InherLinear.gate='sofmax' is not supported; allowed: 'softmax', 'none'"),
    ({"structure": "symetric"}, "InherLinear.structure='symetric' is not supported; allowed: 'asymmetric', 'symmetric'"),
    ({"gate_input": "h"}, "InherLinear.gate_input='h' is not supported"),
    ({"rank": 0}, "InherLinear.rank=0 must be an int >= 1"),
    ({"num_heads": 2.0}, "InherLinear.num_heads=2.0 must be an int >= 1"),
])
def test_bad_layer_arguments_name_the_value_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError) as info:
        InherLinear(**{"in_features": 12, "out_features": 10, "rank": 4, **kwargs})
    assert message in str(info.value)


@pytest.mark.parametrize("rank, kwargs, message", [
    (4, {"init": "SVD"}, "InherLinear.inherit_.init='SVD' is not supported; allowed: 'svd', 'svd_lowrank', 'whitened'"),
    (4, {"head_init": "half"}, "InherLinear.inherit_.head_init='half' is not supported; allowed: 'balanced'"),
    (11, {}, "rank=11 exceeds min(out, in)=10"),
])
def test_bad_inherit_arguments_fail_before_any_factorisation(rank, kwargs, message):
    layer = InherLinear(12, 10, rank)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError) as info:
        layer.inherit_(torch.randn(10, 12), **kwargs)
    assert message in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
