"""The band step's product with the circulant P in the Triton kernels (ops/triton_rules.py), run
by the Triton interpreter: tf32 rounding, the three-product split on tensor cores and P's
rank-one terms and the band's frequencies (rows held one per thread) against the exact product, both
ops with each band product, the automatic choice, and the setting.

The interpreter's `tl.dot` multiplies in fp32; every operand of the split is a tf32 number, whose
products fp32 holds exactly, as a tensor core's do, so these tests check the arithmetic the GPU
runs.
"""

import math

import pytest
import torch
import triton
import triton.language as tl

from attention_probs_cases import Case, assert_matches_reference, make_inputs, needs_triton_interpreter
from attention_probs_cases import run_poisoned as run_map_op_poisoned
from bytheway_kernels.band import (band_rank_one_terms, band_rank_one_terms_float64, high_band_matrix,
                                   high_band_matrix_float64, high_band_matrix_tf32_split, is_full_band,
                                   max_tau, tf32_round)
from bytheway_kernels.ops import triton_rules
from bytheway_kernels.ops.attention_probs import triton as map_kernels
from bytheway_kernels.ops.attention_probs.triton import attention_probs_triton_out
from bytheway_kernels.ops.temporal_attention.triton import temporal_attention_triton_out
from bytheway_kernels.testing import band_product
from temporal_attention_cases import AttentionCase, assert_matches
from temporal_attention_cases import make_inputs as make_attention_inputs

pytestmark = needs_triton_interpreter


@triton.jit
def _round_kernel(values_ptr, out_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(out_ptr + offsets, triton_rules.tf32_round(tl.load(values_ptr + offsets)))


@triton.jit
def _product_kernel(values_ptr, band_ptr, out_ptr, ROWS: tl.constexpr, F_PAD: tl.constexpr,
                    SPLIT: tl.constexpr):
    rows = tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, F_PAD)[None, :]
    values = tl.load(values_ptr + rows * F_PAD + cols)
    band, band_low = triton_rules.load_band(band_ptr, F_PAD, SPLIT)
    tl.store(out_ptr + rows * F_PAD + cols, triton_rules.band_product(values, band, band_low, SPLIT))


@triton.jit
def _rank_one_kernel(values_ptr, terms_ptr, out_ptr, ROWS: tl.constexpr, F_PAD: tl.constexpr,
                     RANK: tl.constexpr, COMPLEMENT: tl.constexpr):
    rows = tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, F_PAD)[None, :]
    values = tl.load(values_ptr + rows * F_PAD + cols)
    product = triton_rules.rank_one_band_product(values, terms_ptr, F_PAD, RANK, COMPLEMENT)
    tl.store(out_ptr + rows * F_PAD + cols, product)


@triton.jit
def _rank_one_energy_kernel(values_ptr, terms_ptr, out_ptr, ROWS: tl.constexpr,
                            F_PAD: tl.constexpr, RANK: tl.constexpr):
    rows = tl.arange(0, ROWS)
    values = tl.load(values_ptr + rows[:, None] * F_PAD + tl.arange(0, F_PAD)[None, :])
    tl.store(out_ptr + rows, triton_rules.rank_one_band_energy(values, terms_ptr, F_PAD, RANK))


@triton.jit
def _thread_row_kernel(values_ptr, out_ptr, energy_ptr, ROWS: tl.constexpr, F: tl.constexpr,
                       TAU: tl.constexpr, COLUMNS: tl.constexpr):
    """P's product and energy of ROWS rows of F values, one row per thread (loads and stores
    COLUMNS wide, as the map op's kernels)."""
    rows = tl.arange(0, ROWS)
    row_mask = rows < ROWS
    values = ()
    for start in tl.static_range(0, F, COLUMNS):
        values = values + triton_rules.load_row_chunk(values_ptr, rows * F, row_mask, start, COLUMNS)
    product = triton_rules.thread_row_band_product(values, F, TAU)
    for start in tl.static_range(0, F, COLUMNS):
        triton_rules.store_row_chunk(out_ptr, rows * F, row_mask, product, start, COLUMNS)
    total = tl.zeros_like(values[0])
    for j in tl.static_range(F):
        total += values[j]
    tl.store(energy_ptr + rows, triton_rules.thread_row_band_energy(values, total, F, TAU))


