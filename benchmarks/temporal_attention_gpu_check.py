"""Quick GPU check and timing of fused temporal attention at the AnimateDiff shapes (< 60 s).

    PYTHONPATH=$PWD TRITON_DEFAULT_FP_FUSION=1 python3 benchmarks/temporal_attention_gpu_check.py

For each temporal attention layer shape of AnimateDiff at 512x512 (batch 2 for CFG, 8 heads,
16 frames, fp16, q, k, v as strided slices of one (N, F, 3C) projection) it
1. checks the fused kernels against the composed path (q k^T -> the map op -> @ v) for plain
   attention, the animatediff preset with a 16x16 guide (fixed and adaptive beta, stats too;
   adaptive beta again with the guided maps stashed, `TileConfig.stash_guided`) and the anchor's
   returned map, and plain attention against SDPA;
2. times, as the benchmark suite does (benchmarks/harness.py `kernel_time`: median device time
   between CUDA events, L2 flushed before every call, a GPU sleep queued first so that the host's
   launches never leave gaps inside the events), the fused kernel
   (plain, fixed beta, adaptive beta with and without the stash, fixed beta + map), the composed
   path and each SDPA backend,
   with the memory floor (q, k, v read + out written at 4.25 TB/s), and the host cost per call of
   the public function three ways (through Triton's launch path, the direct launcher, our Python
   alone: benchmarks/host_cost.py);
3. checks the band product's fp32 accuracy on this GPU (a small layer against float64), then at
   up_blocks.2's size with F = 24 and 32 (tau 7: a circulant band), checks and times fixed and
   adaptive beta with the band product as three tf32 products on tensor cores
   (`bytheway_kernels.ops.triton_rules.band_product`) and as one exact fp32 dot on the FMA units
   (the default).
Exits non-zero if a check fails. The tile and energy-pass sweeps that choose the kernels'
defaults are benchmarks/fused_kernel_times.py's (device times without launch gaps); the benchmark
suite proper is benchmarks/test_*.py.
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F_nn
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from bytheway_kernels import PRESETS, temporal_attention
from bytheway_kernels.ops.params import ByTheWayParams
from bytheway_kernels.ops.temporal_attention.reference import temporal_attention_composed
from bytheway_kernels.testing import band_product
from bytheway_kernels.ops.temporal_attention.triton import (default_energy_config,
                                                            temporal_attention_triton_out)
import harness  # benchmarks/harness.py: the suite's timers
from host_cost import HOST_COLUMNS, host_costs  # benchmarks/host_cost.py

BANDWIDTH = 4.25e12  # bytes/s, measured copy bandwidth of an H200 (docs/DESIGN.md section 7)
BATCH, HEADS, FRAMES, GUIDE_SIZE = 2, 8, 16, (16, 16)
SHAPES = [("up_blocks.1", 16, 16, 160), ("up_blocks.2", 32, 32, 80), ("up_blocks.3", 64, 64, 40)]
BAND_FRAMES = (24, 32)  # at up_blocks.2's size: the band product with P, both ways
DEVICE = "cuda"
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION}
HOST_CALLS = 200  # calls of the public function timed on the host
MAX_RELATIVE_ERROR = 4e-3  # fp16 output: 2 ulps of the largest |out| (both paths accumulate in fp32)
FP32_MAX_RELATIVE_ERROR = 2e-5  # fp32 output against float64 (PROB_TOLERANCES' fp32 atol)


bench_us = harness.device_us  # median device microseconds of one call


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))


def make_layer(height: int, width: int, head_dim: int, frames: int = FRAMES):
    sequences, channels = BATCH * height * width, HEADS * head_dim
    qkv = torch.randn((sequences, frames, 3 * channels), device=DEVICE, dtype=torch.float16)
    q, k, v = qkv.split(channels, dim=-1)
    guide_logits = torch.randn((BATCH, *GUIDE_SIZE, HEADS, frames, frames), device=DEVICE)
    guide = torch.softmax(2.0 * guide_logits, dim=-1).to(torch.float16)
    return q, k, v, guide


def sdpa(q, k, v):
    def heads_view(values):  # (N, F, heads*d) -> (N, heads, F, d), a view: no copy
        return values.unflatten(-1, (HEADS, -1)).transpose(1, 2)

    return F_nn.scaled_dot_product_attention(heads_view(q), heads_view(k), heads_view(v))


def stash_tiles(head_dim: int):
    """The energy pass's default tiles at F = FRAMES, stashing the guided maps."""
    return default_energy_config(FRAMES, head_dim)._replace(stash_guided=True)


