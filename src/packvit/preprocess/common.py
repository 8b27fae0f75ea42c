"""Image inputs, RGB conversion, the argument checks of every processor, and normalisation constants.

**Inputs**, the same for every processor: one image or a sequence of images, where an image is

- a PIL image, of any mode listed below;
- a uint8 NumPy array ``[H, W]`` or ``[H, W, C]`` with C in 1, 3 or 4;
- a uint8 torch tensor ``[C, H, W]`` with C in 1, 3 or 4 (channels first);
- an image file: a path (``str`` or ``pathlib.Path``), or the file's contents as ``bytes``.

A 4-D array ``[B, H, W, C]`` or tensor ``[B, C, H, W]`` is a batch of B images. An image with no
pixels (a side of 0) is refused. A file is opened by ``packvit.preprocess.reading.open_image``
(fully decoded, turned upright by its EXIF orientation tag, as transformers' ``load_image`` does;
``ImageReadError`` where it cannot be read). PIL images, arrays and tensors are taken as they are
and never rotated, as the reference processors take them.

**RGB conversion** (``to_rgb_uint8``): one channel is repeated three times; 16-bit grey images
(PIL modes ``I;16``, ``I;16B``, ``I;16L``, and ``I`` with values in 0..65535, which is how Pillow
opens 16-bit greyscale PNGs) are scaled to 8 bits as ``round(v * 255 / 65535)``, where Pillow's
``convert("RGB")``, and so the reference, clips every value above 255 to white. Modes whose value
range is unknown (``F``, ``I`` with values outside 0..65535) are refused.

**Transparency** (RGBA, LA, PA, and palette or grey images with a transparent colour), by the
processor setting ``alpha`` (``ALPHA_MODES``):

- ``"reference"`` (the default): what the reference pipeline does with each kind of input. An
  image given in memory is composited onto white, as the processors' ``do_convert_rgb`` does. A
  file is loaded as transformers loads a path for that backend, then converted as the family's
  reference processor converts: for ``"torch"`` (``load_image_as_tensor``) every transparency is
  dropped; for ``"pil"`` (``load_image``, Pillow's ``convert("RGB")``) an alpha channel is
  dropped, while a transparent palette or grey colour stays a colour key, which the CLIP
  processor (``do_convert_rgb=True``: AIMv2, OneVision) composites onto white and SigLIP2's and
  DINOv3's (``do_convert_rgb`` unset) leave as it is.
- ``"drop"``: dropped for every image, files and images in memory alike.
- ``"white"``: composited onto white for every image.

Compositing a PIL image uses Pillow's ``alpha_composite`` (both backends); a 4-channel array or
tensor is composited with rounding (``"pil"``) or in float32 with torchvision's truncating
``to_dtype`` (``"torch"``), as each backend's processor does.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .reading import DEFAULT_MAX_PIXELS, open_image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CLIP_MEAN",
    "CLIP_STD",
    "HALF_MEAN",
    "HALF_STD",
    "PROCESSOR_BACKENDS",
    "ALPHA_MODES",
    "IMAGE_TYPES",
    "check_backend",
    "check_native",
    "check_max_num_patches",
    "check_patch_size",
    "check_alpha",
    "check_max_pixels",
    "check_jpeg_draft",
    "image_list",
    "video_list",
    "is_image_file",
    "RGBPixels",
    "rgb_pixels",
    "to_rgb_uint8",
    "fit_grid",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


#: how a reproduced processor resizes: like transformers' PIL backend or its torchvision backend
PROCESSOR_BACKENDS = ("pil", "torch")

#: what transparency becomes (module docstring), the first being the default
ALPHA_MODES = ("reference", "drop", "white")

#: what every processor takes as one image
IMAGE_TYPES = (
    "a PIL image, a uint8 NumPy array [H, W] or [H, W, C] (C in 1, 3, 4), a uint8 torch tensor [C, H, W] "
    "(C in 1, 3, 4), or an image file: a path (str or pathlib.Path) or the file's bytes"
)

#: PIL modes of 16-bit grey images
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


# --- argument checks, shared by the processors and the module-level functions ----------------------


def check_backend(backend: str) -> None:
    if backend not in PROCESSOR_BACKENDS:
        raise ValueError(f"processor backend must be one of {PROCESSOR_BACKENDS}, got {backend!r}")


def check_native(native) -> bool | None:
    """``native`` as given: ``True``, ``False`` or ``None``; ``ValueError`` otherwise."""
    if native is not None and not isinstance(native, bool):
        raise ValueError(f"native must be True, False or None, got {native!r}")
    return native


def _is_count(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_max_num_patches(max_num_patches: int | None) -> int | None:
    """``max_num_patches`` as given: ``None`` or a positive int; ``ValueError`` otherwise."""
    if max_num_patches is None:
        return None
    if not _is_count(max_num_patches) or max_num_patches < 1:
        raise ValueError(
            f"max_num_patches must be at least 1 (an integer count of patches per image) or None, got {max_num_patches!r}"
        )
    return int(max_num_patches)


def check_patch_size(patch_size: int) -> int:
    """``patch_size`` as given: a positive int (pixels per patch side); ``ValueError`` otherwise."""
    if not _is_count(patch_size) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer (pixels per patch side), got {patch_size!r}")
    return int(patch_size)


def check_alpha(alpha: str) -> str:
    if alpha not in ALPHA_MODES:
        raise ValueError(
            f"alpha must be one of {ALPHA_MODES} (what transparency becomes: as the reference does, dropped, or "
            f"composited onto white), got {alpha!r}"
        )
    return alpha


def check_max_pixels(max_pixels: int | None) -> int | None:
    """``max_pixels`` as given: ``None`` (Pillow's own limit only) or a positive int."""
    if max_pixels is not None and (not _is_count(max_pixels) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive integer (pixels per image file) or None, got {max_pixels!r}")
    return None if max_pixels is None else int(max_pixels)


def check_jpeg_draft(jpeg_draft: float | None) -> float | None:
    """``jpeg_draft`` as given: ``None`` (off) or a number of at least 1 (how many times the resize
    target a reduced JPEG decode keeps per side)."""
    if jpeg_draft is None:
        return None
    if isinstance(jpeg_draft, bool) or not isinstance(jpeg_draft, (int, float)) or not jpeg_draft >= 1:
        raise ValueError(
            f"jpeg_draft must be None (decode JPEGs in full) or a number >= 1, the times the resize target a reduced "
            f"decode keeps per side; got {jpeg_draft!r}"
        )
    return float(jpeg_draft)


# --- inputs -----------------------------------------------------------------------------------------


def is_image_file(image) -> bool:
    """Whether an input is an image file (a path or a file's bytes) rather than pixels."""
    return isinstance(image, (str, os.PathLike, bytes))


def _uint8_hint(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name in ("uint16", ">u2", "<u2"):
        return "scale 16-bit values to uint8 with round(x * 255 / 65535)"
    if name == "bool":
        return "convert a mask to uint8 with x * 255"
    if "int" in name:
        return "cast values in 0..255 to uint8"
    return "convert values in [0, 1] with (x * 255).round() to uint8, or pass a PIL image"


def _check_size(height: int, width: int, name: str) -> None:
    if height == 0 or width == 0:
        raise ValueError(f"{name} is {height}x{width} pixels: an image with no pixels cannot be processed")


def _check_array(array: np.ndarray, name: str) -> None:
    if array.dtype != np.uint8:
        raise ValueError(f"{name}: array images must be uint8, got {array.dtype}; {_uint8_hint(array.dtype)}")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(
            f"{name}: array images must be [H, W] or [H, W, C] with 1, 3 or 4 channels, got shape {array.shape}"
            + ("; a 4-D array is a batch of images: pass it on its own, not inside a list" if array.ndim == 4 else "")
        )
    _check_size(array.shape[0], array.shape[1], f"{name} (an array of shape {array.shape})")


def _check_tensor(tensor: torch.Tensor, name: str) -> None:
    shape = tuple(tensor.shape)
    if tensor.dtype != torch.uint8:
        raise ValueError(f"{name}: tensor images must be uint8, got {tensor.dtype}; {_uint8_hint(tensor.dtype)}")
    if tensor.dim() != 3:
        raise ValueError(
            f"{name}: tensor images must be uint8 [C, H, W] with C in 1, 3 or 4, got shape {shape}"
            + ("; a 4-D tensor is a batch of images: pass it on its own, not inside a list" if tensor.dim() == 4 else "")
        )
    if shape[0] not in (1, 3, 4):
        if shape[2] in (1, 3, 4):
            raise ValueError(
                f"{name}: tensor of shape {shape} is channels last ([H, W, C]); tensors are read channels first, "
                f"[C, H, W]: pass tensor.permute(2, 0, 1)"
            )
        raise ValueError(f"{name}: tensor images must be uint8 [C, H, W] with C in 1, 3 or 4, got shape {shape}")
    _check_size(shape[1], shape[2], f"{name} (a tensor of shape {shape})")


def _check_image(image, name: str) -> None:
    """Checks one image's type, dtype and shape (a file is checked when it is opened)."""
    if is_image_file(image):
        return
    if isinstance(image, Image.Image):
        return _check_size(image.height, image.width, f"{name} (a PIL image)")
    if isinstance(image, np.ndarray):
        return _check_array(image, name)
    if isinstance(image, torch.Tensor):
        return _check_tensor(image, name)
    raise TypeError(f"{name} is {type(image).__name__}, not an image; an image is {IMAGE_TYPES}")


def image_list(images, what: str = "images") -> list:
    """One image or a sequence of images → a list of single images, each checked (files are
    opened later, by ``rgb_pixels``).

    A 4-D array ``[B, H, W, C]`` or tensor ``[B, C, H, W]`` is a batch of B images. ``TypeError``
    for anything that is neither an image nor a sequence of images (``None`` included),
    ``ValueError`` for no images at all or a malformed one; ``what`` names the argument in errors.
    """
    if images is None:
        raise TypeError(f"{what} is None; pass one image or a sequence of images, where an image is {IMAGE_TYPES}")
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        items = list(images)
    elif isinstance(images, (Image.Image, np.ndarray, torch.Tensor)) or is_image_file(images):
        items = [images]
    elif isinstance(images, Sequence) or isinstance(images, Iterator):
        items = list(images)
    else:
        raise TypeError(
            f"{what} is {type(images).__name__}; pass one image or a sequence (list, tuple) of images, where an "
            f"image is {IMAGE_TYPES}"
        )
    if not items:
        raise ValueError(f"{what} is empty: pass at least one image")
    single = len(items) == 1 and items[0] is images
    for index, image in enumerate(items):
        _check_image(image, what if single else f"{what}[{index}]")
    return items


def video_list(videos, what: str = "videos") -> list[list]:
    """Videos → a list of videos, each the list of its frames (``image_list``).

    ``videos``: a sequence of videos, each a sequence of frames or a uint8 array ``[T, H, W, C]``
    (tensor ``[T, C, H, W]``), or one such array or tensor. A single image where a video belongs
    is refused, since it would be ambiguous.
    """
    if isinstance(videos, (np.ndarray, torch.Tensor)) and videos.ndim == 4:
        return [image_list(videos, what)]
    if not ((isinstance(videos, Sequence) and not is_image_file(videos)) or isinstance(videos, Iterator)):
        raise TypeError(
            f"{what} is {type(videos).__name__}; pass a sequence of videos, each a sequence of frames or a uint8 "
            f"array [T, H, W, C]"
        )
    clips = []
    for index, video in enumerate(videos):
        name = f"{what}[{index}]"
        is_clip = (isinstance(video, (np.ndarray, torch.Tensor)) and video.ndim == 4) or (
            isinstance(video, Sequence) and not is_image_file(video)
        )
        if not is_clip:
            raise ValueError(
                f"{name} is {type(video).__name__}, not a video: a video is a sequence of frames or a uint8 array "
                f"[T, H, W, C]; for one video pass videos=[frames], for images pass images="
            )
        clips.append(image_list(video, name))
    if not clips:
        raise ValueError(f"{what} is empty: pass at least one video, or videos=None")
    return clips


# --- RGB conversion ---------------------------------------------------------------------------------


def _pillow_memory(image: Image.Image) -> torch.Tensor | None:
    """An RGB PIL image's own memory as uint8 ``[H, W, 4]`` (Pillow stores a pixel in four bytes,
    RGB then one unused), without a copy: through Pillow's Arrow export (Pillow 11.2 and later,
    images held in one block) where pyarrow is installed; ``None`` where it cannot."""
    if importlib.util.find_spec("pyarrow") is None or not hasattr(image, "__arrow_c_array__"):
        return None
    import pyarrow

    try:
        values = pyarrow.array(image).values.to_numpy(zero_copy_only=True)  # [H * W * 4], read-only
    except (ValueError, TypeError, pyarrow.ArrowException):  # rows in several blocks of memory
        return None
    with warnings.catch_warnings():  # never written to: every use of the pixels reads them
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(values).view(image.height, image.width, 4)


class RGBPixels:
    """One image in RGB, uint8, kept in the form it came as: a PIL image (mode ``RGB``) or a
    ``[H, W, 3]`` tensor (any strides: a permuted ``[3, H, W]`` tensor too); the other form is
    made on first use, from a PIL image without a copy where Pillow can lend its memory."""

    __slots__ = ("_pil", "_hwc", "_padded", "height", "width")

    def __init__(self, pil: Image.Image | None = None, hwc: torch.Tensor | None = None):
        self._pil, self._hwc, self._padded = pil, hwc, None
        self.height, self.width = (pil.height, pil.width) if pil is not None else tuple(hwc.shape[:2])

    @classmethod
    def from_hwc(cls, array: np.ndarray) -> "RGBPixels":
        return cls(hwc=torch.from_numpy(array))

    @classmethod
    def from_chw(cls, tensor: torch.Tensor) -> "RGBPixels":
        """uint8 ``[3, H, W]`` (kept as it is, as a view)."""
        return cls(hwc=tensor.permute(1, 2, 0))

    def pil(self) -> Image.Image:
        if self._pil is None:
            self._pil = Image.fromarray(np.ascontiguousarray(self._hwc.cpu().numpy()))
        return self._pil

    def hwc(self) -> torch.Tensor:
        """uint8 ``[H, W, 3]`` (read only: it may be the PIL image's own memory)."""
        if self._hwc is None:
            self._padded = _pillow_memory(self._pil)  # [H, W, 4] or None
            self._hwc = torch.from_numpy(np.array(self._pil)) if self._padded is None else self._padded[..., :3]
        return self._hwc

    def chw(self) -> torch.Tensor:
        """uint8 ``[3, H, W]``, a view: channels last in memory where it came from PIL or an array."""
        return self.hwc().permute(2, 0, 1)

    def batch(self, padded: bool = False) -> torch.Tensor:
        """uint8 ``[1, 3, H, W]``, a view whose strides say its memory format (channels last where it
        came from PIL or an array), as ``torch.nn.functional.interpolate`` reads it. ``padded``:
        ``[1, 4, H, W]`` where the PIL image's four-byte pixels are at hand (channels 0-2 are RGB, the
        fourth is to be dropped), which a channel-wise operation reads faster than three of four bytes."""
        hwc = self.hwc()
        source = self._padded if padded and self._padded is not None else hwc
        return source[None].permute(0, 3, 1, 2)


def _sixteen_bit_grey(image: Image.Image) -> np.ndarray:
    """A 16-bit grey PIL image → uint8 ``[H, W]``, ``round(v * 255 / 65535)``."""
    values = np.asarray(image)
    if image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(
            f"PIL image of mode 'I' (32-bit integers) holds values from {values.min()} to {values.max()}, outside the "
            f"16-bit range, so its scale is unknown; convert it to 8 bits yourself, e.g. "
            f"Image.fromarray(np.clip(np.asarray(image) * 255 / image_max, 0, 255).round().astype(np.uint8))"
        )
    return np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


def _has_transparency(image: Image.Image) -> bool:
    return "A" in image.getbands() or image.info.get("transparency") is not None


def _pil_to_rgb(image: Image.Image, composite: bool) -> RGBPixels:
    """A PIL image → RGB; transparency composited onto white where ``composite``, else dropped."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        return RGBPixels.from_hwc(np.repeat(_sixteen_bit_grey(image)[:, :, None], 3, axis=2))
    if image.mode == "F":
        raise ValueError(
            "PIL image of mode 'F' (32-bit floats) has no known value range; scale it to 0..255 yourself, e.g. for "
            "values in [0, 1]: Image.fromarray(np.clip(np.asarray(image) * 255, 0, 255).round().astype(np.uint8))"
        )
    if composite and _has_transparency(image):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return RGBPixels(pil=image if image.mode == "RGB" else image.convert("RGB"))


def _file_to_rgb(image: Image.Image, backend: str, reference_converts_rgb: bool) -> RGBPixels:
    """An opened file → RGB as the reference loads it for ``backend`` (``alpha="reference"``)."""
    if backend == "torch" or image.mode in _SIXTEEN_BIT_MODES + ("I", "F") or not _has_transparency(image):
        return _pil_to_rgb(image, composite=False)
    loaded = image.convert("RGB")  # load_image: alpha dropped, a transparent colour kept in info
    return _pil_to_rgb(loaded, composite=reference_converts_rgb)


def _array_to_rgb(array: np.ndarray, composite: bool, backend: str) -> RGBPixels:
    """uint8 ``[H, W]`` or ``[H, W, C]`` → RGB (module docstring)."""
    array = array[:, :, None] if array.ndim == 2 else array  # [H, W, C]
    if array.shape[2] == 1:
        return RGBPixels.from_hwc(np.repeat(array, 3, axis=2))
    if array.shape[2] == 3:
        return RGBPixels.from_hwc(array)
    if not composite:
        return RGBPixels.from_hwc(array[..., :3])
    if backend == "pil":
        alpha = array[..., 3:4] / 255
        return RGBPixels.from_hwc(np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8))
    rgba = torch.from_numpy(np.ascontiguousarray(array)).float().mul_(1.0 / 255)
    rgb = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
    return RGBPixels(hwc=rgb.mul(256.0 - 1e-3).to(torch.uint8))


def rgb_pixels(image, backend: str = "pil", alpha: str = "reference", *, reference_converts_rgb: bool = True,
               max_pixels: int | None = DEFAULT_MAX_PIXELS,
               draft: Callable[[int, int], int] | None = None) -> RGBPixels:
    """One image (any type in ``IMAGE_TYPES``) → ``RGBPixels``, converted the way the backend's
    processor converts it, transparency as ``alpha`` says (module docstring).

    ``reference_converts_rgb``: whether the family's reference processor converts to RGB
    (``do_convert_rgb=True``, the CLIP processor's default), which decides what a file's
    transparent colour becomes under ``alpha="reference"``. A file is opened with
    ``open_image(max_pixels=, draft=)``.
    """
    check_backend(backend)
    check_alpha(alpha)
    if is_image_file(image):
        opened = open_image(image, max_pixels=max_pixels, draft=draft)
        if alpha == "reference":
            return _file_to_rgb(opened, backend, reference_converts_rgb)
        return _pil_to_rgb(opened, composite=alpha == "white")
    composite = alpha != "drop"
    if isinstance(image, Image.Image):
        _check_size(image.height, image.width, "a PIL image")
        return _pil_to_rgb(image, composite)
    _check_image(image, "image")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().permute(1, 2, 0).numpy()  # [C, H, W] → [H, W, C]
    return _array_to_rgb(image, composite, backend)


def to_rgb_uint8(image, backend: str = "pil", alpha: str = "reference") -> torch.Tensor:
    """One image (any type in ``IMAGE_TYPES``) → uint8 ``[3, H, W]``, converted to RGB the way the
    backend's processor converts it (module docstring)."""
    return rgb_pixels(image, backend, alpha).chw().contiguous()


# --- sizes and normalisation --------------------------------------------------------------------------


def fit_grid(rows: float, cols: float, max_num_patches: int) -> tuple[int, int]:
    """A (rows, columns) patch grid of about the given shape with at most ``max_num_patches``
    patches: scaled by ``sqrt(max_num_patches / (rows * cols))``, floored (at least one patch per
    side), then shrunk along its longer side until it fits."""
    if max_num_patches < 1:
        raise ValueError(f"max_num_patches must be positive, got {max_num_patches}")
    scale = math.sqrt(max_num_patches / (rows * cols))
    rows, cols = max(1, math.floor(rows * scale)), max(1, math.floor(cols * scale))
    while rows * cols > max_num_patches:
        if rows >= cols:
            rows -= 1
        else:
            cols -= 1
    return rows, cols
