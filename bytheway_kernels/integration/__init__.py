"""diffusers integration: `apply_bytheway(pipe)` with its controller and processor, and
`enable_fast_temporal_attention(pipe)` (the fused op with ByTheWay off)."""

from .controller import ByTheWayController, active_step_count, apply_bytheway
from .fast import FastTemporalAttention, FastTemporalAttnProcessor, enable_fast_temporal_attention
from .processor import ByTheWayAttnProcessor, reduce_heads
from .recovery import remove_bytheway

__all__ = [
    "ByTheWayAttnProcessor",
    "ByTheWayController",
    "FastTemporalAttention",
    "FastTemporalAttnProcessor",
    "active_step_count",
    "apply_bytheway",
    "enable_fast_temporal_attention",
    "reduce_heads",
    "remove_bytheway",
]
