"""Shared pieces of the diffusers integration tests (tiny offline pipelines, op spies)."""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch

import bytheway_kernels.integration.processor as processor_module
from bytheway_kernels.integration import tiny

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


def i2vgenxl_case():
    """(I2VGenXLUNet, sample, call kwargs) for a direct denoiser call: batch 2, 16 frames, 8x8."""
    unet = tiny.tiny_i2vgenxl_unet()
    generator = torch.Generator().manual_seed(0)
    kwargs = dict(
        fps=torch.tensor([8, 8]), image_latents=torch.randn(2, 4, FRAMES, 8, 8, generator=generator),
        image_embeddings=torch.randn(2, tiny.TINY_TEXT_DIM, generator=generator),
        encoder_hidden_states=torch.randn(2, 7, tiny.TINY_TEXT_DIM, generator=generator),
    )
    return unet, torch.randn(2, 4, FRAMES, 8, 8, generator=generator), kwargs


def svd_case():
    """(SVD UNet, sample, call kwargs) for a direct denoiser call: batch 2, 16 frames, 8x8."""
    unet = tiny.tiny_svd_unet()
    generator = torch.Generator().manual_seed(0)
    kwargs = dict(
        encoder_hidden_states=torch.randn(2, 1, tiny.TINY_TEXT_DIM, generator=generator),
        added_time_ids=torch.randn(2, 3, generator=generator),
    )
    return unet, torch.randn(2, FRAMES, 8, 8, 8, generator=generator), kwargs


def latte_case():
    """(Latte transformer, sample, call kwargs) for a direct denoiser call: batch 2, 16 frames, 8x8."""
    transformer = tiny.tiny_latte_transformer()
    generator = torch.Generator().manual_seed(0)
    kwargs = dict(encoder_hidden_states=torch.randn(2, 7, tiny.TINY_TEXT_DIM, generator=generator))
    return transformer, torch.randn(2, 4, FRAMES, 8, 8, generator=generator), kwargs


def call_denoiser(model, sample, timestep, kwargs):
    """The denoiser's output `.sample` for one call without gradients (Latte takes keywords)."""
    with torch.no_grad():
        if "hidden_states" in model.forward.__code__.co_varnames[:2]:  # Latte
            return model(sample, timestep=timestep.expand(sample.shape[0]), **kwargs).sample
        return model(sample, timestep, **kwargs).sample
