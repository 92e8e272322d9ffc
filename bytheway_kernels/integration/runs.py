"""Loading a pipeline and running it with and without ByTheWay from one seed.

Shared by `python -m bytheway_kernels demo`, `python/generate.py` and `python/analyze.py`,
including their common command-line options and the checks those options get before any model is
loaded (`missing_modules_problem`, `run_config`, `out_dir_problem`; `--steps` and `--image` against
the loaded pipeline, before it runs): a script refuses bad options in one line, before doing any work.

Examples:
    >>> import argparse
    >>> from bytheway_kernels.integration.runs import add_run_arguments, run_config
    >>> parser = argparse.ArgumentParser()
    >>> add_run_arguments(parser)
    >>> args = parser.parse_args(["--tiny", "--frames", "8", "--tau", "3", "--device", "cpu"])
    >>> run_config(parser, args).tau
    3
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import inspect
import os
from typing import List, Optional, Sequence

import torch

from ..band import max_tau
from ..config import PRESETS, ByTheWayConfig
from ..ops.dispatch import environment_problem
from .controller import apply_bytheway
from .fast import enable_fast_temporal_attention

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: Pixels per latent cell of every supported pipeline's VAE: heights and widths are multiples.
PIXELS_PER_LATENT = 8
#: Command-line option -> ByTheWayConfig field it overrides.
CONFIG_OPTIONS = {"alpha": "alpha", "beta": "beta", "tau": "tau", "step_fraction": "step_fraction"}
#: How to install the [diffusers] extra, which provides every module the demo and the scripts import.
EXTRA_INSTALL = 'pip install -e ".[diffusers]"'
#: The seeds torch.Generator.manual_seed accepts (int64 and uint64 values).
SEED_RANGE = (-2**63, 2**64 - 1)
#: Folder option -> (what it holds, the file diffusers' from_pretrained reads first from it).
MODEL_FOLDERS = {"model": ("diffusers pipeline", "model_index.json"),
                 "motion_adapter": ("MotionAdapter", "config.json")}


def load_pipeline(model: Optional[str], *, tiny: bool, device: str, dtype: torch.dtype,
                  motion_adapter: Optional[str] = None, seed: int = 0):
    """The tiny offline AnimateDiff pipeline (`tiny=True`) or a local diffusers pipeline folder.

    With `motion_adapter`, `model` is an SD1.5-style base folder and the pipeline is an
    AnimateDiffPipeline built from it and the MotionAdapter folder. Nothing is downloaded.

    Examples:
        >>> pipe = load_pipeline(None, tiny=True, device="cpu", dtype=torch.float32)  # doctest: +SKIP
    """
    if tiny:
        from .tiny import tiny_animatediff_pipeline

        return tiny_animatediff_pipeline(device=device, dtype=dtype, seed=seed)
    if not model:
        raise ValueError("give a local model folder (--model) or --tiny")
    if motion_adapter:
        from diffusers import AnimateDiffPipeline, MotionAdapter

        adapter = MotionAdapter.from_pretrained(motion_adapter, torch_dtype=dtype, local_files_only=True)
        pipe = AnimateDiffPipeline.from_pretrained(
            model, motion_adapter=adapter, torch_dtype=dtype, local_files_only=True
        )
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=True)
    return pipe.to(device)


@dataclasses.dataclass
class GenerationSettings:
    """Arguments of one video generation (those a pipeline does not take are left out).

    Examples:
        >>> settings = GenerationSettings(prompt="a cat", num_frames=16, num_inference_steps=4)
        >>> frames = pipe(**settings.call_kwargs(pipe)).frames  # doctest: +SKIP
    """

    prompt: str = "a panda surfing a wave, high quality"
    negative_prompt: Optional[str] = None
    num_frames: int = 16
    height: Optional[int] = None
    width: Optional[int] = None
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0
    image: Optional[str] = None  # conditioning image path for image-to-video pipelines

    def call_kwargs(self, pipe) -> dict:
        """The keyword arguments for `pipe(...)`: those its `__call__` accepts and that are set.

        The generator is a CPU one, so a seed gives the same initial noise on every device."""
        accepted = inspect.signature(pipe.__call__).parameters
        kwargs = dict(
            prompt=self.prompt, negative_prompt=self.negative_prompt, num_frames=self.num_frames,
            height=self.height, width=self.width, num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale, output_type="np",
            generator=torch.Generator(device="cpu").manual_seed(self.seed),
        )
        if self.image and "image" in accepted:  # only image-to-video pipelines read the file
            from PIL import Image

            kwargs["image"] = Image.open(self.image).convert("RGB")
        return {k: v for k, v in kwargs.items() if k in accepted and v is not None}


def cfg_for(pipe, settings: GenerationSettings):
    """None when the pipeline reports CFG itself, else guidance_scale > 1."""
    if hasattr(type(pipe), "do_classifier_free_guidance"):
        return None
    return settings.guidance_scale > 1.0


def generate(pipe, settings: GenerationSettings, *, config: Optional[ByTheWayConfig] = None,
             diagnostics: bool = False, observe_only: bool = False, fast_attention: bool = False):
    """Run the pipeline once; returns (frames, diagnostics rows or None).

    `config=None` runs stock (unless `observe_only`, which measures with the animatediff preset
    but keeps the stock outputs); otherwise ByTheWay with that config. `fast_attention` runs the
    temporal self-attention layers ByTheWay leaves alone through the fused kernel for this run
    (`enable_fast_temporal_attention`: CUDA; stock processors elsewhere).

    Examples:
        >>> stock, _ = generate(pipe, settings)  # doctest: +SKIP
        >>> edited, rows = generate(pipe, settings, config=PRESETS["animatediff"], diagnostics=True)  # doctest: +SKIP
    """
    kwargs = settings.call_kwargs(pipe)
    fast = enable_fast_temporal_attention(pipe) if fast_attention else contextlib.nullcontext()
    with fast:
        if config is None and not observe_only:
            with torch.inference_mode():
                return pipe(**kwargs).frames, None
        with apply_bytheway(pipe, config or PRESETS["animatediff"], cfg=cfg_for(pipe, settings),
                            diagnostics=diagnostics, observe_only=observe_only) as controller:
            with torch.inference_mode():
                frames = pipe(**kwargs).frames
            rows: Optional[List[dict]] = (controller.diagnostics() if (diagnostics or observe_only)
                                          else None)
    return frames, rows


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def device_problem(device: str) -> Optional[str]:
    """Why `device` cannot run here (one line), or None when it can.

    Examples:
        >>> device_problem("cpu") is None
        True
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return f"--device {device!r} is not a torch device (try cpu or cuda)"
    if parsed.type == "meta":
        return "--device meta holds shapes but no data: use cpu or cuda"
    if parsed.type == "cuda" and not torch.cuda.is_available():
        return (f"--device {device} asked for, but this torch ({torch.__version__}) has no usable CUDA "
                "device; use --device cpu or install a CUDA build of torch")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here"
    return None


