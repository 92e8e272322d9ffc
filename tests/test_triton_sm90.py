"""Compile every Triton kernel variant for sm_90 (H100/H200) ahead of time, no GPU needed.

The interpreter checks numerics but not that the kernels lower to PTX/SASS; this does, and checks
that no variant spills registers to local memory (spills would make the memory-bound op slow).
It runs in a subprocess because TRITON_INTERPRET=1 is fixed when the kernels are defined.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    r"""
    import itertools, json, os, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from bytheway_kernels.ops.attention_probs import triton as tk

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    geometry = dict(rows_per_entry="i32", H="i32", W="i32", h="i32", w="i32", heads="i32",
                    scale_y="fp32", scale_x="fp32", alpha="fp32")
    pointers = dict(scores_ptr="*fp16", guide_ptr="*fp16", band_ptr="*fp32", sums_ptr="*fp64")
    kernels = {
        "_stats_kernel": dict(pointers, **geometry, first_entry="i32"),
        "_apply_kernel": dict(pointers, probs_ptr="*fp16", stats_ptr="*fp32", **geometry,
                              videos="i32", rows_per_group="fp32", beta0="fp32",
                              beta_max="fp32", high_energy_floor="fp32"),
    }
    results = []
    all_flags = dict(HAS_SUMS=True, ADAPTIVE=True, HAS_BETA_MAX=True, WRITE_STATS=True)
    # the other launch configurations of the apply pass: fixed beta (one launch), stats, adaptive
    flag_variants = [dict(HAS_SUMS=False, ADAPTIVE=False, HAS_BETA_MAX=False, WRITE_STATS=False),
                     dict(HAS_SUMS=True, ADAPTIVE=False, HAS_BETA_MAX=False, WRITE_STATS=True),
                     dict(HAS_SUMS=True, ADAPTIVE=True, HAS_BETA_MAX=False, WRITE_STATS=False)]
    for frames, tau, guide_mode in itertools.product((3, 16, 24, 64), (0, None), (0, 1, 2)):
        tau = (frames - 2) // 2 if tau is None else tau
        padded = max(16, triton.next_power_of_2(frames))
        block_rows, num_warps = tk._launch_shape(padded)
        constants = dict(F=frames, F_PAD=padded, BLOCK_R=block_rows, GUIDE_MODE=guide_mode,
                         FULL_BAND=frames % 2 == 0 and tau == (frames - 2) // 2, PER_VIDEO=True)
        variants = [("_stats_kernel", {}), ("_apply_kernel", all_flags)]
        if frames == 16 and guide_mode == 1:
            variants += [("_apply_kernel", flags) for flags in flag_variants]
        for name, flags in variants:
            signature = kernels[name]
            constants = dict(constants, **flags)
            fn = getattr(tk, name)
            params = [p for p in fn.arg_names if p in signature or p in constants]
            source = ASTSource(fn=fn, constexprs=dict(constants),
                               signature={p: signature.get(p, "constexpr") for p in params})
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": num_warps})
            with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as handle:
                handle.write(compiled.asm["cubin"])
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", handle.name],
                                   capture_output=True, text=True).stdout
            os.unlink(handle.name)
            results.append(dict(kernel=name, frames=frames, tau=tau, guide_mode=guide_mode, flags=flags,
                                usage=[l.strip() for l in usage.splitlines() if "REG:" in l]))
    print(json.dumps(results))
    """
)


def test_kernels_compile_for_sm90_without_spills():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 4 * 2 * 3 * 2 + 2 * 3
    for result in results:
        assert result["usage"], result
        usage = result["usage"][0]
        assert "STACK:0 " in usage and "LOCAL:0 " in usage, f"register spill: {result}"
