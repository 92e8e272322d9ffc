"""The fused temporal_attention op inside the integration: ByTheWay's fused path against the
materialised one, `enable_fast_temporal_attention` against stock, their composition in both
orders, copy/pickle refusal, and the configuration checks made by `apply_bytheway`.

Most tests force the fused path on CPU by patching the availability check: the op then runs its
composed CPU path (scores, map op, @ v), which exercises every integration decision. The tests
marked `interpreter` run the real fused Triton kernel under TRITON_INTERPRET=1 (set by conftest)
with BYTHEWAY_BACKEND=triton, on one small denoiser call each.
"""

from __future__ import annotations

import copy
import doctest
import os
import pickle

import numpy as np
import pytest
import torch

import bytheway_kernels
import bytheway_kernels.integration.controller as controller_module
import bytheway_kernels.integration.fast as fast_module
import bytheway_kernels.integration.processor as processor_module
from bytheway_kernels import ByTheWayConfig, apply_bytheway, enable_fast_temporal_attention
from bytheway_kernels.integration import ByTheWayAttnProcessor, FastTemporalAttnProcessor, tiny
from bytheway_kernels.integration.fast import FAST_ATTR
from bytheway_kernels.integration.processor import BINDING_ATTR
from integration_helpers import STEPS, call_denoiser, i2vgenxl_case, latte_case, svd_case, unet_inputs

pytest.importorskip("diffusers")

# Fused (fp32 scores from matmul, fp32 accumulation) against materialised (baddbmm, bmm) in fp32:
# both are fp32 evaluations of the same sums in another order, ~1e-6 relative per layer; through
# the whole tiny UNet (outputs ~1) the difference stays far below 1e-4. ByTheWay itself moves the
# output by more than 1e-2 here, so the tolerance cannot hide a path that ignores ByTheWay.
TOLERANCE = dict(rtol=1e-4, atol=1e-4)

interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter (CPU-only machines; conftest.py)"
)


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny.tiny_animatediff_pipeline()
    pipe.scheduler.set_timesteps(STEPS)
    return pipe


@pytest.fixture
def force_fused(monkeypatch):
    """Make every device count as having the fused kernel (the op then runs its CPU path)."""
    monkeypatch.setattr(controller_module, "fused_available", lambda device: True)
    monkeypatch.setattr(fast_module, "fused_available", lambda device: True)


@pytest.fixture
def no_kernel(monkeypatch):
    """CPU without the forced Triton backend: the fused kernel is unavailable."""
    monkeypatch.delenv("BYTHEWAY_BACKEND", raising=False)


class FusedSpy:
    """Records the processor's temporal_attention calls (and still runs them)."""

    def __init__(self, monkeypatch, module):
        self.calls = []
        original = module.temporal_attention

        def spy(q, k, v, **kwargs):
            self.calls.append(kwargs)
            return original(q, k, v, **kwargs)

        monkeypatch.setattr(module, "temporal_attention", spy)


def _denoise(pipe, timestep_index: int, **input_options):
    sample, text = unet_inputs(pipe, **input_options)
    with torch.no_grad():
        return pipe.unet(sample, pipe.scheduler.timesteps[timestep_index], encoder_hidden_states=text).sample


def _processors(unet):
    return dict(unet.attn_processors)


def _assert_restored(unet, before):
    after = _processors(unet)
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)
    assert not any(hasattr(m, BINDING_ATTR) or hasattr(m, FAST_ATTR) for m in unet.modules())
    assert not unet._forward_pre_hooks and not unet._forward_hooks


# -- ByTheWay: fused against materialised ------------------------------------------------------
def test_fused_bytheway_matches_materialised_and_anchor_records_in_the_same_pass(pipe, monkeypatch, force_fused):
    stock = _denoise(pipe, 0)
    with apply_bytheway(pipe, cfg=True, fused_attention=False):
        materialised = _denoise(pipe, 0)
    spy = FusedSpy(monkeypatch, processor_module)
    with apply_bytheway(pipe, cfg=True) as controller:
        fused = _denoise(pipe, 0)
        inactive = _denoise(pipe, 1)
        layers, plain_layers = controller.layer_names, controller.plain_layer_names
    # The other temporal layers ran plain fused attention: within tolerance of their stock processors.
    torch.testing.assert_close(fused, materialised, **TOLERANCE)
    assert (materialised - stock).abs().max() > 1e-2  # ByTheWay changed the output
    assert torch.equal(inactive, _denoise(pipe, 1))  # inactive steps stay stock, bit for bit
    assert len(plain_layers) == 12 and not set(plain_layers) & set(layers)  # down 4, mid 2, up_blocks.0 6
    bytheway_calls = [c for c in spy.calls if "guide" in c]
    plain_calls = [c for c in spy.calls if "guide" not in c]
    # one fused call per layer in the active step, none after
    assert len(bytheway_calls) == len(layers) and len(plain_calls) == len(plain_layers)
    assert all(set(c) == {"heads", "height", "width", "scale", "cfg"} for c in plain_calls)  # plain attention
    anchors = [c for c in bytheway_calls if c["guide"] is None]
    guided = [c for c in bytheway_calls if c["guide"] is not None]
    assert len(anchors) == len(guided) == 4
    assert all(c["return_map"] for c in anchors) and not any(c["return_map"] for c in guided)
    assert {c["guide"].shape for c in guided} == {(2, 4, 4, 2, 16, 16)}  # 4 anchor heads averaged in pairs
    assert {(c["height"], c["width"], c["batch_split"]) for c in guided} == {(8, 8, (2, 1))}
    assert {(c["alpha"], c["beta"], c["tau"]) for c in bytheway_calls} == {(0.6, 1.5, 7)}


