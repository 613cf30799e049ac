"""inhernet_hf: compress Hugging Face models by neural network inheritance (InherNet, ICLR 2026)."""

from .config import InherConfig
from .factor import truncated_svd, whitened_svd
from .conv import InherConv2d
from .layer import InherLinear, inher_num_params
from .model import InherModel, get_inher_model, plan_inheritance
from .report import InherReport, LayerRecord
from .streaming import compress_checkpoint

__version__ = "0.2.0"

__all__ = [
    "InherConfig",
    "InherConv2d",
    "InherLinear",
    "InherModel",
    "InherReport",
    "LayerRecord",
    "compress_checkpoint",
    "get_inher_model",
    "inher_num_params",
    "plan_inheritance",
    "truncated_svd",
    "whitened_svd",
]
