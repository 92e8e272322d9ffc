"""bytheway_kernels: fused kernels for ByTheWay (CVPR 2025) temporal-attention editing."""

from .config import PRESETS, ByTheWayConfig
from .integration import ByTheWayController, apply_bytheway, enable_fast_temporal_attention, remove_bytheway
from .ops import BACKENDS, select_backend
from .ops.attention_probs import bytheway_attention_probs, reference
from .ops.temporal_attention import temporal_attention

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ByTheWayConfig",
    "ByTheWayController",
    "PRESETS",
    "apply_bytheway",
    "bytheway_attention_probs",
    "enable_fast_temporal_attention",
    "reference",
    "remove_bytheway",
    "select_backend",
    "temporal_attention",
    "__version__",
]
