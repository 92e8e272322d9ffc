"""bytheway_kernels: fused kernels for ByTheWay (CVPR 2025) temporal-attention editing."""

from .config import PRESETS, ByTheWayConfig
from .integration import ByTheWayController, apply_bytheway
from .ops import BACKENDS, select_backend
from .ops.attention_probs import bytheway_attention_probs, reference

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ByTheWayConfig",
    "ByTheWayController",
    "PRESETS",
    "apply_bytheway",
    "bytheway_attention_probs",
    "reference",
    "select_backend",
    "__version__",
]
