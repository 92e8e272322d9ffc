"""Tiny random-weight diffusers video pipelines, built offline from configs.

They exist for tests, CI, benchmarks and the CLI demo: every builder runs without network access
(the CLIP tokenizer is built from a byte-level vocabulary written to a temporary folder), is
deterministic for a given `seed`, and keeps one denoiser step on CPU far below a second.

All models use 16-frame-capable temporal layers so that the paper's presets (tau = 7 needs
F >= 16) apply unchanged; the latents are tiny instead (8x8 by default).

Examples:
    >>> import torch
    >>> from bytheway_kernels import apply_bytheway
    >>> from bytheway_kernels.integration.tiny import tiny_animatediff_pipeline
    >>> pipe = tiny_animatediff_pipeline()
    >>> with apply_bytheway(pipe, preset="animatediff"):
    ...     frames = pipe("a cat", num_frames=16, height=16, width=16, num_inference_steps=2,
    ...                   generator=torch.Generator().manual_seed(0), output_type="pt").frames
    >>> tuple(frames.shape)
    (1, 16, 3, 16, 16)
"""

from __future__ import annotations

import contextlib
import json
import logging
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


def tiny_clip_text_encoder(vocab_size: int, with_projection: bool = False):
    """A one-layer CLIP text encoder; `with_projection` gives a CLIPTextModelWithProjection with
    TINY_TEXT_DIM pooled embeddings (the second text encoder of SDXL)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=TINY_TOKENS,
        projection_dim=TINY_TEXT_DIM,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def tiny_clip_image_encoder(image_size: int):
    """(CLIPVisionModelWithProjection with TINY_TEXT_DIM image embeddings, its CLIPImageProcessor)
    for square `image_size` inputs. The processor is built locally (transformers' PIL backend when
    torchvision is missing)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=32,
        projection_dim=TINY_TEXT_DIM,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=image_size // 4,
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    return CLIPVisionModelWithProjection(config).eval(), processor


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


#: Levels of the tiny motion UNet, shared by its SparseCtrl ControlNet.
_MOTION_UNET_LEVELS = dict(
    block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
)


def tiny_motion_unet(motion_heads=(2, 4, 2), conv_in_channels=None, **unet_config):
    """(UNet2DConditionModel, MotionAdapter) of a 3-level AnimateDiff model; AnimateDiff pipelines
    merge them into a UNetMotionModel. up_blocks.1 (the anchor) and up_blocks.2 differ in
    resolution and, by default, in temporal head count (4 vs 2). `conv_in_channels` gives the
    adapter its own conv_in (PIA: 9 channels); `unet_config` overrides the UNet's config (SDXL)."""
    from diffusers import MotionAdapter, UNet2DConditionModel

    config = dict(
        _MOTION_UNET_LEVELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_DIM,
        sample_size=8,
    )
    config.update(unet_config)
    unet = UNet2DConditionModel(**config)
    adapter = MotionAdapter(
        block_out_channels=config["block_out_channels"],
        motion_layers_per_block=1,
        motion_num_attention_heads=motion_heads,
        motion_norm_num_groups=4,
        motion_max_seq_length=32,
        conv_in_channels=conv_in_channels,
    )
    return unet, adapter


def tiny_sparse_controlnet():
    """A SparseControlNetModel matching the tiny motion UNet, conditioned on VAE latents of the
    control frames (the simplified condition embedding)."""
    from diffusers import SparseControlNetModel

    return SparseControlNetModel(
        **_MOTION_UNET_LEVELS,
        down_block_types=("CrossAttnDownBlockMotion", "CrossAttnDownBlockMotion", "DownBlockMotion"),
        cross_attention_dim=TINY_TEXT_DIM,
        conditioning_channels=4,
        conditioning_embedding_out_channels=(8, 8),
        motion_num_attention_heads=2,
        use_simplified_condition_embedding=True,
    ).eval()


def tiny_controlnet():
    """A ControlNetModel (image ControlNet, run frame by frame) matching the tiny motion UNet; its
    condition embedding halves the control images' size, as the tiny VAE does."""
    from diffusers import ControlNetModel

    return ControlNetModel(
        **_MOTION_UNET_LEVELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=TINY_TEXT_DIM,
        conditioning_embedding_out_channels=(8, 8),
    ).eval()