@pytest.mark.parametrize("case", [i2vgenxl_case, svd_case, latte_case], ids=["i2vgenxl", "svd", "latte"])
def test_plain_layers_run_fused_only_in_active_steps_on_other_denoisers(case, monkeypatch, force_fused):
    model, sample, kwargs = case()
    scheduler = tiny.tiny_ddim_scheduler()
    scheduler.set_timesteps(STEPS)
    active_t, inactive_t = scheduler.timesteps[0], scheduler.timesteps[1]
    stock_inactive = call_denoiser(model, sample, inactive_t, kwargs)
    with apply_bytheway(model, cfg=True, scheduler=scheduler, fused_attention=False) as controller:
        assert controller.plain_layer_names == []
        materialised = call_denoiser(model, sample, active_t, kwargs)
    spy = FusedSpy(monkeypatch, processor_module)
    with apply_bytheway(model, cfg=True, scheduler=scheduler) as controller:
        plain_layers = controller.plain_layer_names
        fused = call_denoiser(model, sample, active_t, kwargs)
        active_calls = len(spy.calls)
        inactive = call_denoiser(model, sample, inactive_t, kwargs)
    assert plain_layers and not set(plain_layers) & set(controller.layer_names)
    assert len([c for c in spy.calls if "guide" not in c]) == len(plain_layers) and len(spy.calls) == active_calls
    torch.testing.assert_close(fused, materialised, **TOLERANCE)
    assert torch.equal(inactive, stock_inactive)  # inactive steps: every layer's own processor


def test_plain_layers_keep_non_standard_processors_and_fused_attention_false_binds_none(pipe):
    from diffusers.models.attention_processor import AttnProcessor

    class CustomProcessor(AttnProcessor):  # not one of diffusers' standard classes: kept
        pass

    before = _processors(pipe.unet)
    attn = pipe.unet.down_blocks[0].motion_modules[0].transformer_blocks[0].attn1
    custom = CustomProcessor()
    attn.set_processor(custom)
    try:
        with apply_bytheway(pipe, cfg=True) as controller:
            assert attn.processor is custom and not hasattr(attn, BINDING_ATTR)
            assert "down_blocks.0.motion_modules.0.transformer_blocks.0.attn1" not in controller.plain_layer_names
            assert len(controller.plain_layer_names) == 11
    finally:
        attn.set_processor(before["down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.processor"])
    with apply_bytheway(pipe, cfg=True, fused_attention=False) as controller:
        assert controller.plain_layer_names == []
        bytheway_layers = set(controller.layer_names)
        for name, processor in _processors(pipe.unet).items():
            if name[: -len(".processor")] not in bytheway_layers:
                assert processor is before[name], name
    _assert_restored(pipe.unet, before)


def test_fused_path_falls_back_for_diagnostics(pipe, monkeypatch, force_fused):
    spy = FusedSpy(monkeypatch, processor_module)
    with apply_bytheway(pipe, cfg=True, diagnostics=True) as controller:
        _denoise(pipe, 0)
        rows = controller.diagnostics()
    # ByTheWay's layers materialise (diagnostics need the maps); the plain layers still run fused
    assert not [c for c in spy.calls if "guide" in c] and len(rows) == len(controller.layer_names)
    assert len(spy.calls) == len(controller.plain_layer_names)


def test_fused_attention_false_and_unavailable_device_use_the_materialised_path(pipe, monkeypatch, no_kernel):
    spy = FusedSpy(monkeypatch, processor_module)
    with apply_bytheway(pipe, cfg=True):  # None: fused only where available, not on this CPU
        default = _denoise(pipe, 0)
    with apply_bytheway(pipe, cfg=True, fused_attention=False):
        materialised = _denoise(pipe, 0)
    assert not spy.calls and torch.equal(default, materialised)


def test_fused_attention_true_without_kernel_is_a_clear_error_before_the_denoiser_runs(pipe, no_kernel):
    ran = []
    handle = pipe.unet.down_blocks[0].register_forward_pre_hook(lambda *args: ran.append(1))
    try:
        with apply_bytheway(pipe, cfg=True, fused_attention=True):
            with pytest.raises(RuntimeError, match=r"fused_attention=True.*not available on cpu"):
                _denoise(pipe, 0)
    finally:
        handle.remove()
    assert not ran
    with pytest.raises(ValueError, match="fused_attention must be a bool"):
        apply_bytheway(pipe, cfg=True, fused_attention="yes")


