"""Fused Triton kernels of the ByTheWay attention-map op (docs/DESIGN.md sections 1-2).

One program handles BLOCK_R rows (query frames) of one batch entry; a row is F logits. For each
row: softmax -> blend with the anchor map, upsampled by index arithmetic (never materialised) ->
band step as `guided @ P` (tl.dot with the cached circulant matrix, or `guided - mean` when the
band is every k != 0) -> renormalise -> store. Adaptive beta needs global energies first, so it
runs `_stats_kernel` (atomic sums into a tiny fp64 buffer) and then `_apply_kernel`, which turns
the sums into beta on the device: no host synchronisation, CUDA-graph and torch.compile safe.
Row r of batch entry b is ((y * W + x) * heads + head) * F + i, as diffusers lays it out.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...band import high_band_matrix, is_full_band
from ...energy import HIGH_ENERGY_FLOOR, stats_rows
from ..params import ByTheWayParams

GUIDE_MODES = {None: 0, "nearest": 1, "bilinear": 2}
# Per energy group: sum|A|^2, sum|A2|^2, sum<A2, A2 P>, then the last three over s^2, s = rowsum(A2),
# from which E3 = |A2 + (beta - 1) A2 P|^2 / s^2 follows for any beta without another pass.
SUM_FIELDS = 6


@triton.jit
def _guide_rows(guide_ptr, b, rows, row_mask, cols, col_mask, H, W, h, w, heads,
                scale_y, scale_x, F: tl.constexpr, GUIDE_MODE: tl.constexpr):
    """Upsampled anchor map for `rows` of batch entry b, following torch.interpolate's rules."""
    frame = rows % F
    spatial = rows // F
    head = spatial % heads
    pixel = spatial // heads
    x = pixel % W
    y = pixel // W
    mask = row_mask[:, None] & col_mask[None, :]
    if GUIDE_MODE == 1:  # nearest: src = min(floor(dst * in / out), in - 1), scale in fp32
        ys = tl.minimum((y.to(tl.float32) * scale_y).to(tl.int32), h - 1)
        xs = tl.minimum((x.to(tl.float32) * scale_x).to(tl.int32), w - 1)
        src = (((b * h + ys) * w + xs) * heads + head) * F + frame
        upsampled = tl.load(guide_ptr + src[:, None] * F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    else:  # bilinear, align_corners=False: src = max((dst + 0.5) * in / out - 0.5, 0)
        sy = tl.maximum((y.to(tl.float32) + 0.5) * scale_y - 0.5, 0.0)
        sx = tl.maximum((x.to(tl.float32) + 0.5) * scale_x - 0.5, 0.0)
        y0 = sy.to(tl.int32)
        x0 = sx.to(tl.int32)
        y1 = y0 + (y0 < h - 1).to(tl.int32)
        x1 = x0 + (x0 < w - 1).to(tl.int32)
        wy = (sy - y0.to(tl.float32))[:, None]
        wx = (sx - x0.to(tl.float32))[:, None]
        base = b * h
        row00 = (((base + y0) * w + x0) * heads + head) * F + frame
        row01 = (((base + y0) * w + x1) * heads + head) * F + frame
        row10 = (((base + y1) * w + x0) * heads + head) * F + frame
        row11 = (((base + y1) * w + x1) * heads + head) * F + frame
        g00 = tl.load(guide_ptr + row00[:, None] * F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g01 = tl.load(guide_ptr + row01[:, None] * F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g10 = tl.load(guide_ptr + row10[:, None] * F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g11 = tl.load(guide_ptr + row11[:, None] * F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        upsampled = (1.0 - wy) * ((1.0 - wx) * g00 + wx * g01) + wy * ((1.0 - wx) * g10 + wx * g11)
    return upsampled


@triton.jit
def _guided_block(scores_ptr, guide_ptr, band_ptr, b, rows, row_mask, rows_per_entry,
                  H, W, h, w, heads, scale_y, scale_x, alpha,
                  F: tl.constexpr, F_PAD: tl.constexpr, GUIDE_MODE: tl.constexpr,
                  FULL_BAND: tl.constexpr):
    """(attn, guided, guided @ P) for BLOCK_R rows, all fp32 with padded columns zero."""
    cols = tl.arange(0, F_PAD)
    col_mask = cols < F
    offsets = (b * rows_per_entry + rows)[:, None] * F + cols[None, :]
    logits = tl.load(scores_ptr + offsets, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    logits = tl.where(col_mask[None, :], logits.to(tl.float32), float("-inf"))
    exps = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    attn = exps / tl.sum(exps, axis=1)[:, None]
    if GUIDE_MODE == 0:
        guided = attn
    else:
        upsampled = _guide_rows(guide_ptr, b, rows, row_mask, cols, col_mask, H, W, h, w, heads,
                                scale_y, scale_x, F, GUIDE_MODE)
        guided = attn + alpha * (upsampled - attn)
    if FULL_BAND:  # P = I - 1/F: remove the row mean
        high = tl.where(col_mask[None, :], guided - (tl.sum(guided, axis=1) / F)[:, None], 0.0)
    else:
        band = tl.load(band_ptr + cols[:, None] * F_PAD + cols[None, :])
        high = tl.dot(guided, band, input_precision="ieee")
    return attn, guided, high


@triton.jit
def _accumulate(target_ptr, block):
    # fp32 within the program, fp64 across programs: thousands of partial sums stay exact enough
    tl.atomic_add(target_ptr, tl.sum(tl.sum(block, axis=1), axis=0).to(tl.float64))


@triton.jit
def _stats_kernel(scores_ptr, guide_ptr, band_ptr, sums_ptr, rows_per_entry, first_entry,
                  H, W, h, w, heads, scale_y, scale_x, alpha,
                  F: tl.constexpr, F_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
                  GUIDE_MODE: tl.constexpr, FULL_BAND: tl.constexpr, PER_VIDEO: tl.constexpr):
    """Accumulate the energy sums of the rows in scope (one program: BLOCK_R rows of one entry)."""
    video = tl.program_id(1)
    b = (first_entry + video).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < rows_per_entry
    attn, guided, high = _guided_block(scores_ptr, guide_ptr, band_ptr, b, rows, row_mask,
                                       rows_per_entry, H, W, h, w, heads, scale_y, scale_x, alpha,
                                       F, F_PAD, GUIDE_MODE, FULL_BAND)
    valid = row_mask[:, None]
    # E3 is the energy of the renormalised output: A3 / s with s = rowsum(A2) (A2 @ P sums to 0)
    inv_square_sum = (1.0 / tl.sum(guided, axis=1))[:, None]
    inv_square_sum = inv_square_sum * inv_square_sum
    group_sums = sums_ptr + (video * 6 if PER_VIDEO else 0)
    _accumulate(group_sums + 0, tl.where(valid, attn * attn, 0.0))
    _accumulate(group_sums + 1, tl.where(valid, guided * guided, 0.0))
    _accumulate(group_sums + 2, tl.where(valid, guided * high, 0.0))
    _accumulate(group_sums + 3, tl.where(valid, guided * guided * inv_square_sum, 0.0))
    _accumulate(group_sums + 4, tl.where(valid, guided * high * inv_square_sum, 0.0))
    _accumulate(group_sums + 5, tl.where(valid, high * high * inv_square_sum, 0.0))


@triton.jit
def _apply_kernel(scores_ptr, guide_ptr, band_ptr, sums_ptr, probs_ptr, stats_ptr,
                  rows_per_entry, videos, rows_per_group, H, W, h, w, heads, scale_y, scale_x,
                  alpha, beta0, beta_max, high_energy_floor,
                  F: tl.constexpr, F_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
                  GUIDE_MODE: tl.constexpr, FULL_BAND: tl.constexpr, PER_VIDEO: tl.constexpr,
                  HAS_SUMS: tl.constexpr, ADAPTIVE: tl.constexpr, HAS_BETA_MAX: tl.constexpr,
                  WRITE_STATS: tl.constexpr):
    """Write A3 = renormalise(guided + (beta - 1) * guided @ P); beta from the sums if adaptive."""
    b = tl.program_id(1).to(tl.int64)
    block = tl.program_id(0)
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < rows_per_entry
    beta = beta0
    if HAS_SUMS:
        group = b % videos if PER_VIDEO else b * 0
        group_sums = sums_ptr + group * 6
        count = tl.maximum(rows_per_group, 1.0)
        e1 = tl.load(group_sums + 0) / count
        e2 = tl.load(group_sums + 1) / count
        e2_high = tl.load(group_sums + 2) / count
        if ADAPTIVE:
            has_high = e2_high > high_energy_floor * e2
            ratio = tl.maximum(e1 - (e2 - e2_high), 0.0) / tl.where(has_high, e2_high, 1.0)
            beta = tl.where(has_high, tl.maximum(beta0, tl.sqrt(ratio)), beta0)
            if HAS_BETA_MAX:
                beta = tl.minimum(beta, beta_max)
            beta = beta.to(tl.float32)
        if WRITE_STATS:  # the first program of each group's first entry writes its stats row
            writer = (block == 0) & (b < (videos if PER_VIDEO else 1))
            row = stats_ptr + group * 6
            gain = beta - 1.0
            tl.store(row + 0, beta, mask=writer)
            tl.store(row + 1, e1.to(tl.float32), mask=writer)
            tl.store(row + 2, e2.to(tl.float32), mask=writer)
            tl.store(row + 3, (e2 - e2_high).to(tl.float32), mask=writer)
            tl.store(row + 4, e2_high.to(tl.float32), mask=writer)
            e3 = (tl.load(group_sums + 3) + 2.0 * gain * tl.load(group_sums + 4)
                  + gain * gain * tl.load(group_sums + 5)) / count
            tl.store(row + 5, e3.to(tl.float32), mask=writer)
    attn, guided, high = _guided_block(scores_ptr, guide_ptr, band_ptr, b, rows, row_mask,
                                       rows_per_entry, H, W, h, w, heads, scale_y, scale_x, alpha,
                                       F, F_PAD, GUIDE_MODE, FULL_BAND)
    enhanced = guided + (beta - 1.0) * high
    enhanced = enhanced / tl.sum(enhanced, axis=1)[:, None]
    cols = tl.arange(0, F_PAD)
    offsets = (b * rows_per_entry + rows)[:, None] * F + cols[None, :]
    tl.store(probs_ptr + offsets, enhanced.to(probs_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (cols < F)[None, :])


def _launch_shape(padded_frames: int):
    """(rows per program, warps): ~1K fp32 elements per tile keeps every variant free of register
    spills on sm_90 (checked by tests/test_triton_sm90.py), and tl.dot needs >= 16 rows."""
    return max(16, 1024 // padded_frames), (8 if padded_frames >= 64 else 4)


def _check_device(scores: torch.Tensor) -> None:
    if scores.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"the Triton backend needs CUDA tensors (got {scores.device}); on CPU it runs only "
            "under the Triton interpreter (TRITON_INTERPRET=1 set before importing bytheway_kernels)"
        )


def attention_probs_triton_out(scores, guide, params: ByTheWayParams, probs, stats=None):
    """Launch the fused kernels writing into `probs` (and `stats`, (rows, 6) fp32, if given).

    Fixed beta without stats: one launch. Otherwise: zero the sums, stats pass, apply pass.
    """
    _check_device(scores)
    alpha, beta, tau, adaptive_beta, parts, energy_part, energy_scope, guide_upsample, beta_max = params
    scores = scores.contiguous()
    batch, height, width, heads, frames, _ = scores.shape
    videos = batch // parts
    rows_per_entry = height * width * heads * frames
    if probs.numel() == 0:
        if stats is not None:  # no rows: energies are zero and beta is beta_0, as the reference
            stats.zero_()
            stats[:, 0] = beta
        return
    padded = max(16, triton.next_power_of_2(frames))
    block_rows, num_warps = _launch_shape(padded)
    full_band = is_full_band(frames, tau)
    band = scores if full_band else high_band_matrix(frames, tau, padded, scores.device)
    if guide is None:
        guide_tensor, (h, w) = scores, (height, width)
    else:
        guide_tensor, (h, w) = guide.contiguous(), guide.shape[1:3]
    per_video = energy_scope == "sample"
    geometry = dict(H=height, W=width, h=h, w=w, heads=heads, scale_y=h / height, scale_x=w / width,
                    alpha=alpha)
    meta = dict(F=frames, F_PAD=padded, BLOCK_R=block_rows, GUIDE_MODE=GUIDE_MODES[None if guide is None else guide_upsample],
                FULL_BAND=full_band, PER_VIDEO=per_video, num_warps=num_warps)
    blocks = triton.cdiv(rows_per_entry, block_rows)  # grid axis 0: it allows 2**31 - 1 programs
    has_sums = adaptive_beta or stats is not None
    if has_sums:
        sums = torch.zeros((stats_rows(batch, parts, energy_scope), SUM_FIELDS),
                           dtype=torch.float64, device=scores.device)
        if videos > 0:
            _stats_kernel[(blocks, videos)](scores, guide_tensor, band, sums, rows_per_entry,
                                            energy_part * videos, **geometry, **meta)
    else:
        sums = probs  # unused pointer
    rows_per_group = float(rows_per_entry * (1 if per_video else videos))
    _apply_kernel[(blocks, batch)](
        scores, guide_tensor, band, sums, probs, stats if stats is not None else sums,
        rows_per_entry, max(videos, 1), rows_per_group, **geometry, beta0=beta,
        beta_max=beta if beta_max is None else beta_max, high_energy_floor=HIGH_ENERGY_FLOOR,
        HAS_SUMS=has_sums, ADAPTIVE=adaptive_beta, HAS_BETA_MAX=beta_max is not None,
        WRITE_STATS=stats is not None, **meta,
    )
