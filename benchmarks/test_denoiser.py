"""One denoiser (UNet) call of an AnimateDiff model: stock, ByTheWay with the materialised path,
ByTheWay with the fused temporal-attention op, and the fast stock processor (fused op, ByTheWay off).
"bytheway fused" is `apply_bytheway`'s default: in an active step every temporal layer runs fused,
ByTheWay's with ByTheWay, the others plain. "bytheway fused, other temporal layers stock" is the
default until 2026-11-27 (the H200 results up to session 5 time it as "bytheway fused"), the
controller made without its plain layers. "bytheway fused + fast stock" differs from the default
only in inactive steps. The two "fused qkv" rows run diffusers' `fuse_qkv_projections()` first
(one q, k, v projection in every self-attention layer, spatial ones included): stock that way,
and with the fast stock processor on top (which then takes q, k and v as slices of `to_qkv`).

The call is an active step (the first timestep of a 25-step schedule) with a CFG batch of 2, made
the way the pipeline makes it, so the ByTheWay rows include the controller's hooks, the anchor-map
recording in up_blocks.1 and the op in every guided decoder layer. Two models:

- `tiny`: the tiny offline AnimateDiff UNet (8x8 latents). Its layers are small, so this measures
  the integration's fixed per-call costs rather than the kernels at production sizes.
- `sd15-motion` (GPU only, not with --bench-quick, float16 only): a real-size UNetMotionModel with
  random weights, the SD1.5 UNet config plus AnimateDiff motion modules (1.31 B parameters), on
  512x512 video (64x64 latents), 16 frames.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Callable

import pytest
import torch

import bytheway_kernels as btw
import harness

pytest.importorskip("diffusers", reason="the denoiser benchmarks need diffusers (pip install -e .[diffusers])")

from bytheway_kernels import integration  # noqa: E402
from bytheway_kernels.integration import controller as controller_module  # noqa: E402
from bytheway_kernels.integration.tiny import TINY_FRAMES, TINY_TOKENS, tiny_animatediff_pipeline  # noqa: E402
from bytheway_kernels.ops.dispatch import BACKEND_ENV  # noqa: E402

STEPS = 25
CFG_BATCH = 2  # unconditional and conditional video
#: `apply_bytheway(..., fused_attention=...)` exists once the fused op is integrated.
HAS_FUSED_CHOICE = "fused_attention" in inspect.signature(integration.apply_bytheway).parameters
#: mode -> row label; every model's group has these rows ("off" is its floor).
MODES = {
    "off": "bytheway off",
    "bytheway-materialised": "bytheway materialised",
    "bytheway-fused": "bytheway fused",
    "bytheway-fused-processed-only": "bytheway fused, other temporal layers stock",
    "fast-stock": "fast stock",
    "bytheway-fused-fast": "bytheway fused + fast stock",
    "off-fused-qkv": "bytheway off, fused qkv",
    "fast-stock-fused-qkv": "fast stock, fused qkv",
}
#: Real-size model: ‖out − ref‖ / ‖ref‖ against the float32 copy of the same (rounded) weights; a
#: fp16 UNet of this depth lands near 1e-3 (2.3e-3 measured between compiled and eager on an H200).
REAL_SIZE_RELATIVE_ERROR = 1e-2


@dataclasses.dataclass
class DenoiserCase:
    label: str
    unet: torch.nn.Module
    reference_unet: torch.nn.Module  # the same rounded weights in float64 (tiny) or float32 (real size)
    scheduler: object
    sample: torch.Tensor
    text: torch.Tensor
    check: Callable[[torch.Tensor, torch.Tensor], None]

    @property
    def timestep(self):
        return self.scheduler.timesteps[0]  # an element of the schedule, as the pipeline passes it

    def call(self, unet=None, cast=None):
        unet = self.unet if unet is None else unet
        sample, text = (self.sample, self.text) if cast is None else (self.sample.to(cast), self.text.to(cast))
        return unet(sample, self.timestep, encoder_hidden_states=text).sample


def inputs(channels: int, frames: int, latent: int, tokens: int, text_dim: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(2)
    sample = torch.randn(CFG_BATCH, channels, frames, latent, latent, generator=gen)
    # AnimateDiff's pipeline repeats the prompt embeddings once per frame.
    text = torch.randn(CFG_BATCH * frames, tokens, text_dim, generator=gen)
    return sample.to(harness.DEVICE, dtype), text.to(harness.DEVICE, dtype)


def tiny_case(dtype: torch.dtype) -> DenoiserCase:
    latent = 8  # 16x16-pixel frames through the tiny VAE
    pipe = tiny_animatediff_pipeline(device=harness.DEVICE, dtype=dtype, seed=0)
    pipe.scheduler.set_timesteps(STEPS, device=harness.DEVICE)
    sample, text = inputs(4, TINY_FRAMES, latent, TINY_TOKENS, pipe.text_encoder.config.hidden_size, dtype)

    def check(out, expected):
        harness.assert_close_to(out, expected, dtype, scale=harness.COMPOSITE_TOLERANCE_SCALE)

    return DenoiserCase(f"tiny-animatediff {latent}x{latent} F{TINY_FRAMES}", pipe.unet,
                        copy.deepcopy(pipe.unet).double(), pipe.scheduler, sample, text, check)


def real_size_case(dtype: torch.dtype) -> DenoiserCase:
    from diffusers import DDIMScheduler, UNetMotionModel

    frames, latent = 16, 64
    torch.manual_seed(0)
    with torch.device(harness.DEVICE):  # random init on the device: seconds instead of minutes
        unet = UNetMotionModel(cross_attention_dim=768).eval()
    reference = copy.deepcopy(unet.to(dtype)).float()
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              steps_offset=1, timestep_spacing="linspace")
    scheduler.set_timesteps(STEPS, device=harness.DEVICE)
    sample, text = inputs(4, frames, latent, 77, 768, dtype)

    def check(out, expected):
        assert torch.isfinite(out).all(), "output has NaN or inf"
        error = (out.float() - expected.float()).norm() / expected.float().norm()
        assert error <= REAL_SIZE_RELATIVE_ERROR, f"relative error {error:.2e}"

    return DenoiserCase(f"sd15-motion {latent}x{latent} F{frames} (random weights)", unet, reference,
                        scheduler, sample, text, check)


@pytest.fixture(scope="module", params=["tiny", "sd15-motion"])
def denoiser_case(request, dtype):
    if request.param == "tiny":
        yield tiny_case(dtype)
        return
    if harness.DEVICE.type != "cuda":
        pytest.skip("the real-size UNet is timed on a GPU only")
    if request.config.getoption("--bench-quick"):
        pytest.skip("the real-size UNet is not part of --bench-quick")
    if dtype != torch.float16:
        pytest.skip("the real-size UNet is timed in float16 only (AnimateDiff's dtype; the GPU budget)")
    case = real_size_case(dtype)
    yield case
    del case
    torch.cuda.empty_cache()


def group_name(case: DenoiserCase, dtype: torch.dtype) -> str:
    return f"denoiser {case.label} {str(dtype).removeprefix('torch.')}"


def bytheway_options(fused: bool) -> dict:
    return {"fused_attention": fused} if HAS_FUSED_CHOICE else {}


class _Together:
    """Handles applied one after the other, removed in the opposite order."""

    def __init__(self, *handles):
        self.handles = handles

    def remove(self):
        for handle in reversed(self.handles):
            handle.remove()


class _FusedProjections:
    """diffusers' fuse_qkv_projections() on `unet` (and `inner`, a handle enabled after it);
    .remove() undoes both and drops the fused weights diffusers' unfuse keeps."""

    def __init__(self, unet, inner):
        self.unet, self.inner = unet, inner

    def remove(self):
        if self.inner is not None:
            self.inner.remove()
        self.unet.unfuse_qkv_projections()
        for module in self.unet.modules():
            if getattr(module, "fused_projections", False):
                module.fused_projections = False
                for name in ("to_qkv", "to_kv", "to_added_qkv"):
                    if hasattr(module, name):
                        delattr(module, name)


