"""Pure-torch ground truth of the ByTheWay attention-map operation.

Follows docs/DESIGN.md section 1 step by step with `torch.fft`; it deliberately does not use the
circulant-matrix shortcut the fused kernels rely on, so that it checks them independently.
Computes in float64 for float64 input and in float32 otherwise.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F_nn

from ..._validation import check_op_args
from ...band import high_band
from ...energy import HIGH_ENERGY_FLOOR
from ...guide import upsample_guide


def _fft(values: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """DFT along the last axis; empty tensors pass through (MKL rejects zero-size batches)."""
    if values.numel() == 0:
        return values.to(torch.complex128 if values.dtype in (torch.float64, torch.complex128) else torch.complex64)
    return torch.fft.ifft(values, dim=-1) if inverse else torch.fft.fft(values, dim=-1)


def _group_mean(row_values: torch.Tensor, split, energy_scope: str) -> torch.Tensor:
    """Mean of per-row values over the rows in scope: one value (batch) or one per video."""
    start = split.energy_part * split.videos
    in_scope = row_values[start : start + split.videos].flatten(1)  # (videos, rows per video)
    if energy_scope == "batch":
        in_scope = in_scope.reshape(1, -1)
    return in_scope.sum(1) / max(in_scope.shape[1], 1)


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
    """ByTheWay-modified attention probabilities; see `bytheway_kernels.bytheway_attention_probs`."""
    split = check_op_args(
        scores, guide, alpha, beta, tau, adaptive_beta, cfg, energy_scope, guide_upsample,
        beta_max, batch_split,
    )
    compute_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    batch, height, width, heads, frames, _ = scores.shape

    # 1. plain attention map
    attn = torch.softmax(scores.to(compute_dtype), dim=-1)
    # 2-3. Temporal Self-Guidance
    if guide is None:
        guided = attn
    else:
        upsampled = upsample_guide(guide.to(compute_dtype), height, width, guide_upsample)
        guided = attn + alpha * (upsampled - attn)

    # 4-5. spectrum, band and energies
    spectrum = _fft(guided)
    band = torch.zeros(frames, dtype=torch.bool, device=scores.device)
    band[list(high_band(frames, tau))] = True
    e1 = _group_mean((attn**2).sum(-1), split, energy_scope)
    e2 = _group_mean((guided**2).sum(-1), split, energy_scope)
    e2_high = _group_mean((spectrum.abs() ** 2)[..., band].sum(-1) / frames, split, energy_scope)
    e2_low = e2 - e2_high

    # 6. beta, one per energy group
    beta_group = torch.full_like(e1, float(beta))
    if adaptive_beta:
        has_high = e2_high > HIGH_ENERGY_FLOOR * e2
        ratio = torch.clamp(e1 - e2_low, min=0) / torch.where(has_high, e2_high, torch.ones_like(e2_high))
        beta_group = torch.where(has_high, torch.maximum(beta_group, ratio.sqrt()), beta_group)
        if beta_max is not None:
            beta_group = torch.clamp(beta_group, max=float(beta_max))
    if energy_scope == "batch":
        beta_rows = beta_group.expand(batch)
    else:
        beta_rows = beta_group.repeat(split.parts)  # batch index b belongs to video b % videos

    # 7. scale the band and go back; 8. renormalise rows
    gain = torch.where(band, beta_rows.view(batch, 1, 1, 1, 1, 1).to(spectrum.real.dtype), 1.0)
    enhanced = _fft(spectrum * gain, inverse=True).real
    enhanced = enhanced / enhanced.sum(-1, keepdim=True)

    probs = enhanced.to(scores.dtype)
    if not return_stats:
        return probs
    e3 = _group_mean((enhanced**2).sum(-1), split, energy_scope)
    stats = torch.stack([beta_group, e1, e2, e2_low, e2_high, e3], dim=-1).to(torch.float32)
    return probs, stats
