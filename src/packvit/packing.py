"""The packed batch: patches of many items in one tensor, and its host-side metadata.

A packed batch is ``patches [total_patches, patch_dim]`` plus ``grid_thw [num_items, 3]``, the
(t, h, w) patch grid of each item. Item ``i`` owns ``t_i * h_i * w_i`` consecutive rows, in
(t, row, column) order. Everything the encoder needs to know about the batch's shape is computed
here, once, on the host, from ``grid_thw``: no device tensor is ever read back.

Patch layouts: ``"ppc"`` flattens a patch as (row-in-patch, column-in-patch, channel), the layout
of SigLIP2's processor and of ``convert_to_patches``; ``"cpp"`` flattens it as (channel, row,
column), the layout of a Conv2d weight and of the OneVision packing format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "PATCH_LAYOUTS",
    "BatchOrigin",
    "PackedBatch",
    "SegmentLayout",
    "validate_grid_thw",
    "validate_patches",
    "validate_patch_positions",
    "item_token_counts",
    "token_positions",
    "host_staging",
    "to_device",
    "split_items",
    "GreedyPacker",
    "pack_by_budget",
    "prefix_token_index",
    "offsets_within_items",
    "patchify",
    "patchify_images",
    "unpatchify",
]

PATCH_LAYOUTS = ("ppc", "cpp")
#: the most tokens one packed sequence may hold: cu_seqlens are int32
MAX_TOTAL_TOKENS = 2**31 - 1


def validate_grid_thw(grid_thw) -> torch.Tensor:
    """Checks a grid and returns it as a host int64 tensor ``[num_items, 3]``.

    Raises ``ValueError`` for a grid that is not 2-D with 3 columns, is empty, holds non-integer
    values, or holds entries that are not positive.
    """
    if not isinstance(grid_thw, torch.Tensor):
        grid_thw = torch.as_tensor(grid_thw)
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(
            f"grid_thw must have shape [num_items, 3] (t, h, w in patches per item), got "
            f"{tuple(grid_thw.shape)}; for single images use rows of (1, h, w)."
        )
    if grid_thw.shape[0] == 0:
        raise ValueError("grid_thw is empty: a packed batch needs at least one item.")
    if grid_thw.is_floating_point() or grid_thw.is_complex() or grid_thw.dtype == torch.bool:
        if grid_thw.dtype == torch.bool or not torch.equal(grid_thw, grid_thw.round()):
            raise ValueError(
                f"grid_thw must hold whole patch counts, got dtype {grid_thw.dtype} with "
                f"non-integer values; pass an integer tensor such as torch.tensor(..., dtype=torch.long)."
            )
    if grid_thw.device.type == "meta":
        raise ValueError(
            "grid_thw is on the meta device and has no values; build it on the CPU (it is host metadata: "
            "packvit reads it before anything runs on the model's device)."
        )
    if grid_thw.is_floating_point() and (grid_thw.abs() >= 2.0**62).any():
        raise ValueError("grid_thw holds values too large to be patch counts; pass the (t, h, w) patches per item.")
    grid_thw = grid_thw.detach().to(device="cpu", dtype=torch.int64)
    if (grid_thw <= 0).any():
        bad = grid_thw[(grid_thw <= 0).any(dim=1)][0].tolist()
        raise ValueError(
            f"grid_thw entries must be positive, got the row {bad}; every item needs at least "
            f"one frame and one row and column of patches."
        )
    # every count must survive int64 arithmetic and fit the int32 offsets of the attention kernels
    too_large = [row for row in grid_thw.tolist() if row[0] * row[1] * row[2] > MAX_TOTAL_TOKENS]
    if too_large:
        raise ValueError(
            f"grid_thw row {too_large[0]} describes {too_large[0][0] * too_large[0][1] * too_large[0][2]} patches, "
            f"more than a packed sequence can hold ({MAX_TOTAL_TOKENS}, the int32 limit of cu_seqlens); "
            f"resize the item or split it."
        )
    return grid_thw


def validate_patch_positions(patch_positions: torch.Tensor, total_patches: int) -> None:
    """Checks ``patch_positions [total_patches, 3]``: integer (t, row, column), non-negative where
    they are on the host."""
    if not isinstance(patch_positions, torch.Tensor) or tuple(patch_positions.shape) != (total_patches, 3):
        shape = tuple(patch_positions.shape) if isinstance(patch_positions, torch.Tensor) else type(patch_positions).__name__
        raise ValueError(
            f"patch_positions must be [total_patches, 3] = [{total_patches}, 3] (t, row, column per patch, in "
            f"packed order), got {shape}; build video positions with packvit.preprocess.llava_vit.timeline_positions."
        )
    if patch_positions.is_floating_point() or patch_positions.is_complex() or patch_positions.dtype == torch.bool:
        raise ValueError(
            f"patch_positions must hold integer (t, row, column) indices, got {patch_positions.dtype}; pass a torch.long tensor"
        )
    if patch_positions.device.type == "cpu" and (patch_positions < 0).any():
        raise ValueError("patch_positions must be non-negative (t on the timeline, row and column in patches)")


def item_token_counts(grid_thw: torch.Tensor) -> list[int]:
    """Number of patches of each item, ``t * h * w``, as Python ints."""
    return grid_thw.prod(dim=1).tolist()


def validate_patches(
    patches: torch.Tensor, grid_thw: torch.Tensor, patch_dim: int | None = None, device: torch.device | None = None
) -> None:
    """Checks that ``patches [total_patches, patch_dim]`` matches a validated ``grid_thw`` and, if
    ``device`` is given, lives there."""
    if not isinstance(patches, torch.Tensor) or patches.dim() != 2:
        shape = tuple(patches.shape) if isinstance(patches, torch.Tensor) else type(patches).__name__
        raise ValueError(
            f"patches must be a 2-D tensor [total_patches, patch_dim], got {shape}; use "
            f"packvit.patchify to turn images into packed patches."
        )
    expected_rows = int(grid_thw.prod(dim=1).sum())
    if patches.shape[0] != expected_rows:
        raise ValueError(
            f"patches has {patches.shape[0]} rows but grid_thw describes {expected_rows} "
            f"(the sum of t*h*w over its {grid_thw.shape[0]} items); pass the grid that produced "
            f"these patches."
        )
    if patch_dim is not None and patches.shape[1] != patch_dim:
        raise ValueError(
            f"patches have patch_dim {patches.shape[1]} but the model expects {patch_dim} "
            f"(channels * patch_size * patch_size); patchify with the model's patch size."
        )
    if not patches.is_floating_point():
        raise ValueError(
            f"patches are {patches.dtype}, not normalised pixels; run the model's processor "
            f"(packvit.preprocess) or rescale and normalise them to floating point first."
        )
    if device is not None and patches.device != torch.device(device):
        raise ValueError(
            f"patches are on {patches.device} but the model is on {device}; move them with "
            f"patches.to(model.device) (grid_thw stays on the CPU)."
        )


@dataclass
class SegmentLayout:
    """Attention segments of a packed sequence, known on the host.

    ``lengths`` are the segment lengths; ``cu_seqlens`` is ``[0, cumsum(lengths)]`` as an int32
    host tensor, and ``max_seqlen`` a Python int, so a kernel call never reads the device.
    """

    lengths: tuple[int, ...]
    cu_seqlens_host: torch.Tensor
    max_seqlen: int
    total: int

    @classmethod
    def from_lengths(cls, lengths: Sequence[int]) -> "SegmentLayout":
        """Segments of the given lengths: whole positive numbers, ``MAX_TOTAL_TOKENS`` in all at most."""
        lengths = tuple(lengths.tolist() if isinstance(lengths, (torch.Tensor, np.ndarray)) else lengths)
        if not lengths:
            raise ValueError("segment lengths are empty: a packed sequence needs at least one segment")
        if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in lengths):
            bad = next(n for n in lengths if not isinstance(n, (int, np.integer)) or isinstance(n, bool))
            raise ValueError(f"segment lengths must be whole numbers, got {bad!r} ({type(bad).__name__})")
        lengths = tuple(int(n) for n in lengths)
        if min(lengths) <= 0:
            raise ValueError(f"segment lengths must be positive, got {min(lengths)} among {lengths[:8]}")
        total = sum(lengths)
        if total > MAX_TOTAL_TOKENS:
            raise ValueError(
                f"segments of {total} tokens in all exceed the int32 offsets of the attention kernels "
                f"({MAX_TOTAL_TOKENS}); split the pack into smaller ones"
            )
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.from_numpy(np.cumsum(np.asarray(lengths, dtype=np.int64)).astype(np.int32))
        return cls(lengths, cu, max(lengths), total)

    @classmethod
    def one_per_item(cls, num_items: int) -> "SegmentLayout":
        """One token per item: the query layout of an attention-pooling head."""
        return cls.from_lengths([1] * num_items)

    @property
    def num_segments(self) -> int:
        return len(self.lengths)

    def cu_seqlens(self, device: torch.device | str) -> torch.Tensor:
        """``cu_seqlens`` on ``device``, by one non-blocking copy."""
        return to_device(self.cu_seqlens_host, torch.device(device))


def host_staging(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The host tensor to copy ``host`` to ``device`` from without blocking: a pinned copy for
    CUDA, ``host`` itself elsewhere. The copy into pinned memory goes through numpy (see the note
    above ``offsets_within_items``)."""
    if device.type != "cuda":
        return host
    pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
    try:
        pinned.numpy()[...] = host.detach().numpy()
    except TypeError:  # a dtype numpy lacks (bfloat16, ...)
        pinned.copy_(host)
    return pinned


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``: itself on the CPU, else one non-blocking copy (from pinned
    memory for CUDA, ``host_staging``)."""
    if device.type == "cpu":
        return host
    return host_staging(host, device).to(device, non_blocking=True)


# Per-token index maps are built on the host with numpy. torch's CPU kernels parallelise arrays of
# a pack's size over their thread pool, which becomes far slower once torch.compile has run in the
# process (H200 host, 128 images of 256 patches: 0.6 ms before, 16 ms after, 0.03 ms in numpy), and
# the host would then fall behind the GPU.


def offsets_within_items(counts: np.ndarray) -> np.ndarray:
    """``0 .. n-1`` for each item of ``n`` tokens, concatenated: int64 ``[sum(counts)]``."""
    counts = np.asarray(counts, dtype=np.int64)
    starts = np.cumsum(counts) - counts
    return np.arange(counts.sum(), dtype=np.int64) - np.repeat(starts, counts)


def token_positions(grid_thw: torch.Tensor) -> torch.Tensor:
    """Integer (t, row, column) of every patch token, ``[total_patches, 3]`` int64 on the host,
    computed without a loop over items."""
    t, h, w = grid_thw.to(torch.int64).numpy().T
    counts = t * h * w
    index = offsets_within_items(counts)
    frame_size, width = np.repeat(h * w, counts), np.repeat(w, counts)
    return torch.from_numpy(np.stack([index // frame_size, (index % frame_size) // width, index % width], axis=-1))


def split_items(x: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    """Splits a packed ``[total, ...]`` tensor back into one tensor per item."""
    lengths = [int(n) for n in lengths]
    if x.shape[0] != sum(lengths):
        raise ValueError(f"cannot split {x.shape[0]} rows into items of {sum(lengths)} rows in total")
    return list(torch.split(x, lengths, dim=0))


class GreedyPacker:
    """Consecutive items into packs of at most ``budget`` tokens, one item at a time: the one
    packing rule of packvit (an item larger than the budget makes a pack of its own).

    ``add(count)`` returns whether the item opens a new pack, so a streaming caller closes the
    current pack first; ``pack_by_budget`` is the same rule over a list.
    """

    def __init__(self, budget: int):
        if not isinstance(budget, (int, np.integer)) or isinstance(budget, bool) or budget < 1:
            raise ValueError(f"a token budget is a positive whole number of tokens, got {budget!r}")
        self.budget = int(budget)
        self.used = 0

    def add(self, count: int) -> bool:
        """Counts an item of ``count`` tokens in; ``True`` when it does not fit the current pack."""
        opens = self.used > 0 and self.used + count > self.budget
        self.used = count if opens else self.used + count
        return opens

    def reset(self) -> None:
        """The current pack was closed by the caller."""
        self.used = 0


def pack_by_budget(counts: Sequence[int], budget: int) -> list[range]:
    """Item indices grouped into consecutive packs of at most ``budget`` tokens (``GreedyPacker``'s rule)."""
    packer, packs, start = GreedyPacker(budget), [], 0
    for index, count in enumerate(counts):
        if packer.add(int(count)):
            packs.append(range(start, index))
            start = index
    if len(counts) > start:
        packs.append(range(start, len(counts)))
    return packs


def prefix_token_index(patch_counts: Sequence[int], num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where prefix and patch tokens go when every segment is ``[prefix tokens, patches]``.

    Returns host int64 tensors ``prefix_rows [num_items, num_prefix_tokens]`` and
    ``patch_rows [total_patches]``: row indices into the sequence of
    ``total_patches + num_items * num_prefix_tokens`` tokens.
    """
    counts = np.array([int(n) for n in patch_counts], dtype=np.int64)
    segment_starts = np.zeros_like(counts)
    segment_starts[1:] = np.cumsum(counts + num_prefix_tokens)[:-1]
    prefix_rows = segment_starts[:, None] + np.arange(num_prefix_tokens, dtype=np.int64)
    patch_rows = np.repeat(segment_starts + num_prefix_tokens, counts) + offsets_within_items(counts)
    return torch.from_numpy(prefix_rows), torch.from_numpy(patch_rows)


def _check_layout(layout: str) -> None:
    if layout not in PATCH_LAYOUTS:
        raise ValueError(f"patch layout must be one of {PATCH_LAYOUTS}, got {layout!r}")


def _patchify_frames(frames: torch.Tensor, patch_size: int, layout: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``frames [T, C, H, W]`` → ``([T*h*w, C*p*p], (T, h, w))``; H and W must divide by p."""
    t, c, height, width = frames.shape
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image size {height}x{width} is not a multiple of the patch size {patch_size}; resize "
            f"or crop it first (packvit.preprocess does this for each model)."
        )
    h, w = height // patch_size, width // patch_size
    x = frames.reshape(t, c, h, patch_size, w, patch_size)
    # [T, C, h, p, w, p] → [T, h, w, p, p, C] or [T, h, w, C, p, p]
    x = x.permute(0, 2, 4, 3, 5, 1) if layout == "ppc" else x.permute(0, 2, 4, 1, 3, 5)
    return x.reshape(t * h * w, c * patch_size * patch_size), (t, h, w)


def patchify(pixels, patch_size: int, layout: str = "ppc") -> tuple[torch.Tensor, torch.Tensor]:
    """Packs images or videos into ``(patches [total_patches, C*p*p], grid_thw [num_items, 3])``.

    ``pixels`` is a batch ``[B, C, H, W]`` (B images), a video ``[T, C, H, W]`` passed inside a
    list, or a list mixing images ``[C, H, W]`` and videos ``[T, C, H, W]`` of any sizes that are
    multiples of ``patch_size``.
    """
    _check_layout(layout)
    if isinstance(pixels, torch.Tensor):
        if pixels.dim() != 4:
            raise ValueError(
                f"a tensor passed to patchify must be a batch [B, C, H, W], got {tuple(pixels.shape)}; "
                f"pass a single image as [1, C, H, W] and a video as a list holding [T, C, H, W]."
            )
        items = [pixels[i : i + 1] for i in range(pixels.shape[0])]
    else:
        items = []
        for item in pixels:
            if item.dim() == 3:
                items.append(item.unsqueeze(0))
            elif item.dim() == 4:
                items.append(item)
            else:
                raise ValueError(f"each item must be [C, H, W] or [T, C, H, W], got {tuple(item.shape)}")
    if not items:
        raise ValueError("patchify needs at least one image")
    patches, grids = zip(*(_patchify_frames(item, patch_size, layout) for item in items))
    return torch.cat(patches), torch.tensor(grids, dtype=torch.int64)


def patchify_images(images: Sequence[torch.Tensor], patch_size: int, layout: str = "ppc") -> tuple[torch.Tensor, torch.Tensor]:
    """``patchify`` for a list of differently sized images ``[C, H, W]`` (or videos)."""
    return patchify(list(images), patch_size, layout)


def unpatchify(
    patches: torch.Tensor, grid_thw, patch_size: int, layout: str = "ppc", num_channels: int = 3
) -> list[torch.Tensor]:
    """Inverse of ``patchify``: one ``[T, C, H, W]`` tensor per item."""
    _check_layout(layout)
    grid_thw = validate_grid_thw(grid_thw)
    validate_patches(patches, grid_thw, num_channels * patch_size * patch_size)
    items = []
    for item_patches, (t, h, w) in zip(split_items(patches, item_token_counts(grid_thw)), grid_thw.tolist()):
        if layout == "ppc":
            # [t*h*w, p*p*C] → [t, h, w, p, p, C] → [t, C, h, p, w, p]
            x = item_patches.reshape(t, h, w, patch_size, patch_size, num_channels).permute(0, 5, 1, 3, 2, 4)
        else:
            # [t*h*w, C*p*p] → [t, h, w, C, p, p] → [t, C, h, p, w, p]
            x = item_patches.reshape(t, h, w, num_channels, patch_size, patch_size).permute(0, 3, 1, 4, 2, 5)
        items.append(x.reshape(t, num_channels, h * patch_size, w * patch_size))
    return items


@dataclass(frozen=True)
class BatchOrigin:
    """What made a batch: the processor's ``family`` and its normalisation (per-channel
    ``image_mean``, ``image_std``). A model refuses a batch another family's processor made."""

    family: str
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]


