"""Video frames from pipeline outputs, and writing GIF/MP4 files (PIL / imageio)."""

from __future__ import annotations

import os
from typing import List, Sequence

import numpy as np


def video_frames(frames, index: int = 0) -> np.ndarray:
    """The `index`-th video of a pipeline's `.frames` as uint8 (F, H, W, 3).

    Accepts what diffusers video pipelines return: an array/tensor (B, F, H, W, C) in [0, 1]
    (output_type "np"), a tensor (B, F, C, H, W) ("pt"), or lists of PIL images ("pil").
    """
    video = frames[index]
    if hasattr(video, "detach"):  # torch tensor (F, C, H, W)
        video = video.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    if isinstance(video, (list, tuple)):
        video = np.stack([np.asarray(frame) for frame in video])
    video = np.asarray(video)
    if video.dtype != np.uint8:
        video = (np.clip(video, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if video.shape[-1] == 1:
        video = np.repeat(video, 3, axis=-1)
    return video


def enlarge(video: np.ndarray, min_size: int = 128) -> np.ndarray:
    """Nearest-neighbour upscaling by an integer factor so the short side is >= min_size."""
    factor = max(1, -(-min_size // min(video.shape[1:3])))
    return video.repeat(factor, axis=1).repeat(factor, axis=2)


def side_by_side(videos: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """Videos (F, H, W, 3) of equal F and H placed left to right with white gaps."""
    frames, height = videos[0].shape[:2]
    spacer = np.full((frames, height, gap, 3), 255, dtype=np.uint8)
    parts: List[np.ndarray] = []
    for i, video in enumerate(videos):
        if i:
            parts.append(spacer)
        parts.append(video)
    return np.concatenate(parts, axis=2)


def write_gif(video: np.ndarray, path: str, fps: int = 8) -> str:
    """Write (F, H, W, 3) uint8 frames as a looping GIF; returns the path."""
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    images = [Image.fromarray(frame) for frame in video]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def write_mp4(video: np.ndarray, path: str, fps: int = 8) -> str:
    """Write an MP4 with imageio's ffmpeg plugin (needs the imageio-ffmpeg package)."""
    import imageio

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # H.264 wants even sizes.
    video = video[:, : video.shape[1] // 2 * 2, : video.shape[2] // 2 * 2]
    imageio.mimwrite(path, list(video), fps=fps)
    return path
