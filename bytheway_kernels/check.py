"""`python -m bytheway_kernels check` and `info`: what runs here, how accurate, how fast.

Timings printed here are a quick sanity check; the project's performance figures come from the
pytest-benchmark suite in benchmarks/.
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager

import torch

from .ops.attention_probs import reference
from .ops.attention_probs import bytheway_attention_probs
from .ops.dispatch import BACKEND_ENV, BACKENDS

# AnimateDiff, SD1.5 UNet, 512x512, 16 frames, CFG, 8 heads (DESIGN.md section 5).
ANIMATEDIFF_SHAPES = {"up_blocks.1": 16, "up_blocks.2": 32, "up_blocks.3": 64}
QUICK_SHAPES = {"small 8x8": 8}
PRESET = dict(alpha=0.6, beta=1.5, tau=7)


def backend_availability(device: torch.device) -> dict:
    """backend -> (usable on `device`, reason)."""
    from .ops.attention_probs.cpp import cpp_status

    try:
        import triton  # noqa: F401

        triton_ok, triton_reason = True, f"triton {triton.__version__}"
    except ImportError as error:
        triton_ok, triton_reason = False, f"triton not importable ({error})"
    if triton_ok and device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") == "1":
            triton_reason += " (interpreter: correct but slow, not a speed measure)"
        else:
            triton_ok, triton_reason = False, "needs a CUDA device (or TRITON_INTERPRET=1 for testing)"
    cpp = cpp_status()
    cpp_ok = cpp.available and device.type == "cpu"
    cpp_reason = cpp.reason if device.type == "cpu" or not cpp.available else "CPU tensors only"
    return {
        "reference": (True, "pure torch, always available"),
        "triton": (triton_ok, triton_reason),
        "cpp": (cpp_ok, cpp_reason),
    }


def print_info() -> int:
    from . import __version__

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"bytheway_kernels {__version__}, torch {torch.__version__}, device {device}")
    from .ops.dispatch import select_backend

    for name, (ok, reason) in backend_availability(device).items():
        print(f"  {name:10s} {'available' if ok else 'unavailable':12s} {reason}")
    print(f"  default backend for {device}: {select_backend(device)}")
    return 0


@contextmanager
def forced_backend(name: str):
    previous = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ[BACKEND_ENV]
        else:
            os.environ[BACKEND_ENV] = previous


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (compilation, caches)
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_check(quick: bool = False) -> int:
    """Every usable backend vs the float64 reference at AnimateDiff shapes; 1 on any failure."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    tolerance = 5e-3 if dtype == torch.float16 else 1e-4
    availability = backend_availability(device)
    timed = [b for b in BACKENDS if availability[b][0] and not (b == "triton" and device.type != "cuda")]
    print(f"device {device}, dtype {str(dtype)[6:]}, preset animatediff (alpha 0.6, beta 1.5, "
          f"tau 7, adaptive), guide = up_blocks.1 map, nearest")
    for name, (ok, reason) in availability.items():
        if name not in timed:
            print(f"  {name}: not timed here ({reason})")
    failed = False
    gen = torch.Generator().manual_seed(0)
    for block, size in (QUICK_SHAPES if quick else ANIMATEDIFF_SHAPES).items():
        guide_size = min(size, 16)
        scores = (torch.randn((2, size, size, 8, 16, 16), generator=gen) * 3).to(device, dtype)
        guide = torch.softmax(torch.randn((2, guide_size, guide_size, 8, 16, 16), generator=gen) * 2, -1)
        guide = guide.to(device, dtype)
        truth = reference.bytheway_attention_probs(scores.double(), guide.double(), **PRESET)
        softmax_time = median_seconds(lambda: torch.softmax(scores, -1), 5)
        print(f"\n{block}: scores {tuple(scores.shape)}  torch.softmax {softmax_time * 1e3:8.3f} ms")
        for backend in timed:
            with forced_backend(backend):
                probs = bytheway_attention_probs(scores, guide, **PRESET)
                error = (probs.double() - truth).abs().max().item()
                seconds = median_seconds(lambda: bytheway_attention_probs(scores, guide, **PRESET),
                                         3 if backend == "reference" else 5)
            ok = error <= tolerance and bool(torch.isfinite(probs).all())
            failed |= not ok
            print(f"  {backend:10s} max|err| {error:.2e} {'ok ' if ok else 'BAD'}  "
                  f"{seconds * 1e3:8.3f} ms  ({seconds / softmax_time:5.2f}x softmax)")
    print("\ncheck " + ("FAILED" if failed else "passed"))
    return 1 if failed else 0
