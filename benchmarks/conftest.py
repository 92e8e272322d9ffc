"""pytest-benchmark suite configuration: shapes, dtypes, the `bench` fixture and the summary.

Run `pytest benchmarks --benchmark-only` (full shapes) or add `--bench-quick` (tiny shapes, for
the CI smoke run with `--benchmark-disable`); `--bench-dtype float16` times one dtype only. The
plain `pytest` run never collects this folder (pyproject sets testpaths = ["tests"]).
"""

from __future__ import annotations

import functools
import os
import shlex

import pytest

import harness  # benchmarks/ is on sys.path: pytest prepends a conftest's folder

_RECORDED = pytest.StashKey[list]()
_LOAD_AT_START = pytest.StashKey[float]()


def pytest_addoption(parser):
    parser.addoption(
        "--bench-quick",
        action="store_true",
        default=False,
        help="ByTheWay benchmarks: tiny shapes only (the CI smoke run), instead of docs/DESIGN.md section 5",
    )
    parser.addoption(
        "--bench-dtype",
        action="append",
        default=None,
        choices=[str(d).removeprefix("torch.") for d in harness.DTYPES],
        help="ByTheWay benchmarks: time only this dtype (repeatable); default: every dtype of the device",
    )


def load_average() -> float:
    """1-minute load average (other processes competing for the CPUs skew timings), or -1."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else -1.0


def pytest_configure(config):
    config.stash[_RECORDED] = []
    config.stash[_LOAD_AT_START] = load_average()


def pytest_generate_tests(metafunc):
    # Module scope groups the tests of one shape together, so inputs and references are built
    # once per shape and freed before the next one.
    if "shape" in metafunc.fixturenames:
        shapes = harness.QUICK_SHAPES if metafunc.config.getoption("--bench-quick") else harness.FULL_SHAPES
        ids = [f"{s.height}x{s.width}-F{s.frames}" for s in shapes]
        metafunc.parametrize("shape", shapes, ids=ids, scope="module")
    if "dtype" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--bench-dtype")
        dtypes = [d for d in harness.DTYPES if not chosen or str(d).removeprefix("torch.") in chosen]
        ids = [str(d).removeprefix("torch.") for d in dtypes]
        metafunc.parametrize("dtype", dtypes, ids=ids, scope="module")


class Bench:
    """Runs one timed call through pytest-benchmark, labelled for the results table."""

    def __init__(self, benchmark):
        self._benchmark = benchmark

    def __call__(self, fn, *, group: str, impl: str, variant: str = "", backend: str = "",
                 floor: bool = False, bytes_moved: int = 0, breakdown: bool = False,
                 paired_with=None):
        """Time `fn` and return its last result.

        pytest-benchmark times the wall clock of each call (device-synchronised). On a GPU the
        case also records, in `extra_info`, the kernel time (CUDA events, L2 flushed), the host
        cost per call, the peak memory the call allocates and, with `breakdown`, the device time
        of each kernel (see `harness.gpu_timings`).

        `floor` marks the group's yardstick (softmax, the stock layer, ByTheWay off); rows with
        the same `variant` are compared with the reference backend's row; `backend` names the op
        backend a layer or denoiser ran with; `bytes_moved` gives the achieved bandwidth.
        `paired_with` (impl name, call): also record `fn`'s wall time over that call's as the median
        of interleaved rounds (`harness.interleaved_ratio`), as `extra_info["paired"]`.
        """
        self._benchmark.group = group
        self._benchmark.extra_info.update(impl=impl, variant=variant, backend=backend, floor=floor)
        if bytes_moved:
            self._benchmark.extra_info["bytes_moved"] = bytes_moved
        result = self._benchmark(harness.timed_call(fn))
        if harness.DEVICE.type == "cuda" and not self._benchmark.disabled:
            wall_s = self._benchmark.stats.stats.median
            self._benchmark.extra_info.update(harness.gpu_timings(fn, wall_s, breakdown))
        if paired_with is not None and not self._benchmark.disabled:
            paired_impl, paired_fn = paired_with
            self._benchmark.extra_info["paired"] = {
                "impl": paired_impl, "ratio": harness.interleaved_ratio(fn, paired_fn)}
        return result


@pytest.fixture
def bench(benchmark, request):
    yield Bench(benchmark)
    request.config.stash[_RECORDED].append(benchmark)


@functools.lru_cache(maxsize=None)
def copy_bandwidth() -> float:
    return harness.measure_copy_bandwidth()


def _benchmarks_ran(config) -> bool:
    return not (config.getoption("benchmark_disable") or config.getoption("benchmark_skip"))


def pytest_benchmark_update_machine_info(config, machine_info):
    """What make_results.py needs to label a run, stored in the JSON next to the timings."""
    machine_info["bytheway"] = {
        "device": harness.device_name(),
        "device_type": harness.DEVICE.type,
        "versions": harness.library_versions(),
        "command": shlex.join(["pytest", *config.invocation_params.args]),
        "quick": config.getoption("--bench-quick"),
        "copy_bandwidth_bytes_per_s": copy_bandwidth() if _benchmarks_ran(config) else None,
        "cpu_count": os.cpu_count(),
        "load_average": [config.stash[_LOAD_AT_START], load_average()],
    }


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    timed = [
        b for b in config.stash[_RECORDED]
        if b.stats is not None and "bytes_moved" in b.extra_info
    ]
    if not timed or not _benchmarks_ran(config):
        return
    copy = copy_bandwidth()
    write = terminalreporter.write_line
    terminalreporter.section("ByTheWay benchmarks: achieved bandwidth")
    write(f"device: {harness.device_name()}; measured copy bandwidth {copy / 1e9:.1f} GB/s "
          f"(read + write of a large tensor)")
    write("bytes = compulsory traffic (map op: scores read + probs written + guide read; attention: "
          "q, k, v read + out written), over the median kernel time on a GPU, wall time on a CPU")
    rows = [
        (b.group, f"{b.extra_info['impl']} {b.extra_info['variant']}".strip(),
         b.extra_info.get("kernel_s", b.stats.stats.median), b.extra_info["bytes_moved"])
        for b in timed
    ]
    width = max(len(name) for _, name, _, _ in rows)
    current_group = None
    for group, name, median, moved in rows:
        if group != current_group:
            write(f"{group}:")
            current_group = group
        bandwidth = moved / median
        write(f"  {name:<{width}}  {median * 1e3:10.3f} ms  {bandwidth / 1e9:8.2f} GB/s  "
              f"{100 * bandwidth / copy:6.1f}% of copy")
