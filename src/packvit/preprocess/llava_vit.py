"""OneVision Encoder preprocessing, producing packed input directly.

- **Images, published processor**: ``CLIPImageProcessor`` with shortest edge 448, centre crop 448,
  bicubic, rescale 1/255 and OpenAI CLIP mean/std (``packvit.preprocess.clip``; ``backend="pil"``
  equals ``CLIPImageProcessorPil``, ``"torch"`` the torchvision-backend class).
- **Images, native resolution**: each image resized (bicubic, aspect ratio kept) to the nearest
  grid of whole 14-pixel patches (``nearest_patch_grid``), scaled down to at most
  ``max_num_patches`` patches; no crop.
- **Video frames**: every frame through the CLIP processor at 224 (16 x 16 patches), each frame
  placed on the 64-slot timeline the model was trained with (``timeline_slots``).

Inputs: one image or a sequence of images, of the types every processor takes
(``packvit.preprocess.common``: PIL images, uint8 arrays and tensors, paths opened upright by their
EXIF orientation); a video is a sequence of such frames or a uint8 array ``[T, H, W, C]``.

``pack_items`` turns normalised items into one ``PackedBatch``: patches ``[total, 3*14*14]`` in the
(C, p, p) layout, ``grid_thw`` and ``patch_positions [total, 3]`` (t, row, column).
``LlavaViTProcessor`` is the family's processor for ``load_processor``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from ..packing import PackedBatch, patchify, unpatchify
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
from .common import RGBPixels, check_max_num_patches, check_patch_size, fit_grid, image_list
from .device import ResizePlan
from .pixels import Normalization, PixelBatch
from .processor import PreprocessorSettings, Processor

__all__ = [
    "LLAVA_VIT_PATCH_SIZE",
    "LLAVA_VIT_IMAGE_SIZE",
    "LLAVA_VIT_FRAME_SIZE",
    "LLAVA_VIT_MAX_NUM_PATCHES",
    "timeline_slots",
    "timeline_positions",
    "nearest_patch_grid",
    "preprocess_images",
    "preprocess_native",
    "preprocess_video",
    "pack_items",
    "llava_vit_preprocess",
    "LlavaViTProcessor",
]

LLAVA_VIT_PATCH_SIZE = 14
LLAVA_VIT_IMAGE_SIZE = 448
LLAVA_VIT_FRAME_SIZE = 224
#: native resolution's default cap: the pre-training token count (448 x 448)
LLAVA_VIT_MAX_NUM_PATCHES = 1024


# Positions: images (0, row, column); videos on the 64-slot timeline


def timeline_slots(frame_indices: Sequence[int] | torch.Tensor, total_frames: int, num_slots: int = 64) -> torch.Tensor:
    """Timeline slot of each sampled frame: ``round(index / (total_frames - 1) * (num_slots - 1))``.

    ``frame_indices`` are indices into the source video (``0 <= index < total_frames``); returns
    int64 ``[len(frame_indices)]``. Rounding (half to even, as Python's ``round``) is the rule of
    the published evaluation and conversion code, and it puts a frame on its nearest slot;
    truncating ``linspace(0, 63, n)`` (the README's recipe) gives the same slots for 8 uniform
    frames but shifts others down by up to one slot (16 frames: 0, 4, 8, 12, 16, 21 ... instead of
    0, 4, 8, 13, 17, 21 ...). A one-frame video sits on slot 0.
    """
    indices = torch.as_tensor(frame_indices, dtype=torch.float64).reshape(-1)
    if total_frames < 1:
        raise ValueError(f"total_frames must be at least 1, got {total_frames}")
    if indices.numel() and (indices.min() < 0 or indices.max() > total_frames - 1):
        raise ValueError(
            f"frame indices must lie in [0, {total_frames - 1}] for a video of {total_frames} frames, got "
            f"values from {indices.min().item():g} to {indices.max().item():g}"
        )
    if total_frames == 1:
        return torch.zeros(indices.shape, dtype=torch.int64)
    return torch.round(indices / (total_frames - 1) * (num_slots - 1)).to(torch.int64)


def timeline_positions(slots: Sequence[int] | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``patch_positions [T*h*w, 3]`` (slot, row, column) of a video whose frame i sits on ``slots[i]``."""
    slots = torch.as_tensor(slots, dtype=torch.int64).reshape(-1)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    frame = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1)  # [h*w, 2]
    # [T, 1, 1] and [1, h*w, 2] → [T, h*w, 3] → [T*h*w, 3]
    t = slots[:, None, None].expand(-1, height * width, 1)
    return torch.cat([t, frame[None].expand(slots.numel(), -1, -1)], dim=-1).reshape(-1, 3)


# Images and videos


def preprocess_images(images, size: int = LLAVA_VIT_IMAGE_SIZE, backend: str = "pil", device=None, *,
                      resample="bicubic", mean=CLIP_MEAN, std=CLIP_STD, **settings) -> list[torch.Tensor]:
    """The published processor: images (one or a sequence) → float32 ``[3, size, size]``
    (shortest edge and centre crop at ``size``, bicubic, CLIP mean/std; ``settings``: those every
    processor has, ``alpha``, ``max_pixels``, ``jpeg_draft``: ``Processor``)."""
    processor = LlavaViTProcessor(image_size=size, resample=resample, mean=mean, std=std, backend=backend,
                                  device=device, **settings)
    return _unpack(processor(images))


def _unpack(batch: PackedBatch) -> list[torch.Tensor]:
    """A batch's items as normalised images ``[3, H, W]`` (one frame) or videos ``[T, 3, H, W]``."""
    items = unpatchify(batch.patches, batch.grid_thw, LLAVA_VIT_PATCH_SIZE, "cpp")
    return [item[0] if item.shape[0] == 1 else item for item in items]


def nearest_patch_grid(height: int, width: int, patch_size: int = LLAVA_VIT_PATCH_SIZE,
                       max_num_patches: int | None = LLAVA_VIT_MAX_NUM_PATCHES) -> tuple[int, int]:
    """Patch grid (rows, columns) of an image at native resolution, each side rounded to the
    nearest whole number of patches.

    At least one patch per side; when that exceeds ``max_num_patches``, the grid scaled by
    ``sqrt(max_num_patches / patches)`` and floored (at least one patch per side), then shrunk
    along its longer side until it fits.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    rows, cols = max(1, round(height / patch_size)), max(1, round(width / patch_size))
    if max_num_patches is None or rows * cols <= max_num_patches:
        return rows, cols
    return fit_grid(rows, cols, max_num_patches)


def _native_pixels(rgb: RGBPixels, max_num_patches: int | None, backend: str, resample, device,
                   patch_size: int = LLAVA_VIT_PATCH_SIZE) -> torch.Tensor:
    """An image at native resolution → uint8 ``[3, 14 rows, 14 cols]`` (``nearest_patch_grid``)."""
    if device is not None and backend == "torch":
        rgb = RGBPixels(hwc=rgb.hwc().to(device))
    rows, cols = nearest_patch_grid(rgb.height, rgb.width, patch_size, max_num_patches)
    target = (rows * patch_size, cols * patch_size)
    return rgb.chw() if target == (rgb.height, rgb.width) else clip_resize(rgb, target, resample, backend)


def preprocess_native(images, max_num_patches: int | None = LLAVA_VIT_MAX_NUM_PATCHES, backend: str = "pil",
                      resample="bicubic", device=None, *, mean=CLIP_MEAN, std=CLIP_STD,
                      patch_size: int = LLAVA_VIT_PATCH_SIZE, **settings) -> list[torch.Tensor]:
    """Images (one or a sequence) at native resolution → float32 ``[3, 14 rows, 14 cols]`` with
    ``nearest_patch_grid``'s grid.

    An image already a whole number of patches per side (within the cap) is not resampled.
    ``max_num_patches`` defaults to 1024, the pre-training token count (448 x 448); ``None``: no cap.
    ``settings`` as in ``preprocess_images``.
    """
    check_max_num_patches(max_num_patches)
    processor = LlavaViTProcessor(patch_size, resample=resample, mean=mean, std=std, native=True, backend=backend,
                                  device=device, **settings)
    pixels = processor.resize_items(image_list(images), [], True, max_num_patches, processor.backend)  # None: no cap
    return _unpack(processor.normalize(pixels))


def preprocess_video(frames, frame_indices: Sequence[int] | None = None, total_frames: int | None = None,
                     size: int = LLAVA_VIT_FRAME_SIZE, num_slots: int = 64, backend: str = "pil",
                     device=None, *, resample="bicubic", mean=CLIP_MEAN, std=CLIP_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled video frames → ``(pixels [T, 3, size, size], slots [T])``.

    ``frame_indices`` are the frames' indices in the source video of ``total_frames`` frames; each
    frame goes to slot ``round(index / (total_frames - 1) * (num_slots - 1))`` of the timeline.
    Without them the frames are taken as sampled uniformly from first to last, i.e. indices
    ``0 .. T-1`` of a ``T``-frame video. ``frames``: a sequence of images or a uint8 array
    ``[T, H, W, C]``.
    """
    frames = image_list(frames, "frames")
    slots = _frame_slots(len(frames), frame_indices, total_frames, num_slots)
    pixels = torch.stack(preprocess_images(frames, size=size, backend=backend, device=device, resample=resample,
                                           mean=mean, std=std))
    return pixels, slots


def _frame_slots(num_frames: int, frame_indices, total_frames, num_slots: int = 64) -> torch.Tensor:
    """The timeline slot of each of ``num_frames`` frames (``preprocess_video``)."""
    if frame_indices is None:
        if total_frames is not None:
            raise ValueError("total_frames needs frame_indices: pass the index of every sampled frame")
        frame_indices, total_frames = range(num_frames), num_frames
    elif total_frames is None:
        raise ValueError("frame_indices need total_frames, the length of the source video")
    slots = timeline_slots(frame_indices, total_frames, num_slots)
    if slots.numel() != num_frames:
        raise ValueError(f"got {slots.numel()} frame indices for {num_frames} frames")
    return slots


def _positions(grid_thw: torch.Tensor, slots: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``patch_positions [total, 3]`` of items with these grids, video ``i``'s frames on ``slots[i]``
    (``None``: frame j at t = j; images at t = 0)."""
    if len(slots) != grid_thw.shape[0]:
        raise ValueError(f"got {len(slots)} slot entries for {grid_thw.shape[0]} items; pass None for images")
    positions = []
    for (frames, rows, cols), item_slots in zip(grid_thw.tolist(), slots):
        item_slots = torch.arange(frames) if item_slots is None else torch.as_tensor(item_slots).reshape(-1)
        if item_slots.numel() != frames:
            raise ValueError(f"an item of {frames} frames got {item_slots.numel()} timeline slots")
        positions.append(timeline_positions(item_slots, rows, cols))
    return torch.cat(positions)


def pack_items(items: Sequence[torch.Tensor], slots: Sequence[torch.Tensor | None] | None = None,
               patch_size: int = LLAVA_VIT_PATCH_SIZE) -> PackedBatch:
    """Normalised images ``[3, H, W]`` and videos ``[T, 3, H, W]``, in any order, → one ``PackedBatch``.

    ``slots[i]`` gives the timeline slot of each frame of video ``i`` (``None``: frame j at t = j;
    images sit at t = 0). The batch carries ``patch_positions`` ``[total, 3]``.
    """
    items = list(items)
    slots = [None] * len(items) if slots is None else list(slots)
    if len(slots) != len(items):
        raise ValueError(f"got {len(slots)} slot entries for {len(items)} items; pass None for images")
    patches, grid_thw = patchify(items, patch_size, layout="cpp")
    return PackedBatch(patches, grid_thw, "cpp", _positions(grid_thw, slots))


def llava_vit_preprocess(images=None, videos=None, *, native: bool = False, max_num_patches: int | None = None,
                         backend: str = "pil", device=None, **settings) -> PackedBatch:
    """Images (the published processor, or ``native`` resolution with at most ``max_num_patches``
    patches, default 1024), then videos (each a sequence of uniformly sampled frames or a uint8
    array ``[T, H, W, C]``, at 224 on the 64-slot timeline) → one ``PackedBatch`` in the
    (C, p, p) layout with ``patch_positions`` (``settings`` as in ``preprocess_images``)."""
    processor = LlavaViTProcessor(native=native, backend=backend, device=device, **settings)
    return processor(images, videos, max_num_patches=max_num_patches)


class LlavaViTProcessor(Processor):
    """The OneVision Encoder's processor: the published CLIP processor (448 crop) unless ``native``
    (``nearest_patch_grid`` under ``max_num_patches``, default 1024); videos always at
    ``frame_size`` (224) on the 64-slot timeline, frames sampled uniformly from first to last
    (for other samplings, ``preprocess_video`` with ``frame_indices`` and ``pack_items``).

    ``image_size`` sets the shortest edge and the crop of images together; ``size``/``crop_size``
    (CLIP's), ``resample``, ``mean`` and ``std`` are the published processor's, as read from
    ``preprocessor_config.json``.
    """

    family = "llava_vit"
    reference_converts_rgb = True
    patch_layout = "cpp"
    takes_videos = True
    default_max_num_patches = LLAVA_VIT_MAX_NUM_PATCHES
    override_names = Processor.override_names + ("image_size", "device")

    def __init__(self, patch_size: int = LLAVA_VIT_PATCH_SIZE, *, image_size: int | None = None,
                 size=LLAVA_VIT_IMAGE_SIZE, crop_size=(LLAVA_VIT_IMAGE_SIZE,) * 2, frame_size: int = LLAVA_VIT_FRAME_SIZE,
                 resample="bicubic", mean=CLIP_MEAN, std=CLIP_STD, max_num_patches: int | None = None,
                 native: bool | None = None, backend: str | None = None, device=None, **settings):
        patch_size = check_patch_size(patch_size)
        if image_size is not None:
            size, crop_size = image_size, (image_size, image_size)
        for name, side in (("image size", crop_size), ("frame_size", frame_size)):
            if side is None or any(s % patch_size for s in ((side,) if isinstance(side, int) else side)):
                raise ValueError(f"{name} {side} must be a multiple of the patch size {patch_size}")
        resample_name(resample)
        self.size, self.crop_size, self.frame_size = size, crop_size, frame_size
        self.resample, self.mean, self.std, self.device = resample, mean, std, device
        super().__init__(patch_size, max_num_patches=max_num_patches, native=native, backend=backend, **settings)

    def keeps_aspect_ratio(self, native: bool | None) -> bool:
        return bool(native)

    def fixed_size(self) -> str:
        crop_h, crop_w = self.crop_size
        return f"resizes and crops every image to {crop_h}x{crop_w} (the published CLIP processor)"

    def normalization(self, backend: str) -> Normalization:
        return Normalization(tuple(self.mean), tuple(self.std), backend)

    def target_size(self, height, width, native, max_num_patches) -> tuple[int, int] | None:
        if not native:
            return clip_target_size(height, width, self.size)
        rows, cols = nearest_patch_grid(height, width, self.patch_size, max_num_patches)
        target = (rows * self.patch_size, cols * self.patch_size)
        return None if target == (height, width) else target

    def resize_image(self, rgb, native, max_num_patches, backend) -> torch.Tensor:
        if native:
            return _native_pixels(rgb, max_num_patches, backend, self.resample, self.device, self.patch_size)
        return clip_resize_center_crop(rgb, self.size, self.crop_size, self.resample, backend, self.device)

    def resize_plan(self, height, width, native, max_num_patches, backend) -> ResizePlan:
        if native:
            return ResizePlan.whole(self.target_size(height, width, native, max_num_patches) or (height, width))
        return clip_resize_plan(height, width, self.size, self.crop_size, backend)

    def device_resample(self) -> str:
        return resample_name(self.resample)

    def pack_pixels(self, items: list[torch.Tensor], backend: str, slots: list | None = None) -> PixelBatch:
        """uint8 images ``[3, H, W]`` and videos ``[T, 3, H, W]`` → their ``PixelBatch`` with
        ``patch_positions`` (``slots[i]``: video ``i``'s timeline slots; ``None``: an image)."""
        patches, grid_thw = patchify(items, self.patch_size, layout="cpp")  # uint8 [total, 3 * 14 * 14]
        slots = [None] * len(items) if slots is None else slots
        return self.pixel_batch(patches, grid_thw, backend, patch_positions=_positions(grid_thw, slots))

    def resize_items(self, images, videos, native, max_num_patches, backend) -> PixelBatch:
        """Images, then videos (every frame through the CLIP processor at ``frame_size``), with
        ``patch_positions``: images at t = 0, each video's frames on the 64-slot timeline."""
        frame = self.frame_size
        image_target = functools.partial(self.target_size, native=native, max_num_patches=max_num_patches)
        frame_target = functools.partial(clip_target_size, size=frame)
        items = [self.resize_image(self.rgb(image, backend, image_target), native, max_num_patches, backend)
                 for image in images]
        for frames in videos:
            items.append(torch.stack([  # [T, 3, frame, frame]
                clip_resize_center_crop(self.rgb(image, backend, frame_target), frame, (frame, frame), self.resample,
                                        backend, self.device)
                for image in frames
            ]))
        slots = [None] * len(images) + [_frame_slots(len(frames), None, None) for frames in videos]
        return self.pack_pixels(items, backend, slots)

    @classmethod
    def from_checkpoint(cls, config, fields: PreprocessorSettings, **overrides) -> "LlavaViTProcessor":
        side = config.image_size
        clip = settings_from_clip_fields(fields, side, (side, side))
        if clip["crop_size"] is None:
            raise ValueError(
                f"{fields.source} turns the centre crop off; packvit's OneVision processor reproduces the published "
                f"resize and crop (images of one size), or native resolution with native=True"
            )
        return cls(config.patch_size, **clip, **overrides)