def enable(mode: str, unet, scheduler):
    """Turn `mode` on for `unet`; returns the handle whose .remove() turns it off (or None)."""
    if mode == "off":
        return None
    if mode.endswith("-fused-qkv"):
        if not hasattr(unet, "fuse_qkv_projections"):
            pytest.skip(f"{type(unet).__name__} has no fuse_qkv_projections()")
        unet.fuse_qkv_projections()
        handle = _FusedProjections(unet, None)
        if mode != "off-fused-qkv":
            try:
                handle.inner = enable(mode.removesuffix("-fused-qkv"), unet, scheduler)
            except BaseException:  # a skip or an error: leave the model stock
                handle.remove()
                raise
        return handle
    if mode == "bytheway-fused-fast":  # every temporal layer fused, ByTheWay on the decoder's
        fast = enable("fast-stock", unet, scheduler)
        try:
            return _Together(fast, enable("bytheway-fused", unet, scheduler))
        except BaseException:  # a skip or an error: leave the model stock
            fast.remove()
            raise
    if mode == "fast-stock":
        enable_fast = getattr(btw, "enable_fast_temporal_attention", None)
        if enable_fast is None:
            pytest.skip("bytheway_kernels.enable_fast_temporal_attention is not in this revision")
        return enable_fast(unet)
    fused = mode in ("bytheway-fused", "bytheway-fused-processed-only")
    if fused and not HAS_FUSED_CHOICE:
        pytest.skip("apply_bytheway(..., fused_attention=...) is not in this revision")
    if fused and not harness.fused_kernel_available():
        pytest.skip(f"the fused temporal attention kernel does not run on {harness.DEVICE.type}")
    return integration.apply_bytheway(unet, cfg=True, scheduler=scheduler, **bytheway_options(fused))


