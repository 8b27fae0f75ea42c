"""A processor's two stages: uint8 pixels (``PixelBatch``), then normalised patches (``PackedBatch``).

``Processor.resize(images)`` (stage 1, where the images are decoded: a CPU worker) converts,
resizes, crops and patchifies in uint8 and returns a ``PixelBatch``: the patches as uint8
``[total_patches, patch_dim]``, a quarter of float32's bytes, with the grid, the layout and how to
normalise them. ``Processor.normalize(pixels, device=, dtype=)`` (stage 2, anywhere: the GPU of the
main process) rescales and normalises them to floating point: bit for bit what ``processor(images)``
gives, with one float conversion of the uint8 patches and the backend's own float32 arithmetic
(``normalize_patches``), on whatever device the patches are.

DINOv3's reference rescales to float *before* it resizes, so no uint8 stage can hold its resized
pixels: its ``PixelBatch`` holds each image's uint8 RGB pixels at their own size (``[3, H, W]``
after one another in one buffer, with ``source_sizes``), and stage 2 rescales, resizes, normalises
and patchifies them, the expensive float work moved with it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..packing import BatchOrigin, PackedBatch, item_token_counts, patchify, to_device, validate_grid_thw
from .common import PROCESSOR_BACKENDS, check_backend

__all__ = ["Normalization", "PixelBatch", "normalize_patches", "rescale_and_normalize", "rescale_resize_normalize"]

#: what ``Normalization.rounding`` may be: a backend's rounding, or DINOv3's resize of rescaled floats
ROUNDINGS = PROCESSOR_BACKENDS + ("rescale_resize",)


@dataclass(frozen=True)
class Normalization:
    """How uint8 pixels become a model's input: ``(x * rescale_factor - mean) / std`` per channel.

    ``rounding``: ``"pil"`` or ``"torch"``, as that backend rounds (``normalize_patches``);
    ``"rescale_resize"``: DINOv3's reference order, ``x * rescale_factor`` in float32, then a
    bilinear antialiased resize (``torch.nn.functional.interpolate``), then ``(x - mean) / std``.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    rounding: str
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"normalisation rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.rounding == "pil" and not _exact_in_float32(self.rescale_factor):
            raise ValueError(
                f"rescale_factor {self.rescale_factor!r} has no exact float32 form of the PIL backend's float64 "
                f"rescale; the reproduced processors rescale by 1/255"
            )


@functools.lru_cache(maxsize=None)
def _exact_in_float32(rescale_factor: float) -> bool:
    """Whether every uint8 value rescaled as the PIL backend does (in float64, then cast) equals it
    divided by ``1 / rescale_factor`` in float32."""
    rescaled = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    return bool(np.array_equal(rescaled, np.arange(256, dtype=np.float32) / np.float32(1 / rescale_factor)))


def _column_channels(patch_dim: int, patch_layout: str) -> torch.Tensor:
    """The channel of every column of a patch ``[patch_dim]``: (p, p, C) or (C, p, p)."""
    columns = torch.arange(patch_dim)
    return columns % 3 if patch_layout == "ppc" else columns // (patch_dim // 3)


def rescale_and_normalize(image: torch.Tensor, mean, std, backend: str, rescale_factor: float = 1 / 255) -> torch.Tensor:
    """uint8 ``[3, H, W]`` → float32 ``[3, H, W]``, ``(x * rescale_factor - mean) / std``, rounded
    as transformers' processors round it (``normalize_patches`` on the image's pixels).

    ``"pil"``: rescale in float64, cast to float32, then normalise in float32. ``"torch"``:
    ``(x - mean / rescale_factor) / (std / rescale_factor)`` in float32.
    """
    check_backend(backend)
    pixels = image.permute(1, 2, 0).reshape(-1, 3)  # [3, H, W] → [H * W, 3]: one-pixel patches
    normalized = normalize_patches(pixels, Normalization(tuple(mean), tuple(std), backend, rescale_factor), "ppc")
    return normalized.view(*image.shape[1:], 3).permute(2, 0, 1).contiguous()  # [H * W, 3] → [3, H, W]


