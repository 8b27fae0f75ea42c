"""One processor API for the four model families: ``load_processor(source)`` and ``processor(images)``.

``load_processor(source, **overrides)`` takes a checkpoint directory, a hub id, or a packvit model
(its ``family`` and ``config``) and returns that family's ``Processor`` with the checkpoint's
settings: the fields of its ``preprocessor_config.json`` where it has one, else the family's
published defaults (a model object carries no ``preprocessor_config.json``: load the processor from
the checkpoint directory to honour one). ``overrides`` replace the processor's defaults
(``max_num_patches``, ``native``, ``backend``, ``alpha``, ``max_pixels``, ``jpeg_draft``;
``image_size`` for DINOv3 and OneVision; ``Processor`` says what each does). Every processor is
called the same way, in one call or in two stages that may run in two places::

    processor(images=None, videos=None, *, max_num_patches=None, native=None, backend=None) -> PackedBatch
    processor.resize(images=None, videos=None, *, ...) -> PixelBatch        # uint8, e.g. in a CPU worker
    processor.normalize(pixels, *, device=None, dtype=None) -> PackedBatch  # e.g. on the GPU

- ``images``: one image or a sequence of images, of the types ``packvit.preprocess.common``
  lists. ``videos``: a sequence of videos, each a sequence of frames or a uint8 array
  ``[T, H, W, C]`` (or one such array); only OneVision takes videos, the image-only families take
  a video's frames as images, one item per frame.
- ``native``: ``False`` is the checkpoint's published processor exactly; ``True`` keeps each
  image's aspect ratio with at most ``max_num_patches`` patches; ``None`` is the processor's
  default, itself the published processor unless an override says otherwise.
- ``max_num_patches``: the patch cap where the aspect ratio is kept; fixed-size processing refuses it.
- ``backend``: ``"pil"`` or ``"torch"``, transformers' PIL or torchvision processor.

Arguments left ``None`` take the processor's defaults. The batch is in the family's
``patch_layout``. Per family (defaults in brackets):

=========================  ===============================================  ==========================================
family                     published (``native=False``)                     ``native=True``
=========================  ===============================================  ==========================================
SigLIP2 NaFlex             NaFlex, aspect kept, ``max_num_patches`` [256]   the same
DINOv3                     224 x 224, aspect not kept                       aspect kept, ``max_num_patches`` [1024]
AIMv2 fixed-size           CLIP shortest-edge resize and centre crop at     refused: the learned position table
                           ``image_size`` (224, 336, 448)                   serves only its own grid
AIMv2 native checkpoint    no resize (remainder pixels dropped); a cap      the same
                           where ``max_num_patches`` is given [none]
OneVision (``llava_vit``)  CLIP 448 crop; videos at 224 on the 64-slot      nearest whole-patch grid,
                           timeline                                         ``max_num_patches`` [1024]
=========================  ===============================================  ==========================================

``preprocessor_config.json`` fields are read where a family reproduces them (SigLIP2:
``max_num_patches``, ``patch_size``; CLIP: ``size``, ``crop_size``, ``do_resize``,
``do_center_crop``, ``resample``, ``image_mean``, ``image_std``; DINOv3: ``size``). Fields fixed
by the reproduction (``do_rescale``, ``rescale_factor``, ``do_normalize``, the processor type ...)
must hold their published values, fields that only describe how the file was saved
(``processor_class``, ``return_tensors`` ...) are passed over, and every other field is refused with
an error naming it: nothing is silently ignored. ``null`` fields are unset. ``do_convert_rgb`` is
passed over because every packvit processor converts to RGB (identical for RGB images).
"""

from __future__ import annotations

import functools
import importlib
import math
import os
from pathlib import Path
from typing import Callable, ClassVar

import torch

