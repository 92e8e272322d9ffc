"""Shapes, inputs, timing and correctness checks shared by the benchmark modules.

On a GPU every case is timed three ways besides pytest-benchmark's wall clock (`gpu_timings`):
kernel time between CUDA events with L2 flushed, host cost per unsynchronised call, and peak
memory; the Triton and fused rows also get a per-kernel breakdown from torch.profiler.

The cases follow docs/DESIGN.md section 5 (AnimateDiff, SD1.5, 512x512, 16 frames, CFG, 8 heads).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import statistics
import time
from typing import Callable, Dict, Optional, Tuple

import torch

import bytheway_kernels as btw
from bytheway_kernels.testing import PROB_TOLERANCES  # two output ulps, shared with tests/
from host_cost import median_seconds_per_call  # benchmarks/ is on sys.path

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
#: GPUs run the dtypes pipelines use there; the CPU runs fp32.
DTYPES = (torch.float16, torch.bfloat16) if DEVICE.type == "cuda" else (torch.float32,)

#: A whole layer or UNet also rounds q, k, v, the scores and every activation to the storage
#: dtype and runs more GEMMs after the map: its output gets ten times the map's tolerance
#: (on CPU fp32 the measured errors stay below a tenth of the map's tolerance).
COMPOSITE_TOLERANCE_SCALE = 10

#: The AnimateDiff preset (alpha, beta_0, tau); tau = 7 is valid for every F benchmarked.
PRESET = btw.PRESETS["animatediff"]

#: Map-op variants: (adaptive beta, with guide).
VARIANTS = {
    "fixed-noguide": (False, False),
    "fixed-guide": (False, True),
    "adaptive-noguide": (True, False),
    "adaptive-guide": (True, True),
}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One temporal attention layer: scores (batch, height, width, heads, frames, frames)."""

    block: str
    height: int
    width: int
    frames: int
    channels: int  # the layer's hidden size (heads * head_dim), for the whole-layer benchmark
    guide_size: Tuple[int, int]  # spatial size of the anchor (up_blocks.1) map
    batch: int = 2  # CFG: unconditional and conditional video
    heads: int = 8

    @property
    def scores_shape(self) -> Tuple[int, ...]:
        return (self.batch, self.height, self.width, self.heads, self.frames, self.frames)

    @property
    def guide_shape(self) -> Tuple[int, ...]:
        return (self.batch, *self.guide_size, self.heads, self.frames, self.frames)

    @property
    def label(self) -> str:
        return f"{self.block} {self.height}x{self.width} F{self.frames}"


#: docs/DESIGN.md section 5, plus F = 24 and 32 at the middle resolution.
FULL_SHAPES = (
    Shape("up_blocks.1", 16, 16, 16, 1280, (16, 16)),
    Shape("up_blocks.2", 32, 32, 16, 640, (16, 16)),
    Shape("up_blocks.3", 64, 64, 16, 320, (16, 16)),
    Shape("up_blocks.2", 32, 32, 24, 640, (16, 16)),
    Shape("up_blocks.2", 32, 32, 32, 640, (16, 16)),
)

#: `--bench-quick`: the same code paths (guide upsampling included) at sizes that run in
#: milliseconds, for the CI smoke run.
QUICK_SHAPES = (
    Shape("quick", 8, 8, 16, 320, (4, 4)),
    Shape("quick", 8, 8, 24, 320, (4, 4)),
)


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed_call(fn: Callable) -> Callable:
    """`fn` made to wait for the device, so that the wall-clock timer sees the whole call."""
    if DEVICE.type != "cuda":
        return fn

    def call():
        result = fn()
        torch.cuda.synchronize()
        return result

    return call


#: `interleaved_ratio`'s rounds at least, its time budget in seconds beyond them, and the least
#: calls and the least time of each run of calls of one function in a round (the first call of a
#: run is a warm-up: the other function has just evicted what it cached).
MIN_ROUNDS = 5
ROUND_BUDGET_S = 0.3
MIN_RUN_CALLS = 3
MIN_RUN_S = 2e-3