def _special_values() -> torch.Tensor:
    """Ties, signs, tiny and huge magnitudes, subnormals, infinities and NaN, then random."""
    one_ulp = 2.0 ** -23
    special = [0.0, -0.0, 1.0, 1.0 + 2.0 ** -11, 1.0 + 2.0 ** -11 + one_ulp, 1.0 + 2.0 ** -11 - one_ulp,
               -(1.0 + 2.0 ** -11), 3.0e38, -3.0e38, 1e-40, -1e-40, 1.17e-38, float("inf"),
               float("-inf"), float("nan"), 65504.0, 1.0 / 3.0]
    random = torch.randn(256 - len(special), generator=torch.Generator().manual_seed(1)) * torch.logspace(
        -30, 30, 256 - len(special))
    return torch.cat([torch.tensor(special), random]).to(torch.float32)


def test_kernel_rounding_matches_the_host_rule_bit_for_bit():
    values = _special_values()
    rounded = torch.full_like(values, float("nan"))
    _round_kernel[(1,)](values, rounded, N=values.numel())
    host = tf32_round(values)
    assert torch.equal(rounded.view(torch.int32)[~values.isnan()], host.view(torch.int32)[~values.isnan()])
    assert rounded[values.isnan()].isnan().all() and host[values.isnan()].isnan().all()


def test_rounding_keeps_ten_mantissa_bits_to_nearest():
    values = _special_values()
    finite = values[values.isfinite() & (values.abs() < 3e38)]
    rounded = tf32_round(finite)
    assert not (rounded.view(torch.int32) & 0x1FFF).any()
    # nearest: within half a tf32 ulp (2**-11 relative; 2**-137 for subnormals), ties away from 0
    half_ulp = (finite.double().abs() * 2.0 ** -11).clamp_min(2.0 ** -137)
    assert ((rounded.double() - finite.double()).abs() <= half_ulp).all()
    assert tf32_round(torch.tensor([1.0 + 2.0 ** -11, -(1.0 + 2.0 ** -11)])).tolist() == [
        1.0 + 2.0 ** -10, -(1.0 + 2.0 ** -10)]
    assert tf32_round(torch.tensor([float("inf")])).isinf().all()


@pytest.mark.parametrize("frames,tau,padded",
                         [(24, 7, 32), (32, 7, 32), (16, 3, 16), (7, 2, 16), (48, 5, 64)])
def test_split_product_is_as_accurate_as_fp32(frames, tau, padded):
    """The split product's error stays at fp32 rounding (~1e-7 of sum |a| |P|). One tf32 product
    would be ~1e-3 off, and dropping either cross term ~5e-4 off: the bound tells them apart."""
    generator = torch.Generator().manual_seed(frames)
    rows = 32
    logits = torch.randn((rows, padded), generator=generator) * 3
    logits[:, frames:] = float("-inf")
    values = torch.softmax(logits, -1)
    blend = torch.softmax(logits[:1] + torch.randn((1, padded), generator=generator), -1)
    values[::3] = 0.4 * values[::3] + 0.6 * blend  # guided-like rows
    cpu = torch.device("cpu")
    band = high_band_matrix(frames, tau, padded, cpu)
    exact_band = torch.zeros((padded, padded), dtype=torch.float64)
    exact_band[:frames, :frames] = high_band_matrix_float64(frames, tau)
    expected = values.double() @ exact_band
    bound = 4 * 2.0 ** -24 * math.sqrt(padded) * (values.double().abs() @ exact_band.abs()) + 1e-30
    split = torch.full_like(values, float("nan"))
    _product_kernel[(1,)](values, high_band_matrix_tf32_split(frames, tau, padded, cpu), split,
                          ROWS=rows, F_PAD=padded, SPLIT=True)
    exact = torch.full_like(values, float("nan"))
    _product_kernel[(1,)](values, band, exact, ROWS=rows, F_PAD=padded, SPLIT=False)
    for product in (split, exact):
        error = (product.double() - expected).abs()
        assert (error <= bound).all(), error.max()
    one_pass = tf32_round(values).double() @ tf32_round(band).double()
    assert ((one_pass - expected).abs() > bound).any()


