"""The CLIP image processor (transformers' ``CLIPImageProcessor``), reproduced exactly.

Shortest-edge resize, centre crop, rescale by 1/255 and CLIP normalisation, as AIMv2 and the
OneVision Encoder use it. Two backends, matching transformers 5.23's two classes bit for bit:

- ``"pil"`` (the default): ``CLIPImageProcessorPil``. Resizes with Pillow, rescales in float64
  then casts to float32, normalises in float32. Needs nothing beyond Pillow and NumPy.
- ``"torch"``: ``CLIPImageProcessor`` (the torchvision backend). Resizes a uint8 tensor with
  ``torch.nn.functional.interpolate(antialias=True)`` as torchvision does, and normalises with the
  rescale folded into mean and std. Runs on any device given; needs no torchvision.

The two backends differ by a few uint8 levels after the resize (different bicubic kernels), so
pick the one the reference pipeline used.

Inputs: one image or a sequence of images, as every processor takes them (``packvit.preprocess.common``:
PIL images, uint8 arrays and tensors, paths opened upright by their EXIF orientation).

Images of extreme aspect ratio: the shortest-edge resize of a 1 x 10000 strip to 224 would make a
224 x 2,240,000 image only to keep its centre. When the resized image would hold more than
``FULL_RESIZE_MAX_RATIO`` (64) times the crop's pixels (aspect ratios beyond about 64:1 for a square
crop), the ``"pil"`` backend resizes only the part of the image the crop keeps (Pillow's ``box``,
pass by pass, from the source pixels the filter reaches): the same filter, with coefficients equal
to the full resize's up to floating-point rounding, so about one pixel in ten thousand differs by
one or two uint8 levels from the full resize. The ``"torch"`` backend, whose interpolation cannot
resize a part on its own, refuses such an image. Every other image is resized whole, exactly as
the reference does.
"""

from __future__ import annotations

import math
import platform

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .common import (
    CLIP_MEAN,
    CLIP_STD,
    RGBPixels,
    check_backend,
    image_list,
    rgb_pixels,
    to_rgb_uint8,
)
from .device import ResizePlan
from .pixels import rescale_and_normalize

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIP_RESAMPLE",
    "resample_name",
    "FULL_RESIZE_MAX_RATIO",
    "to_rgb_uint8",
    "shortest_edge_size",
    "clip_resize",
    "clip_center_crop",
    "clip_normalize",
    "clip_resize_center_crop",
    "clip_target_size",
    "clip_resize_plan",
    "clip_preprocess",
    "CLIP_PROCESSOR_TYPES",
    "settings_from_clip_fields",
]

#: resampling filters by name, with their Pillow codes (transformers' ``resample`` values)
CLIP_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

#: the ``image_processor_type`` values of the processor reproduced here
CLIP_PROCESSOR_TYPES = ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil")

#: a shortest-edge resize making more than this many times the crop's pixels resizes only the
#: cropped part (``"pil"``) or is refused (``"torch"``); see the module docstring
FULL_RESIZE_MAX_RATIO = 64


def resample_name(resample) -> str:
    """``"bicubic"``/``"bilinear"`` or a Pillow code (3, 2) → the filter's name."""
    for name, code in CLIP_RESAMPLE.items():
        if resample == name or resample == int(code):
            return name
    raise ValueError(
        f"unsupported resample {resample!r}; the CLIP processor reproduction supports "
        f"{sorted(CLIP_RESAMPLE)} (or their Pillow codes 3 and 2)"
    )


