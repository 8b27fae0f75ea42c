"""DINOv3 image preprocessing: the reference fixed-size processor, and native resolution.

Both modes run the reference's pipeline, in its order: uint8 RGB → float32 ``x * (1/255)`` →
bilinear resize with antialias (``align_corners=False``; skipped when the size does not change) →
``(x - mean) / std`` with the ImageNet mean and std. (transformers has DINOv3's processor with the
torchvision backend only, which this reproduces.)

- ``preprocess_fixed``: transformers' ``DINOv3ViTImageProcessor`` exactly, every image resized
  to 224×224 (aspect ratio not kept): ``pixel_values [B, 3, 224, 224]``, 196 patches per image.
- ``preprocess_native``: the aspect ratio kept, sides rounded to multiples of the patch size,
  scaled down only when an image exceeds a patch budget (``native_size``); items of different
  sizes, packed by ``dinov3_preprocess(native=True)`` into one ``PackedBatch``: how packed DINOv3
  is meant to run.

Inputs: one image or a sequence of images, of the types every processor takes
(``packvit.preprocess.common``: PIL images, uint8 arrays and tensors, paths opened upright by their
EXIF orientation). ``DINOv3Processor`` is the family's processor for ``load_processor``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..packing import PackedBatch, patchify
from .common import IMAGENET_MEAN, IMAGENET_STD, check_max_num_patches, image_list, to_rgb_uint8
from .processor import PreprocessorSettings, Processor

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
    "DINOv3Processor",
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


def preprocess_fixed(images, size: tuple[int, int] = DINOV3_IMAGE_SIZE) -> torch.Tensor:
    """The reference ``DINOv3ViTImageProcessor``: images (one or a sequence) → ``pixel_values [B, 3, *size]``."""
    return torch.cat([rescale_resize_normalize(image_to_uint8(image)[None], size) for image in image_list(images)])


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


def preprocess_native(images, patch_size: int = DINOV3_PATCH_SIZE,
                      max_num_patches: int = DINOV3_MAX_NUM_PATCHES) -> list[torch.Tensor]:
    """Images (one or a sequence) → normalised items ``[3, H', W']`` at ``native_size`` (sides
    multiples of ``patch_size``)."""
    items = []
    for image in image_list(images):
        pixels = image_to_uint8(image)
        size = native_size(pixels.shape[1], pixels.shape[2], patch_size, max_num_patches)
        items.append(rescale_resize_normalize(pixels[None], size)[0])
    return items


def dinov3_preprocess(images, *, native: bool = False, max_num_patches: int | None = None,
                      patch_size: int = DINOV3_PATCH_SIZE, size: tuple[int, int] = DINOV3_IMAGE_SIZE) -> PackedBatch:
    """Images → one ``PackedBatch`` of (p, p, C) patches for the DINOv3 model.

    ``native=False`` (the published processor) resizes every image to ``size`` (224×224);
    ``native=True`` keeps each image's aspect ratio with at most ``max_num_patches`` patches
    (default 1024), which fixed-size processing refuses.
    """
    if check_max_num_patches(max_num_patches) is not None and not native:
        raise ValueError(
            f"max_num_patches={max_num_patches} caps native resolution, but native=False resizes every image to "
            f"{size[0]}x{size[1]}; pass native=True with it"
        )
    if native:
        items = preprocess_native(images, patch_size, DINOV3_MAX_NUM_PATCHES if max_num_patches is None else max_num_patches)
    else:
        items = list(preprocess_fixed(images, size))
    patches, grid_thw = patchify(items, patch_size, layout="ppc")
    return PackedBatch(patches, grid_thw, "ppc")


def _image_size(value, source: str) -> tuple[int, int]:
    """A DINOv3 resize target: an int (square) or (height, width)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        return int(value["height"]), int(value["width"])
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(
        f"{source}: DINOv3's processor resizes to a fixed size, an int or (height, width) / "
        f"{{'height': ..., 'width': ...}}; got {value!r}"
    )


class DINOv3Processor(Processor):
    """DINOv3's processor: ``dinov3_preprocess``, the published 224×224 resize unless ``native``
    (then aspect ratios kept under ``max_num_patches``, default 1024). Backend ``"torch"`` only."""

    family = "dinov3"
    backends = ("torch",)
    backends_note = " (transformers has DINOv3's processor only with the torchvision backend)"
    default_max_num_patches = DINOV3_MAX_NUM_PATCHES
    override_names = Processor.override_names + ("image_size",)

    def __init__(self, patch_size: int = DINOV3_PATCH_SIZE, *, image_size=DINOV3_IMAGE_SIZE,
                 max_num_patches: int | None = None, native: bool | None = None, backend: str | None = None):
        self.image_size = _image_size(image_size, "image_size")
        if self.image_size[0] % patch_size or self.image_size[1] % patch_size or min(self.image_size) < patch_size:
            raise ValueError(f"image_size {self.image_size} must be positive multiples of the patch size {patch_size}")
        super().__init__(patch_size, max_num_patches=max_num_patches, native=native, backend=backend)

    def keeps_aspect_ratio(self, native: bool | None) -> bool:
        return bool(native)

    def fixed_size(self) -> str:
        height, width = self.image_size
        patches = (height // self.patch_size) * (width // self.patch_size)
        return f"resizes every image to {height}x{width} ({patches} patches)"

    def process(self, images, videos, native, max_num_patches, backend) -> PackedBatch:
        return dinov3_preprocess(images, native=native, max_num_patches=max_num_patches if native else None,
                                 patch_size=self.patch_size, size=self.image_size)

    @classmethod
    def from_checkpoint(cls, config, fields: PreprocessorSettings, **overrides) -> "DINOv3Processor":
        fields.require_published(("DINOv3ViTImageProcessor", "DINOv3ViTImageProcessorFast"))
        fields.require("do_resize", True)
        fields.require("resample", 2)
        fields.require("image_mean", list(IMAGENET_MEAN))
        fields.require("image_std", list(IMAGENET_STD))
        fields.require("do_center_crop", False)
        fields.require("default_to_square", True)
        size = fields.take("size", DINOV3_IMAGE_SIZE)
        overrides.setdefault("image_size", _image_size(size, f"{fields.source} size"))
        return cls(config.patch_size, **overrides)
