"""The GPU-only scripts of a device session run end to end on CPU, so that a lent GPU's few minutes
are not lost to a script error: benchmarks/fused_kernel_times.py and
benchmarks/temporal_attention_gpu_check.py, on tiny layers, with their kernels under the Triton
interpreter and their timers replaced by one call of what they time (no numbers are checked;
the correctness checks inside temporal_attention_gpu_check.py run for real). The selected tests'
runs start at the first of them, one per CPU at a time."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bytheway_kernels.testing import usable_cpus

BENCHMARKS = Path(__file__).parent

# Run as `python -c` with TRITON_INTERPRET=1 (set before Triton is imported): pretend CUDA exists,
# put the scripts' tensors on the CPU, shrink their layers, time nothing.
DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {benchmarks!r})
    import torch
    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_name = lambda *args: "CPU dry run"
    import {module} as script
    {setup}
    sys.exit(script.main())
""")


def _fused_kernel_times(shapes: list, *arguments: str) -> tuple:
    """benchmarks/fused_kernel_times.py dry, at `shapes` (tiny layers), with `arguments`."""
    return "fused_kernel_times", f"""
        script.DEVICE = "cpu"
        script.FLUSH_BYTES = 16
        script.GUIDE_SIZE = (2, 2)
        script.SHAPES = {shapes!r}
        script.ENERGY_PROGRAM_CAPS = (1,)
        script.WIDE_FRAME_CONFIGS = script.WIDE_FRAME_CONFIGS[:1]
        def one_call(fn, flush):
            fn()
            return {{"kernel": 1.0}}
        script.device_times = one_call
        sys.argv[1:] = {list(arguments)!r}
    """


#: Test name -> (script module, driver setup) of the dry run it checks.
DRY_RUNS = {
    "test_fused_kernel_times_runs": _fused_kernel_times(
        [("up_blocks.1", 2, 2, 16, 16), ("up_blocks.2 F24", 2, 2, 16, 24)]),
    "test_fused_kernel_times_quick_runs": _fused_kernel_times([("up_blocks.2 F24", 2, 2, 16, 24)], "--quick"),
    "test_temporal_attention_gpu_check_runs": ("temporal_attention_gpu_check", """
        script.DEVICE = "cpu"
        script.HEADS = 2
        script.GUIDE_SIZE = (2, 2)
        script.SHAPES = [("up_blocks.1", 2, 2, 16)] * 2  # the band product times at SHAPES[1]'s size
        script.BAND_FRAMES = (24,)
        def one_call(fn):
            fn()
            return 1.0
        script.bench_us = one_call
        script.host_costs = lambda fn, calls: {column: 1.0 for column in script.HOST_COLUMNS}
    """),
    "test_map_op_kernel_times_runs": ("map_op_kernel_times", """
        import os
        os.environ["BYTHEWAY_BACKEND"] = "triton"  # CPU tensors through the interpreted kernels
        script.DEVICE = "cpu"
        script.GUIDE_SIZE = 2
        script.SHAPES = [(4, 16), (2, 24)]
        def one_call(fn):
            fn()
            return {"_stats_kernel": 1.0, "_apply_kernel": 2.0}
        script.kernel_times = one_call
        script.event_time = lambda fn: (fn(), 2.0)[1]
        script.host_us_per_call = lambda fn: 1.0
        script.host_costs = lambda fn: {column: 1.0 for column in script.HOST_COLUMNS}
    """),
}


def _start_dry_run(module: str, setup: str) -> subprocess.Popen:
    code = DRIVER.format(benchmarks=str(BENCHMARKS), module=module,
                         setup=textwrap.dedent(setup).strip())
    return subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=BENCHMARKS.parent)


