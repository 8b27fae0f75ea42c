"""The CLIP image processor (transformers' ``CLIPImageProcessor``), reproduced exactly.

Shortest-edge resize, centre crop, rescale by 1/255 and CLIP normalisation, as AIMv2 and the
OneVision Encoder use it. Two backends, matching transformers 5.23's two classes bit for bit:

- ``"pil"`` (the default): ``CLIPImageProcessorPil``. Resizes with Pillow, rescales in float64
  then casts to float32, normalises in float32. Needs nothing beyond Pillow and NumPy.
- ``"torch"``: ``CLIPImageProcessor`` (the torchvision backend). Resizes a uint8 tensor with
  ``torch.nn.functional.interpolate(antialias=True)`` as torchvision does, and normalises with the
  rescale folded into mean and std. Runs on any device given; needs no torchvision.

The two backends differ by a few uint8 levels after the resize (different bicubic kernels), so
pick the one the reference pipeline used.

Inputs: PIL images (any mode; transparency is composited onto white), uint8 NumPy arrays
``[H, W]`` or ``[H, W, C]`` with 1, 3 or 4 channels, or uint8 tensors ``[C, H, W]``.
"""

from __future__ import annotations

import platform
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .common import CLIP_MEAN, CLIP_STD, check_backend, rescale_and_normalize, to_rgb_uint8

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIP_RESAMPLE",
    "to_rgb_uint8",
    "shortest_edge_size",
    "clip_resize",
    "clip_center_crop",
    "clip_normalize",
    "clip_resize_center_crop",
    "clip_preprocess",
]

#: resampling filters by name, with their Pillow codes (transformers' ``resample`` values)
CLIP_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}



def _resample_name(resample) -> str:
    """``"bicubic"``/``"bilinear"`` or a Pillow code (3, 2) → the filter's name."""
    for name, code in CLIP_RESAMPLE.items():
        if resample == name or resample == int(code):
            return name
    raise ValueError(
        f"unsupported resample {resample!r}; the CLIP processor reproduction supports "
        f"{sorted(CLIP_RESAMPLE)} (or their Pillow codes 3 and 2)"
    )


def _pair(size, what: str) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict) and {"height", "width"} <= size.keys():
        return int(size["height"]), int(size["width"])
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]), int(size[1])
    raise ValueError(f"{what} must be an int, a (height, width) pair or {{'height', 'width'}}, got {size!r}")


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to ``shortest_edge``; the longer side is
    ``int(shortest_edge * long / short)`` (truncated), as in transformers."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def clip_resize(image: torch.Tensor, size, resample="bicubic", backend: str = "pil") -> torch.Tensor:
    """uint8 ``[3, H, W]`` → uint8 ``[3, H', W']``.

    ``size``: an int resizes the shortest edge to it (aspect ratio kept); a (height, width) pair
    resizes to exactly that size.
    """
    check_backend(backend)
    name = _resample_name(resample)
    height, width = image.shape[-2:]
    new_size = shortest_edge_size(height, width, size) if isinstance(size, int) else _pair(size, "size")
    if backend == "pil":
        pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
        resized = pil.resize((new_size[1], new_size[0]), resample=CLIP_RESAMPLE[name])
        return torch.from_numpy(np.array(resized)).permute(2, 0, 1).contiguous()
    if tuple(new_size) == (height, width):
        return image
    # torchvision resizes uint8 natively on the CPU (bicubic always, bilinear with AVX2/AVX512/arm64);
    # otherwise in float32, then clamps (bicubic) and rounds back to uint8.
    native = image.device.type == "cpu" and (
        name == "bicubic" or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        or platform.machine() in ("aarch64", "arm64")
    )
    batch = image.unsqueeze(0) if native else image.unsqueeze(0).float()
    # [1, 3, H, W] → [1, 3, H', W']
    resized = F.interpolate(batch, size=list(new_size), mode=name, align_corners=False, antialias=True)
    if not native:
        if name == "bicubic":
            resized = resized.clamp_(0, 255)
        resized = resized.round_().to(torch.uint8)
    return resized[0]


def clip_center_crop(image: torch.Tensor, crop_size, backend: str = "pil") -> torch.Tensor:
    """Centre crop ``[C, H, W]`` → ``[C, crop_h, crop_w]``, zero-padding an image smaller than the
    crop the way each backend's processor does."""
    check_backend(backend)
    crop_h, crop_w = _pair(crop_size, "crop_size")
    height, width = image.shape[-2:]
    if backend == "pil":
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        if top >= 0 and left >= 0:
            return image[..., top : top + crop_h, left : left + crop_w]
        new_h, new_w = max(crop_h, height), max(crop_w, width)
        pad_top, pad_left = -(-(new_h - height) // 2), -(-(new_w - width) // 2)
        canvas = image.new_zeros((*image.shape[:-2], new_h, new_w))
        canvas[..., pad_top : pad_top + height, pad_left : pad_left + width] = image
        top, left = top + pad_top, left + pad_left
        return canvas[..., max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]
    if crop_w > width or crop_h > height:
        pad_left = (crop_w - width) // 2 if crop_w > width else 0
        pad_top = (crop_h - height) // 2 if crop_h > height else 0
        pad_right = (crop_w - width + 1) // 2 if crop_w > width else 0
        pad_bottom = (crop_h - height + 1) // 2 if crop_h > height else 0
        image = F.pad(image, (pad_left, pad_right, pad_top, pad_bottom), value=0)
        height, width = image.shape[-2:]
    top, left = int((height - crop_h) / 2.0), int((width - crop_w) / 2.0)
    return image[..., top : top + crop_h, left : left + crop_w]


def clip_normalize(image: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD, backend: str = "pil",
                   rescale_factor: float = 1 / 255) -> torch.Tensor:
    """``rescale_and_normalize`` with CLIP's mean and std by default."""
    return rescale_and_normalize(image, mean, std, backend, rescale_factor)


def clip_resize_center_crop(image, size=224, crop_size=224, resample="bicubic", backend: str = "pil",
                            device=None) -> torch.Tensor:
    """One image → uint8 ``[3, crop_h, crop_w]``: RGB conversion, shortest-edge resize, centre crop.

    ``size`` and ``crop_size`` as in ``clip_preprocess``; ``device`` (``"torch"`` backend only)
    is where the resize runs.
    """
    rgb = to_rgb_uint8(image, backend)
    if device is not None and backend == "torch":
        rgb = rgb.to(device)
    if size is not None:
        rgb = clip_resize(rgb, size, resample, backend)
    if crop_size is not None:
        rgb = clip_center_crop(rgb, crop_size, backend)
    return rgb


def clip_preprocess(images: Sequence, size=224, crop_size=224, resample="bicubic", mean=CLIP_MEAN,
                    std=CLIP_STD, backend: str = "pil", device=None) -> list[torch.Tensor]:
    """Images → list of float32 ``[3, crop_h, crop_w]`` tensors, equal to ``CLIPImageProcessorPil``
    (``backend="pil"``, the default) or ``CLIPImageProcessor`` (``backend="torch"``).

    ``size``: shortest edge (int) or exact (height, width), ``None`` for no resize; ``crop_size``:
    int or (height, width), ``None`` for no crop. ``resample``: ``"bicubic"`` (CLIP's) or
    ``"bilinear"``. A single image may be passed without a list.
    """
    if isinstance(images, (Image.Image, np.ndarray)) or (isinstance(images, torch.Tensor) and images.dim() == 3):
        images = [images]
    return [
        clip_normalize(clip_resize_center_crop(image, size, crop_size, resample, backend, device), mean, std, backend)
        for image in images
    ]
