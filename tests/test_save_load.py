"""Save / load / share: folders, sharding, the HF cache offline, push_to_hub, plain AutoModel loading, PEFT on top,
and clear errors for corrupt or mismatched checkpoints."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from hub_server import recording_hub, run_python
from inhernet_hf import InherConfig, InherLinear, InherModel, get_inher_model
from reference import minilm_path, smollm2_path, tiny_llama

IDS = torch.tensor([[3, 14, 15, 9, 26, 5], [35, 8, 9, 7, 9, 3]])


def tiny_inherited(**config):
    model = tiny_llama(max_position_embeddings=64)
    return get_inher_model(model, InherConfig(**{"r": 8, "num_heads": 2, **config}), progressbar=False)


@pytest.fixture
def saved(tmp_path):
    model = tiny_inherited()
    model.eval()
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    return tmp_path / "model", logits


def test_folder_layout_and_both_load_paths(saved):
    folder, logits = saved
    assert {"config.json", "model.safetensors", "README.md", "generation_config.json"} <= set(os.listdir(folder))
    written = json.loads((folder / "config.json").read_text())
    assert (written["model_type"], written["inher_base_model_type"]) == ("inhernet_hf", "llama")
    description = written["quantization_config"]
    assert description["quant_method"] == "inhernet" and description["format_version"] == 2
    assert description["layers"][0] == {"name": "model.layers.0.self_attn.q_proj", "rank": 8, "num_heads": 2,
                                        "energy_kept": pytest.approx(0.6488, abs=1e-4), "note": ""}
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "inhernet_hf" in card
    for loaded in (InherModel.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)):
        assert isinstance(loaded.get_submodule("model.layers.1.mlp.down_proj"), InherLinear)
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=IDS).logits, logits)
    assert str(InherModel.from_pretrained(folder).inher_report) == str(tiny_inherited().inher_report)


@pytest.mark.parametrize("options", [{"structure": "symmetric"}, {"gate_input": "input", "num_heads": 3},
                                     {"structure": "symmetric", "gate_input": "input", "gate": "none"}])
def test_every_layer_variant_round_trips(options, tmp_path):
    """Symmetric heads, a gate reading x, no gate: after the heads diverge, both load paths give identical logits."""
    model = tiny_inherited(**options).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
        logits = model(input_ids=IDS).logits
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    for loaded in (InherModel.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)):
        layer = loaded.get_submodule("model.layers.0.mlp.down_proj")
        assert (layer.structure, layer.gate_input, layer.gate) == (options.get("structure", "asymmetric"),
                                                                  options.get("gate_input", "latent"),
                                                                  options.get("gate", "softmax"))
        with torch.no_grad():
            assert torch.equal(loaded.eval()(input_ids=IDS).logits, logits)


def test_checkpoint_loads_into_base_model_and_under_a_head(tmp_path):
    """As with dense checkpoints: a causal LM's inherited checkpoint loads with AutoModel (the "model." prefix is
    dropped, the inherited lm_head left out) and under another head, and the base model, saved, loads under the LM
    head again."""
    model = tiny_inherited(target_modules=["q_proj", "down_proj", "lm_head"]).eval()
    model.save_pretrained(tmp_path / "lm")
    with torch.no_grad():
        hidden = model.model(input_ids=IDS).last_hidden_state
    base = AutoModel.from_pretrained(tmp_path / "lm").eval()
    names = [spec["name"] for spec in base.config.quantization_config.layers]
    assert names[:2] == ["layers.0.self_attn.q_proj", "layers.0.mlp.down_proj"] and "lm_head" not in names
    assert isinstance(base.get_submodule("layers.1.mlp.down_proj"), InherLinear)
    with torch.no_grad():
        assert torch.equal(base(input_ids=IDS).last_hidden_state, hidden)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=2)  # another head
    assert isinstance(classifier.model.layers[0].mlp.down_proj, InherLinear) and not isinstance(classifier.score,
                                                                                                  InherLinear)
    base.save_pretrained(tmp_path / "base")
    headed = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert isinstance(headed.get_submodule("model.layers.1.self_attn.q_proj"), InherLinear)
    assert not isinstance(headed.lm_head, InherLinear)
    with torch.no_grad():
        assert torch.equal(headed.model(input_ids=IDS).last_hidden_state, hidden)


def test_a_layer_the_loading_class_lacks_is_left_out(tmp_path, caplog):
    """BERT's pooler exists in the sequence classifier, not in the masked LM: its inherited layer is left out with
    a warning (transformers reports the unused weights), while in the saved class a missing layer stays an error."""
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=2)
    torch.manual_seed(0)
    model = get_inher_model(BertForSequenceClassification(config).eval(),
                            InherConfig(r=4, target_modules=["query", "dense"]), progressbar=False)
    assert isinstance(model.bert.pooler.dense, InherLinear)
    model.save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="inhernet_hf.model"):
        masked = BertForMaskedLM.from_pretrained(tmp_path).eval()
    assert "['bert.pooler.dense'] of the saved model are not part of BertForMaskedLM" in caplog.text
    assert isinstance(masked.bert.encoder.layer[1].output.dense, InherLinear)
    ids = torch.tensor([[2, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(masked.bert(input_ids=ids).last_hidden_state,
                           model.bert(input_ids=ids).last_hidden_state)


def test_key_mapping_reaches_the_checkpoint_check(saved, tmp_path):
    """A checkpoint whose keys need transformers' `key_mapping` (here 'model.' renamed 'enc.') loads through
    InherModel.from_pretrained(key_mapping=...); the transformers class, which does not pass the mapping to the
    check, says where to pass it."""
    folder, logits = saved
    shutil.copytree(folder, tmp_path / "renamed")
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k.replace("model.", "enc.", 1): v for k, v in weights.items()},
              str(tmp_path / "renamed" / "model.safetensors"), metadata={"format": "pt"})
    mapping = {r"^enc\.": "model."}
    loaded = InherModel.from_pretrained(tmp_path / "renamed", key_mapping=mapping)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, logits)
    with pytest.raises(ValueError, match=r"InherModel.from_pretrained\(\.\.\., key_mapping=\.\.\.\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "renamed", key_mapping=mapping)


def test_loaded_model_trains_and_takes_dtype_and_device_map(saved):
    folder, _ = saved
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu")
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.inher_up.weight.dtype == torch.bfloat16 and layer.inher_up.weight.device.type == "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.requires_grad and p.grad is not None for p in model.parameters())


def test_sharded_save_writes_an_index_and_reloads(tmp_path):
    model = tiny_inherited()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    with torch.no_grad():
        assert torch.equal(InherModel.from_pretrained(tmp_path)(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_pickle_is_refused_unless_asked_for(saved):
    folder, logits = saved
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"Refusing to unpickle \['pytorch_model.bin'\].*use_safetensors=False"):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(OSError):  # InherModel asks transformers for safetensors only
        InherModel.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(InherModel.from_pretrained(folder, use_safetensors=False)(input_ids=IDS).logits, logits)
    with pytest.raises(ValueError, match="safetensors only"):
        tiny_inherited().save_pretrained(folder / "again", safe_serialization=False)


def _rewrite(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("model.layers.1.self_attn.q_proj.inher_up.weight"),
         r"missing tensor model.layers.1.self_attn.q_proj.inher_up.weight \(expected shape \(32, 16\)\)"),
        (lambda s: s.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(64, 32)),
         r"extra tensor model.layers.0.mlp.up_proj.weight \(64, 32\): a dense parameter"),
        (lambda s: s.__setitem__("model.layers.0.mlp.up_proj.inher_down.weight", torch.zeros(6, 32)),
         r"tensor model.layers.0.mlp.up_proj.inher_down.weight has shape \(6, 32\) in the checkpoint, \(8, 32\)"),
        (lambda s: s.__setitem__("model.layers.0.self_attn.q_proj.inher_extra", torch.zeros(2)),
         r"extra tensor model.layers.0.self_attn.q_proj.inher_extra \(2,\) not in the inherited layer"),
        (lambda s: s.__setitem__("model.layers.0.mlp.up_proj.inher_down.weight", torch.zeros(8, 32, dtype=torch.int8)),
         r"tensor model.layers.0.mlp.up_proj.inher_down.weight is stored as I8; an inherited layer's tensors are "
         r"floating point"),
        (lambda s: s["model.layers.1.mlp.down_proj.inher_up.weight"].__setitem__((0, 3), float("nan")),
         r"inherited tensors \['model.layers.1.mlp.down_proj.inher_up.weight'\] hold NaN or Inf"),
    ],
)
def test_mismatched_checkpoint_names_tensor_and_shapes(saved, edit, message):
    folder, _ = saved
    _rewrite(folder, edit)
    for load in (InherModel.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=message):
            load(folder)


def test_truncated_safetensors_file_is_named(saved):
    folder, _ = saved
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
    for load in (InherModel.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=r"model.safetensors is not a complete safetensors file .*cut short"):
            load(folder)


def test_config_naming_a_module_the_model_lacks(saved):
    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["layers"][0]["name"] = "model.layers.0.self_attn.qq_proj"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="records an inherited layer 'model.layers.0.self_attn.qq_proj', but the model "
                                         "built from it has no such module"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_future_format_version_says_so(saved):
    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format version 99.*reads versions up to 2. Upgrade inhernet_hf"):
        AutoModelForCausalLM.from_pretrained(folder)


# A process that never imported inhernet_hf: every way in raises, naming the package; none returns a model.
NO_IMPORT_LOADS = {
    "AutoModelForCausalLM": "from transformers import AutoModelForCausalLM as A; A.from_pretrained(FOLDER)",
    "AutoModel, trust_remote_code": "from transformers import AutoModel as A; A.from_pretrained(FOLDER, "
                                    "trust_remote_code=True)",
    "pipeline": "from transformers import pipeline; pipeline('text-generation', model=FOLDER)",
    "AutoModelForSequenceClassification": "from transformers import AutoModelForSequenceClassification as A; "
                                          "A.from_pretrained(FOLDER)",
    "pipeline, text-classification": "from transformers import pipeline; pipeline('text-classification', "
                                     "model=FOLDER, trust_remote_code=False)",
}


def saved_classifier(folder):
    """A small inherited BertForSequenceClassification with MiniLM's real tokenizer, saved to `folder`; its logits
    on IDS."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                                     num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=64)).eval()
    model = get_inher_model(model, InherConfig(r=4, num_heads=2, task_type="SEQ_CLS"), progressbar=False)
    model.save_pretrained(folder, tokenizer=tokenizer)
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("route", list(NO_IMPORT_LOADS))
def test_without_the_import_every_load_fails_loudly(saved, tmp_path, route):
    folder = tmp_path / "cls" if "lassification" in route else saved[0]
    if folder != saved[0]:
        saved_classifier(folder)
    code = f"FOLDER = {str(folder)!r}\n" + NO_IMPORT_LOADS[route]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0, f"{route} loaded an inherited checkpoint without inhernet_hf"
    assert "model type `inhernet_hf`" in result.stderr, result.stderr[-2000:]