class _DropFloat32CastWarning(logging.Filter):
    """Drops diffusers' "modules ... that should be kept in float32: []" warning. It is logged by
    `ModelMixin.to` whenever a dtype is passed (AnimateDiff pipelines call it while merging the
    UNet and the motion adapter, and `_to` casts), even when the list of such modules is empty, as
    it is for every tiny model: the warning describes nothing here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32" not in record.getMessage()


@contextlib.contextmanager
def _quiet_float32_cast_warning():
    """Install `_DropFloat32CastWarning` on the logger that emits it, for the `with` body only."""
    emitter = logging.getLogger("diffusers.models.modeling_utils")
    drop = _DropFloat32CastWarning()
    emitter.addFilter(drop)
    try:
        yield
    finally:
        emitter.removeFilter(drop)


def _to(pipe, device, dtype):
    # Modules are built in float32: cast only when asked.
    with _quiet_float32_cast_warning():
        pipe.to(device=device, dtype=None if dtype == torch.float32 else dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _vae_and_clip_text(tokenizer) -> dict:
    """The components every text-conditioned tiny pipeline shares (VAE first, then the text
    encoder: the order the random weights are drawn in)."""
    return dict(vae=tiny_vae(), text_encoder=tiny_clip_text_encoder(len(tokenizer)), tokenizer=tokenizer)


def _motion_pipeline(pipeline_class, device, dtype, seed, unet_options=None, extra_components=None):
    """An AnimateDiff-family pipeline from the shared tiny parts (tokenizer, CLIP text encoder,
    motion UNet built with `unet_options`, VAE, DDIM); `extra_components(tokenizer)` returns the
    pipeline's further components, built after the shared ones from the same seed."""
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    unet, adapter = tiny_motion_unet(**(unet_options or {}))
    components = dict(
        **_vae_and_clip_text(tokenizer),
        unet=unet,
        motion_adapter=adapter,
        scheduler=tiny_ddim_scheduler(),
    )
    if extra_components is not None:
        components.update(extra_components(tokenizer))
    with _quiet_float32_cast_warning():  # the pipeline merges UNet and adapter with a dtype cast
        pipe = pipeline_class(**components)
    return _to(pipe, device, dtype)


def tiny_animatediff_pipeline(device="cpu", dtype=torch.float32, seed: int = 0):
    """A tiny random-weight `AnimateDiffPipeline` (UNetMotionModel), fully offline.

    Run it with `num_frames=16`, `height=width=16` (8x8 latents) or any multiple of 8 pixels.
    The weights depend only on `seed`.
    """
    from diffusers import AnimateDiffPipeline

    return _motion_pipeline(AnimateDiffPipeline, device, dtype, seed)


#: SDXL micro-conditioning: (original size, crop top-left, target size) = 6 numbers, each embedded
#: with this many channels, next to the pooled embedding of the second text encoder.
_SDXL_TIME_EMBED_DIM = 4


def tiny_animatediff_sdxl_pipeline(device="cpu", dtype=torch.float32, seed: int = 0):
    """A tiny `AnimateDiffSDXLPipeline`: two CLIP text encoders (hidden states concatenated, so the
    UNet cross-attends to 2 * TINY_TEXT_DIM channels) and SDXL's "text_time" added embedding."""
    from diffusers import AnimateDiffSDXLPipeline

    unet_options = dict(
        cross_attention_dim=2 * TINY_TEXT_DIM,
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * _SDXL_TIME_EMBED_DIM + TINY_TEXT_DIM,
    )
    return _motion_pipeline(
        AnimateDiffSDXLPipeline, device, dtype, seed, unet_options,
        lambda tokenizer: dict(
            text_encoder_2=tiny_clip_text_encoder(len(tokenizer), with_projection=True),
            tokenizer_2=tokenizer,
        ),
    )


def tiny_animatediff_pag_pipeline(device="cpu", dtype=torch.float32, seed: int = 0):
    """A tiny `AnimateDiffPAGPipeline` (perturbed-attention guidance on diffusers' default layers,
    `mid_block.*attn1`: the middle block's spatial and temporal self-attention). Call it with
    `pag_scale > 0`; the batch is then (unconditional, conditional, perturbed) with CFG."""
    from diffusers import AnimateDiffPAGPipeline

    return _motion_pipeline(AnimateDiffPAGPipeline, device, dtype, seed)


def tiny_pia_pipeline(device="cpu", dtype=torch.float32, seed: int = 0):
    """A tiny `PIAPipeline` (image-to-video): the UNet's conv_in takes 9 channels (latents, mask,
    masked image latents). Call it with an `image` of the video's size."""
    from diffusers import PIAPipeline

    return _motion_pipeline(PIAPipeline, device, dtype, seed, dict(conv_in_channels=9))


def tiny_animatediff_sparsectrl_pipeline(device="cpu", dtype=torch.float32, seed: int = 0):
    """A tiny `AnimateDiffSparseControlNetPipeline`; call it with `conditioning_frames` (images of
    the video's size) and `controlnet_frame_indices`."""
    from diffusers import AnimateDiffSparseControlNetPipeline

    return _motion_pipeline(
        AnimateDiffSparseControlNetPipeline, device, dtype, seed,
        extra_components=lambda tokenizer: dict(controlnet=tiny_sparse_controlnet()),
    )


