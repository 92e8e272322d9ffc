"""Kernel and host time of the map op's Triton backend vs torch.softmax (needs CUDA).

Run from the repository root: `python benchmarks/map_op_kernel_times.py`. For each AnimateDiff
shape (fp16, CFG batch 2, 8 heads, 16x16 guide, preset animatediff) and for F = 24 and 32 at
up_blocks.2's size (tau 7: a circulant band, so the band step multiplies by P) it prints the
profiler's self device time per kernel averaged over 20 calls, and the host time per call of 200
calls issued without synchronising, as the 2026-11-26 H200 notes measured them
(benchmarks/results/h200-2026-11-26.notes.md), three ways: through Triton's launch path, through
the direct launcher, and our Python alone (benchmarks/host_cost.py). At F = 24 and 32 it also
times the band product as three tf32 products on tensor cores ("tc" rows) next to the default
exact fp32 dot (`bytheway_kernels.ops.triton_rules.band_product`).
"""

from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import bytheway_kernels as btw
from bytheway_kernels.testing import band_product_split
from host_cost import HOST_COLUMNS, host_costs, host_us_per_call

CALLS = 20
# (spatial size, frames): the three AnimateDiff layers, then longer videos at up_blocks.2's size
SHAPES = [(16, 16), (32, 16), (64, 16), (32, 24), (32, 32)]


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


def main():
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print("host us/call: " + " / ".join(HOST_COLUMNS) + " (softmax: its one host time)")
    for size, frames in SHAPES:
        scores = torch.randn((2, size, size, 8, frames, frames), device="cuda", dtype=torch.float16) * 3
        guide = torch.softmax(torch.randn((2, 16, 16, 8, frames, frames), device="cuda"), -1).half()
        calls = {
            "softmax": lambda: torch.softmax(scores, -1),
            "fixed": lambda: btw.bytheway_attention_probs(scores, guide, alpha=0.6, beta=1.5, tau=7,
                                                          adaptive_beta=False),
            "adaptive": lambda: btw.bytheway_attention_probs(scores, guide, alpha=0.6, beta=1.5, tau=7),
        }
        runs = [(name, fn, False) for name, fn in calls.items()]
        if frames != 16:  # tau 7 is the full band at F = 16: no product with P there
            runs += [(f"{name} tc", calls[name], True) for name in ("fixed", "adaptive")]
        softmax_kernel = None
        for name, fn, split in runs:
            with band_product_split(split):
                kernels = kernel_times(fn)
                total = sum(kernels.values())
                softmax_kernel = softmax_kernel or total
                parts = ", ".join(f"{key.split('(')[0][:24]} {value:.1f}" for key, value in kernels.items())
                if name == "softmax":
                    host_text = f"{host_us_per_call(fn):6.1f}"
                elif split:
                    host_text = "(as with fma)"
                else:
                    host = host_costs(fn)
                    host_text = " / ".join(f"{host[column]:6.1f}" for column in HOST_COLUMNS)
            print(f"{size}x{size} F{frames} {name:12s} kernel {total:6.1f} us ({total / softmax_kernel:.2f}x "
                  f"softmax)  host {host_text} us/call  [{parts}]")


if __name__ == "__main__":
    main()
