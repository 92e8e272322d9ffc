"""Generate a video with and without ByTheWay from the same seed and write both side by side.

Examples:
    # offline smoke run on the tiny random-weight AnimateDiff pipeline (what CI runs)
    python python/generate.py --tiny --steps 4 --out out/tiny

    # a local AnimateDiff pipeline folder (diffusers format), or an SD1.5 folder + a motion adapter
    python python/generate.py --model ./animatediff-pipeline --prompt "a panda surfing" --device cuda --dtype float16
    python python/generate.py --model ./realistic-vision-v5.1 --motion-adapter ./animatediff-motion-adapter-v1-5-2 ...

    # a VideoCrafter2/ModelScope-like TextToVideoSD folder with the paper's VideoCrafter2 settings
    python python/generate.py --model ./text-to-video-ms-1.7b --preset videocrafter2 --height 320 --width 512

Writes <out>/stock.gif, <out>/bytheway.gif and <out>/side_by_side.gif (left: stock, right:
ByTheWay), plus MP4s with --mp4 (needs the imageio-ffmpeg package). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

try:
    import bytheway_kernels  # noqa: F401 -- installed
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    from bytheway_kernels.integration.runs import add_run_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--alpha", type=float, help="override the preset's alpha")
    parser.add_argument("--beta", type=float, help="override the preset's beta_0")
    parser.add_argument("--tau", type=int, help="override the preset's tau")
    parser.add_argument("--step-fraction", type=float, help="override the preset's step fraction")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--mp4", action="store_true", help="also write MP4 files (needs imageio-ffmpeg)")
    parser.add_argument("--out", default="bytheway_out")
    return parser.parse_args(argv)


def overrides_from(args) -> dict:
    names = {"alpha": "alpha", "beta": "beta", "tau": "tau", "step_fraction": "step_fraction"}
    return {field: getattr(args, arg) for arg, field in names.items() if getattr(args, arg) is not None}


def main(argv=None) -> int:
    args = parse_args(argv)
    from bytheway_kernels.integration.media import enlarge, side_by_side, video_frames, write_gif, write_mp4
    from bytheway_kernels.integration.runs import generate, pipeline_and_settings

    pipe, settings = pipeline_and_settings(args)
    videos = {}
    for name in tqdm(("stock", "bytheway"), desc="runs"):
        frames, _ = generate(pipe, settings, args.device, bytheway=name == "bytheway", preset=args.preset,
                             **overrides_from(args))
        videos[name] = video_frames(frames)

    os.makedirs(args.out, exist_ok=True)
    videos["side_by_side"] = side_by_side([enlarge(videos["stock"]), enlarge(videos["bytheway"])])
    for name, video in videos.items():
        print(write_gif(video, os.path.join(args.out, f"{name}.gif"), fps=args.fps))
        if args.mp4:
            print(write_mp4(video, os.path.join(args.out, f"{name}.mp4"), fps=args.fps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
