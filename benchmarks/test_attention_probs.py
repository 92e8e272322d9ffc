"""The map op: torch.softmax (the floor), every backend of bytheway_attention_probs and the
official-style torch.fft baseline, over the same scores, one group per shape and dtype; and the
cost of one call on a tiny tensor, where the per-call overhead is all there is."""

from __future__ import annotations

import pytest
import torch

import bytheway_kernels as btw
import harness
from bytheway_kernels.ops.dispatch import BACKEND_ENV
from official_fft import official_fft_probs


def group_name(shape: harness.Shape, dtype: torch.dtype) -> str:
    return f"map {shape.label} {str(dtype).removeprefix('torch.')}"


@pytest.fixture(scope="module")
def map_inputs(shape, dtype):
    return harness.make_map_inputs(shape, dtype)


@pytest.fixture(scope="module")
def expected(map_inputs):
    """variant -> float64 reference probs, computed on first use and kept for the shape."""
    scores, guide = map_inputs
    cache = {}

    def lookup(variant: str) -> torch.Tensor:
        if variant not in cache:
            adaptive, with_guide = harness.VARIANTS[variant]
            cache[variant] = harness.reference_probs(scores, guide if with_guide else None, adaptive)
        return cache[variant]

    return lookup


#: Backends timed. The Triton backend launches through the direct launcher (its default,
#: bytheway_kernels/ops/launch.py); benchmarks/host_cost.py compares it with Triton's own path.
BACKENDS = ["triton", "cpp", "reference"]


def backend_skip_reason(backend: str):
    """Why `backend` cannot be timed on this device, or None."""
    if backend.startswith("triton") and harness.DEVICE.type != "cuda":
        return "the Triton backend is timed on CUDA only (on CPU it needs TRITON_INTERPRET=1, far too slow to time)"
    if backend == "cpp":
        if harness.DEVICE.type != "cpu":
            return "the C++ backend runs on CPU tensors only"
        from bytheway_kernels.ops.attention_probs.cpp import cpp_status

        status = cpp_status()
        if not status.available:
            return f"the C++ backend is not available: {status.reason}"
    return None


def test_softmax(bench, shape, dtype, map_inputs):
    scores, _ = map_inputs
    probs = bench(lambda: torch.softmax(scores, dim=-1), group=group_name(shape, dtype),
                  impl="torch.softmax", floor=True, bytes_moved=harness.map_bytes(scores, None))
    harness.assert_close_to(probs, torch.softmax(scores.double(), dim=-1), dtype)


@pytest.mark.parametrize("variant", list(harness.VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bytheway_op(bench, monkeypatch, shape, dtype, map_inputs, expected, backend, variant):
    reason = backend_skip_reason(backend)
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv(BACKEND_ENV, backend)
    adaptive, with_guide = harness.VARIANTS[variant]
    scores, guide = map_inputs
    guide = guide if with_guide else None
    kwargs = harness.op_kwargs(adaptive)
    probs = bench(lambda: btw.bytheway_attention_probs(scores, guide, **kwargs),
                  group=group_name(shape, dtype), impl=backend.replace("-", " "), variant=variant,
                  bytes_moved=harness.map_bytes(scores, guide), breakdown=backend == "triton",
                  paired_with=softmax_pairing(backend, scores))
    harness.assert_close_to(probs, expected(variant), dtype)


def softmax_pairing(backend: str, scores):
    """("torch.softmax", its call) for the C++ rows on a CPU, whose × softmax targets are wall-time
    quotients (`harness.interleaved_ratio` times them within one stretch of time); else None (on a
    GPU those targets use kernel times)."""
    if backend != "cpp" or harness.DEVICE.type != "cpu":
        return None
    return "torch.softmax", lambda: torch.softmax(scores, dim=-1)


@pytest.mark.parametrize("variant", list(harness.VARIANTS))
def test_official_fft(bench, shape, dtype, map_inputs, expected, variant):
    adaptive, with_guide = harness.VARIANTS[variant]
    scores, guide = map_inputs
    guide = guide if with_guide else None
    kwargs = harness.op_kwargs(adaptive)
    probs = bench(lambda: official_fft_probs(scores, guide, **kwargs),
                  group=group_name(shape, dtype), impl="official fft", variant=variant,
                  bytes_moved=harness.map_bytes(scores, guide), paired_with=fast_op_call(scores, guide, kwargs))
    harness.assert_close_to(probs, expected(variant), dtype)


def fast_op_call(scores, guide, kwargs):
    """(backend, call) of the map op as a plain call runs it on this device, which the fft
    baseline's speed-up target compares against; None where that is not the device's compiled
    backend (triton on CUDA, cpp on CPU: no C++ build, or BYTHEWAY_BACKEND forcing another)."""
    backend = btw.select_backend(harness.DEVICE)  # on CPU this builds the C++ kernel, before timing
    if backend != ("triton" if harness.DEVICE.type == "cuda" else "cpp"):
        return None
    return backend, lambda: btw.bytheway_attention_probs(scores, guide, **kwargs)


#: One map of each half of a CFG batch: per-call overhead, against torch.softmax on the same tensor.
TINY_SCORES = (2, 1, 1, 1, 16, 16)


@pytest.mark.parametrize("case", ["softmax", "fixed-noguide", "adaptive-noguide",
                                  "fft fixed-noguide", "fft adaptive-noguide"])
def test_tiny_call(bench, dtype, case):
    gen = torch.Generator().manual_seed(3)
    scores = (torch.randn(TINY_SCORES, generator=gen) * 3.0).to(harness.DEVICE, dtype)
    group = f"tiny-call map {'x'.join(map(str, TINY_SCORES))} {str(dtype).removeprefix('torch.')}"
    if case == "softmax":
        probs = bench(lambda: torch.softmax(scores, dim=-1), group=group, impl="torch.softmax", floor=True)
        harness.assert_close_to(probs, torch.softmax(scores.double(), dim=-1), dtype)
        return
    variant = case.removeprefix("fft ")
    adaptive, _ = harness.VARIANTS[variant]
    kwargs = harness.op_kwargs(adaptive)
    if case.startswith("fft "):
        probs = bench(lambda: official_fft_probs(scores, None, **kwargs), group=group, impl="official fft",
                      variant=variant, paired_with=fast_op_call(scores, None, kwargs))
    else:
        backend = btw.select_backend(harness.DEVICE)  # on CPU this builds the C++ kernel, before timing
        probs = bench(lambda: btw.bytheway_attention_probs(scores, None, **kwargs), group=group, impl=backend,
                      variant=variant, paired_with=softmax_pairing(backend, scores))
    harness.assert_close_to(probs, harness.reference_probs(scores, None, adaptive), dtype)
