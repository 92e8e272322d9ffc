"""Fused temporal attention: `torch.ops.bytheway.temporal_attention` and its public function.

q, k, v -> out = A3 @ v with A3 the ByTheWay map of the scores scale * q k^T (docs/DESIGN.md section 7).
CUDA tensors run the fused Triton kernels (`triton.py`: the F x F map never reaches memory); other
devices, float64 inputs and F > 64 run the composed path (`reference.py`). In plain eager calls
the public function runs the implementation directly, skipping the custom op's Python dispatch
(`ops.dispatch.direct_call_is_equivalent`); tracing, compiling, Python modes, functorch and
autograd go through the op.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from ..._validation import check_temporal_attention_args
from ...energy import STATS_FIELDS, stats_rows
from ..dispatch import direct_call_is_equivalent, refuse_gradients, select_backend
from ..params import ByTheWayParams
from .reference import temporal_attention_composed

#: Largest F the fused kernel handles (it pads F to a power of two >= 16).
FUSED_MAX_FRAMES = 64


def fused_available(device) -> bool:
    """Whether the fused Triton kernel runs for tensors on `device` (CUDA, or forced Triton)."""
    return select_backend(torch.device(device)) == "triton"


def _runs_fused(q: torch.Tensor) -> bool:
    return (select_backend(q.device) == "triton" and q.dtype != torch.float64
            and q.shape[1] <= FUSED_MAX_FRAMES)


def _temporal_attention(q, k, v, guide, heads: int, height: int, width: int, scale: float,
                        params: ByTheWayParams, with_map: bool, with_stats: bool):
    """(out, map, stats) from the fused kernel or the composed path, whichever runs `q`; the map
    and the stats are None unless asked for."""
    if _runs_fused(q):
        return _fused_function()(q, k, v, guide, heads, height, width, scale, params, with_map,
                                 with_stats)
    return temporal_attention_composed(q, k, v, guide, heads, height, width, scale, params,
                                       with_map, with_stats)


@functools.lru_cache(maxsize=None)
def _fused_function():
    # imports triton only when used; an import statement per call would cost ~1 us
    from .triton import temporal_attention_triton

    return temporal_attention_triton


@torch.library.custom_op("bytheway::temporal_attention", mutates_args=())
def temporal_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    guide: Optional[torch.Tensor],
    heads: int,
    height: int,
    width: int,
    scale: float,
    alpha: float,
    beta: float,
    tau: int,
    adaptive_beta: bool,
    parts: int,
    energy_part: int,
    energy_scope: str,
    guide_upsample: str,
    beta_max: Optional[float],
    with_map: bool,
    with_stats: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, map, stats); map and stats are empty tensors unless asked for.

    Arguments are validated by `bytheway_kernels.temporal_attention`.
    """
    params = ByTheWayParams(alpha, beta, tau, adaptive_beta, parts, energy_part, energy_scope,
                            guide_upsample, beta_max)
    out, plain_map, stats = _temporal_attention(q, k, v, guide, heads, height, width, scale,
                                                params, with_map, with_stats)
    if plain_map is None:
        plain_map = q.new_empty((0,))
    if stats is None:
        stats = q.new_empty((0, len(STATS_FIELDS)), dtype=torch.float32)
    return out, plain_map, stats


refuse_gradients(temporal_attention_op, "torch.ops.bytheway.temporal_attention")


@temporal_attention_op.register_fake
def _(q, k, v, guide, heads, height, width, scale, alpha, beta, tau, adaptive_beta, parts,
      energy_part, energy_scope, guide_upsample, beta_max, with_map, with_stats):
    sequences, frames, channels = q.shape
    batch = sequences // (height * width)
    out = q.new_empty((sequences, frames, channels))
    plain_map = (q.new_empty((batch, height, width, heads, frames, frames)) if with_map
                 else q.new_empty((0,)))
    rows = stats_rows(batch, parts, energy_scope) if with_stats else 0
    return out, plain_map, q.new_empty((rows, len(STATS_FIELDS)), dtype=torch.float32)


def _validate(q, k, v, heads, height, width, scale, guide, alpha, beta, tau, adaptive_beta, cfg,
              energy_scope, guide_upsample, beta_max, batch_split, return_map, return_stats):
    """(heads, height, width, scale, ByTheWayParams, return_map, return_stats) of valid arguments,
    as plain Python values (numpy scalars converted, scale resolved); a ValueError naming a bad one."""
    checked = check_temporal_attention_args(
        q, k, v, heads, height, width, scale, guide, alpha, beta, tau, adaptive_beta, cfg,
        energy_scope, guide_upsample, beta_max, batch_split, return_map, return_stats,
    )
    split = checked.split
    params = ByTheWayParams(float(alpha), float(beta), int(tau), bool(adaptive_beta), split.parts,
                            split.energy_part, energy_scope, guide_upsample,
                            None if beta_max is None else float(beta_max))
    return (checked.heads, checked.height, checked.width, checked.scale, params, checked.return_map,
            checked.return_stats)


