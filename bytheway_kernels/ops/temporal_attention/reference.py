"""The composed path of fused temporal attention: scores = scale * q k^T, the map op, then @ v.

This is what CPU tensors run, and, with the reference map-op backend on float64 inputs, the ground
truth the fused Triton kernel is tested against. Scores and the product with v are computed in
float32 (float64 for float64 inputs) whatever the input dtype, as the fused kernel does, and out
is rounded to q's dtype once; float16 saturates at +-65504 there as the map op's float16 outputs do
(with beta near its limit of 1e6, A3 @ v exceeds the float16 range although the float32 map does
not), so every finite input gives a finite output.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..attention_probs.op import _reference_backend, attention_probs
from ..attention_probs.reference import _to_output_dtype
from ..params import ByTheWayParams


def split_heads(values: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, F, heads*d) -> (N, heads, F, d) in `dtype` (a view when no cast is needed)."""
    sequences, frames, channels = values.shape
    return values.view(sequences, frames, heads, channels // heads).transpose(1, 2).to(dtype)


def temporal_attention_composed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, guide: Optional[torch.Tensor],
    heads: int, height: int, width: int, scale: float, params: ByTheWayParams,
    with_map: bool, with_stats: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(out, map, stats) of `torch.ops.bytheway.temporal_attention` by materialising the map; the
    map and the stats are None unless asked for.

    The map op runs on its backend for the device (`select_backend`), so on CPU this is
    bmm -> the map op's CPU kernel -> bmm; float64 always uses the map op's float64 reference.
    """
    sequences, frames, channels = q.shape
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    queries = split_heads(q, heads, compute_dtype)
    keys = split_heads(k, heads, compute_dtype)
    scores = torch.matmul(queries, keys.transpose(-1, -2)) * scale  # (N, heads, F, F)
    scores = scores.view(sequences // (height * width), height, width, heads, frames, frames)
    if guide is not None:
        guide = guide.to(compute_dtype)
    if compute_dtype == torch.float64:  # the map op's GPU kernel would compute it in fp32
        probs, stats = _reference_backend(scores, guide, params, with_stats)
    else:
        probs, stats = attention_probs(scores, guide, *params, with_stats)
    out = torch.matmul(probs.view(sequences, heads, frames, frames), split_heads(v, heads, compute_dtype))
    out = _to_output_dtype(out.transpose(1, 2).reshape(sequences, frames, channels), q.dtype)
    plain_map = torch.softmax(scores, dim=-1).to(q.dtype) if with_map else None
    return out, plain_map, stats if with_stats else None
