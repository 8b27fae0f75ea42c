"""The SigLIP2 NaFlex image processor, reproduced exactly, producing a packed batch directly.

Each image is resized, keeping its aspect ratio approximately, to the largest size whose sides are
multiples of the patch size and whose patch count fits ``max_num_patches`` (small images are
upscaled); then rescaled by 1/255, normalised with mean = std = 0.5 (pixels in [-1, 1]) and cut
into patches flattened as (row-in-patch, column-in-patch, channel). Nothing is padded: the result
is a ``PackedBatch`` of ``[total_patches, p*p*3]`` patches and ``grid_thw`` rows ``(1, h, w)``.

Two backends, matching transformers 5.23's two classes bit for bit:

- ``"torch"`` (the default, because ``Siglip2ImageProcessor`` and ``AutoImageProcessor`` give
  this backend to anyone with torchvision installed): resizes a uint8 tensor with
  ``torch.nn.functional.interpolate(bilinear, antialias=True)`` as torchvision does (natively in
  uint8 on CPUs with AVX2/AVX512 or arm64, else in float32 rounded back to uint8), then computes
  ``(x - 127.5) / 127.5`` in float32. Needs no torchvision; runs on any ``device`` given.
- ``"pil"``: ``Siglip2ImageProcessorPil``. Resizes with Pillow's bilinear filter, rescales in
  float64, casts to float32 and normalises in float32.

The two backends round their bilinear filters differently, so resized pixels can differ by one
uint8 level (1/127.5 after normalisation); pick the backend the pipeline you compare with used.

Inputs: one image or a sequence of images, of the types every processor takes
(``packvit.preprocess.common``: PIL images, uint8 arrays and tensors, paths opened upright by their
EXIF orientation). RGB images pass unchanged; others are converted to RGB as transformers does with
``do_convert_rgb=True`` (transparency composited onto white), where the reference processor, whose
default leaves ``do_convert_rgb`` unset, would reject them.

``Siglip2Processor`` is the family's processor for ``load_processor``: NaFlex whatever ``native``
says (the published processor keeps aspect ratios), at the checkpoint's ``max_num_patches``.
"""

from __future__ import annotations

import math
import platform

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..packing import PackedBatch, unpatchify
from .common import HALF_MEAN, HALF_STD, RGBPixels, check_backend, to_rgb_uint8
from .device import ResizePlan
from .pixels import Normalization, rescale_and_normalize
from .processor import PreprocessorSettings, Processor

__all__ = [
    "SIGLIP2_PATCH_SIZE",
    "SIGLIP2_MAX_NUM_PATCHES",
    "target_size_for_max_num_patches",
    "to_rgb_uint8",
    "siglip2_resize",
    "siglip2_normalize",
    "siglip2_images",
    "siglip2_preprocess",
    "Siglip2Processor",
]

SIGLIP2_PATCH_SIZE = 16
SIGLIP2_MAX_NUM_PATCHES = 256


def target_size_for_max_num_patches(
    height: int, width: int, patch_size: int = SIGLIP2_PATCH_SIZE, max_num_patches: int = SIGLIP2_MAX_NUM_PATCHES,
    eps: float = 1e-5,
) -> tuple[int, int]:
    """The (height, width) an image is resized to: the largest scale whose patch grid fits.

    A side scaled by ``s`` becomes ``max(p, ceil(side * s / p) * p)``; ``s`` is found by bisection
    on [eps / 10, 100] until the interval is narrower than ``eps``, keeping its lower end.
    """
    if max_num_patches < 1:
        raise ValueError(f"max_num_patches must be at least 1, got {max_num_patches}")

    def scaled(side: int, scale: float) -> int:
        return int(max(patch_size, math.ceil(side * scale / patch_size) * patch_size))

    low, high = eps / 10, 100.0
    while high - low >= eps:
        middle = (low + high) / 2
        num_patches = (scaled(height, middle) / patch_size) * (scaled(width, middle) / patch_size)
        if num_patches <= max_num_patches:
            low = middle
        else:
            high = middle
    return scaled(height, low), scaled(width, low)


def _native_uint8(device: torch.device) -> bool:
    """Whether torch (and so torchvision) resizes uint8 natively here: CPUs with AVX2/AVX512 or arm64."""
    return device.type == "cpu" and (
        torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")
    )


def siglip2_resize(image: torch.Tensor | RGBPixels, size: tuple[int, int], backend: str = "torch",
                   device=None) -> torch.Tensor:
    """Bilinear resize of uint8 ``[3, H, W]`` (or ``RGBPixels``) to uint8 ``[3, size[0], size[1]]``,
    as the backend's processor does it; ``device`` (``"torch"`` only) is where it runs."""
    check_backend(backend)
    rgb = image if isinstance(image, RGBPixels) else RGBPixels.from_chw(image)
    if backend == "pil":
        resized = rgb.pil().resize((size[1], size[0]), resample=Image.Resampling.BILINEAR)
        return torch.from_numpy(np.array(resized)).permute(2, 0, 1)  # [H', W', 3] → [3, H', W']
    if device is not None:
        rgb = RGBPixels(hwc=rgb.hwc().to(device))
    if tuple(size) == (rgb.height, rgb.width):
        return rgb.chw()
    native_uint8 = _native_uint8(rgb.hwc().device)
    batch = rgb.batch(padded=native_uint8)  # [1, 3 or 4, H, W]
    if not native_uint8:  # as torchvision converts: a contiguous float32 copy
        batch = batch.to(torch.float32, memory_format=torch.contiguous_format)
    # [1, C, H, W] → [1, C, H', W'], channel by channel
    resized = F.interpolate(batch, size=list(size), mode="bilinear", align_corners=False, antialias=True)
    if not native_uint8:
        resized = resized.round_().to(torch.uint8)
    return resized[0, :3]