def normalize_patches(patches: torch.Tensor, normalization: Normalization, patch_layout: str,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 patches ``[N, patch_dim]`` → normalised ``[N, patch_dim]`` in ``dtype``, on their
    device: ``(x * rescale_factor - mean) / std`` in the float32 arithmetic of transformers' two
    backends, each channel's mean and std broadcast along the columns that hold it. "pil":
    the rescale in float64 cast to float32 (equal to float32 division by ``1 / rescale_factor``
    for every uint8 value, ``Normalization`` checks), then ``(x - mean) / std``; "torch":
    ``(x - mean / rescale_factor) / (std / rescale_factor)``."""
    norm = normalization
    channels = _column_channels(patches.shape[1], patch_layout)
    mean, std = (torch.tensor(values, dtype=torch.float32) for values in (norm.mean, norm.std))
    if norm.rounding == "pil":  # (x / (1 / rescale_factor) - mean) / std
        divisor, subtrahend = torch.tensor(1 / norm.rescale_factor, dtype=torch.float32).expand(len(channels)), mean
    else:  # (x - mean / rescale_factor) / (std / rescale_factor)
        divisor, subtrahend, std = None, mean * (1.0 / norm.rescale_factor), std * (1.0 / norm.rescale_factor)
    # the per-column constants [3 or 2, patch_dim] travel in one non-blocking copy
    constants = to_device(torch.stack([c for c in (divisor, subtrahend[channels], std[channels]) if c is not None]),
                          patches.device)
    x = patches.to(torch.float32)  # [N, patch_dim]
    if divisor is not None:
        x.div_(constants[0])
    return x.sub_(constants[-2]).div_(constants[-1]).to(dtype)


@dataclass
class PixelBatch:
    """Stage 1's output (module docstring): a batch's uint8 pixels and how to normalise them.

    ``pixels``: uint8 ``[total_patches, patch_dim]`` patches in ``patch_layout``; or, where
    ``source_sizes [num_items, 2]`` is given (DINOv3), every item's uint8 RGB ``[3, H, W]`` pixels
    after one another, flat, to be resized to its grid in stage 2. ``grid_thw``, ``patch_layout``
    and ``patch_positions`` are the ``PackedBatch``'s to be; ``origin`` is the processor's.
    """

    pixels: torch.Tensor
    grid_thw: torch.Tensor
    patch_size: int
    patch_layout: str
    normalization: Normalization
    origin: BatchOrigin
    patch_positions: torch.Tensor | None = None
    source_sizes: torch.Tensor | None = None

    def __post_init__(self):
        self.grid_thw = validate_grid_thw(self.grid_thw)
        if self.pixels.dtype != torch.uint8:
            raise ValueError(f"a PixelBatch holds uint8 pixels, got {self.pixels.dtype}")
        if self.source_sizes is None:
            expected = (int(self.grid_thw.prod(dim=1).sum()), 3 * self.patch_size**2)
            if tuple(self.pixels.shape) != expected:
                raise ValueError(f"pixels of shape {tuple(self.pixels.shape)} do not match the grid's {expected}")
        elif self.source_sizes.shape != (self.num_items, 2) or self.pixels.dim() != 1 or (
                self.pixels.numel() != 3 * int(self.source_sizes.prod(dim=1).sum())):
            raise ValueError("flat source pixels must hold [3, H, W] for every row of source_sizes [num_items, 2]")

    @property
    def num_items(self) -> int:
        return self.grid_thw.shape[0]

    @property
    def token_counts(self) -> list[int]:
        return item_token_counts(self.grid_thw)

    def _replace(self, pixels: torch.Tensor) -> "PixelBatch":
        return PixelBatch(pixels, self.grid_thw, self.patch_size, self.patch_layout, self.normalization, self.origin,
                          self.patch_positions, self.source_sizes)

    def to(self, device) -> "PixelBatch":
        """The pixels on ``device`` (one non-blocking copy); the grid stays host metadata."""
        return self._replace(self.pixels.to(device, non_blocking=True))

    def pin_memory(self) -> "PixelBatch":
        return self._replace(self.pixels.pin_memory())

    @classmethod
    def concat(cls, batches: Sequence["PixelBatch"]) -> "PixelBatch":
        """Joins pixel batches of one processor into one, item order kept."""
        first = batches[0]
        for other in batches[1:]:
            if (other.normalization, other.origin, other.patch_size, other.patch_layout) != (
                    first.normalization, first.origin, first.patch_size, first.patch_layout) or (
                    (other.source_sizes is None) != (first.source_sizes is None)):
                raise ValueError("PixelBatch.concat joins batches of one processor and backend only")
        positions = [batch.patch_positions for batch in batches]
        return cls(torch.cat([batch.pixels for batch in batches]), torch.cat([batch.grid_thw for batch in batches]),
                   first.patch_size, first.patch_layout, first.normalization, first.origin,
                   None if positions[0] is None else torch.cat(positions),
                   None if first.source_sizes is None else torch.cat([batch.source_sizes for batch in batches]))

    def normalize(self, device=None, dtype: torch.dtype | None = None) -> PackedBatch:
        """Stage 2: the normalised ``PackedBatch``, its patches on ``device`` (default: the
        pixels') in ``dtype`` (default float32; another dtype is float32's values cast)."""
        pixels = self.pixels if device is None else self.pixels.to(device, non_blocking=True)
        dtype = torch.float32 if dtype is None else dtype
        if self.source_sizes is None:
            patches = normalize_patches(pixels, self.normalization, self.patch_layout, dtype)
        else:
            patches = self._rescale_resize_normalize(pixels).to(dtype)
        return PackedBatch(patches, self.grid_thw, self.patch_layout, self.patch_positions, self.origin)

    def _rescale_resize_normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Flat source pixels → float32 patches ``[total_patches, patch_dim]`` (DINOv3's order)."""
        norm, p = self.normalization, self.patch_size
        items, start = [], 0
        for (height, width), (_, rows, cols) in zip(self.source_sizes.tolist(), self.grid_thw.tolist()):
            image = pixels[start : start + height * width * 3].view(1, 3, height, width)  # [3 * H * W] → [1, 3, H, W]
            start += height * width * 3
            items.append(rescale_resize_normalize(image, (rows * p, cols * p), norm.mean, norm.std,
                                                  norm.rescale_factor)[0])
        return patchify(items, p, self.patch_layout)[0]


def rescale_resize_normalize(pixels: torch.Tensor, size: tuple[int, int], mean, std,
                             rescale_factor: float = 1 / 255) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` → float32 ``[B, 3, size[0], size[1]]``: ``x * rescale_factor``, the
    bilinear antialiased resize (none where the size is kept), then ``(x - mean) / std``, in
    float32 on the pixels' device (DINOv3's reference order)."""
    x = pixels.to(torch.float32, memory_format=torch.contiguous_format) * rescale_factor  # contiguous, as the reference's
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=list(size), mode="bilinear", align_corners=False, antialias=True)
    mean, std = to_device(torch.tensor([mean, std], dtype=torch.float32), x.device)[..., None, None]  # [3, 1, 1] each
    return (x - mean) / std
