"""lm-evaluation-harness on inherited checkpoints: `inhernet eval` (the real lm_eval package, its `hf` model) scores
an inherited causal LM on the shipped local-text task exactly as the model computes it; plain `lm_eval`, which never
imports inhernet_hf, refuses the checkpoint with an error naming inhernet_hf."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from inhernet_hf import InherConfig, get_inher_model
from inhernet_hf.evaluation import TASKS_DIR
from inhernet_hf.offline_models import smollm2_path
from reference import tiny_llama

pytest.importorskip("lm_eval")

DOCS = ["The quick brown fox jumps over the lazy dog.",
        "Knowledge inheritance compresses a teacher into a smaller network, " * 3]


@pytest.fixture(scope="module")
def inherited_lm(tmp_path_factory):
    """A tiny inherited Llama with SmolLM2's tokenizer, its lm_head scaled up so that its log-likelihoods are far
    from those of any other random model; the documents as JSONL with their token counts."""
    folder, gguf = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=64).eval()
    model = get_inher_model(model, InherConfig(r=8, num_heads=2), progressbar=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    out = tmp_path_factory.mktemp("lm_eval")
    model.save_pretrained(out / "lm", tokenizer=tokenizer)
    docs = out / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d, "tokens": len(tokenizer(d).input_ids)}) + "\n" for d in DOCS))
    return model, tokenizer, out


def _lm_eval(command, folder, docs, output):
    return subprocess.run([*command, "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
                           "--tasks", "inhernet_text", "--metadata", json.dumps({"path": str(docs)}),
                           "--batch_size", "1", "--device", "cpu", "--output_path", str(output)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_inhernet_eval_scores_the_inherited_model(inherited_lm):
    model, tokenizer, out = inherited_lm
    done = _lm_eval([sys.executable, "-m", "inhernet_hf.cli", "eval"], out / "lm", out / "docs.jsonl", out / "results")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((out / "results").rglob("results_*.json")).read_text())["results"]["inhernet_text"]

    # The same quantity computed here: each document predicted token by token after lm-eval's prefix token (BOS).
    total_ll, total_tokens, words = 0.0, 0, 0
    with torch.no_grad():
        for doc in DOCS:
            ids = tokenizer(doc).input_ids
            inputs = torch.tensor([[tokenizer.bos_token_id, *ids[:-1]]])
            logprobs = torch.log_softmax(model(input_ids=inputs).logits[0].double(), dim=-1)
            total_ll += logprobs[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
            total_tokens += len(ids)
            words += len(re.split(r"\s+", doc))  # lm-eval's wikitext word count
    assert results["token_perplexity,none"] == pytest.approx(math.exp(-total_ll / total_tokens), rel=1e-4)
    assert results["word_perplexity,none"] == pytest.approx(math.exp(-total_ll / words), rel=1e-4)


def test_plain_lm_eval_refuses_the_checkpoint_naming_inhernet_hf(inherited_lm):
    _, _, out = inherited_lm
    done = _lm_eval([sys.executable, "-m", "lm_eval", "--include_path", str(TASKS_DIR)], out / "lm", out / "docs.jsonl",
                    out / "plain")
    assert done.returncode != 0
    assert "inhernet_hf" in done.stderr
    assert not (out / "plain").exists()
