"""The compiled C++ CPU kernel (csrc/) vs the reference.

The first test to need the extension builds it (JIT, ~20 s once per source/CPU/torch version,
then cached). These tests fail rather than skip when it cannot be built: CI must build it. The
build itself (cache, key, tools, locking, failures) is tested in test_cpp_build.py.
"""

import dataclasses

import pytest
import torch

import bytheway_kernels as btw
from attention_probs_cases import BackendContract, Case, assert_matches_reference, make_inputs, run_poisoned
from bytheway_kernels.ops.attention_probs import cpp as cpp_backend, reference
from bytheway_kernels.ops.attention_probs.cpp import CppStatus, attention_probs_cpp_out


@pytest.fixture(scope="module", autouse=True)
def built_extension():
    status = cpp_backend.cpp_status()
    assert status.available, f"the C++ extension must build on this machine: {status.reason}"


class TestCppContract(BackendContract):
    run_out = staticmethod(attention_probs_cpp_out)
    backend = "cpp"


def run_cpp(scores, guide, case: Case):
    return run_poisoned(attention_probs_cpp_out, scores, guide, case)


@pytest.mark.parametrize("frames,tau,upsample", [(16, 7, "nearest"), (16, 2, "bilinear"), (7, 2, "bilinear")])
def test_float64_computes_in_double(frames, tau, upsample):
    case = Case(frames=frames, tau=tau, guide_upsample=upsample, energy_scope="sample", beta=10.0)
    scores, guide = make_inputs(case, seed=5)
    scores, guide = scores.double(), guide.double()
    probs, stats = run_cpp(scores, guide, case)
    ref_probs, ref_stats = reference.bytheway_attention_probs(scores, guide, return_stats=True, **case.kwargs())
    torch.testing.assert_close(probs, ref_probs, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(stats, ref_stats, atol=1e-7, rtol=1e-6)


# Frame counts with a compile-time path in the kernel (8, 16, 24, 32; a row-blocked or folded band product)
# and runtime-F ones around them, each with an interior band (neither empty-ish nor full).
@pytest.mark.parametrize("frames,tau", [(8, 1), (16, 3), (24, 7), (24, 4), (32, 7), (32, 11), (12, 2), (31, 7)])
@pytest.mark.parametrize("adaptive,upsample", [(True, "nearest"), (False, "bilinear")])
def test_compiled_frame_counts_with_interior_bands(frames, tau, adaptive, upsample):
    case = Case(frames=frames, tau=tau, height=3, width=5, guide_size=(2, 3), guide_upsample=upsample,
                adaptive_beta=adaptive, beta=3.0)
    scores, guide = make_inputs(case, seed=frames + tau)
    probs, stats = run_cpp(scores, guide, case)
    assert_matches_reference(scores, guide, case, probs, stats)


# F = 24 and 32 form A2 P with the folded product (csrc/, `folded_band_product`): every path that
# uses it (the fixed pass from the softmax numerators or, with stats, from A; the adaptive stats
# pass, the in-place finish for float32 and the recomputing pass for float16/bfloat16), with and
# without a guide, against the float64 reference.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("frames,tau", [(24, 7), (32, 7), (32, 2)])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("with_guide", [False, True])
@pytest.mark.parametrize("with_stats", [False, True])
def test_folded_band_product_paths(dtype, frames, tau, adaptive, with_guide, with_stats):
    case = Case(frames=frames, tau=tau, dtype=dtype, height=4, width=6, heads=3, adaptive_beta=adaptive, beta=3.0,
                guide_size=(2, 3) if with_guide else None, energy_scope="sample")
    scores, guide = make_inputs(case, seed=frames + tau)
    probs, stats = run_poisoned(attention_probs_cpp_out, scores, guide, case, with_stats=with_stats)
    assert_matches_reference(scores, guide, case, probs, stats)


@pytest.mark.parametrize("adaptive,scope,frames,tau,parts,dtype", [
    (True, "batch", 16, 7, 2, torch.float32), (True, "sample", 16, 7, 2, torch.float32),
    (False, "batch", 16, 7, 2, torch.float32), (True, "batch", 24, 7, 2, torch.float32),
    (True, "sample", 32, 7, 2, torch.float32), (True, "sample", 16, 7, 3, torch.float64),
    (True, "batch", 24, 7, 3, torch.float64), (True, "batch", 16, 7, 2, torch.float16),
], ids=str)
def test_one_and_two_threads_agree_bitwise(adaptive, scope, frames, tau, parts, dtype):
    case = Case(frames=frames, tau=tau, batch=2 * parts, height=16, width=12, heads=4, guide_size=(8, 6),
                adaptive_beta=adaptive, energy_scope=scope, beta=2.0, parts=parts, dtype=dtype)
    scores, guide = make_inputs(case, seed=7)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(run_cpp(scores, guide, case))
    finally:
        torch.set_num_threads(threads)
    (probs_1, stats_1), (probs_2, stats_2) = results
    assert torch.equal(probs_1, probs_2) and torch.equal(stats_1, stats_2)
    assert_matches_reference(scores, guide, case, probs_1, stats_1)


def _assert_matches_in_its_dtype(scores, guide, case, probs, stats):
    """float64 against the float64 reference at float64's tolerance, else the shared checker."""
    if scores.dtype != torch.float64:
        assert_matches_reference(scores, guide, case, probs, stats)
        return
    ref_probs, ref_stats = reference.bytheway_attention_probs(scores, guide, return_stats=True, **case.kwargs())
    scale = max(1.0, float(ref_stats[:, 0].max()))  # the band term grows with beta
    torch.testing.assert_close(probs, ref_probs, atol=1e-12 * scale, rtol=1e-10)
    torch.testing.assert_close(stats, ref_stats, atol=1e-7, rtol=1e-6)


# Adaptive beta on float32/float64 outputs keeps X = A2 / rowsum(A2) in the output between its two
# passes and finishes it in place; float16/bfloat16 recompute. These cases cover the full band
# (closed form) and partial bands (band product), compiled and runtime F, maps per entry that are
# odd (a one-map step after the two-map steps at F = 16) or above one parallel block (64 maps),
# both energy scopes, an energy part that is not the last one of a 3-part split, and guide rows
# whose guided sum is 0 (alpha = 1), which keep the unguided map.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("frames,tau,heads,scope,split", [
    (16, 7, 1, "batch", (2, 1)), (16, 7, 2, "sample", (3, 1)), (16, 3, 1, "sample", (2, 1)),
    (24, 7, 2, "batch", (3, 0)), (32, 7, 1, "sample", (2, 1)), (15, 3, 2, "batch", (3, 2)),
    (31, 7, 1, "sample", (2, 0)),
])
@pytest.mark.parametrize("zero_guide_rows", [False, True])
def test_adaptive_in_place_finish(dtype, frames, tau, heads, scope, split, zero_guide_rows):
    parts, part = split
    case = Case(frames=frames, tau=tau, dtype=dtype, batch=2 * parts, height=5, width=7, heads=heads,
                guide_size=(2, 3), guide_upsample="bilinear" if frames % 2 else "nearest",
                alpha=1.0 if zero_guide_rows else 0.6, beta=2.0, parts=parts, energy_part=part,
                energy_scope=scope)
    scores, guide = make_inputs(case, seed=frames + heads + parts)
    if zero_guide_rows:
        guide = guide.index_fill(-2, torch.tensor([1, frames - 2]), 0.0)
    probs, stats = run_cpp(scores, guide, case)
    assert torch.isfinite(probs).all()
    _assert_matches_in_its_dtype(scores, guide, case, probs, stats)


