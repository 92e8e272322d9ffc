"""The map op: `torch.ops.bytheway.attention_probs`, its backend dispatch and its public function.

The op's schema is declared once, here, with `torch.library.custom_op`; every backend (Triton,
the compiled C++ kernel from `csrc/`, the pure-torch reference) is a plain function with the
same arguments that the op's real implementation calls. The fake implementation only allocates
outputs, so the op traces under `torch.compile(fullgraph=True)`.

Backend choice: `bytheway_kernels.ops.dispatch.select_backend`, except float64 (`backend_for`).
In plain eager calls the public function calls the backend directly, skipping the custom op's
Python dispatch; tracing, compiling, Python modes, functorch and autograd go through the op.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from ..._validation import check_op_args
from ...energy import STATS_FIELDS, stats_rows
from ..dispatch import direct_call_is_equivalent, refuse_gradients, select_backend
from ..params import ByTheWayParams
from . import reference


def _reference_backend(scores, guide, params: ByTheWayParams, with_stats: bool):
    result = reference.bytheway_attention_probs(
        scores, guide, alpha=params.alpha, beta=params.beta, tau=params.tau,
        adaptive_beta=params.adaptive_beta, energy_scope=params.energy_scope,
        guide_upsample=params.guide_upsample, beta_max=params.beta_max, return_stats=with_stats,
        batch_split=(params.parts, params.energy_part),
    )
    return result if with_stats else (result, None)


@functools.lru_cache(maxsize=None)
def _backend_function(backend: str):
    """The function that runs `backend`: (scores, guide, params, with_stats) -> (probs, stats or
    None). The compiled backends are imported on first use (Triton only when it runs); cached, as
    an import statement per call would cost 0.4-1 us."""
    if backend == "triton":
        from .triton import attention_probs_triton

        return attention_probs_triton
    if backend == "cpp":
        from .cpp import attention_probs_cpp  # allocates the probs in C++ (cheaper than empty_like)

        return attention_probs_cpp
    if backend == "meta":
        return _through_the_op
    return _reference_backend


def _through_the_op(scores, guide, params: ByTheWayParams, with_stats: bool):
    """Meta tensors: the custom op, whose fake implementation gives the outputs' shapes."""
    probs, stats = attention_probs(scores, guide, *params, with_stats)
    return probs, stats if with_stats else None


def backend_for(scores: torch.Tensor) -> str:
    """The backend that computes `scores`: `select_backend`'s, except that float64 never goes to
    Triton (its kernels compute in fp32) but to the C++ kernel on CPU when built, else the reference."""
    backend = select_backend(scores.device)
    if backend == "triton" and scores.dtype == torch.float64:
        from .cpp import cpp_status

        return "cpp" if scores.device.type == "cpu" and cpp_status().available else "reference"
    return backend


def _run_backend(scores, guide, params: ByTheWayParams, with_stats: bool):
    """(probs, stats or None) from the backend chosen for `scores`."""
    return _backend_function(backend_for(scores))(scores, guide, params, with_stats)


@functools.lru_cache(maxsize=None)
def _triton_eager():
    from .triton import attention_probs_triton_eager

    return attention_probs_triton_eager


def _run_backend_eager(scores, guide, params: ByTheWayParams, with_stats: bool, call_key):
    """`_run_backend` for a plain eager call (the public function's direct path), whose
    validation key is `call_key` (None if it has none): the Triton backend then reuses its stats
    workspace per stream and repeats a call signature's prepared launches."""
    backend = backend_for(scores)
    if backend == "triton":
        return _triton_eager()(scores, guide, params, with_stats, call_key)
    return _backend_function(backend)(scores, guide, params, with_stats)


# Arguments already validated, by everything validation looks at: tensor shapes, dtypes and
# devices, and the other arguments with their types (so that True never passes for 1).
_VALIDATED: dict = {}
_VALIDATED_LIMIT = 512


