"""Triton pieces that both ops' kernels share, so that each rule is written once:
torch.nn.functional.interpolate's source indices for the guide upsampling, and the beta rule with
the stats row (the map op's `bytheway_kernels.energy` contract, as the C++ kernel and the
reference follow it)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def nearest_source(dst, scale, size):
    """Nearest source index of output index `dst` along one axis: min(floor(dst * in / out),
    in - 1), with `scale` = in / out in fp32 as torch computes it."""
    return tl.minimum((dst.to(tl.float32) * scale).to(tl.int32), size - 1)


@triton.jit
def bilinear_sources(dst, scale, size):
    """(first, second, weight of second) of output index `dst` along one axis, bilinear with
    align_corners=False: src = max((dst + 0.5) * in / out - 0.5, 0)."""
    source = tl.maximum((dst.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    first = source.to(tl.int32)
    second = first + (first < size - 1).to(tl.int32)
    return first, second, source - first.to(tl.float32)


@triton.jit
def group_beta(e1, e2, e2_high, beta0, beta_max, high_energy_floor, ADAPTIVE: tl.constexpr,
               HAS_BETA_MAX: tl.constexpr):
    """Beta of one energy group (fp32) from its fp64 mean energies: beta0, or if ADAPTIVE
    max(beta0, sqrt((E1 - E2_low) / E2_high)) where E2_high is above the floor, capped by beta_max."""
    zero = tl.zeros((), dtype=tl.float64)  # scalar arguments arrive as fp32: widen them
    beta = zero + beta0
    if ADAPTIVE:
        has_high = e2_high > high_energy_floor * e2
        ratio = tl.maximum(e1 - (e2 - e2_high), 0.0) / tl.where(has_high, e2_high, 1.0)
        beta = tl.where(has_high, tl.maximum(beta, tl.sqrt(ratio)), beta)
        if HAS_BETA_MAX:
            beta = tl.minimum(beta, zero + beta_max)
    return beta.to(tl.float32)


@triton.jit
def store_stats_row(stats_ptr, group, beta, e1, e2, e2_high, e3_guided, e3_cross, e3_high, count):
    """The stats row (beta, E1, E2, E2_low, E2_high, E3) of one energy group; E3 is
    (e3_guided + 2 g e3_cross + g^2 e3_high) / count with g = beta - 1 (fp64 sums)."""
    gain = beta.to(tl.float64) - 1.0
    e3 = (e3_guided + 2.0 * gain * e3_cross + gain * gain * e3_high) / count
    row = stats_ptr + group * 6
    tl.store(row + 0, beta)
    tl.store(row + 1, e1.to(tl.float32))
    tl.store(row + 2, e2.to(tl.float32))
    tl.store(row + 3, (e2 - e2_high).to(tl.float32))
    tl.store(row + 4, e2_high.to(tl.float32))
    tl.store(row + 5, e3.to(tl.float32))
