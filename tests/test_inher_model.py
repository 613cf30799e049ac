"""What `get_inher_model` and the loaders return: the transformers model itself, its class swapped for
`InherModel` + its own class, so it is every kind of model it was (PreTrainedModel, LlamaForCausalLM) and carries
`inher_report`; `dequantize` gives the plain class back."""

import copy
import json
import warnings

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedModel

from inhernet_hf import InherConfig, InherLinear, InherModel, get_inher_model
from reference import tiny_llama

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def test_get_inher_model_returns_the_model_itself_as_an_inher_model(tmp_path):
    dense = tiny_llama()
    model = get_inher_model(dense, InherConfig(r=6, num_heads=2), progressbar=False)
    assert model is dense
    assert isinstance(model, InherModel) and isinstance(model, LlamaForCausalLM) and isinstance(model, PreTrainedModel)
    assert type(model).__name__ == "LlamaForCausalLM" and type(model).__module__ == LlamaForCausalLM.__module__
    assert type(model).__qualname__ == "InherModel[LlamaForCausalLM]"
    assert type(get_inher_model(tiny_llama(), InherConfig(r=4), progressbar=False)) is type(model)  # one class each
    assert model.base_model is model.model  # transformers' meaning: the backbone
    assert model.inher_config.r == 6 and model.inher_report.rows[0].rank == 6
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded) is type(model) and str(reloaded.inher_report) == str(model.inher_report)


def test_report_method_is_deprecated_but_still_works():
    model = get_inher_model(tiny_llama(), InherConfig(r=4), progressbar=False)
    with pytest.warns(FutureWarning, match=r"report\(\) is deprecated.*model\.inher_report"):
        assert model.report() is model.inher_report


def test_deepcopy_stays_inherited_and_computes_the_same():
    model = get_inher_model(tiny_llama(), InherConfig(r=6, num_heads=2), progressbar=False).eval()
    twin = copy.deepcopy(model)
    assert type(twin) is type(model) and twin.inher_report is not model.inher_report
    with torch.no_grad():
        assert torch.equal(twin(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_dequantize_gives_the_plain_class_back():
    model = get_inher_model(tiny_llama(), InherConfig(r=6, num_heads=1), progressbar=False).eval()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation on this path
        dense = model.dequantize()
    assert type(dense) is LlamaForCausalLM and not isinstance(dense, InherModel)
    assert not hasattr(dense, "inher_report") and not any(isinstance(m, InherLinear) for m in dense.modules())
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_a_plain_module_becomes_an_inher_model_without_transformers_saving():
    module = TwoLayers()
    inherited = get_inher_model(module, InherConfig(r=4, target_modules=["up", "down"]), progressbar=False)
    assert inherited is module and isinstance(inherited, TwoLayers) and isinstance(inherited, InherModel)
    assert [r.rank for r in inherited.inher_report.rows] == [4, 4]
    with pytest.raises(TypeError, match="needs a transformers PreTrainedModel.*safetensors.torch.save_file"):
        inherited.save_pretrained("unused")
