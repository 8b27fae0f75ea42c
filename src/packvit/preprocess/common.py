"""Conversion and normalisation shared by the image processors."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CLIP_MEAN",
    "CLIP_STD",
    "HALF_MEAN",
    "HALF_STD",
    "to_pil_rgb",
    "normalize_to_tensor",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


def to_pil_rgb(image) -> Image.Image:
    """A PIL image, an ``[H, W, C]``/``[H, W]`` uint8 array, or a ``[C, H, W]`` uint8 tensor → RGB PIL."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.dtype != torch.uint8:
            raise ValueError(f"tensor images must be uint8 [C, H, W], got {image.dtype} {tuple(image.shape)}")
        image = image.permute(1, 2, 0).numpy()
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"array images must be uint8 [H, W, C] or [H, W], got {array.dtype} {array.shape}; convert with (x * 255).round().astype(np.uint8)")
    if array.ndim == 2:
        return Image.fromarray(array, mode="L").convert("RGB")
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"array images must be [H, W, C] with 1, 3 or 4 channels, got {array.shape}")
    return Image.fromarray(array.squeeze(2) if array.shape[2] == 1 else array).convert("RGB")


def normalize_to_tensor(image: Image.Image | np.ndarray, mean, std, rescale: float = 1 / 255) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` → float32 ``[3, H, W]``: ``(x * rescale - mean) / std``."""
    array = np.asarray(image).astype(np.float32) * np.float32(rescale)
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
