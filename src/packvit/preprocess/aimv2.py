"""AIMv2 image preprocessing: fixed-size (the CLIP processor) and native resolution, packed.

- Fixed-size checkpoints (224/336/448, -lit): ``CLIPImageProcessor`` with the shortest edge and the
  centre crop at the checkpoint's ``image_size``, bicubic, rescale 1/255, OpenAI CLIP mean/std;
  reproduced exactly by ``packvit.preprocess.clip`` (``backend="pil"``, the default, equals
  ``CLIPImageProcessorPil``; ``backend="torch"`` equals the torchvision-backend ``CLIPImageProcessor``).
- The native checkpoint: every image at its own size, aspect ratio kept. Without a token cap this
  is the reference: no resize, CLIP normalisation, and the bottom/right pixels that do not fill a
  whole 14-pixel patch dropped (exactly what the reference's patch convolution ignores). With
  ``max_tokens``, an image with more patches than that is first resized (bicubic, through the
  chosen backend) to the largest grid of at most ``max_tokens`` patches with about its aspect ratio:
  a packvit option beyond the reference.

``aimv2_preprocess`` returns a ``PackedBatch`` ready for ``AIMv2Packing``; ``aimv2_pixels`` returns
the normalised images ``[3, H, W]`` (sides multiples of 14) for the reference model.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..packing import PackedBatch, patchify
from .clip import CLIP_MEAN, CLIP_STD, clip_normalize, clip_preprocess, clip_resize, to_rgb_uint8
from .common import fit_grid

__all__ = ["AIMV2_PATCH_SIZE", "native_grid", "aimv2_pixels", "aimv2_preprocess"]

AIMV2_PATCH_SIZE = 14


def native_grid(height: int, width: int, patch_size: int = AIMV2_PATCH_SIZE, max_tokens: int | None = None) -> tuple[int, int]:
    """Patch grid (rows, columns) of an image at native resolution.

    ``(height // p, width // p)`` when that fits in ``max_tokens`` (or there is no cap); else the
    grid scaled by ``sqrt(max_tokens / tokens)``, floored, then shrunk along its longer side until
    it fits.
    """
    rows, cols = height // patch_size, width // patch_size
    if rows < 1 or cols < 1:
        raise ValueError(
            f"image of {height}x{width} pixels is smaller than one {patch_size}x{patch_size} patch; "
            f"AIMv2 needs at least {patch_size} pixels per side"
        )
    if max_tokens is None or rows * cols <= max_tokens:
        return rows, cols
    return fit_grid(height / patch_size, width / patch_size, max_tokens)


def _native_pixels(image, max_tokens: int | None, backend: str, resample, device) -> torch.Tensor:
    rgb = to_rgb_uint8(image, backend)  # uint8 [3, H, W]
    if device is not None and backend == "torch":
        rgb = rgb.to(device)
    height, width = rgb.shape[-2:]
    rows, cols = native_grid(height, width, AIMV2_PATCH_SIZE, max_tokens)
    if (rows, cols) != (height // AIMV2_PATCH_SIZE, width // AIMV2_PATCH_SIZE):
        rgb = clip_resize(rgb, (rows * AIMV2_PATCH_SIZE, cols * AIMV2_PATCH_SIZE), resample, backend)
    rgb = rgb[:, : rows * AIMV2_PATCH_SIZE, : cols * AIMV2_PATCH_SIZE]
    return clip_normalize(rgb, CLIP_MEAN, CLIP_STD, backend)


def aimv2_pixels(images: Sequence, image_size: int | None = 224, *, max_tokens: int | None = None,
                 backend: str = "pil", resample="bicubic", device=None) -> list[torch.Tensor]:
    """Images → normalised float32 ``[3, H, W]`` tensors with H and W multiples of 14.

    ``image_size``: the fixed-size checkpoint's resolution (224, 336, 448; shortest-edge resize and
    centre crop), or ``None`` for native resolution (``max_tokens`` caps the patches per image).
    ``backend``: ``"pil"`` (default, ``CLIPImageProcessorPil``) or ``"torch"`` (torchvision-backend
    ``CLIPImageProcessor``; ``device`` runs it on a GPU).
    """
    if isinstance(images, (Image.Image, np.ndarray)) or (isinstance(images, torch.Tensor) and images.dim() == 3):
        images = [images]
    if image_size is None:
        return [_native_pixels(image, max_tokens, backend, resample, device) for image in images]
    if max_tokens is not None:
        raise ValueError("max_tokens applies to native resolution only; pass image_size=None to use it")
    if image_size % AIMV2_PATCH_SIZE:
        raise ValueError(f"image_size must be a multiple of the patch size {AIMV2_PATCH_SIZE}, got {image_size}")
    return clip_preprocess(images, size=image_size, crop_size=image_size, resample=resample, backend=backend, device=device)


def aimv2_preprocess(images: Sequence, image_size: int | None = 224, *, max_tokens: int | None = None,
                     backend: str = "pil", resample="bicubic", device=None) -> PackedBatch:
    """Images → one ``PackedBatch``: patches ``[total, 14*14*3]`` in the (p, p, C) layout and
    ``grid_thw``. Arguments as in ``aimv2_pixels``."""
    pixels = aimv2_pixels(images, image_size, max_tokens=max_tokens, backend=backend, resample=resample, device=device)
    patches, grid_thw = patchify(pixels, AIMV2_PATCH_SIZE, layout="ppc")
    return PackedBatch(patches, grid_thw)
