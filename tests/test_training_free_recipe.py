"""recipes/training_free.py: the offline WikiText-2 text, its calibration / evaluation split, and the perplexity."""

import json
import math

import pytest
import torch
from recipes import DATA_DIR, load_recipe
from inhernet_hf.offline_models import smollm2_path
from reference import minilm_path, tiny_llama
from transformers import AutoTokenizer

training_free = load_recipe("training_free")
WIKITEXT = DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"
needs_wikitext = pytest.mark.skipif(not WIKITEXT.is_file(), reason=f"WikiText-2 not found under {DATA_DIR}")


@needs_wikitext
def test_offline_wikitext_is_the_hub_test_split_joined_by_blank_lines():
    calibration, evaluation, note = training_free.load_wikitext(str(DATA_DIR))
    assert calibration is evaluation and note.startswith("offline")
    # the Hub's rows "", " = Robert Boulter = \n", "", " Robert Boulter is ...": the file's " " lines are empty rows
    assert evaluation.startswith("\n\n = Robert Boulter = \n" "\n\n" "\n\n" " Robert Boulter is an English film")
    assert evaluation.endswith("Ed Parker , and Eddie Pelkey . \n" "\n\n")  # the last row, "", after the last line


def test_missing_wikitext_names_the_file_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="wikitext-2-raw/wiki.test.raw"):
        training_free.load_wikitext(str(tmp_path))


@needs_wikitext
def test_calibration_pool_is_the_first_quarter_and_eval_windows_are_disjoint_and_spread():
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    _, text, _ = training_free.load_wikitext(str(DATA_DIR))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    cut, eval_len = len(ids) // 4, 128
    calibration, windows, note, _ = training_free.token_splits(tokenizer, str(DATA_DIR), calib_samples=8, calib_len=32,
                                                            eval_len=eval_len, max_windows=5, seed=0)
    samples = torch.cat([batch["input_ids"] for batch in calibration])
    assert samples.shape == (8, 32) and windows.shape == (5, eval_len)
    pool, rest = ids[:cut], ids[cut:]
    slices = pool.unfold(0, 32, 1)  # every calibration window is a slice of the pool
    assert all((slices == sample).all(dim=1).any() for sample in samples)
    n_windows = len(rest) // eval_len
    starts = [round(i * (n_windows - 1) / 4) * eval_len for i in range(5)]  # first to last window, evenly
    for window, start in zip(windows, starts):
        assert torch.equal(window, rest[start:start + eval_len])
    assert f"{len(pool):,} calibration-pool tokens, {len(rest):,} eval tokens of which {5 * eval_len:,} used" in note
    with pytest.raises(ValueError, match="fewer than one --eval_seq_len window"):
        training_free.token_splits(tokenizer, str(DATA_DIR), 1, 8, len(rest) + 1, 5, 0)


@needs_wikitext
def test_eval_docs_are_the_exact_text_of_the_eval_windows(tmp_path):
    """--eval_docs_out: each document is the text behind one evaluation window (byte-level BPE decodes exactly)."""
    folder, gguf = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    _, windows, _, texts = training_free.token_splits(tokenizer, str(DATA_DIR), calib_samples=2, calib_len=16,
                                                      eval_len=256, max_windows=6, seed=0)
    assert len(texts) == len(windows) == 6
    assert [tokenizer.decode(w) for w in windows] == texts
    training_free.write_eval_docs(tmp_path / "docs.jsonl", tokenizer, texts)
    docs = [json.loads(line) for line in (tmp_path / "docs.jsonl").read_text().splitlines()]
    assert [d["text"] for d in docs] == texts
    assert [d["tokens"] for d in docs] == [len(tokenizer(t).input_ids) for t in texts]


def test_perplexity_is_exp_of_the_models_mean_next_token_loss():
    model = tiny_llama().eval()
    windows = torch.randint(0, 64, (5, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # equal-length windows: the mean over all of them is the mean of their means
        expected = math.exp(model(input_ids=windows, labels=windows).loss.item())
    assert training_free.perplexity(model, windows, batch_size=2) == pytest.approx(expected, rel=1e-5)