# Validation results of eager calls by argument signature: validity depends only on the tensors'
# shapes, strides, dtypes and devices and on the plain Python settings, which the key holds.
_VALIDATED: dict = {}
_VALIDATED_MAX = 1024
_NUMBER_TYPES = (int, float)


def _validation_key(q, k, v, heads, height, width, scale, guide, alpha, beta, tau, adaptive_beta,
                    cfg, energy_scope, guide_upsample, beta_max, batch_split, return_map,
                    return_stats):
    """A hashable signature of plain (eager) tensors and exact-type Python settings, else None
    (numpy scalars, bools passed as numbers and other types are validated on every call)."""
    numbers = (alpha, beta) + ((beta_max,) if beta_max is not None else ()) + (
        (scale,) if scale is not None else ())
    if not (all(type(number) in _NUMBER_TYPES for number in numbers)
            and type(heads) is int and type(height) is int and type(width) is int
            and type(tau) is int and type(adaptive_beta) is bool and type(cfg) is bool
            and type(return_map) is bool and type(return_stats) is bool
            and type(energy_scope) is str and type(guide_upsample) is str
            and (batch_split is None or (type(batch_split) is tuple
                                         and all(type(part) is int for part in batch_split)))):
        return None
    # flat: a generator over (q, k, v) and nested tuples cost ~1 us more per call
    return (q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype, k.device,
            v.shape, v.stride(), v.dtype, v.device,
            None if guide is None else (guide.shape, guide.dtype, guide.device), heads, height,
            width, scale, alpha, beta, tau, adaptive_beta, cfg, energy_scope, guide_upsample,
            beta_max, batch_split, return_map, return_stats)


def temporal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    heads: int,
    height: int,
    width: int,
    scale: Optional[float] = None,
    guide: Optional[torch.Tensor] = None,
    alpha: float = 0.0,
    beta: float = 1.0,
    tau: int = 0,
    adaptive_beta: bool = False,
    cfg: bool = True,
    energy_scope: str = "batch",
    guide_upsample: str = "nearest",
    beta_max: Optional[float] = None,
    batch_split: Optional[Tuple[int, int]] = None,
    return_map: bool = False,
    return_stats: bool = False,
):
    """Temporal self-attention with ByTheWay inside: out = A3 @ v, A3 the map op's output.

    Args:
        q, k, v: (B*H*W, F, heads*d) as a diffusers temporal attention processor holds them
            (row n = (b, y, x), batch outermost). The last dim must be contiguous; other strides
            are free, so slices of one fused qkv projection need no copy. Same shape, dtype and
            device for all three; fp32, fp16 or bf16 (float64 runs the composed path).
        heads, height, width: attention heads and the spatial size H x W of the feature map.
        scale: score scale, default d**-0.5. Scores are scale * q k^T per (n, head).
        guide, alpha, beta, tau, adaptive_beta, cfg, energy_scope, guide_upsample, beta_max,
            batch_split: as in `bytheway_kernels.bytheway_attention_probs` (guide is
            (B, h, w, heads, F, F)). The defaults (alpha=0, beta=1, no guide) give plain attention.
        return_map: also return the plain softmax map (B, H, W, heads, F, F) in q's dtype (what
            the anchor layer records as the later layers' guide).
        return_stats: also return float32 stats (rows, 6) = (beta, E1, E2, E2_low, E2_high, E3).

    The map op's rules hold: rows whose guided sum rowsum(A2) is <= 0 or not finite use the
    unguided map (in the energies too), and a float16 out saturates at +-65504 (A3 @ v reaches it
    only with beta above ~7e4; the fused kernel also saturates A3 where it rounds it to float16
    for the product), so every finite input gives a finite output.

    Returns:
        out (B*H*W, F, heads*d), contiguous, in q's dtype; then the map and/or the stats if asked.
        Never synchronises with the host.
    """
    args = (q, k, v, heads, height, width, scale, guide, alpha, beta, tau, adaptive_beta, cfg,
            energy_scope, guide_upsample, beta_max, batch_split, return_map, return_stats)
    if direct_call_is_equivalent(q, k, v, guide):
        key = _validation_key(*args)
        checked = _VALIDATED.get(key) if key is not None else None
        if checked is None:
            checked = _validate(*args)
            if key is not None:
                if len(_VALIDATED) >= _VALIDATED_MAX:
                    _VALIDATED.clear()
                _VALIDATED[key] = checked
        heads, height, width, scale, params, return_map, return_stats = checked
        out, plain_map, stats = _temporal_attention(q, k, v, guide, heads, height, width, scale,
                                                    params, return_map, return_stats)
    else:
        heads, height, width, scale, params, return_map, return_stats = _validate(*args)
        out, plain_map, stats = temporal_attention_op(q, k, v, guide, heads, height, width, scale,
                                                      *params, return_map, return_stats)
    extras = ((plain_map,) if return_map else ()) + ((stats,) if return_stats else ())
    return (out, *extras) if extras else out