def _pair(size, what: str) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict) and {"height", "width"} <= size.keys():
        return int(size["height"]), int(size["width"])
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]), int(size[1])
    raise ValueError(f"{what} must be an int, a (height, width) pair or {{'height', 'width'}}, got {size!r}")


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to ``shortest_edge``; the longer side is
    ``int(shortest_edge * long / short)`` (truncated), as in transformers."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def clip_resize(image: torch.Tensor | RGBPixels, size, resample="bicubic", backend: str = "pil") -> torch.Tensor:
    """uint8 ``[3, H, W]`` (or ``RGBPixels``) → uint8 ``[3, H', W']``.

    ``size``: an int resizes the shortest edge to it (aspect ratio kept); a (height, width) pair
    resizes to exactly that size.
    """
    check_backend(backend)
    name = resample_name(resample)
    rgb = image if isinstance(image, RGBPixels) else RGBPixels.from_chw(image)
    height, width = rgb.height, rgb.width
    new_size = shortest_edge_size(height, width, size) if isinstance(size, int) else _pair(size, "size")
    if backend == "pil":
        resized = rgb.pil().resize((new_size[1], new_size[0]), resample=CLIP_RESAMPLE[name])
        return torch.from_numpy(np.array(resized)).permute(2, 0, 1)  # [H', W', 3] → [3, H', W']
    if tuple(new_size) == (height, width):
        return rgb.chw()
    # torchvision resizes uint8 natively on the CPU (bicubic always, bilinear with AVX2/AVX512/arm64);
    # otherwise in float32, then clamps (bicubic) and rounds back to uint8.
    native = rgb.hwc().device.type == "cpu" and (
        name == "bicubic" or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        or platform.machine() in ("aarch64", "arm64")
    )
    batch = rgb.batch(padded=native)  # [1, 3 or 4, H, W]
    if not native:  # as torchvision converts: a contiguous float32 copy
        batch = batch.to(torch.float32, memory_format=torch.contiguous_format)
    # [1, C, H, W] → [1, C, H', W'], channel by channel
    resized = F.interpolate(batch, size=list(new_size), mode=name, align_corners=False, antialias=True)
    if not native:
        if name == "bicubic":
            resized = resized.clamp_(0, 255)
        resized = resized.round_().to(torch.uint8)
    return resized[0, :3]