def _checked_params(scores, guide, alpha, beta, tau, adaptive_beta, cfg, energy_scope,
                    guide_upsample, beta_max, batch_split, return_stats) -> ByTheWayParams:
    """`check_op_args`, then the ByTheWayParams the custom op takes."""
    split = check_op_args(scores, guide, alpha, beta, tau, adaptive_beta, cfg, energy_scope,
                          guide_upsample, beta_max, batch_split, return_stats)
    return ByTheWayParams(float(alpha), float(beta), int(tau), bool(adaptive_beta), split.parts,
                          split.energy_part, energy_scope, guide_upsample,
                          None if beta_max is None else float(beta_max))


def _validated_params(scores, guide, alpha, beta, tau, adaptive_beta, cfg, energy_scope,
                      guide_upsample, beta_max, batch_split, return_stats):
    """(ByTheWayParams, validation key or None) of a direct eager call: `_checked_params`, which
    a repeated call (same layer, same settings) skips, as only arguments that passed the checks
    are remembered under their key (shapes, dtypes, devices and every argument). Traced calls
    never come here: torch.compile would guard on the cache and recompile once the trace's own
    entry landed in it."""
    key = None
    if type(scores) is torch.Tensor and (guide is None or type(guide) is torch.Tensor):
        # flat, with the types of the arguments whose equal values of other types (True == 1,
        # 7 == 7.0) validation treats differently: ~0.3 us cheaper than nested tuples
        key = (scores.shape, scores.dtype, scores.device,
               None if guide is None else (guide.shape, guide.dtype, guide.device),
               alpha, beta, tau, adaptive_beta, cfg, energy_scope, guide_upsample, beta_max,
               batch_split, return_stats, type(alpha), type(beta), type(tau), type(adaptive_beta),
               type(cfg), type(energy_scope), type(guide_upsample), type(beta_max),
               type(return_stats),
               tuple(map(type, batch_split)) if type(batch_split) is tuple else type(batch_split))
        try:
            return _VALIDATED[key], key
        except KeyError:
            pass
        except TypeError:  # an unhashable argument, validated below
            key = None
    params = _checked_params(scores, guide, alpha, beta, tau, adaptive_beta, cfg, energy_scope,
                             guide_upsample, beta_max, batch_split, return_stats)
    if key is not None:
        if len(_VALIDATED) >= _VALIDATED_LIMIT:
            _VALIDATED.clear()
        _VALIDATED[key] = params
    return params, key


