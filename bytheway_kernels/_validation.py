"""Argument checks shared by every backend: each bad argument is a ValueError naming it."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

from .band import max_tau

ENERGY_SCOPES = ("batch", "sample")
GUIDE_UPSAMPLE_MODES = ("nearest", "bilinear")


def check_number(name: str, value, low: Optional[float] = None, high: Optional[float] = None):
    """A finite real number (not a bool, not a tensor) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


def check_tau(tau, frames: int) -> None:
    if isinstance(tau, bool) or not isinstance(tau, int):
        raise ValueError(f"tau must be an integer, got {tau!r}")
    if frames < 2:
        raise ValueError(f"ByTheWay needs at least F=2 frames, got F={frames}")
    if not 0 <= tau <= max_tau(frames):
        raise ValueError(
            f"tau={tau} is invalid for F={frames} frames: it must satisfy "
            f"0 <= tau <= (F - 2) // 2 = {max_tau(frames)} so that the high band "
            f"[F//2 - tau, F//2 + tau] fits in [1, F-1] and excludes the DC term"
        )


class BatchSplit(NamedTuple):
    """The batch axis is `parts` equal groups of `videos`; energies come from group `energy_part`."""

    parts: int
    energy_part: int
    videos: int


def batch_parts(cfg: bool, batch_split: Optional[Tuple[int, int]], name: str = "batch_split") -> Tuple[int, int]:
    """(parts, energy_part): cfg=True means (uncond, cond) halves with energies from the second;
    an explicit `batch_split` pair overrides `cfg` (`name` is the argument named in errors)."""
    if batch_split is None:
        if not isinstance(cfg, bool):
            raise ValueError(f"cfg must be a bool, got {cfg!r}")
        return (2, 1) if cfg else (1, 0)
    if (
        not isinstance(batch_split, (tuple, list))
        or len(batch_split) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in batch_split)
    ):
        raise ValueError(f"{name} must be a pair of ints (parts, energy_part), got {batch_split!r}")
    parts, energy_part = batch_split
    if parts < 1 or not 0 <= energy_part < parts:
        raise ValueError(
            f"{name}=(parts, energy_part) needs parts >= 1 and 0 <= energy_part < parts, "
            f"got {tuple(batch_split)}"
        )
    return parts, energy_part