@pytest.fixture(scope="module")
def dry_runs(request):
    """{test name: future (returncode, stdout, stderr) of its dry run}: the selected tests' runs,
    in DRY_RUNS's order (longest first), one per CPU at a time. Each runs on one core (the
    interpreter), so on CI's two cores they take about half the time of one after another."""
    pytest.importorskip("triton")
    selected = {item.name for item in request.session.items
                if getattr(item, "module", None) is request.module}
    started, stopping = [], threading.Event()

    def complete(name: str):
        if stopping.is_set():
            return None
        run = _start_dry_run(*DRY_RUNS[name])
        started.append(run)
        stdout, stderr = run.communicate(timeout=600)
        return run.returncode, stdout, stderr

    with ThreadPoolExecutor(max_workers=usable_cpus()) as pool:
        futures = {name: pool.submit(complete, name) for name in DRY_RUNS if name in selected}
        try:
            yield futures
        finally:  # a failed or interrupted test leaves no script running
            stopping.set()
            for run in started:
                run.kill()


@pytest.fixture
def out(dry_runs, request) -> str:
    """The standard output of this test's dry run, which must exit with 0."""
    returncode, stdout, stderr = dry_runs[request.node.name].result(timeout=900)
    assert returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout


def test_fused_kernel_times_runs(out):
    assert "fused adaptive" in out and "ENERGY_PROGRAMS 1" in out
    assert "adaptive, ENERGY_PROGRAMS 1 (8, 32, 8) no stash" in out  # the caps without the stash
    assert "fused adaptive, energy tile+stash" in out and "tile+stash/fixed" in out  # the forms
    assert "fused adaptive, energy rows " in out and " rows/fixed" in out  # recomputing
    assert "fused adaptive, energy rows+stash" in out  # F = 24, where "lean" is the default
    assert "adaptive, energy tiles (8, 32, 8) form lean stash" in out  # energy_candidate_configs
    assert "adaptive, energy tiles (8, 32, 8) form lean no stash" in out
    assert "fixed, tiles (8, 32, 8" in out  # F = 16: candidate_configs
    assert "fixed, tiles (4, 32, 8" in out  # F = 24: WIDE_FRAME_CONFIGS
    assert "adaptive, energy tiles (2, 32, 4) form lean stash" in out  # F = 24: energy tiles
    assert "fused adaptive (fp32-dot band)" in out and "fused fixed (tensor-core band)" in out
    assert "sdpa efficient" in out
    assert out.splitlines()[-2].startswith("up_blocks.2 F24")  # the summary's last row


def test_fused_kernel_times_quick_runs(out):
    assert "fused adaptive, energy rows+stash" in out and "fused fixed (fp32-dot band)" in out
    assert "sdpa" not in out and "tiles" not in out and "ENERGY_PROGRAMS" not in out
    assert out.splitlines()[-2].startswith("up_blocks.2 F24")


def test_temporal_attention_gpu_check_runs(out):
    assert "all checks passed" in out
    assert "up_blocks.1 stashed   rel. error vs composed" in out and "stash/fixed" in out


def test_map_op_kernel_times_runs(out):
    assert "4x4 F16 adaptive" in out and "2x2 F24 fixed tc" in out and "2x2 F24 adaptive fma" in out
    assert "2x2 F24 fixed r1" in out and "2x2 F24 adaptive r1" in out  # the tile form beside the default
    # 4 x 4 x 8 heads x 16 frames = 2048 rows of the energy half: 32 tiles of 64 rows
    assert "4x4 F16  1 (32):   1.0 /   3.0   2 (16):" in out and "8 (4):" in out
    assert "default 1, fastest 1 (1.00x the default's time)" in out  # 32 tiles: 1 per program
    assert "2x2 F24  1 (" not in out  # the stats sweep runs at F = 16 only
    # the apply kernel's tile sweep at F = 24 only (a circulant band), each forced tile once
    assert "2x2 F24  (32, 4):    3.0   (32, 8):    3.0   (16, 4):    3.0" in out and "4x4 F16  (32, 4)" not in out
    # the adaptive call plain and as a programmatic pair at every shape
    assert "4x4 F16  softmax    2.0   plain    2.0 (1.00x)   pair    2.0 (1.00x)" in out
    assert "2x2 F24  softmax    2.0   plain" in out
    # the stats pass's full and half tiles at F = 24 only (rank-one terms' energies), both planned
    assert "2x2 F24  full (32 rows):   1.0 /   3.0   half (16 rows):   1.0 /   3.0" in out
    assert "4x4 F16  full" not in out
