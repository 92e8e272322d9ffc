"""Spatial upsampling of an anchor map, shared by the reference and the diffusers integration.

The fused kernels never materialise the upsampled guide: they apply the same index rules inline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_nn


def upsample_guide(guide: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """(B, h, w, heads, F, F) -> (B, H, W, heads, F, F) with torch's interpolate index rules.

    Examples:
        >>> guide = torch.softmax(torch.randn(1, 2, 2, 4, 16, 16), dim=-1)
        >>> upsample_guide(guide, 4, 4, "bilinear").shape
        torch.Size([1, 4, 4, 4, 16, 16])
    """
    batch, h, w, heads, frames, _ = guide.shape
    if (h, w) == (height, width):
        return guide
    if guide.numel() == 0:  # interpolate rejects empty inputs
        return guide.new_zeros((batch, height, width, heads, frames, frames))
    planes = guide.permute(0, 3, 4, 5, 1, 2).reshape(batch, heads * frames * frames, h, w)
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    planes = F_nn.interpolate(planes, size=(height, width), mode=mode, **kwargs)
    return planes.reshape(batch, heads, frames, frames, height, width).permute(0, 4, 5, 1, 2, 3)
