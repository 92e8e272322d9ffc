"""The band step's product with the circulant P in the Triton kernels (ops/triton_rules.py), run
by the Triton interpreter: tf32 rounding, the three-product split on tensor cores against the
exact product, both ops with the split on (their default) and off, and the setting.

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
from bytheway_kernels.band import (high_band_matrix, high_band_matrix_float64, high_band_matrix_tf32_split,
                                   is_full_band, tf32_round)
from bytheway_kernels.ops import triton_rules
from bytheway_kernels.ops.attention_probs import triton as map_kernels
from bytheway_kernels.ops.attention_probs.triton import attention_probs_triton_out
from bytheway_kernels.ops.temporal_attention.triton import temporal_attention_triton_out
from bytheway_kernels.testing import band_product_split
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


@pytest.mark.parametrize("frames,tau", [(24, 7), (32, 7), (16, 7), (33, 4)])
def test_plans_split_only_a_circulant_band(frames, tau):
    scores = torch.zeros((2, 1, 1, 1, frames, frames))
    probs = torch.empty_like(scores)
    params = Case(frames=frames, tau=tau).params()
    circulant = not (frames % 2 == 0 and tau == (frames - 2) // 2)
    with band_product_split(True):
        launch = map_kernels.kernel_launches(scores, None, params, probs)[0]
        assert launch.args["SPLIT_BAND"] is circulant
        padded = launch.args["F_PAD"]
        if circulant:
            assert launch.args["band_ptr"].shape == (2, padded, padded)
    launch = map_kernels.kernel_launches(scores, None, params, probs)[0]  # the default: fma
    assert launch.args["SPLIT_BAND"] is False
    if circulant:
        assert launch.args["band_ptr"].shape == (padded, padded)
    assert triton_rules.SPLIT_BAND is triton_rules._split_band_setting()  # restored


@pytest.mark.parametrize("frames,tau,split", [(24, 7, True), (32, 3, True), (16, 7, False),
                                              (16, 3, False), (40, 9, False), (8, 2, False)])
def test_fused_kernels_split_the_band_by_default_at_f_pad_32(frames, tau, split):
    """The automatic setting (None) splits a circulant band product in the fused kernels where
    that was measured faster (F_PAD 32: `FUSED_SPLIT_PADDINGS`) and nowhere in the map op; the
    forced settings apply to both ops at every F."""
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

    with band_product_split(None):
        assert fused_split() is split
        assert map_op_split() is False
    circulant = not is_full_band(frames, tau)
    for forced in (True, False):
        with band_product_split(forced):
            assert fused_split() is (forced and circulant)
            assert map_op_split() is (forced and circulant)


MAP_OP_CASES = [
    Case(frames=24, tau=7, beta=10.0, guide_size=(2, 2), guide_upsample="bilinear", height=2, width=3),
    Case(frames=32, tau=3, dtype=torch.float16, adaptive_beta=False),
    Case(frames=7, tau=2, dtype=torch.bfloat16, energy_scope="sample"),
    Case(frames=40, tau=9, heads=1, beta=1.5),
]


@pytest.mark.parametrize("split", [True, False], ids=["tensor-cores", "fma"])
@pytest.mark.parametrize("case", MAP_OP_CASES, ids=str)
def test_map_op_with_either_band_product(case, split):
    scores, guide = make_inputs(case, seed=11)
    with band_product_split(split):
        probs, stats = run_map_op_poisoned(attention_probs_triton_out, scores, guide, case)
    assert_matches_reference(scores, guide, case, probs, stats)


ATTENTION_CASES = [
    AttentionCase(frames=24, tau=7, head_dim=40, beta=10.0, adaptive_beta=True, guide_size=(2, 1)),
    AttentionCase(frames=32, tau=2, head_dim=16, dtype=torch.float16, guide_upsample="bilinear",
                  guide_size=(2, 2)),
    AttentionCase(frames=40, tau=9, head_dim=8, heads=1, adaptive_beta=True, energy_scope="sample"),
]


@pytest.mark.parametrize("split", [True, False], ids=["tensor-cores", "fma"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_fused_attention_with_either_band_product(case, split):
    q, k, v, guide = inputs = make_attention_inputs(case, seed=5)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    plain_map = torch.full((case.batch, case.height, case.width, case.heads, case.frames, case.frames),
                           float("nan"), dtype=q.dtype)
    stats = torch.full((case.params().stats_rows(case.batch), 6), float("nan"))
    with band_product_split(split):
        temporal_attention_triton_out(q, k, v, guide, case.heads, case.height, case.width,
                                      case.head_dim ** -0.5, case.params(), out, plain_map, stats)
    assert_matches(case, inputs, out, plain_map, stats)


def test_setting_is_checked(monkeypatch):
    monkeypatch.delenv(triton_rules.BAND_PRODUCT_ENV, raising=False)
    assert triton_rules._split_band_setting() is None
    monkeypatch.setenv(triton_rules.BAND_PRODUCT_ENV, "auto")
    assert triton_rules._split_band_setting() is None
    monkeypatch.setenv(triton_rules.BAND_PRODUCT_ENV, "fma")
    assert triton_rules._split_band_setting() is False
    monkeypatch.setenv(triton_rules.BAND_PRODUCT_ENV, "tensor-cores")
    assert triton_rules._split_band_setting() is True
    monkeypatch.setenv(triton_rules.BAND_PRODUCT_ENV, "tf32")
    with pytest.raises(ValueError, match="BYTHEWAY_BAND_PRODUCT='tf32'"):
        triton_rules._split_band_setting()


def test_info_names_the_band_product(capsys):
    from bytheway_kernels.check import print_info

    with band_product_split(None):
        print_info()  # the interpreter makes the Triton backend available
    assert ("Triton band product: one fp32 dot (FMA units), three tf32 products on tensor cores in "
            "the fused attention at F_PAD 32") in capsys.readouterr().out
    with band_product_split(False):
        print_info()
    assert "Triton band product: one fp32 dot (FMA units) (" in capsys.readouterr().out
    with band_product_split(True):
        print_info()
    assert "Triton band product: three tf32 products on tensor cores" in capsys.readouterr().out
