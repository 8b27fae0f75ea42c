"""Image inputs, RGB conversion and normalisation shared by the image processors.

**Inputs**, the same for every processor: one image or a sequence of images, where an image is

- a PIL image, of any mode listed below;
- a uint8 NumPy array ``[H, W]`` or ``[H, W, C]`` with C in 1, 3 or 4;
- a uint8 torch tensor ``[C, H, W]`` with C in 1, 3 or 4 (channels first);
- a path (``str`` or ``pathlib.Path``) to an image file.

A 4-D array ``[B, H, W, C]`` or tensor ``[B, C, H, W]`` is a batch of B images. A path is opened
with Pillow and turned upright by its EXIF orientation tag (``PIL.ImageOps.exif_transpose``), as
transformers' ``load_image`` does for paths. PIL images, arrays and tensors are taken as they are
and never rotated, as the reference processors take them.

**RGB conversion** (``to_rgb_uint8``): transparency is composited onto white; one channel is
repeated three times; 16-bit grey images (PIL modes ``I;16``, ``I;16B``, ``I;16L``, and ``I`` with
values in 0..65535, which is how Pillow opens 16-bit greyscale PNGs) are scaled to 8 bits as
``round(v * 255 / 65535)``, where Pillow's ``convert("RGB")`` would clip every value above 255 to
white. Modes whose value range is unknown (``F``, ``I`` with values outside 0..65535) are refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CLIP_MEAN",
    "CLIP_STD",
    "HALF_MEAN",
    "HALF_STD",
    "PROCESSOR_BACKENDS",
    "IMAGE_TYPES",
    "check_backend",
    "check_max_num_patches",
    "image_list",
    "video_list",
    "open_image",
    "to_rgb_uint8",
    "fit_grid",
    "rescale_and_normalize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


#: how a reproduced processor resizes: like transformers' PIL backend or its torchvision backend
PROCESSOR_BACKENDS = ("pil", "torch")

#: what every processor takes as one image
IMAGE_TYPES = (
    "a PIL image, a uint8 NumPy array [H, W] or [H, W, C] (C in 1, 3, 4), a uint8 torch tensor [C, H, W] "
    "(C in 1, 3, 4), or a path (str or pathlib.Path) to an image file"
)

#: PIL modes of 16-bit grey images
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def check_backend(backend: str) -> None:
    if backend not in PROCESSOR_BACKENDS:
        raise ValueError(f"processor backend must be one of {PROCESSOR_BACKENDS}, got {backend!r}")


def check_max_num_patches(max_num_patches: int | None) -> int | None:
    """``max_num_patches`` as given: ``None`` or a positive int; ``ValueError`` otherwise."""
    if max_num_patches is None:
        return None
    if not isinstance(max_num_patches, (int, np.integer)) or isinstance(max_num_patches, bool) or max_num_patches < 1:
        raise ValueError(
            f"max_num_patches must be at least 1 (an integer count of patches per image) or None, got {max_num_patches!r}"
        )
    return int(max_num_patches)


def _uint8_hint(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name in ("uint16", ">u2", "<u2"):
        return "scale 16-bit values to uint8 with round(x * 255 / 65535)"
    if name == "bool":
        return "convert a mask to uint8 with x * 255"
    if "int" in name:
        return "cast values in 0..255 to uint8"
    return "convert values in [0, 1] with (x * 255).round() to uint8, or pass a PIL image"


def _check_array(array: np.ndarray, name: str) -> None:
    if array.dtype != np.uint8:
        raise ValueError(f"{name}: array images must be uint8, got {array.dtype}; {_uint8_hint(array.dtype)}")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(
            f"{name}: array images must be [H, W] or [H, W, C] with 1, 3 or 4 channels, got shape {array.shape}"
            + ("; a 4-D array is a batch of images: pass it on its own, not inside a list" if array.ndim == 4 else "")
        )


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


def _check_image(image, name: str) -> None:
    """Checks one image's type, dtype and shape (a path is checked when it is opened)."""
    if isinstance(image, (Image.Image, str, os.PathLike)):
        return
    if isinstance(image, np.ndarray):
        return _check_array(image, name)
    if isinstance(image, torch.Tensor):
        return _check_tensor(image, name)
    raise TypeError(f"{name} is {type(image).__name__}, not an image; an image is {IMAGE_TYPES}")


