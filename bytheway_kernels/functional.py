"""The public entry point: `bytheway_attention_probs`."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._validation import check_op_args
from .ops import attention_probs


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

    Returns:
        probs, or (probs, stats) with `return_stats=True`. Never synchronises with the host.
    """
    split = check_op_args(
        scores, guide, alpha, beta, tau, adaptive_beta, cfg, energy_scope, guide_upsample,
        beta_max, batch_split,
    )
    probs, stats = attention_probs(
        scores, guide, float(alpha), float(beta), int(tau), adaptive_beta, split.parts,
        split.energy_part, energy_scope, guide_upsample,
        None if beta_max is None else float(beta_max), return_stats,
    )
    return (probs, stats) if return_stats else probs
