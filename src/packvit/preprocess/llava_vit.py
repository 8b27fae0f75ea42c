"""OneVision Encoder preprocessing, producing packed input directly.

- **Images, published processor**: ``CLIPImageProcessor`` with shortest edge 448, centre crop 448,
  bicubic, rescale 1/255 and OpenAI CLIP mean/std (``packvit.preprocess.clip``; ``backend="pil"``
  equals ``CLIPImageProcessorPil``, ``"torch"`` the torchvision-backend class).
- **Images, native resolution**: each image resized (bicubic, aspect ratio kept) to the nearest
  grid of whole 14-pixel patches, scaled down to at most ``max_tokens`` patches; no crop.
- **Video frames**: every frame through the CLIP processor at 224 (16 x 16 patches), each frame
  placed on the 64-slot timeline the model was trained with (``timeline_slots``).

``pack_items`` turns normalised items into one ``PackedBatch``: patches ``[total, 3*14*14]`` in the
(C, p, p) layout, ``grid_thw`` and ``patch_positions [total, 3]`` (t, row, column).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..models.llava_vit import timeline_positions, timeline_slots
from ..packing import PackedBatch, patchify
from .clip import CLIP_MEAN, CLIP_STD, clip_normalize, clip_preprocess, clip_resize, to_rgb_uint8
from .common import fit_grid

__all__ = [
    "LLAVA_VIT_PATCH_SIZE",
    "LLAVA_VIT_IMAGE_SIZE",
    "LLAVA_VIT_FRAME_SIZE",
    "native_grid",
    "preprocess_images",
    "preprocess_native",
    "preprocess_video",
    "pack_items",
    "llava_vit_preprocess",
]

LLAVA_VIT_PATCH_SIZE = 14
LLAVA_VIT_IMAGE_SIZE = 448
LLAVA_VIT_FRAME_SIZE = 224


def _as_list(images) -> list:
    if isinstance(images, (Image.Image, np.ndarray)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
        return [images]
    if isinstance(images, torch.Tensor) and images.dim() == 3:
        return [images]
    return list(images)


def preprocess_images(images: Sequence, size: int = LLAVA_VIT_IMAGE_SIZE, backend: str = "pil",
                      device=None) -> list[torch.Tensor]:
    """The published processor: images → float32 ``[3, size, size]`` (shortest edge and centre crop
    at ``size``, bicubic, CLIP mean/std)."""
    if size % LLAVA_VIT_PATCH_SIZE:
        raise ValueError(f"size must be a multiple of the patch size {LLAVA_VIT_PATCH_SIZE}, got {size}")
    return clip_preprocess(_as_list(images), size=size, crop_size=size, resample="bicubic", backend=backend, device=device)


def native_grid(height: int, width: int, patch_size: int = LLAVA_VIT_PATCH_SIZE, max_tokens: int | None = 1024) -> tuple[int, int]:
    """Patch grid (rows, columns) of an image at native resolution.

    Each side rounded to the nearest whole number of patches (at least one); when that exceeds
    ``max_tokens``, the grid scaled by ``sqrt(max_tokens / tokens)`` and floored (at least one
    patch per side), then shrunk along its longer side until it fits.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    rows, cols = max(1, round(height / patch_size)), max(1, round(width / patch_size))
    if max_tokens is None or rows * cols <= max_tokens:
        return rows, cols
    return fit_grid(rows, cols, max_tokens)


def preprocess_native(images: Sequence, max_tokens: int | None = 1024, backend: str = "pil", resample="bicubic",
                      device=None) -> list[torch.Tensor]:
    """Images at native resolution → float32 ``[3, 14 rows, 14 cols]`` with ``native_grid``'s grid.

    An image already a whole number of patches per side (within the cap) is not resampled.
    ``max_tokens`` defaults to 1024, the pre-training token count (448 x 448).
    """
    pixels = []
    for image in _as_list(images):
        rgb = to_rgb_uint8(image, backend)  # uint8 [3, H, W]
        if device is not None and backend == "torch":
            rgb = rgb.to(device)
        height, width = rgb.shape[-2:]
        rows, cols = native_grid(height, width, LLAVA_VIT_PATCH_SIZE, max_tokens)
        target = (rows * LLAVA_VIT_PATCH_SIZE, cols * LLAVA_VIT_PATCH_SIZE)
        if target != (height, width):
            rgb = clip_resize(rgb, target, resample, backend)
        pixels.append(clip_normalize(rgb, CLIP_MEAN, CLIP_STD, backend))
    return pixels