def check_shape(name, height, width, head_dim, preset) -> list:
    """Correctness of the fused kernels at one shape; returns failure messages."""
    q, k, v, guide = make_layer(height, width, head_dim)
    scale = head_dim ** -0.5
    failures = []
    settings = {
        "plain": (None, ByTheWayParams(0.0, 1.0, 0, False, 2, 1, "batch", "nearest", None)),
        "fixed": (guide, ByTheWayParams(preset.alpha, preset.beta, preset.tau, False, 2, 1, "batch",
                                        "nearest", None)),
        "adaptive": (guide, ByTheWayParams(preset.alpha, preset.beta, preset.tau, True, 2, 1,
                                           "batch", "nearest", None)),
    }
    for label, (layer_guide, params) in settings.items():
        composed = temporal_attention_composed(q, k, v, layer_guide, HEADS, height, width, scale,
                                               params, True, True)
        out = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)
        plain_map = torch.full_like(composed[1], float("nan"))
        stats = torch.full_like(composed[2], float("nan"))
        temporal_attention_triton_out(q, k, v, layer_guide, HEADS, height, width, scale, params,
                                      out, plain_map, stats)
        errors = dict(out=relative_error(out, composed[0]), map=relative_error(plain_map, composed[1]),
                      stats=relative_error(stats, composed[2]))
        print(f"  {name} {label:9} rel. error vs composed: "
              + ", ".join(f"{key} {value:.2e}" for key, value in errors.items())
              + f"  (beta {float(stats[0, 0]):.4f})")
        failures += [f"{name} {label} {key} {value:.2e}" for key, value in errors.items()
                     if not value <= MAX_RELATIVE_ERROR]
    # adaptive beta with the stash: without the anchor's map, which turns the stash off
    layer_guide, params = settings["adaptive"]
    out, _, stats = temporal_attention_composed(q, k, v, layer_guide, HEADS, height, width, scale,
                                                params, False, True)
    stashed_out = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)
    stashed_stats = torch.full_like(stats, float("nan"))
    temporal_attention_triton_out(q, k, v, layer_guide, HEADS, height, width, scale, params,
                                  stashed_out, None, stashed_stats,
                                  energy_config=stash_tiles(head_dim))
    errors = dict(out=relative_error(stashed_out, out), stats=relative_error(stashed_stats, stats))
    print(f"  {name} {'stashed':9} rel. error vs composed: "
          + ", ".join(f"{key} {value:.2e}" for key, value in errors.items()))
    failures += [f"{name} stashed {key} {value:.2e}" for key, value in errors.items()
                 if not value <= MAX_RELATIVE_ERROR]
    with sdpa_kernel(SDPBackend.MATH):
        reference = sdpa(q.float(), k.float(), v.float())
    plain = temporal_attention(q, k, v, heads=HEADS, height=height, width=width)
    error = relative_error(plain.unflatten(-1, (HEADS, -1)).transpose(1, 2), reference)
    print(f"  {name} plain vs SDPA (fp32 math): rel. error {error:.2e}")
    if not error <= MAX_RELATIVE_ERROR:
        failures.append(f"{name} plain vs SDPA {error:.2e}")
    return failures


