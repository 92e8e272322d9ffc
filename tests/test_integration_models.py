"""Model coverage beyond AnimateDiff/UNet3D: I2VGenXL, Stable Video Diffusion, Latte (called as
denoisers with a scheduler), AnimateDiffVideoToVideo (pipeline), and the clear error for models
without identifiable temporal layers."""

from __future__ import annotations

import pytest
import torch

from bytheway_kernels.integration import ByTheWayAttnProcessor, apply_bytheway
from bytheway_kernels.integration import tiny
from integration_helpers import (
    FRAMES, STEPS, OpSpy, call_denoiser, i2vgenxl_case, latte_case, run_frames, svd_case, video_call_kwargs,
)

pytest.importorskip("diffusers")


# model builder, expected layers, (anchor H, W, heads) and (guided H, W, heads) of the scores
CASES = {
    "i2vgenxl": (
        i2vgenxl_case,
        [f"up_blocks.{b}.temp_attentions.{m}.transformer_blocks.0.{a}" for b in (1, 2) for m in (0, 1)
         for a in ("attn1", "attn2")],
        (4, 4, 4), (8, 8, 2),
    ),
    "svd": (
        svd_case,
        [f"up_blocks.{b}.attentions.{m}.temporal_transformer_blocks.0.attn1" for b in (1, 2) for m in (0, 1)],
        (4, 4, 4), (8, 8, 2),
    ),
    "latte": (
        latte_case,
        ["temporal_transformer_blocks.2.attn1", "temporal_transformer_blocks.3.attn1"],
        (4, 4, 2), (4, 4, 2),
    ),
}


def _processors(model):
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "set_processor")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_denoiser_layers_shapes_activity_and_remove(name, monkeypatch):
    build, expected_layers, anchor_shape, guided_shape = CASES[name]
    model, sample, kwargs = build()
    scheduler = tiny.tiny_ddim_scheduler()
    scheduler.set_timesteps(STEPS)
    active_t, inactive_t = scheduler.timesteps[0], scheduler.timesteps[1]
    stock_active, stock_inactive = (call_denoiser(model, sample, t, kwargs) for t in (active_t, inactive_t))
    before = _processors(model)

    spy = OpSpy(monkeypatch)
    with apply_bytheway(model, cfg=True, scheduler=scheduler) as controller:
        assert sorted(controller.layer_names) == sorted(expected_layers)
        installed = [n for n, p in _processors(model).items() if isinstance(p, ByTheWayAttnProcessor)]
        # processed layers, and the other temporal self-attention layers (fused in active steps);
        # SVD's cross-attention attn2 is untouched
        assert sorted(installed) == sorted(expected_layers + controller.plain_layer_names)
        assert controller.plain_layer_names and not set(controller.plain_layer_names) & set(expected_layers)
        active = call_denoiser(model, sample, active_t, kwargs)
        inactive = call_denoiser(model, sample, inactive_t, kwargs)
    assert torch.isfinite(active).all() and not torch.equal(active, stock_active)
    assert torch.equal(inactive, stock_inactive)
    assert len(spy.calls) == len(expected_layers)
    for call in spy.calls:
        if call.guide_shape is None:
            assert call.scores_shape == (2, *anchor_shape, FRAMES, FRAMES)
        else:
            assert call.scores_shape == (2, *guided_shape, FRAMES, FRAMES)
            assert call.guide_shape == (2, *anchor_shape[:2], guided_shape[2], FRAMES, FRAMES)
    assert all(_processors(model)[n] is p for n, p in before.items())
    assert torch.equal(call_denoiser(model, sample, active_t, kwargs), stock_active)


def test_latte_anchor_is_configurable():
    model, _, _ = latte_case()
    with apply_bytheway(model, cfg=True, anchor=0) as controller:
        assert controller.anchor == "temporal_transformer_blocks.0"
        assert len(controller.layer_names) == 4


def test_animatediff_video_to_video_pipeline(monkeypatch):
    from diffusers import AnimateDiffVideoToVideoPipeline
    from PIL import Image

    base = tiny.tiny_animatediff_pipeline()
    pipe = AnimateDiffVideoToVideoPipeline(**{k: v for k, v in base.components.items()
                                              if k not in ("feature_extractor", "image_encoder")})
    pipe.set_progress_bar_config(disable=True)
    video = [Image.new("RGB", (16, 16), (16 * i, 100, 200 - 8 * i)) for i in range(FRAMES)]
    def call_kwargs():  # the frame count comes from the input video
        kwargs = video_call_kwargs(video=video, strength=0.8)
        del kwargs["num_frames"]
        return kwargs

    stock = run_frames(pipe, **call_kwargs())
    spy = OpSpy(monkeypatch)
    with apply_bytheway(pipe):
        changed = run_frames(pipe, **call_kwargs())
    assert spy.calls and {c.batch_split for c in spy.calls} == {(2, 1)}
    assert not torch.equal(changed, stock)
    assert torch.equal(run_frames(pipe, **call_kwargs()), stock)


def test_model_without_temporal_layers_is_a_clear_error():
    unet2d, _ = tiny.tiny_motion_unet()
    with pytest.raises(ValueError, match="cannot identify the temporal attention layers of UNet2DConditionModel"):
        apply_bytheway(unet2d, cfg=True)
    with pytest.raises(ValueError, match="needs a diffusers pipeline"):
        apply_bytheway(object(), cfg=True)
