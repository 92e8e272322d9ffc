"""Compile every fused temporal attention kernel variant for sm_90 ahead of time, no GPU needed,
and check that none spills registers, under the current Triton and Triton 3.6.0 (the GPU images'
version) when it is installed. The variants come from example inputs through the op's own launch
path (`kernel_launches`), and the compile helpers are the map op's (tests/test_triton_sm90.py).
"""

import itertools

import pytest

pytest.importorskip("triton")

from test_triton_sm90 import (COMPILE_RUNS, compiled_variants, report_usage, run_script,  # noqa: E402
                              triton36_dir)


def _temporal_attention_variants():
    """Every kernel variant the op launches at the AnimateDiff head dims, the tuning tiles, other
    dtypes and other F (circulant band, other paddings), the stash of guided maps
    (`TileConfig.stash_guided`), and every energy form (`ENERGY_FORMS`) in the looping energy
    pass of a larger layer."""
    import torch

    from bytheway_kernels.band import max_tau
    from bytheway_kernels.ops.params import ByTheWayParams
    from bytheway_kernels.ops.temporal_attention import triton as kernels

    batch = 2
    launches = []

    def add(frames, head_dim, guide_mode, adaptive, with_stats, with_map, dtype=torch.float16,
            alpha=0.6, beta=1.5, scope="batch", beta_max=None, config=None, energy_config=None,
            height=2, width=2, heads=2, energy_only=False):
        channels = heads * head_dim
        q, k, v = torch.zeros((batch * height * width, frames, 3 * channels), dtype=dtype).split(channels, -1)
        guide = None if guide_mode is None else torch.zeros((batch, 1, 1, heads, frames, frames), dtype=dtype)
        tau = max_tau(frames) if frames == 16 else 1  # the full band at F = 16, else circulant
        params = ByTheWayParams(alpha, beta, tau, adaptive, 2, 1, scope, guide_mode or "nearest", beta_max)
        out = torch.empty((batch * height * width, frames, channels), dtype=dtype)
        plain_map = torch.empty((batch, height, width, heads, frames, frames), dtype=dtype) if with_map else None
        stats = torch.empty((params.stats_rows(batch), 6)) if with_stats else None
        launches.extend(launch for launch in kernels.kernel_launches(
            q, k, v, guide, heads, height, width, head_dim ** -0.5, params, out, plain_map, stats,
            config, energy_config) if not energy_only or launch.kernel is kernels._energy_kernel)

    for head_dim, guide_mode in itertools.product((40, 80, 160), (None, "nearest", "bilinear")):
        add(16, head_dim, guide_mode, adaptive=False, with_stats=False, with_map=False)
        add(16, head_dim, guide_mode, adaptive=True, with_stats=False, with_map=False)
        add(16, head_dim, guide_mode, adaptive=True, with_stats=True, with_map=True, scope="sample",
            beta_max=3.0)
    for head_dim in (40, 80, 160):
        add(16, head_dim, None, adaptive=False, with_stats=False, with_map=False, alpha=0.0, beta=1.0)
        for config in kernels.candidate_configs(16, head_dim)[1:]:
            add(16, head_dim, "nearest", adaptive=False, with_stats=False, with_map=False, config=config)
        for config in kernels.energy_candidate_configs(16, head_dim)[1:]:
            for with_stats in (False, True):
                add(16, head_dim, "bilinear", adaptive=True, with_stats=with_stats, with_map=False,
                    energy_config=config)
    add(16, 80, "nearest", adaptive=False, with_stats=True, with_map=False)  # fixed beta with stats

    def other_stash(frames, head_dim, dtype=torch.float16):
        """The energy pass's default tiles with the other stash setting (`STASH_GUIDED`)."""
        tile = kernels.default_energy_config(frames, head_dim, dtype.itemsize)
        return tile._replace(stash_guided=not tile.stash_guided)

    def stashed(frames, head_dim, dtype=torch.float16):
        """The energy pass's default tiles, stashing the guided maps for the attention pass."""
        return kernels.default_energy_config(frames, head_dim, dtype.itemsize)._replace(stash_guided=True)

    for dtype in (torch.bfloat16, torch.float32):
        add(16, 80, "nearest", adaptive=True, with_stats=True, with_map=True, dtype=dtype)
        add(16, 80, "nearest", adaptive=True, with_stats=True, with_map=False, dtype=dtype,
            energy_config=other_stash(16, 80, dtype))
    for frames in (8, 24, 33, 64):
        add(frames, 80, "bilinear", adaptive=True, with_stats=True, with_map=True, scope="sample")
    # float32 at F_PAD = 64: d chunks of 16, one sequence (4 warps in the attention pass, 8 in the
    # energy pass)
    add(64, 80, "bilinear", adaptive=True, with_stats=True, with_map=False, dtype=torch.float32)
    for frames, guide_mode in itertools.product((24, 64), ("nearest", "bilinear")):
        # the circulant band, F_PAD 32 and 64: the default energy tiles (stashing) and the other
        add(frames, 80, guide_mode, adaptive=True, with_stats=False, with_map=False, scope="sample")
        add(frames, 80, guide_mode, adaptive=True, with_stats=True, with_map=False)
        add(frames, 80, guide_mode, adaptive=True, with_stats=False, with_map=False, scope="sample",
            energy_config=other_stash(frames, 80))
    # The layers above give each energy program one tile (`steps` becomes the constant 1 and the
    # loop over tiles disappears). Here 16 x 16 positions with 8 heads and 64 energy programs per
    # video give it several, as the AnimateDiff layers whose energy pass loops at the default
    # ENERGY_PROGRAMS do (up_blocks.3, d = 40; F > 16 at up_blocks.2's size), so that the lean
    # forms' accumulators live across iterations. (Where else ptxas spills: docs/DESIGN.md
    # section 8.)
    kernels.ENERGY_PROGRAMS = 64
    looping = dict(adaptive=True, with_map=False, height=16, width=16, heads=8, energy_only=True)

    def recomputing(frames, head_dim, form, dtype=torch.float16):
        """The energy pass's default tiles in `form`, without the stash."""
        tile = kernels.default_energy_config(frames, head_dim, dtype.itemsize)
        if form == "tile" and kernels.padded_frames(frames) == 64:
            tile = tile._replace(num_warps=8)  # this form spills on 4 warps at F_PAD = 64 (3.6)
        return tile._replace(energy_form=form, stash_guided=False)

    for form in ("lean", "tile"):
        for guide_mode, with_stats in itertools.product((None, "nearest", "bilinear"), (False, True)):
            tile = recomputing(16, 40, form)
            add(16, 40, guide_mode, with_stats=with_stats, energy_config=tile, **looping)
        for dtype in (torch.bfloat16, torch.float32):
            tile = recomputing(16, 40, form, dtype)
            add(16, 40, "nearest", with_stats=True, dtype=dtype, energy_config=tile, **looping)
        for frames, (guide_mode, with_stats) in itertools.product(
                (24, 64), (("nearest", False), ("bilinear", False), ("bilinear", True))):
            tile = recomputing(frames, 80, form)
            add(frames, 80, guide_mode, with_stats=with_stats, energy_config=tile, **looping)
    # the stash's store in the looping energy pass: "rows" (with the stash it kept everything in
    # registers under Triton 3.6 too) with every guide, the lean forms with the nearest one
    for form, guide_mode in [("rows", None), ("rows", "nearest"), ("rows", "bilinear"),
                             ("lean", "nearest"), ("tile", "nearest")]:
        tile = stashed(16, 40)._replace(energy_form=form)
        add(16, 40, guide_mode, with_stats=False, energy_config=tile, **looping)
    return compiled_variants(launches)


@pytest.mark.parametrize("version,band_products", COMPILE_RUNS)
def test_temporal_attention_kernels_compile_for_sm90_without_spills(version, band_products):
    report = run_script(__file__, triton36_dir() if version else None, band_products)
    if version:
        assert report["triton"].startswith(version), report["triton"]
    for band_product in band_products:
        results = [r for r in report["results"] if band_product in r["band_products"]]
        split = [r for r in results if r["constexprs"].get("SPLIT_BAND")]
        assert bool(split) is (band_product == "tensor-cores"), (band_product, "the circulant variants use this product")
        counts = {name: sum(r["kernel"] == name for r in results)
                  for name in ("_attention_kernel", "_energy_kernel", "_beta_kernel")}
        assert min(counts.values()) > 0 and len(results) >= 60, (band_product, counts)
    spilled = [r for r in report["results"] if r["spill_bytes"]]
    assert not spilled, f"register spills under Triton {report['triton']}: {spilled}"


if __name__ == "__main__":
    report_usage(_temporal_attention_variants)
