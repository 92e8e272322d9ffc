"""Compile every fused temporal attention kernel variant for sm_90 ahead of time, no GPU needed,
and check that none spills registers (as tests/test_triton_sm90.py does for the map op).

Run it under each Triton the project supports, e.g. the GPU images' 3.6.0 as well:
`PYTHONPATH=$PWD:/path/to/triton-3.6.0 pytest tests/test_temporal_attention_sm90.py -s`
(`-s` prints the register table). It runs in a subprocess because TRITON_INTERPRET=1 is fixed when
the kernels are defined.
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
    import json, os, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from bytheway_kernels.ops.temporal_attention import triton as tk

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    ints = ("sequences", "sequences_per_entry", "first_entry", "steps", "heads", "q_sn", "q_sf",
            "k_sn", "k_sf", "v_sn", "v_sf", "H", "W", "h", "w", "videos", "groups", "slots_per_group")
    floats = ("scale_y", "scale_x", "scale_log2", "alpha", "beta0", "rows_per_group", "beta_max",
              "high_energy_floor")

    def signature(fn, dtype, constants):
        types = {}
        for name in fn.arg_names:
            if name in constants:
                types[name] = "constexpr"
            elif name.endswith("_ptr"):
                types[name] = ("*fp32" if name in ("band_ptr", "beta_ptr", "partials_ptr", "stats_ptr")
                               else f"*{dtype}")
            else:
                types[name] = "i32" if name in ints else "fp32"
        return types

    def compile_variant(kernel, dtype, constants, num_warps):
        fn = getattr(tk, kernel)
        source = ASTSource(fn=fn, constexprs=dict(constants), signature=signature(fn, dtype, constants))
        options = {"num_warps": num_warps}
        if kernel == "_energy_kernel":  # launched unpipelined, as `_launch_plan` does
            options["num_stages"] = tk.ENERGY_NUM_STAGES
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as handle:
            handle.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", handle.name],
                               capture_output=True, text=True).stdout
        os.unlink(handle.name)
        return [line.strip() for line in usage.splitlines() if "REG:" in line]

    variants = []  # (kernel, dtype, frames, head_dim, guide mode, flags, config)
    beta_only, with_stats = dict(FIELDS=tk.SUM_FIELDS), dict(FIELDS=tk.SUM_FIELDS_WITH_STATS)
    for head_dim in (40, 80, 160):
        for guide_mode in (0, 1, 2):
            fixed = dict(PER_VIDEO=False, HAS_BETA=False, WITH_MAP=False)
            adaptive = dict(PER_VIDEO=True, HAS_BETA=True, WITH_MAP=True)
            variants += [("_attention_kernel", "fp16", 16, head_dim, guide_mode, fixed, None),
                         ("_attention_kernel", "fp16", 16, head_dim, guide_mode, adaptive, None),
                         ("_energy_kernel", "fp16", 16, head_dim, guide_mode, beta_only, None),
                         ("_energy_kernel", "fp16", 16, head_dim, guide_mode, with_stats, None)]
        variants.append(("_attention_kernel", "fp16", 16, head_dim, 0,  # plain attention
                         dict(PER_VIDEO=False, HAS_BETA=False, WITH_MAP=False, BAND=0), None))
        for config in tk.candidate_configs(16, head_dim)[1:]:
            variants.append(("_attention_kernel", "fp16", 16, head_dim, 1,
                             dict(PER_VIDEO=False, HAS_BETA=False, WITH_MAP=False), config))
        for config in tk.energy_candidate_configs(16, head_dim)[1:]:
            variants += [("_energy_kernel", "fp16", 16, head_dim, 2, beta_only, config),
                         ("_energy_kernel", "fp16", 16, head_dim, 2, with_stats, config)]
    for dtype in ("bf16", "fp32"):
        variants += [("_attention_kernel", dtype, 16, 80, 1,
                      dict(PER_VIDEO=False, HAS_BETA=True, WITH_MAP=True), None),
                     ("_energy_kernel", dtype, 16, 80, 1, with_stats, None)]
    for frames in (8, 24, 33, 64):  # non-full band (circulant dot) and other paddings
        variants += [("_attention_kernel", "fp16", frames, 80, 2,
                      dict(PER_VIDEO=True, HAS_BETA=True, WITH_MAP=True), None),
                     ("_energy_kernel", "fp16", frames, 80, 2, with_stats, None)]

    results = []
    for kernel, dtype, frames, head_dim, guide_mode, flags, config in variants:
        if kernel == "_energy_kernel":
            tile = config or tk.default_energy_config(frames, head_dim)
        else:
            tile = config or tk.default_config(frames, head_dim, 4 if dtype == "fp32" else 2)
        band = 1 if frames == 16 else 2  # the full band (tau = 7) at F = 16, else circulant
        constants = dict(dict(F=frames, F_PAD=tk.padded_frames(frames), D=head_dim,
                              BLOCK_D=tile.block_d, G=tile.sequences, BLOCK_I=tk.QUERY_BLOCK,
                              GUIDE_MODE=guide_mode, BAND=band), **flags)
        usage = compile_variant(kernel, dtype, constants, tile.num_warps)
        results.append(dict(kernel=kernel, dtype=dtype, frames=frames, head_dim=head_dim,
                            guide_mode=guide_mode, flags=flags, config=list(tile), usage=usage))
    for flags in (dict(ADAPTIVE=False, HAS_BETA_MAX=False, WRITE_STATS=True, FIELDS=6),
                  dict(ADAPTIVE=True, HAS_BETA_MAX=True, WRITE_STATS=True, FIELDS=6),
                  dict(ADAPTIVE=True, HAS_BETA_MAX=False, WRITE_STATS=False, FIELDS=3)):
        usage = compile_variant("_beta_kernel", "fp32", dict(BLOCK=tk.REDUCE_BLOCK, **flags), 4)
        results.append(dict(kernel="_beta_kernel", flags=flags, usage=usage))
    print(json.dumps(dict(triton=triton.__version__, results=results)))
    """
)


def test_kernels_compile_for_sm90_without_spills():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                         timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    results = report["results"]
    assert len(results) >= 70
    print(f"\ntriton {report['triton']}: sm_90 resource usage per variant")
    for result in results:
        assert result["usage"], result
        usage = result["usage"][0]
        print(f"{result['kernel']:18} {result.get('dtype', ''):5} F={result.get('frames', '')!s:3} "
              f"d={result.get('head_dim', '')!s:4} guide={result.get('guide_mode', '')!s:2} "
              f"{result['flags']} config={result.get('config')} :: {usage}")
        assert "STACK:0 " in usage and "LOCAL:0 " in usage, f"register spill: {result}"
