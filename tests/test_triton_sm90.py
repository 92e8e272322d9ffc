"""Compile every Triton kernel variant for sm_90 (H100/H200) ahead of time, no GPU needed.

The interpreter checks numerics but not that the kernels lower to PTX/SASS; this does, and checks
that no variant spills registers to local memory (spills would make the memory-bound op slow).
It runs in a subprocess because TRITON_INTERPRET=1 is fixed when the kernels are defined, once
with the current Triton and once with Triton 3.6.0 (the GPU images' version) when a copy of it is
installed: `pip install --target .triton36 triton==3.6.0` in the repository root, or point
BYTHEWAY_TRITON36_DIR at such a directory.

Reusable by other ops' compile tests (import this module from a subprocess script):
`compile_for_sm90(kernel, signature, constexprs, attrs, options) -> (registers, spill_bytes)`,
`launch_signature(kernel, args) -> (signature, constexprs, attrs, options)`, `compiled_variants(launches)`
(the distinct compilations of `bytheway_kernels.ops.launch.KernelLaunch`es),
`report_usage(enumerate_variants)` (a compile script's main) and
`run_script(path, triton_dir=None, band_products=("fma",)) -> the merged report of a compile script
run in one process per CPU`, each variant compiled once for all the band products that launch it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
TRITON36_ENV = "BYTHEWAY_TRITON36_DIR"


def triton36_dir() -> Optional[Path]:
    """The directory holding a Triton 3.6.0 package, or None if it is not installed."""
    directory = Path(os.environ.get(TRITON36_ENV) or REPO / ".triton36")
    return directory if (directory / "triton" / "__init__.py").is_file() else None


#: Launch options a KernelLaunch's args may carry besides the kernel's own parameters.
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg", "launch_pdl")


def launch_signature(kernel, args: dict):
    """(signature, constexprs, attrs, options) of `kernel[grid](**args)`, specialised exactly as
    Triton's JIT specialises a launch (its own native rule, 3.6 and 3.9 alike): tensors 16-byte
    aligned and ints divisible by 16 get tt.divisibility 16 (vectorised loads follow from it),
    an int equal to 1 becomes a constant, bools are u1. Derived from the kernel's parameters, so
    that a new kernel argument needs no change here."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = args[param.name]
        if param.is_constexpr:
            constexprs[param.name] = value
            continue
        kind, key = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                           not param.do_not_specialize_on_alignment)
        if kind == "constexpr":
            constexprs[param.name] = key
        else:
            signature[param.name] = kind
            if isinstance(key, str) and BaseBackend.parse_attr(key):
                attrs[(index,)] = BaseBackend.parse_attr(key)
    return signature, constexprs, attrs, {name: args[name] for name in LAUNCH_OPTIONS if name in args}


def _variant_key(kernel, signature, constexprs, attrs, options) -> str:
    return json.dumps([kernel.__name__, signature, constexprs, sorted(attrs.items()), options], sort_keys=True)


def compiled_variants(launches) -> list:
    """The distinct (kernel, signature, constexprs, attrs, options) that `launches` compile."""
    variants = {}
    for launch in launches:
        variant = (launch.kernel, *launch_signature(launch.kernel, launch.args))
        variants[_variant_key(*variant)] = variant
    return list(variants.values())


def compile_for_sm90(kernel, signature: dict, constexprs: dict, attrs: dict, options: dict):
    """AOT-compile `kernel` for sm_90; (registers per thread, spilled bytes: stack + local)."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full_signature = {name: signature.get(name, "constexpr") for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=full_signature, constexprs=dict(constexprs),
                       attrs=dict(attrs))
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(options))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.TemporaryDirectory() as directory:
        cubin = os.path.join(directory, "kernel.cubin")
        with open(cubin, "wb") as handle:
            handle.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    if match is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{usage}")
    registers, stack, local = map(int, match.groups())
    return registers, stack + local


#: "index/count": the share of the variants a compile script's process compiles (`report_usage`).
SHARD_ENV = "BYTHEWAY_COMPILE_SHARD"
#: The band products (comma-separated `triton_rules.BAND_PRODUCTS`) a compile script enumerates
#: its variants under (`report_usage`).
BAND_PRODUCTS_ENV = "BYTHEWAY_COMPILE_BAND_PRODUCTS"
#: Compile processes at most (each holds Triton and torch, several hundred MB).
MAX_COMPILE_PROCESSES = 4


def compile_processes() -> int:
    """One compile process per CPU this process may use, at most MAX_COMPILE_PROCESSES: Triton's
    passes and ptxas run on one thread, so on CI's two cores two processes halve the wall time."""
    from bytheway_kernels.testing import usable_cpus

    return min(usable_cpus(), MAX_COMPILE_PROCESSES)