def test_with_the_import_auto_classes_and_pipelines_load_bitwise(tmp_path):
    from transformers import AutoConfig, AutoTokenizer, BertConfig, pipeline

    folder = tmp_path / "cls"
    logits = saved_classifier(folder)
    assert type(AutoConfig.from_pretrained(folder)) is BertConfig  # downstream code sees the base architecture
    classifier = pipeline("text-classification", model=str(folder))
    assert isinstance(classifier.model.get_submodule("bert.encoder.layer.0.attention.self.query"), InherLinear)
    for loaded in (AutoModelForSequenceClassification.from_pretrained(folder), InherModel.from_pretrained(folder),
                   classifier.model):
        with torch.no_grad():
            assert torch.equal(loaded.eval()(input_ids=IDS).logits, logits)
    text = "a gripping, funny film"
    with torch.no_grad():
        direct = classifier.model(**AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt")).logits
    assert classifier(text)[0]["score"] == pytest.approx(direct.softmax(-1).max().item(), rel=1e-6)
    # Saved again by transformers itself, the model keeps the inherited model type.
    AutoModelForSequenceClassification.from_pretrained(folder).save_pretrained(tmp_path / "again")
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (written["model_type"], written["inher_base_model_type"]) == ("inhernet_hf", "bert")


def test_text_generation_pipeline_on_an_inherited_folder(tmp_path):
    from transformers import AutoTokenizer, pipeline

    folder, gguf = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=64).eval()
    model = get_inher_model(model, InherConfig(r=8, num_heads=2), progressbar=False)
    model.save_pretrained(tmp_path / "lm", tokenizer=tokenizer)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    expected = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    generator = pipeline("text-generation", model=str(tmp_path / "lm"))
    out = generator("The capital of France is", max_new_tokens=5, do_sample=False, return_tensors=True)
    assert out[0]["generated_token_ids"] == expected[0].tolist()


