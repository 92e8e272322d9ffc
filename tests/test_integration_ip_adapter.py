"""IP-Adapter with ByTheWay, in both orders: `load_ip_adapter` replaces the spatial cross-attention
processors and re-creates every other processor from its class with no arguments, the motion
modules' too, so ByTheWay's (whose layer bindings live on the modules) must survive being
re-created, and `unload_ip_adapter` must leave them working.

The adapter is a random one in IP-Adapter's file layout (image projection, then to_k_ip / to_v_ip
per cross-attention layer, numbered as diffusers reads them), saved to a temporary folder."""

from __future__ import annotations

import pytest
import torch

from bytheway_kernels import apply_bytheway
from bytheway_kernels.integration import ByTheWayAttnProcessor, tiny
from integration_helpers import OpSpy, run_frames, video_call_kwargs

pytest.importorskip("diffusers")

STEPS = 3  # ceil(0.2 * 3) = 1 active step
IMAGE_EMBED_DIM = 8


def _save_random_ip_adapter(unet, folder) -> None:
    """IP-Adapter's safetensors layout for `unet`: "image_proj.*" (ImageProjection: 4 tokens),
    then "ip_adapter.{1, 3, 5, ...}.to_k_ip / to_v_ip.weight", one pair per cross-attention
    processor in `attn_processors` order, skipping self-attention and motion modules."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(3)
    text_dim = unet.config.cross_attention_dim
    tensors = {
        "image_proj.proj.weight": torch.randn(4 * text_dim, IMAGE_EMBED_DIM, generator=generator) * 0.1,
        "image_proj.proj.bias": torch.zeros(4 * text_dim),
        "image_proj.norm.weight": torch.ones(text_dim),
        "image_proj.norm.bias": torch.zeros(text_dim),
    }
    channels = unet.config.block_out_channels
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        block = int(name.split(".")[1]) if not name.startswith("mid_block") else None
        hidden = (channels[-1] if block is None else
                  list(reversed(channels))[block] if name.startswith("up_blocks") else channels[block])
        for projection in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{key_id}.{projection}.weight"] = (
                torch.randn(hidden, text_dim, generator=generator) * 0.1)
        key_id += 2
    save_file(tensors, str(folder / "ip_adapter.safetensors"))


def _load(pipe, folder) -> None:
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name="ip_adapter.safetensors",
                         image_encoder_folder=None)


def _run(pipe, with_image: bool):
    extra = {}
    if with_image:  # (negative, positive) image embeddings for CFG
        extra["ip_adapter_image_embeds"] = [torch.randn(2, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(4))]
    return run_frames(pipe, **video_call_kwargs(steps=STEPS, **extra))


def _processor_classes(pipe) -> set:
    return {type(processor).__name__ for processor in pipe.unet.attn_processors.values()}


@pytest.fixture
def adapter_folder(tmp_path):
    _save_random_ip_adapter(tiny.tiny_animatediff_pipeline().unet, tmp_path)
    return tmp_path


def test_ip_adapter_loaded_before_or_after_bytheway(adapter_folder, monkeypatch):
    before = tiny.tiny_animatediff_pipeline()
    _load(before, adapter_folder)
    stock = _run(before, with_image=True)
    assert not torch.equal(stock, _run(tiny.tiny_animatediff_pipeline(), with_image=False))  # the adapter acts
    spy = OpSpy(monkeypatch)
    with apply_bytheway(before) as controller:
        first_order = _run(before, with_image=True)
        processed = len(controller.layer_names)
    assert len(spy.calls) == processed and {call.batch_split for call in spy.calls} == {(2, 1)}
    assert torch.isfinite(first_order).all() and not torch.equal(first_order, stock)
    assert torch.equal(_run(before, with_image=True), stock)

    after = tiny.tiny_animatediff_pipeline()
    with apply_bytheway(after) as controller:
        _load(after, adapter_folder)  # re-creates ByTheWay's processors from their class
        assert "IPAdapterAttnProcessor2_0" in _processor_classes(after)
        for name in controller.layer_names:
            assert isinstance(after.unet.get_submodule(name).processor, ByTheWayAttnProcessor)
        assert torch.equal(_run(after, with_image=True), first_order)
        after.unload_ip_adapter()
        assert "IPAdapterAttnProcessor2_0" not in _processor_classes(after)
        without_adapter = _run(after, with_image=False)
    stock_without = _run(after, with_image=False)
    assert torch.equal(stock_without, _run(tiny.tiny_animatediff_pipeline(), with_image=False))
    assert not torch.equal(without_adapter, stock_without)  # ByTheWay still ran after unloading
