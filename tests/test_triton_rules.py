"""The Triton rules both ops' kernels share (ops/triton_rules.py) other than the band product
(tests/test_band_product.py), run by the Triton interpreter: the stores' float16 saturation
against the reference's rounding, exp as exp2(x * LOG2E), and quotients by magic numbers.
"""

import math

import pytest
import torch
import triton
import triton.language as tl

from attention_probs_cases import needs_triton_interpreter
from bytheway_kernels.ops import triton_rules
from bytheway_kernels.ops.attention_probs.reference import _to_output_dtype

pytestmark = needs_triton_interpreter


@triton.jit
def _convert_kernel(values_ptr, out_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    values = tl.load(values_ptr + offsets)
    tl.store(out_ptr + offsets, triton_rules.to_element_type(values, out_ptr))


@triton.jit
def _quotient_kernel(numerators_ptr, out_ptr, magic, shift, N: tl.constexpr):
    offsets = tl.arange(0, N)
    numerators = tl.load(numerators_ptr + offsets)
    tl.store(out_ptr + offsets, triton_rules.magic_quotient(numerators, magic, shift))


@triton.jit
def _exp_kernel(values_ptr, out_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(out_ptr + offsets, tl.exp2(tl.load(values_ptr + offsets) * triton_rules.LOG2E))


def _values() -> torch.Tensor:
    """NaN, infinities, values past float16's range and at its edge, then random magnitudes."""
    special = [float("nan"), float("inf"), float("-inf"), 1e6, -1e6, 65504.0, -65504.0, 65519.0,
               -65520.0, 0.0, -0.0, 1.0, 6e-8, -3.0e38]
    count = 64 - len(special)
    generator = torch.Generator().manual_seed(3)
    random = torch.randn(count, generator=generator) * torch.logspace(-8, 6, count)
    return torch.cat([torch.tensor(special), random]).to(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_conversion_saturates_float16_as_the_reference_rounds(dtype):
    """float16 clamps to +-65504 (never inf) and keeps NaN; the other dtypes convert as they are."""
    values = _values()
    out = torch.zeros(values.shape, dtype=dtype)
    _convert_kernel[(1,)](values, out, N=values.numel())
    expected = _to_output_dtype(values, dtype)
    assert torch.equal(out.isnan(), values.isnan())
    finite = ~values.isnan()
    if dtype == torch.bfloat16:  # the interpreter truncates to bfloat16 (a GPU rounds to nearest)
        assert torch.equal(out[values.isinf()], expected[values.isinf()])
        finite = values.isfinite()
        step = expected[finite].double().abs() * 2.0 ** -7
        assert ((out[finite].double() - expected[finite].double()).abs() <= step).all()
    else:
        assert torch.equal(out[finite], expected[finite])
    if dtype == torch.float16:
        assert out[finite].isfinite().all()
        assert out[1].item() == 65504.0 and out[2].item() == -65504.0  # +-inf saturate too


def test_exp_through_exp2_matches_exp():
    """exp(x) as exp2(x * LOG2E), over the range softmax numerators take (x <= 0, from the row
    maximum), within fp32 rounding of the product's argument."""
    values = torch.cat([torch.linspace(-87.0, 0.0, 255), torch.tensor([float("-inf")])])
    out = torch.full_like(values, float("nan"))
    _exp_kernel[(1,)](values, out, N=values.numel())
    expected = torch.exp(values.double())
    # LOG2E in fp32 and the product x * LOG2E each round by up to 2^-24 of it, so exp's relative
    # error is at most 2 |x| 2^-24 (ln 2 * LOG2E = 1), plus the rounding of its own result
    tolerance = (values.double().abs().nan_to_num(posinf=0.0) * 2.0 ** -23 + 2.0 ** -22) * expected
    assert ((out.double() - expected).abs() <= tolerance).all()
    assert out[-1].item() == 0.0
    assert triton_rules.LOG2E.value == pytest.approx(1 / math.log(2), rel=1e-15)


def _divisors() -> list:
    """Small divisors, powers of two and their neighbours, the AnimateDiff sizes, random ones."""
    generator = torch.Generator().manual_seed(5)
    random = torch.randint(1, 2 ** 31 - 1, (64,), generator=generator).tolist()
    powers = [2 ** k + offset for k in range(31) for offset in (-1, 0, 1)
              if 1 <= 2 ** k + offset < 2 ** 31]
    return list(range(1, 70)) + powers + [320, 640, 1280, 2 ** 31 - 1] + random


def _numerators(divisor: int) -> list:
    """Around every multiple that matters: 0, near the divisor, near the largest int32."""
    top = (2 ** 31 - 1) // divisor * divisor
    candidates = [0, 1, divisor - 1, divisor, divisor + 1, 2 * divisor - 1, 2 * divisor, top - 1,
                  top, 2 ** 31 - 2, 2 ** 31 - 1, 12345 * divisor - 1]
    return [n for n in candidates if 0 <= n < 2 ** 31]


def test_magic_numbers_divide_every_int32_exactly():
    for divisor in _divisors():
        magic, shift = triton_rules.magic_quotient_constants(divisor)
        assert 0 < magic < 2 ** 32  # a uint32
        for n in _numerators(divisor):
            assert ((2 * n * magic) >> 32) >> shift == n // divisor, (divisor, n)


@pytest.mark.parametrize("divisor", [1, 3, 8, 40, 4096, 2 ** 31 - 1])
def test_magic_quotient_in_a_kernel(divisor):
    numerators = _numerators(divisor) + torch.randint(
        0, 2 ** 31 - 1, (64,), generator=torch.Generator().manual_seed(divisor)).tolist()
    numerators = torch.tensor(numerators[:64], dtype=torch.int32)
    out = torch.full_like(numerators, -1)
    magic, shift = triton_rules.magic_quotient_constants(divisor)
    _quotient_kernel[(1,)](numerators, out, magic, shift, N=64)
    assert torch.equal(out, torch.div(numerators, divisor, rounding_mode="floor"))


@pytest.mark.parametrize("divisor", [0, -3, 2 ** 31])
def test_magic_numbers_refuse_divisors_out_of_range(divisor):
    with pytest.raises(ValueError, match="divisor must be in"):
        triton_rules.magic_quotient_constants(divisor)
