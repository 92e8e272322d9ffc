"""Fused Triton kernels of the ByTheWay attention-map op (docs/DESIGN.md sections 1-2).

A tile is BLOCK_R rows (query frames) of one batch entry; a row is F logits. For each row:
softmax -> blend with the anchor map, upsampled by index arithmetic (never materialised) -> band
step as `guided @ P` (where F is a multiple of 4, one row per thread and the band's frequencies
with P's entries compiled in, `triton_rules.thread_row_band_product`; else one exact fp32 dot, or
when forced three tf32 dots on tensor cores, `triton_rules.band_product`, or P's rank-one terms on
tiles, `triton_rules.rank_one_band_product`; `guided - mean` when the band is every k != 0) ->
divide by rowsum(guided) (the band term sums to 0) -> store.

Fixed beta is one launch of `_apply_kernel`. Adaptive beta (or `stats`) needs global energies
first: `_stats_kernel` programs each sum a few consecutive tiles and write their own slot of a
partials buffer (no zeroing, no same-address atomics but one ticket each); the program that draws
the last ticket sums the slots in a fixed order in fp64 and writes beta and the stats row (past
`FLAT_SUM_SLOTS` slots per video, in two tiers of tickets), and `_apply_kernel` reads beta from
the device. Two launches; same input, same bits; no host synchronisation (CUDA graphs,
torch.compile). The ticket counters are back at zero when the stats pass ends, so plain eager
calls reuse one workspace per stream instead of zeroing a new one (`..workspace`).
Row r of batch entry b is ((y * W + x) * heads + head) * F + i, as diffusers lays it out. H, W
and heads are compile-time constants (one compile per layer geometry), so the divisions that
split a row into (y, x, head) for the guide compile to shifts or multiplications (13% fewer SASS
instructions in the guided apply kernel, sm_90).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..._environ import triton_interpreter
from ...band import band_operand, band_rank_one_terms, band_rank_one_terms_float64, is_full_band
from ...energy import HIGH_ENERGY_FLOOR
from .. import launch
from ..launch import KernelLaunch, run_on_device_of
from ..params import ByTheWayParams
from ..workspace import clear_reused_workspaces, zeroed_workspace
from .. import triton_rules
from ..triton_rules import (LOG2E, band_product, bilinear_sources, enhanced_rows, group_beta,
                            load_band, load_row_chunk, nearest_source, rank_one_band_energy,
                            rank_one_band_product, store_row_chunk, store_stats_row,
                            thread_row_band_energy, thread_row_band_product, to_element_type)

GUIDE_MODES = {None: 0, "nearest": 1, "bilinear": 2}
# Per stats program: sum|A|^2, sum|A2|^2, sum<A2, A2 P>, then (with stats) the last three over s^2,
# s = rowsum(A2), from which E3 = |A2 + (beta - 1) A2 P|^2 / s^2 follows for any beta.
PARTIAL_FIELDS = 6
# Unrolled tiles per stats program, at most: up to this, programs take more tiles until there are
# about TARGET_STATS_PROGRAMS of them (an H100/H200 has 132 SMs), which keeps the last program's
# sum over the slots short; past it, the grid grows instead. Measured on an H200 (fp16, F = 16,
# benchmarks/RESULTS.md, 2026-11-27): 512 programs were fastest at up_blocks.1 and .2 (1 and 4
# tiles each; at up_blocks.2 the stats kernel took 6.0 us where 2048 programs of 1 took 9.0) and
# 4 tiles at up_blocks.3 (14.4 us; 8 tiles 15.1).
MAX_STATS_TILES = 4
TARGET_STATS_PROGRAMS = 512
# Partial slots the last stats program adds per loop iteration and field (4 warps: 2 per thread;
# 512 spills under Triton 3.6 with stats in sample scope).
REDUCE_CHUNK = 256
# Slots per video up to which the last program sums them all (one L2 round trip per two chunks:
# the default tiles give at most 2048 at AnimateDiff's sizes). Past it the sum is tiered: the last
# program of each run of REDUCE_CHUNK slots sums them into one fp64 tier sum, and the last of
# those sums the tiers (two round trips and a second ticket, whatever the slot count).
FLAT_SUM_SLOTS = 2048
ENERGY_FLOOR = tl.constexpr(HIGH_ENERGY_FLOOR)
# Whether the stats pass takes the apply pass's full tiles where it sums P's rank-one terms'
# energies (`rank_one_band_energy`: no product held, unlike the other band steps, which take half
# tiles). At F_PAD = 32 a full tile gives each thread 8 entries and a row 4 threads (half tiles:
# 4 and 8, one more shuffle per reduction). Compiled for sm_90 (fp16 scores, adaptive, up_blocks.2's
# size, 4 tiles per program, Triton 3.6): 48-54% fewer SASS instructions per row than half tiles
# with the terms' products, in 93-166 registers instead of 64-128, no spills. Not yet timed on a
# GPU: benchmarks/map_op_kernel_times.py times both.
FULL_STATS_TILES_FOR_TERMS = True
# Programmatic dependent launch (sm_90 and later): the adaptive call's apply kernel is launched
# with CUDA's programmatic stream serialization, so its programs start while the stats pass still
# runs (each stats program allows it first thing, `gdc_launch_dependents`). They load, blend and
# band-multiply their rows, then wait for the whole stats pass (`gdc_wait`, which also makes its
# stores visible) before reading beta and storing. That can hide the second launch's latency and
# the stats pass's last-program tail (at up_blocks.1 the adaptive call took 6.8 us of kernel time
# on an H200, 1.65x softmax's, for 4.1 + 2.0 us of kernel bodies). Off until timed on a GPU:
# benchmarks/map_op_kernel_times.py times it on and off, and
# tests/test_attention_probs_gpu.py::test_programmatic_dependent_pair runs it.
PROGRAMMATIC_LAUNCH = False
# Warps of a thread-row program (`triton_rules.thread_row_band`: 32 rows each).
THREAD_ROW_WARPS = 4


@triton.jit
def _guide_sources(b, rows, H, W, h, w, heads, scale_y, scale_x, F: tl.constexpr,
                   GUIDE_MODE: tl.constexpr):
    """(row00, row01, row10, row11, wy, wx): the anchor map's source rows for `rows` of batch
    entry b and the bilinear weights of the second row along y and x, following
    torch.interpolate's rules; nearest uses row00 alone (the rest unused)."""
    frame = rows % F
    spatial = rows // F
    head = spatial % heads
    pixel = spatial // heads
    x = pixel % W
    y = pixel // W
    if GUIDE_MODE == 1:
        ys = nearest_source(y, scale_y, h)
        xs = nearest_source(x, scale_x, w)
        row00 = (((b * h + ys) * w + xs) * heads + head) * F + frame
        return row00, row00, row00, row00, scale_y, scale_x
    else:
        y0, y1, wy = bilinear_sources(y, scale_y, h)
        x0, x1, wx = bilinear_sources(x, scale_x, w)
        base = b * h
        row00 = (((base + y0) * w + x0) * heads + head) * F + frame
        row01 = (((base + y0) * w + x1) * heads + head) * F + frame
        row10 = (((base + y1) * w + x0) * heads + head) * F + frame
        row11 = (((base + y1) * w + x1) * heads + head) * F + frame
        return row00, row01, row10, row11, wy, wx


