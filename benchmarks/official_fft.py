"""The ByTheWay map written the way the paper's code computes it: an independent baseline.

It works on the layout a diffusers processor holds, (B*H*W*heads, F, F), materialises every
intermediate (softmax, the upsampled guide via F.interpolate, the complex spectrum, the scaled
spectrum, the inverse transform) and computes in float32 whatever the input dtype (torch.fft
has no bf16 and no non-power-of-two fp16 on CUDA). This is the cost the fused kernels remove.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F_nn

from bytheway_kernels.energy import HIGH_ENERGY_FLOOR  # the same beta fallback as the op


def official_fft_probs(
    scores: torch.Tensor,
    guide: Optional[torch.Tensor],
    *,
    alpha: float,
    beta: float,
    tau: int,
    adaptive_beta: bool,
) -> torch.Tensor:
    """scores (B, H, W, heads, F, F), guide (B, h, w, heads, F, F) or None; CFG batch
    (energies from the conditional second half, one beta for the batch)."""
    batch, height, width, heads, frames, _ = scores.shape
    rows = scores.reshape(-1, frames, frames).float()  # what the processor has

    attn = rows.softmax(dim=-1)
    if guide is None:
        guided = attn
    else:
        _, h, w, *_ = guide.shape
        planes = guide.float().reshape(batch, h, w, heads * frames * frames).permute(0, 3, 1, 2)
        planes = F_nn.interpolate(planes, size=(height, width), mode="nearest")
        upsampled = planes.permute(0, 2, 3, 1).reshape(-1, frames, frames)
        guided = (1 - alpha) * attn + alpha * upsampled

    spectrum = torch.fft.fft(guided, dim=-1)
    centre = frames // 2
    in_band = torch.zeros(frames, dtype=torch.bool, device=scores.device)
    in_band[centre - tau : centre + tau + 1] = True

    if adaptive_beta:
        conditional = slice(rows.shape[0] // 2, None)
        e1 = (attn[conditional] ** 2).sum(-1).mean()
        e2 = (guided[conditional] ** 2).sum(-1).mean()
        e2_high = (spectrum[conditional].abs() ** 2 * in_band).sum(-1).mean() / frames
        e2_low = e2 - e2_high
        has_high = e2_high > HIGH_ENERGY_FLOOR * e2
        needed = (torch.clamp(e1 - e2_low, min=0) / torch.where(has_high, e2_high, 1.0)).sqrt()
        gain = torch.where(has_high, needed.clamp(min=beta), needed.new_tensor(beta))
    else:
        gain = beta

    spectrum = torch.where(in_band, spectrum * gain, spectrum)
    enhanced = torch.fft.ifft(spectrum, dim=-1).real
    enhanced = enhanced / enhanced.sum(dim=-1, keepdim=True)
    return enhanced.to(scores.dtype).reshape(scores.shape)