@pytest.mark.parametrize("mode", list(MODES))
def test_denoiser_step(bench, monkeypatch, dtype, denoiser_case, mode):
    case = denoiser_case
    backend = btw.select_backend(harness.DEVICE) if mode.startswith("bytheway") else ""  # builds C++ on CPU
    if mode in ("bytheway-fused", "bytheway-fused-processed-only", "fast-stock", "bytheway-fused-fast",
                "fast-stock-fused-qkv"):
        backend = "fused"
    if mode == "bytheway-fused-processed-only":  # no plain layers (a revision without them has none)
        monkeypatch.setattr(controller_module, "_plain_layers", lambda *args: [], raising=False)
    try:
        handle = enable(mode, case.unet, case.scheduler)
    except (RuntimeError, ValueError) as error:  # e.g. no fused kernel on this device
        pytest.skip(f"{mode} does not run here: {error}")
    try:
        with torch.no_grad():
            out = bench(case.call, group=group_name(case, dtype), impl=MODES[mode], backend=backend,
                        floor=mode == "off")
    finally:
        if handle is not None:
            handle.remove()
    # Ground truth: the higher-precision copy, stock for the stock modes, ByTheWay through the
    # reference backend and the materialised path for the ByTheWay modes.
    monkeypatch.setenv(BACKEND_ENV, "reference")
    reference_dtype = next(case.reference_unet.parameters()).dtype
    controller = None
    if mode.startswith("bytheway"):
        controller = integration.apply_bytheway(case.reference_unet, cfg=True, scheduler=case.scheduler,
                                                **bytheway_options(False))
    try:
        with torch.no_grad():
            expected = case.call(case.reference_unet, cast=reference_dtype)
    finally:
        if controller is not None:
            controller.remove()
    case.check(out, expected)
