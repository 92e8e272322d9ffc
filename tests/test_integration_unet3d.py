"""apply_bytheway on a tiny offline TextToVideoSDPipeline (UNet3DConditionModel, VideoCrafter2-like)."""

from __future__ import annotations

import pytest
import torch

from bytheway_kernels.integration import ByTheWayAttnProcessor, apply_bytheway
from bytheway_kernels.integration.tiny import tiny_text_to_video_pipeline
from integration_helpers import FRAMES, STEPS, OpSpy, run_frames, unet_inputs, video_call_kwargs

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pipe():
    return tiny_text_to_video_pipeline()


def test_layers_are_the_decoder_temp_attentions_from_up_blocks_1(pipe):
    with apply_bytheway(pipe, "videocrafter2", cfg=True) as controller:
        names, plain = controller.layer_names, controller.plain_layer_names
        installed = sorted(
            name[: -len(".processor")] for name, proc in pipe.unet.attn_processors.items()
            if isinstance(proc, ByTheWayAttnProcessor)
        )
    expected = sorted(
        f"up_blocks.{block}.temp_attentions.{module}.transformer_blocks.0.{attn}"
        for block in (1, 2) for module in (0, 1) for attn in ("attn1", "attn2")
    )
    assert sorted(names) == sorted(set(installed) - set(plain)) == expected  # up_blocks.0: no temporal attention
    # fused in the active steps: transformer_in, the encoder's and the middle block's temporal attention
    assert "transformer_in.transformer_blocks.0.attn1" in plain and len(plain) == len(installed) - len(names)
    assert not any(name.startswith("up_blocks.") for name in plain)
    assert not any(isinstance(p, ByTheWayAttnProcessor) for p in pipe.unet.attn_processors.values())


def test_pipeline_without_cfg_property_needs_cfg_argument(pipe):
    with pytest.raises(ValueError, match="does not expose do_classifier_free_guidance"):
        apply_bytheway(pipe, "videocrafter2")


def test_runs_with_head_reduction_and_remove_restores(pipe, monkeypatch):
    stock = run_frames(pipe, **video_call_kwargs(steps=3))
    spy = OpSpy(monkeypatch)
    with apply_bytheway(pipe, "videocrafter2", cfg=True):
        changed = run_frames(pipe, **video_call_kwargs(steps=3))
    assert torch.isfinite(changed).all() and not torch.equal(changed, stock)
    guided = [c for c in spy.calls if c.guide_shape is not None]
    # up_blocks.1 has 16 channels / 4 = 4 heads, up_blocks.2 has 2: the anchor map is averaged in pairs.
    assert {c.scores_shape for c in guided} == {(2, 8, 8, 2, FRAMES, FRAMES)}
    assert {c.guide_shape for c in guided} == {(2, 4, 4, 2, FRAMES, FRAMES)}
    assert {(c.alpha, c.beta, c.tau) for c in spy.calls} == {(0.1, 10.0, 7)}
    assert torch.equal(run_frames(pipe, **video_call_kwargs(steps=3)), stock)


def test_stock_outside_active_steps(pipe):
    pipe.scheduler.set_timesteps(STEPS)
    sample, text = unet_inputs(pipe)
    with torch.no_grad():
        stock = [pipe.unet(sample, t, encoder_hidden_states=text).sample for t in pipe.scheduler.timesteps[:2]]
        with apply_bytheway(pipe, "videocrafter2", cfg=True):
            outputs = [pipe.unet(sample, t, encoder_hidden_states=text).sample for t in pipe.scheduler.timesteps[:2]]
    assert not torch.equal(outputs[0], stock[0])
    assert torch.equal(outputs[1], stock[1])


def test_cfg_off_and_tau_check(pipe, monkeypatch):
    spy = OpSpy(monkeypatch)
    with apply_bytheway(pipe, "videocrafter2", cfg=False):
        run_frames(pipe, **video_call_kwargs(guidance_scale=1.0, steps=2))
        assert {c.batch_split for c in spy.calls} == {(1, 0)}
        spy.calls.clear()
        with pytest.raises(ValueError, match="tau=7 is invalid for F=12 frames"):
            run_frames(pipe, **video_call_kwargs(guidance_scale=1.0, num_frames=12, steps=2))
    assert not spy.calls
    with apply_bytheway(pipe, "videocrafter2", cfg=False, tau=4):  # tau <= (12 - 2) // 2 = 5 is fine
        assert torch.isfinite(run_frames(pipe, **video_call_kwargs(guidance_scale=1.0, num_frames=12, steps=2))).all()
