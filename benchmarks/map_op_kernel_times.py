"""Kernel and host time of the map op's Triton backend vs torch.softmax (needs CUDA).

Run from the repository root: `python benchmarks/map_op_kernel_times.py`. For each AnimateDiff
shape (fp16, CFG batch 2, 8 heads, 16x16 guide, preset animatediff) and for F = 24 and 32 at
up_blocks.2's size (tau 7: a circulant band, so the band step multiplies by P) it prints the
profiler's self device time per kernel averaged over 20 calls, and the host time per call of 200
calls issued without synchronising, as the 2026-11-26 H200 notes measured them
(benchmarks/results/h200-2026-11-26.notes.md), four ways: through Triton's launch path, through
the direct launcher, through it handing the launcher tensors (as before 2026-11-27), and our
Python alone (benchmarks/host_cost.py). At F = 24 and 32 the default band step is the band's
frequencies with one row per thread (`bytheway_kernels.ops.triton_rules.thread_row_band_product`,
since 2026-11-28, untimed before); it also times P's rank-one terms on tiles, the default before
("r1" rows, `rank_one_band_product`, measured on an H200 on 2026-11-27), the exact fp32 dot
("fma" rows) and three tf32 products on tensor cores ("tc" rows; `band_product`).

At F = 24 and 32 it then times the tile form's fixed-beta apply kernel (P's rank-one terms) on
other tiles (`apply_tile_sweep`). With the fp32 dot the default tile (32 rows on 4 warps, 8
entries per thread) held the dot's operands in 161-167 registers (3 programs per SM), where 4
entries per thread (32 rows on 8 warps, or 16 on 4) compiled to 32-38 registers and ~35% more
instructions per entry; with the rank-one terms the default tile takes 44-54 (sm_90 SASS,
Triton 3.6 and 3.9, no spills).

At F = 24 and 32 it also times the tile form's adaptive stats pass (P's rank-one terms'
energies) on the apply pass's full tiles against half tiles (`FULL_STATS_TILES_FOR_TERMS`; half
tiles: 4 entries and 8 threads per row at F_PAD = 32, one more shuffle per reduction and 48-54%
more SASS instructions per row, in fewer registers).

At every shape it times the adaptive call between CUDA events (L2 flushed, the host ahead of
the device: `harness.kernel_time`) with its two kernels launched plainly and as a programmatic
dependent pair (`PROGRAMMATIC_LAUNCH`, off by default until this says it wins; the profiler's
per-kernel times cannot show the pair's overlap).

Then, at the three F = 16 shapes, it sweeps the adaptive stats pass's tiles per program
(`STATS_TILE_SWEEP`: 1, 2, 4 and 8 tiles of 64 rows, the default taking up to 4): per program
count it prints the stats kernel's and the whole call's device time. The default's 2048 programs
at up_blocks.3 (40 registers, 4 warps: 12 per SM by registers, 1584 on 132 SMs) fill one wave and
a third, so its loads and its arithmetic (about 1000 SASS instructions per program, sm_90) barely
overlap across programs; more, smaller programs overlap them (their 4096 and 8192 slots are summed
in tiers, `FLAT_SUM_SLOTS`), fewer make one wave. Which wins is for the device to say.
"""

import contextlib
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import bytheway_kernels as btw
import harness
from bytheway_kernels.ops import triton_rules
from bytheway_kernels.ops.attention_probs import triton as map_triton
from bytheway_kernels.ops.params import ByTheWayParams
from bytheway_kernels.testing import band_product
from host_cost import HOST_COLUMNS, host_costs, host_us_per_call

CALLS = 20
DEVICE = "cuda"
# (spatial size, frames): the three AnimateDiff layers, then longer videos at up_blocks.2's size
SHAPES = [(16, 16), (32, 16), (64, 16), (32, 24), (32, 32)]
GUIDE_SIZE = 16
# Tiles per stats program the sweep forces (`_stats_kernel`'s TILES).
STATS_TILE_SWEEP = (1, 2, 4, 8)
# (rows per tile, warps) of the apply kernel the sweep forces at F_PAD = 32 (the default first).
APPLY_TILE_SWEEP = ((32, 4), (32, 8), (16, 4))


