"""AIMv2 image preprocessing: fixed-size (the CLIP processor) and native resolution, packed.

- Fixed-size checkpoints (224/336/448, -lit): ``CLIPImageProcessor`` with the shortest edge and the
  centre crop at the checkpoint's ``image_size``, bicubic, rescale 1/255, OpenAI CLIP mean/std;
  reproduced exactly by ``packvit.preprocess.clip`` (``backend="pil"``, the default, equals
  ``CLIPImageProcessorPil``; ``backend="torch"`` equals the torchvision-backend ``CLIPImageProcessor``).
  Their learned position table serves only its own grid, so they take no native resolution.
- The native checkpoint (``native=True``): every image at its own size, aspect ratio kept. Without a
  cap this is the reference: no resize, CLIP normalisation, and the bottom/right pixels that do not
  fill a whole 14-pixel patch dropped (exactly what the reference's patch convolution ignores,
  ``floor_patch_grid``). With ``max_num_patches``, an image with more patches than that is first
  resized (bicubic, through the chosen backend) to the largest grid of at most that many patches
  with about its aspect ratio: a packvit option beyond the reference.

Inputs: one image or a sequence of images, of the types every processor takes
(``packvit.preprocess.common``: PIL images, uint8 arrays and tensors, paths opened upright by their
EXIF orientation).

``aimv2_preprocess`` returns a ``PackedBatch`` in the (p, p, C) layout; ``aimv2_pixels`` returns
the normalised images ``[3, H, W]`` (sides multiples of 14) for the reference model.
``AIMv2Processor`` is the family's processor for ``load_processor``.
"""

from __future__ import annotations

import torch

from ..packing import PackedBatch, unpatchify
from .clip import (
    CLIP_MEAN,
    CLIP_STD,
    clip_resize,
    clip_resize_center_crop,
    clip_resize_plan,
    clip_target_size,
    resample_name,
    settings_from_clip_fields,
)
from .common import RGBPixels, check_native, check_patch_size, fit_grid
from .device import ResizePlan
from .pixels import Normalization
from .processor import PreprocessorSettings, Processor

__all__ = ["AIMV2_PATCH_SIZE", "floor_patch_grid", "aimv2_pixels", "aimv2_preprocess", "AIMv2Processor"]

AIMV2_PATCH_SIZE = 14

#: ``size``/``crop_size`` of ``AIMv2Processor`` taken from its ``image_size`` (fixed-size) or none (native)
_FROM_IMAGE_SIZE = object()


def floor_patch_grid(height: int, width: int, patch_size: int = AIMV2_PATCH_SIZE,
                     max_num_patches: int | None = None) -> tuple[int, int]:
    """Patch grid (rows, columns) of an image at native resolution, counting whole patches only.

    ``(height // p, width // p)`` (the remainder pixels dropped) when that fits in
    ``max_num_patches`` (or there is no cap); else the grid scaled by
    ``sqrt(max_num_patches / patches)``, floored, then shrunk along its longer side until it fits.
    """
    rows, cols = height // patch_size, width // patch_size
    if rows < 1 or cols < 1:
        raise ValueError(
            f"image of {height}x{width} pixels is smaller than one {patch_size}x{patch_size} patch; "
            f"AIMv2 needs at least {patch_size} pixels per side"
        )
    if max_num_patches is None or rows * cols <= max_num_patches:
        return rows, cols
    return fit_grid(height / patch_size, width / patch_size, max_num_patches)