def test_format_1_checkpoint_loads_and_says_it_is_older(saved, caplog):
    folder, logits = saved
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = config.pop("inher_base_model_type")  # format 1: the base model's type
    config["quantization_config"]["format_version"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING"):
        loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert "older format 1" in caplog.text and "Save it again" in caplog.text
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, logits)


def test_dense_checkpoint_is_not_an_inherited_one(tmp_path):
    tiny_llama(max_position_embeddings=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is not an inhernet_hf checkpoint.*get_inher_model"):
        InherModel.from_pretrained(tmp_path)


def test_lora_on_inherited_factors_saves_and_reloads(saved, tmp_path):
    folder, _ = saved
    peft_model = get_peft_model(InherModel.from_pretrained(folder),
                                LoraConfig(r=4, target_modules=["inher_down", "inher_up"], init_lora_weights=False))
    assert peft_model.get_nb_trainable_parameters()[0] > 0
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(input_ids=IDS).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(InherModel.from_pretrained(folder), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, logits)


def test_hub_id_resolves_offline_from_a_standard_cache(saved, tmp_path):
    folder, logits = saved
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--inher-org--tiny-llama"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    torch.save(logits, tmp_path / "logits.pt")
    out = run_python(f"""
        import torch
        from inhernet_hf import InherModel
        ids = torch.tensor({IDS.tolist()})
        for rev in (None, "{revision}"):
            model = InherModel.from_pretrained("inher-org/tiny-llama", revision=rev)
            with torch.no_grad():
                assert torch.equal(model(input_ids=ids).logits, torch.load("{tmp_path / 'logits.pt'}")), rev
        print("ok", model.config.name_or_path)
        """, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert out.startswith("ok")
    # the same cache passed as cache_dir (the default cache is empty): config.json is read from it too
    out = run_python(f"""
        from inhernet_hf import InherModel
        model = InherModel.from_pretrained("inher-org/tiny-llama", cache_dir="{tmp_path / 'hub'}")
        print("ok", type(model).__name__)
        """, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")})
    assert out.startswith("ok LlamaForCausalLM")


def test_subfolder_applies_to_config_and_weights(tmp_path):
    model = tiny_inherited().eval()
    model.save_pretrained(tmp_path / "repo" / "student")
    loaded = InherModel.from_pretrained(tmp_path / "repo", subfolder="student")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_push_to_hub_sends_every_file_of_the_folder(saved, tmp_path):
    folder, _ = saved
    with recording_hub() as hub:
        run_python(f"""
            from inhernet_hf import InherModel
            model = InherModel.from_pretrained("{folder}")
            info = model.push_to_hub("me/tiny-inher", private=True, commit_message="test push")
            model.save_pretrained("{tmp_path / 'local'}")
            print(info.oid)
            """, hub.env)
    local = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()}
    card = ModelCard(hub.card)
    assert card.data.library_name == "transformers" and "inhernet_hf" in card.data.tags
    assert card.data.model_name == "tiny-inher" and "\n# tiny-inher\n" in card.text  # not the temporary folder's
    assert set(hub.uploaded) == set(local)
    assert hub.uploaded["model.safetensors"] == local["model.safetensors"]
    assert hub.repos == ["me/tiny-inher"]
