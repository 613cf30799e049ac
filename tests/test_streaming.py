"""Streamed compression (`inhernet_hf.streaming`, `inhernet compress --stream`): block by block from a sharded
safetensors checkpoint, one dense block in memory at a time, the same checkpoint as the in-memory path."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, BertModel

from inhernet_hf import InherConfig, InherLinear, get_inher_model
from inhernet_hf.calibration import sample_windows
from inhernet_hf import compress_checkpoint
from inhernet_hf.streaming import StreamingNotSupported, _CheckpointStream
from recipes import DATA_DIR
from reference import SMOLLM2_GGUF, smollm2_dir

WIKI = DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"


def tensors(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({key: f.get_tensor(key) for key in f.keys()})
    return out


@pytest.fixture(scope="module")
def smollm2_4(tmp_path_factory):
    """SmolLM2-135M's real weights cut to its first 4 decoder layers (tied embeddings, GQA), saved by transformers
    in 2 safetensors shards, with its tokenizer; and 4 calibration windows of WikiText-2."""
    folder = tmp_path_factory.mktemp("smollm2") / "dense"
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised on loading: save it as a plain float32 checkpoint
    del model.config.quantization_config
    model.config.num_hidden_layers = 4
    model.model.layers = model.model.layers[:4]
    model.save_pretrained(folder, max_shard_size="60MB")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    calibration = None
    if WIKI.is_file():
        ids = tokenizer(WIKI.read_text()[:50_000], return_tensors="pt").input_ids[0]
        calibration = list(sample_windows(ids, 4, 64, 0))
    return folder, tokenizer, calibration


def in_memory(folder, config, calibration, output):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    get_inher_model(model, config, calibration_data=calibration, progressbar=False).save_pretrained(output)


@pytest.mark.parametrize("init", ["svd", "whitened"])
def test_streamed_equals_in_memory_on_smollm2(smollm2_4, init, tmp_path, monkeypatch):
    folder, tokenizer, calibration = smollm2_4
    if init == "whitened" and calibration is None:
        pytest.skip(f"WikiText-2 not found under {DATA_DIR}")
    data = calibration if init == "whitened" else None
    config = lambda: InherConfig(target_ratio=0.5, num_heads=2, init=init)  # noqa: E731
    in_memory(folder, config(), data, tmp_path / "memory")

    dense_blocks = []  # after each load: blocks holding real weights (never more than one), and other weights
    load = _CheckpointStream.load

    def counting_load(self, name, block):
        load(self, name, block)
        dense_blocks.append((sum(any(p.device.type != "meta" for p in layer.parameters())
                                 for layer in self.model.model.layers),
                             sum(p.device.type != "meta" for n, p in self.model.named_parameters()
                                 if not n.startswith("model.layers."))))

    monkeypatch.setattr(_CheckpointStream, "load", counting_load)
    torch.manual_seed(0)
    skeleton = compress_checkpoint(folder, config(), tmp_path / "streamed", calibration_data=data,
                                   tokenizer=tokenizer, progressbar=False)
    assert dense_blocks == [(1, 0)] * 4  # the embeddings, norm and head were freed before the first block
    assert all(p.device.type == "meta" for p in skeleton.parameters())  # every weight written and freed

    streamed, memory = tensors(tmp_path / "streamed"), tensors(tmp_path / "memory")
    assert sorted(streamed) == sorted(memory)
    assert [key for key in memory if not torch.equal(streamed[key], memory[key])] == []  # bitwise
    assert json.loads((tmp_path / "streamed" / "config.json").read_text()) == \
        json.loads((tmp_path / "memory" / "config.json").read_text())
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(streamed)
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in streamed.values())

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")  # plain transformers, inherited again
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, InherLinear)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()  # still tied
    batch = tokenizer(["The tower is 324 metres tall."], return_tensors="pt")
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "memory")(**batch).logits
    assert torch.equal(reloaded(**batch).logits, expected)
    assert AutoTokenizer.from_pretrained(tmp_path / "streamed")("a b").input_ids == tokenizer("a b").input_ids


def test_cli_streams_by_default_and_says_why_it_does_not(smollm2_4, tmp_path, capsys):
    from inhernet_hf import cli

    folder, _, calibration = smollm2_4
    cli.main(["compress", str(folder), "--target-ratio", "0.5", "--num-heads", "1", "--output",
              str(tmp_path / "streamed"), "--device", "cpu"])
    assert "compressed block by block (streamed)" in capsys.readouterr().out
    cli.main(["compress", str(folder), "--target-ratio", "0.5", "--num-heads", "1", "--output",
              str(tmp_path / "memory"), "--device", "cpu", "--stream", "no"])
    assert "compressed in memory" in capsys.readouterr().out
    streamed, memory = tensors(tmp_path / "streamed"), tensors(tmp_path / "memory")
    assert sorted(streamed) == sorted(memory) and all(torch.equal(streamed[k], memory[k]) for k in memory)

    flags = ["--target-ratio", "0.5", "--rank-allocation", "energy", "--device", "cpu"]
    with pytest.raises(SystemExit, match="--stream yes: streamed compression plans ranks from the layer shapes: "
                                         "rank_allocation='uniform' only, got 'energy'"):
        cli.main(["compress", str(folder), *flags, "--output", str(tmp_path / "refused"), "--stream", "yes"])
    assert not (tmp_path / "refused").exists()
    cli.main(["compress", str(folder), *flags, "--output", str(tmp_path / "energy")])  # auto: in memory, says why
    out = capsys.readouterr().out
    assert "compressing in memory, not streamed: streamed compression plans ranks" in out
    assert "compressed in memory" in out
    with pytest.raises(SystemExit, match="--stream yes reads a safetensors checkpoint block by block; it cannot be "
                                         "combined with --gguf-file"):
        cli.main(["compress", smollm2_dir(), "--gguf-file", SMOLLM2_GGUF, "--target-ratio", "0.5", "--output",
                  str(tmp_path / "gguf"), "--stream", "yes"])


def test_checkpoints_streaming_cannot_read_are_refused_before_anything_is_written(tmp_path):
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64)
    BertModel(config).save_pretrained(tmp_path / "bin")  # then made a pickled (.bin) checkpoint
    torch.save(load_file(tmp_path / "bin" / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    with pytest.raises(StreamingNotSupported, match="has no safetensors checkpoint"):
        compress_checkpoint(tmp_path / "bin", InherConfig(target_ratio=0.5), tmp_path / "out1", progressbar=False)
    BertModel(config).save_pretrained(tmp_path / "base")  # a base checkpoint that config.json calls a task model
    (tmp_path / "base" / "config.json").write_text((tmp_path / "base" / "config.json").read_text().replace(
        '"BertModel"', '"BertForSequenceClassification"'))
    with pytest.raises(StreamingNotSupported, match=r"the checkpoint has no tensor \['classifier.weight', "
                                                    r"'classifier.bias'\] \(2 in all\): from_pretrained would "
                                                    r"initialise them at random"):
        compress_checkpoint(tmp_path / "base", InherConfig(target_ratio=0.5), tmp_path / "out2", progressbar=False)
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