def _native_pixels(rgb: RGBPixels, max_num_patches: int | None, backend: str, resample, device,
                   patch_size: int = AIMV2_PATCH_SIZE) -> torch.Tensor:
    """An image at native resolution → uint8 ``[3, 14 rows, 14 cols]`` (``floor_patch_grid``)."""
    if device is not None and backend == "torch":
        rgb = RGBPixels(hwc=rgb.hwc().to(device))
    rows, cols = floor_patch_grid(rgb.height, rgb.width, patch_size, max_num_patches)
    if (rows, cols) != (rgb.height // patch_size, rgb.width // patch_size):
        return clip_resize(rgb, (rows * patch_size, cols * patch_size), resample, backend)
    return rgb.chw()[:, : rows * patch_size, : cols * patch_size]


def aimv2_pixels(images, image_size: int = 224, *, native: bool = False, max_num_patches: int | None = None,
                 backend: str = "pil", resample="bicubic", device=None, **settings) -> list[torch.Tensor]:
    """Images (one or a sequence) → normalised float32 ``[3, H, W]`` tensors with H and W multiples of 14,
    as ``aimv2_preprocess`` computes them.

    ``native=False``: the fixed-size checkpoint's processor at ``image_size`` (224, 336, 448;
    shortest-edge resize and centre crop). ``native=True``: native resolution, ``max_num_patches``
    capping the patches per image (``None``: no cap, the native checkpoint's reference).
    ``backend``: ``"pil"`` (default, ``CLIPImageProcessorPil``) or ``"torch"`` (torchvision-backend
    ``CLIPImageProcessor``; ``device`` runs it on a GPU). ``settings``: those every processor has
    (``alpha``, ``max_pixels``, ``jpeg_draft``: ``Processor``).
    """
    batch = aimv2_preprocess(images, image_size, native=native, max_num_patches=max_num_patches, backend=backend,
                             resample=resample, device=device, **settings)
    return [item[0] for item in unpatchify(batch.patches, batch.grid_thw, AIMV2_PATCH_SIZE, "ppc")]


def aimv2_preprocess(images, image_size: int = 224, *, native: bool = False, max_num_patches: int | None = None,
                     backend: str = "pil", resample="bicubic", device=None, **settings) -> PackedBatch:
    """Images → one ``PackedBatch``: patches ``[total, 14*14*3]`` in the (p, p, C) layout and
    ``grid_thw``: ``AIMv2Processor`` of a native (``native=True``) or a fixed-size checkpoint at
    ``image_size``. Arguments as in ``aimv2_pixels``."""
    processor = AIMv2Processor(image_size=image_size, is_native=check_native(native) is True, resample=resample,
                               native=native, backend=backend, device=device, **settings)
    return processor(images, max_num_patches=max_num_patches)


class AIMv2Processor(Processor):
    """AIMv2's processor. A fixed-size checkpoint (``is_native=False``): the CLIP processor at
    ``image_size``, and ``native=True`` refused. The native checkpoint: native resolution whatever
    ``native`` says, capped where ``max_num_patches`` is given (or, where its
    ``preprocessor_config.json`` prescribes a CLIP resize and crop, that unless ``native=True``).

    ``size``/``crop_size`` (CLIP's, ``None`` for none), ``resample``, ``mean`` and ``std`` are the
    published processor's, as read from ``preprocessor_config.json``.
    """

    family = "aimv2"
    reference_converts_rgb = True
    override_names = Processor.override_names + ("device",)
    override_note = (" (the image size of a fixed-size AIMv2 checkpoint is its learned position table's; the native "
                     "checkpoint keeps each image's own)")

    def __init__(self, patch_size: int = AIMV2_PATCH_SIZE, *, image_size: int = 224, is_native: bool = False,
                 size=_FROM_IMAGE_SIZE, crop_size=_FROM_IMAGE_SIZE, resample="bicubic", mean=CLIP_MEAN, std=CLIP_STD,
                 max_num_patches: int | None = None, native: bool | None = None, backend: str | None = None,
                 device=None, **settings):
        patch_size = check_patch_size(patch_size)
        if not is_native and (not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1
                              or image_size % patch_size):
            raise ValueError(f"image_size must be a positive multiple of the patch size {patch_size} (the fixed-size "
                             f"checkpoint's resolution), got {image_size!r}; for native resolution pass native=True")
        resample_name(resample)
        self.image_size, self.is_native = image_size, is_native
        if size is _FROM_IMAGE_SIZE:
            size = None if is_native else image_size
        if crop_size is _FROM_IMAGE_SIZE:
            crop_size = None if is_native else (image_size, image_size)
        self.size, self.crop_size = size, crop_size
        self.resample, self.mean, self.std, self.device = resample, mean, std, device
        super().__init__(patch_size, max_num_patches=max_num_patches, native=native, backend=backend, **settings)
        if not is_native and self._published_grid() != (image_size // patch_size,) * 2:
            raise ValueError(
                f"the published processor (size {self.size}, crop {self.crop_size}) would not give the "
                f"{image_size}x{image_size} images this fixed-size AIMv2 checkpoint's learned position table takes"
            )

    def _published_grid(self) -> tuple[int, int] | None:
        """The patch grid every image gets from the published resize and crop, if one."""
        if self.crop_size is not None:
            crop_h, crop_w = self.crop_size
        elif isinstance(self.size, tuple):
            crop_h, crop_w = self.size
        else:
            return None
        return crop_h // self.patch_size, crop_w // self.patch_size

    def keeps_aspect_ratio(self, native: bool | None) -> bool:
        if not self.is_native:
            if native:
                raise ValueError(
                    f"this AIMv2 checkpoint is fixed-size ({self.image_size}x{self.image_size}): its learned position "
                    f"table serves only a {self.image_size // self.patch_size}x{self.image_size // self.patch_size} "
                    f"grid, and native grids would need the model to resize that table (interpolate_pos_encoding, "
                    f"which the reference never does); use native=False, or the native checkpoint "
                    f"apple/aimv2-large-patch14-native (for such batches all the same: aimv2_preprocess(images, "
                    f"native=True) and model(batch, interpolate_pos_encoding=True))"
                )
            return False
        return bool(native) or (self.size is None and self.crop_size is None)

    def fixed_size(self) -> str:
        if self.crop_size is None and isinstance(self.size, int):
            return f"resizes every image's shortest edge to {self.size} (the published CLIP processor)"
        height, width = self.crop_size or self.size
        return f"resizes and crops every image to {height}x{width} (the published CLIP processor)"

    def normalization(self, backend: str) -> Normalization:
        return Normalization(tuple(self.mean), tuple(self.std), backend)

    def target_size(self, height, width, native, max_num_patches) -> tuple[int, int] | None:
        if not native:
            return clip_target_size(height, width, self.size)
        rows, cols = floor_patch_grid(height, width, self.patch_size, max_num_patches)
        resized = (rows != height // self.patch_size) or (cols != width // self.patch_size)
        return (rows * self.patch_size, cols * self.patch_size) if resized else None

    def resize_image(self, rgb, native, max_num_patches, backend) -> torch.Tensor:
        if native:
            return _native_pixels(rgb, max_num_patches, backend, self.resample, self.device, self.patch_size)
        pixels = clip_resize_center_crop(rgb, self.size, self.crop_size, self.resample, backend, self.device)
        p = self.patch_size  # the patch convolution drops the pixels that fill no whole patch
        return pixels[:, : pixels.shape[1] // p * p, : pixels.shape[2] // p * p]

    def resize_plan(self, height, width, native, max_num_patches, backend) -> ResizePlan:
        p = self.patch_size
        if native:
            rows, cols = floor_patch_grid(height, width, p, max_num_patches)
            size = (height, width) if (rows, cols) == (height // p, width // p) else (rows * p, cols * p)
            return ResizePlan(size, (0, 0, rows * p, cols * p))
        plan = clip_resize_plan(height, width, self.size, self.crop_size, backend)
        top, left, rows, cols = plan.region  # whole patches only, as resize_image keeps them
        return ResizePlan(plan.size, (top, left, rows // p * p, cols // p * p))

    def device_resample(self) -> str:
        return resample_name(self.resample)

    @classmethod
    def from_checkpoint(cls, config, fields: PreprocessorSettings, **overrides) -> "AIMv2Processor":
        side = config.image_size
        clip = settings_from_clip_fields(fields, *((None, None) if config.is_native else (side, (side, side))))
        return cls(config.patch_size, image_size=config.image_size, is_native=config.is_native, **clip, **overrides)
