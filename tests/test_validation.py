"""Argument validation shared by every backend (issue 11 item 4): a ValueError naming the argument.

The public function validates before it picks a backend, so each check is run with every backend
forced; the reference validates on its own too.
"""

import numpy as np
import pytest
import torch

import bytheway_kernels as btw
from attention_probs_cases import Case, make_inputs
from bytheway_kernels._validation import BETA_LIMIT, check_number, check_tau
from bytheway_kernels.ops.attention_probs import reference

GOOD = dict(alpha=0.6, beta=1.5, tau=7)
ENTRY_POINTS = {
    "public/reference": ("reference", btw.bytheway_attention_probs),
    "public/cpp": ("cpp", btw.bytheway_attention_probs),
    "public/triton": ("triton", btw.bytheway_attention_probs),
    "reference module": (None, reference.bytheway_attention_probs),
}


@pytest.fixture(params=list(ENTRY_POINTS))
def entry_point(request, monkeypatch):
    backend, function = ENTRY_POINTS[request.param]
    if backend is not None:
        monkeypatch.setenv("BYTHEWAY_BACKEND", backend)
    return function


def _inputs():
    return make_inputs(Case(guide_size=(2, 2)))


def test_beta_limit_is_documented_bound():
    assert BETA_LIMIT == 1e6
    assert "BETA_LIMIT" in btw.bytheway_attention_probs.__doc__


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int32, torch.complex64], ids=str)
@pytest.mark.parametrize("which", ["scores", "guide"])
def test_unsupported_dtypes_are_value_errors(entry_point, which, dtype):
    scores, guide = _inputs()
    if which == "scores":
        scores = scores.to(dtype)
    else:
        guide = guide.to(dtype)
    expected = fr"{which} must be a floating-point tensor \(float16, bfloat16, float32 or float64\), got dtype {dtype}"
    with pytest.raises(ValueError, match=expected):
        entry_point(scores, guide, **GOOD)


@pytest.mark.parametrize("value", ["no", 1, 0, None, 1.0])
def test_return_stats_must_be_a_bool(entry_point, value):
    scores, guide = _inputs()
    with pytest.raises(ValueError, match="return_stats must be a bool"):
        entry_point(scores, guide, **GOOD, return_stats=value)


@pytest.mark.parametrize("change,match", [
    (dict(beta=10**400), r"beta must be a finite real number, got an integer beyond the float range"),
    (dict(beta=BETA_LIMIT * 1.000001), r"beta must be <= 1e\+06"),
    (dict(beta=1e39), r"beta must be <= 1e\+06"),
    (dict(beta_max=10**400), r"beta_max must be a finite real number"),
    (dict(beta_max=2e6), r"beta_max must be <= 1e\+06"),
    (dict(alpha=np.bool_(True)), r"alpha must be a finite real number"),
    (dict(tau=True), r"tau must be an integer"),
    (dict(tau=np.float64(7.0)), r"tau must be an integer"),
    (dict(adaptive_beta=np.int64(1)), r"adaptive_beta must be a bool"),
    (dict(cfg="yes"), r"cfg must be a bool"),
    (dict(batch_split=(np.bool_(True), 0)), r"batch_split must be a pair of ints"),
])
def test_out_of_range_and_wrong_type_numbers(entry_point, change, match):
    scores, guide = _inputs()
    with pytest.raises(ValueError, match=match):
        entry_point(scores, guide, **{**GOOD, **change})


def test_numpy_scalars_are_accepted_like_python_numbers(entry_point):
    scores, guide = _inputs()
    python = entry_point(scores, guide, alpha=0.5, beta=2.0, tau=7, adaptive_beta=True, cfg=True,
                         beta_max=4.0, return_stats=True, batch_split=(2, 1))
    numpy = entry_point(scores, guide, alpha=np.float32(0.5), beta=np.float64(2.0), tau=np.int64(7),
                        adaptive_beta=np.bool_(True), cfg=np.bool_(True), beta_max=np.float32(4.0),
                        return_stats=np.bool_(True), batch_split=(np.int64(2), np.int32(1)))
    assert isinstance(numpy, tuple) and len(numpy) == 2
    for expected, actual in zip(python, numpy):
        torch.testing.assert_close(actual, expected)


def test_numpy_integer_beta_and_python_int_tau_are_fine(entry_point):
    scores, guide = _inputs()
    probs = entry_point(scores, guide, alpha=np.float16(0.5), beta=np.int64(2), tau=np.uint8(3),
                        return_stats=np.bool_(False))
    assert probs.shape == scores.shape


def test_checks_return_plain_python_values():
    assert type(check_number("x", np.float32(0.25))) is float
    assert type(check_tau(np.int16(3), 16)) is int
    with pytest.raises(ValueError, match="x must be a finite real number"):
        check_number("x", torch.tensor(1.0))
