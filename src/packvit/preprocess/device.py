"""The device path: uint8 images already on a device (GPU-decoded JPEGs) resized, cropped,
patchified and normalised there, to each processor's definition (``Processor.on_device``).

A resize is separable and antialiased, with the weights ``packvit.positions.resize_weights``
defines (the triangle for bilinear, the a = -0.5 cubic for bicubic, rows normalised): the
horizontal pass first (for the PIL backend in the order Pillow picks: from Pillow 13 the
vertical one first where the height shrinks by more than twice as many pixels as the width),
each rounded half up and clamped to uint8, as Pillow's and torch's uint8 kernels compute it
(torchvision's CPU path). Measured on scikit-image
photographs and the ``files`` workload's JPEGs (``tests/test_preprocess_device.py``,
``scripts/profile_preprocess.py --device_path``), its pixels differ from the backend's own resize
by at most two uint8 levels at 0.004-0.4% of pixels, about as much as the two references differ
from each other (pooled cosine of a random model above 0.9999999), where a float
``F.interpolate`` rounded once (what torchvision runs on a GPU) differs at 11-16% of pixels and by
up to 22 levels for bicubic. Each pass is one float64 matmul per image (exact enough for
every uint8 value, and never TF32), over only the rows and columns a crop keeps, so an image of
any aspect ratio costs what its crop does. DINOv3's reference resizes rescaled floats with
``F.interpolate``; its device path is that, on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np
import PIL
import torch

from ..packing import offsets_within_items, to_device
from ..positions import RESIZE_SUPPORT, resize_kernel

__all__ = ["ResizePlan", "pass_matrices", "pillow_vertical_first", "resize_on_device", "check_device_images"]

#: Pillow 13 runs a resize's vertical pass first where the height shrinks much more than the width
PILLOW_ORDERS_PASSES = int(PIL.__version__.split(".")[0]) >= 13


@dataclass(frozen=True)
class ResizePlan:
    """What happens to one image: resized to ``size`` (height, width), then the ``region``
    ``(top, left, height, width)`` of the resized image kept (zeros where the region reaches
    outside it, as a centre crop larger than the image pads)."""

    size: tuple[int, int]
    region: tuple[int, int, int, int]

    @classmethod
    def whole(cls, size: tuple[int, int]) -> "ResizePlan":
        return cls(tuple(size), (0, 0, *size))


def pass_matrices(passes: list[tuple[int, int, int, int]], mode: str, device) -> list[torch.Tensor | None]:
    """Dense float64 weights ``[length, in_size]`` of one resize pass per ``(in_size, out_size,
    start, length)``: rows ``start .. start + length`` of ``resize_weights(in_size, out_size)``,
    rows outside ``0 .. out_size`` zero; ``None`` for a pass that changes nothing. Every pass's
    band of taps is computed in one go on ``device``; each matrix then costs one scatter."""
    needed = [index for index, (n, m, start, length) in enumerate(passes) if (n, start, length) != (m, 0, m)]
    matrices: list[torch.Tensor | None] = [None] * len(passes)
    if not needed:
        return matrices
    # one row per output pixel of every needed pass: (output index, in_size, out_size), [R, 3]
    n, m, start, length = np.array([passes[index] for index in needed], dtype=np.int64).T
    rows = np.stack([np.repeat(start, length) + offsets_within_items(length), np.repeat(n, length),
                     np.repeat(m, length)], axis=1)
    rows = to_device(torch.from_numpy(rows.astype(np.float64)), torch.device(device))
    taps = max(math.ceil(2 * RESIZE_SUPPORT[mode] * max(passes[index][0] / passes[index][1], 1.0)) + 2
               for index in needed)
    output, in_size, out_size = rows.unbind(dim=1)  # [R] each
    scale = in_size / out_size
    stretch = scale.clamp(min=1.0)
    centre = (output + 0.5) * scale
    first = (centre - RESIZE_SUPPORT[mode] * stretch).floor_()
    source = first[:, None] + torch.arange(taps, dtype=torch.float64, device=device)  # [R, taps]
    weights = resize_kernel((source + 0.5 - centre[:, None]) / stretch[:, None], mode)
    inside = (source >= 0) & (source < in_size[:, None]) & ((output >= 0) & (output < out_size))[:, None]
    weights = weights.where(inside, 0.0)
    total = weights.sum(dim=1, keepdim=True)
    weights = weights / total.where(total > 0, 1.0)
    source = source.clamp_(min=0).minimum(in_size[:, None] - 1).to(torch.int64)
    start = 0
    for index in needed:
        n, _, _, length = passes[index]
        band = slice(start, start + length)
        start += length
        matrices[index] = torch.zeros(length, n, dtype=torch.float64, device=device).scatter_add_(
            1, source[band], weights[band])
    return matrices


def pillow_vertical_first(height: int, width: int, size: tuple[int, int]) -> bool:
    """Whether Pillow resizes ``height x width`` to ``size`` with its vertical pass first: from
    Pillow 13, when the height shrinks by more than twice as many pixels as the width."""
    return PILLOW_ORDERS_PASSES and height - size[0] > 0 and height - size[0] > 2 * (width - size[1])


def resize_on_device(images: list[torch.Tensor], plans: list[ResizePlan], mode: str,
                     pillow_order: bool = False) -> list[torch.Tensor]:
    """uint8 ``[3, H, W]`` images → uint8 ``[3, region height, region width]`` each, on their device
    (module docstring): ``plan.size`` is resized to, ``plan.region`` kept. The horizontal pass
    runs first, as torch's kernel runs it; ``pillow_order``: in the order Pillow chooses
    (``pillow_vertical_first``)."""
    device = images[0].device
    horizontal = pass_matrices([(image.shape[2], plan.size[1], plan.region[1], plan.region[3])
                                for image, plan in zip(images, plans)], mode, device)  # [cols, W] each
    vertical = pass_matrices([(image.shape[1], plan.size[0], plan.region[0], plan.region[2])
                              for image, plan in zip(images, plans)], mode, device)  # [rows, H] each
    resized = []
    for image, plan, columns, rows in zip(images, plans, horizontal, vertical):
        x = image.to(torch.float64)
        passes = [("columns", columns), ("rows", rows)]
        if pillow_order and pillow_vertical_first(*image.shape[1:], plan.size):
            passes.reverse()
        for axis, weights in passes:
            if weights is None:
                continue
            if axis == "columns":  # [3, h, W] x [W, cols] → [3, h, cols]
                x = (x @ weights.T).add_(0.5).floor_().clamp_(0, 255)
            else:  # [rows, H] x [3, H, w] → [3, rows, w]
                x = (weights @ x).add_(0.5).floor_().clamp_(0, 255)
        resized.append(x.to(torch.uint8))
    return resized


def check_device_images(images) -> list[torch.Tensor]:
    """Images for the device path → a list of uint8 ``[3, H, W]`` tensors on one device (grey
    ``[1, H, W]`` repeated); ``TypeError``/``ValueError`` naming what is wrong and the fix."""
    if isinstance(images, torch.Tensor):
        images = list(images) if images.dim() == 4 else [images]
    if not isinstance(images, (list, tuple)) or not images:
        got = "an empty list" if isinstance(images, (list, tuple)) else type(images).__name__
        raise TypeError(f"on_device takes a uint8 tensor [C, H, W], a batch [B, C, H, W] or a non-empty list of "
                        f"[C, H, W] tensors, got {got}")
    checked = []
    for index, image in enumerate(images):
        name = f"images[{index}]"
        if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 3:
            what = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"{name} is {what}; on_device takes uint8 [C, H, W] tensors (C 1 or 3), as GPU "
                             f"JPEG decoding returns them; for other inputs call the processor itself")
        if image.shape[0] not in (1, 3):
            raise ValueError(f"{name} has {image.shape[0]} channels; on_device takes RGB or grey [C, H, W] "
                             f"(C 1 or 3): decode with mode RGB, or call the processor itself for transparency")
        if 0 in image.shape[1:]:
            raise ValueError(f"{name} is {image.shape[1]}x{image.shape[2]} pixels: an image with no pixels "
                             f"cannot be processed")
        if image.device != images[0].device:
            raise ValueError(f"{name} is on {image.device} but images[0] on {images[0].device}; on_device "
                             f"processes the images of one device together")
        checked.append(image.expand(3, -1, -1) if image.shape[0] == 1 else image)
    return checked