def kernel_times(fn):
    """{kernel name: mean device microseconds per call}."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    times = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.key] += event.self_device_time_total / CALLS
    return dict(times)


def layer_inputs(size: int, frames: int):
    """(scores, guide): fp16 AnimateDiff-like logits and a row-stochastic 16x16 anchor map."""
    scores = torch.randn((2, size, size, 8, frames, frames), device=DEVICE, dtype=torch.float16) * 3
    guide = torch.softmax(torch.randn((2, GUIDE_SIZE, GUIDE_SIZE, 8, frames, frames), device=DEVICE),
                          -1).half()
    return scores, guide


def adaptive_call(scores, guide):
    return lambda: btw.bytheway_attention_probs(scores, guide, alpha=0.6, beta=1.5, tau=7)


@contextlib.contextmanager
def planned_with(**names):
    """The map op's Triton module with `names` set to the given values, its launch plans rebuilt
    inside the block and after it."""
    saved = {name: getattr(map_triton, name) for name in names}
    for name, value in names.items():
        setattr(map_triton, name, value)
    map_triton.clear_launch_plans()
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(map_triton, name, value)
        map_triton.clear_launch_plans()


def stats_tiles(tiles: int):
    """Every stats program of the map op takes `tiles` tiles."""
    return planned_with(MAX_STATS_TILES=tiles, TARGET_STATS_PROGRAMS=1)


def apply_tiles(rows: int, warps: int):
    """The map op's apply kernel takes `rows` rows per tile on `warps` warps."""
    return planned_with(_launch_shape=lambda padded_frames: (rows, warps))


def apply_tile_sweep():
    """The fixed-beta call's apply kernel time per forced tile at F = 24 and 32, the band step as
    P's rank-one terms on tiles (the thread-row default has no tile to sweep)."""
    print("apply kernel, fixed beta, (rows per tile, warps): us")
    for size, frames in SHAPES:
        if frames == 16:
            continue
        scores, guide = layer_inputs(size, frames)
        cells = []
        params = ByTheWayParams(0.6, 1.5, 7, False, 2, 1, "batch", "nearest", None)
        for rows, warps in APPLY_TILE_SWEEP:
            with apply_tiles(rows, warps), band_product("rank-one"):
                kernels = kernel_times(lambda: btw.bytheway_attention_probs(
                    scores, guide, alpha=0.6, beta=1.5, tau=7, adaptive_beta=False))
                plan = map_triton._launch_plan(tuple(scores.shape), tuple(guide.shape[1:3]), params,
                                               False, triton_rules.BAND_PRODUCT)
                assert (plan.apply_args["BLOCK_R"], plan.apply_args["num_warps"]) == (rows, warps)
            cells.append(f"({rows}, {warps}): {sum(kernels.values()):6.1f}")
        print(f"{size}x{size} F{frames}  " + "   ".join(cells))


def stats_plan(scores, guide):
    """The map op's launch plan for `adaptive_call`'s settings (one video in scope: CFG)."""
    params = ByTheWayParams(0.6, 1.5, 7, True, 2, 1, "batch", "nearest", None)
    return map_triton._launch_plan(tuple(scores.shape), tuple(guide.shape[1:3]), params, False,
                                   triton_rules.BAND_PRODUCT)


def stats_tile_sweep():
    """The adaptive call's stats kernel and total device time per forced tiles per program."""
    print("stats pass, tiles per program (programs): stats kernel / whole adaptive call, us")
    for size, frames in SHAPES:
        if frames != 16:
            continue
        scores, guide = layer_inputs(size, frames)
        fn = adaptive_call(scores, guide)
        default = stats_plan(scores, guide).stats_args["TILES"]
        cells, totals = [], {}
        for tiles in STATS_TILE_SWEEP:
            with stats_tiles(tiles):
                kernels = kernel_times(fn)
                grid = stats_plan(scores, guide).stats_grid
            stats = sum(value for key, value in kernels.items() if "_stats_kernel" in key)
            totals[tiles] = sum(kernels.values())
            cells.append(f"{tiles} ({grid[0] * grid[1]}): {stats:5.1f} / {totals[tiles]:5.1f}")
        best = min(totals, key=totals.get)
        print(f"{size}x{size} F{frames}  " + "   ".join(cells) + f"   default {default}, fastest {best} "
              f"({totals[best] / totals[default]:.2f}x the default's time)")


