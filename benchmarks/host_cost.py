"""Host time per eager call, split into our Python and Triton's launch path (needs CUDA).

Used by benchmarks/map_op_kernel_times.py and benchmarks/temporal_attention_gpu_check.py. Host
time is the wall time per call of `calls` back-to-back calls without synchronising (what an eager
pipeline pays on the CPU), measured three ways in one run:
- "triton launch": as shipped, every launch through `kernel[grid](...)`;
- "direct launch": with `BYTHEWAY_DIRECT_LAUNCH=1` (bytheway_kernels/ops/launch.py);
- "python only": every kernel launch replaced by nothing, so what is left is our own host work
  (validation, allocation, launch plan); the difference to the others is the launch path's cost.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch

from bytheway_kernels.ops import launch as launch_module

HOST_COLUMNS = ("triton launch", "direct launch", "python only")


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
    original = launch_module.KernelLaunch.run
    launch_module.KernelLaunch.run = lambda self: None
    try:
        yield
    finally:
        launch_module.KernelLaunch.run = original


def host_us_per_call(fn, calls: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - started) / calls * 1e6
    torch.cuda.synchronize()
    return elapsed


def host_costs(fn, calls: int = 200) -> dict:
    """{column of HOST_COLUMNS: host microseconds per call of `fn`}."""
    costs = {}
    with _environment(launch_module.DIRECT_LAUNCH_ENV, None):
        costs["triton launch"] = host_us_per_call(fn, calls)
    with _environment(launch_module.DIRECT_LAUNCH_ENV, "1"):
        costs["direct launch"] = host_us_per_call(fn, calls)
    with _launches_skipped():
        costs["python only"] = host_us_per_call(fn, calls)
    return costs