def interleaved_ratio(fn: Callable, other: Callable, budget_s: float = ROUND_BUDGET_S) -> float:
    """wall(fn) / wall(other) from interleaved rounds: each round runs a run of synchronised
    calls of one function, then of the other (which one first alternates), and takes the
    quotient of their median call times after each run's first call; the result is the median
    over the rounds. A run has `MIN_RUN_CALLS` calls, or as many as last `MIN_RUN_S` at the
    function's warm-up speed.

    Two suite rows are timed seconds apart, so a shared machine's slow spell can fall on one and
    not the other, and their quotient moves with the machine (the CPU runs recorded the fft
    speed-up at up_blocks.1 as 9.05x and 12.2x with the C++ kernel unchanged). One round's calls
    see the same machine, and the median over rounds drops the rounds a spell split. Runs of
    repeated calls keep the warm caches of the suite's repeated calls: with single calls
    alternating, each found its inputs evicted, which on the CPU machine cut the quotient by up
    to 2.4x at the smoke shapes (8.8x against 20.8x)."""
    fn, other = timed_call(fn), timed_call(other)

    def calls_per_run(call) -> int:
        call()
        started = time.perf_counter()
        call()
        return max(MIN_RUN_CALLS, min(1000, int(MIN_RUN_S / max(time.perf_counter() - started, 1e-9))))

    runs = {fn: calls_per_run(fn), other: calls_per_run(other)}

    def median_call(call) -> tuple:
        times = []
        for _ in range(runs[call]):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        return statistics.median(times[1:]), sum(times)

    ratios, spent = [], 0.0
    while len(ratios) < MIN_ROUNDS or spent < budget_s:
        order = (fn, other) if len(ratios) % 2 == 0 else (other, fn)
        timed = {call: median_call(call) for call in order}  # runs in `order`
        ratios.append(timed[fn][0] / timed[other][0])
        spent += timed[fn][1] + timed[other][1]
    return statistics.median(ratios)


#: Bytes zeroed between timed GPU calls to evict the inputs from L2, as `triton.testing.do_bench`
#: does (the H100/H200 L2 is 50/60 MB).
L2_FLUSH_BYTES = 256 << 20
#: Longest GPU sleep queued ahead of a timed call (see `kernel_time`).
MAX_LEAD_S = 0.05


@functools.lru_cache(maxsize=None)
def _l2_flush_buffer() -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=DEVICE)


@functools.lru_cache(maxsize=None)
def _sleep_cycles_per_second() -> float:
    """Clock rate of `torch.cuda._sleep`, measured once with CUDA events."""
    torch.cuda._sleep(1000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 20_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) * 1e-3)


#: Batches of back-to-back calls `host_time` times; it reports their median.
HOST_BATCHES = 5


def host_time(fn: Callable, wall_s: float, budget_s: float = 0.05) -> float:
    """Host cost per call: wall time of N back-to-back calls without synchronising, over N; the
    median of `HOST_BATCHES` such batches (each starting on an idle device), so that one batch
    disturbed by another process does not set the figure. Calls too slow for that many batches
    of 3 in `budget_s` (a denoiser step) get one batch of 3, as before.

    This is the dispatch and launch cost an eager pipeline pays on the CPU side. Where the device
    is the slower side, the launch queue fills and the figure tends to the device time.
    """
    batches = HOST_BATCHES if 3 * HOST_BATCHES * wall_s <= budget_s else 1
    calls = min(100, max(3, int(budget_s / batches / max(wall_s, 1e-6))))
    return median_seconds_per_call(fn, calls, batches)


