"""Device time per kernel of the fused temporal attention and of SDPA, free of launch gaps (CUDA).

    PYTHONPATH=$PWD python3 benchmarks/fused_kernel_times.py [--quick]

`do_bench` and the benchmark suite time a call between two CUDA events, so a call whose host
work outlasts the GPU work before it (the adaptive path's three launches: ~100-150 us of host time
per call on an H200 machine, against 60-200 us of kernels) also counts the gaps in which the GPU
waits for the host. Here torch.profiler sums each kernel's own device time instead, mean of
`CALLS` calls, with L2 flushed before each call (an int8 fill of 256 MB, left out of the sums).
For the AnimateDiff shapes (fp16, CFG batch 2, 8 heads, 16x16 guide, preset animatediff) and
F = 24, 32 and 64 at up_blocks.2's size it prints the fused kernel plain, with fixed beta, with
adaptive beta (energy pass + beta kernel + attention pass, each shown; again with the energy
pass in each other form of `ENERGY_FORMS` and in every form stashing the guided maps for the
attention pass, `TileConfig.stash_guided`, side by side) and as the anchor with its map; SDPA's
flash, mem-efficient and cuDNN backends; at F = 16 the attention pass's alternative tiles
(`candidate_configs`), software pipelining and program caps (`ENERGY_PROGRAMS`, with and without
the stash); at every F the energy pass's tile configurations (`energy_candidate_configs`, each
form and the stash included); at F > 16 both band products forced (the default is
`triton_rules.split_band`'s choice) and the attention pass's tile configurations. `--quick`
leaves out SDPA and the tile, pipelining and program-cap sweeps. Ratios use these times; the
summary gives adaptive / fixed for each energy variant. The tile defaults of
bytheway_kernels/ops/temporal_attention/triton.py come from its output (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F_nn
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from bytheway_kernels import PRESETS
from bytheway_kernels.ops.params import ByTheWayParams
from bytheway_kernels.ops.temporal_attention.triton import (ENERGY_FORMS, TileConfig,
                                                            candidate_configs,
                                                            default_energy_config,
                                                            energy_candidate_configs,
                                                            temporal_attention_triton_out)
from bytheway_kernels.testing import band_product
from harness import kernel_setting  # benchmarks/harness.py

CALLS = 20
DEVICE = "cuda"
BATCH, HEADS, GUIDE_SIZE = 2, 8, (16, 16)
# (name, height, width, head dim, frames)
SHAPES = [("up_blocks.1", 16, 16, 160, 16), ("up_blocks.2", 32, 32, 80, 16),
          ("up_blocks.3", 64, 64, 40, 16), ("up_blocks.2 F24", 32, 32, 80, 24),
          ("up_blocks.2 F32", 32, 32, 80, 32), ("up_blocks.2 F64", 32, 32, 80, 64)]
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION}
ENERGY_PROGRAM_CAPS = (512, 1024, 2048, 4096)
# Attention-pass tiles tried beside the default where F > 16 (F_PAD 32: one sequence on 2 warps,
# chosen from this sweep; F_PAD 64: one on 8 warps, untimed before this sweep)
WIDE_FRAME_CONFIGS = [TileConfig(4, 32, 8), TileConfig(2, 32, 4), TileConfig(1, 32, 4),
                      TileConfig(1, 32, 2), TileConfig(2, 64, 8), TileConfig(1, 64, 4)]
FLUSH_BYTES = 256 << 20


def device_times(fn, flush: torch.Tensor) -> dict:
    """{kernel name: mean device microseconds per call of `fn`}, L2 flushed before each call."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            flush.fill_(1)
            fn()
        torch.cuda.synchronize()
    times = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and "signed char" not in event.key:
            times[event.key.split("(")[0][:40]] += event.self_device_time_total / CALLS
    return dict(times)


def tiles_label(config: TileConfig, energy: bool = False) -> str:
    """(sequences, BLOCK_D, warps), then the register cap and the energy form where they are not
    the default, and for the energy pass's tiles (`energy`) whether it stashes the guided maps."""
    extra = [] if config.max_registers is None else [f"maxnreg {config.max_registers}"]
    if config.energy_form != TileConfig._field_defaults["energy_form"]:
        extra.append(f"form {config.energy_form}")
    if energy:
        extra.append("stash" if config.stash_guided else "no stash")
    return " ".join([str(tuple(config[:3]))] + extra)