# -- Fast temporal attention (ByTheWay off) ----------------------------------------------------
def test_fast_attention_covers_every_temporal_self_attention_layer():
    pipe = tiny.tiny_animatediff_pipeline()
    expected = sorted(name for name, m in pipe.unet.named_modules()
                      if ".motion_modules." in name and name.endswith(("attn1", "attn2")))
    with enable_fast_temporal_attention(pipe) as fast:
        assert sorted(fast.layer_names) == expected and len(expected) == 20  # down, mid and up blocks
        installed = sorted(n[: -len(".processor")] for n, p in _processors(pipe.unet).items()
                           if isinstance(p, FastTemporalAttnProcessor))
        assert installed == expected
    t2v = tiny.tiny_text_to_video_pipeline()
    with enable_fast_temporal_attention(t2v.unet) as fast:
        assert {"transformer_in.transformer_blocks.0.attn1", "transformer_in.transformer_blocks.0.attn2",
                "mid_block.temp_attentions.0.transformer_blocks.0.attn1"} <= set(fast.layer_names)
    svd = tiny.tiny_svd_unet()
    with enable_fast_temporal_attention(svd) as fast:
        assert fast.layer_names and all(name.endswith("temporal_transformer_blocks.0.attn1") for name in fast.layer_names)
        assert len(fast.layer_names) == 7  # down 2, mid 1, up 4; attn2 (cross-attention) untouched
    with enable_fast_temporal_attention(tiny.tiny_i2vgenxl_unet()) as fast:
        assert "image_latents_temporal_encoder.attn1" in fast.layer_names and len(fast.layer_names) == 17
    with enable_fast_temporal_attention(tiny.tiny_latte_transformer()) as fast:
        assert fast.layer_names == [f"temporal_transformer_blocks.{i}.attn1" for i in range(4)]


def test_fast_attention_matches_stock_and_remove_is_bit_identical(pipe, monkeypatch, force_fused):
    before = _processors(pipe.unet)
    stock = _denoise(pipe, 0)
    spy = FusedSpy(monkeypatch, processor_module)
    with enable_fast_temporal_attention(pipe) as fast:
        fused = _denoise(pipe, 0)
    torch.testing.assert_close(fused, stock, **TOLERANCE)
    assert len(spy.calls) == len(fast.layer_names)
    assert all(set(c) == {"heads", "height", "width", "scale", "cfg"} for c in spy.calls)  # plain attention
    _assert_restored(pipe.unet, before)
    assert torch.equal(_denoise(pipe, 0), stock)


@pytest.mark.parametrize("case", [i2vgenxl_case, svd_case, latte_case], ids=["i2vgenxl", "svd", "latte"])
def test_fast_attention_matches_stock_on_other_denoisers(case, force_fused):
    model, sample, kwargs = case()
    timestep = torch.tensor(500)
    stock = call_denoiser(model, sample, timestep, kwargs)
    with enable_fast_temporal_attention(model):
        fused = call_denoiser(model, sample, timestep, kwargs)
    torch.testing.assert_close(fused, stock, **TOLERANCE)
    assert not torch.equal(fused, stock)  # the fused op really ran
    assert torch.equal(call_denoiser(model, sample, timestep, kwargs), stock)


def test_fast_attention_runs_a_single_frame_through_the_stock_processor(pipe, monkeypatch, force_fused):
    """F = 1 (which the op refuses) keeps the original processor: stock, bit for bit."""
    stock = _denoise(pipe, 0, frames=1)
    spy = FusedSpy(monkeypatch, processor_module)
    with enable_fast_temporal_attention(pipe):
        assert torch.equal(_denoise(pipe, 0, frames=1), stock)
        assert not spy.calls
        _denoise(pipe, 0, frames=2)
        assert spy.calls  # two frames run fused


def test_fast_attention_runs_under_free_noise_split_inference(monkeypatch, force_fused):
    """Split inference runs the motion modules' transformer blocks on chunks of the B*H*W rows
    (wrapped in diffusers' SplitInferenceModule): plain attention is per row, so the fast attention
    takes the layers inside the wrappers over."""
    from integration_helpers import run_frames, video_call_kwargs

    pipe = tiny.tiny_animatediff_pipeline()
    pipe.enable_free_noise(context_length=8, context_stride=4)
    pipe.enable_free_noise_split_inference(spatial_split_size=32, temporal_split_size=8)
    call = video_call_kwargs(num_frames=12, steps=1)
    stock = run_frames(pipe, **call)
    spy = FusedSpy(monkeypatch, processor_module)
    with enable_fast_temporal_attention(pipe) as fast:
        fused = run_frames(pipe, **video_call_kwargs(num_frames=12, steps=1))
    assert len(fast.layer_names) == 20
    assert {call["height"] for call in spy.calls} == {1} and len(spy.calls) > len(fast.layer_names)  # chunks
    torch.testing.assert_close(fused, stock, **TOLERANCE)
    assert torch.equal(run_frames(pipe, **video_call_kwargs(num_frames=12, steps=1)), stock)


def test_fast_attention_keeps_stock_where_the_kernel_is_unavailable(pipe, monkeypatch, no_kernel):
    stock = _denoise(pipe, 0)
    spy = FusedSpy(monkeypatch, processor_module)
    with enable_fast_temporal_attention(pipe):
        assert torch.equal(_denoise(pipe, 0), stock)
    assert not spy.calls


