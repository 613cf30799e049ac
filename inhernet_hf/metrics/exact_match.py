"""Exact match as an `evaluate` module, the offline counterpart of the Hub's `evaluate-metric/exact_match`: the
share of predictions equal to their reference string, after the optional normalisations (applied to both sides, in
this order): `regexes_to_ignore` removed, `ignore_case`, `ignore_punctuation`, `ignore_numbers`. An empty
normalised prediction counts only when the original strings were equal.
"""

import re
import string

import datasets
import evaluate
import numpy as np


def _normalise(text: str, regexes_to_ignore, ignore_case: bool, ignore_punctuation: bool, ignore_numbers: bool) -> str:
    for pattern in regexes_to_ignore or ():
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if ignore_numbers:
        text = text.translate(str.maketrans("", "", string.digits))
    return text


class ExactMatch(evaluate.Metric):
    """`compute(predictions, references, regexes_to_ignore=None, ignore_case=False, ignore_punctuation=False,
    ignore_numbers=False)` -> {"exact_match": share in [0, 1]}."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Exact string match rate.",
            citation="",
            inputs_description=__doc__,
            features=datasets.Features({"predictions": datasets.Value("string", id="sequence"),
                                        "references": datasets.Value("string", id="sequence")}),
        )

    def _compute(self, predictions, references, regexes_to_ignore=None, ignore_case=False, ignore_punctuation=False,
                 ignore_numbers=False):
        options = (regexes_to_ignore, ignore_case, ignore_punctuation, ignore_numbers)
        hits = []
        for prediction, reference in zip(predictions, references):
            p, r = _normalise(prediction, *options), _normalise(reference, *options)
            hits.append(p == r and (p != "" or prediction == reference))
        return {"exact_match": float(np.mean(hits))}
