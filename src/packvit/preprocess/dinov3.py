"""DINOv3 image preprocessing: the reference fixed-size processor, and native resolution.

Both modes run the reference's pipeline, in its order: uint8 RGB → float32 ``x * (1/255)`` →
bilinear resize with antialias (``align_corners=False``; skipped when the size does not change) →
``(x - mean) / std`` with the ImageNet mean and std.

- ``preprocess_fixed``: transformers' ``DINOv3ViTImageProcessor`` exactly, every image resized
  to 224×224 (aspect ratio not kept): ``pixel_values [B, 3, 224, 224]``, 196 patches per image.
- ``preprocess_native``: the aspect ratio kept, sides rounded to multiples of the patch size,
  scaled down only when an image exceeds a patch budget (``native_size``); items of different
  sizes, packed by ``dinov3_preprocess`` into one ``PackedBatch``: how packed DINOv3 is meant to run.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..packing import PackedBatch, patchify
from .common import IMAGENET_MEAN, IMAGENET_STD, to_rgb_uint8

__all__ = [
    "DINOV3_IMAGE_SIZE",
    "DINOV3_PATCH_SIZE",
    "DINOV3_MAX_NUM_PATCHES",
    "image_to_uint8",
    "rescale_resize_normalize",
    "preprocess_fixed",
    "native_size",
    "preprocess_native",
    "dinov3_preprocess",
]

DINOV3_IMAGE_SIZE = (224, 224)
DINOV3_PATCH_SIZE = 16
#: default patch budget of the native mode: 1024 patches, the area of a 512×512 image
DINOV3_MAX_NUM_PATCHES = 1024


def image_to_uint8(image) -> torch.Tensor:
    """A PIL image, a uint8 ``[H, W(, C)]`` array or a uint8 ``[C, H, W]`` tensor → uint8 RGB ``[3, H, W]``
    (grey repeated, transparency composited onto white, as the other processors do)."""
    return to_rgb_uint8(image, "pil")


def rescale_resize_normalize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` → float32 ``[B, 3, size[0], size[1]]``, normalised (the reference's order)."""
    x = pixels.to(torch.float32) * (1 / 255)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=list(size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(-1, 1, 1)
    return (x - mean) / std


def preprocess_fixed(images: Sequence, size: tuple[int, int] = DINOV3_IMAGE_SIZE) -> torch.Tensor:
    """The reference ``DINOv3ViTImageProcessor``: images → ``pixel_values [B, 3, 224, 224]``."""
    return torch.cat([rescale_resize_normalize(image_to_uint8(image)[None], size) for image in images])


def native_size(height: int, width: int, patch_size: int = DINOV3_PATCH_SIZE,
                max_num_patches: int = DINOV3_MAX_NUM_PATCHES) -> tuple[int, int]:
    """Pixel size ``(H', W')`` of the native mode for an image of ``height × width``.

    Both sides are multiplied by one scale ``s ≤ 1`` (images are never enlarged) and rounded to the
    nearest multiple of ``patch_size``, at least one patch; ``s`` is the largest scale whose grid
    holds at most ``max_num_patches`` patches (found by bisection, so the aspect ratio is kept up to
    rounding, and a side that reaches one patch stays at one).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max_num_patches < 1:
        raise ValueError(f"max_num_patches must be at least 1, got {max_num_patches}")

    def grid(scale: float) -> tuple[int, int]:
        rows = max(1, math.floor(height * scale / patch_size + 0.5))
        cols = max(1, math.floor(width * scale / patch_size + 0.5))
        return rows, cols

    def fits(scale: float) -> bool:
        rows, cols = grid(scale)
        return rows * cols <= max_num_patches

    low, high = 0.0, 1.0  # grid(0) is 1×1, which always fits
    if fits(high):
        low = high
    else:
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if fits(middle) else (low, middle)
    rows, cols = grid(low)
    return rows * patch_size, cols * patch_size


def preprocess_native(images: Sequence, patch_size: int = DINOV3_PATCH_SIZE,
                      max_num_patches: int = DINOV3_MAX_NUM_PATCHES) -> list[torch.Tensor]:
    """Images → normalised items ``[3, H', W']`` at ``native_size`` (sides multiples of ``patch_size``)."""
    items = []
    for image in images:
        pixels = image_to_uint8(image)
        size = native_size(pixels.shape[1], pixels.shape[2], patch_size, max_num_patches)
        items.append(rescale_resize_normalize(pixels[None], size)[0])
    return items


def dinov3_preprocess(images: Sequence, mode: str = "native", patch_size: int = DINOV3_PATCH_SIZE,
                max_num_patches: int = DINOV3_MAX_NUM_PATCHES) -> PackedBatch:
    """Images → one ``PackedBatch`` of (p, p, C) patches for ``DINOv3ViTPacking``.

    ``mode="native"`` keeps each image's aspect ratio under the patch budget; ``mode="fixed"``
    resizes every image to 224×224 like the reference processor.
    """
    if mode == "native":
        items = preprocess_native(images, patch_size, max_num_patches)
    elif mode == "fixed":
        items = list(preprocess_fixed(images))
    else:
        raise ValueError(f"mode must be 'native' or 'fixed', got {mode!r}")
    patches, grid_thw = patchify(items, patch_size, layout="ppc")
    return PackedBatch(patches, grid_thw)
