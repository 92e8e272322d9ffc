"""The map op: pre-softmax scores -> ByTheWay-modified attention probabilities."""

from . import reference
from .op import attention_probs, bytheway_attention_probs, stats_rows

__all__ = ["attention_probs", "bytheway_attention_probs", "reference", "stats_rows"]
