"""inhernet_hf: compress Hugging Face models by neural network inheritance (InherNet, ICLR 2026)."""

from .config import InherConfig
from .layer import InherLinear, inher_num_params, truncated_svd
from .model import InherModel, InherReport, LayerRecord, get_inher_model

__version__ = "0.1.0"

__all__ = [
    "InherConfig",
    "InherLinear",
    "InherModel",
    "InherReport",
    "LayerRecord",
    "get_inher_model",
    "inher_num_params",
    "truncated_svd",
]
