"""Triton pieces that both ops' kernels share, so that each rule is written once:
torch.nn.functional.interpolate's source indices for the guide upsampling, the beta rule with
the stats row (the map op's `bytheway_kernels.energy` contract, as the C++ kernel and the
reference follow it), the band step's product with the circulant P (or with its rank-one
terms), the stores' float16 saturation, and quotients by run-time divisors through magic
numbers."""

from __future__ import annotations

import math

import triton
import triton.language as tl

from .._environ import choice_setting
from ..band import frequency_eigenvalue, rank_one_complement

BAND_PRODUCT_ENV = "BYTHEWAY_BAND_PRODUCT"
BAND_PRODUCTS = ("auto", "fma", "tensor-cores", "rank-one", "frequencies")  # the default first


def _band_product_setting() -> str:
    return choice_setting(BAND_PRODUCT_ENV, BAND_PRODUCTS, BAND_PRODUCTS[0])


#: How a circulant band step multiplies by P (BYTHEWAY_BAND_PRODUCT, read at import): "fma", one
#: exact fp32 dot on the FMA units (`band_product`); "tensor-cores", three tf32 products on tensor
#: cores (`band_product`); "rank-one", P's rank-one terms on tiles (`rank_one_band_product`, the map
#: op only); "frequencies", the band's frequencies with one row per thread
#: (`thread_row_band_product`, the map op only, where F is a multiple of
#: `THREAD_ROW_FRAME_MULTIPLE` up to `THREAD_ROW_MAX_FRAMES`; elsewhere as "auto"); "auto" (the
#: default), each kernel's choice (`split_band`, `thread_row_band`, `rank_one_band`). The fused kernels make their automatic choice under
#: "rank-one" and "frequencies". The full band never multiplies by P. Both ops read it here when
#: they look up a call's launch plan (it is part of the plan's key), so
#: `bytheway_kernels.testing.band_product` switches it for both by setting it here.
BAND_PRODUCT = _band_product_setting()

#: F_PAD at which the fused temporal attention kernels split the band product by default. On an
#: H200 (Triton 3.6, fp16, d = 80 at up_blocks.2's size, per-kernel device time;
#: benchmarks/RESULTS.md) the split took 0.93x the fp32 dot's time with fixed beta and 0.89x with
#: adaptive beta at F = 24 and 32, but 1.40x at F = 64 (8 warps); in the map op it was 1.13-1.22x
#: the dot's at F = 24 and 32, so the map op never splits by default.
FUSED_SPLIT_PADDINGS = (32,)

#: The map op takes the band's frequencies with one row per thread by default where F is a
#: multiple of this (`thread_row_band`: whole vectors of 4 or 8 columns per row, even F for the
#: symmetric form) up to `THREAD_ROW_MAX_FRAMES`. Compiled for sm_90 (Triton 3.6, fp16,
#: up_blocks.2's size, no spills), the apply kernel takes 23.8-47.3 SASS instructions per entry
#: at F = 24 and 32 (no guide to bilinear, fixed beta; adaptive within 0.3) where P's rank-one
#: terms on tiles took 61.2-102.0, and the stats pass 307-728 per 64 rows where the terms'
#: energies on full tiles took 886-1538 (docs/DESIGN.md section 8). The rank-one terms
#: (2026-11-27) had measured 0.79 / 1.01x softmax's time with fixed beta at F = 24 / 32 on an
#: H200; the frequencies are not yet timed on a GPU (benchmarks/map_op_kernel_times.py times
#: both). Where F is not a multiple of 4, one fp32 dot.
THREAD_ROW_FRAME_MULTIPLE = 4
#: Largest F the thread-row form takes by default (the AnimateDiff and VideoCrafter lengths, 16 to
#: 32): a thread holds whole rows and the band step is unrolled, so registers and compile time grow
#: with F (sm_90, Triton 3.6: the apply kernel at F = 64, tau = 15 held 168 registers and took 90 s
#: to compile, the stats kernel 135 s, which a first eager call would wait for; 255 registers and
#: 224 bytes of spill at F = 128). Past it the map op takes P's rank-one terms on tiles where F is
#: a multiple of 4, as before 2026-11-28.
THREAD_ROW_MAX_FRAMES = 32