def run_script(path, triton_dir: Optional[Path] = None, band_products: tuple = ("fma",)):
    """Run a compile script (one that ends in `report_usage`) with the interpreter off and
    `triton_dir` first on the path, its variants enumerated under each of `band_products`, in
    `compile_processes()` processes at once, each compiling its share of the variants; return
    their merged report {triton, results}, the results in the variants' order, each naming the
    band products whose launches compile it (`band_products`)."""
    path_entries = ([str(triton_dir)] if triton_dir else []) + [str(REPO), str(REPO / "tests")]
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
               **{BAND_PRODUCTS_ENV: ",".join(band_products)},
               PYTHONPATH=os.pathsep.join(path_entries + [os.environ.get("PYTHONPATH", "")]))
    from bytheway_kernels.testing import run_at_once

    count = compile_processes()
    runs = run_at_once([([sys.executable, str(path)], dict(env, **{SHARD_ENV: f"{index}/{count}"}))
                        for index in range(count)], timeout=900)
    reports = []
    for returncode, stdout, stderr in runs:
        assert returncode == 0, stderr[-4000:]
        reports.append(json.loads(stdout.strip().splitlines()[-1]))
    assert len({report["triton"] for report in reports}) == 1, [r["triton"] for r in reports]
    enumerated = reports[0]["variants"]
    results = [None] * len(enumerated)
    for index, report in enumerate(reports):
        assert report["variants"] == enumerated, "every process enumerates the same variants"
        results[index::count] = report["results"]
    assert [[result["kernel"], result["band_products"]] for result in results] == enumerated, (
        "the shares fit together")
    return dict(triton=reports[0]["triton"], results=results)


def _map_op_variants():
    """Every kernel variant the map op launches, from example inputs through its launch path."""
    import itertools

    import torch

    from bytheway_kernels.band import max_tau
    from bytheway_kernels.ops.attention_probs import triton as kernels
    from bytheway_kernels.ops.params import ByTheWayParams

    # (adaptive, with stats, beta_max, scope): every flag of the reduce and apply kernels is on
    # in the first and off in the second; the others only at F=16, nearest guide.
    configs = [(True, True, 3.0, "sample"), (False, False, None, "batch")]
    extra_configs = [(False, True, None, "batch"), (True, False, None, "batch")]
    launches = []
    for frames, tau_kind, guide_mode in itertools.product((3, 16, 24, 64), ("zero", "max"),
                                                          (None, "nearest", "bilinear")):
        tau = 0 if tau_kind == "zero" else max_tau(frames)
        guide = None if guide_mode is None else torch.zeros((2, 1, 1, 1, frames, frames), dtype=torch.float16)
        # at F=16 also up_blocks.3's size, where each stats program takes several tiles
        sizes = [(2, 1)] + ([(64, 8)] if frames == 16 else [])
        for (size, heads), (adaptive, with_stats, beta_max, scope) in itertools.product(sizes, configs + (
                extra_configs if frames == 16 and guide_mode == "nearest" else [])):
            scores = torch.zeros((2, size, size, heads, frames, frames), dtype=torch.float16)
            probs = torch.empty_like(scores)
            params = ByTheWayParams(0.6, 1.5, tau, adaptive, 2, 1, scope, guide_mode or "nearest", beta_max)
            stats = torch.empty((params.stats_rows(scores.shape[0]), 6)) if with_stats else None
            launches += kernels.kernel_launches(scores, guide, params, probs, stats)
    # inside the band at F = 24 and 32 (tau 7: the band's frequencies with one row per thread by
    # default, R = 9 and 15 rank-one terms forced, else the dot or the split), nearest guide, all flags on and all off, at
    # up_blocks.1's size (each stats program takes the most tiles, as at every real size there)
    for frames in (24, 32):
        guide = torch.zeros((2, 1, 1, 1, frames, frames), dtype=torch.float16)
        for adaptive, with_stats, beta_max, scope in configs:
            scores = torch.zeros((2, 16, 16, 8, frames, frames), dtype=torch.float16)
            params = ByTheWayParams(0.6, 1.5, 7, adaptive, 2, 1, scope, "nearest", beta_max)
            stats = torch.empty((params.stats_rows(scores.shape[0]), 6)) if with_stats else None
            launches += kernels.kernel_launches(scores, guide, params, torch.empty_like(scores), stats)
    # the stats kernel's tiered sum over the slots (TIERED: more than FLAT_SUM_SLOTS per video),
    # all flags on, at F=16 with each guide and both taus
    flat_sum_slots, kernels.FLAT_SUM_SLOTS = kernels.FLAT_SUM_SLOTS, 0
    kernels.clear_launch_plans()
    for tau, guide_mode in itertools.product((0, max_tau(16)), (None, "nearest", "bilinear")):
        guide = None if guide_mode is None else torch.zeros((2, 1, 1, 1, 16, 16), dtype=torch.float16)
        scores = torch.zeros((2, 2, 2, 1, 16, 16), dtype=torch.float16)
        params = ByTheWayParams(0.6, 1.5, tau, True, 2, 1, "sample", guide_mode or "nearest", 3.0)
        launches += kernels.kernel_launches(scores, guide, params, torch.empty_like(scores),
                                            torch.empty((params.stats_rows(2), 6)))
    kernels.FLAT_SUM_SLOTS = flat_sum_slots
    # the programmatic dependent pair (griddepcontrol: sm_90 PTX; `PROGRAMMATIC_LAUNCH`), all
    # flags on, at up_blocks.3's size (F = 16, bilinear guide) and inside the band at F = 24
    saved = kernels.PROGRAMMATIC_LAUNCH, kernels._programmatic
    kernels.PROGRAMMATIC_LAUNCH, kernels._programmatic = True, lambda device: True
    kernels.clear_launch_plans()
    for size, frames, tau in ((64, 16, max_tau(16)), (16, 24, 7)):
        guide = torch.zeros((2, 16, 16, 8, frames, frames), dtype=torch.float16)
        scores = torch.zeros((2, size, size, 8, frames, frames), dtype=torch.float16)
        params = ByTheWayParams(0.6, 1.5, tau, True, 2, 1, "sample", "bilinear", 3.0)
        pair = kernels.kernel_launches(scores, guide, params, torch.empty_like(scores),
                                       torch.empty((params.stats_rows(2), 6)))
        assert all(launch.args["PDL"] for launch in pair) and pair[1].args["launch_pdl"]
        launches += pair
    kernels.PROGRAMMATIC_LAUNCH, kernels._programmatic = saved
    kernels.clear_launch_plans()
    return compiled_variants(launches)


