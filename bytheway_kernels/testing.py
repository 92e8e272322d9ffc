"""What the tests and the benchmarks share to check a backend: tolerances, poisoned outputs, and
a switch between the Triton kernels' band products, and how to run helper processes at once.

Every fused backend is compared with the pure-torch reference evaluated in float64 on the same
(already rounded) inputs, into outputs filled with NaN first so that an element a kernel fails
to write cannot pass.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

#: (atol, rtol) on probabilities against the float64 reference. The kernels accumulate in fp32
#: from the same inputs, so the difference is one final rounding to the output dtype (half an
#: ulp: 2**-11 for fp16, 2**-8 for bf16, relative) plus fp32 arithmetic over <= 64 terms (~1e-6);
#: the band term is amplified by beta, so callers multiply atol by max(1, beta). Two ulps.
PROB_TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float64: (1e-12, 1e-10),
}

#: (atol, rtol) on the float32 stats: means over all rows in scope, accumulated in fp32 (sums of
#: <= 1e4 positive terms).
STATS_TOLERANCE = (1e-5, 1e-4)


def prob_tolerance(dtype: torch.dtype) -> Tuple[float, float]:
    """(atol, rtol) for probabilities of `dtype`.

    Examples:
        >>> prob_tolerance(torch.float16)
        (0.002, 0.002)
    """
    return PROB_TOLERANCES[dtype]


def poisoned(shape, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """A contiguous tensor filled with NaN: an output that fails every check until written.

    Examples:
        >>> bool(poisoned((2, 3), torch.float32).isnan().all())
        True
    """
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)


def poisoned_like(tensor: torch.Tensor) -> torch.Tensor:
    """`poisoned` with the shape, dtype and device of `tensor`.

    Examples:
        >>> poisoned_like(torch.zeros(2, dtype=torch.bfloat16)).dtype
        torch.bfloat16
    """
    return poisoned(tensor.shape, tensor.dtype, tensor.device)


def usable_cpus() -> int:
    """The CPUs this process may run on (at least 1): how many single-threaded helper processes
    (kernel compiles, interpreter runs) the tests and benchmarks start at once.

    Examples:
        >>> usable_cpus() >= 1
        True
    """
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def run_at_once(commands: Sequence[Tuple[List[str], dict]], timeout: float,
                cwd: Optional[str] = None) -> List[Tuple[int, str, str]]:
    """Run every (arguments, environment) of `commands` as a process, all at once; return each
    one's (return code, stdout, stderr), in order. A timeout or an interrupt kills them all, so
    none is left behind."""
    processes = [subprocess.Popen(arguments, env=environment, cwd=cwd, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                 for arguments, environment in commands]
    try:
        outputs = [process.communicate(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            process.kill()
    return [(process.returncode, stdout, stderr) for process, (stdout, stderr) in zip(processes, outputs)]


@contextlib.contextmanager
def band_product(setting: str) -> Iterator[None]:
    """Inside the block, both ops' Triton kernels take a circulant band step as `setting` says
    (one of `ops.triton_rules.BAND_PRODUCTS`: "fma", one exact fp32 dot; "tensor-cores", three tf32
    products; "rank-one", P's rank-one terms on tiles in the map op; "frequencies", the band's
    frequencies with one row per thread in the map op; "auto", each kernel's choice, the
    default), for testing them and timing them side by side. Needs Triton.

    Examples:
        >>> from bytheway_kernels.ops import triton_rules
        >>> with band_product("fma"):
        ...     triton_rules.BAND_PRODUCT
        'fma'
    """
    from .ops import triton_rules

    if setting not in triton_rules.BAND_PRODUCTS:
        raise ValueError(f"setting={setting!r}: expected one of {', '.join(triton_rules.BAND_PRODUCTS)}")
    saved = triton_rules.BAND_PRODUCT
    # part of both ops' launch-plan keys, and checked by the map op's prepared eager calls: no
    # cache to clear
    triton_rules.BAND_PRODUCT = setting
    try:
        yield
    finally:
        triton_rules.BAND_PRODUCT = saved


@contextlib.contextmanager
def direct_launches_stubbed(compiled_for, stream: int = 0) -> Iterator[None]:
    """Inside the block the Triton backends launch directly on CPU tensors, with no GPU or
    driver: `compiled_for(launch)` stands in for what Triton compiles and launches (an object
    with `run`, `function` and `packed_metadata`, whose `run` the direct launcher then calls),
    CPU tensors' device (-1) is the current one, on stream `stream`. The direct launcher's cache,
    the map op's prepared eager calls and its reused workspaces are empty before and after, so a
    repeated eager call prepares and repeats its launches as on a GPU. For the host-cost
    benchmark and the tests of the launch path."""
    from .ops import launch as launch_module
    from .ops.attention_probs import triton as map_kernels

    saved = (launch_module.direct_launch_enabled, launch_module._device_and_stream,
             launch_module.current_device, launch_module.current_stream,
             launch_module.KernelLaunch.run_through_triton)
    launch_module.direct_launch_enabled = lambda: True
    launch_module._device_and_stream = lambda: (-1, stream)
    launch_module.current_device = lambda: -1
    launch_module.current_stream = lambda device: stream
    launch_module.KernelLaunch.run_through_triton = compiled_for
    launch_module._DIRECT_CACHE.clear()
    map_kernels.clear_launch_plans()
    try:
        yield
    finally:
        (launch_module.direct_launch_enabled, launch_module._device_and_stream,
         launch_module.current_device, launch_module.current_stream,
         launch_module.KernelLaunch.run_through_triton) = saved
        launch_module._DIRECT_CACHE.clear()
        map_kernels.clear_launch_plans()