def split_band(setting: str, padded_frames: int, fused: bool) -> bool:
    """Whether a kernel at `padded_frames` (F_PAD) splits a circulant band product on tensor
    cores, for a `BAND_PRODUCT` setting ("auto": `FUSED_SPLIT_PADDINGS` in the fused kernels, never
    in the map op; "rank-one" and "frequencies" in the fused kernels: as "auto")."""
    if setting in ("auto", "frequencies") or (setting == "rank-one" and fused):
        return fused and padded_frames in FUSED_SPLIT_PADDINGS
    return setting == "tensor-cores"


def rank_one_band(setting: str, frames: int) -> bool:
    """Whether the map op takes a circulant band product as P's rank-one terms on tiles
    (`rank_one_band_product`), for a `BAND_PRODUCT` setting ("rank-one": at every F; "auto" and
    "frequencies": where F is a multiple of `THREAD_ROW_FRAME_MULTIPLE` above
    `THREAD_ROW_MAX_FRAMES`)."""
    if setting in ("auto", "frequencies"):
        return frames % THREAD_ROW_FRAME_MULTIPLE == 0 and frames > THREAD_ROW_MAX_FRAMES
    return setting == "rank-one"


def thread_row_band(setting: str, frames: int) -> bool:
    """Whether the map op holds one row per thread and takes a circulant band product by the
    band's frequencies (`thread_row_band_product`), for a `BAND_PRODUCT` setting ("auto" and
    "frequencies": where F is a multiple of `THREAD_ROW_FRAME_MULTIPLE`, up to
    `THREAD_ROW_MAX_FRAMES`)."""
    return (setting in ("auto", "frequencies") and frames % THREAD_ROW_FRAME_MULTIPLE == 0
            and frames <= THREAD_ROW_MAX_FRAMES)


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


# --- Rows held one per thread ------------------------------------------------------------------
# A tile of BLOCK rows on BLOCK threads, each row a tuple of F [BLOCK] column tensors: loaded and
# stored in CHUNK-wide vectors, split into columns in registers (tl.split of an in-thread axis
# moves no data), so row reductions need no shuffles and P's entries are compile-time constants
# (FFMA immediates, no loads). Where a tile's rows span threads the rank-one product takes R dot
# products, each ending in shuffles, and loads its terms; here the band step is the circulant's
# real DFT pruned to the band's frequencies, with the symmetry of cosines and sines about F / 2
# halving it (`thread_row_band_product`).

#: P's eigenvalue at DFT index k (`band.frequency_eigenvalue`), evaluated at compile time.
band_eigenvalue = triton.constexpr_function(frequency_eigenvalue)
#: Whether I - P has the fewer rank-one terms (`band.rank_one_complement`), at compile time.
band_complement = triton.constexpr_function(rank_one_complement)


@triton.constexpr_function
def band_frequency_weight(frames, tau, k):
    """Weight of frequency k (0 <= k <= F / 2) in P = sum_k w_k (c_k c_k^T + s_k s_k^T), or in
    I - P where `band_complement`, with c_k[j] = cos(2 pi k j / F) and s_k[j] = sin(...) unscaled:
    lambda_k (or 1 - lambda_k) times 2 / F (1 / F for k = 0 and F / 2, which have no sine), the
    squared norms of `band.band_rank_one_terms_float64`'s rows; 0 where k has no term."""
    eigenvalue = band_eigenvalue(frames, tau, k)
    weight = 1.0 - eigenvalue if band_complement(frames, tau) else eigenvalue
    return weight * (2.0 if 0 < 2 * k < frames else 1.0) / frames