@torch.library.custom_op("bytheway::attention_probs", mutates_args=())
def attention_probs(
    scores: torch.Tensor,
    guide: Optional[torch.Tensor],
    alpha: float,
    beta: float,
    tau: int,
    adaptive_beta: bool,
    parts: int,
    energy_part: int,
    energy_scope: str,
    guide_upsample: str,
    beta_max: Optional[float],
    with_stats: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ByTheWay map op on (B, H, W, heads, F, F) scores; returns (probs, stats).

    `stats` is float32 (rows, 6) = (beta, E1, E2, E2_low, E2_high, E3) when `with_stats`, else an
    empty (0, 6) tensor. Arguments are validated by `bytheway_kernels.bytheway_attention_probs`.
    """
    params = ByTheWayParams(alpha, beta, tau, adaptive_beta, parts, energy_part, energy_scope,
                            guide_upsample, beta_max)
    probs, stats = _run_backend(scores, guide, params, with_stats)
    if stats is None:
        stats = scores.new_empty((0, len(STATS_FIELDS)), dtype=torch.float32)
    return probs, stats


refuse_gradients(attention_probs, "torch.ops.bytheway.attention_probs")


@attention_probs.register_fake
def _(scores, guide, alpha, beta, tau, adaptive_beta, parts, energy_part, energy_scope,
      guide_upsample, beta_max, with_stats):
    rows = stats_rows(scores.shape[0], parts, energy_scope) if with_stats else 0
    probs = torch.empty_like(scores, memory_format=torch.contiguous_format)
    return probs, scores.new_empty((rows, len(STATS_FIELDS)), dtype=torch.float32)


def bytheway_attention_probs(
    scores: torch.Tensor,
    guide: Optional[torch.Tensor] = None,
    *,
    alpha: float,
    beta: float,
    tau: int,
    adaptive_beta: bool = True,
    cfg: bool = True,
    energy_scope: str = "batch",
    guide_upsample: str = "nearest",
    beta_max: Optional[float] = None,
    return_stats: bool = False,
    batch_split: Optional[Tuple[int, int]] = None,
):
    """ByTheWay-modified temporal attention probabilities.

    Args:
        scores: pre-softmax logits already multiplied by the attention scale, shaped
            (B, H, W, heads, F, F) -- a free view of diffusers' (B*H*W*heads, F, F) map.
            fp32, fp16 or bf16 (float64 too); the output has this dtype.
        guide: optional row-stochastic anchor map (B, h, w, heads, F, F), h <= H, w <= W,
            upsampled in space inside the kernel (never materialised).
        alpha: Temporal Self-Guidance strength in [0, 1].
        beta: beta_0 >= 0, gain of the high band (the minimum gain when adaptive).
        tau: band half-width, 0 <= tau <= (F - 2) // 2; the band is F//2 - tau .. F//2 + tau.
        adaptive_beta: beta = max(beta_0, sqrt((E1 - E2_low) / E2_high)) from device-side energies.
        cfg: the batch is (unconditional, conditional) halves; energies come from the second.
        energy_scope: "batch" (one beta for the batch) or "sample" (one beta per video).
        guide_upsample: "nearest" or "bilinear" (torch.nn.functional.interpolate index rules).
        beta_max: optional cap on the adaptive beta (must be >= beta).
        return_stats: also return float32 stats (rows, 6) = (beta, E1, E2, E2_low, E2_high, E3),
            one row for scope "batch", one per video for "sample".
        batch_split: (parts, energy_part) overriding `cfg`: the batch is `parts` equal groups and
            energies come from group `energy_part` (e.g. (3, 1) for PAG with CFG).

    Numbers may be Python or numpy scalars; beta and beta_max are at most
    `bytheway_kernels._validation.BETA_LIMIT` (1e6). A bad argument is a ValueError naming it.

    Rows whose guided row sum rowsum(A2) = (1 - alpha) + alpha * rowsum(U) is <= 0 or not finite
    (e.g. an all-zero guide row with alpha = 1) use the unguided map instead (A2 := A for that
    row, in the energies too). Every finite input then gives a finite output; float16 outputs
    saturate at +-65504 (reachable only with beta above ~7e4).

    Returns:
        probs, or (probs, stats) with `return_stats=True`. Never synchronises with the host.

    Examples:
        >>> import torch
        >>> from bytheway_kernels import bytheway_attention_probs
        >>> scores = torch.randn(2, 4, 4, 8, 16, 16)  # (B, H, W, heads, F, F), CFG halves
        >>> guide = torch.softmax(torch.randn(2, 2, 2, 8, 16, 16), dim=-1)
        >>> probs, stats = bytheway_attention_probs(scores, guide, alpha=0.6, beta=1.5, tau=7,
        ...                                         return_stats=True)
        >>> probs.shape, stats.shape
        (torch.Size([2, 4, 4, 8, 16, 16]), torch.Size([1, 6]))
    """
    args = (scores, guide, alpha, beta, tau, adaptive_beta, cfg, energy_scope, guide_upsample,
            beta_max, batch_split, return_stats)
    return_stats = bool(return_stats)  # numpy flags become Python bools for the schema
    if direct_call_is_equivalent(scores, guide):
        params, key = _validated_params(*args)
        probs, stats = _run_backend_eager(scores, guide, params, return_stats, key)
    else:
        probs, stats = attention_probs(scores, guide, *_checked_params(*args), return_stats)
    return (probs, stats) if return_stats else probs
