"""InherConfig validation and serialisation; get_inher_model's errors on bad models and targets."""

import json
import re

import pytest
import torch
from torch import nn

from inhernet_hf import InherConfig, InherLinear, get_inher_model
from reference import tiny_llama


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({}, ValueError, ["exactly one", "r=None", "target_ratio=None"]),
        ({"r": 8, "target_ratio": 0.5}, ValueError, ["exactly one", "r=8", "target_ratio=0.5"]),
        ({"r": 0}, ValueError, ["r=0", ">= 1"]),
        ({"r": -3}, ValueError, ["r=-3"]),
        ({"r": 4.0}, TypeError, ["r=4.0", "int"]),
        ({"target_ratio": 0.0}, ValueError, ["target_ratio=0.0", "(0, 1]"]),
        ({"target_ratio": 1.5}, ValueError, ["target_ratio=1.5", "(0, 1]"]),
        ({"target_ratio": float("nan")}, ValueError, ["target_ratio=nan"]),
        ({"r": 8, "num_heads": 0}, ValueError, ["num_heads=0", ">= 1"]),
        ({"r": 8, "init": "pissa"}, ValueError, ["init='pissa'", "'svd'", "'svd_lowrank'", "'random'"]),
        ({"r": 8, "head_init": "uniform"}, ValueError, ["head_init='uniform'", "'balanced'"]),
        ({"r": 8, "gate": "sigmoid"}, ValueError, ["gate='sigmoid'", "'softmax'", "'none'"]),
        ({"r": 8, "gate_input": "x"}, ValueError, ["gate_input='x'", "'latent'", "'input'"]),
        ({"r": 8, "structure": "moe"}, ValueError, ["structure='moe'", "'asymmetric'", "'symmetric'"]),
        ({"r": 8, "task_type": "CLS"}, ValueError, ["task_type='CLS'", "'SEQ_CLS'"]),
        ({"r": 8, "svd_niter": -1}, ValueError, ["svd_niter=-1"]),
        ({"r": 8, "target_modules": "q_proj("}, ValueError, ["target_modules='q_proj('", "regular expression"]),
        ({"r": 8, "target_modules": 3}, TypeError, ["target_modules=3"]),
        ({"r": 8, "rank_pattern": {"q_proj": 0}}, ValueError, ["rank_pattern['q_proj']=0"]),
        ({"r": 8, "rank_pattern": {"q_proj": 1.2}}, ValueError, ["rank_pattern['q_proj']=1.2", "(0, 1]"]),
        ({"r": 8, "rank_pattern": {"q_proj": "8"}}, TypeError, ["rank_pattern['q_proj']='8'"]),
        ({"r": 8, "modules_to_save": "classifier"}, TypeError, ["modules_to_save='classifier'", "list"]),
        ({"r": 8, "rank_multiple": 16}, ValueError, ["{'rank_multiple': 16}", "r=8", "target_ratio"]),
        ({"r": 8, "min_rank": 4}, ValueError, ["{'min_rank': 4}", "r=8"]),
    ],
)
def test_bad_config_names_field_value_and_allowed(kwargs, error, words):
    with pytest.raises(error) as info:
        InherConfig(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_config_round_trips_through_json():
    config = InherConfig(target_ratio=0.4, num_heads=3, target_modules=["q_proj", "v_proj"],
                         rank_pattern={"down_proj": 32, r"layers\.0\..*": 0.8}, init="svd_lowrank",
                         svd_niter=8, head_init="demo", gate_input="input", task_type="CAUSAL_LM")
    restored = InherConfig.from_dict(json.loads(config.to_json_string()))
    assert restored == config


def test_unknown_fields_from_a_newer_version_are_dropped_with_a_warning(caplog):
    config = InherConfig(r=4)
    with caplog.at_level("WARNING", logger="inhernet_hf.config"):
        restored = InherConfig.from_dict({**config.to_dict(), "alpha": 1})
    assert restored == config
    assert "Ignoring InherConfig field(s) ['alpha'] unknown to this version" in caplog.text


def test_config_save_pretrained_and_from_pretrained(tmp_path):
    config = InherConfig(target_ratio=0.5, num_heads=3, layers_to_transform=[1], layers_pattern="layers")
    config.save_pretrained(tmp_path / "cfg")
    assert json.loads((tmp_path / "cfg" / "inher_config.json").read_text())["num_heads"] == 3
    assert InherConfig.from_pretrained(tmp_path / "cfg") == config
    # an inherited checkpoint: the config its config.json records
    from reference import tiny_llama

    get_inher_model(tiny_llama(), config, progressbar=False).save_pretrained(tmp_path / "model")
    assert InherConfig.from_pretrained(tmp_path / "model") == config
    with pytest.raises(ValueError, match="has neither inher_config.json nor an inherited model's config.json"):
        InherConfig.from_pretrained(tmp_path)


def test_choices_are_typed_as_literals():
    import typing

    from inhernet_hf import config as module

    hints = typing.get_type_hints(InherConfig)
    for field, choices in (("init", module.INIT_CHOICES), ("rank_allocation", module.RANK_ALLOCATION_CHOICES),
                           ("head_init", module.HEAD_INIT_CHOICES), ("gate", module.GATE_CHOICES),
                           ("gate_input", module.GATE_INPUT_CHOICES), ("structure", module.STRUCTURE_CHOICES)):
        assert typing.get_origin(hints[field]) is typing.Literal and typing.get_args(hints[field]) == choices


def test_layers_to_transform_keeps_only_those_blocks(tiny_llama):
    inherited = get_inher_model(tiny_llama, InherConfig(r=4, layers_to_transform=1), progressbar=False)
    names = [r.name for r in inherited.inher_report.rows]
    assert len(names) == 7 and all(n.startswith("model.layers.1.") for n in names)


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers_to_transform=[5]), r"layers_to_transform=\[5\] names layer indices \[5\] that no target has.*"
                                    r"the targets' layer indices are \[0, 1\]"),
    (dict(layers_to_transform=[0], layers_pattern="blocks"), r"indices \[0\] that no target has \(read from "
                                                              r"layers_pattern=\['blocks'\]\)"),
])
def test_layers_to_transform_names_what_is_missing(tiny_llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_inher_model(tiny_llama, InherConfig(r=4, **kwargs), progressbar=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers_pattern="layers"), "only says where `layers_to_transform` reads"),
    (dict(layers_to_transform=[0], target_modules=r".*q_proj"), "cannot be used with a regex `target_modules`"),
    (dict(layers_to_transform=[]), "must be an int >= 0 or a non-empty list"),
    (dict(layers_to_transform=[-1]), "must be an int >= 0 or a non-empty list"),
])
def test_layers_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        InherConfig(r=4, **kwargs)


