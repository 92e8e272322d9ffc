"""Tiny random-weight diffusers video pipelines, built offline from configs.

They exist for tests, CI, benchmarks and the CLI demo: every builder runs without network access
(the CLIP tokenizer is built from a byte-level vocabulary written to a temporary folder), is
deterministic for a given `seed`, and keeps one denoiser step on CPU far below a second.

All models use 16-frame-capable temporal layers so that the paper's presets (tau = 7 needs
F >= 16) apply unchanged; the latents are tiny instead (8x8 by default).
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

#: Frames the tiny pipelines are meant to be run with (the presets' tau = 7 needs F >= 16).
TINY_FRAMES = 16
#: Token sequence length of the tiny text encoders.
TINY_TOKENS = 77
TINY_TEXT_DIM = 16


def _byte_level_alphabet():
    """The 256 printable characters GPT-2/CLIP byte-level BPE uses to spell raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    codes = []
    for byte in range(256):
        if byte in printable:
            codes.append(byte)
        else:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def tiny_clip_tokenizer():
    """A CLIPTokenizer with a character-level vocabulary (no merges), built offline."""
    from transformers import CLIPTokenizer

    alphabet = _byte_level_alphabet()
    tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [c + "</w>" for c in alphabet]
    with tempfile.TemporaryDirectory(prefix="bytheway_tiny_tokenizer_") as folder:
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as handle:
            json.dump({token: index for index, token in enumerate(tokens)}, handle)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as handle:
            handle.write("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=TINY_TOKENS)


def tiny_clip_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=TINY_TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def tiny_vae():
    """A one-level AutoencoderKL (no downsampling): frames have the latents' spatial size x 2."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


def tiny_ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        steps_offset=1, timestep_spacing="linspace",
    )


def tiny_motion_unet(motion_heads=(2, 4, 2)):
    """(UNet2DConditionModel, MotionAdapter) of a 3-level AnimateDiff model; AnimateDiffPipeline
    merges them into a UNetMotionModel. up_blocks.1 (the anchor) and up_blocks.2 differ in
    resolution and, by default, in temporal head count (4 vs 2)."""
    from diffusers import MotionAdapter, UNet2DConditionModel

    channels = (8, 16, 16)
    unet = UNet2DConditionModel(
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4,
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=2,
        sample_size=8,
    )
    adapter = MotionAdapter(
        block_out_channels=channels,
        motion_layers_per_block=1,
        motion_num_attention_heads=motion_heads,
        motion_norm_num_groups=4,
        motion_max_seq_length=32,
    )
    return unet, adapter


def _to(pipe, device, dtype):
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_animatediff_pipeline(device="cpu", dtype=torch.float32, seed: int = 0):
    """A tiny random-weight `AnimateDiffPipeline` (UNetMotionModel), fully offline.

    Run it with `num_frames=16`, `height=width=16` (8x8 latents) or any multiple of 8 pixels.
    The weights depend only on `seed`.
    """
    from diffusers import AnimateDiffPipeline

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    unet, adapter = tiny_motion_unet()
    pipe = AnimateDiffPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_clip_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        unet=unet,
        motion_adapter=adapter,
        scheduler=tiny_ddim_scheduler(),
    )
    return _to(pipe, device, dtype)


def tiny_text_to_video_pipeline(device="cpu", dtype=torch.float32, seed: int = 0):
    """A tiny random-weight `TextToVideoSDPipeline` (UNet3DConditionModel, the ModelScope /
    VideoCrafter2-like architecture). Temporal heads are channels / 4: 4 in up_blocks.1, 2 in
    up_blocks.2. This pipeline has no `do_classifier_free_guidance`: pass `cfg=` to apply_bytheway.
    """
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    unet = UNet3DConditionModel(
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        norm_num_groups=4,
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=4,
        sample_size=8,
    ).eval()
    pipe = TextToVideoSDPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_clip_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=tiny_ddim_scheduler(),
    )
    return _to(pipe, device, dtype)


def tiny_i2vgenxl_unet():
    """A tiny random-weight I2VGenXLUNet (UNet3D-style decoder: temp_attentions)."""
    from diffusers import I2VGenXLUNet

    return I2VGenXLUNet(
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        norm_num_groups=4,
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=4,
        num_attention_heads=None,
        sample_size=8,
    ).eval()


def tiny_svd_unet():
    """A tiny random-weight UNetSpatioTemporalConditionModel (Stable Video Diffusion). Its group
    norms have 32 groups, hence 32 channels; temporal heads are 4 in up_blocks.1, 2 in up_blocks.2."""
    from diffusers import UNetSpatioTemporalConditionModel

    return UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 32, 32),
        layers_per_block=1,
        down_block_types=(
            "CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal",
        ),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=TINY_TEXT_DIM,
        num_attention_heads=(2, 4, 8),
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12,
        num_frames=TINY_FRAMES,
        sample_size=8,
    ).eval()


def tiny_latte_transformer():
    """A tiny random-weight LatteTransformer3DModel (4 spatial + 4 temporal blocks, patch 2)."""
    from diffusers import LatteTransformer3DModel

    return LatteTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=TINY_TEXT_DIM,
        video_length=TINY_FRAMES,
    ).eval()