def image_list(images, what: str = "images") -> list:
    """One image or a sequence of images → a list of single images, each checked (paths are
    opened later, by ``to_rgb_uint8``).

    A 4-D array ``[B, H, W, C]`` or tensor ``[B, C, H, W]`` is a batch of B images. ``TypeError``
    for anything that is neither an image nor a sequence of images (``None`` included),
    ``ValueError`` for no images at all or a malformed one; ``what`` names the argument in errors.
    """
    if images is None:
        raise TypeError(f"{what} is None; pass one image or a sequence of images, where an image is {IMAGE_TYPES}")
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        items = list(images)
    elif isinstance(images, (Image.Image, str, os.PathLike, np.ndarray, torch.Tensor)):
        items = [images]
    elif (isinstance(images, Sequence) and not isinstance(images, bytes)) or isinstance(images, Iterator):
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
    if not ((isinstance(videos, Sequence) and not isinstance(videos, (str, bytes))) or isinstance(videos, Iterator)):
        raise TypeError(
            f"{what} is {type(videos).__name__}; pass a sequence of videos, each a sequence of frames or a uint8 "
            f"array [T, H, W, C]"
        )
    clips = []
    for index, video in enumerate(videos):
        name = f"{what}[{index}]"
        is_clip = (isinstance(video, (np.ndarray, torch.Tensor)) and video.ndim == 4) or (
            isinstance(video, Sequence) and not isinstance(video, (str, bytes))
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


def open_image(path) -> Image.Image:
    """An image file opened with Pillow and turned upright by its EXIF orientation tag."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image)  # a loaded copy, upright
    except FileNotFoundError as error:
        raise ValueError(f"image file {os.fspath(path)!r} does not exist") from error
    except UnidentifiedImageError as error:
        raise ValueError(f"{os.fspath(path)!r} is not an image file Pillow can read") from error
    except OSError as error:  # a directory, no permission, a truncated or corrupt file
        raise ValueError(f"cannot read image file {os.fspath(path)!r}: {error}") from error


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


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image → uint8 ``[H, W, 3]``."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        return np.repeat(_sixteen_bit_grey(image)[:, :, None], 3, axis=2)
    if image.mode == "F":
        raise ValueError(
            "PIL image of mode 'F' (32-bit floats) has no known value range; scale it to 0..255 yourself, e.g. for "
            "values in [0, 1]: Image.fromarray(np.clip(np.asarray(image) * 255, 0, 255).round().astype(np.uint8))"
        )
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return np.array(image.convert("RGB"))


def to_rgb_uint8(image, backend: str = "pil") -> torch.Tensor:
    """One image (any type in ``IMAGE_TYPES``) → uint8 ``[3, H, W]``, converted to RGB the way the
    backend's processor does.

    Transparency is composited onto white: for PIL images with Pillow (both backends); for
    4-channel arrays with rounding (``"pil"``) or in float32 with torchvision's truncating
    ``to_dtype`` (``"torch"``). One channel is repeated three times; 16-bit grey is scaled to 8 bits
    (module docstring).
    """
    check_backend(backend)
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    if isinstance(image, Image.Image):
        return torch.from_numpy(_pil_to_rgb(image)).permute(2, 0, 1).contiguous()  # [H, W, 3] → [3, H, W]
    _check_image(image, "image")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().permute(1, 2, 0).numpy()  # [C, H, W] → [H, W, C]
    array = image[:, :, None] if image.ndim == 2 else image  # [H, W, C]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4 and backend == "pil":
        alpha = array[..., 3:4] / 255
        array = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    elif array.shape[2] == 4:
        rgba = torch.from_numpy(np.ascontiguousarray(array)).float().mul_(1.0 / 255)
        rgb = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
        return rgb.mul(256.0 - 1e-3).to(torch.uint8).permute(2, 0, 1).contiguous()
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


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


def rescale_and_normalize(image: torch.Tensor, mean, std, backend: str, rescale_factor: float = 1 / 255) -> torch.Tensor:
    """uint8 ``[3, H, W]`` → float32 ``[3, H, W]``, ``(x * rescale_factor - mean) / std``, rounded
    as transformers' processors round it.

    ``"pil"``: rescale in float64, cast to float32, then normalise in float32. ``"torch"``:
    ``(x - mean / rescale_factor) / (std / rescale_factor)`` in float32.
    """
    check_backend(backend)
    if backend == "pil":
        rescaled = (image.cpu().numpy().astype(np.float64) * rescale_factor).astype(np.float32)
        mean32, std32 = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
        normalized = (rescaled - mean32[:, None, None]) / std32[:, None, None]
        return torch.from_numpy(np.ascontiguousarray(normalized))
    mean_scaled = torch.tensor(mean, device=image.device) * (1.0 / rescale_factor)
    std_scaled = torch.tensor(std, device=image.device) * (1.0 / rescale_factor)
    return (image.float() - mean_scaled[:, None, None]) / std_scaled[:, None, None]
