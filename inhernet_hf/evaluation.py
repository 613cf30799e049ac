"""`inhernet eval`: lm-evaluation-harness on inherited checkpoints.

lm-eval's `hf` model loads `pretrained=DIR` with `AutoModelForCausalLM.from_pretrained`, which reads an inherited
checkpoint only once `inhernet_hf` is imported (without it, transformers refuses the `inhernet_hf` model type).
This module imports the package, adds the tasks shipped in `lm_eval_tasks/` (`inhernet_text`: perplexity on local
documents) to lm-eval's search path, and hands every argument over to lm-eval's own command line:

    inhernet eval --model hf --model_args pretrained=DIR,dtype=float32 --tasks inhernet_text \
        --metadata '{"path": "docs.jsonl"}' --batch_size 1
"""

from __future__ import annotations

import sys
from pathlib import Path

import inhernet_hf  # noqa: F401  (registers the inherited checkpoint format with transformers)

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"


def run_lm_eval(argv: list[str]) -> None:
    """lm-eval's CLI (`lm_eval ARGS`) in this process, with TASKS_DIR as `--include_path` unless one is given."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise SystemExit("inhernet eval runs lm-evaluation-harness, which is not installed: pip install lm-eval") from None
    argv = list(argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(TASKS_DIR)]
    saved, sys.argv = sys.argv, ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