def resolve_batch_split(batch: int, cfg: bool, batch_split: Optional[Tuple[int, int]]) -> BatchSplit:
    """The split of a batch of `batch` entries; B must divide into the parts."""
    parts, energy_part = batch_parts(cfg, batch_split)
    if batch % parts != 0:
        what = "cfg=True needs an even batch" if batch_split is None else f"batch_split={tuple(batch_split)}"
        raise ValueError(f"{what}: scores batch B={batch} is not divisible by {parts}")
    return BatchSplit(parts, energy_part, batch // parts)


def check_op_args(
    scores: torch.Tensor,
    guide: Optional[torch.Tensor],
    alpha,
    beta,
    tau,
    adaptive_beta,
    cfg,
    energy_scope,
    guide_upsample,
    beta_max,
    batch_split=None,
) -> BatchSplit:
    """Validate everything `bytheway_attention_probs` takes; return the resolved batch split."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got dtype {scores.dtype}")
    if scores.dim() != 6 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(
            f"scores must be 6-D (B, H, W, heads, F, F) with equal last two dims, got shape "
            f"{tuple(scores.shape)}"
        )
    frames = scores.shape[-1]
    check_tau(tau, frames)
    check_number("alpha", alpha, low=0.0, high=1.0)
    check_number("beta", beta, low=0.0)
    if beta_max is not None:
        check_number("beta_max", beta_max, low=beta)
    if not isinstance(adaptive_beta, bool):
        raise ValueError(f"adaptive_beta must be a bool, got {adaptive_beta!r}")
    if energy_scope not in ENERGY_SCOPES:
        raise ValueError(f"energy_scope must be one of {ENERGY_SCOPES}, got {energy_scope!r}")
    if guide_upsample not in GUIDE_UPSAMPLE_MODES:
        raise ValueError(f"guide_upsample must be one of {GUIDE_UPSAMPLE_MODES}, got {guide_upsample!r}")
    if guide is not None:
        if not isinstance(guide, torch.Tensor):
            raise ValueError(f"guide must be a torch.Tensor or None, got {type(guide).__name__}")
        if not guide.is_floating_point():
            raise ValueError(f"guide must be a floating-point tensor, got dtype {guide.dtype}")
        if guide.device != scores.device:
            raise ValueError(f"guide is on {guide.device} but scores are on {scores.device}")
        b, height, width, heads, f_rows, f_cols = scores.shape
        if guide.dim() != 6:
            raise ValueError(f"guide must be 6-D (B, h, w, heads, F, F), got shape {tuple(guide.shape)}")
        gb, gh, gw, gheads, gf_rows, gf_cols = guide.shape
        if (gb, gheads, gf_rows, gf_cols) != (b, heads, f_rows, f_cols):
            raise ValueError(
                f"guide shape {tuple(guide.shape)} must match scores {tuple(scores.shape)} in batch, "
                f"heads and frames"
            )
        if gh > height or gw > width:
            raise ValueError(
                f"guide spatial size ({gh}, {gw}) must not exceed the scores' ({height}, {width})"
            )
        if (gh == 0 or gw == 0) and height * width > 0:
            raise ValueError(f"guide spatial size ({gh}, {gw}) is empty but scores' is ({height}, {width})")
    return resolve_batch_split(scores.shape[0], cfg, batch_split)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_temporal_attention_args(
    q, k, v, heads, height, width, scale, guide, alpha, beta, tau, adaptive_beta, cfg,
    energy_scope, guide_upsample, beta_max, batch_split, return_map, return_stats,
) -> Tuple[BatchSplit, float]:
    """Validate everything `temporal_attention` takes; return (batch split, resolved scale).

    q, k, v are (B*H*W, F, heads*d) with a contiguous last dim; the ByTheWay arguments are checked
    by `check_op_args` against the (B, H, W, heads, F, F) layout of the scores q k^T.
    """
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
        if tensor.dim() != 3:
            raise ValueError(f"{name} must be 3-D (B*H*W, F, heads*d), got shape {tuple(tensor.shape)}")
        if tensor.stride(-1) != 1 and tensor.shape[-1] > 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {tensor.stride()}")
    for name, tensor in (("k", k), ("v", v)):
        if tensor.shape != q.shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} must equal q's {tuple(q.shape)}")
        if tensor.dtype != q.dtype:
            raise ValueError(f"{name} dtype {tensor.dtype} must equal q's {q.dtype}")
        if tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device} but q is on {q.device}")
    _check_positive_int("heads", heads)
    _check_positive_int("height", height)
    _check_positive_int("width", width)
    sequences, frames, channels = q.shape
    if channels % heads != 0:
        raise ValueError(f"the channel dim C={channels} of q is not divisible by heads={heads}")
    if sequences % (height * width) != 0:
        raise ValueError(
            f"q's first dim B*H*W={sequences} is not a multiple of height*width={height}*{width}"
        )
    head_dim = channels // heads
    if scale is None:
        scale = head_dim ** -0.5 if head_dim > 0 else 1.0
    else:
        check_number("scale", scale)
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
    for name, flag in (("return_map", return_map), ("return_stats", return_stats)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    # a free stand-in with the scores' shape, dtype and device: the map op's checks apply as is
    scores_layout = q.new_empty(()).expand(sequences // (height * width), height, width, heads, frames, frames)
    split = check_op_args(scores_layout, guide, alpha, beta, tau, adaptive_beta, cfg, energy_scope,
                          guide_upsample, beta_max, batch_split)
    return split, float(scale)
