"""Speed paths: torch.compile gives the same outputs as eager, and the speed recipe runs end to end (CI-sized)."""

import json
import subprocess
import sys

import pytest
import torch

from inhernet_hf import InherConfig, InherLinear, get_inher_model
from recipes import RECIPES, load_recipe
from reference import explicit_gated_sum, rank_r_reference, rel_err, requires_cuda, tiny_llama

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("heads,structure", [(1, "asymmetric"), (3, "asymmetric"), (2, "symmetric")])
def test_compiled_layer_matches_eager(heads, structure):
    torch.manual_seed(0)
    layer = InherLinear(64, 48, 8, heads, structure=structure).eval()
    x = torch.randn(2, 7, 64)
    compiled = torch.compile(layer)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)


@requires_cuda
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cuda_eager_and_compiled_match_float64_gated_sum(dtype, tolerance):
    """On CUDA, in the model dtype, eager and torch.compile'd forwards of a layer whose heads differ compute the
    float64 gated sum of its own parameters (bfloat16: within the format's rounding)."""
    torch.manual_seed(0)
    layer = InherLinear(576, 1536, 128, 3).to("cuda", dtype).eval()
    x = torch.randn(4, 64, 576, device="cuda", dtype=dtype)
    expected = explicit_gated_sum(layer, x)
    with torch.no_grad():
        for forward in (layer, torch.compile(layer, dynamic=False)):
            assert rel_err(forward(x).cpu(), expected) < tolerance