from ..checkpoint import read_config_dict, read_json_object, resolve_checkpoint
from ..models.registry import family_config, normalize_family
from ..packing import BatchOrigin, PackedBatch, patchify
from .common import (
    IMAGE_TYPES,
    PROCESSOR_BACKENDS,
    RGBPixels,
    check_alpha,
    check_jpeg_draft,
    check_max_num_patches,
    check_max_pixels,
    check_native,
    check_patch_size,
    image_list,
    rgb_pixels,
    video_list,
)
from .device import ResizePlan, check_device_images, resize_on_device
from .pixels import Normalization, PixelBatch
from .reading import DEFAULT_MAX_PIXELS, DRAFT_SCALES

__all__ = [
    "PROCESSOR_CLASSES",
    "Processor",
    "draft_scale",
    "PreprocessorSettings",
    "read_preprocessor_config",
    "processor_class",
    "load_processor",
]

#: module and class of each family's processor
PROCESSOR_CLASSES: dict[str, tuple[str, str]] = {
    "siglip2": ("packvit.preprocess.siglip2", "Siglip2Processor"),
    "dinov3": ("packvit.preprocess.dinov3", "DINOv3Processor"),
    "aimv2": ("packvit.preprocess.aimv2", "AIMv2Processor"),
    "llava_vit": ("packvit.preprocess.llava_vit", "LlavaViTProcessor"),
}

PREPROCESSOR_CONFIG = "preprocessor_config.json"