def test_fast_attention_refuses_twice_and_keeps_non_standard_processors(pipe):
    from diffusers.models.attention_processor import AttnProcessor

    class CustomProcessor(AttnProcessor):  # not one of diffusers' standard classes: kept
        pass

    attn = pipe.unet.up_blocks[1].motion_modules[0].transformer_blocks[0].attn1
    original, custom = attn.processor, CustomProcessor()
    attn.set_processor(custom)
    try:
        with enable_fast_temporal_attention(pipe) as fast:
            assert attn.processor is custom
            assert "up_blocks.1.motion_modules.0.transformer_blocks.0.attn1" not in fast.layer_names
            assert len(fast.layer_names) == 19
            with pytest.raises(ValueError, match="already enabled"):
                enable_fast_temporal_attention(pipe)
        assert attn.processor is custom
    finally:
        attn.set_processor(original)
    processors = _processors(pipe.unet)
    pipe.unet.set_attn_processor(CustomProcessor())  # every layer: nothing to take over, and a warning says so
    try:
        with pytest.warns(UserWarning, match=r"took over none of the 20 temporal .*\(CustomProcessor;"):
            with enable_fast_temporal_attention(pipe) as fast:
                assert fast.layer_names == []
    finally:
        pipe.unet.set_attn_processor(processors)
    # diffusers re-creates processors with processor.__class__(): unbound, it is the stock processor.
    hidden = torch.randn(4, 16, attn.to_q.in_features)
    with torch.no_grad():
        assert torch.equal(FastTemporalAttnProcessor()(attn, hidden), original(attn, hidden))


# -- Composition --------------------------------------------------------------------------------
@pytest.mark.parametrize("fast_first", [True, False])
@pytest.mark.parametrize("remove_fast_first", [True, False])
def test_composes_with_bytheway_in_either_order(pipe, force_fused, fast_first, remove_fast_first):
    before = _processors(pipe.unet)
    stock = [_denoise(pipe, 0), _denoise(pipe, 1)]
    with apply_bytheway(pipe, cfg=True):
        bytheway_active = _denoise(pipe, 0)

    if fast_first:
        fast = enable_fast_temporal_attention(pipe)
        controller = apply_bytheway(pipe, cfg=True)
    else:
        controller = apply_bytheway(pipe, cfg=True)
        fast = enable_fast_temporal_attention(pipe)
    assert len(fast.layer_names) == 20  # ByTheWay's layers included
    bytheway_layers = set(controller.layer_names)
    if fast_first:  # the fast attention already runs the other layers in every step: ByTheWay keeps them
        assert controller.plain_layer_names == []
    else:  # ByTheWay fuses them in its active steps, the fast attention in the others
        assert sorted(controller.plain_layer_names) == sorted(set(fast.layer_names) - bytheway_layers)
    for name, processor in _processors(pipe.unet).items():
        layer = name[: -len(".processor")]
        if layer in bytheway_layers or layer in controller.plain_layer_names:
            assert isinstance(processor, ByTheWayAttnProcessor), name
        elif layer in fast.layer_names:
            assert isinstance(processor, FastTemporalAttnProcessor), name
    active, inactive = _denoise(pipe, 0), _denoise(pipe, 1)
    torch.testing.assert_close(active, bytheway_active, **TOLERANCE)  # ByTheWay on, fused elsewhere
    torch.testing.assert_close(inactive, stock[1], **TOLERANCE)  # the inactive step runs fused
    assert not torch.equal(inactive, stock[1])  # ... really through the fast processor

    first, second = (fast, controller) if remove_fast_first else (controller, fast)
    first.remove()
    remaining = _denoise(pipe, 0)
    if remove_fast_first:  # ByTheWay alone again
        torch.testing.assert_close(remaining, bytheway_active, **TOLERANCE)
    else:  # the fast attention alone, every layer fused
        torch.testing.assert_close(remaining, stock[0], **TOLERANCE)
    second.remove()
    _assert_restored(pipe.unet, before)
    assert torch.equal(_denoise(pipe, 0), stock[0]) and torch.equal(_denoise(pipe, 1), stock[1])


@pytest.mark.parametrize("with_fast", [True, False], ids=["fast-attention", "bytheway-alone"])
def test_torch_compile_fullgraph_with_both_fused_processors(pipe, force_fused, with_fast):
    # fullgraph=True fails on any graph break: the fused op, the ByTheWay processor (active step)
    # and the fast processor or ByTheWay's plain bindings (every other temporal layer) trace as one
    # graph; hooks stay outside.
    sample, text = unet_inputs(pipe)
    timestep = pipe.scheduler.timesteps[0]
    torch._dynamo.reset()
    fast = enable_fast_temporal_attention(pipe) if with_fast else None
    try:
        with apply_bytheway(pipe, cfg=True) as controller, torch.no_grad():
            assert bool(controller.plain_layer_names) != with_fast
            eager = pipe.unet(sample, timestep, encoder_hidden_states=text).sample
            compiled = torch.compile(pipe.unet, backend="eager", fullgraph=True)
            traced = compiled(sample, timestep, encoder_hidden_states=text).sample
    finally:
        torch._dynamo.reset()
        if fast is not None:
            fast.remove()
    torch.testing.assert_close(traced, eager, **TOLERANCE)


