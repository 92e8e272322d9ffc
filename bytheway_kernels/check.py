"""`python -m bytheway_kernels check` and `info`: what runs here, how accurate, how fast.

Timings printed here are a quick sanity check; the project's performance figures come from the
pytest-benchmark suite in benchmarks/. Each time is the median of several repeats, printed with
its spread (max - min over the repeats, as % of the median); a spread above NOISY_SPREAD says
the machine is busy and the ratios should not be trusted.

Examples:
    $ python -m bytheway_kernels check --quick
    >>> from bytheway_kernels.check import run_check
    >>> run_check(quick=True, repeats=5)  # doctest: +SKIP
    0
"""

from __future__ import annotations

import os
import sys
import statistics
import time
from contextlib import contextmanager
from typing import NamedTuple

import torch

from ._environ import choice_setting, triton_interpreter
from .config import PRESETS
from .ops.attention_probs import reference
from .ops.attention_probs import bytheway_attention_probs
from .ops.dispatch import BACKEND_ENV, BACKENDS

# AnimateDiff, SD1.5 UNet, 512x512, 16 frames, CFG, 8 heads (docs/DESIGN.md section 5).
ANIMATEDIFF_SHAPES = {"up_blocks.1": 16, "up_blocks.2": 32, "up_blocks.3": 64}
QUICK_SHAPES = {"small 8x8": 8}
PRESET_NAME = "animatediff"
#: Timing spread ((max - min) / median over the repeats) above which a warning line is printed.
NOISY_SPREAD = 0.25


def backend_availability(device: torch.device) -> dict:
    """backend -> (usable on `device`, reason).

    Examples:
        >>> backend_availability(torch.device("cpu"))["reference"]
        (True, 'pure torch, always available')
    """
    from .ops.attention_probs.cpp import cpp_status

    try:
        import triton  # noqa: F401

        triton_ok, triton_reason = True, f"triton {triton.__version__}"
    except ImportError as error:
        triton_ok, triton_reason = False, f"triton not importable ({error})"
    if triton_ok and device.type != "cuda":
        if triton_interpreter():
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
    """Print the versions, the device and each backend's availability (`info`); returns 0, or 2
    after one error line when an environment setting is invalid."""
    from . import __version__

    from .ops.dispatch import environment_problem, select_backend

    problem = environment_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"bytheway_kernels {__version__}, torch {torch.__version__}, device {device}")

    availability = backend_availability(device)
    for name, (ok, reason) in availability.items():
        print(f"  {name:10s} {'available' if ok else 'unavailable':12s} {reason}")
    forced = f" (forced by {BACKEND_ENV})" if choice_setting(BACKEND_ENV, BACKENDS) else ""
    print(f"  default backend for {device}: {select_backend(device)}{forced}")
    from .ops.launch import DIRECT_LAUNCH_ENV, direct_launch_enabled

    launches = "direct launcher" if availability["triton"][0] and direct_launch_enabled() else "through Triton"
    print(f"  Triton launches: {launches} ({DIRECT_LAUNCH_ENV}={os.environ.get(DIRECT_LAUNCH_ENV, 'unset')})")
    if availability["triton"][0]:
        from .ops.triton_rules import (BAND_PRODUCT, BAND_PRODUCT_ENV, FUSED_SPLIT_PADDINGS,
                                       THREAD_ROW_FRAME_MULTIPLE)

        product = {"tensor-cores": "three tf32 products on tensor cores",
                   "fma": "one fp32 dot (FMA units)",
                   "rank-one": "rank-one terms of P in the map op, the fused attention's own choice",
                   "frequencies": f"the band's frequencies, one row per thread, in the map op where "
                                  f"F is a multiple of {THREAD_ROW_FRAME_MULTIPLE} (else one fp32 "
                                  f"dot), the fused attention's own choice",
                   "auto": f"the band's frequencies, one row per thread, in the map op where F is a "
                           f"multiple of {THREAD_ROW_FRAME_MULTIPLE}, else one fp32 dot (FMA units); "
                           f"three tf32 products on tensor cores in the fused attention at F_PAD "
                           f"{', '.join(map(str, FUSED_SPLIT_PADDINGS))}"}[BAND_PRODUCT]
        print(f"  Triton band product: {product} ({BAND_PRODUCT_ENV}="
              f"{os.environ.get(BAND_PRODUCT_ENV, 'unset')})")
    return 0


