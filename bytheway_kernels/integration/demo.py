"""`python -m bytheway_kernels demo`: the tiny offline AnimateDiff pipeline with and without ByTheWay.

Examples:
    $ python -m bytheway_kernels demo --steps 4 --out bytheway_demo
    >>> from bytheway_kernels.integration.demo import run_demo
    >>> run_demo(out_dir="bytheway_demo", steps=4, device="cpu")  # doctest: +SKIP
    0
"""

from __future__ import annotations

import os
import time
from typing import Optional

from ..config import PRESETS
from ..ops.dispatch import environment_problem
from . import diagnostics
from .controller import active_step_count
from .media import amplified_difference, comparison, mp4_available, video_frames, write_videos
from .runs import (GenerationSettings, device_problem, generate, missing_modules_problem, out_dir_problem,
                   steps_problem)
from .tiny import TINY_FRAMES, tiny_animatediff_pipeline, tiny_ddim_scheduler

#: The modules of the [diffusers] extra the demo imports: the tiny pipeline's and the PNG/GIF writer's.
DEMO_MODULES = ("diffusers", "transformers", "PIL")


def demo_problem(out_dir: str, steps: int, device: str) -> Optional[str]:
    """Why the demo cannot run here with these arguments (one line), or None: the environment
    settings (`ops.dispatch.environment_problem`), the [diffusers]
    extra's modules it imports, steps from 1 to the tiny scheduler's training timesteps, a device
    this torch can use, an output folder it can write."""
    if steps < 1:
        return f"steps must be >= 1, got {steps}"
    return (environment_problem() or missing_modules_problem(DEMO_MODULES)
            or steps_problem(tiny_ddim_scheduler().config, steps)
            or device_problem(device) or out_dir_problem(out_dir))


def run_demo(out_dir: str, steps: int, device: str) -> int:
    """Run the tiny pipeline twice from one seed (stock, then ByTheWay with the animatediff preset),
    print the per-block diagnostics table and write into `out_dir`: `side_by_side.png` (every
    frame, lossless: stock | ByTheWay | amplified difference), `side_by_side.gif` (and `.mp4`
    when imageio-ffmpeg is installed) and `stats.txt`. The weights are random, so the videos are
    noise: the demo shows the machinery.

    Raises:
        ValueError: the `demo_problem` of the arguments (checked before any work).
    """
    problem = demo_problem(out_dir, steps, device)
    if problem:
        raise ValueError(problem)
    pipe = tiny_animatediff_pipeline(device=device)
    settings = GenerationSettings(
        prompt="a tiny random video", num_frames=TINY_FRAMES, height=32, width=32,
        num_inference_steps=steps, guidance_scale=7.5, seed=0,
    )
    start = time.perf_counter()
    stock, _ = generate(pipe, settings)
    with_bytheway, rows = generate(pipe, settings, config=PRESETS["animatediff"], diagnostics=True)
    elapsed = time.perf_counter() - start

    stock_video, bytheway_video = video_frames(stock), video_frames(with_bytheway)
    difference, factor = amplified_difference(stock_video, bytheway_video)
    largest = int(difference.max()) // factor
    paths = write_videos({"side_by_side": comparison(stock_video, bytheway_video)}, out_dir,
                         mp4=mp4_available())
    table = diagnostics.format_table(rows, by="block")
    stats_path = os.path.join(out_dir, "stats.txt")
    with open(stats_path, "w", encoding="utf-8") as handle:
        handle.write(table + "\n")

    active = active_step_count(PRESETS["animatediff"].step_fraction, steps)
    print(f"tiny AnimateDiff pipeline on {device}: {TINY_FRAMES} frames, {steps} steps, CFG, preset "
          f"animatediff, active in the first {active} step(s)")
    print(table)
    print(f"max pixel difference stock vs ByTheWay: {largest} / 255   (two runs: {elapsed:.1f} s)")
    print(f"wrote {', '.join(paths + [stats_path])}")
    print(f"  (columns: stock | ByTheWay | |difference| x{factor}; the PNG is lossless, one frame per row)")
    return 0
