"""One denoiser (UNet) call of the tiny offline AnimateDiff pipeline, ByTheWay off vs on.

The call is an active step (the first timestep of a 25-step schedule) with a CFG batch of 2,
made the way the pipeline makes it, so the ByTheWay side includes the controller's hooks, the
anchor-map recording in up_blocks.1 and the op in every guided decoder layer. The tiny model's
layers are small, so this measures the integration's fixed per-call costs rather than the map
op at production sizes (the layer benchmarks cover those).
"""

from __future__ import annotations

import copy

import pytest
import torch

import bytheway_kernels as btw
import harness

pytest.importorskip("diffusers", reason="the denoiser benchmarks need diffusers (pip install -e .[diffusers])")
integration = pytest.importorskip(
    "bytheway_kernels.integration", reason="bytheway_kernels.integration does not import yet"
)

from bytheway_kernels.integration.tiny import TINY_FRAMES, TINY_TOKENS, tiny_animatediff_pipeline  # noqa: E402
from bytheway_kernels.ops.dispatch import BACKEND_ENV  # noqa: E402

STEPS = 25
LATENT_SIZE = 8  # 16x16-pixel frames through the tiny VAE


@pytest.fixture(scope="module")
def denoiser_case(dtype):
    """(pipeline, float64 copy of its UNet, sample, timestep, text embeddings)."""
    pipe = tiny_animatediff_pipeline(device=harness.DEVICE, dtype=dtype, seed=0)
    pipe.scheduler.set_timesteps(STEPS, device=harness.DEVICE)
    gen = torch.Generator().manual_seed(2)
    batch = 2  # CFG: unconditional and conditional video
    sample = torch.randn(batch, 4, TINY_FRAMES, LATENT_SIZE, LATENT_SIZE, generator=gen)
    # AnimateDiff's pipeline repeats the prompt embeddings once per frame.
    text = torch.randn(batch * TINY_FRAMES, TINY_TOKENS, pipe.text_encoder.config.hidden_size, generator=gen)
    unet64 = copy.deepcopy(pipe.unet).double()
    timestep = pipe.scheduler.timesteps[0]  # an element of the schedule, as the pipeline passes it
    return pipe, unet64, sample.to(harness.DEVICE, dtype), timestep, text.to(harness.DEVICE, dtype)


def group_name(dtype: torch.dtype) -> str:
    return (f"denoiser tiny-animatediff {LATENT_SIZE}x{LATENT_SIZE} F{TINY_FRAMES} "
            f"{str(dtype).removeprefix('torch.')}")


@pytest.mark.parametrize("enabled", [False, True], ids=["off", "on"])
def test_denoiser_step(bench, monkeypatch, dtype, denoiser_case, enabled):
    pipe, unet64, sample, timestep, text = denoiser_case
    unet = pipe.unet
    backend = btw.select_backend(harness.DEVICE) if enabled else ""  # builds the C++ kernel first on CPU
    controller = integration.apply_bytheway(pipe, cfg=True) if enabled else None
    try:
        with torch.no_grad():
            out = bench(lambda: unet(sample, timestep, encoder_hidden_states=text).sample,
                        group=group_name(dtype), impl="bytheway on" if enabled else "bytheway off",
                        backend=backend, floor=not enabled)
            # Ground truth: the float64 UNet, ByTheWay through the reference backend when on.
            monkeypatch.setenv(BACKEND_ENV, "reference")
            reference = integration.apply_bytheway(unet64, cfg=True, scheduler=pipe.scheduler) if enabled else None
            try:
                expected = unet64(sample.double(), timestep, encoder_hidden_states=text.double()).sample
            finally:
                if reference is not None:
                    reference.remove()
    finally:
        if controller is not None:
            controller.remove()
    harness.assert_close_to(out, expected, dtype, scale=harness.COMPOSITE_TOLERANCE_SCALE)
