"""Finding the temporal self-attention layers of a diffusers video denoiser.

Each supported architecture is described by a `ModelFamily`: where its decoder blocks (and all its
other blocks) are, which modules inside a block are temporal transformers, which `Attention`
modules inside those are temporal *self*-attention, and how to read the video geometry (B, H, W)
from the arguments of the module that reshapes `(B*F, C, H, W)` into `(B*H*W, F, C)`.
ByTheWay edits the decoder's layers (`decoder_temporal_layers`); the fast temporal attention runs
every temporal self-attention layer (`all_temporal_layers`), encoder, middle block and the
temporal modules outside the blocks (UNet3D's `transformer_in`, I2VGenXL's image-latent encoder)
included.

| denoiser | decoder blocks | temporal transformer modules | layers | default anchor |
|---|---|---|---|---|
| UNetMotionModel (AnimateDiff, SDXL, SparseCtrl, PIA, V2V) | up_blocks.i | motion_modules | attn1, attn2 | up_blocks.1 |
| UNet3DConditionModel, I2VGenXLUNet | up_blocks.i | temp_attentions | attn1, attn2 | up_blocks.1 |
| UNetSpatioTemporalConditionModel (SVD) | up_blocks.i | attentions (temporal_transformer_blocks) | attn1 only | up_blocks.1 |
| LatteTransformer3DModel | temporal_transformer_blocks.i | the block itself | attn1 | block N // 2 |

Outside the decoder, `all_temporal_layers` adds down_blocks.i and mid_block (same modules and
layers as the decoder blocks), UNet3D's and I2VGenXL's `transformer_in` (attn1, attn2) and
I2VGenXL's `image_latents_temporal_encoder` (attn1).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence, Tuple

import torch


@dataclasses.dataclass
class Geometry:
    """(B, H, W) of the latest call of a temporal transformer module, written by a pre-hook."""

    batch: int = 0
    height: int = 0
    width: int = 0


@dataclasses.dataclass(eq=False)
class TemporalLayer:
    """One temporal self-attention `Attention` module of a decoder block."""

    name: str  # full module name inside the denoiser
    block: str  # decoder block name, e.g. "up_blocks.2"
    position: Tuple  # (module index in block, transformer block index, attribute) -- anchor key
    attn: torch.nn.Module
    parent: torch.nn.Module  # holds `attn` as attribute `attribute`
    attribute: str
    owner: torch.nn.Module  # module whose forward pre-hook yields the Geometry
    geometry: Geometry


def _arg(args, kwargs, name: str, index: int, default=None):
    """Argument `name` of a forward call, given by keyword or at positional `index`."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _geometry_from_frames_argument(module, args, kwargs) -> Tuple[int, int, int]:
    """AnimateDiffTransformer3D / TransformerTemporalModel: (B*F, C, H, W) and `num_frames`
    (keyword in the decoder blocks, 5th positional argument in AnimateDiff's mid block)."""
    hidden = _arg(args, kwargs, "hidden_states", 0)
    frames = _arg(args, kwargs, "num_frames", 4, 1)
    return hidden.shape[0] // frames, hidden.shape[2], hidden.shape[3]


def _geometry_from_indicator(module, args, kwargs) -> Tuple[int, int, int]:
    """TransformerSpatioTemporalModel (SVD): (B*F, C, H, W) and image_only_indicator (B, F)."""
    hidden = _arg(args, kwargs, "hidden_states", 0)
    indicator = _arg(args, kwargs, "image_only_indicator", 2)
    return hidden.shape[0] // indicator.shape[-1], hidden.shape[2], hidden.shape[3]


def _geometry_from_latte_input(module, args, kwargs) -> Tuple[int, int, int]:
    """LatteTransformer3DModel: latents (B, C, F, H, W), tokens on a (H/p, W/p) grid."""
    hidden = _arg(args, kwargs, "hidden_states", 0)
    patch = module.config.patch_size
    return hidden.shape[0], hidden.shape[3] // patch, hidden.shape[4] // patch


def _is_self_attention(attn) -> bool:
    return attn is not None and hasattr(attn, "processor") and not getattr(attn, "is_cross_attention", True)


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """How to find the decoder's temporal self-attention layers of one denoiser architecture."""

    name: str
    default_anchor: Callable  # denoiser -> anchor block name
    blocks: Callable  # denoiser -> [(block name, block module)]
    temporal_modules: Callable  # block -> [temporal transformer module]
    transformer_blocks: Callable  # temporal module -> [transformer block]
    attributes: Sequence[str]  # attention attributes of a transformer block to consider
    geometry: Callable  # (owner, args, kwargs) -> (B, H, W)
    owner_is_denoiser: bool  # geometry comes from the denoiser's own arguments
    frames_axis: int  # axis of F in the denoiser's `sample`
    all_blocks: Callable  # denoiser -> [(block name, block module)]: encoder, middle and decoder
    standalone: Sequence[str] = ()  # denoiser attributes that are temporal modules outside blocks


