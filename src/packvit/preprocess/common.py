"""Conversion and normalisation shared by the image processors."""

from __future__ import annotations

import math

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
    "PROCESSOR_BACKENDS",
    "check_backend",
    "fit_grid",
    "rescale_and_normalize",
    "to_rgb_uint8",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


#: how a reproduced processor resizes: like transformers' PIL backend or its torchvision backend
PROCESSOR_BACKENDS = ("pil", "torch")


def check_backend(backend: str) -> None:
    if backend not in PROCESSOR_BACKENDS:
        raise ValueError(f"processor backend must be one of {PROCESSOR_BACKENDS}, got {backend!r}")


def to_rgb_uint8(image, backend: str = "pil") -> torch.Tensor:
    """Any supported image → uint8 ``[3, H, W]``, converted to RGB the way the backend's processor does.

    Transparency is composited onto white: for PIL images with Pillow (both backends); for
    4-channel arrays with rounding (``"pil"``) or in float32 with torchvision's truncating
    ``to_dtype`` (``"torch"``). One channel is repeated three times.
    """
    check_backend(backend)
    if isinstance(image, Image.Image):
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image.convert("RGBA"))
        # [H, W, 3] → [3, H, W]
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
    if isinstance(image, torch.Tensor):
        if image.dim() != 3:
            raise ValueError(f"tensor images must be uint8 [C, H, W], got shape {tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(
            f"array and tensor images must be uint8, got {array.dtype}; convert with "
            f"(x * 255).round().astype(np.uint8) or pass a PIL image"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"array images must be [H, W] or [H, W, C] with 1, 3 or 4 channels, got {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4 and backend == "pil":
        alpha = array[..., 3:4] / 255
        array = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    elif array.shape[2] == 4:
        rgba = torch.from_numpy(np.ascontiguousarray(array)).float().mul_(1.0 / 255)
        rgb = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
        return rgb.mul(256.0 - 1e-3).to(torch.uint8).permute(2, 0, 1).contiguous()
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


def fit_grid(rows: float, cols: float, max_tokens: int) -> tuple[int, int]:
    """A (rows, columns) patch grid of about the given shape with at most ``max_tokens`` patches:
    scaled by ``sqrt(max_tokens / (rows * cols))``, floored (at least one patch per side), then
    shrunk along its longer side until it fits."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    scale = math.sqrt(max_tokens / (rows * cols))
    rows, cols = max(1, math.floor(rows * scale)), max(1, math.floor(cols * scale))
    while rows * cols > max_tokens:
        if rows >= cols:
            rows -= 1
        else:
            cols -= 1
    return rows, cols


def rescale_and_normalize(image: torch.Tensor, mean, std, backend: str, rescale_factor: float = 1 / 255) -> torch.Tensor:
    """uint8 ``[3, H, W]`` → float32 ``[3, H, W]``, ``(x * rescale_factor - mean) / std``, rounded
    as transformers' processors round it.

    ``"pil"``: rescale in float64, cast to float32, then normalise in float32. ``"torch"``:
    ``(x - mean / rescale_factor) / (std / rescale_factor)`` in float32.
    """
    check_backend(backend)
    if backend == "pil":
        rescaled = (image.cpu().numpy().astype(np.float64) * rescale_factor).astype(np.float32)
        mean32, std32 = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
        normalized = (rescaled - mean32[:, None, None]) / std32[:, None, None]
        return torch.from_numpy(np.ascontiguousarray(normalized))
    mean_scaled = torch.tensor(mean, device=image.device) * (1.0 / rescale_factor)
    std_scaled = torch.tensor(std, device=image.device) * (1.0 / rescale_factor)
    return (image.float() - mean_scaled[:, None, None]) / std_scaled[:, None, None]