def siglip2_normalize(image: torch.Tensor, backend: str = "torch", mean=HALF_MEAN, std=HALF_STD,
                      rescale_factor: float = 1 / 255) -> torch.Tensor:
    """``rescale_and_normalize`` with SigLIP2's mean and std (0.5) by default."""
    return rescale_and_normalize(image, mean, std, backend, rescale_factor)


def siglip2_images(images, max_num_patches: int = SIGLIP2_MAX_NUM_PATCHES, backend: str = "torch",
                   patch_size: int = SIGLIP2_PATCH_SIZE, device=None, **settings) -> list[torch.Tensor]:
    """Images (one or a sequence) → normalised float32 ``[3, H', W']`` tensors (sides multiples of
    ``patch_size``), as ``siglip2_preprocess`` computes them.

    ``device`` (``"torch"`` backend only) is where the resize and normalisation run; ``settings``
    are the settings every processor has (``alpha``, ``max_pixels``, ``jpeg_draft``: ``Processor``).
    """
    batch = siglip2_preprocess(images, max_num_patches, backend, patch_size, device, **settings)
    return [item[0] for item in unpatchify(batch.patches, batch.grid_thw, patch_size, "ppc")]


def siglip2_preprocess(images, max_num_patches: int = SIGLIP2_MAX_NUM_PATCHES, backend: str = "torch",
                       patch_size: int = SIGLIP2_PATCH_SIZE, device=None, **settings) -> PackedBatch:
    """Images → ``PackedBatch(patches [sum h*w, p*p*3] float32, grid_thw [num_images, 3])`` in the
    (p, p, C) layout: ``Siglip2Processor`` with these settings (``settings`` as in ``siglip2_images``).

    Item ``i``'s rows equal the first ``h_i * w_i`` rows of the reference processor's
    ``pixel_values[i]`` and its grid row is ``(1, *spatial_shapes[i])``.
    """
    return Siglip2Processor(patch_size, max_num_patches=max_num_patches, backend=backend, device=device,
                            **settings)(images)


class Siglip2Processor(Processor):
    """SigLIP2 NaFlex's processor: each image resized to ``target_size_for_max_num_patches`` at the
    checkpoint's ``max_num_patches`` (default 256), backend ``"torch"`` by default; ``native``
    changes nothing (NaFlex keeps aspect ratios)."""

    family = "siglip2"
    backends = ("torch", "pil")
    override_names = Processor.override_names + ("device",)
    override_note = " (NaFlex has no fixed image size: max_num_patches sets how large images become)"
    default_max_num_patches = SIGLIP2_MAX_NUM_PATCHES

    def __init__(self, patch_size: int = SIGLIP2_PATCH_SIZE, *, max_num_patches: int | None = None,
                 native: bool | None = None, backend: str | None = None, device=None, **settings):
        self.device = device
        super().__init__(patch_size, max_num_patches=max_num_patches, native=native, backend=backend, **settings)

    def keeps_aspect_ratio(self, native: bool | None) -> bool:
        return True

    def normalization(self, backend: str) -> Normalization:
        return Normalization(HALF_MEAN, HALF_STD, backend)

    def target_size(self, height, width, native, max_num_patches) -> tuple[int, int]:
        return target_size_for_max_num_patches(height, width, self.patch_size, max_num_patches)

    def resize_image(self, rgb, native, max_num_patches, backend) -> torch.Tensor:
        size = self.target_size(rgb.height, rgb.width, native, max_num_patches)
        return siglip2_resize(rgb, size, backend, self.device if backend == "torch" else None)

    def resize_plan(self, height, width, native, max_num_patches, backend) -> ResizePlan:
        return ResizePlan.whole(self.target_size(height, width, native, max_num_patches))

    def device_resample(self) -> str:
        return "bilinear"

    @classmethod
    def from_checkpoint(cls, config, fields: PreprocessorSettings, **overrides) -> "Siglip2Processor":
        fields.require_published(("Siglip2ImageProcessor", "Siglip2ImageProcessorFast", "Siglip2ImageProcessorPil"))
        fields.require("do_resize", True)
        fields.require("resample", 2)
        fields.require("image_mean", list(HALF_MEAN))
        fields.require("image_std", list(HALF_STD))
        patch_size = fields.take("patch_size", config.patch_size)
        if patch_size != config.patch_size:
            raise ValueError(
                f"{fields.source} has patch_size {patch_size} but the model's config.json has {config.patch_size}; "
                f"the two files disagree: fix the one that is wrong"
            )
        overrides.setdefault("max_num_patches", fields.take("max_num_patches"))
        return cls(config.patch_size, **overrides)