def _crop_origin(height: int, width: int, crop_h: int, crop_w: int, backend: str) -> tuple[int, int]:
    """(top, left) of a centred crop, in image coordinates; negative where the crop is larger than
    the image (NumPy pads ceil((crop - side) / 2) before, torchvision floor)."""
    if backend == "pil":
        return (height - crop_h) // 2, (width - crop_w) // 2
    top = -((crop_h - height) // 2) if crop_h > height else (height - crop_h) // 2
    left = -((crop_w - width) // 2) if crop_w > width else (width - crop_w) // 2
    return top, left


def _place(image: torch.Tensor, top: int, left: int, crop_h: int, crop_w: int) -> torch.Tensor:
    """``[C, h, w]`` placed at (top, left) on a zero canvas ``[C, crop_h, crop_w]``, clipped to it."""
    canvas = image.new_zeros((*image.shape[:-2], crop_h, crop_w))
    height, width = image.shape[-2:]
    rows = slice(max(0, top), min(height, top + crop_h))
    cols = slice(max(0, left), min(width, left + crop_w))
    canvas[..., rows.start - top : rows.stop - top, cols.start - left : cols.stop - left] = image[..., rows, cols]
    return canvas


def clip_center_crop(image: torch.Tensor, crop_size, backend: str = "pil") -> torch.Tensor:
    """Centre crop ``[C, H, W]`` → ``[C, crop_h, crop_w]``, zero-padding an image smaller than the
    crop the way each backend's processor does."""
    check_backend(backend)
    crop_h, crop_w = _pair(crop_size, "crop_size")
    height, width = image.shape[-2:]
    top, left = _crop_origin(height, width, crop_h, crop_w, backend)
    if top >= 0 and left >= 0:
        return image[..., top : top + crop_h, left : left + crop_w]
    return _place(image, top, left, crop_h, crop_w)


def _source_span(start: int, stop: int, in_size: int, out_size: int,
                 resample) -> tuple[tuple[float, float], tuple[int, int]]:
    """For outputs ``start .. stop`` of a resize from ``in_size`` to ``out_size`` pixels: the source
    interval that maps onto them, and the whole source pixels their filter reads (``[first, last)``)."""
    scale = in_size / out_size
    support = (2.0 if resample_name(resample) == "bicubic" else 1.0) * max(scale, 1.0)
    low, high = start * scale, stop * scale
    return (low, high), (max(0, math.floor(low - support) - 1), min(in_size, math.ceil(high + support) + 1))


def _resize_crop_region(rgb: RGBPixels, resized: tuple[int, int], crop: tuple[int, int], resample,
                        backend: str) -> torch.Tensor:
    """uint8 ``[3, H, W]`` → uint8 ``[3, crop_h, crop_w]``: the centre crop of the image resized to
    ``resized``, computed by resizing only the part the crop keeps (``"pil"``)."""
    height, width = rgb.height, rgb.width
    (new_h, new_w), (crop_h, crop_w) = resized, crop
    if backend == "torch":
        raise ValueError(
            f"an image of {height}x{width} pixels would be resized to {new_h}x{new_w} before its {crop_h}x{crop_w} "
            f"centre crop, more than {FULL_RESIZE_MAX_RATIO} times the crop's pixels, and the torch backend cannot "
            f"resize only the cropped part; use backend='pil' (which does), crop or pad the image to a moderate "
            f"aspect ratio first, or use native resolution (native=True) where the model has it"
        )
    top, left = _crop_origin(new_h, new_w, crop_h, crop_w, backend)
    r0, r1 = max(0, top), min(new_h, top + crop_h)
    c0, c1 = max(0, left), min(new_w, left + crop_w)
    # The full resize runs a horizontal pass, then a vertical one (uint8 in between). Here each pass
    # computes only the outputs the crop keeps, from the source rows and columns their filter reaches.
    code = CLIP_RESAMPLE[resample_name(resample)]
    (y0, y1), (ys, ye) = _source_span(r0, r1, height, new_h, resample)
    (x0, x1), (xs, xe) = _source_span(c0, c1, width, new_w, resample)
    source = rgb.pil().crop((xs, ys, xe, ye))
    columns = source.resize((c1 - c0, ye - ys), code, box=(x0 - xs, 0, x1 - xs, ye - ys))
    region = columns.resize((c1 - c0, r1 - r0), code, box=(0, y0 - ys, c1 - c0, y1 - ys))
    region = torch.from_numpy(np.array(region)).permute(2, 0, 1)  # [3, r1 - r0, c1 - c0]
    return _place(region, top - r0, left - c0, crop_h, crop_w)


def clip_normalize(image: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD, backend: str = "pil",
                   rescale_factor: float = 1 / 255) -> torch.Tensor:
    """``rescale_and_normalize`` with CLIP's mean and std by default."""
    return rescale_and_normalize(image, mean, std, backend, rescale_factor)


def clip_resize_center_crop(image, size=224, crop_size=224, resample="bicubic", backend: str = "pil",
                            device=None) -> torch.Tensor:
    """One image (any image type, or ``RGBPixels``) → uint8 ``[3, crop_h, crop_w]``: RGB
    conversion, shortest-edge resize, centre crop.

    ``size`` and ``crop_size`` as in ``clip_preprocess``; ``device`` (``"torch"`` backend only)
    is where the resize runs. Extreme aspect ratios: see the module docstring.
    """
    rgb = image if isinstance(image, RGBPixels) else rgb_pixels(image, backend)
    if device is not None and backend == "torch":
        rgb = RGBPixels(hwc=rgb.hwc().to(device))
    if isinstance(size, int) and crop_size is not None:
        resized = shortest_edge_size(rgb.height, rgb.width, size)
        crop = _pair(crop_size, "crop_size")
        if resized[0] * resized[1] > FULL_RESIZE_MAX_RATIO * crop[0] * crop[1]:
            return _resize_crop_region(rgb, resized, crop, resample, backend)
    pixels = rgb.chw() if size is None else clip_resize(rgb, size, resample, backend)
    return pixels if crop_size is None else clip_center_crop(pixels, crop_size, backend)


def clip_target_size(height: int, width: int, size) -> tuple[int, int] | None:
    """The (height, width) the CLIP processor resizes an image to before its crop (``None``: no resize)."""
    if size is None:
        return None
    return shortest_edge_size(height, width, size) if isinstance(size, int) else _pair(size, "size")


def clip_resize_plan(height: int, width: int, size, crop_size, backend: str = "pil") -> ResizePlan:
    """The CLIP processor's resize and centre crop of a ``height x width`` image as a
    ``ResizePlan`` (the device path's), the crop's origin as the backend pads it."""
    resized = clip_target_size(height, width, size) or (height, width)
    if crop_size is None:
        return ResizePlan.whole(resized)
    crop_h, crop_w = _pair(crop_size, "crop_size")
    return ResizePlan(resized, (*_crop_origin(*resized, crop_h, crop_w, backend), crop_h, crop_w))


def clip_preprocess(images, size=224, crop_size=224, resample="bicubic", mean=CLIP_MEAN,
                    std=CLIP_STD, backend: str = "pil", device=None) -> list[torch.Tensor]:
    """Images → list of float32 ``[3, crop_h, crop_w]`` tensors, equal to ``CLIPImageProcessorPil``
    (``backend="pil"``, the default) or ``CLIPImageProcessor`` (``backend="torch"``).

    ``images``: one image or a sequence of images (module docstring). ``size``: shortest edge (int)
    or exact (height, width), ``None`` for no resize; ``crop_size``: int or (height, width),
    ``None`` for no crop. ``resample``: ``"bicubic"`` (CLIP's) or ``"bilinear"``.
    """
    check_backend(backend)
    resample_name(resample)
    return [
        clip_normalize(clip_resize_center_crop(image, size, crop_size, resample, backend, device), mean, std, backend)
        for image in image_list(images)
    ]


def _clip_size(value, default_to_square: bool, source: str):
    """A ``size`` field → an int (shortest edge) or a (height, width) pair."""
    if isinstance(value, dict) and set(value) == {"shortest_edge"}:
        return int(value["shortest_edge"])
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        return int(value["height"]), int(value["width"])
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value) if default_to_square else value
    raise ValueError(
        f"{source} has size {value!r}; packvit's CLIP processor resizes to {{'shortest_edge': n}} or "
        f"{{'height': h, 'width': w}}"
    )


def settings_from_clip_fields(fields, size, crop_size) -> dict:
    """The CLIP processor's settings from a checkpoint's ``preprocessor_config.json``
    (``PreprocessorSettings``): ``size``, ``crop_size`` (``None``: no resize, no crop),
    ``resample``, ``mean`` and ``std``, as ``clip_preprocess`` takes them.

    ``size`` and ``crop_size`` are the family's published values, used where the checkpoint has no
    such file; fields a file leaves unset take ``CLIPImageProcessor``'s defaults (shortest edge 224,
    centre crop 224, bicubic, CLIP mean and std).
    """
    fields.require_published(CLIP_PROCESSOR_TYPES)
    if fields.present:
        size, crop_size = 224, (224, 224)
    default_to_square = fields.take("default_to_square", False)
    size_field, crop_field = fields.take("size"), fields.take("crop_size")
    if size_field is not None:
        size = _clip_size(size_field, default_to_square, fields.source)
    if crop_field is not None:
        crop_size = _pair(crop_field, f"{fields.source} crop_size")
    if not fields.take("do_resize", size is not None):
        size = None
    if not fields.take("do_center_crop", crop_size is not None):
        crop_size = None
    resample = fields.take("resample", 3)
    resample_name(resample)
    mean, std = fields.take("image_mean", CLIP_MEAN), fields.take("image_std", CLIP_STD)
    mean, std = ((value,) * 3 if isinstance(value, (int, float)) else tuple(value) for value in (mean, std))
    return dict(size=size, crop_size=crop_size, resample=resample, mean=mean, std=std)