@contextmanager
def forced_backend(name: str):
    """Set BYTHEWAY_BACKEND to `name` inside the `with` block, and restore it afterwards."""
    previous = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ[BACKEND_ENV]
        else:
            os.environ[BACKEND_ENV] = previous


class Timing(NamedTuple):
    """Median seconds of the repeats and their spread, (max - min) / median."""

    median: float
    spread: float


def time_repeats(fn, repeats: int) -> Timing:
    """Time `fn()` `repeats` times after one warm-up call (compilation, caches).

    Examples:
        >>> time_repeats(lambda: sum(range(1000)), 5).median > 0
        True
    """
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return Timing(median, (max(times) - min(times)) / median if median > 0 else 0.0)


def run_check(quick: bool = False, repeats: int = 5) -> int:
    """Every usable backend vs the float64 reference at AnimateDiff shapes; 1 on any failure.

    Each time is the median of `repeats` runs with its spread; one warning line at the end when
    any spread exceeds NOISY_SPREAD."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    preset = PRESETS[PRESET_NAME]
    op_kwargs = preset.op_kwargs()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    tolerance = 5e-3 if dtype == torch.float16 else 1e-4
    availability = backend_availability(device)
    timed = [b for b in BACKENDS if availability[b][0] and not (b == "triton" and device.type != "cuda")]
    print(f"device {device}, dtype {str(dtype)[6:]}, preset {PRESET_NAME} (alpha {preset.alpha}, "
          f"beta {preset.beta}, tau {preset.tau}, {'adaptive' if preset.adaptive_beta else 'fixed'}), "
          f"guide = up_blocks.1 map, {preset.guide_upsample}; times: median of {repeats} (spread max-min)")
    for name, (ok, reason) in availability.items():
        if name not in timed:
            print(f"  {name}: not timed here ({reason})")
    failed = False
    noisiest = 0.0
    gen = torch.Generator().manual_seed(0)
    for block, size in (QUICK_SHAPES if quick else ANIMATEDIFF_SHAPES).items():
        guide_size = min(size, 16)
        scores = (torch.randn((2, size, size, 8, 16, 16), generator=gen) * 3).to(device, dtype)
        guide = torch.softmax(torch.randn((2, guide_size, guide_size, 8, 16, 16), generator=gen) * 2, -1)
        guide = guide.to(device, dtype)
        truth = reference.bytheway_attention_probs(scores.double(), guide.double(), **op_kwargs)
        softmax = time_repeats(lambda: torch.softmax(scores, -1), repeats)
        noisiest = max(noisiest, softmax.spread)
        print(f"\n{block}: scores {tuple(scores.shape)}  torch.softmax {softmax.median * 1e3:8.3f} ms "
              f"(spread {softmax.spread:4.0%})")
        for backend in timed:
            with forced_backend(backend):
                probs = bytheway_attention_probs(scores, guide, **op_kwargs)
                error = (probs.double() - truth).abs().max().item()
                timing = time_repeats(lambda: bytheway_attention_probs(scores, guide, **op_kwargs), repeats)
            noisiest = max(noisiest, timing.spread)
            ok = error <= tolerance and bool(torch.isfinite(probs).all())
            failed |= not ok
            print(f"  {backend:10s} max|err| {error:.2e} {'ok ' if ok else 'BAD'}  "
                  f"{timing.median * 1e3:8.3f} ms (spread {timing.spread:4.0%})  "
                  f"({timing.median / softmax.median:5.2f}x softmax)")
    if noisiest > NOISY_SPREAD:
        print(f"\nwarning: timings are noisy (spread up to {noisiest:.0%} > {NOISY_SPREAD:.0%}): the machine "
              "is busy; the ratios are unreliable (rerun when idle, or use benchmarks/)")
    print("\ncheck " + ("FAILED" if failed else "passed"))
    return 1 if failed else 0
