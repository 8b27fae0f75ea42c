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

import functools
import math

import torch

from ..packing import PackedBatch, unpatchify
from .common import IMAGENET_MEAN, IMAGENET_STD, check_patch_size, to_rgb_uint8
from . import pixels as pixel_stage
from .pixels import Normalization, PixelBatch
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
    return pixel_stage.rescale_resize_normalize(pixels, size, IMAGENET_MEAN, IMAGENET_STD)


def preprocess_fixed(images, size: tuple[int, int] = DINOV3_IMAGE_SIZE, **settings) -> torch.Tensor:
    """The reference ``DINOv3ViTImageProcessor``: images (one or a sequence) → ``pixel_values [B, 3, *size]``
    (``settings`` as in ``dinov3_preprocess``)."""
    batch = DINOv3Processor(image_size=size, **settings)(images)
    return torch.cat(unpatchify(batch.patches, batch.grid_thw, DINOV3_PATCH_SIZE, "ppc"))


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
                      max_num_patches: int = DINOV3_MAX_NUM_PATCHES, **settings) -> list[torch.Tensor]:
    """Images (one or a sequence) → normalised items ``[3, H', W']`` at ``native_size`` (sides
    multiples of ``patch_size``; ``settings`` as in ``dinov3_preprocess``)."""
    batch = dinov3_preprocess(images, native=True, max_num_patches=max_num_patches, patch_size=patch_size,
                              **settings)
    return [item[0] for item in unpatchify(batch.patches, batch.grid_thw, patch_size, "ppc")]


def dinov3_preprocess(images, *, native: bool = False, max_num_patches: int | None = None,
                      patch_size: int = DINOV3_PATCH_SIZE, size: tuple[int, int] = DINOV3_IMAGE_SIZE,
                      **settings) -> PackedBatch:
    """Images → one ``PackedBatch`` of (p, p, C) patches for the DINOv3 model: ``DINOv3Processor``
    with these settings (``settings``: those every processor has, ``alpha``, ``max_pixels``,
    ``jpeg_draft``: ``Processor``).

    ``native=False`` (the published processor) resizes every image to ``size`` (224×224);
    ``native=True`` keeps each image's aspect ratio with at most ``max_num_patches`` patches
    (default 1024), which fixed-size processing refuses.
    """
    return DINOv3Processor(patch_size, image_size=size, native=native, **settings)(images,
                                                                                 max_num_patches=max_num_patches)


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
                 max_num_patches: int | None = None, native: bool | None = None, backend: str | None = None,
                 **settings):
        patch_size = check_patch_size(patch_size)
        self.image_size = _image_size(image_size, "image_size")
        if self.image_size[0] % patch_size or self.image_size[1] % patch_size or min(self.image_size) < patch_size:
            raise ValueError(f"image_size {self.image_size} must be positive multiples of the patch size {patch_size}")
        super().__init__(patch_size, max_num_patches=max_num_patches, native=native, backend=backend, **settings)

    def keeps_aspect_ratio(self, native: bool | None) -> bool:
        return bool(native)

    def fixed_size(self) -> str:
        height, width = self.image_size
        patches = (height // self.patch_size) * (width // self.patch_size)
        return f"resizes every image to {height}x{width} ({patches} patches)"

    def normalization(self, backend: str) -> Normalization:
        return Normalization(IMAGENET_MEAN, IMAGENET_STD, "rescale_resize")

    def target_size(self, height, width, native, max_num_patches) -> tuple[int, int]:
        if native:
            return native_size(height, width, self.patch_size, max_num_patches)
        return self.image_size

    def resize_items(self, images, videos, native, max_num_patches, backend) -> PixelBatch:
        """Images → their uint8 RGB pixels at their own size, flat, with their grids: the reference
        resizes after rescaling, in stage 2 (``packvit.preprocess.pixels``)."""
        target = functools.partial(self.target_size, native=native, max_num_patches=max_num_patches)
        sources = [self.rgb(image, backend, target).chw() for image in images]  # uint8 [3, H, W] each
        sizes = [tuple(source.shape[1:]) for source in sources]
        grids = [(1, *(side // self.patch_size for side in target(*size))) for size in sizes]
        flat = torch.empty(sum(source.numel() for source in sources), dtype=torch.uint8)
        start = 0
        for source in sources:  # [3, H, W] → flat, one after another
            flat[start : start + source.numel()].view(source.shape).copy_(source)
            start += source.numel()
        return self.pixel_batch(flat, torch.tensor(grids), backend, source_sizes=torch.tensor(sizes))

    def resize_device_images(self, images, native, max_num_patches, backend) -> PixelBatch:
        """uint8 ``[3, H, W]`` images on a device → their flat source pixels there: stage 2 rescales,
        resizes (its reference's ``F.interpolate``, on the device) and normalises them."""
        sizes = [tuple(image.shape[1:]) for image in images]
        grids = [(1, *(side // self.patch_size for side in self.target_size(*size, native, max_num_patches)))
                 for size in sizes]
        flat = torch.cat([image.reshape(-1) for image in images])  # [3, H, W] after one another
        return self.pixel_batch(flat, torch.tensor(grids), backend, source_sizes=torch.tensor(sizes))

    def device_grid(self, height: int, width: int) -> tuple[int, int, int]:
        keeps_aspect, cap, _ = self._options(None, None, None)
        return 1, *(side // self.patch_size for side in self.target_size(height, width, keeps_aspect, cap))

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