@pytest.fixture(name="tiny_llama")
def tiny_llama_fixture():
    return tiny_llama()


def test_targets_that_match_nothing_list_the_linear_layers(tiny_llama):
    with pytest.raises(ValueError) as info:
        get_inher_model(tiny_llama, InherConfig(r=4, target_modules=["query", "value"]), progressbar=False)
    message = str(info.value)
    assert "matched no module" in message and "model.layers.0.self_attn.q_proj" in message


def test_non_linear_target_is_a_type_error(tiny_llama):
    with pytest.raises(TypeError, match="model.embed_tokens.*Embedding.*only torch.nn.Linear"):
        get_inher_model(tiny_llama, InherConfig(r=4, target_modules=["embed_tokens"]), progressbar=False)


def test_unknown_model_type_without_targets_says_what_to_pass():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="Could not infer default target_modules for model_type=None.*Pass `target_modules`"):
        get_inher_model(model, InherConfig(r=2), progressbar=False)


def test_integer_weight_is_refused(tiny_llama):
    layer = tiny_llama.model.layers[1].mlp.up_proj
    layer.weight = nn.Parameter(layer.weight.to(torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"model.layers.1.mlp.up_proj.*torch.int8.*quantised or integer"):
        get_inher_model(tiny_llama, InherConfig(r=4), progressbar=False)
    assert not any(isinstance(m, InherLinear) for m in tiny_llama.modules())  # nothing half-applied


def test_nan_weight_names_the_module_and_leaves_model_untouched(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.v_proj.*NaN or Inf"):
        get_inher_model(tiny_llama, InherConfig(r=4), progressbar=False)
    assert not any(isinstance(m, InherLinear) for m in tiny_llama.modules())


def test_already_inherited_model_is_refused(tiny_llama):
    inherited = get_inher_model(tiny_llama, InherConfig(r=4), progressbar=False)
    for model in (inherited, inherited.model):  # the InherModel, and a plain module holding InherLinear layers
        with pytest.raises(ValueError, match="already inherited"):
            get_inher_model(model, InherConfig(r=4), progressbar=False)


def test_unknown_modules_to_save_is_an_error(tiny_llama):
    with pytest.raises(ValueError, match=r"modules_to_save entries \['classifier'\] match no module"):
        get_inher_model(tiny_llama, InherConfig(r=4, modules_to_save=["classifier"]), progressbar=False)


@pytest.mark.parametrize("exclude, missing", [(["q_prj", "v_proj"], "['q_prj']"), (r"layers\.9\..*", r"['layers\\.9\\..*']"),
                                              (["self_attn", "mlp.up_proj"], "['self_attn']")])  # a parent module
def test_exclude_modules_matching_no_layer_is_an_error(tiny_llama, exclude, missing):
    with pytest.raises(ValueError) as info:
        get_inher_model(tiny_llama, InherConfig(r=4, exclude_modules=exclude), progressbar=False)
    assert f"exclude_modules entries {missing} match no Linear/Conv1D layer" in str(info.value)
    assert not any(isinstance(m, InherLinear) for m in tiny_llama.modules())


def test_a_tied_output_embedding_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to \['model.embed_tokens.weight'\]"):
        get_inher_model(model, InherConfig(r=4, target_modules=["lm_head"]), progressbar=False)
    assert not any(isinstance(m, InherLinear) for m in model.modules())


def test_rank_multiple_applies_to_ratios_in_rank_pattern_next_to_r(tiny_llama):
    config = InherConfig(r=4, rank_multiple=8, rank_pattern={"down_proj": 0.6})  # allowed: the pattern has a ratio
    ranks = {n: m.rank for n, m in get_inher_model(tiny_llama, config, progressbar=False).named_modules()
             if isinstance(m, InherLinear)}
    assert ranks["model.layers.0.self_attn.q_proj"] == 4 and ranks["model.layers.0.mlp.down_proj"] % 8 == 0


def test_target_semantics_regex_list_exclude_and_rank_pattern(tiny_llama):
    config = InherConfig(r=4, target_modules=r"model\.layers\.\d+\.self_attn\.(q|v)_proj",
                         exclude_modules=["layers.1.self_attn.v_proj"], rank_pattern={r"layers\.1\..*": 2})
    inherited = get_inher_model(tiny_llama, config, progressbar=False)
    names = {n: m.rank for n, m in inherited.named_modules() if isinstance(m, InherLinear)}
    assert names == {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.v_proj": 4,
                     "model.layers.1.self_attn.q_proj": 2}


def test_layer_that_would_not_shrink_stays_dense_and_is_reported(tiny_llama):
    # rank 8, 2 heads: q_proj (32 x 32) holds 8*32 + 2*8*32 + gate 2*(8+1) = 786 < 1024 dense weights,
    # k_proj (16 x 32) holds 8*32 + 2*8*16 + 18 = 530 >= 512, so it stays dense.
    inherited = get_inher_model(tiny_llama, InherConfig(r=8, num_heads=2), progressbar=False)
    rows = {r.name: r for r in inherited.inher_report.rows}
    kept = rows["model.layers.0.self_attn.k_proj"]
    assert kept.rank is None and "would hold" in kept.note and kept.params == kept.dense_params == 512
    assert type(inherited.model.layers[0].self_attn.k_proj) is nn.Linear
    assert isinstance(inherited.model.layers[0].self_attn.q_proj, InherLinear)
    assert "dense (rank 8 would hold 530 >= 512" in str(inherited.inher_report)
