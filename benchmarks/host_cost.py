"""Host time per eager call, split into our Python and Triton's launch path (needs CUDA).

Used by benchmarks/map_op_kernel_times.py and benchmarks/temporal_attention_gpu_check.py. Host
time is the wall time per call of back-to-back calls without synchronising (what an eager
pipeline pays on the CPU; the median of 5 batches, as the suite's host column), measured four
ways in one run:
- "triton launch": every launch through `kernel[grid](...)` (`BYTHEWAY_DIRECT_LAUNCH=0`);
- "direct launch": as shipped (bytheway_kernels/ops/launch.py);
- "direct, tensors": the same, but handing Triton's C launcher the tensors themselves, as it did
  before 2026-11-27: the launcher then calls `data_ptr()` and the driver's `cuPointerGetAttribute`
  once per tensor argument, which passing the pointers as ints skips (without the map op's
  prepared eager calls, whose repeats hand over pointers of their own);
- "python only": every kernel launch replaced by nothing, so what is left is our own host work
  (validation, allocation, launch plan); the difference to the others is the launch path's cost.

Run as a script (`python benchmarks/host_cost.py`) it prints the four for the map op and fused
temporal attention at up_blocks.1's shape (AnimateDiff preset, fixed and adaptive beta), then
the host time of three torch calls for comparison (`torch_floor_calls`). Without
CUDA it prints, through the Triton backend on CPU tensors (kernels never run, never interpreted),
"python only" and "direct launcher, stubbed": the direct launcher's own host work as well, with
a stand-in for the compiled kernel whose launch does nothing. That is everything a GPU call's
host time holds except Triton's C launcher and the CUDA driver, measurable on a CPU machine.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from contextlib import contextmanager

import torch

from bytheway_kernels.ops import launch as launch_module
from bytheway_kernels.testing import direct_launches_stubbed

HOST_COLUMNS = ("triton launch", "direct launch", "direct, tensors", "python only")


@contextmanager
def _environment(name: str, value):
    previous = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextmanager
def _launches_skipped():
    saved = launch_module._run_launches, launch_module.run_prepared
    launch_module._run_launches = lambda launches: None
    launch_module.run_prepared = lambda prepared, pointers, stream: None
    try:
        yield
    finally:
        launch_module._run_launches, launch_module.run_prepared = saved


_SHIPPED_CALL_ARGUMENTS = launch_module._call_arguments


def _tensors_passed_whole(values: dict) -> tuple:
    """`launch._call_arguments` as it was before 2026-11-27: the shipped signature (the same
    Python work) with this call's values as they are (tensors, not their pointers)."""
    signature, _ = _SHIPPED_CALL_ARGUMENTS(values)
    return signature, list(values.values())


@contextmanager
def _tensor_arguments():
    """The direct launcher handing over tensors, and no prepared eager calls (their repeats pass
    pointers without `_call_arguments`)."""
    from bytheway_kernels.ops.attention_probs import triton as map_kernels

    saved = launch_module._call_arguments, launch_module.prepare_direct
    launch_module._call_arguments = _tensors_passed_whole
    launch_module.prepare_direct = lambda launches, sources, device: None
    map_kernels._EAGER_CALLS.clear()
    try:
        yield
    finally:
        launch_module._call_arguments, launch_module.prepare_direct = saved


class _CompiledStandIn:
    """Stands in for a compiled Triton kernel: its launcher does nothing."""

    function = None
    packed_metadata = None

    def run(self, *args) -> None:
        pass


def _direct_launches_stubbed():
    """The direct launcher on, the compiled kernel a stand-in (CPU tensors, no driver)."""
    stand_in = _CompiledStandIn()
    return direct_launches_stubbed(lambda launch: stand_in)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds_per_call(fn, calls_per_batch: int, batches: int) -> float:
    """The median over `batches` batches of the wall time per call of `calls_per_batch`
    back-to-back calls without synchronising, each batch starting on an idle device (also the
    suite's host column: benchmarks/harness.py, `host_time`)."""
    per_call = []
    for _ in range(batches):
        _synchronize()
        started = time.perf_counter()
        for _ in range(calls_per_batch):
            fn()
        per_call.append((time.perf_counter() - started) / calls_per_batch)
    _synchronize()
    return statistics.median(per_call)


