"""`model.dequantize()` / `inhernet densify`: the exact dense model where the maths allows it, a refusal otherwise;
`plan_inheritance` / `inhernet compress --dry-run`: the report get_inher_model would produce, nothing changed."""

import copy
import json
import subprocess
import sys

import pytest
import torch
import transformers as T
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from inhernet_hf import InherConfig, InherLinear, get_inher_model, plan_inheritance
from reference import minilm_path, tiny_llama

IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def _perturb(model, heads_apart=True):
    """Move every inherited parameter off its init (heads made different), as training does."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, InherLinear)):
            for param in layer.parameters():
                if heads_apart or param is layer.inher_down.weight:
                    param.add_(0.05 * torch.randn(param.shape, generator=gen))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("heads, gate", [(1, "softmax"), (2, "none")])
def test_dequantize_is_exact_and_saves_a_plain_dense_checkpoint(heads, gate, tmp_path):
    inherited = get_inher_model(tiny_llama(), InherConfig(r=6, num_heads=heads, gate=gate), progressbar=False)
    _perturb(inherited)
    expected = _logits(inherited)
    dense = inherited.dequantize()
    assert not any(isinstance(m, InherLinear) for m in dense.modules())
    assert type(dense.model.layers[0].mlp.down_proj) is nn.Linear
    torch.testing.assert_close(_logits(dense), expected, rtol=1e-5, atol=1e-6)
    dense.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "llama" and "quantization_config" not in written
    # a plain dense checkpoint: a process that never imports inhernet_hf loads it and gets the same logits
    check = ("import sys, torch; from transformers import LlamaForCausalLM; m = LlamaForCausalLM.from_pretrained("
             "sys.argv[1]).eval(); ids = torch.load(sys.argv[2]);\n"
             "with torch.no_grad(): torch.save(m(input_ids=ids).logits, sys.argv[3])")
    torch.save(IDS, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", check, str(tmp_path), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                   check=True, capture_output=True)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=1e-5, atol=1e-6)


def test_gpt2_conv1d_comes_back_as_conv1d(tmp_path):
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32))
    inherited = get_inher_model(model, InherConfig(r=6, num_heads=1), progressbar=False)
    _perturb(inherited)
    expected = _logits(inherited)
    inherited.save_pretrained(tmp_path / "inher")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "inher").dequantize()  # loaded, then densified
    assert type(dense.transformer.h[0].attn.c_attn) is Conv1D
    torch.testing.assert_close(_logits(dense), expected, rtol=1e-5, atol=1e-6)
    dense.save_pretrained(tmp_path / "dense")
    torch.testing.assert_close(_logits(T.GPT2LMHeadModel.from_pretrained(tmp_path / "dense")), expected,
                               rtol=1e-5, atol=1e-6)


def test_identical_heads_dequantize_but_trained_gated_heads_are_refused():
    inherited = get_inher_model(tiny_llama(), InherConfig(r=6, num_heads=2), progressbar=False)
    fresh = copy.deepcopy(inherited)  # right after inheritance every head is the same U S^1/2
    expected = _logits(fresh)
    torch.testing.assert_close(_logits(fresh.dequantize()), expected, rtol=1e-5, atol=1e-6)

    _perturb(inherited)
    before = {k: v.clone() for k, v in inherited.state_dict().items()}
    with pytest.raises(ValueError, match="Cannot dequantize exactly: 14 of 14 inherited layers.*mixes 2 different "
                                         "heads with a per-token softmax gate"):
        inherited.dequantize()
    after = inherited.state_dict()  # nothing replaced, the description kept
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert inherited.config.quantization_config is not None


@pytest.mark.parametrize("allocation", ["uniform", "activation"])
def test_plan_equals_the_realised_report_and_changes_nothing(allocation):
    model = tiny_llama()
    batches = [{"input_ids": IDS}]
    config = InherConfig(target_ratio=0.5, num_heads=2, rank_allocation=allocation)
    calibration = batches if allocation == "activation" else None
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_inheritance(model, config, calibration_data=calibration, progressbar=False)
    assert not any(isinstance(m, InherLinear) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert getattr(model, "hf_quantizer", None) is None
    realised = get_inher_model(model, config, calibration_data=calibration, progressbar=False).inher_report
    keys = lambda rows: [(r.name, r.rank, r.num_heads, r.params, r.dense_params) for r in rows]
    assert keys(plan.rows) == keys(realised.rows) and len(plan.rows) == 14
    assert all(r.energy_kept is None for r in plan.rows) and all(r.energy_kept is not None for r in realised.rows if r.inherited)
    assert plan.ratio == realised.ratio


@pytest.mark.slow
def test_cli_dry_run_prints_the_plan_and_densify_writes_the_dense_model(tmp_path):
    """On the real MiniLM-L6: --dry-run prints the plan and writes nothing; densify of an M = 1 checkpoint gives a
    plain BERT checkpoint with the inherited model's outputs; densify of a gated M = 2 one is refused."""
    from transformers import AutoModel, AutoTokenizer, BertModel

    cli = [sys.executable, "-m", "inhernet_hf.cli"]
    compress = cli + ["compress", minilm_path(), "--target-ratio", "0.5"]
    dry = subprocess.run(compress + ["--num-heads", "1", "--dry-run"], capture_output=True, text=True, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "encoder.layer.5.output.dense" in dry.stdout and "dry run: nothing compressed" in dry.stdout
    assert not list(tmp_path.iterdir())

    subprocess.run(compress + ["--num-heads", "1", "--output", str(tmp_path / "inher")], check=True,
                   capture_output=True)
    import inhernet_hf  # noqa: F401  (to read the inherited folder here)

    batch = AutoTokenizer.from_pretrained(minilm_path())(["Inheritance, then a dense export."], return_tensors="pt")
    with torch.no_grad():
        expected = AutoModel.from_pretrained(tmp_path / "inher").eval()(**batch).last_hidden_state
    out = subprocess.run(cli + ["densify", str(tmp_path / "inher"), "--output", str(tmp_path / "back")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "quantization_config" not in json.loads((tmp_path / "back" / "config.json").read_text())
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    with torch.no_grad():
        dense = BertModel.from_pretrained(tmp_path / "back").eval()(**batch).last_hidden_state
    torch.testing.assert_close(dense, expected, rtol=1e-4, atol=1e-5)

    subprocess.run(compress + ["--num-heads", "2", "--init", "random", "--output", str(tmp_path / "gated")],
                   check=True, capture_output=True)
    refused = subprocess.run(cli + ["densify", str(tmp_path / "gated"), "--output", str(tmp_path / "no")],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "Cannot dequantize exactly" in refused.stderr
    assert not (tmp_path / "no").exists()