def _up_blocks(denoiser):
    return [(f"up_blocks.{i}", block) for i, block in enumerate(getattr(denoiser, "up_blocks", []))]


def _unet_blocks(denoiser):
    """down_blocks.i, mid_block and up_blocks.i, in execution order."""
    blocks = [(f"down_blocks.{i}", block) for i, block in enumerate(getattr(denoiser, "down_blocks", []))]
    if getattr(denoiser, "mid_block", None) is not None:
        blocks.append(("mid_block", denoiser.mid_block))
    return blocks + _up_blocks(denoiser)


def _module_list(attribute: str):
    return lambda block: list(getattr(block, attribute, None) or [])


def _svd_modules(block):
    from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

    return [m for m in getattr(block, "attentions", None) or [] if isinstance(m, TransformerSpatioTemporalModel)]


def _up_block_1(denoiser) -> str:
    return "up_blocks.1"  # the paper's anchor for UNets


def _latte_anchor(denoiser) -> str:
    # A DiT: every temporal block is its own "decoder block"; the anchor is the first block of the
    # second half (the DiT analogue of the first decoder stage after the bottleneck).
    return f"temporal_transformer_blocks.{len(denoiser.temporal_transformer_blocks) // 2}"


def _latte_blocks(denoiser):
    return [(f"temporal_transformer_blocks.{i}", b) for i, b in enumerate(denoiser.temporal_transformer_blocks)]


def _transformer_blocks(module):
    """The transformer blocks of a temporal module; one without any is its own block (I2VGenXL's
    image-latent encoder). A block wrapped by FreeNoise's split inference counts as the block it
    wraps (`split_inference_wrappers` tells which are)."""
    blocks = getattr(module, "transformer_blocks", None)
    return [module] if blocks is None else [_unwrapped(block) for block in blocks]


def is_split_inference_wrapper(module) -> bool:
    """diffusers' `SplitInferenceModule`, which `enable_free_noise_split_inference` puts around
    the motion modules' transformer blocks: it runs them on chunks of the B*H*W rows."""
    return type(module).__name__ == "SplitInferenceModule" and isinstance(getattr(module, "module", None),
                                                                         torch.nn.Module)


def _unwrapped(block):
    return block.module if is_split_inference_wrapper(block) else block


def split_inference_wrappers(denoiser, layers: Sequence["TemporalLayer"]) -> List[str]:
    """Names of the split-inference wrappers around any of `layers` (their transformer blocks)."""
    parents = {id(layer.parent) for layer in layers}
    return [name for name, module in denoiser.named_modules()
            if is_split_inference_wrapper(module) and id(module.module) in parents]


_UNET3D_LIKE = dict(
    default_anchor=_up_block_1, blocks=_up_blocks, temporal_modules=_module_list("temp_attentions"),
    transformer_blocks=_transformer_blocks, attributes=("attn1", "attn2"),
    geometry=_geometry_from_frames_argument, owner_is_denoiser=False, frames_axis=2, all_blocks=_unet_blocks,
)

FAMILIES = {
    "UNetMotionModel": ModelFamily(
        name="AnimateDiff UNetMotionModel", default_anchor=_up_block_1, blocks=_up_blocks,
        temporal_modules=_module_list("motion_modules"), transformer_blocks=_transformer_blocks,
        attributes=("attn1", "attn2"), geometry=_geometry_from_frames_argument, owner_is_denoiser=False,
        frames_axis=2, all_blocks=_unet_blocks,
    ),
    "UNet3DConditionModel": ModelFamily(name="UNet3DConditionModel", standalone=("transformer_in",), **_UNET3D_LIKE),
    "I2VGenXLUNet": ModelFamily(
        name="I2VGenXLUNet", standalone=("transformer_in", "image_latents_temporal_encoder"), **_UNET3D_LIKE
    ),
    "UNetSpatioTemporalConditionModel": ModelFamily(
        # attn2 of the temporal blocks is cross-attention to the image embedding: never touched.
        name="UNetSpatioTemporalConditionModel (SVD)", default_anchor=_up_block_1, blocks=_up_blocks,
        temporal_modules=_svd_modules, transformer_blocks=lambda module: list(module.temporal_transformer_blocks),
        attributes=("attn1",), geometry=_geometry_from_indicator, owner_is_denoiser=False, frames_axis=1,
        all_blocks=_unet_blocks,
    ),
    "LatteTransformer3DModel": ModelFamily(
        name="LatteTransformer3DModel", default_anchor=_latte_anchor, blocks=_latte_blocks,
        temporal_modules=lambda block: [block], transformer_blocks=lambda module: [module],
        attributes=("attn1", "attn2"), geometry=_geometry_from_latte_input, owner_is_denoiser=True,
        frames_axis=2, all_blocks=_latte_blocks,
    ),
}

