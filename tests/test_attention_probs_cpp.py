"""The compiled C++ CPU kernel (csrc/) vs the reference.

The first test to need the extension builds it (JIT, ~20 s once per source/CPU/torch version,
then cached). These tests fail rather than skip when it cannot be built: CI must build it.
"""

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


# Frame counts with a compile-time path in the kernel (8, 16, 24, 32; a row-blocked band product)
# and runtime-F ones around them, each with an interior band (neither empty-ish nor full).
@pytest.mark.parametrize("frames,tau", [(8, 1), (16, 3), (24, 7), (24, 4), (32, 7), (32, 11), (12, 2), (31, 7)])
@pytest.mark.parametrize("adaptive,upsample", [(True, "nearest"), (False, "bilinear")])
def test_compiled_frame_counts_with_interior_bands(frames, tau, adaptive, upsample):
    case = Case(frames=frames, tau=tau, height=3, width=5, guide_size=(2, 3), guide_upsample=upsample,
                adaptive_beta=adaptive, beta=3.0)
    scores, guide = make_inputs(case, seed=frames + tau)
    probs, stats = run_cpp(scores, guide, case)
    assert_matches_reference(scores, guide, case, probs, stats)


@pytest.mark.parametrize("adaptive,scope,frames,tau", [
    (True, "batch", 16, 7), (True, "sample", 16, 7), (False, "batch", 16, 7),
    (True, "batch", 24, 7), (True, "sample", 32, 7),
])
def test_one_and_two_threads_agree_bitwise(adaptive, scope, frames, tau):
    case = Case(frames=frames, tau=tau, batch=4, height=16, width=12, heads=4, guide_size=(8, 6),
                adaptive_beta=adaptive, energy_scope=scope, beta=2.0)
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
    scores, guide = make_inputs(Case())
    monkeypatch.setenv("BYTHEWAY_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="BYTHEWAY_BACKEND=cpp.*simulated: no C\\+\\+ compiler"):
        btw.bytheway_attention_probs(scores, guide, alpha=0.6, beta=1.5, tau=7)
    monkeypatch.delenv("BYTHEWAY_BACKEND")
    assert btw.select_backend(torch.device("cpu")) == "reference"


def test_missing_build_tool_reports_unavailable_without_raising(monkeypatch):
    monkeypatch.setattr(torch.utils.cpp_extension, "is_ninja_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="ninja"):
        status = cpp_backend.cpp_status.__wrapped__()
    assert status == CppStatus(False, "ninja is not installed (pip install ninja)")


def test_failed_build_reports_unavailable_without_raising(monkeypatch, tmp_path):
    (tmp_path / "attention_probs_cpu.cpp").write_text("#error simulated broken source\n")
    monkeypatch.setattr(cpp_backend, "source_dir", lambda: tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="build failed"):
        status = cpp_backend.cpp_status.__wrapped__()
    assert not status.available and "simulated broken source" in status.reason
