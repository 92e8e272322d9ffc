"""Loading a pipeline and running it with and without ByTheWay from one seed.

Shared by `python -m bytheway_kernels demo`, `python/generate.py` and `python/analyze.py`.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch

from .controller import apply_bytheway

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_pipeline(model: Optional[str], *, tiny: bool, device: str, dtype: torch.dtype,
                  motion_adapter: Optional[str] = None, seed: int = 0):
    """The tiny offline AnimateDiff pipeline (`tiny=True`) or a local diffusers pipeline folder.

    With `motion_adapter`, `model` is an SD1.5-style base folder and the pipeline is an
    AnimateDiffPipeline built from it and the MotionAdapter folder. Nothing is downloaded.
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
    """Arguments of one video generation (those a pipeline does not take are left out)."""

    prompt: str = "a panda surfing a wave, high quality"
    negative_prompt: Optional[str] = None
    num_frames: int = 16
    height: Optional[int] = None
    width: Optional[int] = None
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0
    image: Optional[str] = None  # conditioning image path for image-to-video pipelines

    def call_kwargs(self, pipe, device) -> dict:
        import inspect

        accepted = inspect.signature(pipe.__call__).parameters
        kwargs = dict(
            prompt=self.prompt, negative_prompt=self.negative_prompt, num_frames=self.num_frames,
            height=self.height, width=self.width, num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale, output_type="np",
            generator=torch.Generator(device="cpu").manual_seed(self.seed),
        )
        if self.image:
            from PIL import Image

            kwargs["image"] = Image.open(self.image).convert("RGB")
        return {k: v for k, v in kwargs.items() if k in accepted and v is not None}


def cfg_for(pipe, settings: GenerationSettings):
    """None when the pipeline reports CFG itself, else guidance_scale > 1."""
    if hasattr(type(pipe), "do_classifier_free_guidance"):
        return None
    return settings.guidance_scale > 1.0


def generate(pipe, settings: GenerationSettings, device, *, bytheway: bool, preset="animatediff",
             diagnostics: bool = False, observe_only: bool = False, **overrides):
    """Run the pipeline once; returns (frames, diagnostics rows or None)."""
    kwargs = settings.call_kwargs(pipe, device)
    if not bytheway and not observe_only:
        with torch.inference_mode():
            return pipe(**kwargs).frames, None
    with apply_bytheway(pipe, preset, cfg=cfg_for(pipe, settings), diagnostics=diagnostics,
                        observe_only=observe_only, **overrides) as controller:
        with torch.inference_mode():
            frames = pipe(**kwargs).frames
        rows: Optional[List[dict]] = controller.diagnostics() if (diagnostics or observe_only) else None
    return frames, rows


def add_run_arguments(parser) -> None:
    """The options `python/generate.py` and `python/analyze.py` share: model, video, ByTheWay."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local diffusers pipeline folder")
    source.add_argument("--tiny", action="store_true", help="tiny random-weight AnimateDiff pipeline (offline)")
    parser.add_argument("--motion-adapter", help="local MotionAdapter folder (with an SD1.5 --model)")
    parser.add_argument("--prompt", default=GenerationSettings.prompt)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--image", help="conditioning image for image-to-video pipelines")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=None, help="pixels (default: the model's; 32 with --tiny)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="animatediff", help="animatediff or videocrafter2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="default: float16 on CUDA, float32 otherwise")


def pipeline_and_settings(args):
    """(pipeline with progress bars on, GenerationSettings) from `add_run_arguments` options."""
    dtype = DTYPES[args.dtype or ("float16" if args.device.startswith("cuda") else "float32")]
    pipe = load_pipeline(args.model, tiny=args.tiny, device=args.device, dtype=dtype,
                         motion_adapter=args.motion_adapter)
    pipe.set_progress_bar_config(disable=False, leave=False)
    tiny_size = 32 if args.tiny else None
    settings = GenerationSettings(
        prompt=args.prompt, negative_prompt=args.negative_prompt, num_frames=args.frames,
        height=args.height or tiny_size, width=args.width or tiny_size,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
        image=args.image,
    )
    return pipe, settings