event_time = harness.device_us  # device microseconds per call between CUDA events


def programmatic_sweep():
    """The adaptive call's device time per call between CUDA events, its kernels launched plainly
    or as a programmatic dependent pair, against softmax's."""
    print("adaptive call, CUDA events: plain / programmatic pair, us (x softmax's kernel)")
    for size, frames in SHAPES:
        scores, guide = layer_inputs(size, frames)
        softmax = event_time(lambda: torch.softmax(scores, -1))
        cells = []
        for programmatic in (False, True):
            with planned_with(PROGRAMMATIC_LAUNCH=programmatic):
                elapsed = event_time(adaptive_call(scores, guide))
            cells.append(f"{'pair' if programmatic else 'plain'} {elapsed:6.1f} ({elapsed / softmax:.2f}x)")
        print(f"{size}x{size} F{frames}  softmax {softmax:6.1f}   " + "   ".join(cells))


def stats_term_tile_sweep():
    """The adaptive call's stats kernel and total device time at F = 24 and 32, the band step as
    P's rank-one terms on tiles, its stats pass on full tiles (that form's default) or half
    tiles."""
    print("stats pass with the rank-one terms' energies, full / half tiles: stats kernel / whole "
          "adaptive call, us")
    for size, frames in SHAPES:
        if frames == 16:
            continue
        scores, guide = layer_inputs(size, frames)
        cells = []
        for full in (True, False):
            with planned_with(FULL_STATS_TILES_FOR_TERMS=full), band_product("rank-one"):
                kernels = kernel_times(adaptive_call(scores, guide))
                rows = stats_plan(scores, guide).stats_args["BLOCK_R"]
            stats = sum(value for key, value in kernels.items() if "_stats_kernel" in key)
            cells.append(f"{'full' if full else 'half'} ({rows} rows): {stats:5.1f} / "
                         f"{sum(kernels.values()):5.1f}")
        print(f"{size}x{size} F{frames}  " + "   ".join(cells))


def main():
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print("host us/call: " + " / ".join(HOST_COLUMNS) + " (softmax: its one host time)")
    for size, frames in SHAPES:
        scores, guide = layer_inputs(size, frames)
        calls = {
            "softmax": lambda: torch.softmax(scores, -1),
            "fixed": lambda: btw.bytheway_attention_probs(scores, guide, alpha=0.6, beta=1.5, tau=7,
                                                          adaptive_beta=False),
            "adaptive": adaptive_call(scores, guide),
        }
        runs = [(name, fn, "auto") for name, fn in calls.items()]
        if frames != 16:  # tau 7 is the full band at F = 16: no product with P there
            # the default here is the band's frequencies, one row per thread (F a multiple of 4):
            # beside it P's rank-one terms on tiles (the default before 2026-11-28), the fp32 dot
            # (before 2026-11-27) and the tf32 split on tensor cores
            runs += [(f"{name} {label}", calls[name], setting)
                     for setting, label in (("rank-one", "r1"), ("fma", "fma"), ("tensor-cores", "tc"))
                     for name in ("fixed", "adaptive")]
        softmax_kernel = None
        for name, fn, setting in runs:
            with band_product(setting):
                kernels = kernel_times(fn)
                total = sum(kernels.values())
                softmax_kernel = softmax_kernel or total
                parts = ", ".join(f"{key.split('(')[0][:24]} {value:.1f}" for key, value in kernels.items())
                if name == "softmax":
                    host_text = f"{host_us_per_call(fn):6.1f}"
                elif setting != "auto":
                    host_text = "(as the default)"
                else:
                    host = host_costs(fn)
                    host_text = " / ".join(f"{host[column]:6.1f}" for column in HOST_COLUMNS)
            print(f"{size}x{size} F{frames} {name:12s} kernel {total:6.1f} us ({total / softmax_kernel:.2f}x "
                  f"softmax)  host {host_text} us/call  [{parts}]")
    programmatic_sweep()
    apply_tile_sweep()
    stats_term_tile_sweep()
    stats_tile_sweep()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