@triton.constexpr_function
def frequency_cosine(frames, k, j):
    """cos(2 pi k j / F), exactly 0 or +-1 where k j is a multiple of F / 4 (so that the band step
    drops those products at compile time, or takes them as additions)."""
    if (4 * k * j) % frames == 0:
        return (1.0, 0.0, -1.0, 0.0)[(4 * k * j // frames) % 4]
    return math.cos(2.0 * math.pi * ((k * j) % frames) / frames)


@triton.constexpr_function
def frequency_sine(frames, k, j):
    """sin(2 pi k j / F), exact where k j is a multiple of F / 4, as `frequency_cosine`."""
    if (4 * k * j) % frames == 0:
        return (0.0, 1.0, 0.0, -1.0)[(4 * k * j // frames) % 4]
    return math.sin(2.0 * math.pi * ((k * j) % frames) / frames)


@triton.constexpr_function
def exponent_of_two(n):
    """log2(n) for a power of two n."""
    return n.bit_length() - 1


@triton.constexpr_function
def bit_reversed(index, width):
    """`index` with its log2(width) bits reversed: where `load_row_chunk`'s splits put a column."""
    reversed_index = 0
    for _ in range(width.bit_length() - 1):
        reversed_index = 2 * reversed_index + index % 2
        index //= 2
    return reversed_index


@triton.jit
def load_row_chunk(ptr, row_starts, row_mask, START: tl.constexpr, CHUNK: tl.constexpr):
    """Columns START .. START + CHUNK - 1 of the rows at element offsets `row_starts` (a
    [BLOCK] tensor, one row per thread) as a tuple of CHUNK fp32 [BLOCK] tensors, from one
    CHUNK-wide vector load per row (masked rows read 0). Each tl.split halves an axis that lies in
    the thread, so the columns come apart in registers; they arrive in bit-reversed order."""
    BLOCK: tl.constexpr = row_starts.shape[0]
    block = tl.load(ptr + row_starts[:, None] + (START + tl.arange(0, CHUNK))[None, :],
                    mask=row_mask[:, None], other=0.0).to(tl.float32)
    parts = (block,)
    for level in tl.static_range(exponent_of_two(CHUNK)):
        halves = ()
        for part in tl.static_range(2 ** level):
            even, odd = tl.split(tl.reshape(parts[part], [BLOCK, CHUNK // 2 ** (level + 1), 2]))
            halves = halves + (even, odd)
        parts = halves
    columns = ()
    for column in tl.static_range(CHUNK):
        columns = columns + (tl.reshape(parts[bit_reversed(column, CHUNK)], [BLOCK]),)
    return columns


@triton.jit
def store_row_chunk(ptr, row_starts, row_mask, columns, START: tl.constexpr, CHUNK: tl.constexpr):
    """Store columns[START .. START + CHUNK - 1] (fp32 [BLOCK] tensors) to the rows at
    `row_starts` in one CHUNK-wide vector per row, in `ptr`'s element type (`to_element_type`):
    `load_row_chunk`'s splits undone by joins."""
    BLOCK: tl.constexpr = row_starts.shape[0]
    parts = ()
    for column in tl.static_range(CHUNK):
        parts = parts + (tl.reshape(columns[START + bit_reversed(column, CHUNK)], [BLOCK, 1]),)
    for level in tl.static_range(exponent_of_two(CHUNK)):
        joined = ()
        for part in tl.static_range(CHUNK // 2 ** (level + 1)):
            pair = tl.join(parts[2 * part], parts[2 * part + 1])
            joined = joined + (tl.reshape(pair, [BLOCK, 2 ** (level + 1)]),)
        parts = joined
    tl.store(ptr + row_starts[:, None] + (START + tl.arange(0, CHUNK))[None, :],
             to_element_type(parts[0], ptr), mask=row_mask[:, None])


@triton.jit
def thread_row_frequency_dots(values, F: tl.constexpr, TAU: tl.constexpr):
    """(c_k . a, s_k . a) for the frequencies k <= F / 2 with a weight (`band_frequency_weight`),
    rows held one per thread (`values`: a tuple of F column tensors; even F), as two tuples
    indexed by k (an unused placeholder where k has no weight, and for the sine of k = 0 and
    F / 2, which is 0). With e_i = a_i + a_{F-i} and o_i = a_i - a_{F-i} (0 < i < F / 2), c_k . a
    takes the F / 2 + 1 values e and s_k . a the F / 2 - 1 values o (cosines are even about 0,
    sines odd): half the multiply-adds of dot products over the row, each coefficient a
    compile-time constant, products by 0 or +-1 dropped or added."""
    HALF: tl.constexpr = F // 2
    evens = (values[0],)
    odds = (values[0],)  # index 0 unused: o_i for 0 < i < F / 2
    for i in tl.static_range(1, HALF):
        evens = evens + (values[i] + values[F - i],)
        odds = odds + (values[i] - values[F - i],)
    evens = evens + (values[HALF],)
    cosine_dots = ()
    sine_dots = ()
    for k in tl.static_range(HALF + 1):
        if band_frequency_weight(F, TAU, k) > 0:
            dot = tl.zeros_like(values[0])
            for i in tl.static_range(HALF + 1):
                if frequency_cosine(F, k, i) != 0.0:
                    dot += frequency_cosine(F, k, i) * evens[i]
            cosine_dots = cosine_dots + (dot,)
            dot = tl.zeros_like(values[0])
            for i in tl.static_range(1, HALF):
                if frequency_sine(F, k, i) != 0.0:
                    dot += frequency_sine(F, k, i) * odds[i]
            sine_dots = sine_dots + (dot,)
        else:
            cosine_dots = cosine_dots + (values[0],)
            sine_dots = sine_dots + (values[0],)
    return cosine_dots, sine_dots


@triton.jit
def thread_row_band_product(values, F: tl.constexpr, TAU: tl.constexpr):
    """values @ P (even F) for rows held one per thread: `values` is a tuple of F column tensors,
    and so is the result. P = sum_k w_k (c_k c_k^T + s_k s_k^T) over the frequencies k <= F / 2
    with a weight (`band_frequency_weight`; I - that where `band_complement`), from
    `thread_row_frequency_dots`; entries j and F - j share u_j = sum_k w_k (c_k . a) c_k[j] and
    v_j = sum_k w_k (s_k . a) s_k[j] as u_j + v_j and u_j - v_j. So each entry takes about R
    multiply-adds for R rank-one terms, where the terms' dot products and scaled additions over
    whole rows take 2 R."""
    HALF: tl.constexpr = F // 2
    cosine_dots, sine_dots = thread_row_frequency_dots(values, F, TAU)
    symmetric = ()  # u_j, 0 <= j <= F / 2
    antisymmetric = ()  # v_j, 0 < j < F / 2 (index 0 unused)
    for j in tl.static_range(HALF + 1):
        u = tl.zeros_like(values[0])
        v = tl.zeros_like(values[0])
        for k in tl.static_range(HALF + 1):
            if band_frequency_weight(F, TAU, k) > 0:
                if frequency_cosine(F, k, j) != 0.0:
                    u += (frequency_cosine(F, k, j) * band_frequency_weight(F, TAU, k)) * cosine_dots[k]
                if frequency_sine(F, k, j) != 0.0:
                    v += (frequency_sine(F, k, j) * band_frequency_weight(F, TAU, k)) * sine_dots[k]
        symmetric = symmetric + (u,)
        antisymmetric = antisymmetric + (v,)
    product = ()
    for j in tl.static_range(F):
        if j == 0 or j == HALF:
            entry = symmetric[j]
        elif j < HALF:
            entry = symmetric[j] + antisymmetric[j]
        else:
            entry = symmetric[F - j] - antisymmetric[F - j]
        if band_complement(F, TAU):
            entry = values[j] - entry
        product = product + (entry,)
    return product


@triton.jit
def thread_row_band_energy(values, total, F: tl.constexpr, TAU: tl.constexpr):
    """<a, a @ P> per row (even F), rows held one per thread, `total` = the row's sum:
    sum_k w_k ((c_k . d)^2 + (s_k . d)^2) from `thread_row_frequency_dots` of the centred row
    d = a - total / F, or |d|^2 minus that over the complement's k != 0 where `band_complement`.
    The band never holds k = 0, and d has the dot products of a at every k != 0, so this is the
    same sum; centring keeps the complement's difference free of cancellation (a near-uniform
    row, all of whose energy is at k = 0, gives ~0, where |a|^2 minus its k = 0 part cancelled to
    ~F eps |a|^2, above the energies' floor). For even F P is a projector, so this is also
    |a @ P|^2."""
    HALF: tl.constexpr = F // 2
    mean = total * (1.0 / F)
    centred = ()
    for j in tl.static_range(F):
        centred = centred + (values[j] - mean,)
    cosine_dots, sine_dots = thread_row_frequency_dots(centred, F, TAU)
    energy = tl.zeros_like(values[0])
    for k in tl.static_range(1, HALF + 1):
        if band_frequency_weight(F, TAU, k) > 0:
            if k == HALF:
                energy += band_frequency_weight(F, TAU, k) * (cosine_dots[k] * cosine_dots[k])
            else:
                energy += band_frequency_weight(F, TAU, k) * (cosine_dots[k] * cosine_dots[k]
                                                              + sine_dots[k] * sine_dots[k])
    if band_complement(F, TAU):
        square = tl.zeros_like(values[0])
        for j in tl.static_range(F):
            square += centred[j] * centred[j]
        energy = square - energy
    return energy