SEARCHED = (
    "up_blocks[i].motion_modules[j].transformer_blocks[k].attn1/attn2 (UNetMotionModel); "
    "up_blocks[i].temp_attentions[j].transformer_blocks[k].attn1/attn2 (UNet3DConditionModel, "
    "I2VGenXLUNet); up_blocks[i].attentions[j].temporal_transformer_blocks[k].attn1 "
    "(UNetSpatioTemporalConditionModel); temporal_transformer_blocks[i].attn1 (LatteTransformer3DModel)"
)


def family_of(denoiser) -> ModelFamily:
    """The ModelFamily of `denoiser`, or a ValueError listing what is supported and searched."""
    for cls in type(denoiser).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    raise ValueError(
        f"ByTheWay cannot identify the temporal attention layers of {type(denoiser).__name__}: "
        f"supported denoisers are {sorted(FAMILIES)}; searched for {SEARCHED}"
    )


def decoder_temporal_layers(denoiser, family: ModelFamily) -> List[Tuple[str, List[TemporalLayer]]]:
    """Every decoder block in order with its temporal self-attention layers (possibly none)."""
    geometries = {}  # one Geometry per owner module, shared by the layers it contains
    return [
        (name, _block_layers(denoiser, family, name, block, family.temporal_modules(block), geometries))
        for name, block in family.blocks(denoiser)
    ]


def all_temporal_layers(denoiser, family: ModelFamily) -> List[TemporalLayer]:
    """Every temporal self-attention layer of `denoiser`: the temporal modules outside the blocks,
    then those of every block (encoder, middle, decoder)."""
    geometries = {}
    layers = []
    for attribute in family.standalone:
        module = getattr(denoiser, attribute, None)
        if module is not None:
            layers += _block_layers(denoiser, family, attribute, module, [module], geometries)
    for name, block in family.all_blocks(denoiser):
        layers += _block_layers(denoiser, family, name, block, family.temporal_modules(block), geometries)
    return layers


def _block_layers(denoiser, family: ModelFamily, block_name: str, block, modules, geometries) -> List[TemporalLayer]:
    """The temporal self-attention layers inside `modules`, the temporal modules of `block`."""
    layers = []
    for module_index, module in enumerate(modules):
        owner = denoiser if family.owner_is_denoiser else module
        geometry = geometries.setdefault(id(owner), Geometry())
        for block_index, transformer_block in enumerate(family.transformer_blocks(module)):
            for attribute in family.attributes:
                attn = getattr(transformer_block, attribute, None)
                if not _is_self_attention(attn):
                    continue
                prefix = block_name if module is block else f"{block_name}.{_child_path(block, module)}"
                inner = "" if transformer_block is module else f"{_child_path(module, transformer_block)}."
                layers.append(TemporalLayer(
                    name=f"{prefix}.{inner}{attribute}", block=block_name,
                    position=(module_index, block_index, attribute), attn=attn,
                    parent=transformer_block, attribute=attribute, owner=owner, geometry=geometry,
                ))
    return layers


def _child_path(root: torch.nn.Module, child: torch.nn.Module) -> str:
    for name, module in root.named_modules():
        if module is child:
            return name
    raise LookupError(f"{type(child).__name__} is not inside {type(root).__name__}")


def resolve_anchor(anchor, denoiser, family: ModelFamily, block_names: Sequence[str]) -> str:
    """The anchor block name from `anchor` (None: the family default; int: decoder block index;
    str: block name such as "up_blocks.1"), or a ValueError listing the valid blocks."""
    if anchor is None:
        name = family.default_anchor(denoiser)
    elif isinstance(anchor, int) and not isinstance(anchor, bool):
        if not 0 <= anchor < len(block_names):
            raise ValueError(
                f"anchor={anchor} is out of range: {family.name} has {len(block_names)} decoder blocks "
                f"{list(block_names)}"
            )
        name = block_names[anchor]
    elif isinstance(anchor, str):
        name = anchor
    else:
        raise ValueError(f"anchor must be None, a decoder block index or a block name, got {anchor!r}")
    if name not in block_names:
        raise ValueError(
            f"anchor block {name!r} does not exist in {family.name}; decoder blocks are {list(block_names)}"
        )
    return name


def frames_of(sample: Optional[torch.Tensor], family: ModelFamily) -> Optional[int]:
    """F of the denoiser's `sample`, when it is a 5-D video latent."""
    if isinstance(sample, torch.Tensor) and sample.dim() == 5:
        return sample.shape[family.frames_axis]
    return None
