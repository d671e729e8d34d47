"""Small image helpers: model space <-> uint8, PNG grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def square_resize(img: Image.Image, size: int) -> np.ndarray:
    """Any PIL image -> uint8 (size, size, 3): RGB, center square crop, bicubic resize (the one
    preprocessing of user images, COCO images and query images)."""
    img = img.convert("RGB")
    s = min(img.size)
    left, top = (img.width - s) // 2, (img.height - s) // 2
    return np.asarray(img.crop((left, top, left + s, top + s)).resize((size, size),
                                                                      Image.BICUBIC))


def center_crop_resize(img: Image.Image, size: int) -> torch.Tensor:
    """Any PIL image -> float (3, size, size) in [-1, 1] (model space of the pixel codec)."""
    return torch.from_numpy(square_resize(img, size).astype(np.float32)).movedim(-1, 0) / 127.5 - 1


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1] (the inverse of :func:`to_uint8`)."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().movedim(-1, 1) / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(1, -1).cpu().numpy()


def save_grid(images: np.ndarray, path: str | Path, ncol: int = 16, scale: int = 4,
              pad: int = 1) -> None:
    """Tile uint8 (N, H, W, 3) images into one PNG, upscaled ``scale`` x (nearest)."""
    n, h, w, _ = images.shape
    nrow = max(1, (n + ncol - 1) // ncol)
    ncol = min(ncol, n)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h,
             pad + c * (w + pad) : pad + c * (w + pad) + w] = images[i]
    img = Image.fromarray(grid)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
