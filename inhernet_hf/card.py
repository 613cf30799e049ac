"""The model card (README.md with YAML metadata) written next to an inherited checkpoint."""

from __future__ import annotations

import os
import re
from typing import Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

PIPELINE_TAGS = {
    "SEQ_CLS": "text-classification",
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def model_card(
    model_name: str,
    base_model: Optional[str],
    inher_config: dict,
    report,
    eval_results: Optional[dict[str, float]] = None,
    eval_dataset: Optional[str] = None,
) -> ModelCard:
    """Card for an inherited model. `base_model` goes into the metadata only when it is a Hub id (not a local
    path); `eval_results` ({metric: value}, measured on `eval_dataset`) become model-index entries."""
    pipeline_tag = PIPELINE_TAGS.get(inher_config.get("task_type"))
    stats = {"dense_params": report.dense_params, "params": report.params, "ratio": round(report.ratio, 6),
             "num_heads": inher_config["num_heads"], "init": inher_config["init"],
             "inherited_layers": sum(r.inherited for r in report.rows),
             "kept_dense_layers": sum(not r.inherited for r in report.rows)}
    results = [
        EvalResult(task_type=pipeline_tag or "other", dataset_type=eval_dataset or "custom",
                   dataset_name=eval_dataset or "custom", metric_type=metric, metric_value=float(value))
        for metric, value in (eval_results or {}).items()
    ]
    is_hub_id = base_model is not None and _HUB_ID.match(base_model) and not os.path.exists(base_model)
    data = ModelCardData(
        base_model=base_model if is_hub_id else None,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=["inhernet_hf", "inhernet", "low-rank", "compression"],
        model_name=model_name,
        eval_results=results or None,
        inhernet=stats,
    )
    rows = "\n".join(f"| {k} | {v} |" for k, v in stats.items())
    metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in (eval_results or {}).items())
    body = f"""
# {model_name}

Compressed by neural network inheritance with `inhernet_hf` from
`{base_model or "an unnamed base model"}`: each targeted projection is a shared low-rank down-projection with
{inher_config["num_heads"]} gated up-projection heads, initialised from the truncated SVD of the teacher weight.

| compression | value |
|---|---|
{rows}
""" + (f"""
## Evaluation{f" ({eval_dataset})" if eval_dataset else ""}

| metric | value |
|---|---|
{metrics}
""" if eval_results else "") + """
## Use

Needs `pip install inhernet_hf` and `import inhernet_hf` before loading: without it, transformers refuses this
checkpoint (its config.json has model type `inhernet_hf`).

```python
import inhernet_hf  # registers the inherited layers with transformers
from transformers import AutoModel  # or the AutoModelFor* class of the task
model = AutoModel.from_pretrained("<this repo or folder>")
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
