"""Fused temporal attention: q, k, v -> out with ByTheWay inside, the F x F map never in memory."""

from .op import fused_available, temporal_attention, temporal_attention_op

__all__ = ["fused_available", "temporal_attention", "temporal_attention_op"]