def time_shape(name, height, width, head_dim, preset) -> dict:
    q, k, v, guide = make_layer(height, width, head_dim)
    bytes_moved = 4 * q.numel() * q.element_size()  # q, k, v read once, out written once
    row = {"shape": name, "floor": bytes_moved / BANDWIDTH * 1e6}
    scale = head_dim ** -0.5
    fixed = ByTheWayParams(preset.alpha, preset.beta, preset.tau, False, 2, 1, "batch", "nearest",
                           None)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    plain_map = torch.empty((BATCH, height, width, HEADS, FRAMES, FRAMES), device=DEVICE,
                            dtype=torch.float16)

    def fused(layer_guide, params, with_map=False, energy_config=None):
        return lambda: temporal_attention_triton_out(
            q, k, v, layer_guide, HEADS, height, width, scale, params, out,
            plain_map if with_map else None, None, energy_config=energy_config)

    row["fused plain"] = bench_us(fused(None, ByTheWayParams(0.0, 1.0, 0, False, 2, 1, "batch",
                                                              "nearest", None)))
    row["fused fixed"] = bench_us(fused(guide, fixed))
    row["fused adaptive"] = bench_us(fused(guide, fixed._replace(adaptive_beta=True)))
    row["adaptive stash"] = bench_us(fused(guide, fixed._replace(adaptive_beta=True),
                                           energy_config=stash_tiles(head_dim)))
    row["fused anchor+map"] = bench_us(fused(None, fixed, with_map=True))
    row["composed fixed"] = bench_us(lambda: temporal_attention_composed(
        q, k, v, guide, HEADS, height, width, scale, fixed, False, False))
    for backend, kind in SDPA_BACKENDS.items():
        try:
            with sdpa_kernel(kind):
                sdpa(q, k, v)
                row[f"sdpa {backend}"] = bench_us(lambda: sdpa(q, k, v))
        except RuntimeError as error:  # a backend that does not take this shape or layout
            row[f"sdpa {backend}"] = float("nan")
            print(f"  {name}: SDPA {backend} unavailable: {str(error).splitlines()[0][:100]}")
    row["host"] = host_costs(lambda: temporal_attention(
        q, k, v, heads=HEADS, height=height, width=width, guide=guide, alpha=preset.alpha,
        beta=preset.beta, tau=preset.tau), HOST_CALLS)
    return row


def check_band_products_fp32(preset) -> list:
    """The band product's accuracy on this GPU's tensor cores: fp32 inputs at F = 24 and 32 on a
    small layer, both products against the composed path in float64 (the map op's pure-torch
    reference: no Triton involved); returns failure messages. The split keeps fp32 accuracy
    (~2^-22 of the product, tests/test_band_product.py); FP32_MAX_RELATIVE_ERROR is well below
    what one tf32 product would give (~1e-3)."""
    height, width, head_dim = 4, 4, 80
    failures = []
    for frames in BAND_FRAMES:
        q, k, v, guide = (x.float() for x in make_layer(height, width, head_dim, frames))
        guide = guide[:, :2, :2].contiguous()
        scale = head_dim ** -0.5
        for adaptive in (False, True):
            params = ByTheWayParams(preset.alpha, preset.beta, preset.tau, adaptive, 2, 1, "batch",
                                    "nearest", None)
            truth = temporal_attention_composed(q.double(), k.double(), v.double(), guide.double(),
                                                HEADS, height, width, scale, params, False, False)[0]
            for setting, product in (("tensor-cores", "tensor cores"), ("fma", "fma")):
                out = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)
                with band_product(setting):
                    temporal_attention_triton_out(q, k, v, guide, HEADS, height, width, scale,
                                                  params, out)
                error = relative_error(out, truth)
                label = f"F{frames} {'adaptive' if adaptive else 'fixed'} fp32 {product}"
                print(f"  band product {label}: rel. error vs float64 {error:.2e}")
                if not error <= FP32_MAX_RELATIVE_ERROR:
                    failures.append(f"{label} out {error:.2e}")
    return failures