def _same(value, expected) -> bool:
    if isinstance(expected, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return math.isclose(value, expected, rel_tol=1e-6)
    if isinstance(expected, (tuple, list)) and isinstance(value, (tuple, list)):
        return len(value) == len(expected) and all(_same(v, e) for v, e in zip(value, expected))
    return value == expected


class PreprocessorSettings:
    """The fields of a checkpoint's ``preprocessor_config.json``, taken one by one by a family's
    processor; ``finish`` refuses every field none took. ``null`` fields count as unset."""

    #: fields that describe how the processor was saved or returns its output, not its pixels
    DESCRIPTIVE = ("processor_class", "do_convert_rgb", "return_tensors", "disable_grouping", "device",
                   "image_seq_length")

    def __init__(self, fields: dict | None, source: str, family: str):
        #: whether the checkpoint has the file (its processor class's defaults then fill unset fields)
        self.present = fields is not None
        self._fields = {k: v for k, v in (fields or {}).items() if v is not None and k not in self.DESCRIPTIVE}
        self.source = source
        self.family = family

    def take(self, key: str, default=None):
        """The field's value (``default`` when unset), marked as read."""
        return self._fields.pop(key, default)

    def require(self, key: str, *supported) -> None:
        """Reads a field whose only reproduced values are ``supported`` (unset is the first)."""
        value = self._fields.pop(key, supported[0])
        if not any(_same(value, option) for option in supported):
            raise ValueError(
                f"{self.source} sets {key}={value!r}, but packvit's {self.family} processor reproduces only "
                f"{key}={' or '.join(repr(option) for option in supported)}; preprocess these images with the "
                f"processor that file describes and pass the patches to the model yourself"
            )

    def require_published(self, processor_types: tuple[str, ...]) -> None:
        """The fields every reproduced processor fixes: its type, rescale by 1/255, normalisation,
        channels-first output."""
        self.require("image_processor_type", *processor_types)
        self.require("do_rescale", True)
        self.require("rescale_factor", 1 / 255)
        self.require("do_normalize", True)
        self.require("data_format", "channels_first")

    def finish(self) -> None:
        """Refuses the fields nothing read."""
        if self._fields:
            listed = ", ".join(f"{key}={value!r}" for key, value in sorted(self._fields.items()))
            raise ValueError(
                f"{self.source} sets {listed}, which packvit's {self.family} processor does not reproduce; "
                f"remove the field if it does not change the pixels, or preprocess with the processor that "
                f"file describes and pass the patches to the model yourself"
            )


def read_preprocessor_config(directory) -> dict | None:
    """The contents of ``directory/preprocessor_config.json``, or ``None`` where there is none."""
    path = Path(directory) / PREPROCESSOR_CONFIG
    return read_json_object(path, "processor settings") if path.is_file() else None


class Processor:
    """A model family's image processor with one checkpoint's settings.

    ``processor(images=None, videos=None, *, max_num_patches=None, native=None, backend=None)`` →
    ``PackedBatch`` (module docstring), in two stages that may run in two places:
    ``processor.resize(...)`` (same arguments) → ``PixelBatch`` (uint8), and
    ``processor.normalize(pixels, device=None, dtype=None)`` → ``PackedBatch``; ``processor(x)``
    is ``processor.normalize(processor.resize(x))``, bit for bit. Built by ``load_processor``; a
    family's class may also be built directly, ``Siglip2Processor()``, with the published defaults.

    Settings every family has, besides ``max_num_patches``, ``native`` and ``backend``: ``alpha``
    (what transparency becomes, ``packvit.preprocess.common``), ``max_pixels`` (image files with
    more pixels are refused, ``ImageReadError`` with status ``too_large``; ``None``: only
    Pillow's own limit) and ``jpeg_draft`` (``None``, the default: JPEG files decoded in full; a
    number ``k >= 1``: a JPEG file is decoded at the largest DCT reduction, 1/2, 1/4 or 1/8 per
    side, that keeps at least ``k`` times its resize target per side and the same grid
    (``draft_scale``): faster, and slightly other pixels).

    ``processor.on_device(images, ...)`` is the device path: uint8 images already on a device
    (GPU-decoded) resized, normalised and patchified there (``packvit.preprocess.device``).

    A family subclass sets the class attributes and implements ``keeps_aspect_ratio``,
    ``fixed_size``, ``normalization``, ``target_size`` and ``resize_image`` (or ``resize_items``),
    ``resize_plan`` and ``device_resample`` (or ``resize_device_images``), and ``from_checkpoint``
    (settings from its config and ``preprocessor_config.json``).
    """

    family: ClassVar[str] = ""
    #: how the batch's patches are flattened: "ppc" (p, p, C) or "cpp" (C, p, p)
    patch_layout: ClassVar[str] = "ppc"
    #: the backends the family's reproduction has, the first being the default
    backends: ClassVar[tuple[str, ...]] = PROCESSOR_BACKENDS
    #: why the family has only those backends, where it lacks one
    backends_note: ClassVar[str] = ""
    #: the patch cap of native processing when none is given
    default_max_num_patches: ClassVar[int | None] = None
    takes_videos: ClassVar[bool] = False
    #: whether the family's reference processor converts to RGB (``do_convert_rgb=True``), which
    #: decides what a file's transparent colour becomes (``packvit.preprocess.common``)
    reference_converts_rgb: ClassVar[bool] = False
    #: the defaults ``load_processor``'s overrides may set, and why others are not among them
    override_names: ClassVar[tuple[str, ...]] = ("max_num_patches", "native", "backend", "alpha", "max_pixels",
                                                 "jpeg_draft")
    override_note: ClassVar[str] = ""

    def __init__(self, patch_size: int, *, max_num_patches: int | None = None, native: bool | None = None,
                 backend: str | None = None, alpha: str = "reference", max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 jpeg_draft: float | None = None):
        self.patch_size = check_patch_size(patch_size)
        self.native = check_native(native)
        self.backend = self.backends[0] if backend is None else self._check_backend(backend)
        self.alpha = check_alpha(alpha)
        self.max_pixels = check_max_pixels(max_pixels)
        self.jpeg_draft = check_jpeg_draft(jpeg_draft)
        keeps_aspect = self.keeps_aspect_ratio(self.native)  # refuses a default the checkpoint cannot take
        max_num_patches = check_max_num_patches(max_num_patches)
        if max_num_patches is not None and not keeps_aspect:
            raise ValueError(self._refuse_cap(max_num_patches, "pass native=True with it"))
        self.max_num_patches = self.default_max_num_patches if max_num_patches is None else max_num_patches

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{key}={value!r}' for key, value in vars(self).items())})"

    def _check_backend(self, backend: str) -> str:
        if backend not in self.backends:
            raise ValueError(
                f"processor backend must be one of {self.backends} for {self.family}, got {backend!r}{self.backends_note}"
            )
        return backend

    def _refuse_cap(self, max_num_patches, fix: str) -> str:
        return (
            f"max_num_patches={max_num_patches!r} caps processing that keeps each image's aspect ratio, but this "
            f"{self.family} processor {self.fixed_size()}; {fix}"
        )

    # --- what a family defines ----------------------------------------------------------------------

    def keeps_aspect_ratio(self, native: bool | None) -> bool:
        """Whether processing with this ``native`` keeps aspect ratios (and takes ``max_num_patches``);
        ``ValueError`` where the checkpoint cannot take native grids."""
        raise NotImplementedError

    def fixed_size(self) -> str:
        """What fixed-size processing does, for errors (families that have it)."""
        raise NotImplementedError

    def normalization(self, backend: str) -> Normalization:
        """How the backend's uint8 pixels are normalised."""
        raise NotImplementedError

    def target_size(self, height: int, width: int, native: bool, max_num_patches: int | None) -> tuple[int, int] | None:
        """The (height, width) an upright image of ``height x width`` is resized to before any
        crop, ``None`` where it is not resized (what ``jpeg_draft`` reduces a JPEG towards)."""
        raise NotImplementedError

    def resize_image(self, rgb: RGBPixels, native: bool, max_num_patches: int | None, backend: str) -> torch.Tensor:
        """One RGB image → uint8 ``[3, H', W']`` with sides multiples of the patch size."""
        raise NotImplementedError

    def resize_items(self, images: list, videos: list, native: bool, max_num_patches: int | None,
                     backend: str) -> PixelBatch:
        """Checked images (and videos) → the ``PixelBatch`` of their uint8 patches."""
        target = functools.partial(self.target_size, native=native, max_num_patches=max_num_patches)
        items = [self.resize_image(self.rgb(image, backend, target), native, max_num_patches, backend) for image in images]
        return self.pack_pixels(items, backend)

    def resize_plan(self, height: int, width: int, native: bool, max_num_patches: int | None,
                    backend: str) -> ResizePlan:
        """What the device path does to an image of ``height x width``: the resize and crop of
        ``resize_image`` as a ``ResizePlan``."""
        raise NotImplementedError

    def device_resample(self) -> str:
        """The device path's filter, the family's resample: ``"bilinear"`` or ``"bicubic"``."""
        raise NotImplementedError

    def resize_device_images(self, images: list[torch.Tensor], native: bool, max_num_patches: int | None,
                             backend: str) -> PixelBatch:
        """uint8 ``[3, H, W]`` images on a device → their ``PixelBatch`` there (``packvit.preprocess.device``)."""
        plans = [self.resize_plan(*image.shape[1:], native, max_num_patches, backend) for image in images]
        resized = resize_on_device(images, plans, self.device_resample(), pillow_order=backend == "pil")
        return self.pack_pixels(resized, backend)

    # --- shared by the families ---------------------------------------------------------------------

    def origin(self, backend: str) -> BatchOrigin:
        normalization = self.normalization(backend)
        return BatchOrigin(self.family, tuple(normalization.mean), tuple(normalization.std))

    def pixel_batch(self, pixels: torch.Tensor, grid_thw: torch.Tensor, backend: str, **fields) -> PixelBatch:
        return PixelBatch(pixels, grid_thw, self.patch_size, self.patch_layout, self.normalization(backend),
                          self.origin(backend), **fields)

    def pack_pixels(self, items: list[torch.Tensor], backend: str) -> PixelBatch:
        """uint8 images ``[3, H, W]`` (sides multiples of the patch size) → their ``PixelBatch``."""
        patches, grid_thw = patchify(items, self.patch_size, self.patch_layout)  # uint8 [total, patch_dim]
        return self.pixel_batch(patches, grid_thw, backend)

    def rgb(self, image, backend: str, target: Callable[[int, int], tuple[int, int] | None]) -> RGBPixels:
        """One checked image → ``RGBPixels`` under the processor's ``alpha``, ``max_pixels`` and
        ``jpeg_draft``; ``target(height, width)`` is the size it will be resized to (``None``: kept)."""
        draft = None if self.jpeg_draft is None else functools.partial(draft_scale, target=target,
                                                                        margin=self.jpeg_draft)
        return rgb_pixels(image, backend, self.alpha, reference_converts_rgb=self.reference_converts_rgb,
                          max_pixels=self.max_pixels, draft=draft)

    def _options(self, max_num_patches, native, backend) -> tuple[bool, int | None, str]:
        """A call's options checked: ``(keeps_aspect, cap, backend)``."""
        backend = self.backend if backend is None else self._check_backend(backend)
        keeps_aspect = self.keeps_aspect_ratio(self.native if native is None else check_native(native))
        max_num_patches = check_max_num_patches(max_num_patches)
        if max_num_patches is not None and not keeps_aspect:
            raise ValueError(self._refuse_cap(max_num_patches, "pass native=True to keep aspect ratios under the cap"))
        return keeps_aspect, self.max_num_patches if max_num_patches is None else max_num_patches, backend

    def _arguments(self, images, videos, max_num_patches, native, backend) -> tuple:
        """The call's arguments checked: ``(images, videos, keeps_aspect, cap, backend)``."""
        keeps_aspect, cap, backend = self._options(max_num_patches, native, backend)
        if videos is not None and not self.takes_videos:
            raise ValueError(
                f"{self.family} encodes images, not videos: pass a video's frames as images, "
                f"processor(images=frames), one item per frame"
            )
        if images is None and videos is None:
            raise ValueError(
                "nothing to preprocess: images is None" + (" and videos is None" if self.takes_videos else "")
                + f"; pass images=, one image or a sequence of images, where an image is {IMAGE_TYPES}"
                + ("; or videos=, a sequence of videos (each a sequence of frames or a uint8 [T, H, W, C] array)"
                   if self.takes_videos else "")
            )
        if videos is not None and isinstance(images, (list, tuple)) and not images:
            images = None
        items = [] if images is None else image_list(images)
        clips = [] if videos is None else video_list(videos)
        return items, clips, keeps_aspect, cap, backend

    # --- the API ------------------------------------------------------------------------------------

    def resize(self, images=None, videos=None, *, max_num_patches: int | None = None, native: bool | None = None,
               backend: str | None = None) -> PixelBatch:
        """Stage 1: images (then videos) → their uint8 ``PixelBatch``; arguments as ``__call__``'s."""
        return self.resize_items(*self._arguments(images, videos, max_num_patches, native, backend))

    def normalize(self, pixels: PixelBatch, *, device=None, dtype: torch.dtype | None = None) -> PackedBatch:
        """Stage 2: a ``PixelBatch`` this family's processor made → the normalised ``PackedBatch``,
        its patches on ``device`` (default: where the pixels are) in ``dtype`` (default float32)."""
        if not isinstance(pixels, PixelBatch):
            raise TypeError(f"normalize takes the PixelBatch of processor.resize(...), got {type(pixels).__name__}")
        if pixels.origin.family != self.family:
            raise ValueError(
                f"these pixels were made by a {pixels.origin.family} processor, not this {self.family} one; "
                f"normalise them with the processor that resized them"
            )
        return pixels.normalize(device, dtype)

    def on_device(self, images, *, max_num_patches: int | None = None, native: bool | None = None,
                  backend: str | None = None, dtype: torch.dtype | None = None) -> PackedBatch:
        """The device path: uint8 images ``[C, H, W]`` (C 1 or 3; a list, or a batch ``[B, C, H, W]``)
        already on a device, as GPU JPEG decoding returns them → the ``PackedBatch`` of this
        processor's definition, its patches on that device in ``dtype`` (default float32).

        Resize and crop as ``packvit.preprocess.device`` defines them (within two uint8 levels of
        the backend's own resize, at most 0.4% of pixels differing), normalisation exactly the
        backend's; the images are taken as they are (upright, RGB)."""
        images = check_device_images(images)
        keeps_aspect, cap, backend = self._options(max_num_patches, native, backend)
        return self.resize_device_images(images, keeps_aspect, cap, backend).normalize(dtype=dtype)

    def device_grid(self, height: int, width: int) -> tuple[int, int, int]:
        """The patch grid ``(1, rows, columns)`` ``on_device`` gives an upright image of ``height x
        width`` with the processor's settings: an image's token count from its size alone, before
        its pixels are decoded. ``ValueError`` where the processor refuses that size."""
        keeps_aspect, cap, backend = self._options(None, None, None)
        _, _, rows, columns = self.resize_plan(height, width, keeps_aspect, cap, backend).region
        return 1, rows // self.patch_size, columns // self.patch_size

    def __call__(self, images=None, videos=None, *, max_num_patches: int | None = None, native: bool | None = None,
                 backend: str | None = None) -> PackedBatch:
        """Images (then videos) → one ``PackedBatch`` in the family's patch layout; ``None``
        arguments take the processor's defaults."""
        return self.normalize(self.resize(images, videos, max_num_patches=max_num_patches, native=native,
                                          backend=backend))

    @classmethod
    def check_overrides(cls, overrides: dict) -> None:
        unknown = sorted(set(overrides) - set(cls.override_names))
        if unknown:
            raise ValueError(
                f"{cls.__name__} has no setting {unknown}; its settings are {list(cls.override_names)}{cls.override_note}"
            )

    @classmethod
    def from_checkpoint(cls, config, fields: PreprocessorSettings, **overrides) -> "Processor":
        """The processor of a checkpoint: its family ``config``, its ``preprocessor_config.json``
        ``fields`` (all read or refused) and ``overrides`` of the defaults."""
        raise NotImplementedError


def draft_scale(height: int, width: int, target: Callable[[int, int], tuple[int, int] | None], margin: float) -> int:
    """The largest JPEG reduction (``DRAFT_SCALES``) whose ``ceil(side / reduction)`` pixels keep at
    least ``margin`` times the resize ``target`` per side and are resized to that same target (so
    the grid and every size after it are the full image's); 1 where none does or nothing is resized."""
    goal = target(height, width)
    if goal is None:
        return 1
    for scale in sorted(DRAFT_SCALES, reverse=True)[:-1]:
        reduced = (-(-height // scale), -(-width // scale))
        if all(side >= margin * wanted for side, wanted in zip(reduced, goal)) and target(*reduced) == goal:
            return scale
    return 1


def processor_class(family: str) -> type[Processor]:
    """The processor class of a family (imported on first use)."""
    module, name = PROCESSOR_CLASSES[normalize_family(family)]
    return getattr(importlib.import_module(module), name)


def load_processor(source, **overrides) -> Processor:
    """The image processor of a checkpoint directory, a hub id, or a packvit model object.

    ``overrides`` replace the processor's defaults: ``max_num_patches``, ``native``, ``backend``
    (every family), ``image_size`` (DINOv3: an int or (height, width); OneVision: an int). An
    override given as ``None`` is left unset, so the checkpoint's own setting holds. An unknown
    override, or a ``preprocessor_config.json`` field the family does not reproduce, is a
    ``ValueError`` naming it.
    """
    if isinstance(source, (str, os.PathLike)):
        directory = resolve_checkpoint(source, patterns=("*.json",))
        family, config = family_config(read_config_dict(directory), str(Path(directory) / "config.json"))
        fields = read_preprocessor_config(directory)
        where = str(Path(directory) / PREPROCESSOR_CONFIG)
    elif isinstance(getattr(source, "family", None), str) and hasattr(source, "config"):
        family, config, fields, where = normalize_family(source.family), source.config, None, "the model"
    else:
        raise TypeError(
            f"load_processor takes a checkpoint directory, a hub id (owner/name) or a packvit model (with .family "
            f"and .config), got {type(source).__name__}"
        )
    cls = processor_class(family)
    cls.check_overrides(overrides)
    overrides = {name: value for name, value in overrides.items() if value is not None}
    settings = PreprocessorSettings(fields, where, family)
    processor = cls.from_checkpoint(config, settings, **overrides)
    settings.finish()
    return processor