def energy_variants(tiles: TileConfig) -> dict:
    """{label: tiles}: the energy pass's default `tiles` in every other form, with and without
    the stash of guided maps (labels: the form, then "+stash" where it stashes)."""
    variants = {}
    for form in ENERGY_FORMS:
        for stash in (False, True):
            variant = tiles._replace(energy_form=form, stash_guided=stash)
            if variant != tiles:
                variants[form + ("+stash" if stash else "")] = variant
    return variants


def total(times: dict) -> float:
    return sum(times.values())


def describe(times: dict) -> str:
    return f"{total(times):8.1f}  [" + ", ".join(f"{key} {value:.1f}" for key, value in times.items()) + "]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the fused kernel's default and energy variants only: no SDPA, no sweeps")
    quick = parser.parse_args().quick
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    started = time.perf_counter()
    torch.manual_seed(0)
    preset = PRESETS["animatediff"]
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=DEVICE)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"device us per call (profiler, mean of {CALLS}, L2 flushed); preset animatediff "
          f"(alpha {preset.alpha}, beta {preset.beta}, tau {preset.tau}), guide {GUIDE_SIZE} nearest, "
          f"B={BATCH} (CFG), heads={HEADS}, fp16")
    summary = []
    for name, height, width, head_dim, frames in SHAPES:
        sequences, channels = BATCH * height * width, HEADS * head_dim
        qkv = torch.randn((sequences, frames, 3 * channels), device=DEVICE, dtype=torch.float16)
        q, k, v = qkv.split(channels, dim=-1)
        guide = torch.softmax(2.0 * torch.randn((BATCH, *GUIDE_SIZE, HEADS, frames, frames),
                                                device=DEVICE), dim=-1).half()
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        plain_map = torch.empty((BATCH, height, width, HEADS, frames, frames), device=DEVICE,
                                dtype=torch.float16)
        scale = head_dim ** -0.5
        fixed = ByTheWayParams(preset.alpha, preset.beta, preset.tau, False, 2, 1, "batch",
                               "nearest", None)
        adaptive = fixed._replace(adaptive_beta=True)
        plain = ByTheWayParams(0.0, 1.0, 0, False, 2, 1, "batch", "nearest", None)

        def fused(layer_guide, params, with_map=False, config=None, energy_config=None):
            return lambda: temporal_attention_triton_out(
                q, k, v, layer_guide, HEADS, height, width, scale, params, out,
                plain_map if with_map else None, None, config=config, energy_config=energy_config)

        def heads_view(values):  # (N, F, heads*d) -> (N, heads, F, d), a view
            return values.unflatten(-1, (HEADS, -1)).transpose(1, 2)

        floor = 4 * q.numel() * q.element_size() / 4.25e12 * 1e6
        print(f"\n{name}: {height}x{width}, d {head_dim}, F {frames}; memory floor {floor:.1f} us "
              "(q, k, v read + out written at 4.25 TB/s)")
        # the energy pass's other forms on its default tiles, and the stash, beside the default
        energy_tiles = default_energy_config(frames, head_dim)
        variants = energy_variants(energy_tiles)
        rows = {"fused plain": fused(None, plain), "fused fixed": fused(guide, fixed),
                "fused adaptive": fused(guide, adaptive),
                **{f"fused adaptive, energy {label}": fused(guide, adaptive, energy_config=tiles)
                   for label, tiles in variants.items()},
                "fused anchor+map": fused(None, fixed, with_map=True)}
        times = {}
        for label, fn in rows.items():
            times[label] = device_times(fn, flush)
            print(f"  {label:34} {describe(times[label])}")
        if frames != 16:  # tau 7 is the full band at F = 16: no product with P there
            for setting, product in (("tensor-cores", "tensor-core band"), ("fma", "fp32-dot band")):
                with band_product(setting):
                    for label in ("fused fixed", "fused adaptive"):
                        forced = device_times(rows[label], flush)
                        print(f"  {label + f' ({product})':34} {describe(forced)}")
            for config in [] if quick else WIDE_FRAME_CONFIGS:
                for label, layer_guide, params in (("plain", None, plain), ("fixed", guide, fixed)):
                    sweep = device_times(fused(layer_guide, params, config=config), flush)
                    print(f"  {label + ', tiles ' + tiles_label(config):34} {describe(sweep)}")
        for backend, kind in {} if quick else SDPA_BACKENDS.items():
            try:
                with sdpa_kernel(kind):
                    sdpa = lambda: F_nn.scaled_dot_product_attention(heads_view(q), heads_view(k),
                                                                       heads_view(v))
                    times[f"sdpa {backend}"] = device_times(sdpa, flush)
                print(f"  {'sdpa ' + backend:34} {describe(times['sdpa ' + backend])}")
            except RuntimeError as error:
                print(f"  sdpa {backend}: unavailable: {str(error).splitlines()[0][:100]}")
        if not quick:  # every F: at F_PAD 32 and 64 the energy pass's own tiles are untimed
            for config in energy_candidate_configs(frames, head_dim)[1:]:
                sweep = device_times(fused(guide, adaptive, energy_config=config), flush)
                print(f"  {'adaptive, energy tiles ' + tiles_label(config, energy=True):34} {describe(sweep)}")
        if frames == 16 and not quick:
            for config in candidate_configs(frames, head_dim)[1:]:
                sweep = device_times(fused(guide, fixed, config=config), flush)
                print(f"  {'fixed, tiles ' + tiles_label(config):34} {describe(sweep)}")
            with kernel_setting("ENERGY_NUM_STAGES", 2):  # software pipelining of the energy pass
                sweep = device_times(rows["fused adaptive"], flush)
                print(f"  {'adaptive, energy num_stages 2':34} {describe(sweep)}")
            for cap in ENERGY_PROGRAM_CAPS:
                with kernel_setting("ENERGY_PROGRAMS", cap):
                    # its own tiles, with and without the stash (caps of 512-4096 were within 5%
                    # of each other in every form on the H200: benchmarks/RESULTS.md)
                    for config in (None, energy_tiles._replace(
                            stash_guided=not energy_tiles.stash_guided)):
                        sweep = device_times(fused(guide, adaptive, energy_config=config), flush)
                        label = f"adaptive, ENERGY_PROGRAMS {cap}" + (
                            f" {tiles_label(config, energy=True)}" if config else "")
                        print(f"  {label:34} {describe(sweep)}")
        best_sdpa = min((total(times[key]) for key in times if key.startswith("sdpa")),
                        default=float("nan"))
        fixed_us = total(times["fused fixed"])
        forms_us = {label: total(times[f"fused adaptive, energy {label}"]) for label in variants}
        summary.append((name, floor, fixed_us, total(times["fused adaptive"]), best_sdpa, forms_us))
    # the energy forms timed differ by shape (the default's own form is not among its variants):
    # one column per form timed anywhere, "nan" where a shape has none
    form_labels = list(dict.fromkeys(label for *_, forms_us in summary for label in forms_us))
    print(f"\n{'shape':16}{'floor':>8}{'fixed':>9}{'adaptive':>10}{'best SDPA':>11}"
          f"{'fixed/SDPA':>12}{'adapt/fixed':>13}{'floor/fixed':>13}"
          + "".join(f"{label + '/fixed':>18}" for label in form_labels))
    for name, floor, fixed_us, adaptive_us, best_sdpa, forms_us in summary:
        print(f"{name:16}{floor:8.1f}{fixed_us:9.1f}{adaptive_us:10.1f}{best_sdpa:11.1f}"
              f"{fixed_us / best_sdpa:12.3f}{adaptive_us / fixed_us:13.2f}{floor / fixed_us:13.2f}"
              + "".join(f"{forms_us.get(label, math.nan) / fixed_us:18.2f}" for label in form_labels))
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0 if all(math.isfinite(row[2]) for row in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
