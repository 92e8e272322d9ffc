"""Shared pieces of the diffusers integration tests (tiny offline pipelines, op spies)."""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch

import bytheway_kernels.integration.processor as processor_module

FRAMES = 16
STEPS = 5  # ceil(0.2 * 5) = 1 active step


def video_call_kwargs(steps: int = STEPS, seed: int = 0, **extra) -> dict:
    """Arguments for a tiny text-to-video pipeline call: 16 frames, 8x8 latents, CFG."""
    kwargs = dict(
        prompt="a cat", num_frames=FRAMES, height=16, width=16, num_inference_steps=steps,
        guidance_scale=7.5, output_type="pt", generator=torch.Generator().manual_seed(seed),
    )
    kwargs.update(extra)
    return kwargs


def run_frames(pipe, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return pipe(**kwargs).frames


@dataclasses.dataclass
class OpCall:
    scores_shape: tuple
    guide_shape: Optional[tuple]
    batch_split: tuple
    energy_scope: str
    alpha: float
    beta: float
    tau: int


class OpSpy:
    """Records every call of the ByTheWay op made by the processor (and still runs it)."""

    def __init__(self, monkeypatch):
        self.calls: List[OpCall] = []
        original = processor_module.bytheway_attention_probs

        def spy(scores, guide=None, **kwargs):
            self.calls.append(OpCall(
                tuple(scores.shape), None if guide is None else tuple(guide.shape), tuple(kwargs["batch_split"]),
                kwargs["energy_scope"], kwargs["alpha"], kwargs["beta"], kwargs["tau"],
            ))
            return original(scores, guide, **kwargs)

        monkeypatch.setattr(processor_module, "bytheway_attention_probs", spy)


def unet_inputs(pipe, batch: int = 2, frames: int = FRAMES, height: int = 8, width: int = 8, seed: int = 0):
    """(sample, encoder_hidden_states) for a direct UNetMotionModel / UNet3D call."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, frames, height, width, generator=generator)
    text_dim = pipe.text_encoder.config.hidden_size
    per_frame = pipe.unet.__class__.__name__ == "UNetMotionModel"  # AnimateDiff repeats text per frame
    rows = batch * frames if per_frame else batch
    return sample, torch.randn(rows, 7, text_dim, generator=generator)