def host_us_per_call(fn, calls: int = 200, batches: int = 5) -> float:
    """Microseconds per call, after one warm-up call: `median_seconds_per_call` over `batches`
    batches of calls // batches."""
    fn()
    return median_seconds_per_call(fn, max(1, calls // batches), batches) * 1e6


def host_costs(fn, calls: int = 200) -> dict:
    """{column of HOST_COLUMNS: host microseconds per call of `fn`}."""
    costs = {}
    with _environment(launch_module.DIRECT_LAUNCH_ENV, "0"):
        costs["triton launch"] = host_us_per_call(fn, calls)
    with _environment(launch_module.DIRECT_LAUNCH_ENV, "1"):
        costs["direct launch"] = host_us_per_call(fn, calls)
        with _tensor_arguments():
            costs["direct, tensors"] = host_us_per_call(fn, calls)
    with _launches_skipped():
        costs["python only"] = host_us_per_call(fn, calls)
    return costs


def _calls(device: str) -> dict:
    """Public calls at up_blocks.1's shape (B = 2 with CFG, 16x16, 8 heads, F = 16, d = 160)."""
    import bytheway_kernels as btw

    preset = btw.PRESETS["animatediff"]
    scores = torch.randn((2, 16, 16, 8, 16, 16), device=device, dtype=torch.float16)
    guide = torch.softmax(torch.randn((2, 16, 16, 8, 16, 16), device=device), -1).half()
    q, k, v = torch.randn((512, 16, 3 * 1280), device=device, dtype=torch.float16).split(1280, -1)
    settings = dict(alpha=preset.alpha, beta=preset.beta, tau=preset.tau)
    return {
        "map op fixed": lambda: btw.bytheway_attention_probs(scores, guide, adaptive_beta=False, **settings),
        "map op adaptive": lambda: btw.bytheway_attention_probs(scores, guide, **settings),
        "attention plain": lambda: btw.temporal_attention(q, k, v, heads=8, height=16, width=16),
        "attention fixed": lambda: btw.temporal_attention(q, k, v, heads=8, height=16, width=16,
                                                          guide=guide, **settings),
        "attention adaptive": lambda: btw.temporal_attention(q, k, v, heads=8, height=16, width=16,
                                                             guide=guide, adaptive_beta=True, **settings),
    }


def torch_floor_calls(device: str) -> dict:
    """Torch calls that bound an op call's host time from below, at up_blocks.1's map shape:
    softmax (the map op's plain counterpart), the output's allocation, a zeroed small buffer (what
    an adaptive call paid for its workspace before eager calls reused one)."""
    scores = torch.randn((2, 16, 16, 8, 16, 16), device=device, dtype=torch.float16)
    return {
        "torch.softmax": lambda: torch.softmax(scores, -1),
        "torch.empty_like": lambda: torch.empty_like(scores),
        "torch.zeros(600)": lambda: torch.zeros(600, device=device),
    }


def main() -> int:
    on_gpu = torch.cuda.is_available()
    if not on_gpu:  # the Triton backend's host path on CPU tensors (TRITON_INTERPRET lets them in)
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["BYTHEWAY_BACKEND"] = "triton"
    device = "cuda" if on_gpu else "cpu"
    columns = HOST_COLUMNS if on_gpu else ("python only", "direct launcher, stubbed")
    print(f"host us/call on {torch.cuda.get_device_name() if on_gpu else 'CPU'}, torch {torch.__version__}, "
          f"{os.cpu_count()} logical CPUs: " + " / ".join(columns))
    for name, fn in _calls(device).items():
        if on_gpu:
            costs = host_costs(fn, 500)
        else:
            with _launches_skipped():
                costs = {"python only": min(host_us_per_call(fn, 2000) for _ in range(3))}
            with _direct_launches_stubbed():
                costs["direct launcher, stubbed"] = min(host_us_per_call(fn, 2000) for _ in range(3))
        print(f"  {name:20s} " + " / ".join(f"{costs[column]:6.1f}" for column in columns))
    print("torch calls, host us/call: " + ", ".join(
        f"{name} {host_us_per_call(fn, 500):.1f}" for name, fn in torch_floor_calls(device).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