# -- The stacked q, k, v projection of the fused paths -------------------------------------------
def _temporal_attention_module(bias: bool = False):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=32, heads=4, dim_head=8, bias=bias).eval()


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_stacked_projection_is_one_gemm_of_slices_equal_to_the_three(bias):
    attn = _temporal_attention_module(bias)
    hidden = torch.randn(64, 16, 32)  # 1024 rows > 3 * 32 output features
    with torch.no_grad():
        separate = processor_module.project_qkv(attn, hidden)
        stacked = processor_module.project_qkv(attn, hidden, stacked=True)
    for one, other in zip(stacked, separate):
        torch.testing.assert_close(one, other, rtol=1e-5, atol=1e-5)
        assert one.stride() == (16 * 96, 96, 1)  # slices of one (rows, 3C) output, no copy
    assert stacked[1].data_ptr() == stacked[0].data_ptr() + 32 * stacked[0].element_size()


def test_stacked_projection_falls_back_where_it_must_not_stack():
    attn = _temporal_attention_module()
    hidden = torch.randn(64, 16, 32)
    assert processor_module._stacks_qkv(attn, hidden)
    assert not processor_module._stacks_qkv(attn, hidden[:1, :16])  # 16 rows: stacking costs more
    assert not processor_module._stacks_qkv(attn, hidden.double())  # another dtype than the weights
    handle = attn.to_k.register_forward_hook(lambda *args: None)  # a hook must still run
    assert not processor_module._stacks_qkv(attn, hidden)
    handle.remove()
    attn.to_v.forward = attn.to_v.forward  # an instance-level forward, as accelerate's offload sets
    assert not processor_module._stacks_qkv(attn, hidden)
    del attn.to_v.forward

    class Wrapped(torch.nn.Linear):  # a LoRA or quantised layer computes more than its weight
        pass

    attn.to_q.__class__ = Wrapped
    assert not processor_module._stacks_qkv(attn, hidden)
    attn.to_q.__class__ = torch.nn.Linear
    attn.to_v.bias = torch.nn.Parameter(torch.zeros(32))  # biases on some only
    assert not processor_module._stacks_qkv(attn, hidden)
    attn.to_v.bias = None
    assert processor_module._stacks_qkv(attn, hidden)
    spy_calls = []
    attn.to_q.register_forward_pre_hook(lambda *args: spy_calls.append(1))
    with torch.no_grad():
        processor_module.project_qkv(attn, hidden, stacked=True)
    assert spy_calls == [1]  # fell back: the module ran


def test_output_rescale_is_skipped_only_when_it_is_one():
    attn = _temporal_attention_module()
    attended, residual = torch.randn(4, 16, 32), torch.randn(4, 16, 32)
    with torch.no_grad():
        projected = attn.to_out[0](attended)
        assert torch.equal(processor_module.finish_output(attn, attended, residual), projected)
        attn.rescale_output_factor = 2.0
        attn.residual_connection = True
        torch.testing.assert_close(processor_module.finish_output(attn, attended, residual),
                                   (projected + residual) / 2.0, rtol=0, atol=0)


# -- Fused q, k, v projections (diffusers' fuse_qkv_projections) --------------------------------
def test_fused_projection_processor_is_standard_where_the_module_has_to_qkv():
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    attn, processor = _temporal_attention_module(bias=True), FusedAttnProcessor2_0()
    assert processor_module.standard_scale(processor, attn) == (False, None)  # no to_qkv: kept as it is
    attn.fuse_projections()
    assert processor_module.standard_scale(processor, attn) == (True, None)  # SDPA's scale, as AttnProcessor2_0
    hidden = torch.randn(64, 16, 32)
    with torch.no_grad():
        fused = processor_module.project_qkv(attn, hidden, stacked=True, fused_projection=True)
        separate = processor_module.project_qkv(attn, hidden)
        projected = attn.to_qkv(hidden)
    for index, (one, other) in enumerate(zip(fused, separate)):
        assert torch.equal(one, projected[..., 32 * index: 32 * (index + 1)])  # to_qkv's slices ...
        assert one.stride() == (16 * 96, 96, 1)  # ... of one (rows, 3C) output, no copy
        assert one.data_ptr() == fused[0].data_ptr() + 32 * index * one.element_size()
        torch.testing.assert_close(one, other, rtol=1e-5, atol=1e-5)


def _fused_projection_case(name: str):
    if name == "i2vgenxl":
        return i2vgenxl_case()
    pipe = tiny.tiny_animatediff_pipeline() if name == "animatediff" else tiny.tiny_text_to_video_pipeline()
    sample, text = unet_inputs(pipe)
    return pipe.unet, sample, dict(encoder_hidden_states=text)


class ProjectionCalls:
    """Counts the calls of the fused (to_qkv) and separate (to_q) projections of `layers`."""

    def __init__(self, model, layers):
        self.fused = self.separate = 0
        modules = [model.get_submodule(name) for name in layers]
        self._handles = [attn.to_qkv.register_forward_hook(lambda *args: self._count("fused")) for attn in modules]
        self._handles += [attn.to_q.register_forward_hook(lambda *args: self._count("separate")) for attn in modules]

    def _count(self, kind: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)

    def take(self) -> tuple:
        counts, self.fused, self.separate = (self.fused, self.separate), 0, 0
        return counts


