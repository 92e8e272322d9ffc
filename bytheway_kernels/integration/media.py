"""Video frames from pipeline outputs, and writing them: lossless PNG strips, a labelled
stock | ByTheWay | amplified-difference comparison, and GIF/MP4 extras (PIL / imageio).

PNG is the reference output: GIF quantisation moves pixels by far more than ByTheWay's change on a
short run, so a GIF can show a difference that is not there or hide one that is.

Examples:
    >>> import numpy as np
    >>> stock = np.zeros((2, 8, 8, 3), np.uint8)
    >>> edited = stock.copy(); edited[0, 0, 0] = 3
    >>> difference, factor = amplified_difference(stock, edited)
    >>> factor, int(difference.max())
    (85, 255)
    >>> comparison(stock, edited, min_size=8).shape[0]
    2
"""

from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

#: Height in pixels of the label band drawn above each panel of `comparison`.
LABEL_HEIGHT = 16


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


def amplified_difference(stock: np.ndarray, edited: np.ndarray) -> Tuple[np.ndarray, int]:
    """(|stock - edited| per pixel and channel times `factor`, `factor`), as uint8 frames.

    `factor` is the largest integer that keeps the largest difference of the whole video within
    255 (1 when the videos are identical), so small changes become visible and panels of one
    video share one scale."""
    difference = np.abs(stock.astype(np.int16) - edited.astype(np.int16))
    largest = int(difference.max())
    factor = 255 // largest if largest else 1
    return (difference * factor).astype(np.uint8), factor


def _labelled(video: np.ndarray, label: str) -> np.ndarray:
    """`video` with a white band of LABEL_HEIGHT pixels on top carrying `label` in black."""
    from PIL import Image, ImageDraw, ImageFont

    band = Image.new("RGB", (video.shape[2], LABEL_HEIGHT), "white")
    ImageDraw.Draw(band).text((2, 2), label, fill="black", font=ImageFont.load_default())
    band_frames = np.broadcast_to(np.asarray(band), (video.shape[0],) + np.asarray(band).shape)
    return np.concatenate([band_frames, video], axis=1)


def comparison(stock: np.ndarray, edited: np.ndarray, min_size: int = 128) -> np.ndarray:
    """Labelled side-by-side video: stock | ByTheWay | |difference| x factor (enlarged to at
    least `min_size` pixels per side, nearest neighbour)."""
    difference, factor = amplified_difference(stock, edited)
    panels = [
        _labelled(enlarge(stock, min_size), "stock"),
        _labelled(enlarge(edited, min_size), "ByTheWay"),
        _labelled(enlarge(difference, min_size), f"|difference| x{factor}"),
    ]
    return side_by_side(panels)


def frame_strip(video: np.ndarray, vertical: bool = False, gap: int = 2) -> np.ndarray:
    """All frames of `video` in one image, left to right (or top to bottom), white gaps between."""
    frames = list(video)
    if vertical:
        spacer = np.full((gap, video.shape[2], 3), 255, np.uint8)
    else:
        spacer = np.full((video.shape[1], gap, 3), 255, np.uint8)
    parts = [part for frame in frames for part in (frame, spacer)][:-1]
    return np.concatenate(parts, axis=0 if vertical else 1)


def write_png(image: np.ndarray, path: str) -> str:
    """Write one (H, W, 3) uint8 image losslessly as PNG; returns the path."""
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def write_gif(video: np.ndarray, path: str, fps: int = 8) -> str:
    """Write (F, H, W, 3) uint8 frames as a looping GIF (lossy: 256 colours); returns the path."""
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    images = [Image.fromarray(frame) for frame in video]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def mp4_available() -> bool:
    """True when imageio can write MP4 here (the imageio-ffmpeg package is installed)."""
    return all(importlib.util.find_spec(name) is not None for name in ("imageio", "imageio_ffmpeg"))


def write_mp4(video: np.ndarray, path: str, fps: int = 8) -> str:
    """Write an MP4 with imageio's ffmpeg plugin (needs the imageio-ffmpeg package)."""
    import imageio

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # H.264 wants even sizes.
    video = video[:, : video.shape[1] // 2 * 2, : video.shape[2] // 2 * 2]
    imageio.mimwrite(path, list(video), fps=fps)
    return path


def write_videos(videos: Dict[str, np.ndarray], out_dir: str, *, fps: int = 8, mp4: bool = False,
                 gif: bool = True) -> List[str]:
    """Write each named video into `out_dir`: `<name>.png` (its frames in one lossless strip; the
    labelled comparison "side_by_side" top to bottom, one frame per row), plus `<name>.gif` when
    `gif` and `<name>.mp4` when `mp4`. Returns the paths written.

    Examples:
        >>> write_videos({"stock": stock, "side_by_side": comparison(stock, edited)}, "out")  # doctest: +SKIP
        ['out/stock.png', 'out/stock.gif', 'out/side_by_side.png', 'out/side_by_side.gif']
    """
    paths = []
    for name, video in videos.items():
        base = os.path.join(out_dir, name)
        paths.append(write_png(frame_strip(video, vertical=name == "side_by_side"), base + ".png"))
        if gif:
            paths.append(write_gif(video, base + ".gif", fps=fps))
        if mp4:
            paths.append(write_mp4(video, base + ".mp4", fps=fps))
    return paths
