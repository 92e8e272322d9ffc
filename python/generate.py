"""Generate a video with and without ByTheWay from the same seed and write both side by side.

Examples:
    # offline smoke run on the tiny random-weight AnimateDiff pipeline (what CI runs)
    python python/generate.py --tiny --steps 4 --out out/tiny

    # a local AnimateDiff pipeline folder (diffusers format), or an SD1.5 folder + a motion adapter
    # (--fast-temporal-attention: every temporal attention layer fused, in both runs; CUDA)
    python python/generate.py --model ./animatediff-pipeline --prompt "a panda surfing" --device cuda --dtype float16
    python python/generate.py --model ./realistic-vision-v5.1 --motion-adapter ./animatediff-motion-adapter-v1-5-2 ...

    # a VideoCrafter2/ModelScope-like TextToVideoSD folder with the paper's VideoCrafter2 settings
    python python/generate.py --model ./text-to-video-ms-1.7b --preset videocrafter2 --height 320 --width 512

Writes into --out, for stock, bytheway and side_by_side (the labelled comparison
stock | ByTheWay | amplified difference, one frame per row):
  <name>.png  every frame, lossless (the output to judge the effect by);
  <name>.gif  a looping preview (lossy: 256 colours hide or invent small differences);
  <name>.mp4  when imageio-ffmpeg is installed (--mp4 makes it required: without imageio-ffmpeg
              the script then stops before loading anything).
Every option is checked before the model is loaded, and the modules of the [diffusers] extra it
needs before anything else. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import bytheway_kernels  # noqa: F401 -- installed
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: The modules of the [diffusers] extra this script imports (pipelines, progress bars, PNG/GIF files).
REQUIRED_MODULES = ("diffusers", "transformers", "tqdm", "PIL")


def parser_and_args(argv=None):
    """(parser, parsed options); the options are not checked yet (see `main`)."""
    from bytheway_kernels.integration.runs import add_run_arguments, positive_int

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--fps", type=positive_int, default=8,
                        help="frames per second of the GIF and MP4 files (default: %(default)s)")
    parser.add_argument("--mp4", action="store_true",
                        help="require MP4 files (written anyway when imageio-ffmpeg is installed)")
    parser.add_argument("--no-gif", action="store_true", help="skip the GIF previews")
    parser.add_argument("--out", default="bytheway_out", help="output folder, created (default: %(default)s)")
    parser.add_argument("--fast-temporal-attention", action="store_true",
                        help="both runs: temporal self-attention through the fused kernel (CUDA; "
                             "outputs equal stock within fp tolerance, faster; elsewhere stock)")
    return parser, parser.parse_args(argv)


def main(argv=None) -> int:
    """Check the options, run stock then ByTheWay from one seed, write the files; returns 0."""
    from bytheway_kernels.integration.media import comparison, mp4_available, video_frames, write_videos
    from bytheway_kernels.integration.runs import (generate, missing_modules_problem, out_dir_problem,
                                                   pipeline_and_settings, run_config)

    parser, args = parser_and_args(argv)
    problem = missing_modules_problem(REQUIRED_MODULES)
    if problem:
        parser.error(problem)
    config = run_config(parser, args)
    if args.mp4 and not mp4_available():
        parser.error("--mp4 needs the imageio-ffmpeg package (pip install imageio-ffmpeg); "
                     "leave --mp4 out to write PNG and GIF only")
    problem = out_dir_problem(args.out)  # creates the folder: the last check before the model loads
    if problem:
        parser.error(problem)
    from tqdm.auto import tqdm

    pipe, settings = pipeline_and_settings(parser, args)
    videos = {}
    for name in tqdm(("stock", "bytheway"), desc="runs"):
        frames, _ = generate(pipe, settings, config=config if name == "bytheway" else None,
                             fast_attention=args.fast_temporal_attention)
        videos[name] = video_frames(frames)
    videos["side_by_side"] = comparison(videos["stock"], videos["bytheway"])
    for path in write_videos(videos, args.out, fps=args.fps, mp4=mp4_available(), gif=not args.no_gif):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