@pytest.mark.parametrize("name", ["animatediff", "text-to-video", "i2vgenxl"])
def test_fused_qkv_projections_keep_every_fused_path(name, force_fused):
    """After `fuse_qkv_projections()` every temporal layer runs `FusedAttnProcessor2_0`: the fast
    attention and ByTheWay's plain layers still take them all over, and every path (ByTheWay fused
    and materialised, plain, fast, either order) projects through to_qkv, as that processor does."""
    model, sample, kwargs = _fused_projection_case(name)
    scheduler = tiny.tiny_ddim_scheduler()
    scheduler.set_timesteps(STEPS)
    active_t, inactive_t = scheduler.timesteps[0], scheduler.timesteps[1]
    with enable_fast_temporal_attention(model) as fast:
        temporal_layers = fast.layer_names
    with apply_bytheway(model, cfg=True, scheduler=scheduler) as controller:
        plain_layers = controller.plain_layer_names
        bytheway_separate = call_denoiser(model, sample, active_t, kwargs)
    assert plain_layers

    model.fuse_qkv_projections()
    stock = [call_denoiser(model, sample, t, kwargs) for t in (active_t, inactive_t)]
    calls = ProjectionCalls(model, temporal_layers)
    call_denoiser(model, sample, active_t, kwargs)
    layer_calls = calls.take()[0]  # FreeNoise-free: one call per temporal layer
    assert layer_calls >= len(temporal_layers)

    with enable_fast_temporal_attention(model) as fast:
        assert fast.layer_names == temporal_layers
        fast_output = call_denoiser(model, sample, active_t, kwargs)
    assert calls.take() == (layer_calls, 0)
    torch.testing.assert_close(fast_output, stock[0], **TOLERANCE)
    assert not torch.equal(fast_output, stock[0])  # the fused op really ran
    assert torch.equal(call_denoiser(model, sample, active_t, kwargs), stock[0])  # removed: stock, bit for bit

    for fused_attention in (None, False):  # ByTheWay's layers fused, then materialised
        calls.take()
        with apply_bytheway(model, cfg=True, scheduler=scheduler, fused_attention=fused_attention) as controller:
            assert controller.plain_layer_names == ([] if fused_attention is False else plain_layers)
            active = call_denoiser(model, sample, active_t, kwargs)
            assert calls.take() == (layer_calls, 0)
            assert torch.equal(call_denoiser(model, sample, inactive_t, kwargs), stock[1])
        torch.testing.assert_close(active, bytheway_separate, **TOLERANCE)
    calls.take()

    controller = apply_bytheway(model, cfg=True, scheduler=scheduler)  # then the fast attention behind it
    with enable_fast_temporal_attention(model), controller:
        active = call_denoiser(model, sample, active_t, kwargs)
        inactive = call_denoiser(model, sample, inactive_t, kwargs)
    assert calls.take() == (2 * layer_calls, 0)
    torch.testing.assert_close(active, bytheway_separate, **TOLERANCE)
    torch.testing.assert_close(inactive, stock[1], **TOLERANCE)
    assert torch.equal(call_denoiser(model, sample, inactive_t, kwargs), stock[1])


def test_fusing_projections_after_applying_is_refused_and_remove_keeps_the_fused_processors():
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    pipe = tiny.tiny_animatediff_pipeline()
    controller, fast = apply_bytheway(pipe, cfg=True), enable_fast_temporal_attention(pipe)
    layers, plain_layers = controller.layer_names, controller.plain_layer_names
    pipe.unet.fuse_qkv_projections()  # replaces every processor, ByTheWay's and the fast one's
    with pytest.raises(RuntimeError, match="replaced or given another processor"):
        _denoise(pipe, 0)
    with pytest.raises(ValueError, match="already enabled"):
        enable_fast_temporal_attention(pipe)
    controller.remove()
    fast.remove()
    assert {type(p) for p in _processors(pipe.unet).values()} == {FusedAttnProcessor2_0}  # kept, not reverted
    with apply_bytheway(pipe, cfg=True) as controller:
        assert (controller.layer_names, controller.plain_layer_names) == (layers, plain_layers)
    with enable_fast_temporal_attention(pipe) as fast:
        assert len(fast.layer_names) == 20


# -- xformers and sliced attention (plain attention with attn.scale) -----------------------------
@pytest.fixture
def fake_xformers(monkeypatch):
    """xformers' `memory_efficient_attention` as documented, softmax(q kᵀ · scale + bias) v, for
    machines without xformers (`XFormersAttnProcessor` looks the module up at call time)."""
    import types

    import diffusers.models.attention_processor as attention_processor

    def memory_efficient_attention(query, key, value, attn_bias=None, op=None, scale=None):
        scores = query @ key.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scale is None else scale)
        if attn_bias is not None:
            scores = scores + attn_bias
        return scores.softmax(-1) @ value

    ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setattr(attention_processor, "xformers", types.SimpleNamespace(ops=ops), raising=False)