def out_dir_problem(path: str) -> Optional[str]:
    """Create the output folder `path` (and its parents) now, so that one that cannot be written
    fails before any work; returns why it cannot (one line), or None.

    Examples:
        >>> import tempfile
        >>> out_dir_problem(tempfile.gettempdir()) is None
        True
    """
    if os.path.exists(path) and not os.path.isdir(path):
        return f"--out {path!r} exists and is not a folder"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        return f"--out {path!r} cannot be created: {error.strerror or error}"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"--out {path!r} is not writable"
    return None


def missing_modules_problem(modules: Sequence[str]) -> Optional[str]:
    """Which of `modules` (all from the [diffusers] extra) cannot be imported here, in one line that
    says how to install them, or None.

    Examples:
        >>> missing_modules_problem(["os"]) is None
        True
    """
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"missing module{'s' if len(missing) > 1 else ''} {', '.join(missing)}: install the "
            f"[diffusers] extra ({EXTRA_INSTALL})")


def input_path_problem(option: str, path: str) -> Optional[str]:
    """Why `path`, given to --model, --motion-adapter or --image (`option` with underscores), cannot
    be used (one line), or None: a model option needs a local folder in diffusers' format, --image
    an image file PIL can read."""
    flag = "--" + option.replace("_", "-")
    if not os.path.exists(path):
        return f"{flag} {path!r} does not exist (only local files are used)"
    if option == "image":
        if os.path.isdir(path):
            return f"--image {path!r} is a folder, not an image file"
        from PIL import Image

        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
            return f"--image {path!r} cannot be read as an image: {getattr(error, 'strerror', None) or error}"
        return None
    kind, marker = MODEL_FOLDERS[option]
    if not os.path.isdir(path):
        return f"{flag} {path!r} is not a folder: give a local {kind} folder (with {marker})"
    if not os.path.isfile(os.path.join(path, marker)):
        return f"{flag} {path!r} has no {marker}: it is not a {kind} folder"
    return None