def tiny_animatediff_controlnet_pipeline(device="cpu", dtype=torch.float32, seed: int = 0,
                                         video_to_video: bool = False):
    """A tiny `AnimateDiffControlNetPipeline`, or with `video_to_video`
    `AnimateDiffVideoToVideoControlNetPipeline`; call it with `conditioning_frames` (one image of
    the video's size per frame) and, for video-to-video, `video`."""
    from diffusers import AnimateDiffControlNetPipeline, AnimateDiffVideoToVideoControlNetPipeline

    pipeline_class = AnimateDiffVideoToVideoControlNetPipeline if video_to_video else AnimateDiffControlNetPipeline
    return _motion_pipeline(pipeline_class, device, dtype, seed,
                            extra_components=lambda tokenizer: dict(controlnet=tiny_controlnet()))


#: The UNet3D-style decoder shared by the tiny TextToVideoSD and I2VGenXL denoisers.
_TINY_UNET3D_CONFIG = dict(
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
    norm_num_groups=4,
    cross_attention_dim=TINY_TEXT_DIM,
    attention_head_dim=4,
)


def tiny_text_to_video_pipeline(device="cpu", dtype=torch.float32, seed: int = 0):
    """A tiny random-weight `TextToVideoSDPipeline` (UNet3DConditionModel, the ModelScope /
    VideoCrafter2-like architecture). Temporal heads are channels / 4: 4 in up_blocks.1, 2 in
    up_blocks.2. This pipeline has no `do_classifier_free_guidance`: pass `cfg=` to apply_bytheway.
    """
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    unet = UNet3DConditionModel(**_TINY_UNET3D_CONFIG, sample_size=8).eval()
    pipe = TextToVideoSDPipeline(**_vae_and_clip_text(tokenizer), unet=unet, scheduler=tiny_ddim_scheduler())
    return _to(pipe, device, dtype)


def tiny_video_to_video_pipeline(device="cpu", dtype=torch.float32, seed: int = 0):
    """A tiny `VideoToVideoSDPipeline`: `tiny_text_to_video_pipeline`'s parts, called with `video`
    (and no `do_classifier_free_guidance` either: pass `cfg=` to apply_bytheway)."""
    from diffusers import VideoToVideoSDPipeline

    text_to_video = tiny_text_to_video_pipeline(device, dtype, seed)
    pipe = VideoToVideoSDPipeline(**text_to_video.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_i2vgenxl_unet():
    """A tiny random-weight I2VGenXLUNet (UNet3D-style decoder: temp_attentions)."""
    from diffusers import I2VGenXLUNet

    return I2VGenXLUNet(**_TINY_UNET3D_CONFIG, num_attention_heads=None, sample_size=8).eval()


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


#: Side of the square images the tiny CLIP image encoders take (I2VGen-XL resizes to it itself).
_IMAGE_ENCODER_SIZE = 32


def tiny_i2vgenxl_pipeline(device="cpu", dtype=torch.float32, seed: int = 0):
    """A tiny `I2VGenXLPipeline` (image + text to video); call it with an `image` and a prompt."""
    from diffusers import I2VGenXLPipeline

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    image_encoder, feature_extractor = tiny_clip_image_encoder(_IMAGE_ENCODER_SIZE)
    pipe = I2VGenXLPipeline(
        **_vae_and_clip_text(tokenizer),
        image_encoder=image_encoder,
        feature_extractor=feature_extractor,
        unet=tiny_i2vgenxl_unet(),
        scheduler=tiny_ddim_scheduler(),
    )
    return _to(pipe, device, dtype)


def tiny_svd_pipeline(device="cpu", dtype=torch.float32, seed: int = 0):
    """A tiny `StableVideoDiffusionPipeline` (image to video). Its VAE has 32 channels (the
    temporal decoder's group norms have 32 groups) and one downsampling level, like `tiny_vae`."""
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline

    torch.manual_seed(seed)
    # SVD resizes the image to 224 x 224 for its encoder.
    image_encoder, feature_extractor = tiny_clip_image_encoder(224)
    vae = AutoencoderKLTemporalDecoder(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        block_out_channels=(32, 32),
        latent_channels=4,
        sample_size=16,
    ).eval()
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
        timestep_type="continuous", use_karras_sigmas=True, sigma_min=0.002, sigma_max=700.0,
    )
    pipe = StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=tiny_svd_unet(), scheduler=scheduler,
        feature_extractor=feature_extractor,
    )
    return _to(pipe, device, dtype)


def tiny_latte_pipeline(device="cpu", dtype=torch.float32, seed: int = 0):
    """A tiny `LattePipeline` without text encoder or tokenizer: call it with `prompt_embeds` and
    `negative_prompt_embeds` of shape (batch, tokens, TINY_TEXT_DIM)."""
    from diffusers import LattePipeline

    torch.manual_seed(seed)
    pipe = LattePipeline(
        tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=tiny_latte_transformer(),
        scheduler=tiny_ddim_scheduler(),
    )
    return _to(pipe, device, dtype)
