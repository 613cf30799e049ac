"""GLUE's metrics as an `evaluate` module, the offline counterpart of the Hub's `evaluate-metric/glue`: the same
configurations, input features (int64 labels; float32 scores for STS-B) and outputs.

    accuracy                 sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli, hans
    accuracy, f1             mrpc, qqp (F1 of the positive class 1)
    matthews_correlation     cola
    pearson, spearmanr       stsb
"""

import datasets
import evaluate
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

METRICS = {
    **{name: ("accuracy",) for name in ("sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli",
                                        "hans")},
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "cola": ("matthews_correlation",),
    "stsb": ("pearson", "spearmanr"),
}


class Glue(evaluate.Metric):
    """`compute(predictions, references)`: class ids (or STS-B scores) of the same length."""

    def _info(self):
        if self.config_name not in METRICS:
            raise KeyError(f"GLUE metric configuration {self.config_name!r} is unknown; give one of "
                           f"{sorted(METRICS)}.")
        value = datasets.Value("float32" if self.config_name == "stsb" else "int64")
        return evaluate.MetricInfo(
            description="GLUE benchmark metrics (accuracy, F1, Matthews and Pearson/Spearman correlations).",
            citation="Wang et al., GLUE: A Multi-Task Benchmark and Analysis Platform for NLU, ICLR 2019.",
            inputs_description=__doc__,
            features=datasets.Features({"predictions": value, "references": value}),
            format="numpy",
        )

    def _compute(self, predictions, references):
        scores = {}
        for name in METRICS[self.config_name]:
            if name == "accuracy":
                scores[name] = float((predictions == references).mean())
            elif name == "f1":
                scores[name] = float(f1_score(y_true=references, y_pred=predictions))
            elif name == "matthews_correlation":
                scores[name] = float(matthews_corrcoef(references, predictions))
            elif name == "pearson":
                scores[name] = float(pearsonr(predictions, references)[0])
            else:
                scores[name] = float(spearmanr(predictions, references)[0])
        return scores