@dataclass
class PackedBatch:
    """Patches of many items in one tensor, with the grid that describes them.

    ``patches [total_patches, patch_dim]`` flattened in ``patch_layout`` (``"ppc"`` or ``"cpp"``),
    ``grid_thw [num_items, 3]`` (host int64), and optionally ``patch_positions [total_patches, 3]``
    (integer (t, row, column) of every patch, for models with positions of their own choosing: the
    OneVision video timeline). ``origin``: the processor that made the batch (``None`` for a
    hand-built one). A model refuses a batch in another layout than its own.
    """

    patches: torch.Tensor
    grid_thw: torch.Tensor
    patch_layout: str = "ppc"
    patch_positions: torch.Tensor | None = None
    origin: BatchOrigin | None = None

    def __post_init__(self):
        _check_layout(self.patch_layout)
        self.grid_thw = validate_grid_thw(self.grid_thw)
        validate_patches(self.patches, self.grid_thw)
        if self.patch_positions is not None:
            validate_patch_positions(self.patch_positions, self.patches.shape[0])

    @property
    def num_items(self) -> int:
        return self.grid_thw.shape[0]

    @property
    def token_counts(self) -> list[int]:
        return item_token_counts(self.grid_thw)

    @property
    def patch_dim(self) -> int:
        return self.patches.shape[1]

    def _replace(self, patches: torch.Tensor, patch_positions: torch.Tensor | None) -> "PackedBatch":
        return PackedBatch(patches, self.grid_thw, self.patch_layout, patch_positions, self.origin)

    def to(self, device=None, dtype=None) -> "PackedBatch":
        """The batch with its patches on ``device`` in ``dtype`` (a non-blocking copy; the grid and
        the positions stay host metadata)."""
        return self._replace(self.patches.to(device=device, dtype=dtype, non_blocking=True), self.patch_positions)

    def pin_memory(self) -> "PackedBatch":
        """The batch with its patches in pinned host memory (what a DataLoader's ``pin_memory`` calls)."""
        return self._replace(self.patches.pin_memory(), self.patch_positions)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Splits a model output ``[total_patches, ...]`` into one tensor per item."""
        return split_items(x, self.token_counts)

    def frames_as_items(self) -> "PackedBatch":
        """Every frame of every item as an item of its own: rows ``(t, h, w)`` become ``t`` rows
        ``(1, h, w)``. The patches stay as they are (a clip's patches are already frame after frame)."""
        frames = torch.repeat_interleave(self.grid_thw[:, 1:], self.grid_thw[:, 0], dim=0)  # [sum(t), 2]
        grid = torch.cat([torch.ones(frames.shape[0], 1, dtype=torch.int64), frames], dim=1)
        return PackedBatch(self.patches, grid, self.patch_layout, self.patch_positions, self.origin)

    @classmethod
    def concat(cls, batches: Sequence["PackedBatch"]) -> "PackedBatch":
        """Joins packed batches into one, item order kept (its ``origin`` is theirs when they share one)."""
        if not batches:
            raise ValueError("PackedBatch.concat needs at least one batch")
        layouts = {b.patch_layout for b in batches}
        if len(layouts) != 1:
            raise ValueError(f"cannot join packed batches of different patch layouts {sorted(layouts)}")
        with_positions = [b.patch_positions is not None for b in batches]
        if any(with_positions) != all(with_positions):
            raise ValueError(
                "cannot join packed batches where some carry patch_positions and some do not; give every "
                "batch patch_positions (e.g. packvit.packing.token_positions(batch.grid_thw)), or none"
            )
        origins = {b.origin for b in batches}
        if len(origins) != 1:
            raise ValueError(
                f"cannot join batches made by different processors ({sorted(str(o) for o in origins)}): each "
                f"model reads its own family's patches; encode them separately"
            )
        positions = torch.cat([b.patch_positions for b in batches]) if all(with_positions) else None
        return cls(torch.cat([b.patches for b in batches]), torch.cat([b.grid_thw for b in batches]),
                   layouts.pop(), positions, origins.pop())