def steps_problem(scheduler_config, steps: int) -> Optional[str]:
    """Why `steps` denoising steps do not fit the scheduler (more than its training timesteps,
    which diffusers refuses), or None."""
    limit = getattr(scheduler_config, "num_train_timesteps", None)
    if isinstance(limit, int) and steps > limit:
        return f"--steps {steps} is more than the scheduler's {limit} training timesteps"
    return None


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `python/generate.py` and `python/analyze.py` share: model, video, ByTheWay."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local diffusers pipeline folder")
    source.add_argument("--tiny", action="store_true", help="tiny random-weight AnimateDiff pipeline (offline)")
    parser.add_argument("--motion-adapter", help="local MotionAdapter folder (with an SD1.5 --model)")
    parser.add_argument("--prompt", default=GenerationSettings.prompt,
                        help="what the video shows (default: %(default)r)")
    parser.add_argument("--negative-prompt", default=None, help="what it should not show (default: none)")
    parser.add_argument("--image", help="conditioning image file for image-to-video pipelines")
    parser.add_argument("--frames", type=positive_int, default=16, help="video frames (default: %(default)s)")
    parser.add_argument("--height", type=positive_int, default=None,
                        help="pixels (default: the model's; 32 with --tiny)")
    parser.add_argument("--width", type=positive_int, default=None,
                        help="pixels (default: the model's; 32 with --tiny)")
    parser.add_argument("--steps", type=positive_int, default=25,
                        help="denoising steps (>= 1; default: %(default)s)")
    parser.add_argument("--guidance-scale", type=float, default=7.5,
                        help="classifier-free guidance scale (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initial noise, from -2**63 to 2**64 - 1 (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default here: %(default)s)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="default: float16 on CUDA, float32 otherwise")
    bytheway = parser.add_argument_group("ByTheWay settings (default: the preset's)")
    bytheway.add_argument("--preset", default="animatediff", choices=sorted(PRESETS),
                          help="settings tuned for this model family (default: %(default)s)")
    bytheway.add_argument("--alpha", type=float, help="Temporal Self-Guidance strength in [0, 1]")
    bytheway.add_argument("--beta", type=float, help="beta_0, the minimum high-band gain (>= 0)")
    bytheway.add_argument("--tau", type=int, help="high-band half-width; 0 <= tau <= (frames - 2) // 2")
    bytheway.add_argument("--step-fraction", type=float, help="fraction of steps (from the start) ByTheWay is active")


def run_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ByTheWayConfig:
    """Check the `add_run_arguments` options before any model is loaded, and return the ByTheWay
    config they select. Every problem ends the program through `parser.error` (one line, exit 2).
    """
    overrides = {field: getattr(args, option) for option, field in CONFIG_OPTIONS.items()
                 if getattr(args, option) is not None}
    try:
        config = PRESETS[args.preset].replace(**overrides)
    except ValueError as error:
        parser.error(str(error))
    problem = environment_problem()
    if problem:
        parser.error(problem)
    if args.frames < 2:
        parser.error(f"--frames {args.frames}: ByTheWay needs at least 2 frames")
    for option in ("height", "width"):
        size = getattr(args, option)
        if size is not None and size % PIXELS_PER_LATENT:
            parser.error(f"--{option} {size} is not a multiple of {PIXELS_PER_LATENT} (the pipelines' VAEs "
                         f"downsample by {PIXELS_PER_LATENT})")
    if config.tau > max_tau(args.frames):
        parser.error(f"tau {config.tau} is too large for --frames {args.frames}: it must be "
                     f"<= (frames - 2) // 2 = {max_tau(args.frames)} (set --tau)")
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        parser.error(f"--seed {args.seed} is out of range: torch seeds are from -2**63 to 2**64 - 1")
    problem = device_problem(args.device)
    if problem:
        parser.error(problem)
    for option in ("model", "motion_adapter", "image"):
        path = getattr(args, option)
        problem = path and input_path_problem(option, path)
        if problem:
            parser.error(problem)
    if args.tiny and args.motion_adapter:  # the tiny pipeline has its own motion modules
        parser.error("--motion-adapter goes with an SD1.5 --model folder, not with --tiny")
    if args.tiny and args.image:
        parser.error("--image is for image-to-video pipelines: the --tiny pipeline (text-to-video) takes none")
    return config


def pipeline_and_settings(parser: argparse.ArgumentParser, args):
    """(pipeline with progress bars on, GenerationSettings) from `add_run_arguments` options;
    `--steps` beyond the loaded scheduler's training timesteps, or `--image` for a pipeline that
    takes no image, ends the program (`parser.error`)."""
    dtype = DTYPES[args.dtype or ("float16" if args.device.startswith("cuda") else "float32")]
    pipe = load_pipeline(args.model, tiny=args.tiny, device=args.device, dtype=dtype,
                         motion_adapter=args.motion_adapter)
    problem = steps_problem(pipe.scheduler.config, args.steps)
    if problem:
        parser.error(problem)
    if args.image and "image" not in inspect.signature(pipe.__call__).parameters:
        parser.error(f"--image: {type(pipe).__name__} takes no conditioning image (it is not image-to-video)")
    pipe.set_progress_bar_config(disable=False, leave=False)
    tiny_size = 32 if args.tiny else None
    settings = GenerationSettings(
        prompt=args.prompt, negative_prompt=args.negative_prompt, num_frames=args.frames,
        height=args.height or tiny_size, width=args.width or tiny_size,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
        image=args.image,
    )
    return pipe, settings
