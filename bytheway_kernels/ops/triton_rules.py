"""Triton pieces that both ops' kernels share, so that each rule is written once:
torch.nn.functional.interpolate's source indices for the guide upsampling, the beta rule with
the stats row (the map op's `bytheway_kernels.energy` contract, as the C++ kernel and the
reference follow it), the band step's product with the circulant P (or with its rank-one
terms), the stores' float16 saturation, and quotients by run-time divisors through magic
numbers."""

from __future__ import annotations

import triton
import triton.language as tl

from .._environ import choice_setting

BAND_PRODUCT_ENV = "BYTHEWAY_BAND_PRODUCT"
BAND_PRODUCTS = ("auto", "fma", "tensor-cores", "rank-one")  # the default first


def _band_product_setting() -> str:
    return choice_setting(BAND_PRODUCT_ENV, BAND_PRODUCTS, BAND_PRODUCTS[0])


#: How a circulant band step multiplies by P (BYTHEWAY_BAND_PRODUCT, read at import): "fma", one
#: exact fp32 dot on the FMA units (`band_product`); "tensor-cores", three tf32 products on tensor
#: cores (`band_product`); "rank-one", P's rank-one terms (`rank_one_band_product`, the map op
#: only: the fused kernels then make their automatic choice); "auto" (the default), each kernel's
#: choice (`split_band`, `rank_one_band`). The full band never multiplies by P. Both ops read it
#: here when they look up a call's launch plan (it is part of the plan's key), so
#: `bytheway_kernels.testing.band_product` switches it for both by setting it here.
BAND_PRODUCT = _band_product_setting()

#: F_PAD at which the fused temporal attention kernels split the band product by default. On an
#: H200 (Triton 3.6, fp16, d = 80 at up_blocks.2's size, per-kernel device time;
#: benchmarks/RESULTS.md) the split took 0.93x the fp32 dot's time with fixed beta and 0.89x with
#: adaptive beta at F = 24 and 32, but 1.40x at F = 64 (8 warps); in the map op it was 1.13-1.22x
#: the dot's at F = 24 and 32, so the map op never splits by default.
FUSED_SPLIT_PADDINGS = (32,)

#: The map op takes the rank-one terms by default where F is a multiple of this. Compiled for
#: sm_90 as tests/test_triton_sm90.py compiles (fp16 scores, fixed beta, Triton 3.9), its apply
#: kernel then holds 43-54 registers where the fp32 dot's operand layouts held 95-165 at F = 8-32
#: (3 programs per SM at F = 24 and 32, where its fixed beta measured 1.63-1.75x softmax's time on
#: an H200), with 2-46% fewer SASS instructions at F = 8, 12, 16, 20, 24, 32, 40, 48, 64.
#: Where F is not a multiple of 4 the rows load unvectorised and the terms' row sums cost more
#: than the dot (F = 7, 14, 15, 30, 31, 63: 0-80% more instructions), so the dot stays there.
#: Not yet timed on a GPU (benchmarks/map_op_kernel_times.py times both).
RANK_ONE_FRAME_MULTIPLE = 4


def split_band(setting: str, padded_frames: int, fused: bool) -> bool:
    """Whether a kernel at `padded_frames` (F_PAD) splits a circulant band product on tensor
    cores, for a `BAND_PRODUCT` setting ("auto": `FUSED_SPLIT_PADDINGS` in the fused kernels, never
    in the map op; "rank-one" in the fused kernels: as "auto")."""
    if setting == "auto" or (setting == "rank-one" and fused):
        return fused and padded_frames in FUSED_SPLIT_PADDINGS
    return setting == "tensor-cores"


def rank_one_band(setting: str, frames: int) -> bool:
    """Whether the map op (the fused kernels have no such form) takes a circulant band product as
    P's rank-one terms, for a `BAND_PRODUCT` setting ("auto": where F is a multiple of
    `RANK_ONE_FRAME_MULTIPLE`)."""
    if setting == "auto":
        return frames % RANK_ONE_FRAME_MULTIPLE == 0
    return setting == "rank-one"


#: log2(e): the kernels take exp(x) as exp2(x * LOG2E), since tl.exp2 lowers to the flush-to-zero
#: ex2.approx.ftz.f32 (one MUFU.EX2) where tl.exp's ex2.approx.f32 adds a denormal fix-up of three
#: instructions per element on sm_90 (Triton 3.6 and 3.9). Softmax numerators below 2^-126 of the
#: row's largest (which is 1) flush to zero, a change far below fp32 rounding of the row sum.
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def to_element_type(values, ptr):
    """`values` in the element dtype of `ptr`; float16 saturates at +-65504 instead of overflowing
    to inf, and NaN stays NaN (the map op's rule for float16 outputs, as its reference rounds).

    tl.clamp with NaN propagation and symmetric bounds compiles to one min.NaN.xorsign.abs per
    element on sm_90, where the two-sided tl.where took three instructions."""
    if ptr.dtype.element_ty == tl.float16:
        values = tl.clamp(values, -65504.0, 65504.0, propagate_nan=tl.PropagateNan.ALL)
    return values.to(ptr.dtype.element_ty)