@pytest.mark.parametrize("frames,tau", [(16, 7), (24, 7)])
def test_adaptive_float32_agrees_with_fixed_beta_at_its_beta(frames, tau):
    """The in-place finish and the one-pass store compute the same thing from the same X."""
    case = Case(frames=frames, tau=tau, height=5, width=3, heads=3, beta=1.5)
    scores, guide = make_inputs(case, seed=21)
    adaptive_probs, stats = run_cpp(scores, guide, case)
    beta = float(stats[0, 0])
    assert beta > case.beta  # the adaptive rule raised beta: the two calls differ in their beta source
    fixed_probs, _ = run_cpp(scores, guide, dataclasses.replace(case, adaptive_beta=False, beta=beta))
    torch.testing.assert_close(adaptive_probs, fixed_probs, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("frames,tau", [(16, 7), (24, 7), (32, 7), (15, 3)])
@pytest.mark.parametrize("with_guide", [False, True])
def test_fixed_beta_odd_map_counts(dtype, frames, tau, with_guide):
    """An odd number of maps per entry, above one block: two-map steps, then a one-map step."""
    case = Case(frames=frames, tau=tau, dtype=dtype, height=5, width=13, heads=1, adaptive_beta=False,
                beta=4.0, guide_size=(3, 4) if with_guide else None)
    scores, guide = make_inputs(case, seed=frames)
    probs, stats = run_cpp(scores, guide, case)
    _assert_matches_in_its_dtype(scores, guide, case, probs, stats)


@pytest.mark.parametrize("adaptive", [False, True])
def test_output_large_enough_for_huge_pages(adaptive):
    """A 16.8 MB output (over the kernel's 16 MiB huge-page threshold), fully written and correct."""
    case = Case(frames=32, tau=7, height=16, width=16, heads=8, guide_size=(8, 8), adaptive_beta=adaptive)
    scores, guide = make_inputs(case, seed=22)
    assert scores.nbytes >= 16 * 2**20
    probs, stats = run_cpp(scores, guide, case)
    assert_matches_reference(scores, guide, case, probs, stats)


def test_public_function_uses_cpp_by_default_on_cpu(monkeypatch):
    monkeypatch.delenv("BYTHEWAY_BACKEND", raising=False)
    assert btw.select_backend(torch.device("cpu")) == "cpp"
    case = Case(batch=4, energy_scope="sample")
    scores, guide = make_inputs(case)
    probs, stats = btw.bytheway_attention_probs(scores, guide, alpha=case.alpha, beta=case.beta, tau=case.tau,
                                                energy_scope="sample", return_stats=True)
    assert stats.shape == (2, 6)
    assert_matches_reference(scores, guide, Case(batch=4, energy_scope="sample", parts=2), probs, stats)


def test_forced_cpp_errors_clearly_when_unavailable(monkeypatch):
    monkeypatch.setattr(cpp_backend, "cpp_status", lambda: CppStatus(False, "simulated: no C++ compiler"))
    monkeypatch.setattr(cpp_backend, "_extension", None)  # never built
    scores, guide = make_inputs(Case())
    monkeypatch.setenv("BYTHEWAY_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="BYTHEWAY_BACKEND=cpp.*simulated: no C\\+\\+ compiler"):
        btw.bytheway_attention_probs(scores, guide, alpha=0.6, beta=1.5, tau=7)
    monkeypatch.delenv("BYTHEWAY_BACKEND")
    assert btw.select_backend(torch.device("cpu")) == "reference"


@pytest.mark.parametrize("adaptive,beta_max", [(False, None), (True, None), (True, 1e6)])
@pytest.mark.parametrize("frames,tau", [(16, 7), (16, 3), (9, 2)])
def test_float64_at_the_largest_beta(frames, tau, adaptive, beta_max):
    case = Case(frames=frames, tau=tau, beta=1e6, adaptive_beta=adaptive, beta_max=beta_max)
    scores, guide = make_inputs(case, seed=13)
    scores, guide = scores.double(), guide.double()
    probs, stats = run_cpp(scores, guide, case)
    ref_probs, ref_stats = reference.bytheway_attention_probs(scores, guide, return_stats=True, **case.kwargs())
    assert torch.isfinite(probs).all() and torch.isfinite(stats).all()
    torch.testing.assert_close(probs, ref_probs, atol=1e-12 * 1e6, rtol=1e-10)
    torch.testing.assert_close(stats, ref_stats, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("logits", ["+-1e4", "+-finfo.max", "1e4 + 3 randn"])
def test_extreme_finite_logits_and_zero_guide_stay_finite(dtype, logits):
    """Issue 11 item 3 on every dtype: huge logits, a zero guide with alpha = 1, beta = 1e6."""
    case = Case(alpha=1.0, beta=1e6, adaptive_beta=True)
    scores, guide = make_inputs(case, seed=14)
    big = torch.finfo(dtype).max
    scores = {"+-1e4": scores.sign() * 1e4, "+-finfo.max": scores.sign().double() * big,
              "1e4 + 3 randn": 1e4 + scores}[logits].to(dtype)
    guide = torch.zeros_like(guide, dtype=dtype)
    probs, stats = run_cpp(scores, guide, case)
    assert torch.isfinite(probs).all() and torch.isfinite(stats).all()
    if dtype != torch.float64 or logits != "+-finfo.max":  # the float64 truth overflows there too
        assert_matches_reference(scores, guide, case, probs, stats)