def report_usage(enumerate_variants) -> None:
    """A compile script's main: the distinct variants `enumerate_variants()` returns (as
    `compiled_variants` does) under each band product of BYTHEWAY_COMPILE_BAND_PRODUCTS (all
    "fma" without it), each compiled once whichever products launch it; compile this process's
    share (every `count`-th from `index`, as BYTHEWAY_COMPILE_SHARD="index/count" says; all of
    them without it); print {triton, variants (every variant's kernel name and band products, in
    order), results} as JSON on the last line (for run_script)."""
    import triton

    from bytheway_kernels.testing import band_product

    variants = {}  # key -> (variant, the band products that launch it)
    for setting in os.environ.get(BAND_PRODUCTS_ENV, "fma").split(","):
        with band_product(setting):
            for variant in enumerate_variants():
                variants.setdefault(_variant_key(*variant), (variant, []))[1].append(setting)
    ordered = list(variants.values())
    index, count = map(int, os.environ.get(SHARD_ENV, "0/1").split("/"))
    results = []
    for (kernel, signature, constexprs, attrs, options), settings in ordered[index::count]:
        registers, spill_bytes = compile_for_sm90(kernel, signature, constexprs, attrs, options)
        results.append(dict(kernel=kernel.__name__, band_products=settings, constexprs=constexprs,
                            options=options, registers=registers, spill_bytes=spill_bytes))
    enumerated = [[kernel.__name__, settings] for (kernel, *_), settings in ordered]
    print(json.dumps(dict(triton=triton.__version__, variants=enumerated, results=results)))


_NEEDS_TRITON36 = pytest.mark.skipif(
    triton36_dir() is None,
    reason=f"Triton 3.6.0 not installed: pip install --target .triton36 triton==3.6.0 "
           f"(or set {TRITON36_ENV})")