def magic_quotient_constants(divisor: int) -> tuple:
    """(magic, shift) such that n // divisor == umulhi(2 n, magic) >> shift for every
    0 <= n < 2**31, in uint32 (`magic_quotient`): with l = ceil(log2(divisor)),
    magic = ceil(2**(31 + l) / divisor) < 2**32 and shift = l, so that the quotient is
    (n * magic) >> (31 + l). Exact: magic * divisor = 2**(31 + l) + e with 0 <= e < divisor, so
    n * magic / 2**(31 + l) exceeds n / divisor by n * e / (divisor * 2**(31 + l)) < 2**-l
    <= 1 / divisor, too little to reach the next integer."""
    if not 1 <= divisor < 2 ** 31:
        raise ValueError(f"divisor must be in [1, 2**31), got {divisor}")
    shift = (divisor - 1).bit_length()
    return -(-(1 << (31 + shift)) // divisor), shift


@triton.jit
def magic_quotient(n, magic, shift):
    """n // divisor for int32 0 <= n < 2**31, with (magic, shift) from `magic_quotient_constants`:
    a 32-bit high multiply and a shift (IMAD.HI.U32, SHF on sm_90), where a division by a run-time
    int32 takes ~18 instructions."""
    doubled = n.to(tl.uint32, bitcast=True) * 2  # < 2**32: no wrap
    return (tl.umulhi(doubled, magic.to(tl.uint32)) >> shift).to(tl.int32, bitcast=True)


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


@triton.jit
def enhanced_rows(guided, high, beta, row_sum, F: tl.constexpr, FULL_BAND: tl.constexpr):
    """A3 = (A2 + (beta - 1) A2 P) / s, s = rowsum(A2) (broadcastable against `guided`; the band
    term sums to 0, so s is also A3's row sum): one reciprocal per row, not a division per entry.
    The full band's A2 P is A2 - s / F, so there A3 is one FMA per entry, A2 (beta / s) -
    (beta - 1) / F (`high` unused; padded columns get the constant, callers mask them)."""
    if FULL_BAND:
        return guided * (beta / row_sum) - (beta - 1.0) / F
    return (guided + (beta - 1.0) * high) * (1.0 / row_sum)


@triton.jit
def tf32_round(values):
    """`values` rounded to the nearest tf32 number (10 stored mantissa bits; ties away from zero),
    as fp32: a tensor core multiplies such numbers exactly, and so does the interpreter's fp32
    matmul, so both run the same arithmetic. Infinities and quiet NaNs stay what they are; a
    finite value within half a tf32 step of the largest float (|x| >= 3.4020e38) rounds to
    infinity, far from anything a guided map holds."""
    bits = values.to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)


@triton.jit
def load_band(band_ptr, F_PAD: tl.constexpr, SPLIT: tl.constexpr):
    """(P, P's low part) as `band_product` takes them, from P as `band.band_operand` lays it out:
    with SPLIT, P's tf32 high part then its low part; else the fp32 matrix (returned twice).
    Load it before reshaping the values: the other order spilled under Triton 3.6 (F_PAD = 64)."""
    cols = tl.arange(0, F_PAD)
    offsets = cols[:, None] * F_PAD + cols[None, :]
    band = tl.load(band_ptr + offsets)
    band_low = band
    if SPLIT:
        band_low = tl.load(band_ptr + F_PAD * F_PAD + offsets)
    return band, band_low


@triton.jit
def band_product(values, band, band_low, SPLIT: tl.constexpr):
    """values @ P in fp32, (band, band_low) from `load_band`. SPLIT: on tensor cores, as three
    tf32 products of the split values = high + low (both tf32) with P = band + band_low (both
    tf32, split on the host): high @ P_low + low @ P_high + high @ P_high, accumulated in fp32
    (the dropped low @ P_low is ~2^-22 of the product). Otherwise one exact fp32 dot, which runs
    on the FMA units."""
    if SPLIT:
        high = tf32_round(values)
        low = tf32_round(values - high)
        product = tl.dot(high, band_low, input_precision="tf32")
        product = tl.dot(low, band, product, input_precision="tf32")
        return tl.dot(high, band, product, input_precision="tf32")
    else:
        return tl.dot(values, band, input_precision="ieee")


@triton.jit
def rank_one_band_product(values, terms_ptr, F_PAD: tl.constexpr, RANK: tl.constexpr,
                          COMPLEMENT: tl.constexpr):
    """values @ P in fp32 as RANK rank-one terms (`band.band_rank_one_terms`): for each row
    vector v_k of P's terms (or of I - P's, COMPLEMENT), one dot product per row and one scaled
    addition, all on the rows' own layout: no operand layouts for a dot product, and RANK (at
    most F / 2 + 1) terms in place of F_PAD multiply-adds per entry."""
    cols = tl.arange(0, F_PAD)
    product = tl.zeros_like(values)
    for k in tl.static_range(RANK):
        vector = tl.load(terms_ptr + k * F_PAD + cols)[None, :]
        product += tl.sum(values * vector, axis=1)[:, None] * vector
    if COMPLEMENT:
        product = values - product
    return product


@triton.jit
def rank_one_band_energy(values, terms_ptr, F_PAD: tl.constexpr, RANK: tl.constexpr):
    """Per row, the sum over P's RANK rank-one terms (`band.band_rank_one_terms`) of
    (values . v_k)^2: <values, values @ sum_k v_k^T v_k> without forming the product (one dot
    product per row and term, no scaled additions)."""
    cols = tl.arange(0, F_PAD)
    energy = tl.zeros((values.shape[0],), dtype=tl.float32)
    for k in tl.static_range(RANK):
        vector = tl.load(terms_ptr + k * F_PAD + cols)[None, :]
        coefficient = tl.sum(values * vector, axis=1)
        energy += coefficient * coefficient
    return energy
