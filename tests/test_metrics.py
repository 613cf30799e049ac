"""The recipes' metrics are `evaluate` modules (inhernet_hf.metrics): the same numbers as scikit-learn / scipy on the
same predictions, the Hub module's configurations and features, and usable with the rest of `evaluate`."""

import evaluate
import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from inhernet_hf.metrics import load_metric

rng = np.random.default_rng(0)
LABELS = rng.integers(0, 2, 500)
PREDICTIONS = np.where(rng.random(500) < 0.8, LABELS, 1 - LABELS)  # 80% right
SCORES = rng.uniform(0, 5, 300)
SCORE_PREDICTIONS = SCORES + rng.normal(0, 1, 300)


@pytest.mark.parametrize("config", ["sst2", "rte", "qnli", "wnli", "mnli", "mnli_mismatched", "mrpc", "qqp", "cola"])
def test_glue_classification_metrics_equal_sklearn(config):
    scores = load_metric("glue", config).compute(predictions=PREDICTIONS, references=LABELS)
    expected = {"accuracy": accuracy_score(LABELS, PREDICTIONS)}
    if config in ("mrpc", "qqp"):
        expected["f1"] = f1_score(LABELS, PREDICTIONS, pos_label=1)
    if config == "cola":
        expected = {"matthews_correlation": matthews_corrcoef(LABELS, PREDICTIONS)}
    assert scores == expected  # exactly: the same computation on the same integers


def test_glue_stsb_equals_scipy_on_its_float32_features():
    scores = load_metric("glue", "stsb").compute(predictions=SCORE_PREDICTIONS, references=SCORES)
    # The Hub module (and ours) store STS-B scores as float32 features, so scipy is given the same float32 values.
    p, r = SCORE_PREDICTIONS.astype(np.float32), SCORES.astype(np.float32)
    assert scores == {"pearson": float(pearsonr(p, r)[0]), "spearmanr": float(spearmanr(p, r)[0])}
    assert scores["pearson"] == pytest.approx(pearsonr(SCORE_PREDICTIONS, SCORES)[0], rel=1e-6)


def test_glue_metric_accumulates_batches_and_combines():
    metric = load_metric("glue", "mrpc")
    for start in range(0, 500, 128):
        metric.add_batch(predictions=PREDICTIONS[start:start + 128], references=LABELS[start:start + 128])
    assert metric.compute() == load_metric("glue", "mrpc").compute(predictions=PREDICTIONS, references=LABELS)
    combined = evaluate.combine([load_metric("glue", "cola"), load_metric("glue", "sst2")])
    assert combined.compute(predictions=PREDICTIONS, references=LABELS) == {
        "matthews_correlation": matthews_corrcoef(LABELS, PREDICTIONS), "accuracy": accuracy_score(LABELS, PREDICTIONS)}


def test_unknown_glue_config_and_metric_are_clear_errors():
    with pytest.raises(KeyError, match="'boolq' is unknown"):
        load_metric("glue", "boolq", prefer_local=True)
    with pytest.raises(ValueError, match="No metric 'bleu' ships with inhernet_hf"):
        load_metric("bleu")


def test_exact_match():
    metric = load_metric("exact_match")
    predictions, references = ["18", "3.5", "", "7", "The Cat"], ["18", "3.50", "4", "7", "the cat"]
    assert metric.compute(predictions=predictions, references=references) == {"exact_match": 2 / 5}
    assert metric.compute(predictions=predictions, references=references, ignore_case=True) == {"exact_match": 3 / 5}
    # An empty prediction matches only an empty reference, also after normalisation removed everything.
    assert metric.compute(predictions=["", "!!"], references=["", "?"], ignore_punctuation=True) == {
        "exact_match": 1 / 2}
    assert metric.compute(predictions=["a1b"], references=["ab2"], ignore_numbers=True,
                          regexes_to_ignore=["x"]) == {"exact_match": 1.0}