def test_processors_skipping_norms_are_standard_only_without_those_norms():
    from diffusers.models.attention_processor import (Attention, AttnProcessor, AttnProcessor2_0,
                                                      SlicedAttnProcessor, XFormersAttnProcessor)

    plain = _temporal_attention_module()
    head_normed = Attention(query_dim=32, heads=4, dim_head=8, qk_norm="layer_norm")
    spatial_normed = Attention(query_dim=32, heads=4, dim_head=8, spatial_norm_dim=8)
    for processor in (AttnProcessor(), XFormersAttnProcessor(), SlicedAttnProcessor(slice_size=2)):
        assert processor_module.standard_scale(processor, plain) == (True, plain.scale)
        assert processor_module.standard_scale(processor, head_normed) == (False, None)  # all three skip norm_q / norm_k
    assert processor_module.standard_scale(AttnProcessor2_0(), head_normed) == (True, None)  # applies them, as we do
    assert processor_module.standard_scale(AttnProcessor(), spatial_normed) == (True, spatial_normed.scale)
    assert processor_module.standard_scale(XFormersAttnProcessor(), spatial_normed) == (True, spatial_normed.scale)
    assert processor_module.standard_scale(SlicedAttnProcessor(2), spatial_normed) == (False, None)  # skips it


@pytest.mark.parametrize("kind", ["xformers", "sliced"])
def test_xformers_and_sliced_attention_layers_are_taken_over_with_their_scale(kind, force_fused, fake_xformers):
    from diffusers.models.attention_processor import SlicedAttnProcessor, XFormersAttnProcessor

    pipe = tiny.tiny_animatediff_pipeline()
    pipe.scheduler.set_timesteps(STEPS)
    with enable_fast_temporal_attention(pipe) as fast:
        temporal_layers = fast.layer_names
    for name in temporal_layers:
        attn = pipe.unet.get_submodule(name)
        attn.set_processor(XFormersAttnProcessor() if kind == "xformers" else SlicedAttnProcessor(slice_size=3))
        attn.scale *= 0.5  # these processors use attn.scale: SDPA's d**-0.5 would fail below
    stock = [_denoise(pipe, 0), _denoise(pipe, 1)]
    with enable_fast_temporal_attention(pipe) as fast:
        assert fast.layer_names == temporal_layers
        fused = _denoise(pipe, 0)
    torch.testing.assert_close(fused, stock[0], **TOLERANCE)
    assert not torch.equal(fused, stock[0])  # the fused op really ran
    assert torch.equal(_denoise(pipe, 0), stock[0])  # removed: stock, bit for bit
    with apply_bytheway(pipe, cfg=True, fused_attention=False):
        materialised = _denoise(pipe, 0)
    with apply_bytheway(pipe, cfg=True) as controller:
        assert len(controller.plain_layer_names) == 12
        active = _denoise(pipe, 0)
        assert torch.equal(_denoise(pipe, 1), stock[1])
    torch.testing.assert_close(active, materialised, **TOLERANCE)


# -- Copies and pickles -------------------------------------------------------------------------
def test_deepcopy_and_pickle_are_refused_while_applied_and_work_after_remove():
    pipe = tiny.tiny_animatediff_pipeline()
    with apply_bytheway(pipe) as controller:
        for action in (copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match=r"ByTheWay is applied.*call remove\(\) on the ByTheWayController"):
                action(pipe)
            with pytest.raises(TypeError, match="ByTheWay is applied"):
                action(pipe.unet.up_blocks[1])  # a part of the model: its layers are bound too
        with pytest.raises(TypeError, match="ByTheWay is applied"):
            copy.deepcopy(controller)
    with enable_fast_temporal_attention(pipe.unet):
        for action in (copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match=r"fast temporal attention is enabled.*call remove\(\)"):
                action(pipe.unet)
    duplicate = copy.deepcopy(pipe.unet)  # removed: an ordinary model again
    assert not any(hasattr(m, BINDING_ATTR) or hasattr(m, FAST_ATTR) for m in duplicate.modules())


# -- Configuration checks at apply time ----------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (dict(adaptive_beta=0), "adaptive_beta must be a bool"),
    (dict(adaptive_beta="yes"), "adaptive_beta must be a bool"),
    (dict(alpha="0.5"), "alpha must be a finite real number"),
    (dict(alpha=1.5), "alpha must be <= 1"),
    (dict(beta=float("nan")), "beta must be a finite real number"),
    (dict(beta=10 ** 400), "beta must be a finite real number"),
    (dict(tau=7.0), "tau must be an integer"),
    (dict(tau=True), "tau must be an integer"),
    (dict(tau=-1), "tau must be a non-negative integer"),
    (dict(step_fraction=0), r"step_fraction must be in \(0, 1\], got 0"),
    (dict(step_fraction=-1), r"step_fraction must be in \(0, 1\], got -1"),
    (dict(step_fraction=1.5), r"step_fraction must be in \(0, 1\], got 1.5"),
    (dict(energy_scope=["batch"]), "energy_scope must be one of"),
    (dict(guide_upsample="cubic"), "guide_upsample must be one of"),
    (dict(beta_max=1.0), "beta_max must be >= 1.5"),
    (dict(diagnostics=1), "diagnostics must be a bool"),
    (dict(scheduler="ddim"), "scheduler must be a diffusers scheduler"),
    (dict(anchor=1.0), "anchor must be None, a decoder block index or a block name"),
    (dict(cfg=(3, 1)), r"pass a \(parts, energy_part\) split as batch_split=\(3, 1\)"),
    (dict(cfg=1), "cfg must be a bool"),
    (dict(batch_split=(2, 2)), "batch_split=.* needs parts >= 1 and 0 <= energy_part < parts"),
])
def test_every_config_field_is_checked_when_applying(pipe, overrides, message):
    with pytest.raises(ValueError, match=message):
        apply_bytheway(pipe, **overrides)
    assert not any(hasattr(m, BINDING_ATTR) for m in pipe.unet.modules())