#: (Triton version, band products) of each compile run: the current Triton with the default band
#: product (one exact fp32 dot), and Triton 3.6.0 (the GPU images') with it and with the tf32
#: split on tensor cores that BYTHEWAY_BAND_PRODUCT=tensor-cores selects
#: (`bytheway_kernels.ops.triton_rules.band_product`), the variants both launch compiled once.
COMPILE_RUNS = [
    pytest.param(None, ("fma",), id="current-triton"),
    pytest.param("3.6", ("fma", "tensor-cores"), id="triton-3.6.0", marks=_NEEDS_TRITON36),
]


#: The map op's compile runs: the current Triton with the default band product ("auto": the
#: band's frequencies with one row per thread where F is a multiple of 4 up to 32,
#: `triton_rules.thread_row_band`), and Triton 3.6.0 with it too (the shipped setting on the GPU
#: images), with "fma" and "tensor-cores" as above, and with P's rank-one terms on tiles, which
#: only BYTHEWAY_BAND_PRODUCT=rank-one selects at every F.
MAP_OP_COMPILE_RUNS = [
    pytest.param(None, ("auto",), id="current-triton"),
    pytest.param("3.6", ("auto", "fma", "tensor-cores", "rank-one"), id="triton-3.6.0", marks=_NEEDS_TRITON36),
]


@pytest.mark.parametrize("version,band_products", MAP_OP_COMPILE_RUNS)
def test_map_op_kernels_compile_for_sm90_without_spills(version, band_products):
    report = run_script(__file__, triton36_dir() if version else None, band_products)
    if version:
        assert report["triton"].startswith(version), report["triton"]
    for band_product in band_products:
        _check_map_op_variants(band_product, [r for r in report["results"] if band_product in r["band_products"]])
    spilled = [r for r in report["results"] if r["spill_bytes"]]
    assert not spilled, f"register spills under Triton {report['triton']}: {spilled}"


def _check_map_op_variants(band_product: str, results: list) -> None:
    """The variants the map op's launches compile under `band_product`: the band steps it
    selects, and how many of each kernel."""
    split = [r for r in results if r["constexprs"].get("SPLIT_BAND")]
    assert bool(split) is (band_product == "tensor-cores"), (band_product, "the circulant variants use this product")
    ranked = [r for r in results if r["constexprs"].get("BAND_RANK")]
    assert bool(ranked) is (band_product in ("rank-one", "auto")), (band_product, "rank-one terms: forced, or past F = 32")
    if band_product == "rank-one":  # every circulant band: F = 3, 24 and 64 at tau 0 too
        assert {r["constexprs"]["BAND_RANK"] for r in ranked} == {1, 2, 9, 15}, band_product
    if band_product == "auto":  # F = 64 at tau 0 (past THREAD_ROW_MAX_FRAMES): one term
        assert {(r["constexprs"]["F"], r["constexprs"]["BAND_RANK"]) for r in ranked} == {(64, 1)}
    thread_rows = [r for r in results if r["constexprs"].get("THREAD_ROWS")]
    assert bool(thread_rows) is (band_product == "auto"), (band_product, "F % 4 == 0 inside the band: one row per thread")
    if band_product == "auto":  # F = 16 and 24 at tau 0, F = 24 and 32 at tau 7
        assert {(r["constexprs"]["F"], r["constexprs"]["TAU"]) for r in thread_rows} == {
            (16, 0), (24, 0), (24, 7), (32, 7)}
    counts = {name: sum(r["kernel"] == name for r in results) for name in ("_stats_kernel", "_apply_kernel")}
    # 7 distinct (F, tau) x 3 guides; the apply kernel with all flags on and all off, the stats
    # kernel with all on, and at F=16 with a nearest guide (2 taus) both also adaptive in batch
    # scope and fixed with stats (the apply kernel's beta pointer is fp32 there); the stats
    # kernel again at F=16 with several tiles per program (2 taus x (3 guides + 2 extra)), and
    # the apply kernel there too, where heads, H and W are not the constant 1 that the JIT makes
    # of an int argument equal to 1 (2 taus x (2 x 3 guides + 2 extra)); the stats kernel's
    # tiered sum (2 taus x 3 guides); inside the band at F = 24 and 32, the stats kernel with all
    # flags on and the apply kernel with all on and all off; both kernels as a programmatic
    # dependent pair at 2 sizes
    assert counts == {"_stats_kernel": 21 + 2 * 2 + 2 * 5 + 2 * 3 + 2 + 2,
                      "_apply_kernel": 21 * 2 + 2 * 2 + 2 * 8 + 2 * 2 + 2}, (band_product, counts)


if __name__ == "__main__":
    report_usage(_map_op_variants)