@triton.jit
def _bilinear(g00, g01, g10, g11, wy, wx):
    """The bilinear mix of four source values, in torch.interpolate's order."""
    return (1.0 - wy) * ((1.0 - wx) * g00 + wx * g01) + wy * ((1.0 - wx) * g10 + wx * g11)


@triton.jit
def _blend(attn, upsampled, alpha):
    """(1 - alpha) A + alpha U (reference.guided_map), exact at alpha = 0 and 1 (alpha A - A is
    0 at alpha = 1); written so, it takes the registers A + alpha (U - A) took (the product form
    spilled 8 bytes under Triton 3.6, sm_90)."""
    return alpha * upsampled - (alpha * attn - attn)


@triton.jit
def _usable(row_sum):
    """Whether a guided row can be renormalised: its sum > 0 and finite (false for NaN)."""
    return (row_sum > 0.0) & (row_sum < float("inf"))


@triton.jit
def _guide_rows(guide_ptr, b, rows, row_mask, cols, col_mask, H, W, h, w, heads,
                scale_y, scale_x, F: tl.constexpr, GUIDE_MODE: tl.constexpr):
    """Upsampled anchor map for `rows` of batch entry b (`_guide_sources`)."""
    row00, row01, row10, row11, wy, wx = _guide_sources(b, rows, H, W, h, w, heads, scale_y,
                                                        scale_x, F, GUIDE_MODE)
    mask = row_mask[:, None] & col_mask[None, :]
    if GUIDE_MODE == 1:
        upsampled = tl.load(guide_ptr + row00[:, None] * F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        wy = wy[:, None]
        wx = wx[:, None]
        g00 = tl.load(guide_ptr + row00[:, None] * F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g01 = tl.load(guide_ptr + row01[:, None] * F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g10 = tl.load(guide_ptr + row10[:, None] * F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g11 = tl.load(guide_ptr + row11[:, None] * F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        upsampled = _bilinear(g00, g01, g10, g11, wy, wx)
    return upsampled


@triton.jit
def _guided_block(scores_ptr, guide_ptr, b, rows, row_mask, rows_per_entry,
                  H, W, h, w, heads, scale_y, scale_x, alpha,
                  F: tl.constexpr, F_PAD: tl.constexpr, GUIDE_MODE: tl.constexpr,
                  LEAN_SOFTMAX: tl.constexpr):
    """(attn, guided, rowsum(guided)) for BLOCK_R rows, fp32, padded columns zero (the band
    step is the caller's: `_band_high`, or the stats pass's energies straight from the terms).

    LEAN_SOFTMAX: exps by tl.exp2 (flush-to-zero ex2: no denormal fix-up of three instructions
    per entry on sm_90) and A as exps times one reciprocal per row (no division's two fix-up
    FMULs per entry), within fp32 rounding of tl.exp and exps / sum, which the stats pass keeps
    with the exact fp32 band dot: either change left its 4-tile stats variants 8 bytes of spill
    under Triton 3.6.

    A row whose guided sum is <= 0 or not finite (e.g. a zero guide with alpha = 1) uses the
    unguided map instead: the renormalisation would otherwise divide by zero.
    """
    cols = tl.arange(0, F_PAD)
    col_mask = cols < F
    offsets = (b * rows_per_entry + rows)[:, None] * F + cols[None, :]
    logits = tl.load(scores_ptr + offsets, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    logits = tl.where(col_mask[None, :], logits.to(tl.float32), float("-inf"))
    if LEAN_SOFTMAX:
        exps = tl.exp2((logits - tl.max(logits, axis=1)[:, None]) * LOG2E)
        attn = exps * (1.0 / tl.sum(exps, axis=1))[:, None]
    else:
        exps = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        attn = exps / tl.sum(exps, axis=1)[:, None]
    if GUIDE_MODE == 0:
        guided = attn
        row_sum = tl.sum(attn, axis=1)
    else:
        upsampled = _guide_rows(guide_ptr, b, rows, row_mask, cols, col_mask, H, W, h, w, heads,
                                scale_y, scale_x, F, GUIDE_MODE)
        guided = _blend(attn, upsampled, alpha)
        row_sum = tl.sum(guided, axis=1)
        usable = _usable(row_sum)
        guided = tl.where(usable[:, None], guided, attn)
        row_sum = tl.where(usable, row_sum, tl.sum(attn, axis=1))
    return attn, guided, row_sum


@triton.jit
def _band_high(guided, band_ptr, F_PAD: tl.constexpr, FULL_BAND: tl.constexpr,
               SPLIT_BAND: tl.constexpr, BAND_RANK: tl.constexpr, BAND_COMPLEMENT: tl.constexpr):
    """guided @ P as the launch plan chose to form it. With the full band, P = I - 1/F, this is
    `guided` itself: the callers take A2 P = A2 - s / F from the row sum instead
    (`enhanced_rows`, the stats pass's energies)."""
    if FULL_BAND:
        high = guided  # unused, see above
    elif BAND_RANK > 0:
        high = rank_one_band_product(guided, band_ptr, F_PAD, BAND_RANK, BAND_COMPLEMENT)
    else:
        band, band_low = load_band(band_ptr, F_PAD, SPLIT_BAND)
        high = band_product(guided, band, band_low, SPLIT_BAND)
    return high


@triton.jit
def _tile_energies(guided, row_sum, band_ptr, F: tl.constexpr, F_PAD: tl.constexpr,
                   FULL_BAND: tl.constexpr, SPLIT_BAND: tl.constexpr, BAND_RANK: tl.constexpr,
                   BAND_COMPLEMENT: tl.constexpr, TERM_ENERGIES: tl.constexpr):
    """(|A2|^2, <A2, A2 P>, |A2 P|^2) per row of a tile; the last only matters with stats
    (dead code otherwise)."""
    guided_square = tl.sum(guided * guided, axis=1)
    if FULL_BAND:
        # A2 P = A2 - s / F: <A2, A2 P> = |A2|^2 - s^2 / F, and |A2 P|^2 is the same (A2 P
        # sums to 0), so A2 P is never formed (6-8% fewer SASS instructions per program, sm_90)
        guided_high = guided_square - row_sum * row_sum * (1.0 / F)
        high_square = guided_high
    elif TERM_ENERGIES:
        # P = sum_k v_k^T v_k (or I minus it): <A2, A2 P> is the sum of the squared
        # coefficients A2 . v_k (or |A2|^2 minus it), so A2 P is never formed: no scaled
        # additions. For even F the band is symmetric and P a projector, |A2 P|^2 = <A2, A2 P>.
        term_energy = rank_one_band_energy(guided, band_ptr, F_PAD, BAND_RANK)
        guided_high = guided_square - term_energy if BAND_COMPLEMENT else term_energy
        high_square = guided_high
    else:
        high = _band_high(guided, band_ptr, F_PAD, FULL_BAND, SPLIT_BAND, BAND_RANK,
                          BAND_COMPLEMENT)
        guided_high = tl.sum(guided * high, axis=1)
        high_square = tl.sum(high * high, axis=1)
    return guided_square, guided_high, high_square


@triton.jit
def _stats_kernel(scores_ptr, guide_ptr, band_ptr, workspace_ptr, stats_ptr, betas_at, counter_at,
                  tier_sums_at, tier_counters_at, rows_per_entry, first_entry, h, w, scale_y,
                  scale_x, alpha, beta0, beta_max, H: tl.constexpr, W: tl.constexpr,
                  heads: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
                  TILES: tl.constexpr, GUIDE_MODE: tl.constexpr, FULL_BAND: tl.constexpr,
                  SPLIT_BAND: tl.constexpr, BAND_RANK: tl.constexpr, BAND_COMPLEMENT: tl.constexpr,
                  ADAPTIVE: tl.constexpr, HAS_BETA_MAX: tl.constexpr, WRITE_STATS: tl.constexpr,
                  PER_VIDEO: tl.constexpr, CHUNK: tl.constexpr, TIERED: tl.constexpr,
                  TERM_ENERGIES: tl.constexpr, PDL: tl.constexpr, THREAD_ROWS: tl.constexpr,
                  TAU: tl.constexpr, COLUMNS: tl.constexpr):
    """Energy sums of TILES consecutive tiles of one entry in scope, written to this program's
    slot of the partials (field-major: partials[field, slot], at the start of the workspace); the
    last program to finish adds every slot in a fixed order and writes beta (and stats), see
    `_finish_energies`. The betas start at `betas_at` of the workspace, the int32 ticket counter
    is at `counter_at` (one buffer, passed whole: slicing it costs ~1 us of host time per view).

    TIERED (more than `FLAT_SUM_SLOTS` slots per video): the slots of a video come in tiers of
    CHUNK; the last program of a tier (its int32 counter at `tier_counters_at` + tier) adds the
    tier's slots into fp64 tier sums (field-major at `tier_sums_at`, an even offset), then takes a
    ticket on the counter at `counter_at`, and the last tier's program adds the tier sums in order.
    Both orders are fixed: same input, same bits.

    The tiles are unrolled (no loop-carried loads), so each program has all its loads in flight
    at once. The three 1/s^2-weighted sums behind E3 are computed only with WRITE_STATS.

    TERM_ENERGIES (the launch plan's rule): the band energies come from P's rank-one terms'
    coefficients alone, without A2 P. THREAD_ROWS (`triton_rules.thread_row_band`): from the
    frequencies' dot products, one row per thread (`triton_rules.thread_row_band_energy`; loads
    COLUMNS wide, P's entries compiled in for tau = TAU).

    PDL: the apply kernel, launched as this kernel's programmatic dependent, may start now
    (`PROGRAMMATIC_LAUNCH`).
    """
    if PDL:
        gdc_launch_dependents()
    program = tl.program_id(0)
    video = tl.program_id(1)
    b = (first_entry + video).to(tl.int64)
    partials_ptr = workspace_ptr
    attn_energy = tl.zeros((BLOCK_R,), dtype=tl.float32)
    guided_energy = tl.zeros((BLOCK_R,), dtype=tl.float32)
    high_energy = tl.zeros((BLOCK_R,), dtype=tl.float32)
    out_guided = tl.zeros((BLOCK_R,), dtype=tl.float32)
    out_cross = tl.zeros((BLOCK_R,), dtype=tl.float32)
    out_high = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for tile in tl.static_range(TILES):
        rows = (program * TILES + tile) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < rows_per_entry
        if THREAD_ROWS:
            attn, guided, row_sum = _guided_thread_rows(
                scores_ptr, guide_ptr, b, rows, row_mask, rows_per_entry, H, W, h, w, heads,
                scale_y, scale_x, alpha, F, COLUMNS, GUIDE_MODE)
            attn_square = tl.zeros_like(row_sum)
            guided_square = tl.zeros_like(row_sum)
            for j in tl.static_range(F):
                attn_square += attn[j] * attn[j]
                guided_square += guided[j] * guided[j]
            guided_high = thread_row_band_energy(guided, row_sum, F, TAU)
            high_square = guided_high
        else:
            attn, guided, row_sum = _guided_block(
                scores_ptr, guide_ptr, b, rows, row_mask, rows_per_entry, H, W, h, w, heads,
                scale_y, scale_x, alpha, F, F_PAD, GUIDE_MODE,
                FULL_BAND or SPLIT_BAND or BAND_RANK > 0)
            attn_square = tl.sum(attn * attn, axis=1)
            guided_square, guided_high, high_square = _tile_energies(
                guided, row_sum, band_ptr, F, F_PAD, FULL_BAND, SPLIT_BAND, BAND_RANK,
                BAND_COMPLEMENT, TERM_ENERGIES)
        attn_energy += tl.where(row_mask, attn_square, 0.0)
        guided_energy += tl.where(row_mask, guided_square, 0.0)
        high_energy += tl.where(row_mask, guided_high, 0.0)
        if WRITE_STATS:  # E3 is the energy of A3 / s, s = rowsum(A2) (A2 @ P sums to 0)
            inv_square_sum = 1.0 / (row_sum * row_sum)
            out_guided += tl.where(row_mask, guided_square * inv_square_sum, 0.0)
            out_cross += tl.where(row_mask, guided_high * inv_square_sum, 0.0)
            out_high += tl.where(row_mask, high_square * inv_square_sum, 0.0)
    slots = tl.num_programs(0) * tl.num_programs(1)
    slot = partials_ptr + video * tl.num_programs(0) + program
    tl.store(slot + 0 * slots, tl.sum(attn_energy, axis=0))
    tl.store(slot + 1 * slots, tl.sum(guided_energy, axis=0))
    tl.store(slot + 2 * slots, tl.sum(high_energy, axis=0))
    if WRITE_STATS:
        tl.store(slot + 3 * slots, tl.sum(out_guided, axis=0))
        tl.store(slot + 4 * slots, tl.sum(out_cross, axis=0))
        tl.store(slot + 5 * slots, tl.sum(out_high, axis=0))
    # Ticket: the barrier orders every thread's slot store before the release of the atomic
    # (as in CUDA's threadfence reduction); the last program's loads come after its acquire.
    # The program that draws a counter's last ticket sets it back to zero (every other program
    # has drawn its own), so a workspace reused on one stream starts each call with zeroed
    # counters (bytheway_kernels/ops/workspace.py).
    tl.debug_barrier()
    counter_ptr = (workspace_ptr + counter_at).to(tl.pointer_type(tl.int32), bitcast=True)
    if TIERED:
        programs = tl.num_programs(0)
        tiers_per_video = tl.cdiv(programs, CHUNK)
        tiers = tiers_per_video * tl.num_programs(1)
        tier_start = (program // CHUNK) * CHUNK  # this tier's first program of the video
        tier = video * tiers_per_video + program // CHUNK
        tier_size = tl.minimum(programs - tier_start, CHUNK)
        tier_sums_ptr = (workspace_ptr + tier_sums_at).to(tl.pointer_type(tl.float64), bitcast=True)
        tier_counter_ptr = (workspace_ptr + tier_counters_at).to(tl.pointer_type(tl.int32),
                                                                 bitcast=True)
        tier_ticket = tl.atomic_add(tier_counter_ptr + tier, 1, sem="acq_rel")
        if tier_ticket == tier_size - 1:
            tl.store(tier_counter_ptr + tier, 0)  # every program of the tier has its ticket
            _sum_tier(partials_ptr, tier_sums_ptr, video * programs + tier_start, tier_size,
                      slots, tier, tiers, CHUNK, WRITE_STATS)
            tl.debug_barrier()  # as above: the tier sums are stored before the release
            ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
            if ticket == tiers - 1:
                tl.store(counter_ptr, 0)
                _finish_energies(tier_sums_ptr, workspace_ptr + betas_at, stats_ptr, tiers,
                                 tl.num_programs(1), rows_per_entry, beta0, beta_max, CHUNK,
                                 ADAPTIVE, HAS_BETA_MAX, WRITE_STATS, PER_VIDEO)
    else:
        ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if ticket == slots - 1:
            tl.store(counter_ptr, 0)
            _finish_energies(partials_ptr, workspace_ptr + betas_at, stats_ptr, slots,
                             tl.num_programs(1), rows_per_entry, beta0, beta_max, CHUNK, ADAPTIVE,
                             HAS_BETA_MAX, WRITE_STATS, PER_VIDEO)


@triton.jit
def _sum_tier(partials_ptr, tier_sums_ptr, first_slot, tier_size, slots, tier, tiers,
              CHUNK: tl.constexpr, WRITE_STATS: tl.constexpr):
    """tier_sums[field, tier] = the fp64 sum of partials[field, first_slot : + tier_size] (one
    tree order) for each field (three, six with WRITE_STATS)."""
    offsets = tl.arange(0, CHUNK)
    mask = offsets < tier_size
    at = partials_ptr + first_slot + offsets
    for field in tl.static_range(6 if WRITE_STATS else 3):
        # .cg: straight from L2, where the other programs' stores are
        values = tl.load(at + field * slots, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(tier_sums_ptr + field * tiers + tier, tl.sum(values.to(tl.float64), axis=0))


@triton.jit
def _finish_energies(partials_ptr, betas_ptr, stats_ptr, slots, videos, rows_per_entry, beta0,
                     beta_max, CHUNK: tl.constexpr, ADAPTIVE: tl.constexpr,
                     HAS_BETA_MAX: tl.constexpr, WRITE_STATS: tl.constexpr,
                     PER_VIDEO: tl.constexpr):
    """Per energy group (one per video, or one): add its slots in a fixed order (fp64), write beta
    (betas[group]) and, with WRITE_STATS, the stats row (beta, E1, E2, E2_low, E2_high, E3).
    The slots are fp32 partials or fp64 tier sums (`_stats_kernel`'s TIERED), field-major."""
    groups = videos if PER_VIDEO else 1
    slots_per_group = slots // groups
    offsets = tl.arange(0, CHUNK)
    zero = tl.zeros((), dtype=tl.float64)  # scalar arguments arrive as fp32/int: widen them
    count = tl.maximum((zero + rows_per_entry) * (videos // groups), 1.0)
    for group in range(0, groups):
        first = partials_ptr + group * slots_per_group
        sums = tl.zeros((CHUNK,), dtype=tl.float64)
        guided_sums = tl.zeros((CHUNK,), dtype=tl.float64)
        high_sums = tl.zeros((CHUNK,), dtype=tl.float64)
        out_guided_sums = tl.zeros((CHUNK,), dtype=tl.float64)
        out_cross_sums = tl.zeros((CHUNK,), dtype=tl.float64)
        out_high_sums = tl.zeros((CHUNK,), dtype=tl.float64)
        for start in range(0, slots_per_group, CHUNK):
            mask = start + offsets < slots_per_group
            at = first + start + offsets
            # .cg: straight from L2, where the other programs' stores are
            sums += tl.load(at, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float64)
            guided_sums += tl.load(at + slots, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float64)
            high_sums += tl.load(at + 2 * slots, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float64)
            if WRITE_STATS:
                out_guided_sums += tl.load(at + 3 * slots, mask=mask, other=0.0,
                                           cache_modifier=".cg").to(tl.float64)
                out_cross_sums += tl.load(at + 4 * slots, mask=mask, other=0.0,
                                          cache_modifier=".cg").to(tl.float64)
                out_high_sums += tl.load(at + 5 * slots, mask=mask, other=0.0,
                                         cache_modifier=".cg").to(tl.float64)
        e1 = tl.sum(sums, axis=0) / count
        e2 = tl.sum(guided_sums, axis=0) / count
        e2_high = tl.sum(high_sums, axis=0) / count
        beta = group_beta(e1, e2, e2_high, beta0, beta_max, ENERGY_FLOOR, ADAPTIVE, HAS_BETA_MAX)
        tl.store(betas_ptr + group, beta)
        if WRITE_STATS:
            store_stats_row(stats_ptr, group, beta, e1, e2, e2_high, tl.sum(out_guided_sums, axis=0),
                            tl.sum(out_cross_sums, axis=0), tl.sum(out_high_sums, axis=0), count)


@triton.jit
def _guided_thread_rows(scores_ptr, guide_ptr, b, rows, row_mask, rows_per_entry, H, W, h, w,
                        heads, scale_y, scale_x, alpha, F: tl.constexpr, COLUMNS: tl.constexpr,
                        GUIDE_MODE: tl.constexpr):
    """`_guided_block` (its lean softmax) for rows held one per thread: (attn, guided,
    rowsum(guided)) with attn and guided tuples of F fp32 column tensors
    (`triton_rules.load_row_chunk`)."""
    row_starts = (b * rows_per_entry + rows) * F
    logits = ()
    for start in tl.static_range(0, F, COLUMNS):
        logits = logits + load_row_chunk(scores_ptr, row_starts, row_mask, start, COLUMNS)
    largest = logits[0]
    for j in tl.static_range(1, F):
        largest = tl.maximum(largest, logits[j])
    exps = ()
    exp_sum = tl.zeros_like(largest)
    for j in tl.static_range(F):
        exps = exps + (tl.exp2((logits[j] - largest) * LOG2E),)
        exp_sum += exps[j]
    reciprocal = 1.0 / exp_sum
    attn = ()
    attn_sum = tl.zeros_like(largest)
    for j in tl.static_range(F):
        attn = attn + (exps[j] * reciprocal,)
        attn_sum += attn[j]
    if GUIDE_MODE == 0:
        return attn, attn, attn_sum
    else:
        row00, row01, row10, row11, wy, wx = _guide_sources(b, rows, H, W, h, w, heads, scale_y,
                                                            scale_x, F, GUIDE_MODE)
        guided = ()
        guided_sum = tl.zeros_like(largest)
        for start in tl.static_range(0, F, COLUMNS):
            g00 = load_row_chunk(guide_ptr, row00 * F, row_mask, start, COLUMNS)
            if GUIDE_MODE == 2:
                g01 = load_row_chunk(guide_ptr, row01 * F, row_mask, start, COLUMNS)
                g10 = load_row_chunk(guide_ptr, row10 * F, row_mask, start, COLUMNS)
                g11 = load_row_chunk(guide_ptr, row11 * F, row_mask, start, COLUMNS)
            for i in tl.static_range(COLUMNS):
                if GUIDE_MODE == 1:
                    upsampled = g00[i]
                else:
                    upsampled = _bilinear(g00[i], g01[i], g10[i], g11[i], wy, wx)
                blended = _blend(attn[start + i], upsampled, alpha)
                guided = guided + (blended,)
                guided_sum += blended
        usable = _usable(guided_sum)
        kept = ()
        for j in tl.static_range(F):
            kept = kept + (tl.where(usable, guided[j], attn[j]),)
        return attn, kept, tl.where(usable, guided_sum, attn_sum)


@triton.jit
def _apply_thread_rows(scores_ptr, guide_ptr, betas_ptr, probs_ptr, betas_at, b, rows_per_entry,
                       videos, h, w, scale_y, scale_x, alpha, beta0, H, W, heads,
                       F: tl.constexpr, TAU: tl.constexpr, COLUMNS: tl.constexpr,
                       BLOCK_R: tl.constexpr, GUIDE_MODE: tl.constexpr, PER_VIDEO: tl.constexpr,
                       ADAPTIVE: tl.constexpr, PDL: tl.constexpr):
    """`_apply_kernel` with its BLOCK_R rows held one per thread (`THREAD_ROWS`): the band step
    by `triton_rules.thread_row_band_product`, everything else as the tile form computes it."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < rows_per_entry
    _, guided, row_sum = _guided_thread_rows(scores_ptr, guide_ptr, b, rows, row_mask,
                                             rows_per_entry, H, W, h, w, heads, scale_y, scale_x,
                                             alpha, F, COLUMNS, GUIDE_MODE)
    high = thread_row_band_product(guided, F, TAU)
    if PDL:
        gdc_wait()
    beta = beta0
    if ADAPTIVE:
        beta = tl.load(betas_ptr + betas_at + (b % videos if PER_VIDEO else 0))
    enhanced = ()
    for j in tl.static_range(F):
        enhanced = enhanced + (enhanced_rows(guided[j], high[j], beta, row_sum, F, False),)
    row_starts = (b * rows_per_entry + rows) * F
    for start in tl.static_range(0, F, COLUMNS):
        store_row_chunk(probs_ptr, row_starts, row_mask, enhanced, start, COLUMNS)


@triton.jit
def _apply_kernel(scores_ptr, guide_ptr, band_ptr, betas_ptr, probs_ptr, betas_at, rows_per_entry,
                  videos, h, w, scale_y, scale_x, alpha, beta0, H: tl.constexpr, W: tl.constexpr,
                  heads: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
                  GUIDE_MODE: tl.constexpr, FULL_BAND: tl.constexpr, SPLIT_BAND: tl.constexpr,
                  BAND_RANK: tl.constexpr, BAND_COMPLEMENT: tl.constexpr, PER_VIDEO: tl.constexpr,
                  ADAPTIVE: tl.constexpr, PDL: tl.constexpr, THREAD_ROWS: tl.constexpr,
                  TAU: tl.constexpr, COLUMNS: tl.constexpr):
    """Write A3 = (guided + (beta - 1) * guided @ P) / rowsum(guided); beta from
    `betas_ptr + betas_at` (the stats pass's workspace) if adaptive.

    Dividing by rowsum(A2) rather than rowsum(A3) keeps the error independent of beta: both are
    equal in exact arithmetic, but A3's sum carries beta times the rounding of the band term.

    PDL (launched as the stats pass's programmatic dependent, `PROGRAMMATIC_LAUNCH`): everything
    up to the band step overlaps the stats pass; the program then waits for all of it to finish
    before it reads beta or stores (so nothing after this kernel runs before the stats pass ends).

    THREAD_ROWS (`triton_rules.thread_row_band`): one row per thread, the band step with P's entries
    compiled in for tau = TAU, loads and stores COLUMNS columns wide (`_apply_thread_rows`).
    """
    b = tl.program_id(1).to(tl.int64)
    if THREAD_ROWS:
        _apply_thread_rows(scores_ptr, guide_ptr, betas_ptr, probs_ptr, betas_at, b, rows_per_entry,
                           videos, h, w, scale_y, scale_x, alpha, beta0, H, W, heads, F, TAU, COLUMNS,
                           BLOCK_R, GUIDE_MODE, PER_VIDEO, ADAPTIVE, PDL)
    else:
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < rows_per_entry
        attn, guided, row_sum = _guided_block(
            scores_ptr, guide_ptr, b, rows, row_mask, rows_per_entry, H, W, h, w, heads, scale_y,
            scale_x, alpha, F, F_PAD, GUIDE_MODE, True)
        high = _band_high(guided, band_ptr, F_PAD, FULL_BAND, SPLIT_BAND, BAND_RANK, BAND_COMPLEMENT)
        if PDL:
            gdc_wait()
        beta = beta0
        if ADAPTIVE:
            beta = tl.load(betas_ptr + betas_at + (b % videos if PER_VIDEO else 0))
        enhanced = enhanced_rows(guided, high, beta, row_sum[:, None], F, FULL_BAND)  # padded: unstored
        cols = tl.arange(0, F_PAD)
        offsets = (b * rows_per_entry + rows)[:, None] * F + cols[None, :]
        tl.store(probs_ptr + offsets, to_element_type(enhanced, probs_ptr),
                 mask=row_mask[:, None] & (cols < F)[None, :])


def _launch_shape(padded_frames: int):
    """(rows per tile, warps) of the apply pass: ~1K fp32 elements per tile keeps every variant
    free of register spills on sm_90 (checked by tests/test_triton_sm90.py under Triton 3.6 and
    the current Triton), and tl.dot needs >= 16 rows."""
    return max(16, 1024 // padded_frames), (8 if padded_frames >= 64 else 4)


class _LaunchPlan(NamedTuple):
    """Everything about the launches that depends only on shapes, dtypes and parameters."""

    stats_grid: tuple
    apply_grid: tuple
    workspace_size: int  # float32 elements: partials, betas, the ticket counter
    stats_args: dict
    apply_args: dict
    full_band: bool


@functools.lru_cache(maxsize=256)
def _launch_plan(shape: tuple, guide_hw: Optional[tuple], params: ByTheWayParams,
                 with_stats: bool, band_setting: str, programmatic: bool = False) -> _LaunchPlan:
    """`programmatic`: the two launches (adaptive beta or stats) as a programmatic dependent
    pair (`PROGRAMMATIC_LAUNCH`, `_programmatic`)."""
    batch, height, width, heads, frames, _ = shape
    programmatic = programmatic and (params.adaptive_beta or with_stats)
    videos = batch // params.parts
    rows_per_entry = height * width * heads * frames
    padded = max(16, triton.next_power_of_2(frames))
    block_rows, num_warps = _launch_shape(padded)
    per_video = params.energy_scope == "sample"
    h, w = (height, width) if guide_hw is None else guide_hw
    full_band = is_full_band(frames, params.tau)
    split = triton_rules.split_band(band_setting, padded, fused=False) and not full_band
    # one row per thread in both passes, the band step by its frequencies: even F (the symmetric
    # form), whole vectors of 4 or 8 columns per row
    thread_rows = triton_rules.thread_row_band(band_setting, frames) and not full_band
    if thread_rows:  # one row per thread, in both passes
        block_rows, num_warps = 32 * THREAD_ROW_WARPS, THREAD_ROW_WARPS
    band_rank, band_complement = 0, False  # rank 0: a product with P (or the full band)
    if triton_rules.rank_one_band(band_setting, frames) and not full_band:
        terms, band_complement = band_rank_one_terms_float64(frames, params.tau)
        band_rank, split = terms.shape[0], False
        if frames % 4:  # unvectorised rows: full tiles spilled 8 bytes (F = 3, bilinear, Triton 3.6)
            block_rows = max(16, block_rows // 2)
    common = dict(rows_per_entry=rows_per_entry, H=height, W=width, h=h, w=w, heads=heads,
                  scale_y=h / height, scale_x=w / width, alpha=params.alpha, beta0=params.beta,
                  F=frames, F_PAD=padded, BLOCK_R=block_rows,
                  GUIDE_MODE=GUIDE_MODES[None if guide_hw is None else params.guide_upsample],
                  FULL_BAND=full_band, SPLIT_BAND=split, BAND_RANK=band_rank,
                  BAND_COMPLEMENT=band_complement,
                  ADAPTIVE=params.adaptive_beta, PER_VIDEO=per_video, PDL=programmatic,
                  THREAD_ROWS=thread_rows, TAU=params.tau if thread_rows else 0,
                  COLUMNS=8 if frames % 8 == 0 else 4, num_warps=num_warps)
    tiles = triton.cdiv(rows_per_entry, block_rows)  # grid axis 0: it allows 2**31 - 1 programs
    # the exact fp32 dot's layouts need more registers: half tiles keep its stats pass free of
    # spills (the split product on tensor cores fits in full tiles, sm_90, Triton 3.6 and 3.9);
    # so do the rank-one terms' products (full tiles spilled 16 bytes under Triton 3.6 at F = 16,
    # 4 tiles per program, bilinear guide, with stats), but not their energies alone
    stats_block_rows = block_rows
    # `_stats_kernel`'s TERM_ENERGIES: the rank-one terms' coefficients give <A2, A2 P>, and for
    # even F (P a projector) |A2 P|^2, which only stats need
    term_energies = band_rank > 0 and (frames % 2 == 0 or not with_stats)
    if not (full_band or split or thread_rows or (term_energies and FULL_STATS_TILES_FOR_TERMS)):
        stats_block_rows = max(16, block_rows // 2)
    stats_tiles = triton.cdiv(rows_per_entry, stats_block_rows)
    tiles_per_program = min(MAX_STATS_TILES, triton.next_power_of_2(
        triton.cdiv(stats_tiles * videos, TARGET_STATS_PROGRAMS)))
    programs = triton.cdiv(stats_tiles, tiles_per_program)
    # the workspace (float32 elements): partials; if tiered, the fp64 tier sums (2 elements each,
    # from an even offset) and an int32 counter per tier; one beta per energy group; the ticket
    # counter
    tiered = programs > FLAT_SUM_SLOTS
    tiers = videos * triton.cdiv(programs, REDUCE_CHUNK) if tiered else 0
    partial_count = videos * programs * PARTIAL_FIELDS
    tier_sums_at = partial_count + partial_count % 2
    tier_counters_at = tier_sums_at + 2 * PARTIAL_FIELDS * tiers
    betas_at = tier_counters_at + tiers
    groups = videos if per_video else 1
    stats_args = dict(common, first_entry=params.energy_part * videos, TILES=tiles_per_program,
                      BLOCK_R=stats_block_rows, betas_at=betas_at, counter_at=betas_at + groups,
                      tier_sums_at=tier_sums_at, tier_counters_at=tier_counters_at,
                      beta_max=params.beta if params.beta_max is None else params.beta_max,
                      HAS_BETA_MAX=params.beta_max is not None, WRITE_STATS=with_stats,
                      CHUNK=REDUCE_CHUNK, TIERED=tiered, TERM_ENERGIES=term_energies)
    apply_args = dict(common, videos=max(videos, 1), betas_at=betas_at)
    if programmatic:
        apply_args["launch_pdl"] = True  # Triton's launch option: programmatic stream serialization
    return _LaunchPlan((programs, videos), (tiles, batch), betas_at + groups + 1, stats_args,
                       apply_args, common["FULL_BAND"])


def kernel_launches(scores, guide, params: ByTheWayParams, probs, stats=None) -> list:
    """The launches that write ByTheWay(scores) into `probs` (and `stats` if given), in order.

    Fixed beta without stats: `_apply_kernel` alone. Otherwise `_stats_kernel` (whose last program
    also turns the energies into beta and stats) then `_apply_kernel`, with a new zeroed
    workspace (plain eager calls reuse one: `attention_probs_triton_eager`). `scores` and `guide`
    must be contiguous and `probs` non-empty.
    """
    return _launches_and_sources(scores, guide, params, probs, stats, False)[0]


def _launches_and_sources(scores, guide, params: ByTheWayParams, probs, stats, reuse_workspace: bool):
    """(`kernel_launches`, the tensors they read and write, and the launch plan). The tensors are
    (scores, guide, band, workspace, probs, stats), each None where the launches do not use it
    (the band where the full band needs none); the launches pass scores for an unused guide or
    band pointer and the workspace for an unused stats pointer. `reuse_workspace`: see
    `bytheway_kernels.ops.workspace.zeroed_workspace`."""
    plan = _launch_plan(tuple(scores.shape), None if guide is None else tuple(guide.shape[1:3]),
                        params, stats is not None, triton_rules.BAND_PRODUCT,
                        PROGRAMMATIC_LAUNCH and _programmatic(scores.device))
    band = scores  # unused where the band is full or compiled in (`THREAD_ROWS`)
    if plan.apply_args["BAND_RANK"]:
        band = band_rank_one_terms(scores.shape[-1], params.tau, plan.apply_args["F_PAD"], scores.device)
    elif not (plan.full_band or plan.apply_args["THREAD_ROWS"]):
        band = band_operand(scores.shape[-1], params.tau, plan.apply_args["F_PAD"], scores.device,
                            plan.apply_args["SPLIT_BAND"])
    guide_source = guide
    guide = scores if guide is None else guide
    if not (params.adaptive_beta or stats is not None):
        launches = [KernelLaunch(_apply_kernel, plan.apply_grid, plan.apply_args,
                                 dict(scores_ptr=scores, guide_ptr=guide, band_ptr=band,
                                      betas_ptr=probs, probs_ptr=probs))]
        return launches, (scores, guide_source, None if band is scores else band, None, probs, None), plan
    # The stats programs' partial slots, one beta per energy group and the int32 ticket counters
    # (zero bits), which the stats pass leaves at zero: reused per stream by eager calls, a new
    # zeroed buffer otherwise (CUDA graphs, torch.compile)
    workspace = zeroed_workspace(plan, plan.workspace_size, scores, reuse_workspace)
    launches = [
        KernelLaunch(_stats_kernel, plan.stats_grid, plan.stats_args,
                     dict(scores_ptr=scores, guide_ptr=guide, band_ptr=band, workspace_ptr=workspace,
                          stats_ptr=workspace if stats is None else stats)),
        KernelLaunch(_apply_kernel, plan.apply_grid, plan.apply_args,
                     dict(scores_ptr=scores, guide_ptr=guide, band_ptr=band, betas_ptr=workspace,
                          probs_ptr=probs)),
    ]
    return launches, (scores, guide_source, None if band is scores else band, workspace, probs,
                      stats), plan


@functools.lru_cache(maxsize=None)
def _programmatic(device: torch.device) -> bool:
    """Whether kernels on `device` can be launched as programmatic dependents: an NVIDIA device
    of compute capability 9.0 or later (griddepcontrol is sm_90 PTX; ROCm reports its own
    versions), compiled kernels."""
    return (device.type == "cuda" and torch.version.hip is None and not triton_interpreter()
            and torch.cuda.get_device_capability(device) >= (9, 0))


def _check_device(scores: torch.Tensor) -> None:
    if not scores.is_cuda and not triton_interpreter():
        raise RuntimeError(
            f"the Triton backend needs CUDA tensors (got {scores.device}); on CPU it runs only "
            "under the Triton interpreter (TRITON_INTERPRET=1 set before importing bytheway_kernels)"
        )


def attention_probs_triton_out(scores, guide, params: ByTheWayParams, probs, stats=None):
    """Launch the fused kernels writing into `probs` (and `stats`, (rows, 6) fp32, if given).

    The kernels compute in fp32: float64 scores are refused here (the op routes them to a float64
    backend). Launch counts: see `kernel_launches`.
    """
    _launch_out(scores, guide, params, probs, stats, reuse_workspace=False)


def _launch_out(scores, guide, params: ByTheWayParams, probs, stats, reuse_workspace: bool):
    """`attention_probs_triton_out`; returns `_launches_and_sources`' triple for what it launched,
    or None where it launched nothing or made inputs contiguous."""
    _check_device(scores)
    if scores.dtype == torch.float64:
        raise ValueError("the Triton kernels compute in fp32: float64 scores need the cpp or "
                         "reference backend (bytheway_attention_probs routes them there)")
    if probs.numel() == 0:
        if stats is not None:  # no rows: energies are zero and beta is beta_0, as the reference
            stats.zero_()
            stats[:, 0] = params.beta
        return None
    copied = False
    if not scores.is_contiguous():  # checked first: .contiguous() costs a dispatch even as a no-op
        scores, copied = scores.contiguous(), True
    if guide is not None and not guide.is_contiguous():
        guide, copied = guide.contiguous(), True
    launched = _launches_and_sources(scores, guide, params, probs, stats, reuse_workspace)
    run_on_device_of(scores, launched[0])
    return None if copied else launched


def _new_outputs(scores, params: ByTheWayParams, with_stats: bool):
    """(probs, stats or None), uninitialised: probs contiguous, stats float32 (rows, 6)."""
    probs = torch.empty_like(scores, memory_format=torch.contiguous_format)
    return probs, params.empty_stats(scores, scores.shape[0]) if with_stats else None


def attention_probs_triton(scores, guide, params: ByTheWayParams, with_stats: bool):
    """(probs, stats or None): allocate the outputs (`_new_outputs`) and launch the fused kernels
    into them."""
    probs, stats = _new_outputs(scores, params, with_stats)
    attention_probs_triton_out(scores, guide, params, probs, stats)
    return probs, stats


class _EagerCall(NamedTuple):
    """A repeatable eager call of one signature: its launches prepared for the direct launcher
    (`launch.prepare_direct`), the launch plan and the band operand they read."""

    launches: tuple
    plan: _LaunchPlan
    band: Optional[torch.Tensor]
    band_setting: str  # `triton_rules.BAND_PRODUCT` when prepared (`testing.band_product` changes it)


# Validation key (op.py's `_validated_params`: shapes, dtypes, devices and every parameter) ->
# _EagerCall, for the public function's plain eager calls.
_EAGER_CALLS: dict = {}
_EAGER_CALLS_LIMIT = 512


def clear_launch_plans() -> None:
    """Forget the cached launch plans, the eager calls prepared from them and their reused
    workspaces, for tests and benchmarks that change this module's tuning
    (`TARGET_STATS_PROGRAMS`, `MAX_STATS_TILES`, `_launch_shape`, `FULL_STATS_TILES_FOR_TERMS`,
    `PROGRAMMATIC_LAUNCH`, `THREAD_ROW_WARPS`): the next calls plan anew."""
    _launch_plan.cache_clear()
    _EAGER_CALLS.clear()
    clear_reused_workspaces()


def attention_probs_triton_eager(scores, guide, params: ByTheWayParams, with_stats: bool,
                                 call_key=None):
    """`attention_probs_triton` for plain eager calls (the public function's direct path): the
    stats pass reuses its stream's workspace, and a repeated call signature (`call_key`, which
    fixes shapes, dtypes, devices and parameters) launches its prepared kernels directly.

    A repeat skips the launch plan, the launch objects and the direct launcher's signature and
    cache key. It checks what those would decide that its key does not fix: the launch switch and
    hooks (`launch.prepared_ready`), the band product setting, the current device, contiguous
    inputs and 16-byte aligned pointers (as the prepared kernels were compiled); anything else
    takes the general path.
    """
    eager_call = _EAGER_CALLS.get(call_key) if call_key is not None else None
    if eager_call is not None:
        result = _repeat(eager_call, scores, guide, params, with_stats)
        if result is not None:
            return result
    probs, stats = _new_outputs(scores, params, with_stats)
    launched = _launch_out(scores, guide, params, probs, stats, reuse_workspace=True)
    if launched is not None and call_key is not None and launch.direct_launch_ready():
        launches, sources, plan = launched
        device = scores.get_device()
        # (the device checked first: the general path made it current only for its launches)
        prepared = launch.prepare_direct(launches, sources, device) if device == launch.current_device() else None
        if prepared is not None:
            if len(_EAGER_CALLS) >= _EAGER_CALLS_LIMIT:
                _EAGER_CALLS.clear()
            _EAGER_CALLS[call_key] = _EagerCall(prepared, plan, sources[2], triton_rules.BAND_PRODUCT)
    return probs, stats


def _repeat(eager_call: _EagerCall, scores, guide, params: ByTheWayParams, with_stats: bool):
    """(probs, stats or None) from `eager_call`'s prepared launches, or None where the general
    path must run instead."""
    device = scores.get_device()  # the key fixes it: is it still the current one?
    if (eager_call.band_setting != triton_rules.BAND_PRODUCT
            or not launch.prepared_ready(eager_call.launches) or device != launch.current_device()
            or not scores.is_contiguous() or not (guide is None or guide.is_contiguous())):
        return None
    plan = eager_call.plan
    workspace = None
    if len(eager_call.launches) > 1:
        workspace = zeroed_workspace(plan, plan.workspace_size, scores, True)
    probs, stats = _new_outputs(scores, params, with_stats)
    # the sources' pointers, in `_launches_and_sources`' order (0 for one the launches do not use)
    pointers = (scores.data_ptr(), 0 if guide is None else guide.data_ptr(),
                0 if eager_call.band is None else eager_call.band.data_ptr(),
                0 if workspace is None else workspace.data_ptr(), probs.data_ptr(),
                0 if stats is None else stats.data_ptr())
    if (pointers[0] | pointers[1] | pointers[3] | pointers[4] | pointers[5]) & 15:
        return None  # compiled for aligned pointers: the general path (these outputs are dropped)
    launch.run_prepared(eager_call.launches, pointers, launch.current_stream(device))
    return probs, stats
