"""Fused Triton kernels of temporal attention with ByTheWay inside (docs/DESIGN.md section 7).

A sequence is one (n, head) pair: F query frames attending to the same F frames; sequence
s = n * heads + head, so the G sequences of a program are consecutive heads of consecutive rows n
and their q, k, v channels are neighbours in memory. Each program takes G sequences and runs them
through batched 3-D `tl.dot`s ([G, 16, d] x [G, d, F_PAD] for 16 of its query frames), so at
F = 16 a program's tiles hold 64 rows (G = 4; F_PAD: F rounded up to a power of two >= 16):
scores = q k^T (d in BLOCK_D chunks, fp32 accumulation) -> softmax -> blend with the anchor
map, upsampled by index arithmetic (never materialised) -> band step (`guided - mean` for the
full band, else the product with the circulant P, one 2-D dot for the G sequences:
`triton_rules.band_product`) -> divide by rowsum(guided) (the band term sums to 0,
so this is the map op's renormalisation without its cancellation at large beta) -> out = A3 @ v,
d in chunks again, stored in q's dtype. The F x F map never reaches memory, except the plain
softmax map when the caller asks for it (same pass).

Fixed beta is one launch of `_attention_kernel`. Adaptive beta (or stats) first runs
`_energy_kernel` over the energy part, which recomputes the scores from q and k; each of its
programs sums a run of tiles (at most `ENERGY_PROGRAMS` programs per video) and writes one slot of
partial sums (three for beta, six with the stats; no zeroing, no atomics), then the one-program
`_beta_kernel` sums the slots in a fixed order (bit-identical run to run) and turns them into beta
and the stats on the device; the attention pass reads beta from there. No host synchronisation.
The energy pass has three forms (`ENERGY_FORMS`, `TileConfig.energy_form`; "rows", the default,
sums each tile per row; "lean" and "tile" do fewer row reductions per tile, see `_energy_kernel`),
selectable so that a GPU can time them side by side (benchmarks/fused_kernel_times.py). With
`TileConfig.stash_guided` (default `STASH_GUIDED`, on) it also stores the energy part's guided
maps, and the attention pass reads them for those sequences instead of recomputing them.

Every backend's rules hold here too: rows whose guided sum is <= 0 or not finite keep the unguided
map (energies included), and float16 A3 and out saturate at +-65504
(`triton_rules.to_element_type`; A3 and out reach it only with beta above ~7e4). The launch
settings of a call signature are computed once (`_launch_plan`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..._environ import triton_interpreter
from ...band import band_operand, is_full_band
from ...energy import HIGH_ENERGY_FLOOR
from ..launch import KernelLaunch, run_on_device_of
from ..params import ByTheWayParams
from .. import triton_rules
from ..triton_rules import (band_product, bilinear_sources, enhanced_rows, group_beta, load_band,
                            magic_quotient, magic_quotient_constants, nearest_source,
                            store_stats_row, to_element_type)

GUIDE_MODES = {None: 0, "nearest": 1, "bilinear": 2}
# How `_position` splits a sequence index: by compile-time constants, magic numbers, or run-time
# divisions.
BY_CONSTANTS = tl.constexpr(0)
BY_MAGIC_NUMBERS = tl.constexpr(1)
BY_RUNTIME_DIVISIONS = tl.constexpr(2)
# The band step: none (fixed beta = 1: the identity), P = I - 1/F (the full band), circulant P.
BAND_MODES = {"none": 0, "full": 1, "circulant": 2}
# Per program: sum|A|^2, sum|A2|^2, sum<A2, A2 P> (what beta needs), and with stats the last three
# over s^2, s = rowsum(A2), from which E3 = |A2 + (beta - 1) A2 P|^2 / s^2 follows for any beta.
SUM_FIELDS = 3
SUM_FIELDS_WITH_STATS = 6
# The energy pass's forms (`_energy_kernel`'s FORM): per-row sums as in the attention pass's tile;
# the same without the row reductions only the attention pass needs; that with per-entry sums.
ENERGY_FORMS = {"rows": 0, "lean": 1, "tile": 2}
# `_attention_tile`'s ENERGY_FORM when the attention pass calls it
ATTENTION_PASS = tl.constexpr(-1)
# Whether the energy pass's default tiles stash the guided maps for the attention pass
# (`TileConfig.stash_guided`): on, since on an H200 adaptive beta took 1.19-1.26x fixed beta's
# time with it at F = 16 and 1.32-1.47x without (docs/DESIGN.md section 8). The launch plans read
# it when they are built: clear `_launch_plan`'s cache after changing it.
STASH_GUIDED = True
# The attention pass's register cap at F_PAD = 32 when it reads a circulant stash
# (`_stashed_probs`; its default tiles there are one sequence on 2 warps): left to itself, ptxas
# of Triton 3.6 kept some of those variants at 96 registers with 8 bytes in local memory (sm_90,
# F = 24, bilinear guide); with this cap it uses 104 and none (Triton 3.9: 80-86 registers
# either way). At F_PAD = 64 (4 warps) the same cap would spill: no cap there.
STASHED_CIRCULANT_MAX_REGISTERS = 104
# Energy programs per video at most: each program sums `steps` consecutive tiles, so the one-program
# beta kernel reads at most this many slots however large the layer (~8 programs per H200 SM).
ENERGY_PROGRAMS = 1024
# The energy pass is not software-pipelined: with its loop over tiles, prefetching spills registers
# on sm_90 (fp32 inputs, d = 80: 255 registers and a stack; 144 registers without).
ENERGY_NUM_STAGES = 1
# Query frames per program: every F_PAD >= 16 splits into 16-row blocks, so a program's tiles are
# [G, 16, F_PAD] (`default_config` chooses G).
QUERY_BLOCK = 16
# Slots the beta kernel sums per step: each lane adds its slots in order, then one tree sum.
REDUCE_BLOCK = 256
# 4 warps left an 8-byte stack frame in one beta-kernel variant under Triton 3.6 (sm_90).
BETA_NUM_WARPS = 8


class TileConfig(NamedTuple):
    """Launch shape: G sequences per program, head-dim chunk BLOCK_D, warps, and a cap on the
    registers per thread that ptxas may use (Triton's `maxnreg`; None: ptxas decides).
    Two fields concern the energy pass only (the attention pass's own config ignores them):
    `energy_form`, one of `ENERGY_FORMS` ("rows", "lean" or "tile", `_energy_kernel`), and
    `stash_guided`: the energy pass also stores the energy part's guided maps (`_energy_kernel`'s
    STASH), which the attention pass then reads instead of recomputing them from q and k."""

    sequences: int
    block_d: int
    num_warps: int
    max_registers: Optional[int] = None
    energy_form: str = "rows"
    stash_guided: bool = False


def padded_frames(frames: int) -> int:
    """F rounded up to a power of two >= 16 (tl.dot needs >= 16 rows and columns)."""
    return max(16, triton.next_power_of_2(frames))


def _doubled(tile: TileConfig) -> TileConfig:
    """Twice the sequences on twice the warps: the same work per warp."""
    return tile._replace(sequences=2 * tile.sequences, num_warps=2 * tile.num_warps)


def default_config(frames: int, head_dim: int, element_size: int = 2,
                   guided_map: bool = False) -> TileConfig:
    """The attention pass's tiles. F_PAD = 16: G = 4 sequences ([G, 16, 16] fp32 tiles of 1024
    elements) on 4 warps. F_PAD = 32: one sequence on 2 warps. F_PAD = 64: one sequence on 4
    warps, or on 8 for a call that reads a guide and writes the plain map (`guided_map`; with the
    bilinear guide that variant kept 24 bytes of stack on 4 warps under Triton 3.6). d in chunks of BLOCK_D = 64 if 64 divides d, else 32 (d = 40, 80 and 160 run in chunks
    of 32; the last chunk of d = 40 and 80 is masked). Measured on an H200 (benchmarks/RESULTS.md;
    fp16, fixed beta, per-kernel device time): at F = 16, BLOCK_D = 32 beat 16 by 9-11% at d = 40,
    80 and 160, and twice the sequences on twice the warps or half on 2 warps were within 5%; at
    F = 24 and 32 (d = 80) one sequence on 2 warps took 185 and 194 us where 2 sequences on 8 warps
    took 340 and 351 (2 on 4 warps: 194 and 203); at F = 64 (d = 80) one sequence on 4 warps took
    1095 us where the former 8 warps took 2047 (2 warps: 1002 us, but 255 registers and 130-340
    bytes of stack on sm_90, where 4 warps need no stack under Triton 3.6 or 3.9).
    float32 inputs (`element_size` 4) take chunks of 16: their exact dots run on the FMA units,
    and chunks of 32 spill on sm_90 under triton 3.9. Chunking d keeps d = 160 free of spills
    where padding it to 256 would not be (register use: tests/test_temporal_attention_sm90.py)."""
    padded = padded_frames(frames)
    block_d = 16 if element_size > 2 else 64 if head_dim % 64 == 0 else 32
    if padded == 16:
        return TileConfig(4, block_d, 4)
    return TileConfig(1, block_d, 2 if padded == 32 else 8 if guided_map else 4)


def default_energy_config(frames: int, head_dim: int, element_size: int = 2) -> TileConfig:
    """The energy pass's tiles: the attention pass's, with twice the sequences on twice the warps
    at F_PAD = 16 for 2-byte inputs (float32 inputs take d chunks of 16 here too: chunks of 32 left
    a stack frame on sm_90 under Triton 3.9), in the "rows" form (F_PAD = 32: "lean"), stashing the
    guided maps for the attention pass (`STASH_GUIDED`). With the bilinear guide twice the sequences on the same warps
    spill on sm_90 (255 registers). Measured on an H200 (benchmarks/RESULTS.md; fp16, adaptive
    beta, per-kernel device time, ENERGY_PROGRAMS 1024): without the stash, 8 sequences on 8 warps
    took 12.7 / 26.7 / 46.8 us at up_blocks.1 / 2 / 3 against 12.3 / 31.5 / 54.2 us for the
    attention pass's 4 on 4; a register cap of 96 and software pipelining were within 4%. The
    "lean" and "tile" forms were within 2% of "rows" ("lean", with the stash: 1% faster at
    up_blocks.3, 1% slower at F = 64), "tile" 25-45% slower at F = 24 and 32. The stash changes the
    energy pass by -2 to +12% and makes the attention pass 12-22% faster: adaptive beta went from 1.32 /
    1.47 / 1.37x fixed beta to 1.23 / 1.26 / 1.19x. At F_PAD = 32 the form is "lean": with the
    stash and the band product on tensor cores (`triton_rules.split_band`) "rows" took 140 us at
    F = 32 where "lean" took 93 (F = 24: 84 and 83). At F_PAD = 64 the pass runs the attention
    pass's tiles, one sequence on 4 warps: at F = 64 (d = 80, with the stash) the energy pass took
    702 us there against 1323 on 8 warps (2026-11-27). float32 inputs keep 8 warps there (8 bytes
    of stack on 4 under Triton 3.9), and so does the "tile" form (it spilled on 4 under 3.6).
    `energy_candidate_configs` lists the alternatives benchmarks/fused_kernel_times.py times."""
    tile = default_config(frames, head_dim, element_size)._replace(stash_guided=STASH_GUIDED)
    padded = padded_frames(frames)
    if padded == 32:
        return tile._replace(energy_form="lean")
    if padded == 64:
        return tile if element_size <= 2 else tile._replace(num_warps=8)
    return _doubled(tile) if element_size <= 2 else tile


def candidate_configs(frames: int, head_dim: int) -> list:
    """The default and the alternatives benchmarks/fused_kernel_times.py times at F = 16: twice
    the sequences on twice the warps, another d chunk, half the sequences on 2 warps. All compile
    without spills on sm_90 (tests/test_temporal_attention_sm90.py)."""
    default = default_config(frames, head_dim)
    other_chunk = 16 if default.block_d == 32 else 32
    candidates = [default,
                  _doubled(default),
                  default._replace(block_d=other_chunk)]
    if default.sequences > 1:
        candidates.append(default._replace(sequences=default.sequences // 2, num_warps=2))
    return candidates


#: The energy pass's register cap to time against ptxas's own choice: with 4 sequences on 4 warps
#: ptxas kept the looping pass at 64 registers and reloaded a value from local memory in every
#: iteration at up_blocks.3's size (sm_90 SASS, Triton 3.9); `maxnreg` 96 gave 80 registers and
#: no reload, and on an H200 an energy pass 3-8% faster than without the cap, but slower than
#: the present default (8 sequences on 8 warps) without one; the cap on that default is untimed.
ENERGY_REGISTER_CANDIDATE = 96


def energy_candidate_configs(frames: int, head_dim: int) -> list:
    """The energy pass's default and alternatives (timed with adaptive beta by
    benchmarks/fused_kernel_times.py):
    the attention pass's tiles (where they differ; else twice the sequences on twice the warps)
    in the default's form and stash setting, the default with at most `ENERGY_REGISTER_CANDIDATE`
    registers, the default and the other tiles in each other energy form (`ENERGY_FORMS`), then
    the default tiles in every form with the other stash setting (`TileConfig.stash_guided`)."""
    default = default_energy_config(frames, head_dim)
    attention = default_config(frames, head_dim)
    # the other tiles in the default's form and stash setting
    other = default._replace(sequences=attention.sequences, block_d=attention.block_d,
                             num_warps=attention.num_warps)
    if other == default:
        other = _doubled(default)
    forms = [form for form in ENERGY_FORMS if form != default.energy_form]
    return [default, other, default._replace(max_registers=ENERGY_REGISTER_CANDIDATE)] + [
        tile._replace(energy_form=form) for form in forms for tile in (default, other)] + [
        default._replace(energy_form=form, stash_guided=not default.stash_guided)
        for form in ENERGY_FORMS]


@triton.jit
def _guide_tile(guide_ptr, b, y, x, head, frames, cols, mask, h, w, heads, scale_y, scale_x,
                F: tl.constexpr, GUIDE_MODE: tl.constexpr):
    """Upsampled anchor map for [G, BLOCK_I, F_PAD], torch.interpolate's index rules in fp32.

    b, y, x (the position, `_position`), head: [G, 1, 1] int32; frames: [1, BLOCK_I, 1]; cols:
    [1, 1, F_PAD]. Mirrors the map op's `_guide_rows` (ops/attention_probs/triton.py) in three
    dimensions; both take the index rules from `ops/triton_rules.py`.
    """
    within = frames * F + cols  # int32 offsets inside one (F, F) map; whole maps in int64
    if GUIDE_MODE == 1:
        ys = nearest_source(y, scale_y, h)
        xs = nearest_source(x, scale_x, w)
        source = guide_ptr + (((b * h + ys) * w + xs) * heads + head).to(tl.int64) * (F * F)
        upsampled = tl.load(source + within, mask=mask, other=0.0).to(tl.float32)
    else:
        y0, y1, wy = bilinear_sources(y, scale_y, h)
        x0, x1, wx = bilinear_sources(x, scale_x, w)
        row0 = (b * h + y0) * w
        row1 = (b * h + y1) * w
        map00 = guide_ptr + ((row0 + x0) * heads + head).to(tl.int64) * (F * F)
        map01 = guide_ptr + ((row0 + x1) * heads + head).to(tl.int64) * (F * F)
        map10 = guide_ptr + ((row1 + x0) * heads + head).to(tl.int64) * (F * F)
        map11 = guide_ptr + ((row1 + x1) * heads + head).to(tl.int64) * (F * F)
        top = ((1.0 - wx) * tl.load(map00 + within, mask=mask, other=0.0).to(tl.float32)
               + wx * tl.load(map01 + within, mask=mask, other=0.0).to(tl.float32))
        bottom = ((1.0 - wx) * tl.load(map10 + within, mask=mask, other=0.0).to(tl.float32)
                  + wx * tl.load(map11 + within, mask=mask, other=0.0).to(tl.float32))
        upsampled = (1.0 - wy) * top + wy * bottom
    return upsampled


@triton.jit
def _position(seq, heads, H, W, W_magic, W_shift, H_magic, H_shift, DIVIDE: tl.constexpr):
    """(n, head, b, y, x) of sequences `seq` ([G] int32, 0 <= seq < 2**31), each [G, 1, 1] int32:
    seq = n * heads + head and n = (b * H + y) * W + x, as diffusers lays the rows out. int32
    quotients: a 64-bit division would take a stack frame.

    DIVIDE: BY_CONSTANTS in the attention pass, whose heads, H and W are compile-time constants:
    n // heads, n // W and that // H become shifts or multiplications. The energy pass has them
    at run time (as constants they left 8-16 bytes of spill in some of its variants under
    Triton 3.6): BY_MAGIC_NUMBERS takes n // W and row // H from the host's magic numbers
    (`triton_rules.magic_quotient`: two instructions for ~18 of a run-time integer division);
    BY_RUNTIME_DIVISIONS, its other variants, keeps the three run-time divisions it always had
    (with the magic numbers, or in the first form, ptxas left some of them spills under Triton
    3.6 or 3.9).
    """
    n = seq // heads
    if DIVIDE == BY_RUNTIME_DIVISIONS:
        head = seq % heads
        x = n % W
        y = (n // W) % H
        b = n // (H * W)
    else:
        head = seq - n * heads
        if DIVIDE == BY_MAGIC_NUMBERS:
            row = magic_quotient(n, W_magic, W_shift)
            b = magic_quotient(row, H_magic, H_shift)
        else:
            row = n // W
            b = row // H
        x = n - row * W
        y = row - b * H
    return (n[:, None, None], head[:, None, None], b[:, None, None], y[:, None, None],
            x[:, None, None])


@triton.jit
def _attention_tile(q_ptr, k_ptr, guide_ptr, band_ptr, n32, head, b, y, x, seq_valid, frames,
                    heads, q_sn, q_sf, k_sn, k_sf, h, w, scale_y, scale_x, scale_log2, alpha,
                    F: tl.constexpr, F_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    G: tl.constexpr, BLOCK_I: tl.constexpr, GUIDE_MODE: tl.constexpr,
                    BAND: tl.constexpr, SPLIT_BAND: tl.constexpr, ENERGY_FORM: tl.constexpr):
    """(attn, guided, guided @ P, rowsum(guided), row_valid) of query frames `frames`
    ([1, BLOCK_I, 1]) of G sequences against all F key frames: [G, BLOCK_I, F_PAD] fp32, row sums
    [G, BLOCK_I, 1]. The sequences come split (`_position`): position n32 = (b, y, x) and head,
    [G, 1, 1] int32 each.

    Padded columns of the first three are zero; rows of padded frames or sequences hold finite
    values (row sums may be 0) that callers must not store or sum (row_valid, [G, BLOCK_I, 1],
    says which rows are real).

    ENERGY_FORM is the energy pass's form (`ENERGY_FORMS`), or ATTENTION_PASS (-1) for the
    attention pass. The lean forms (LEAN: "lean" and "tile", `_energy_kernel`) skip the row
    reductions that only the attention pass needs: rows that keep A (no guide, or an unusable guided sum) take 1 as their
    row sum, not a second sum of A (A's rows sum to 1 up to rounding; the usable-row test itself
    is unchanged). A is exps times the reciprocal of their row sum (within rounding of
    exps / sum), the reciprocal set to 0 in the rows of padding (a per-row select), so attn and
    guided are zero there and sums of their products need no mask; `high` is not zero there.
    All but the "rows" form take the full band's mean from row_sum instead of a second row sum
    of guided (MEAN_FROM_ROW_SUM).
    """
    LEAN: tl.constexpr = ENERGY_FORM > 0
    MEAN_FROM_ROW_SUM: tl.constexpr = ENERGY_FORM != 0
    n = n32.to(tl.int64)  # addresses in int64
    keys = tl.arange(0, F_PAD)[None, :, None]
    cols = tl.arange(0, F_PAD)[None, None, :]
    dims = tl.arange(0, BLOCK_D)[None, None, :]
    row_valid = seq_valid[:, None, None] & (frames < F)
    key_valid = seq_valid[:, None, None] & (keys < F)
    col_valid = cols < F
    q_rows = q_ptr + n * q_sn + frames * q_sf + head * D
    k_rows = k_ptr + n * k_sn + keys * k_sf + head * D
    logits = tl.zeros([G, BLOCK_I, F_PAD], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):  # d in chunks: d = 40, 80, 160 need no power-of-two pad
        q_chunk = tl.load(q_rows + start + dims, mask=row_valid & (start + dims < D), other=0.0)
        k_chunk = tl.load(k_rows + start + dims, mask=key_valid & (start + dims < D), other=0.0)
        logits = tl.dot(q_chunk, tl.permute(k_chunk, (0, 2, 1)), logits, input_precision="ieee")
    # softmax of scale * q k^T, in base 2 (the scale carries log2(e))
    logits = tl.where(col_valid, logits * scale_log2, float("-inf"))
    exps = tl.exp2(logits - tl.max(logits, axis=2)[:, :, None])
    # one reciprocal per row, not a division per entry (each costs two fix-up FMULs on sm_90)
    if LEAN:  # rows of padding become 0, so that sums of products need no mask
        attn = exps * tl.where(row_valid, 1.0 / tl.sum(exps, axis=2)[:, :, None], 0.0)
    else:
        attn = exps * (1.0 / tl.sum(exps, axis=2)[:, :, None])
    if GUIDE_MODE == 0:
        guided = attn
        if LEAN:  # A's rows sum to 1 up to rounding
            row_sum = tl.full([G, BLOCK_I, 1], 1.0, tl.float32)
        else:
            row_sum = tl.sum(attn, axis=2)[:, :, None]
    else:
        upsampled = _guide_tile(guide_ptr, b, y, x, head, frames, cols, row_valid & col_valid, h,
                                w, heads, scale_y, scale_x, F, GUIDE_MODE)
        # (1 - alpha) A + alpha U (reference.guided_map), exact at alpha = 0 and 1 (alpha A - A is
        # 0 at alpha = 1); written so, it takes the registers A + alpha (U - A) took (the product
        # form spilled 8 bytes under Triton 3.6, sm_90)
        guided = alpha * upsampled - (alpha * attn - attn)
        # rows whose guided sum is <= 0 or not finite keep A (the map op's rule, energies too)
        row_sum = tl.sum(guided, axis=2)[:, :, None]
        usable = (row_sum > 0.0) & (row_sum < float("inf"))  # false for NaN too
        guided = tl.where(usable, guided, attn)
        if LEAN:  # those rows are A's, whose sums are 1 up to rounding
            row_sum = tl.where(usable, row_sum, 1.0)
        else:
            row_sum = tl.where(usable, row_sum, tl.sum(attn, axis=2)[:, :, None])
    if BAND == 0:  # beta = 1: the band step is the identity and `high` goes unused
        high = guided
    elif BAND == 1:  # the full band, P = I - 1/F: remove the row mean
        if MEAN_FROM_ROW_SUM:
            # row_sum is rowsum(guided) bit for bit (the same reduction of the same values;
            # LEAN's rows that keep A take 1): no second reduction (4 fewer SHFL per tile with a
            # guide, sm_90). The energy pass's "rows" form keeps the second one: without it,
            # its stats variant spills under Triton 3.6 (d = 40, nearest guide).
            high = tl.where(col_valid, guided - row_sum / F, 0.0)
        else:
            high = tl.where(col_valid, guided - (tl.sum(guided, axis=2) / F)[:, :, None], 0.0)
    else:
        # one 2-D product for the G sequences: they share P
        band, band_low = load_band(band_ptr, F_PAD, SPLIT_BAND)
        high = band_product(tl.reshape(guided, (G * BLOCK_I, F_PAD)), band, band_low, SPLIT_BAND)
        high = tl.reshape(high, (G, BLOCK_I, F_PAD))
    return attn, guided, high, row_sum, row_valid


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, guide_ptr, band_ptr, beta_ptr, stash_ptr, out_ptr,
                      map_ptr, betas_at, sequences, q_sn, q_sf, k_sn, k_sf, v_sn, v_sf,
                      h, w, scale_y, scale_x, videos, scale_log2, alpha, beta0,
                      stash_first, stash_sequences, heads: tl.constexpr, H: tl.constexpr,
                      W: tl.constexpr, F: tl.constexpr, F_PAD: tl.constexpr, D: tl.constexpr,
                      BLOCK_D: tl.constexpr, G: tl.constexpr, BLOCK_I: tl.constexpr,
                      GUIDE_MODE: tl.constexpr, BAND: tl.constexpr, SPLIT_BAND: tl.constexpr,
                      PER_VIDEO: tl.constexpr, HAS_BETA: tl.constexpr, WITH_MAP: tl.constexpr,
                      STASH: tl.constexpr):
    """out = A3 @ v for BLOCK_I query frames of G sequences (grid axis 0: 2**31 - 1 programs,
    F_PAD // BLOCK_I per G sequences); beta from beta_ptr + betas_at if HAS_BETA (one per energy
    group, in the energy pass's workspace), else beta0; the plain map too if WITH_MAP.

    heads, H and W are compile-time constants (one compile per layer geometry), so the divisions
    that split a sequence into (b, y, x, head) become shifts or multiplications: 14-17% fewer
    SASS instructions per guided tile (sm_90). The energy pass keeps them at run time: as
    constants they left 8-16 bytes in local memory in some of its variants under Triton 3.6 and
    3.9. With STASH (never with WITH_MAP), a program whose G sequences all lie in the energy
    pass's stash (sequences stash_first to stash_first + stash_sequences - 1) reads their guided
    maps from it instead of recomputing them from q and k (`_stashed_probs`); the other
    programs run as without."""
    # sequence indices fit in int32 (`sequences` is an i32 argument); addresses are int64
    pid = tl.program_id(0)
    first = (pid // (F_PAD // BLOCK_I)) * G
    seq = first + tl.arange(0, G)
    seq_valid = seq < sequences
    frames = ((pid % (F_PAD // BLOCK_I)) * BLOCK_I + tl.arange(0, BLOCK_I))[None, :, None]
    n32, head, b, y, x = _position(seq, heads, H, W, 0, 0, 0, 0, BY_CONSTANTS)
    if HAS_BETA:  # b, the batch entry, picks the energy group
        group = b % videos if PER_VIDEO else b * 0
        beta = tl.load(beta_ptr + betas_at + group, mask=seq_valid[:, None, None], other=1.0)
    else:
        beta = beta0
    # row_valid computed once for both branches below, A3 converted once after them: fewer
    # values meet at their join, where Triton 3.6 spilled (sm_90, with the circulant stash)
    row_valid = seq_valid[:, None, None] & (frames < F)
    stashed = False
    if STASH:
        stashed = (first >= stash_first) & (first + G <= stash_first + stash_sequences)
    if stashed:
        probs = _stashed_probs(stash_ptr, seq - stash_first, row_valid, frames, beta, F, F_PAD,
                               BAND)
    else:
        attn, guided, high, row_sum, _ = _attention_tile(
            q_ptr, k_ptr, guide_ptr, band_ptr, n32, head, b, y, x, seq_valid, frames, heads, q_sn,
            q_sf, k_sn, k_sf, h, w, scale_y, scale_x, scale_log2, alpha, F, F_PAD, D, BLOCK_D, G,
            BLOCK_I, GUIDE_MODE, BAND, SPLIT_BAND, ATTENTION_PASS)
        if WITH_MAP:
            cols = tl.arange(0, F_PAD)[None, None, :]
            map_offsets = (seq.to(tl.int64)[:, None, None] * F + frames) * F + cols
            tl.store(map_ptr + map_offsets, attn.to(map_ptr.dtype.element_ty),
                     mask=row_valid & (cols < F))
        # divide by rowsum(A2), which equals rowsum(A3): the band term sums to 0
        row_sum = tl.where(row_valid, row_sum, 1.0)
        if BAND == 0:
            probs = guided * (1.0 / row_sum)
        else:  # padded columns meet zero rows of v
            probs = enhanced_rows(guided, high, beta, row_sum, F, BAND == 1)
    probs = to_element_type(probs, v_ptr)
    n = n32.to(tl.int64)
    keys = tl.arange(0, F_PAD)[None, :, None]
    dims = tl.arange(0, BLOCK_D)[None, None, :]
    key_valid = seq_valid[:, None, None] & (keys < F)
    v_rows = v_ptr + n * v_sn + keys * v_sf + head * D
    out_rows = out_ptr + (n * F + frames) * (heads * D) + head * D
    for start in range(0, D, BLOCK_D):
        v_chunk = tl.load(v_rows + start + dims, mask=key_valid & (start + dims < D), other=0.0)
        out_chunk = tl.dot(probs, v_chunk, input_precision="ieee")
        tl.store(out_rows + start + dims, to_element_type(out_chunk, out_ptr),
                 mask=row_valid & (start + dims < D))


@triton.jit
def _stashed_probs(stash_ptr, local, row_valid, frames, beta, F: tl.constexpr,
                   F_PAD: tl.constexpr, BAND: tl.constexpr):
    """A3 of query frames `frames` of G sequences (`local`: their indices in the stash; row_valid
    as `_attention_tile`'s) from the energy pass's stash (`_energy_kernel`'s STASH):
    A3 = base + beta * band_part, no band product and no row reduction. A circulant band's stash
    holds base and band_part per row; the full band's holds band_part alone (its base is 1/F).
    No division: the stashed rows are already divided by their sums.
    Only calls with a band step stash (BAND 1 or 2; `_launch_plan`).
    [G, BLOCK_I, F_PAD] fp32, zero in padded columns."""
    cols = tl.arange(0, F_PAD)[None, None, :]
    col_valid = cols < F
    entry_mask = row_valid & col_valid
    base_at, band_part_at = _stash_entries(stash_ptr, local.to(tl.int64)[:, None, None], frames,
                                           cols, F, BAND)
    if BAND == 2:
        base = tl.load(base_at, mask=entry_mask, other=0.0).to(tl.float32)
    else:  # the full band
        base = tl.where(col_valid, 1.0 / F, 0.0)
    band_part = tl.load(band_part_at, mask=entry_mask, other=0.0).to(tl.float32)
    return base + beta * band_part


@triton.jit
def _stash_entries(stash_ptr, sequence, frames, cols, F: tl.constexpr, BAND: tl.constexpr):
    """(base, band part): where the stash holds query frames `frames` of the stashed sequences
    `sequence` ([G, 1, 1] int64, in stash order). A circulant band (BAND 2) stores both, two
    (F, F) maps per sequence; the full band the band part alone (its base is 1/F), and the first
    pointer is unused. `_launch_plan` sizes the stash to match."""
    MAPS: tl.constexpr = 2 if BAND == 2 else 1
    base_at = stash_ptr + sequence * (MAPS * F * F) + frames * F + cols
    return base_at, base_at + (MAPS - 1) * F * F


@triton.jit
def _energy_kernel(q_ptr, k_ptr, guide_ptr, band_ptr, partials_ptr, stash_ptr,
                   sequences_per_entry, first_entry, steps, heads, q_sn, q_sf, k_sn, k_sf, H, W, h,
                   w, scale_y, scale_x, scale_log2, alpha, W_magic, W_shift, H_magic, H_shift,
                   F: tl.constexpr, F_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   G: tl.constexpr, BLOCK_I: tl.constexpr, GUIDE_MODE: tl.constexpr,
                   BAND: tl.constexpr, SPLIT_BAND: tl.constexpr, FIELDS: tl.constexpr,
                   FORM: tl.constexpr, STASH: tl.constexpr):
    """Energy sums of `steps` consecutive tiles (BLOCK_I query frames of G sequences each) of
    video program_id(1) of the energy part, into this program's own slot
    (program_id(1) * num_programs(0) + program_id(0)) of `partials`: sum|A|^2, sum|A2|^2,
    sum<A2, A2 P>, and if FIELDS == 6 (stats asked for) the three over s^2 that E3 needs.

    FORM (`ENERGY_FORMS`, `TileConfig.energy_form`): 0 "rows" runs the attention pass's tile and
    sums each tile's products per row into [G, BLOCK_I, 1] accumulators (three row reductions
    per tile with a guide, two without, one more with stats). 1 "lean" drops the row
    reductions that only the attention pass needs (`_attention_tile` with LEAN: no second sum
    of A for the rows that keep it, no second row sum for the full band's mean). 2 "tile" is
    "lean" with [G, BLOCK_I, F_PAD] fp32 accumulators: a tile's products are added entry by
    entry (rows of padding are zero in the lean tile, so no mask either) and reduced once per
    program, so the only row reductions left per tile are the softmax's two and, with a guide,
    rowsum(A2); its accumulators hold 3 x 8 more values per thread on 8 sequences on 8 warps at
    F_PAD = 16 (14-36 more registers on sm_90, docs/DESIGN.md section 8). With stats, whose E3
    terms need 1/s^2 per row anyway, "tile" sums per row as "lean" does. Every form sums in a
    fixed order, so the result is bit-identical run to run; the forms agree within fp32
    rounding, not bit for bit. All are untimed on a GPU except "rows" (the default).

    STASH (`TileConfig.stash_guided`): each tile's guided map also goes to `stash`, per sequence
    of the energy part in sequence order, for the attention pass to read (`_stashed_probs`)
    instead of recomputing it from q and k: A3 = base + beta * band_part with base =
    (A2 - A2 P) / s and band_part = A2 P / s (s = rowsum(A2)), so beta scales only the rounding
    of the band part, which A3 holds beta times. With a circulant band both are stored, two
    (F, F) maps per sequence; with the full band base is 1/F (A2 P = A2 - rowsum(A2) / F) and
    band_part alone is stored, which is also the guided map's deviation from uniform (small,
    with its rounding, on near-uniform rows). float16 (saturating) for 2-byte inputs, float32
    for float32 inputs (`_launch_plan`)."""
    DIVIDE: tl.constexpr = BY_MAGIC_NUMBERS if GUIDE_MODE == 1 else BY_RUNTIME_DIVISIONS
    video = tl.program_id(1)
    first_tile = tl.program_id(0) * steps
    # "tile" sums per entry; with stats, whose E3 terms are per-row sums anyway, as "lean"
    PER_ENTRY: tl.constexpr = FORM == 2 and FIELDS == 3
    plain = _accumulator(G, BLOCK_I, F_PAD, PER_ENTRY)
    guided_sum = _accumulator(G, BLOCK_I, F_PAD, PER_ENTRY)
    high_sum = _accumulator(G, BLOCK_I, F_PAD, PER_ENTRY)
    guided_e3 = tl.zeros([G, BLOCK_I, 1], dtype=tl.float32)
    cross_e3 = tl.zeros([G, BLOCK_I, 1], dtype=tl.float32)
    high_e3 = tl.zeros([G, BLOCK_I, 1], dtype=tl.float32)
    for step in range(steps):
        tile = first_tile + step  # tiles past the last sequence are masked (seq_valid)
        local = (tile // (F_PAD // BLOCK_I)) * G + tl.arange(0, G)
        seq_valid = local < sequences_per_entry
        seq = (first_entry + video) * sequences_per_entry + local
        frames = ((tile % (F_PAD // BLOCK_I)) * BLOCK_I + tl.arange(0, BLOCK_I))[None, :, None]
        # magic numbers with the nearest guide only: with the bilinear one three looping
        # variants spilled under Triton 3.6 (80 registers), and without a guide (b, y, x unused)
        # the form change alone left three variants spills
        n32, head, b, y, x = _position(seq, heads, H, W, W_magic, W_shift, H_magic, H_shift,
                                       DIVIDE)
        attn, guided, high, row_sum, row_valid = _attention_tile(
            q_ptr, k_ptr, guide_ptr, band_ptr, n32, head, b, y, x, seq_valid, frames, heads, q_sn,
            q_sf, k_sn, k_sf, h, w, scale_y, scale_x, scale_log2, alpha, F, F_PAD, D, BLOCK_D, G,
            BLOCK_I, GUIDE_MODE, BAND, SPLIT_BAND, FORM)
        if STASH:  # one reciprocal per row, not a division per entry
            cols = tl.arange(0, F_PAD)[None, None, :]
            stash_mask = row_valid & (cols < F)
            stashed_seq = (video * sequences_per_entry + local).to(tl.int64)[:, None, None]
            inverse_sum = 1.0 / tl.where(row_valid, row_sum, 1.0)
            base_at, band_part_at = _stash_entries(stash_ptr, stashed_seq, frames, cols, F, BAND)
            if BAND == 2:  # the full band's base is 1/F exactly: not stored
                tl.store(base_at, to_element_type((guided - high) * inverse_sum, stash_ptr),
                         mask=stash_mask)
            tl.store(band_part_at, to_element_type(high * inverse_sum, stash_ptr), mask=stash_mask)
        if PER_ENTRY:  # rows of padding are zero in attn and guided
            guided_sum += guided * guided
            high_sum += guided * high
            if GUIDE_MODE != 0:  # else A2 = A: E1 = E2
                plain += attn * attn
        else:
            guided_rows = tl.sum(guided * guided, axis=2)[:, :, None]
            cross_rows = tl.sum(guided * high, axis=2)[:, :, None]
            if GUIDE_MODE == 0:  # A2 = A: E1 = E2
                plain += tl.where(row_valid, guided_rows, 0.0)
            else:
                plain += tl.where(row_valid, tl.sum(attn * attn, axis=2)[:, :, None], 0.0)
            guided_sum += tl.where(row_valid, guided_rows, 0.0)
            high_sum += tl.where(row_valid, cross_rows, 0.0)
        if FIELDS == 6:  # E3 is the energy of A3 / s, s = rowsum(A2) (A2 @ P sums to 0)
            inv_square = 1.0 / tl.where(row_valid, row_sum, 1.0)
            inv_square = inv_square * inv_square
            guided_e3 += tl.where(row_valid, guided_rows * inv_square, 0.0)
            cross_e3 += tl.where(row_valid, cross_rows * inv_square, 0.0)
            high_rows = tl.sum(high * high, axis=2)[:, :, None]
            high_e3 += tl.where(row_valid, high_rows * inv_square, 0.0)
    if PER_ENTRY:
        if GUIDE_MODE == 0:  # E1 = E2: one accumulator
            plain = guided_sum
    slot = partials_ptr + (video * tl.num_programs(0) + tl.program_id(0)).to(tl.int64) * FIELDS
    tl.store(slot + 0, _tile_sum(plain))
    tl.store(slot + 1, _tile_sum(guided_sum))
    tl.store(slot + 2, _tile_sum(high_sum))
    if FIELDS == 6:
        tl.store(slot + 3, _tile_sum(guided_e3))
        tl.store(slot + 4, _tile_sum(cross_e3))
        tl.store(slot + 5, _tile_sum(high_e3))


@triton.jit
def _accumulator(G: tl.constexpr, BLOCK_I: tl.constexpr, F_PAD: tl.constexpr,
                 PER_ENTRY: tl.constexpr):
    """fp32 zeros to sum into: one per entry of a [G, BLOCK_I, F_PAD] tile, else one per row."""
    if PER_ENTRY:
        block = tl.zeros([G, BLOCK_I, F_PAD], dtype=tl.float32)
    else:
        block = tl.zeros([G, BLOCK_I, 1], dtype=tl.float32)
    return block


@triton.jit
def _tile_sum(block):
    return tl.sum(tl.sum(tl.sum(block, axis=2), axis=1), axis=0)


@triton.jit
def _beta_kernel(partials_ptr, stats_ptr, betas_at, groups, slots_per_group, rows_per_group,
                 beta0, beta_max, high_energy_floor, BLOCK: tl.constexpr, ADAPTIVE: tl.constexpr,
                 HAS_BETA_MAX: tl.constexpr, WRITE_STATS: tl.constexpr, FIELDS: tl.constexpr):
    """One program: per energy group, sum its slots in a fixed order (fp64), then beta (the map
    op's rule) into the betas at partials_ptr + betas_at (the same workspace) and, if WRITE_STATS,
    the stats row (beta, E1, E2, E2_low, E2_high, E3)."""
    lanes = tl.arange(0, BLOCK)[:, None]
    fields = tl.arange(0, 8)[None, :]
    count = tl.maximum(rows_per_group, 1.0)
    for group in range(groups):
        totals = tl.zeros([BLOCK, 8], dtype=tl.float64)
        first = group * slots_per_group
        for start in range(0, slots_per_group, BLOCK):
            mask = (start + lanes < slots_per_group) & (fields < FIELDS)
            totals += tl.load(partials_ptr + (first + start + lanes) * FIELDS + fields, mask=mask,
                              other=0.0).to(tl.float64)
        sums = tl.sum(totals, axis=0)
        field = tl.arange(0, 8)
        e1 = tl.sum(tl.where(field == 0, sums, 0.0)) / count
        e2 = tl.sum(tl.where(field == 1, sums, 0.0)) / count
        e2_high = tl.sum(tl.where(field == 2, sums, 0.0)) / count
        beta = group_beta(e1, e2, e2_high, beta0, beta_max, high_energy_floor, ADAPTIVE, HAS_BETA_MAX)
        tl.store(partials_ptr + betas_at + group, beta)
        if WRITE_STATS:
            store_stats_row(stats_ptr, group, beta, e1, e2, e2_high,
                            tl.sum(tl.where(field == 3, sums, 0.0)),
                            tl.sum(tl.where(field == 4, sums, 0.0)),
                            tl.sum(tl.where(field == 5, sums, 0.0)), count)


def _check_device(q: torch.Tensor) -> None:
    if not q.is_cuda and not triton_interpreter():
        raise RuntimeError(
            f"the fused temporal attention kernel needs CUDA tensors (got {q.device}); on CPU it "
            "runs only under the Triton interpreter (TRITON_INTERPRET=1 set before importing "
            "bytheway_kernels)"
        )


def _magic_numbers(**divisors: int) -> dict:
    """The energy pass's `NAME_magic` and `NAME_shift` for each divisor (`_position`)."""
    numbers = {}
    for name, divisor in divisors.items():
        numbers[f"{name}_magic"], numbers[f"{name}_shift"] = magic_quotient_constants(divisor)
    return numbers


def _launch_options(tile: TileConfig) -> dict:
    """Triton's launch options for a tile configuration: warps, and the register cap if set."""
    if tile.max_registers is None:
        return dict(num_warps=tile.num_warps)
    return dict(num_warps=tile.num_warps, maxnreg=tile.max_registers)


class _LaunchPlan(NamedTuple):
    """Everything about the launches but this call's tensors: shapes, strides and settings. (The
    launches' `values` hold tensors only: each scalar there would cost the direct launcher's
    signature ~0.1 us per call.)"""

    band: Optional[torch.Tensor]  # the circulant P on the device, None for the full band
    placeholder: torch.Tensor  # a float32 pointer for the beta argument when beta is fixed
    attention_grid: tuple
    attention_constants: dict  # geometry and constexprs of `_attention_kernel`
    energy_grid: Optional[tuple]  # None: no energy pass; (programs, videos), videos 0 if B = 0
    energy_constants: dict
    workspace_size: int  # float32 elements: the energy partials, then one beta per energy group
    beta_constants: dict
    stash_size: int  # elements of the energy pass's stash of guided maps, 0 without one
    stash_dtype: torch.dtype


@functools.lru_cache(maxsize=256)
def _launch_plan(frames: int, head_dim: int, heads: int, height: int, width: int, batch: int,
                 tau: int, guide_mode: int, guide_size: tuple, scale: float, identity_band: bool,
                 with_sums: bool, params_key: tuple, with_stats: bool, element_size: int,
                 device: torch.device, config: Optional[TileConfig],
                 energy_config: Optional[TileConfig], band_setting: str, strides: tuple,
                 alpha: float, beta: float, beta_max: float, with_map: bool) -> _LaunchPlan:
    """The launch plan of one call signature, built once (its device tensors before any CUDA graph
    capture, on the first eager call) and reused: the per-call host work is binding pointers."""
    adaptive_beta, parts, energy_part, per_video, has_beta_max = params_key
    padded = padded_frames(frames)
    tile = config or default_config(frames, head_dim, element_size, with_map and guide_mode != 0)
    full_band = is_full_band(frames, tau)
    split = triton_rules.split_band(band_setting, padded, fused=True) and not full_band
    band = None if full_band else band_operand(frames, tau, padded, device, split)
    h, w = guide_size
    geometry = dict(heads=heads, H=height, W=width, h=h, w=w, scale_y=h / height,
                    scale_x=w / width, scale_log2=scale * math.log2(math.e))
    band_mode = BAND_MODES["full" if full_band else "circulant"]
    frame_blocks = padded // QUERY_BLOCK
    sequences = batch * height * width * heads
    videos = batch // parts
    q_sn, q_sf, k_sn, k_sf, v_sn, v_sf = strides
    qk_strides = dict(q_sn=q_sn, q_sf=q_sf, k_sn=k_sn, k_sf=k_sf)
    attention_constants = dict(
        geometry, **qk_strides, v_sn=v_sn, v_sf=v_sf, alpha=alpha, beta0=beta, WITH_MAP=with_map,
        sequences=sequences, videos=max(videos, 1), F=frames, F_PAD=padded, D=head_dim,
        BLOCK_D=tile.block_d, G=tile.sequences, BLOCK_I=QUERY_BLOCK, GUIDE_MODE=guide_mode,
        BAND=BAND_MODES["none"] if identity_band else band_mode,
        SPLIT_BAND=split and not identity_band,
        PER_VIDEO=per_video,
        HAS_BETA=adaptive_beta, **_launch_options(tile))
    energy_grid, energy_constants, beta_constants, workspace_size, betas_at = None, {}, {}, 0, 0
    stash, stash_first, stash_sequences = False, 0, 0
    if with_sums:
        energy_tile = energy_config or default_energy_config(frames, head_dim, element_size)
        # the anchor's plain map needs A, which the stash does not hold; fixed beta = 1 (stats
        # only) has no band step, for which the stash keeps no form
        stash = energy_tile.stash_guided and not with_map and not identity_band
        fields = SUM_FIELDS_WITH_STATS if with_stats else SUM_FIELDS
        sequences_per_entry = height * width * heads
        tiles = triton.cdiv(sequences_per_entry, energy_tile.sequences) * frame_blocks
        steps = triton.cdiv(tiles, ENERGY_PROGRAMS) if tiles else 1
        programs = triton.cdiv(tiles, steps)
        energy_grid = (programs, videos)
        energy_constants = dict(
            geometry, **qk_strides, **_magic_numbers(W=width, H=height), alpha=alpha,
            sequences_per_entry=sequences_per_entry, first_entry=energy_part * videos,
            steps=steps, F=frames, F_PAD=padded, D=head_dim, BLOCK_D=energy_tile.block_d,
            G=energy_tile.sequences, BLOCK_I=QUERY_BLOCK, GUIDE_MODE=guide_mode, BAND=band_mode,
            SPLIT_BAND=split, FIELDS=fields, FORM=ENERGY_FORMS[energy_tile.energy_form],
            STASH=stash, num_stages=ENERGY_NUM_STAGES, **_launch_options(energy_tile))
        if stash:  # the energy part's sequences, in order
            stash_sequences = videos * sequences_per_entry
            stash_first = energy_part * stash_sequences
        # one buffer per call (one allocation): the partials, then the betas (never a null pointer)
        betas_at = programs * videos * fields
        groups = videos if per_video else 1
        workspace_size = betas_at + max(groups, 1)
        beta_constants = dict(
            groups=groups, betas_at=betas_at, beta0=beta, beta_max=beta_max,
            slots_per_group=programs * (1 if per_video else videos),
            rows_per_group=float(sequences_per_entry * frames * (1 if per_video else videos)),
            high_energy_floor=HIGH_ENERGY_FLOOR, BLOCK=REDUCE_BLOCK, ADAPTIVE=adaptive_beta,
            HAS_BETA_MAX=has_beta_max, WRITE_STATS=with_stats, FIELDS=fields,
            num_warps=BETA_NUM_WARPS)
    attention_constants.update(betas_at=betas_at, STASH=stash, stash_first=stash_first,
                               stash_sequences=stash_sequences)
    if stash and padded == 32 and not full_band and tile.max_registers is None:
        attention_constants["maxnreg"] = STASHED_CIRCULANT_MAX_REGISTERS
    return _LaunchPlan(
        band, torch.empty((1,), dtype=torch.float32, device=device),
        (triton.cdiv(sequences, tile.sequences) * frame_blocks,), attention_constants,
        energy_grid, energy_constants, workspace_size, beta_constants,
        stash_sequences * frames * frames * (1 if full_band else 2),  # maps: `_stash_entries`
        torch.float16 if element_size <= 2 else torch.float32)


def kernel_launches(q, k, v, guide, heads: int, height: int, width: int, scale: float,
                    params: ByTheWayParams, out: torch.Tensor,
                    plain_map: Optional[torch.Tensor] = None, stats: Optional[torch.Tensor] = None,
                    config: Optional[TileConfig] = None,
                    energy_config: Optional[TileConfig] = None) -> list:
    """The launches that write `out` (and `plain_map`, `stats` when given), in order.

    Fixed beta without stats: `_attention_kernel` alone. Otherwise `_energy_kernel` (skipped for
    an empty batch), `_beta_kernel`, then `_attention_kernel` (skipped when there are no rows).
    """
    alpha, beta, tau, adaptive_beta, parts, energy_part, energy_scope, guide_upsample, beta_max = params
    sequences_total, frames, channels = q.shape
    # alpha = 0 makes guided = attn exactly, so the guide need not be read at all
    guide_mode = GUIDE_MODES[None if guide is None or alpha == 0 else guide_upsample]
    if guide_mode == 0:
        guide, guide_size = q, (height, width)  # an unused pointer
    else:
        guide, guide_size = guide.contiguous(), (guide.shape[1], guide.shape[2])
    with_sums = adaptive_beta or stats is not None
    plan = _launch_plan(
        frames, channels // heads, heads, height, width, sequences_total // (height * width), tau,
        guide_mode, guide_size, scale, beta == 1.0 and not adaptive_beta, with_sums,
        (adaptive_beta, parts, energy_part, energy_scope == "sample", beta_max is not None),
        stats is not None, q.element_size(), q.device, config, energy_config, triton_rules.BAND_PRODUCT,
        q.stride()[:2] + k.stride()[:2] + v.stride()[:2], alpha, beta,
        beta if beta_max is None else beta_max, plain_map is not None)
    band = q if plan.band is None else plan.band
    betas = stash = plan.placeholder
    launches = []
    if with_sums:
        # one allocation, passed whole (a view of it would cost ~1 us of host time per call)
        betas = workspace = torch.empty((plan.workspace_size,), dtype=torch.float32, device=q.device)
        if plan.stash_size:
            stash = torch.empty((plan.stash_size,), dtype=plan.stash_dtype, device=q.device)
        if plan.energy_grid[1] > 0:
            launches.append(KernelLaunch(_energy_kernel, plan.energy_grid, plan.energy_constants, dict(
                q_ptr=q, k_ptr=k, guide_ptr=guide, band_ptr=band, partials_ptr=workspace,
                stash_ptr=stash)))
        launches.append(KernelLaunch(_beta_kernel, (1,), plan.beta_constants, dict(
            partials_ptr=workspace, stats_ptr=workspace if stats is None else stats)))
    if plan.attention_grid[0] > 0:
        launches.append(KernelLaunch(_attention_kernel, plan.attention_grid, plan.attention_constants, dict(
            q_ptr=q, k_ptr=k, v_ptr=v, guide_ptr=guide, band_ptr=band, beta_ptr=betas,
            stash_ptr=stash, out_ptr=out, map_ptr=out if plain_map is None else plain_map)))
    return launches


def temporal_attention_triton_out(q, k, v, guide, heads: int, height: int, width: int,
                                  scale: float, params: ByTheWayParams, out: torch.Tensor,
                                  plain_map: Optional[torch.Tensor] = None,
                                  stats: Optional[torch.Tensor] = None,
                                  config: Optional[TileConfig] = None,
                                  energy_config: Optional[TileConfig] = None) -> None:
    """Launch the fused kernels writing into `out` (contiguous, q's shape and dtype), `plain_map`
    ((B, H, W, heads, F, F) contiguous) and `stats` ((rows, 6) float32) when given.

    Launch counts: see `kernel_launches`. `config` and `energy_config` override the tile shapes of
    the attention and energy passes (`default_config`, `default_energy_config`), for tuning.
    """
    _check_device(q)
    run_on_device_of(q, kernel_launches(q, k, v, guide, heads, height, width, scale, params, out,
                                        plain_map, stats, config, energy_config))


def temporal_attention_triton(q, k, v, guide, heads: int, height: int, width: int, scale: float,
                              params: ByTheWayParams, with_map: bool, with_stats: bool):
    """(out, map, stats) as `torch.ops.bytheway.temporal_attention` returns them, except that the
    map and the stats are None unless asked for."""
    sequences, frames, channels = q.shape
    batch = sequences // (height * width)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # ~1 us less than new_empty
    plain_map = q.new_empty((batch, height, width, heads, frames, frames)) if with_map else None
    stats = None
    if with_stats:
        stats = params.empty_stats(q, batch)
    temporal_attention_triton_out(q, k, v, guide, heads, height, width, scale, params, out,
                                  plain_map, stats)
    return out, plain_map, stats