def test_rank_one_terms_sum_to_p_with_the_fewer_terms():
    """P = sum v^T v, or I - sum v^T v with the complement, at every F up to 64 and every tau, odd
    F (where P's eigenvalues include 1/2) included, with min(band, complement) terms."""
    for frames in range(2, 65):
        for tau in range(max_tau(frames) + 1):
            terms, complement = band_rank_one_terms_float64(frames, tau)
            p = high_band_matrix_float64(frames, tau)
            summed = terms.T @ terms
            if complement:
                summed = torch.eye(frames, dtype=torch.float64) - summed
            assert (summed - p).abs().max() < 1e-12, (frames, tau)
            eigenvalues = torch.linalg.eigvalsh(p)
            band_rank = int((eigenvalues > 1e-9).sum())
            complement_rank = int((eigenvalues < 1 - 1e-9).sum())
            assert terms.shape[0] == min(band_rank, complement_rank), (frames, tau)
            assert complement is (complement_rank < band_rank)


@pytest.mark.parametrize("frames,tau,padded",
                         [(24, 7, 32), (32, 7, 32), (16, 3, 16), (7, 2, 16), (48, 5, 64), (24, 0, 32)])
def test_rank_one_product_is_as_accurate_as_fp32(frames, tau, padded):
    """The rank-one terms' error stays at fp32 rounding of what they add: each coefficient
    a . v_k is a sum of F products (error <= F eps sum |a| |v_k|), times |v_k| in each entry, and
    the complement's subtraction from a adds eps |a|. A term dropped or a wrong eigenvalue would
    be off by ~1e-2: the bound (~1e-6 here) tells them apart."""
    generator = torch.Generator().manual_seed(frames + tau)
    rows = 32
    logits = torch.randn((rows, padded), generator=generator) * 3
    logits[:, frames:] = float("-inf")
    values = torch.softmax(logits, -1)
    exact_band = torch.zeros((padded, padded), dtype=torch.float64)
    exact_band[:frames, :frames] = high_band_matrix_float64(frames, tau)
    expected = values.double() @ exact_band
    terms, complement = band_rank_one_terms_float64(frames, tau)
    padded_terms = torch.zeros((terms.shape[0], padded), dtype=torch.float64)
    padded_terms[:, :frames] = terms
    eps = 2.0 ** -24
    bound = (2 * frames * eps * (values.double().abs() @ padded_terms.abs().T) @ padded_terms.abs()
             + 2 * eps * values.double().abs() * complement + 1e-30)
    product = torch.full_like(values, float("nan"))
    _rank_one_kernel[(1,)](values, band_rank_one_terms(frames, tau, padded, torch.device("cpu")), product,
                           ROWS=rows, F_PAD=padded, RANK=terms.shape[0], COMPLEMENT=complement)
    error = (product.double() - expected).abs()
    assert (error <= bound).all(), error.max()
    assert bound.max() < 1e-5


@pytest.mark.parametrize("frames,tau,padded",
                         [(24, 7, 32), (32, 7, 32), (16, 3, 16), (7, 2, 16), (48, 5, 64), (24, 0, 32)])