def preprocess_video(frames: Sequence, frame_indices: Sequence[int] | None = None, total_frames: int | None = None,
                     size: int = LLAVA_VIT_FRAME_SIZE, num_slots: int = 64, backend: str = "pil",
                     device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled video frames → ``(pixels [T, 3, size, size], slots [T])``.

    ``frame_indices`` are the frames' indices in the source video of ``total_frames`` frames; each
    frame goes to slot ``round(index / (total_frames - 1) * (num_slots - 1))`` of the timeline.
    Without them the frames are taken as sampled uniformly from first to last, i.e. indices
    ``0 .. T-1`` of a ``T``-frame video. ``frames``: a sequence of images or a uint8 array
    ``[T, H, W, C]``.
    """
    frames = list(frames)
    if not frames:
        raise ValueError("a video needs at least one frame")
    if frame_indices is None:
        if total_frames is not None:
            raise ValueError("total_frames needs frame_indices: pass the index of every sampled frame")
        frame_indices, total_frames = range(len(frames)), len(frames)
    elif total_frames is None:
        raise ValueError("frame_indices need total_frames, the length of the source video")
    slots = timeline_slots(frame_indices, total_frames, num_slots)
    if slots.numel() != len(frames):
        raise ValueError(f"got {slots.numel()} frame indices for {len(frames)} frames")
    pixels = torch.stack(preprocess_images(frames, size=size, backend=backend, device=device))
    return pixels, slots


def pack_items(items: Sequence[torch.Tensor], slots: Sequence[torch.Tensor | None] | None = None,
               patch_size: int = LLAVA_VIT_PATCH_SIZE) -> PackedBatch:
    """Normalised images ``[3, H, W]`` and videos ``[T, 3, H, W]``, in any order, → one ``PackedBatch``.

    ``slots[i]`` gives the timeline slot of each frame of video ``i`` (``None``: frame j at t = j;
    images sit at t = 0). The batch carries ``patch_positions`` ``[total, 3]``.
    """
    items = list(items)
    slots = [None] * len(items) if slots is None else list(slots)
    if len(slots) != len(items):
        raise ValueError(f"got {len(slots)} slot entries for {len(items)} items; pass None for images")
    patches, grid_thw = patchify(items, patch_size, layout="cpp")
    positions = []
    for (frames, rows, cols), item_slots in zip(grid_thw.tolist(), slots):
        item_slots = torch.arange(frames) if item_slots is None else torch.as_tensor(item_slots).reshape(-1)
        if item_slots.numel() != frames:
            raise ValueError(f"an item of {frames} frames got {item_slots.numel()} timeline slots")
        positions.append(timeline_positions(item_slots, rows, cols))
    return PackedBatch(patches, grid_thw, "cpp", torch.cat(positions))


def llava_vit_preprocess(images: Sequence = (), videos: Sequence = (), *, native: bool = False,
                         max_tokens: int | None = 1024, backend: str = "pil", device=None) -> PackedBatch:
    """Images (published processor, or ``native`` resolution) then videos (each a sequence of
    uniformly sampled frames, at 224 on the 64-slot timeline) → one ``PackedBatch`` for
    ``LlavaViTPackingModel(batch.patches, batch.grid_thw, patch_positions=batch.patch_positions)``."""
    images = _as_list(images)
    if native:
        pixels = preprocess_native(images, max_tokens=max_tokens, backend=backend, device=device)
    else:
        pixels = preprocess_images(images, backend=backend, device=device) if images else []
    clips = [preprocess_video(frames, backend=backend, device=device) for frames in videos]
    if not pixels and not clips:
        raise ValueError("nothing to preprocess: pass images and/or videos")
    items = list(pixels) + [clip for clip, _ in clips]
    slots = [None] * len(pixels) + [clip_slots for _, clip_slots in clips]
    return pack_items(items, slots)