@requires_cuda
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cuda_inherit_in_model_dtype_is_rank_r_teacher(dtype, tolerance):
    """SVD init of a CUDA weight in the model dtype (factored in float64 on the GPU, cast back) reproduces
    U_r S_r V_r^T x + b."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(576, 1536).to("cuda", dtype)
    layer = InherLinear(576, 1536, 128, 2, device="cuda", dtype=dtype)
    layer.inherit_(dense.weight, dense.bias)
    x = torch.randn(4, 64, 576, device="cuda", dtype=dtype)
    expected = x.double().cpu() @ rank_r_reference(dense.weight.cpu(), 128).T + dense.bias.double().cpu()
    with torch.no_grad():
        assert layer.inher_down.weight.dtype == dtype and rel_err(layer(x).cpu(), expected) < tolerance


def test_speed_recipe_prints_ratios_to_dense(tmp_path):
    out = subprocess.run([sys.executable, str(RECIPES / "speed.py"), "--model", "minilm", "--ratios", "0.5",
                          "--heads", "2", "--repeats", "1", "--seq_len", "32", "--prefill_batch_sizes", "1", "2",
                          "--output_json", str(tmp_path / "speed.json")], capture_output=True, text=True, check=True)
    assert "| r0.5-M2 | no | 0.49" in out.stdout and "FLOP bound" in out.stdout  # ranks in multiples of 16
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["complete"] is True
    dense, inherited = saved["rows"]
    assert abs(inherited["targeted_ratio"] - 0.5) < 0.01
    assert dense["flop_bound"] == 1.0 and inherited["flop_bound"] > 1.3  # half the targeted FLOPs
    assert inherited["params"] < dense["params"]


def tiny_llama_folder(folder) -> None:
    """A 2-layer random Llama with GQA, saved to `folder`: a causal LM the speed recipe loads in a second."""
    tiny_llama(vocab_size=128, hidden_size=64).save_pretrained(folder)


def test_speed_recipe_compiles_prefill_and_decode(tmp_path):
    """--compile both on a tiny causal LM: eager and compiled rows, each with prefill and decode ratios to dense."""
    tiny_llama_folder(tmp_path / "llama")
    subprocess.run([sys.executable, str(RECIPES / "speed.py"), "--model", str(tmp_path / "llama"), "--ratios", "0.5",
                    "--heads", "2", "--rank_multiple", "4", "--repeats", "1", "--seq_len", "16", "--prefill_batch_sizes", "2",
                    "--decode_tokens", "3", "--compile", "both", "--output_json", str(tmp_path / "speed.json")],
                   capture_output=True, text=True, check=True)
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert [(r["variant"], r["compiled"]) for r in rows] == [
        ("dense", False), ("r0.5-M2", False), ("dense", True), ("r0.5-M2", True)]
    for row in rows:  # timings of a 2-layer model are noise (a decode estimate can even be negative): only presence
        assert {"decode_s", "decode_speedup", "prefill_b2_s", "prefill_b2_speedup"} <= row.keys()
        if row["variant"] == "dense":  # each ratio is taken against dense of the same repetition and mode
            assert row["decode_speedup"] == row["prefill_b2_speedup"] == 1.0


def test_speed_recipe_keeps_the_rows_of_a_run_stopped_part_way(tmp_path, monkeypatch):
    """--output_json is rewritten after every variant: a run that dies while building its second variant leaves dense
    and the first variant, marked incomplete. A bad grid value is refused before any model loads."""
    tiny_llama_folder(tmp_path / "llama")
    speed = load_recipe("speed")
    get_inher_model, built = speed.get_inher_model, []

    def stop_at_the_second_variant(model, config, **kwargs):
        if built:
            raise RuntimeError("stopped")
        built.append(config.num_heads)
        return get_inher_model(model, config, **kwargs)

    monkeypatch.setattr(speed, "get_inher_model", stop_at_the_second_variant)
    output = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", ["speed.py", "--model", str(tmp_path / "llama"), "--ratios", "0.5", "--heads",
                                      "1", "2", "--repeats", "1", "--seq_len", "16", "--prefill_batch_sizes", "2",
                                      "--decode_tokens", "2", "--output_json", str(output)])
    with pytest.raises(RuntimeError, match="stopped"):
        speed.main()
    saved = json.loads(output.read_text())
    assert saved["complete"] is False and [r["variant"] for r in saved["rows"]] == ["dense", "r0.5-M1"]

    bad = subprocess.run([sys.executable, str(RECIPES / "speed.py"), "--model", "minilm", "--ratios", "0.5", "1.5"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "bad --ratios / --heads / --rank_multiple" in bad.stderr and "1.5" in bad.stderr


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_profile_recipe_counts_the_gated_layers_operators(tmp_path, device):
    """recipes/profile_forward.py on a tiny Llama: per forward, dense runs one GEMM per projection plus the LM head and
    no softmax (its attention is fused); M = 1 runs two GEMMs per inherited projection; M = 2 adds the gate's GEMM
    and its softmax. On CUDA the same counts hold with kernel time credited to the launching operator only."""
    tiny_llama_folder(tmp_path / "llama")
    subprocess.run([sys.executable, str(RECIPES / "profile_forward.py"), "--model", str(tmp_path / "llama"),
                    "--ratios", "0.5", "--heads", "1", "2", "--rank_multiple", "4", "--batch_size", "2", "--seq_len", "16", "--warmup", "1",
                    "--forwards", "2", "--device", device, "--output_json", str(tmp_path / "profile.json")],
                   capture_output=True, text=True, check=True)
    models = json.loads((tmp_path / "profile.json").read_text())["models"]
    assert list(models) == ["dense", "r0.5-M1", "r0.5-M2"]
    profile_forward = load_recipe("profile_forward")

    def calls(name, cls):
        return sum(op["calls"] for op_name, op in models[name]["ops"].items() if profile_forward.op_class(op_name) == cls)

    dense_linears = 7 * 2 + 1  # q, k, v, o, gate, up, down in each of 2 layers, and the LM head
    assert (calls("dense", "GEMM"), calls("dense", "softmax")) == (dense_linears, 0)
    for heads in (1, 2):  # every projection is inherited (at rank multiples of 16, ratio 0.5 is out of reach here)
        model = get_inher_model(tiny_llama(vocab_size=128, hidden_size=64), InherConfig(
            target_ratio=0.5, num_heads=heads, rank_multiple=4), progressbar=False)
        inherited = [m for m in model.modules() if isinstance(m, InherLinear)]
        gated = sum(m.inher_gate is not None for m in inherited)
        assert len(inherited) == 14 and gated == (len(inherited) if heads == 2 else 0)
        expected = dense_linears - len(inherited) + 2 * len(inherited) + gated  # down + up (+ gate) per layer
        assert (calls(f"r0.5-M{heads}", "GEMM"), calls(f"r0.5-M{heads}", "softmax")) == (expected, gated)
    for result in models.values():
        assert profile_forward.class_totals(result["ops"])["GEMM"] > 0 and result["forward_s"] > 0
        assert all(not name.startswith(("void ", "ampere", "sm90", "cutlass")) for name in result["ops"])  # no kernels


def test_compiled_models_past_dynamo_recompile_limit_stay_compiled():
    """The speed grid compiles many models that share their forward code: each instance x shape is a cache entry.
    Past the default limit of 8, dynamo would run the rest eager; the recipe sizes the limit and makes a miss an error."""
    from recipes import load_recipe

    speed = load_recipe("speed")
    layers = [InherLinear(16, 8, rank, 2).eval() for rank in range(2, 7)]  # differently shaped models
    shapes = [torch.randn(1, 16), torch.randn(3, 16)]

    def compile_all():
        torch._dynamo.reset()
        for layer in layers:
            compiled = torch.compile(layer, dynamic=False)
            for x in shapes:
                torch.testing.assert_close(compiled(x), layer(x))

    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):  # 10 cache entries > 8
            with torch.no_grad():
                compile_all()
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=False), torch.no_grad():
        speed.make_room_for_compiled_models(len(layers), len(shapes))
        assert torch._dynamo.config.fail_on_recompile_limit_hit
        compile_all()
    torch._dynamo.reset()


def test_paired_timings_run_dense_variant_variant_dense():
    from recipes import load_recipe

    speed = load_recipe("speed")
    calls, clock = [], iter(range(1, 100))
    pairs = speed.paired_timings(lambda who, key: calls.append((who, key)) or next(clock), "a", ["k", "j"], 1)
    assert calls == [("dense", "k"), ("a", "k"), ("a", "k"), ("dense", "k"),
                     ("dense", "j"), ("a", "j"), ("a", "j"), ("dense", "j")]
    assert pairs == {"k": [(2.5, 2.5)], "j": [(6.5, 6.5)]}  # a steady drift cancels


@pytest.mark.parametrize("repeats", [1, 2, 3, 5])
def test_running_second_costs_both_models_the_same(repeats):
    """Two identical models, where the second run of every back-to-back pair is 5% slower (a cache or allocator
    effect): the speedup is exactly 1 for any number of repeats. With dense first in even repetitions only, an odd
    count made it 0.952 (3 or 5 repeats)."""
    from recipes import load_recipe

    speed = load_recipe("speed")
    calls = []

    def measure(who, key):
        calls.append(who)
        return 1.05 if len(calls) % 2 == 0 else 1.0

    pairs = speed.paired_timings(measure, "a", ["k"], repeats)
    rows = speed.table_rows({"dense": {}, "a": {}}, {False: {"a": pairs}}, {False: {"dense": 0, "a": 0}}, ["k"])
    assert rows[1]["k_speedup"] == 1.0


def test_flop_bound_counts_the_head_biases():
    """The in-place g @ B of the head biases (addmm_, unknown to torch's counter) is counted with the layer's
    other matmuls."""
    from recipes import load_recipe

    from inhernet_hf import InherLinear

    speed = load_recipe("speed")
    tokens, d_in, d_out, r, m = 7, 12, 20, 4, 3
    layer = InherLinear(d_in, d_out, r, m, bias=True)
    flops = speed.forward_flops(lambda: layer(torch.randn(tokens, d_in)))
    # down (in -> r), gate (r -> M, with its bias), heads (M r -> out), head biases (M -> out)
    assert flops == 2 * tokens * (d_in * r + r * m + m * r * d_out + m * d_out)


@pytest.mark.parametrize("is_causal", [False, True])
def test_flop_bound_counts_the_attention_pairs_computed(is_causal):
    """The CPU flash-attention kernel (which torch's counter skips) is counted: 2 matmuls x 2 FLOPs per multiply-add
    over B*H*d*pairs, pairs = s*s, or the s(s+1)/2 of the causal triangle; query heads broadcast over GQA groups."""
    from recipes import load_recipe

    speed = load_recipe("speed")
    b, h, h_kv, s, d = 2, 4, 2, 16, 8
    q, k, v = torch.randn(b, h, s, d), torch.randn(b, h_kv, s, d), torch.randn(b, h_kv, s, d)
    flops = speed.forward_flops(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True))
    pairs = s * (s + 1) // 2 if is_causal else s * s
    assert flops == 2 * 2 * b * h * d * pairs
    # CUDA's flash kernel takes GQA key/value unexpanded (h_kv heads), which torch < 2.13's own counter rejects
    cuda_flash = speed.FLOP_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention]
    assert cuda_flash(q.shape, k.shape, v.shape, 0.0, is_causal) == flops
