"""`python -m bytheway_kernels demo`: the tiny offline AnimateDiff pipeline with and without ByTheWay."""

from __future__ import annotations

import os
import time

import numpy as np

from ..config import PRESETS
from . import diagnostics
from .controller import active_step_count
from .media import enlarge, side_by_side, video_frames, write_gif
from .runs import GenerationSettings, generate
from .tiny import TINY_FRAMES, tiny_animatediff_pipeline


def run_demo(out_dir: str, steps: int, device: str) -> int:
    """Run the tiny pipeline twice from one seed (stock, then ByTheWay with the animatediff preset),
    print the per-block diagnostics table and write `side_by_side.gif` (stock | ByTheWay) into
    `out_dir`. The weights are random, so the videos are noise: the demo shows the machinery."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    pipe = tiny_animatediff_pipeline(device=device)
    settings = GenerationSettings(
        prompt="a tiny random video", num_frames=TINY_FRAMES, height=32, width=32,
        num_inference_steps=steps, guidance_scale=7.5, seed=0,
    )
    start = time.perf_counter()
    stock, _ = generate(pipe, settings, device, bytheway=False)
    with_bytheway, rows = generate(pipe, settings, device, bytheway=True, diagnostics=True)
    elapsed = time.perf_counter() - start

    stock_video, bytheway_video = video_frames(stock), video_frames(with_bytheway)
    difference = np.abs(stock_video.astype(np.int16) - bytheway_video.astype(np.int16)).max()
    os.makedirs(out_dir, exist_ok=True)
    gif = write_gif(side_by_side([enlarge(stock_video), enlarge(bytheway_video)]),
                    os.path.join(out_dir, "side_by_side.gif"))
    table = diagnostics.format_table(rows, by="block")
    with open(os.path.join(out_dir, "stats.txt"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")

    active = active_step_count(PRESETS["animatediff"].step_fraction, steps)
    print(f"tiny AnimateDiff pipeline on {device}: {TINY_FRAMES} frames, {steps} steps, CFG, preset "
          f"animatediff, active in the first {active} step(s)")
    print(table)
    print(f"max pixel difference stock vs ByTheWay: {difference} / 255   (two runs: {elapsed:.1f} s)")
    print(f"wrote {gif} (left: stock, right: ByTheWay)")
    return 0