def kernel_time(fn: Callable, wall_s: float, host_s: float, budget_s: float = 0.1) -> float:
    """Median device time of one call, between CUDA events, with L2 flushed before each call.

    Like `triton.testing.do_bench(fn, return_mode="median")`, plus one thing: a GPU sleep longer
    than the call's host cost is queued before the start event, so the host has issued every
    launch of the call before the device reaches it. The events then enclose the kernels
    back to back and no host gaps, whatever the host cost (up to `MAX_LEAD_S`).
    """
    flush = _l2_flush_buffer()
    lead_s = min(1.5 * host_s + 20e-6, MAX_LEAD_S)
    lead_cycles = int(lead_s * _sleep_cycles_per_second())
    repeats = min(100, max(5, int(budget_s / (wall_s + lead_s + 1e-4))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        flush.zero_()
        torch.cuda._sleep(lead_cycles)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in zip(starts, ends)) * 1e-3


def device_us(fn: Callable) -> float:
    """Median device microseconds per call of `fn` (`kernel_time`), after a first call that
    compiles and prepares, the lead and repeats sized from one synchronised call and `host_time`;
    for the GPU scripts."""
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    wall_s = time.perf_counter() - started
    return kernel_time(fn, wall_s, host_time(fn, wall_s)) * 1e6


def peak_memory(fn: Callable) -> int:
    """Peak device memory one call allocates above what was allocated before it (its output
    included), from `torch.cuda.max_memory_allocated` after a reset."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def kernel_breakdown(fn: Callable, calls: int = 10) -> Dict[str, float]:
    """Device seconds per call of each kernel (and device memset/memcpy) `fn` launches, from
    torch.profiler's device events. Empty when the profiler cannot record device activity."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
    except RuntimeError:
        return {}
    totals: Dict[str, float] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            totals[event.name] = totals.get(event.name, 0.0) + event.time_range.elapsed_us() * 1e-6 / calls
    return totals


def gpu_timings(fn: Callable, wall_s: float, breakdown: bool) -> dict:
    """`extra_info` entries of one GPU case: kernel_s, host_s, peak_bytes and, if asked, kernels."""
    host_s = host_time(fn, wall_s)
    timings = {
        "kernel_s": kernel_time(fn, wall_s, host_s),
        "host_s": host_s,
        "peak_bytes": peak_memory(fn),
    }
    if breakdown:
        timings["kernels"] = kernel_breakdown(fn)
    return timings


def fused_kernel_available() -> bool:
    """Whether this revision has the fused temporal attention kernel and it runs on DEVICE."""
    try:
        from bytheway_kernels.ops.temporal_attention.op import fused_available
    except ImportError:
        return False
    return fused_available(DEVICE)


@contextlib.contextmanager
def kernel_setting(name: str, value):
    """`bytheway_kernels.ops.temporal_attention.triton.<name>` (a module setting such as
    `STASH_GUIDED` or `ENERGY_PROGRAMS`) set to `value` inside the block; the launch plans, which
    read it when they are built, are rebuilt on both sides."""
    from bytheway_kernels.ops.temporal_attention import triton as attention_kernels

    saved = getattr(attention_kernels, name)
    setattr(attention_kernels, name, value)
    attention_kernels._launch_plan.cache_clear()
    try:
        yield
    finally:
        setattr(attention_kernels, name, saved)
        attention_kernels._launch_plan.cache_clear()


def make_map_inputs(shape: Shape, dtype: torch.dtype, seed: int = 0):
    """Scores (logits with attention-like spread) and a row-stochastic anchor map."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(shape.scores_shape, generator=gen) * 3.0
    guide = torch.softmax(torch.randn(shape.guide_shape, generator=gen) * 2.0, dim=-1)
    return scores.to(DEVICE, dtype), guide.to(DEVICE, dtype)


def op_kwargs(adaptive: bool) -> dict:
    return dict(alpha=PRESET.alpha, beta=PRESET.beta, tau=PRESET.tau, adaptive_beta=adaptive)


def reference_probs(scores: torch.Tensor, guide: Optional[torch.Tensor], adaptive: bool):
    """Ground truth: the reference in float64 on the same (already rounded) inputs."""
    guide64 = None if guide is None else guide.double()
    return btw.reference.bytheway_attention_probs(scores.double(), guide64, **op_kwargs(adaptive))


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1) -> None:
    """Finite everywhere and within `scale` times the dtype's tolerance of `expected` (float64)."""
    assert torch.isfinite(actual).all(), "output has NaN or inf"
    atol, rtol = PROB_TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=scale * atol, rtol=scale * rtol)


def map_bytes(scores: torch.Tensor, guide: Optional[torch.Tensor]) -> int:
    """The map op's compulsory traffic: scores read, probs written, guide read."""
    moved = 2 * scores.numel() * scores.element_size()
    if guide is not None:
        moved += guide.numel() * guide.element_size()
    return moved


def measure_copy_bandwidth(repeats: int = 7) -> float:
    """The device's achievable bandwidth in bytes/s: median time of a large tensor copy
    (256 MiB on CPU, 1 GiB on GPU: far beyond any cache), counting read + write."""
    size = (1 << 30) if DEVICE.type == "cuda" else (256 << 20)
    src = torch.ones(size // 4, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size / statistics.median(times)


def device_name() -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (with the thread count torch uses)."""
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    model = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    return f"{model} ({torch.get_num_threads()} threads)"


def library_versions() -> dict:
    versions = {"torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = "not installed"
    try:
        import diffusers

        versions["diffusers"] = diffusers.__version__
    except ImportError:
        versions["diffusers"] = "not installed"
    return versions