def test_rank_one_energy_gives_the_band_energy(frames, tau, padded):
    """The stats pass's band energy from the terms alone: sum_k (a . v_k)^2 = <a, a sum_k v_k^T v_k>,
    which is <a, a P> (or |a|^2 minus it, with the complement), within fp32 rounding of the
    squared coefficients (each a . v_k off by <= F eps sum |a| |v_k|). A term dropped or a wrong
    weight is off by ~1e-3 of the energy."""
    generator = torch.Generator().manual_seed(frames * 3 + tau)
    rows = 32
    logits = torch.randn((rows, padded), generator=generator) * 3
    logits[:, frames:] = float("-inf")
    values = torch.softmax(logits, -1)
    p = high_band_matrix_float64(frames, tau)
    exact = values.double()[:, :frames]
    band_energy = ((exact @ p) * exact).sum(-1)
    terms, complement = band_rank_one_terms_float64(frames, tau)
    expected = (exact * exact).sum(-1) - band_energy if complement else band_energy
    coefficient_error = frames * 2.0 ** -24 * (exact.abs() @ terms.abs().T)
    bound = (2 * (exact @ terms.T).abs() * coefficient_error + coefficient_error ** 2).sum(-1) \
        + 2 * frames * 2.0 ** -24 * expected + 1e-30
    energy = torch.full((rows,), float("nan"))
    _rank_one_energy_kernel[(1,)](values, band_rank_one_terms(frames, tau, padded, torch.device("cpu")),
                                  energy, ROWS=rows, F_PAD=padded, RANK=terms.shape[0])
    error = (energy.double() - expected).abs()
    assert (error <= bound).all(), (error / bound).max()
    assert (bound < 1e-3 * expected).all()


@pytest.mark.parametrize("frames,tau,columns", [(24, 7, 8), (32, 7, 8), (32, 7, 4), (16, 3, 8), (8, 1, 8),
                                                (12, 3, 4), (20, 4, 4), (24, 0, 8), (40, 9, 8), (64, 0, 8),
                                                (64, 20, 8), (4, 0, 4), (28, 5, 4)])
def test_frequency_product_and_energy_are_as_accurate_as_fp32(frames, tau, columns):
    """The band step by frequencies, rows held one per thread: a @ P and <a, a P> from the
    cosine and sine dot products over a_i +- a_{F-i}, P's entries compiled in. Each output sums
    at most F + 4 rounded steps of terms bounded by those of P's rank-one terms
    (|a| |v_k| |v_k|, or (|a| . |v_k|)^2 for the energy), and the complement's subtraction from a
    adds eps |a|. The energy comes from the centred row, so uniform rows give ~0 with the
    complement too (the energies' floor is 1e-6 of E2). A dropped frequency, a wrong weight or a
    wrong sign (u_j + v_j for entry F - j) is off by ~1e-3 or more: the bounds (~1e-6 to 1e-5) tell
    them apart. The loads and stores of
    `load_row_chunk` / `store_row_chunk` are checked on the way: outputs start as NaN."""
    generator = torch.Generator().manual_seed(frames * 7 + tau)
    rows = 32
    values = torch.softmax(torch.randn((rows, frames), generator=generator) * 3, -1)
    values[-4:] = 1.0 / frames  # uniform rows: no energy but at k = 0
    values[-2:] += torch.randn((2, frames), generator=generator) * 1e-5  # near-uniform
    exact = values.double()
    p = high_band_matrix_float64(frames, tau)
    terms, complement = band_rank_one_terms_float64(frames, tau)
    eps = 2.0 ** -24
    steps = frames + 4
    product_bound = (2 * steps * eps * (exact.abs() @ terms.abs().T) @ terms.abs()
                     + 2 * eps * exact.abs() * complement + 1e-30)
    band_energy = ((exact @ p) * exact).sum(-1)
    # from the centred row d (d . v_k = a . v_k but at k = 0), where a near-uniform row has
    # almost nothing to subtract: |a|^2 minus its k = 0 part would cancel to ~F eps |a|^2
    centred = (exact - exact.mean(-1, keepdim=True)).abs()
    energy_bound = (2 * steps * eps * ((centred @ terms.abs().T) ** 2).sum(-1)
                    + 2 * steps * eps * (centred * centred).sum(-1) * complement
                    + 4 * steps * eps * eps * (exact * exact).sum(-1) + 1e-30)
    product = torch.full_like(values, float("nan"))
    energy = torch.full((rows,), float("nan"))
    _thread_row_kernel[(1,)](values, product, energy, ROWS=rows, F=frames, TAU=tau, COLUMNS=columns)
    error = (product.double() - exact @ p).abs()
    assert (error <= product_bound).all(), (error / product_bound).max()
    assert product_bound.max() < 1e-5
    energy_error = (energy.double() - band_energy).abs()
    assert (energy_error <= energy_bound).all(), (energy_error / energy_bound).max()
    assert energy_bound.max() < 3e-5


