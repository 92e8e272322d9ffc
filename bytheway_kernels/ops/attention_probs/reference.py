"""Pure-torch ground truth of the ByTheWay attention-map operation.

Follows docs/DESIGN.md section 1 step by step with `torch.fft`; it deliberately does not use the
circulant-matrix shortcut the fused kernels rely on, so that it checks them independently.
Computes in float64 for float64 input and in float32 otherwise.

Rules every backend shares (documented in `bytheway_kernels.bytheway_attention_probs`):
rows whose guided sum is <= 0 or not finite keep the unguided map, the final division is by
rowsum(A2) (= rowsum(A3) exactly, as DC is outside the band, and free of the cancellation that
rowsum(A3) suffers at large beta), and float16 outputs saturate at the largest finite float16.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from ..._validation import BatchSplit, check_op_args
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


def guided_map(attn: torch.Tensor, guide: Optional[torch.Tensor], alpha: float, guide_upsample: str):
    """A2 = (1 - alpha) A + alpha U and its row sums; rows whose sum is <= 0 or not finite keep A.

    The paper's A + alpha (U - A), written so that alpha = 1 gives U exactly: the difference form
    cancels to 0 where U is below A's rounding (a guide row much smaller than 1), so its rows
    would fall back to A. Every backend computes this form.

    Examples:
        >>> attn = torch.full((1, 1, 1, 1, 2, 4), 0.25)
        >>> guide = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]).view(1, 1, 1, 1, 2, 4)
        >>> guided, sums = guided_map(attn, guide, 1.0, "nearest")
        >>> guided[0, 0, 0, 0].tolist()  # the zero row keeps A
        [[0.0, 0.0, 0.0, 1.0], [0.25, 0.25, 0.25, 0.25]]
    """
    if guide is None:
        return attn, attn.sum(-1, keepdim=True)
    upsampled = upsample_guide(guide.to(attn.dtype), attn.shape[1], attn.shape[2], guide_upsample)
    guided = (1 - alpha) * attn + alpha * upsampled
    row_sums = guided.sum(-1, keepdim=True)
    usable = (row_sums > 0) & torch.isfinite(row_sums)
    guided = torch.where(usable, guided, attn)
    return guided, torch.where(usable, row_sums, attn.sum(-1, keepdim=True))


class Energies(NamedTuple):
    """Means over the rows in scope, one entry per energy group."""

    e1: torch.Tensor
    e2: torch.Tensor
    e2_low: torch.Tensor
    e2_high: torch.Tensor


def energies(attn, guided, spectrum, band, split: BatchSplit, energy_scope: str) -> Energies:
    """E1 = E(A), E2 = E(A2) and its split by Parseval into the band's energy and the rest.

    `band` is a boolean mask over the F DFT indices; `spectrum` is the DFT of `guided` rows.
    """
    frames = attn.shape[-1]
    e1 = _group_mean((attn**2).sum(-1), split, energy_scope)
    e2 = _group_mean((guided**2).sum(-1), split, energy_scope)
    e2_high = _group_mean((spectrum.abs() ** 2)[..., band].sum(-1) / frames, split, energy_scope)
    return Energies(e1, e2, e2 - e2_high, e2_high)


def group_beta(energy: Energies, beta: float, adaptive_beta: bool, beta_max: Optional[float]) -> torch.Tensor:
    """beta = max(beta_0, sqrt(max(E1 - E2_low, 0) / E2_high)), beta_0 when E2_high is ~0, capped.

    Examples:
        >>> energy = Energies(*(torch.tensor([v]) for v in (0.5, 0.4, 0.3, 0.1)))
        >>> group_beta(energy, 1.0, True, None)  # max(1, sqrt((0.5 - 0.3) / 0.1))
        tensor([1.4142])
        >>> group_beta(energy, 1.0, True, 1.2)  # capped by beta_max
        tensor([1.2000])
    """
    beta_group = torch.full_like(energy.e1, float(beta))
    if not adaptive_beta:
        return beta_group
    has_high = energy.e2_high > HIGH_ENERGY_FLOOR * energy.e2
    safe_high = torch.where(has_high, energy.e2_high, torch.ones_like(energy.e2_high))
    ratio = torch.clamp(energy.e1 - energy.e2_low, min=0) / safe_high
    beta_group = torch.where(has_high, torch.maximum(beta_group, ratio.sqrt()), beta_group)
    if beta_max is not None:
        beta_group = torch.clamp(beta_group, max=float(beta_max))
    return beta_group


def _to_output_dtype(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round to the output dtype; float16 saturates at its largest finite value (NaN stays NaN)."""
    if dtype == torch.float16:
        limit = torch.finfo(torch.float16).max
        values = values.clamp(-limit, limit)
    return values.to(dtype)


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
    """ByTheWay-modified attention probabilities; see `bytheway_kernels.bytheway_attention_probs`.

    Examples:
        >>> import torch
        >>> from bytheway_kernels.ops.attention_probs import reference
        >>> scores = torch.randn(2, 2, 2, 1, 8, 8, dtype=torch.float64)
        >>> probs = reference.bytheway_attention_probs(scores, alpha=0.0, beta=2.0, tau=3)
        >>> bool(torch.allclose(probs.sum(-1), torch.ones(2, 2, 2, 1, 8, dtype=torch.float64)))
        True
    """
    split = check_op_args(
        scores, guide, alpha, beta, tau, adaptive_beta, cfg, energy_scope, guide_upsample,
        beta_max, batch_split, return_stats,
    )
    compute_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    batch, _, _, _, frames, _ = scores.shape

    attn = torch.softmax(scores.to(compute_dtype), dim=-1)  # 1. plain attention map
    guided, row_sums = guided_map(attn, guide, float(alpha), guide_upsample)  # 2-3. guidance

    # 4-6. spectrum, band, energies and beta (one per energy group)
    spectrum = _fft(guided)
    band = torch.zeros(frames, dtype=torch.bool, device=scores.device)
    band[list(high_band(frames, int(tau)))] = True
    energy = energies(attn, guided, spectrum, band, split, energy_scope)
    beta_group = group_beta(energy, float(beta), bool(adaptive_beta), beta_max)
    # batch index b belongs to video b % videos
    beta_rows = beta_group.expand(batch) if energy_scope == "batch" else beta_group.repeat(split.parts)

    # 7. scale the band and go back; 8. renormalise rows
    gain = torch.where(band, beta_rows.view(batch, 1, 1, 1, 1, 1).to(spectrum.real.dtype), 1.0)
    enhanced = _fft(spectrum * gain, inverse=True).real / row_sums

    probs = _to_output_dtype(enhanced, scores.dtype)
    if not return_stats:
        return probs
    e3 = _group_mean((enhanced**2).sum(-1), split, energy_scope)
    stats = torch.stack([beta_group, *energy, e3], dim=-1).to(torch.float32)
    return probs, stats
