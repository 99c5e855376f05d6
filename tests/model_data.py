"""Small fixed batches of real pixels for the model tests: crops of the photos bundled with
scikit-image, and clips that pan across one of them."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def _photo(name: str) -> torch.Tensor:
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)[..., :3]
    return torch.from_numpy(img).permute(2, 0, 1) / 127.5 - 1  # (3, H, W) in [-1, 1]


def image_crops(size: int = 32, n: int = 4, zoom: int = 4) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: a (size·zoom)² centre crop of each photo, area-resized."""
    crops = []
    for i in range(n):
        img = _photo(PHOTOS[i % len(PHOTOS)])
        side = size * zoom
        top, left = (img.shape[1] - side) // 2, (img.shape[2] - side) // 2 + 16 * (i // 4)
        crops.append(img[:, top : top + side, left : left + side])
    return F.interpolate(torch.stack(crops), size=(size, size), mode="area")


def pan_clips(frames: int = 4, size: int = 16, n: int = 2, step: int = 2, zoom: int = 4):
    """(n, 3, frames, size, size) in [-1, 1]: a window sliding `step` px per frame (after
    resizing the photo by 1/zoom) across each photo."""
    clips = []
    for i in range(n):
        img = _photo(PHOTOS[i % len(PHOTOS)])
        img = F.interpolate(img[None], scale_factor=1 / zoom, mode="area")[0]
        top, left = (img.shape[1] - size) // 2, (img.shape[2] - size) // 2 - frames * step // 2
        clips.append(
            torch.stack(
                [
                    img[:, top : top + size, left + t * step : left + t * step + size]
                    for t in range(frames)
                ],
                dim=1,
            )
        )
    return torch.stack(clips)
