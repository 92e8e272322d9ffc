"""diffusers integration of ByTheWay: `apply_bytheway(pipe)` and its controller and processor."""

from .controller import ByTheWayController, active_step_count, apply_bytheway
from .processor import ByTheWayAttnProcessor, reduce_heads

__all__ = ["ByTheWayAttnProcessor", "ByTheWayController", "active_step_count", "apply_bytheway", "reduce_heads"]
