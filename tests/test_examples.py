"""Smoke test of examples/: compress real MiniLM, save, reload with plain transformers, push to a local Hub
stand-in, then LoRA on the inherited factors with the adapter reloaded on top."""

from pathlib import Path

import pytest

from hub_server import recording_hub, run_python

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_compress_reload_push_then_lora(tmp_path):
    with recording_hub() as hub:
        out = run_python(str(EXAMPLES / "compress_and_reload.py"), hub.env,
                         ("--output_dir", str(tmp_path / "inher"), "--push_to_hub", "--hub_model_id", "me/minilm-inher"))
    assert "ratio 0.4989" in out and "class probabilities" in out
    assert hub.repos == ["me/minilm-inher"]
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(hub.uploaded)
    out = run_python(str(EXAMPLES / "lora_on_inherited.py"), {},
                     ("--inherited_dir", str(tmp_path / "inher"), "--output_dir", str(tmp_path / "lora"), "--steps", "2"))
    assert "identical logits: True" in out
