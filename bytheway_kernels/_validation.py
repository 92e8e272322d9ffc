"""Argument checks shared by every backend: each bad argument is a ValueError naming it.

Numbers may be Python or numpy scalars (`numbers.Real` / `numbers.Integral`); bools are not
numbers here, and flags may be `bool` or `numpy.bool_`.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Tuple

import torch

from .band import max_tau

try:  # numpy is optional for torch; without it there are no numpy scalars to accept
    from numpy import bool_ as _numpy_bool
except ImportError:  # pragma: no cover
    _numpy_bool = bool

ENERGY_SCOPES = ("batch", "sample")
GUIDE_UPSAMPLE_MODES = ("nearest", "bilinear")
#: The dtypes the map op reads and writes (scores and guide).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Largest accepted beta and beta_max. Far above any useful gain (the presets use 1.5-2); it keeps
#: every intermediate of a fp32 evaluation (energies ~ beta**2) well inside the float32 range.
BETA_LIMIT = 1e6
#: Largest finite float32.
FLOAT32_MAX = torch.finfo(torch.float32).max
#: The largest `temporal_attention` scale: its fused kernel multiplies the scale by log2(e) in fp32.
MAX_SCALE = FLOAT32_MAX / math.log2(math.e)


def is_flag(value) -> bool:
    """True for `bool` and `numpy.bool_`."""
    return isinstance(value, (bool, _numpy_bool))


def check_flag(name: str, value) -> bool:
    """A `bool` or `numpy.bool_`, returned as a Python bool."""
    if not is_flag(value):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def check_number(name: str, value, low: Optional[float] = None, high: Optional[float] = None) -> float:
    """A finite real number within [low, high] (Python or numpy; not a bool, not a tensor), as a float.

    Examples:
        >>> import numpy as np
        >>> check_number("alpha", np.float32(0.5), low=0.0, high=1.0)
        0.5
        >>> check_number("beta", 10**400)
        Traceback (most recent call last):
        ...
        ValueError: beta must be a finite real number, got an integer beyond the float range
    """
    if is_flag(value) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range, e.g. 10**400
        raise ValueError(f"{name} must be a finite real number, got an integer beyond the float range") from None
    # comparisons, not math.isfinite: under torch.compile a changing float argument is a SymFloat,
    # which comparisons guard on and math.isfinite cannot trace
    if not -math.inf < number < math.inf:
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    if low is not None and number < low:
        raise ValueError(f"{name} must be >= {low:g}, got {value!r}")
    if high is not None and number > high:
        raise ValueError(f"{name} must be <= {high:g}, got {value!r}")
    return number


def check_integer(name: str, value) -> int:
    """An integer (Python or numpy; not a bool), as an int."""
    if is_flag(value) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def check_tau(tau, frames: int) -> int:
    """tau as an int, valid for F = `frames`.

    Examples:
        >>> import numpy as np
        >>> check_tau(np.int64(7), 16)
        7
    """
    tau = check_integer("tau", tau)
    if frames < 2:
        raise ValueError(f"ByTheWay needs at least F=2 frames, got F={frames}")
    if not 0 <= tau <= max_tau(frames):
        raise ValueError(
            f"tau={tau} is invalid for F={frames} frames: it must satisfy "
            f"0 <= tau <= (F - 2) // 2 = {max_tau(frames)} so that the high band "
            f"[F//2 - tau, F//2 + tau] fits in [1, F-1] and excludes the DC term"
        )
    return tau


class BatchSplit(NamedTuple):
    """The batch axis is `parts` equal groups of `videos`; energies come from group `energy_part`."""

    parts: int
    energy_part: int
    videos: int


def batch_parts(cfg: bool, batch_split: Optional[Tuple[int, int]], name: str = "batch_split") -> Tuple[int, int]:
    """(parts, energy_part): cfg=True means (uncond, cond) halves with energies from the second;
    an explicit `batch_split` pair overrides `cfg` (`name` is the argument named in errors)."""
    if batch_split is None:
        return (2, 1) if check_flag("cfg", cfg) else (1, 0)
    if (
        not isinstance(batch_split, (tuple, list))
        or len(batch_split) != 2
        or not all(isinstance(v, numbers.Integral) and not is_flag(v) for v in batch_split)
    ):
        raise ValueError(f"{name} must be a pair of ints (parts, energy_part), got {batch_split!r}")
    parts, energy_part = (int(v) for v in batch_split)
    if parts < 1 or not 0 <= energy_part < parts:
        raise ValueError(
            f"{name}=(parts, energy_part) needs parts >= 1 and 0 <= energy_part < parts, "
            f"got {tuple(batch_split)}"
        )
    return parts, energy_part


def resolve_batch_split(batch: int, cfg: bool, batch_split: Optional[Tuple[int, int]],
                        reads_energies: bool = True) -> BatchSplit:
    """The split of a batch of `batch` entries; B must divide into the parts. The halves that
    `cfg=True` implies matter only when the energies are read (adaptive beta or stats): otherwise
    any batch passes, as one part (a fixed beta for every row), so that plain attention on one
    video needs no `cfg=False`. An explicit `batch_split` is always checked."""
    parts, energy_part = batch_parts(cfg, batch_split)
    if not reads_energies and batch_split is None:
        return BatchSplit(1, 0, batch)
    if batch % parts != 0:
        what = "cfg=True needs an even batch" if batch_split is None else f"batch_split={tuple(batch_split)}"
        raise ValueError(f"{what}: scores batch B={batch} is not divisible by {parts}")
    return BatchSplit(parts, energy_part, batch // parts)


def _check_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {tensor.dtype}"
        )


def check_scores(scores) -> None:
    """(B, H, W, heads, F, F) logits of a supported floating dtype."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    _check_dtype("scores", scores)
    if scores.dim() != 6 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(
            f"scores must be 6-D (B, H, W, heads, F, F) with equal last two dims, got shape "
            f"{tuple(scores.shape)}"
        )


