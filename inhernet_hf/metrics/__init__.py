"""The recipes' metrics as `evaluate` modules: `load_metric("glue", "sst2")`, `load_metric("exact_match")`.

Each is `evaluate.load(name, config_name)` from the Hub (or its cache) when that works, and otherwise the module of
the same name that ships in this folder (`glue.py`, `exact_match.py`), which computes the same numbers with the same
input features. Either way the result is an `evaluate.EvaluationModule`, so it combines with other metrics
(`evaluate.combine`) and accumulates batches (`add_batch`) as any other.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import evaluate

logger = logging.getLogger(__name__)

LOCAL_MODULES = {path.stem: path for path in Path(__file__).parent.glob("*.py") if path.stem != "__init__"}


def load_metric(name: str, config_name: Optional[str] = None, prefer_local: bool = False) -> evaluate.EvaluationModule:
    """`evaluate.load(name, config_name)`, falling back to the shipped module when the Hub's cannot be loaded
    (no network, `HF_HUB_OFFLINE=1` with an empty cache); `prefer_local` skips the Hub."""
    if name not in LOCAL_MODULES:
        raise ValueError(f"No metric {name!r} ships with inhernet_hf; available: {sorted(LOCAL_MODULES)}.")
    if not prefer_local:
        try:
            return evaluate.load(name, config_name)
        except Exception as err:  # any failure to fetch or build the Hub module: the local copy is the same metric
            logger.info("evaluate.load(%r) failed (%s: %s); using the copy shipped with inhernet_hf.", name,
                        type(err).__name__, err)
    return evaluate.load(str(LOCAL_MODULES[name]), config_name)