def test_frequency_weights_are_the_rank_one_terms_norms():
    """The compile-time weights of the band's frequencies (`triton_rules.band_frequency_weight`,
    `band_complement`) give P (or I - P) as sum_k w_k (c_k c_k^T + s_k s_k^T), with the complement
    chosen as `band.band_rank_one_terms_float64` chooses it, at every even F up to 64 and tau."""
    for frames in range(2, 65, 2):
        n = torch.arange(frames, dtype=torch.float64)
        for tau in range(max_tau(frames) + 1):
            complement = triton_rules.band_complement(frames, tau)
            assert complement is band_rank_one_terms_float64(frames, tau)[1]
            summed = torch.zeros((frames, frames), dtype=torch.float64)
            for k in range(frames // 2 + 1):
                angle = 2.0 * math.pi * k * n / frames
                cosine = torch.tensor([triton_rules.frequency_cosine(frames, k, j) for j in range(frames)],
                                      dtype=torch.float64)
                sine = torch.tensor([triton_rules.frequency_sine(frames, k, j) for j in range(frames)],
                                    dtype=torch.float64)
                assert (cosine - torch.cos(angle)).abs().max() < 1e-12
                assert (sine - torch.sin(angle)).abs().max() < 1e-12
                weight = triton_rules.band_frequency_weight(frames, tau, k)
                summed += weight * (cosine[:, None] * cosine[None, :] + sine[:, None] * sine[None, :])
            if complement:
                summed = torch.eye(frames, dtype=torch.float64) - summed
            assert (summed - high_band_matrix_float64(frames, tau)).abs().max() < 1e-12, (frames, tau)


@pytest.mark.parametrize("frames,tau,thread_rows", [(24, 7, True), (32, 7, True), (20, 3, True), (8, 1, True),
                                                    (16, 7, False), (15, 3, False), (30, 7, False),
                                                    (33, 4, False), (32, 3, True), (64, 20, False),
                                                    (128, 7, False)])
def test_the_map_op_takes_frequencies_where_f_is_a_multiple_of_4(frames, tau, thread_rows):
    """"auto" (and "frequencies"): one row per thread and the band's frequencies in both passes
    where F % 4 == 0 inside the band up to F = 32 (nothing to load for the band), P's rank-one
    terms on tiles where F % 4 == 0 above it, else one fp32 dot; "rank-one" forces the terms on
    tiles at every F."""
    scores = torch.zeros((2, 1, 1, 1, frames, frames))
    params = Case(frames=frames, tau=tau, adaptive_beta=True).params()
    for setting in ("auto", "frequencies"):
        with band_product(setting):
            stats_launch, launch = map_kernels.kernel_launches(scores, None, params, torch.empty_like(scores))
        padded = launch.args["F_PAD"]
        tiled_terms = frames % 4 == 0 and frames > triton_rules.THREAD_ROW_MAX_FRAMES
        assert launch.args["SPLIT_BAND"] is False and (launch.args["BAND_RANK"] > 0) is tiled_terms
        assert launch.args["THREAD_ROWS"] is thread_rows and stats_launch.args["THREAD_ROWS"] is thread_rows
        if thread_rows:
            assert launch.args["TAU"] == tau and launch.args["COLUMNS"] == (8 if frames % 8 == 0 else 4)
            assert launch.args["band_ptr"] is scores and launch.args["BLOCK_R"] == 32 * launch.args["num_warps"]
        elif tiled_terms:
            assert launch.args["band_ptr"].shape == (band_rank_one_terms_float64(frames, tau)[0].shape[0], padded)
        elif not is_full_band(frames, tau):
            assert launch.args["band_ptr"].shape == (padded, padded)
    with band_product("rank-one"):  # forced: every circulant band, F = 15 and 30 too
        forced = map_kernels.kernel_launches(scores, None, params, torch.empty_like(scores))[1]
    assert (forced.args["BAND_RANK"] > 0) is (not is_full_band(frames, tau))
    assert forced.args["THREAD_ROWS"] is False
    if forced.args["BAND_RANK"]:
        terms, complement = band_rank_one_terms_float64(frames, tau)
        assert forced.args["BAND_RANK"] == terms.shape[0] and forced.args["BAND_COMPLEMENT"] is complement
        assert forced.args["band_ptr"].shape == (terms.shape[0], forced.args["F_PAD"])


@pytest.mark.parametrize("frames,tau", [(24, 7), (32, 7), (16, 7), (33, 4)])
def test_plans_split_only_a_circulant_band(frames, tau):
    scores = torch.zeros((2, 1, 1, 1, frames, frames))
    probs = torch.empty_like(scores)
    params = Case(frames=frames, tau=tau).params()
    circulant = not (frames % 2 == 0 and tau == (frames - 2) // 2)
    with band_product("tensor-cores"):
        launch = map_kernels.kernel_launches(scores, None, params, probs)[0]
        assert launch.args["SPLIT_BAND"] is circulant and launch.args["BAND_RANK"] == 0
        padded = launch.args["F_PAD"]
        if circulant:
            assert launch.args["band_ptr"].shape == (2, padded, padded)
    with band_product("fma"):
        launch = map_kernels.kernel_launches(scores, None, params, probs)[0]
    assert launch.args["SPLIT_BAND"] is False and launch.args["BAND_RANK"] == 0
    if circulant:
        assert launch.args["band_ptr"].shape == (padded, padded)
    assert triton_rules.BAND_PRODUCT == triton_rules._band_product_setting()  # restored


@pytest.mark.parametrize("frames,tau,split", [(24, 7, True), (32, 3, True), (16, 7, False),
                                              (16, 3, False), (40, 9, False), (8, 2, False)])
def test_fused_kernels_split_the_band_by_default_at_f_pad_32(frames, tau, split):
    """The automatic setting splits a circulant band product in the fused kernels where that was
    measured faster (F_PAD 32: `FUSED_SPLIT_PADDINGS`) and nowhere in the map op; the forced
    products apply to both ops at every F."""
    from bytheway_kernels.ops.temporal_attention import triton as fused_kernels

    case = AttentionCase(frames=frames, tau=tau, head_dim=16, adaptive_beta=True)
    q, k, v, guide = make_attention_inputs(case, seed=0)
    out = torch.empty_like(q)

    def fused_split():
        launches = fused_kernels.kernel_launches(q, k, v, guide, case.heads, case.height, case.width,
                                                 0.25, case.params(), out, None, None)
        splits = {launch.kernel.__name__: launch.constants["SPLIT_BAND"] for launch in launches
                  if "SPLIT_BAND" in launch.constants}
        assert set(splits) == {"_energy_kernel", "_attention_kernel"}
        assert len(set(splits.values())) == 1, splits
        return splits["_attention_kernel"]

    scores = torch.zeros((2, 1, 1, 1, frames, frames))
    params = Case(frames=frames, tau=tau).params()

    def map_op_split():
        return map_kernels.kernel_launches(scores, None, params, torch.empty_like(scores))[0].args["SPLIT_BAND"]

    for setting in ("auto", "rank-one", "frequencies"):  # the map op's forms: the fused kernels' own choice
        with band_product(setting):
            assert fused_split() is split
            assert map_op_split() is False
    circulant = not is_full_band(frames, tau)
    for setting in ("tensor-cores", "fma"):
        with band_product(setting):
            assert fused_split() is (setting == "tensor-cores" and circulant)
            assert map_op_split() is (setting == "tensor-cores" and circulant)


MAP_OP_CASES = [
    Case(frames=24, tau=7, beta=10.0, guide_size=(2, 2), guide_upsample="bilinear", height=2, width=3),
    Case(frames=32, tau=3, dtype=torch.float16, adaptive_beta=False),
    Case(frames=7, tau=2, dtype=torch.bfloat16, energy_scope="sample"),
    Case(frames=40, tau=9, heads=1, beta=1.5),
]


@pytest.mark.parametrize("setting", ["tensor-cores", "fma", "rank-one", "frequencies"])
@pytest.mark.parametrize("case", MAP_OP_CASES, ids=str)
def test_map_op_with_each_band_product(case, setting):
    scores, guide = make_inputs(case, seed=11)
    with band_product(setting):
        probs, stats = run_map_op_poisoned(attention_probs_triton_out, scores, guide, case)
    assert_matches_reference(scores, guide, case, probs, stats)


ATTENTION_CASES = [
    AttentionCase(frames=24, tau=7, head_dim=40, beta=10.0, adaptive_beta=True, guide_size=(2, 1)),
    AttentionCase(frames=32, tau=2, head_dim=16, dtype=torch.float16, guide_upsample="bilinear",
                  guide_size=(2, 2)),
    AttentionCase(frames=40, tau=9, head_dim=8, heads=1, adaptive_beta=True, energy_scope="sample"),
]


@pytest.mark.parametrize("setting", ["tensor-cores", "fma"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_fused_attention_with_either_band_product(case, setting):
    q, k, v, guide = inputs = make_attention_inputs(case, seed=5)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    plain_map = torch.full((case.batch, case.height, case.width, case.heads, case.frames, case.frames),
                           float("nan"), dtype=q.dtype)
    stats = torch.full((case.params().stats_rows(case.batch), 6), float("nan"))
    with band_product(setting):
        temporal_attention_triton_out(q, k, v, guide, case.heads, case.height, case.width,
                                      case.head_dim ** -0.5, case.params(), out, plain_map, stats)
    assert_matches(case, inputs, out, plain_map, stats)


def test_setting_is_checked(monkeypatch):
    monkeypatch.delenv(triton_rules.BAND_PRODUCT_ENV, raising=False)
    assert triton_rules._band_product_setting() == "auto"
    for setting in triton_rules.BAND_PRODUCTS:
        monkeypatch.setenv(triton_rules.BAND_PRODUCT_ENV, setting)
        assert triton_rules._band_product_setting() == setting
    monkeypatch.setenv(triton_rules.BAND_PRODUCT_ENV, "tf32")
    with pytest.raises(ValueError, match="BYTHEWAY_BAND_PRODUCT='tf32'"):
        triton_rules._band_product_setting()
    with pytest.raises(ValueError, match="setting='tf32'"):
        with band_product("tf32"):
            pass


def test_info_names_the_band_product(capsys):
    from bytheway_kernels.check import print_info

    with band_product("auto"):
        print_info()  # the interpreter makes the Triton backend available
    assert ("Triton band product: the band's frequencies, one row per thread, in the map op where F "
            "is a multiple of 4, else one fp32 dot (FMA units); three tf32 products on tensor cores in "
            "the fused attention at F_PAD 32") in capsys.readouterr().out
    with band_product("fma"):
        print_info()
    assert "Triton band product: one fp32 dot (FMA units) (" in capsys.readouterr().out
    with band_product("tensor-cores"):
        print_info()
    assert "Triton band product: three tf32 products on tensor cores" in capsys.readouterr().out
    with band_product("rank-one"):
        print_info()
    assert "Triton band product: rank-one terms of P in the map op" in capsys.readouterr().out
    with band_product("frequencies"):
        print_info()
    assert "Triton band product: the band's frequencies, one row per thread" in capsys.readouterr().out