def time_band_products(preset) -> tuple:
    """(failures, rows): at up_blocks.2's size with each F of BAND_FRAMES, the fused fixed and
    adaptive kernels with the band product split on tensor cores and as one fp32 dot, checked
    against the composed path (its map op running the exact fp32 dot) and timed."""
    _, height, width, head_dim = SHAPES[1]
    failures, rows = [], []
    for frames in BAND_FRAMES:
        q, k, v, guide = make_layer(height, width, head_dim, frames)
        scale = head_dim ** -0.5
        fixed = ByTheWayParams(preset.alpha, preset.beta, preset.tau, False, 2, 1, "batch",
                               "nearest", None)
        row = {"frames": frames}
        for label, params in (("fixed", fixed), ("adaptive", fixed._replace(adaptive_beta=True))):
            with band_product("fma"):
                composed = temporal_attention_composed(q, k, v, guide, HEADS, height, width, scale,
                                                       params, False, False)[0]
            for setting, product in (("tensor-cores", "tensor cores"), ("fma", "fma")):
                out = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)
                with band_product(setting):
                    def call():
                        temporal_attention_triton_out(q, k, v, guide, HEADS, height, width, scale,
                                                      params, out)
                    call()
                    error = relative_error(out, composed)
                    row[f"{label} {product}"] = bench_us(call)
                if not error <= MAX_RELATIVE_ERROR:
                    failures.append(f"F{frames} {label} {product} out {error:.2e}")
        rows.append(row)
    return failures, rows


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    started = time.perf_counter()
    torch.manual_seed(0)
    preset = PRESETS["animatediff"]
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"preset animatediff: alpha {preset.alpha}, beta {preset.beta}, tau {preset.tau}; "
          f"guide {GUIDE_SIZE}, nearest; B={BATCH} (CFG), heads={HEADS}, F={FRAMES}, fp16")
    failures = []
    for name, height, width, head_dim in SHAPES:
        failures += check_shape(name, height, width, head_dim, preset)
    rows = [time_shape(*shape, preset) for shape in SHAPES]
    failures += check_band_products_fp32(preset)
    band_failures, band_rows = time_band_products(preset)
    failures += band_failures
    columns = ["floor", "fused plain", "fused fixed", "fused adaptive", "adaptive stash",
               "fused anchor+map",
               "composed fixed", "sdpa flash", "sdpa efficient", "sdpa cudnn"]
    print("\nkernel time, us (median, L2 flushed, no host gaps)")
    print(f"{'shape':12}" + "".join(f"{column:>17}" for column in columns)
          + f"{'fixed/best SDPA':>17}{'floor/fixed':>13}{'adaptive/fixed':>16}{'stash/fixed':>13}"
          + "".join(f"{'host ' + column:>20}" for column in HOST_COLUMNS))
    for row in rows:
        best_sdpa = min((row[f"sdpa {b}"] for b in SDPA_BACKENDS if not math.isnan(row[f"sdpa {b}"])),
                        default=float("nan"))
        print(f"{row['shape']:12}" + "".join(f"{row[column]:17.1f}" for column in columns)
              + f"{row['fused fixed'] / best_sdpa:17.3f}{row['floor'] / row['fused fixed']:13.2f}"
              + f"{row['fused adaptive'] / row['fused fixed']:16.2f}"
              + f"{row['adaptive stash'] / row['fused fixed']:13.2f}"
              + "".join(f"{row['host'][column]:20.1f}" for column in HOST_COLUMNS))
    print(f"\nband product at {SHAPES[1][0]}'s size, tau {preset.tau}: kernel time, us "
          "(tensor cores: three tf32 products; fma: one exact fp32 dot, the default)")
    band_columns = [f"{label} {product}" for label in ("fixed", "adaptive")
                    for product in ("tensor cores", "fma")]
    print(f"{'F':>4}" + "".join(f"{column:>23}" for column in band_columns) + f"{'fixed tc/fma':>14}")
    for row in band_rows:
        print(f"{row['frames']:4d}" + "".join(f"{row[column]:23.1f}" for column in band_columns)
              + f"{row['fixed tensor cores'] / row['fixed fma']:14.2f}")
    print(f"\n{'FAILED: ' + '; '.join(failures) if failures else 'all checks passed'}"
          f"  ({time.perf_counter() - started:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