def check_guide(guide, scores: torch.Tensor) -> None:
    """None, or an anchor map (B, h, w, heads, F, F) with h <= H, w <= W on the scores' device."""
    if guide is None:
        return
    if not isinstance(guide, torch.Tensor):
        raise ValueError(f"guide must be a torch.Tensor or None, got {type(guide).__name__}")
    _check_dtype("guide", guide)
    if guide.device != scores.device:
        raise ValueError(f"guide is on {guide.device} but scores are on {scores.device}")
    if guide.dim() != 6:
        raise ValueError(f"guide must be 6-D (B, h, w, heads, F, F), got shape {tuple(guide.shape)}")
    batch, height, width, heads, f_rows, f_cols = scores.shape
    guide_batch, guide_height, guide_width, guide_heads, g_rows, g_cols = guide.shape
    if (guide_batch, guide_heads, g_rows, g_cols) != (batch, heads, f_rows, f_cols):
        raise ValueError(
            f"guide shape {tuple(guide.shape)} must match scores {tuple(scores.shape)} in batch, "
            f"heads and frames"
        )
    if guide_height > height or guide_width > width:
        raise ValueError(
            f"guide spatial size ({guide_height}, {guide_width}) must not exceed the scores' "
            f"({height}, {width})"
        )
    if (guide_height == 0 or guide_width == 0) and height * width > 0:
        raise ValueError(
            f"guide spatial size ({guide_height}, {guide_width}) is empty but scores' is ({height}, {width})"
        )


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
    return_stats=False,
) -> BatchSplit:
    """Validate everything `bytheway_attention_probs` takes; return the resolved batch split
    (one part unless the energies are read: `resolve_batch_split`)."""
    check_scores(scores)
    check_tau(tau, scores.shape[-1])
    check_number("alpha", alpha, low=0.0, high=1.0)
    beta = check_number("beta", beta, low=0.0, high=BETA_LIMIT)
    if beta_max is not None:
        check_number("beta_max", beta_max, low=beta, high=BETA_LIMIT)
    reads_energies = check_flag("adaptive_beta", adaptive_beta) | check_flag("return_stats", return_stats)
    if energy_scope not in ENERGY_SCOPES:
        raise ValueError(f"energy_scope must be one of {ENERGY_SCOPES}, got {energy_scope!r}")
    if guide_upsample not in GUIDE_UPSAMPLE_MODES:
        raise ValueError(f"guide_upsample must be one of {GUIDE_UPSAMPLE_MODES}, got {guide_upsample!r}")
    check_guide(guide, scores)
    return resolve_batch_split(scores.shape[0], cfg, batch_split, reads_energies)


def _check_positive_int(name: str, value) -> int:
    """A positive integer (Python or numpy; not a bool), as an int."""
    if is_flag(value) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class TemporalAttentionArgs(NamedTuple):
    """`temporal_attention`'s arguments after validation, as plain Python values."""

    split: BatchSplit
    scale: float
    heads: int
    height: int
    width: int
    return_map: bool
    return_stats: bool


def check_temporal_attention_args(
    q, k, v, heads, height, width, scale, guide, alpha, beta, tau, adaptive_beta, cfg,
    energy_scope, guide_upsample, beta_max, batch_split, return_map, return_stats,
) -> TemporalAttentionArgs:
    """Validate everything `temporal_attention` takes; return them resolved and as plain Python
    values (numpy scalars become ints and bools, scale defaults to d**-0.5).

    q, k, v are (B*H*W, F, heads*d) with a contiguous last dim; the ByTheWay arguments are checked
    by `check_op_args` against the (B, H, W, heads, F, F) layout of the scores q k^T.
    """
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        _check_dtype(name, tensor)
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
    heads = _check_positive_int("heads", heads)
    height = _check_positive_int("height", height)
    width = _check_positive_int("width", width)
    sequences, frames, channels = q.shape
    if channels % heads != 0:
        raise ValueError(f"the channel dim C={channels} of q is not divisible by heads={heads}")
    if sequences % (height * width) != 0:
        raise ValueError(
            f"q's first dim B*H*W={sequences} is not a multiple of height*width={height}*{width}"
        )
    if frames < 2:
        raise ValueError(f"temporal_attention needs at least F=2 frames (q's dim 1), got F={frames}: "
                         f"a single frame attends only to itself (out = v)")
    head_dim = channels // heads
    if scale is None:
        scale = head_dim ** -0.5 if head_dim > 0 else 1.0
    else:
        # the scores are computed in float32 (float64 inputs aside), and the fused kernel folds
        # log2(e) into the scale for exp2: a larger scale is inf there
        check_number("scale", scale, high=MAX_SCALE)
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
    return_map = check_flag("return_map", return_map)
    return_stats = check_flag("return_stats", return_stats)
    # a free stand-in with the scores' shape, dtype and device: the map op's checks apply as is
    scores_layout = q.new_empty(()).expand(sequences // (height * width), height, width, heads, frames, frames)
    split = check_op_args(scores_layout, guide, alpha, beta, tau, adaptive_beta, cfg, energy_scope,
                          guide_upsample, beta_max, batch_split, return_stats)
    return TemporalAttentionArgs(split, float(scale), heads, height, width, return_map, return_stats)
