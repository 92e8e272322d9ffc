"""apply_bytheway on full tiny offline pipelines of the models not covered elsewhere:
AnimateDiffSDXL, PIA, AnimateDiffSparseControlNet, AnimateDiffControlNet and
AnimateDiffVideoToVideoControlNet (UNetMotionModel), VideoToVideoSD (UNet3D), I2VGenXL,
StableVideoDiffusion and Latte. Each runs stock, with ByTheWay, and stock again after remove()."""

from __future__ import annotations

import math

import pytest
import torch

from bytheway_kernels.integration import apply_bytheway, tiny
from integration_helpers import FRAMES, OpSpy, run_frames, video_call_kwargs

pytest.importorskip("diffusers")

STEPS = 3  # ceil(0.2 * 3) = 1 active step


def _picture(color):
    from PIL import Image

    return Image.new("RGB", (16, 16), color)


def _image():
    return _picture((40, 120, 200))


def _svd_kwargs():
    return dict(
        image=_image(), num_frames=FRAMES, height=16, width=16, num_inference_steps=STEPS, decode_chunk_size=FRAMES,
        output_type="pt", generator=torch.Generator().manual_seed(0),
    )


def _latte_kwargs():
    # No T5 in the tiny pipeline: the text comes as embeddings (negative_prompt must then be None).
    embeddings = torch.randn(2, 1, 7, tiny.TINY_TEXT_DIM, generator=torch.Generator().manual_seed(1))
    return dict(
        prompt=None, negative_prompt=None, prompt_embeds=embeddings[0], negative_prompt_embeds=embeddings[1],
        video_length=FRAMES, height=16, width=16, num_inference_steps=STEPS, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )


def _video():
    return [_picture((16 * i, 100, 200 - 8 * i)) for i in range(FRAMES)]


def _from_video(**extra):
    """Video-to-video call arguments: the frame count and size come from `video` (strength 1 runs
    every step; test_integration_models.py's AnimateDiff video-to-video test takes 0.8)."""
    kwargs = video_call_kwargs(steps=STEPS, video=_video(), **extra)
    for name in ("num_frames", "height", "width"):
        del kwargs[name]
    return kwargs


# pipeline builder, call arguments (fresh per call)
CASES = {
    "animatediff_sdxl": (tiny.tiny_animatediff_sdxl_pipeline, lambda: video_call_kwargs(steps=STEPS)),
    "pia": (tiny.tiny_pia_pipeline, lambda: video_call_kwargs(steps=STEPS, image=_image())),
    "animatediff_sparsectrl": (
        tiny.tiny_animatediff_sparsectrl_pipeline,
        lambda: video_call_kwargs(steps=STEPS, conditioning_frames=[_image()], controlnet_frame_indices=[0]),
    ),
    # clip_skip=None: I2VGenXL's default clip_skip=1 reads text_encoder.text_model, which
    # transformers 5's CLIPTextModel no longer has.
    "i2vgenxl": (
        tiny.tiny_i2vgenxl_pipeline,
        lambda: video_call_kwargs(steps=STEPS, image=_image(), clip_skip=None, decode_chunk_size=FRAMES),
    ),
    "animatediff_controlnet": (
        tiny.tiny_animatediff_controlnet_pipeline,
        lambda: video_call_kwargs(steps=STEPS, conditioning_frames=_video()),
    ),
    "animatediff_video_to_video_controlnet": (
        lambda: tiny.tiny_animatediff_controlnet_pipeline(video_to_video=True),
        lambda: _from_video(conditioning_frames=_video(), strength=1.0),
    ),
    "video_to_video_sd": (tiny.tiny_video_to_video_pipeline, lambda: _from_video(strength=1.0)),
    "svd": (tiny.tiny_svd_pipeline, _svd_kwargs),
    "latte": (tiny.tiny_latte_pipeline, _latte_kwargs),
}


# apply_bytheway's arguments where the pipeline does not report whether CFG is on
APPLY_OPTIONS = {"video_to_video_sd": dict(cfg=True)}


def _run(pipe, call_kwargs):
    torch.manual_seed(0)  # I2VGenXL samples its image latents from the global generator
    return run_frames(pipe, **call_kwargs())


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_active_on_first_steps_and_remove_restores(name, monkeypatch):
    build, call_kwargs = CASES[name]
    pipe = build()
    stock = _run(pipe, call_kwargs)

    spy = OpSpy(monkeypatch)
    with apply_bytheway(pipe, diagnostics=True, **APPLY_OPTIONS.get(name, {})) as controller:
        changed = _run(pipe, call_kwargs)
        rows = controller.diagnostics()
        layers = set(controller.layer_names)
    assert layers
    assert sorted({r["step"] for r in rows}) == list(range(STEPS))
    active = [r for r in rows if r["active"]]
    assert sorted({r["step"] for r in active}) == list(range(math.ceil(0.2 * STEPS)))
    assert {r["layer"] for r in active} == layers
    assert {c.batch_split for c in spy.calls} == {(2, 1)}  # CFG on: energies from the conditional half
    assert torch.isfinite(changed).all() and not torch.equal(changed, stock)
    assert torch.equal(_run(pipe, call_kwargs), stock)