def test_numpy_scalars_are_accepted_like_python_numbers(pipe, monkeypatch):
    config = ByTheWayConfig(alpha=np.float32(0.5), beta=np.float64(2.0), tau=np.int64(7),
                            step_fraction=np.float32(0.5), adaptive_beta=np.bool_(False), beta_max=np.int32(4))
    assert (config.alpha, config.beta, config.tau, config.adaptive_beta, config.beta_max) == (0.5, 2.0, 7, False, 4.0)
    assert type(config.tau) is int and type(config.alpha) is float and type(config.adaptive_beta) is bool
    with apply_bytheway(pipe, config, batch_split=(2, 1)) as controller:
        changed = _denoise(pipe, 0)
    assert controller.config == config and torch.isfinite(changed).all()


# -- The real fused kernel under the Triton interpreter -----------------------------------------
@interpreter
def test_interpreter_kernel_bytheway_and_fast_attention(pipe, monkeypatch):
    small = dict(batch=2, frames=8, height=4, width=4)
    stock = _denoise(pipe, 0, **small)
    with apply_bytheway(pipe, cfg=True, tau=3, fused_attention=False):
        materialised = _denoise(pipe, 0, **small)
    monkeypatch.setenv("BYTHEWAY_BACKEND", "triton")
    spy = FusedSpy(monkeypatch, processor_module)
    with apply_bytheway(pipe, cfg=True, tau=3, fused_attention=True) as controller:
        fused = _denoise(pipe, 0, **small)
    # every temporal layer ran the kernel: ByTheWay's with a guide or the anchor map, the others plain
    assert len(spy.calls) == len(controller.layer_names) + len(controller.plain_layer_names) == 20
    with enable_fast_temporal_attention(pipe):
        fast = _denoise(pipe, 0, **small)
    torch.testing.assert_close(fused, materialised, **TOLERANCE)
    torch.testing.assert_close(fast, stock, **TOLERANCE)
    assert (materialised - stock).abs().max() > 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the fused kernel compiled for the GPU)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_fused_paths_are_as_accurate_as_materialised(dtype):
    # In half precision the materialised path rounds the scores and the map to `dtype`; the fused
    # kernel keeps them in fp32. Both are compared with the same model run in fp32 (materialised):
    # the fused error must not exceed the materialised one by more than 50% (+ a small floor).
    pipe32 = tiny.tiny_animatediff_pipeline(device="cuda")
    pipe = tiny.tiny_animatediff_pipeline(device="cuda", dtype=dtype)
    for p in (pipe32, pipe):
        p.scheduler.set_timesteps(STEPS)
    sample, text = (t.cuda() for t in unet_inputs(pipe32))

    def run(model_pipe, timestep_index=0):
        cast = dict(dtype=model_pipe.unet.dtype)
        with torch.no_grad():
            return model_pipe.unet(sample.to(**cast), model_pipe.scheduler.timesteps[timestep_index],
                                   encoder_hidden_states=text.to(**cast)).sample.float()

    def error(output, truth):
        return ((output - truth).abs().max() / truth.abs().max()).item()

    with apply_bytheway(pipe32, cfg=True, fused_attention=False):
        truth = run(pipe32)
    with apply_bytheway(pipe, cfg=True, fused_attention=False):
        materialised = run(pipe)
    with apply_bytheway(pipe, cfg=True, fused_attention=True):
        fused = run(pipe)
    assert error(fused, truth) <= 1.5 * error(materialised, truth) + 1e-3
    stock_truth, stock = run(pipe32), run(pipe)
    with enable_fast_temporal_attention(pipe):
        fast = run(pipe)
    assert error(fast, stock_truth) <= 1.5 * error(stock, stock_truth) + 1e-3
    assert torch.equal(run(pipe), stock)
    pipe.unet.fuse_qkv_projections()  # every path now takes q, k, v as slices of to_qkv's output
    with apply_bytheway(pipe, cfg=True, fused_attention=False):
        materialised = run(pipe)
    with apply_bytheway(pipe, cfg=True, fused_attention=True):
        assert error(run(pipe), truth) <= 1.5 * error(materialised, truth) + 1e-3
    stock = run(pipe)
    with enable_fast_temporal_attention(pipe) as fast:
        assert len(fast.layer_names) == 20
        assert error(run(pipe), stock_truth) <= 1.5 * error(stock, stock_truth) + 1e-3


def test_public_names():
    assert bytheway_kernels.enable_fast_temporal_attention is enable_fast_temporal_attention
    assert bytheway_kernels.temporal_attention.__name__ == "temporal_attention"


@pytest.mark.parametrize("module", [bytheway_kernels.config, controller_module, fast_module])
def test_docstring_examples_run(module, no_kernel):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
