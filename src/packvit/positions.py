"""Position information by technique: grid coordinates, rotary tables (2-D and 3-D), 2-D sin-cos,
and learned tables resized to any grid.

Everything that depends only on a pack's grids is computed on the host from ``grid_thw`` (numpy,
no loop over items) and copied to the device once; what depends on parameters (a learned table)
is computed on the device from it, in a few kernels for the whole pack.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .packing import offsets_within_items, to_device

__all__ = [
    "normalized_patch_centres",
    "RotaryTable",
    "rotate_half",
    "rotate_interleaved",
    "rope_2d_inv_freq",
    "rope_2d_cos_sin",
    "rope_3d_axis_widths",
    "rope_3d_inv_freqs",
    "rope_3d_cos_sin",
    "sincos_2d",
    "RESIZE_MODES",
    "RESIZE_SUPPORT",
    "resize_kernel",
    "resize_weights",
    "resize_weights_tensor",
    "resize_table",
    "TableLookup",
]


# ---------------------------------------------------------------------------------------------
# Grid coordinates


def normalized_patch_centres(grid_thw: torch.Tensor) -> torch.Tensor:
    """(y, x) = (2 (row + 0.5) / h - 1, 2 (col + 0.5) / w - 1) of every patch, in packed order:
    float32 ``[total_patches, 2]``, each axis normalised by its own length (frames repeat).

    Computed in float32, operation for operation as DINOv3's reference computes it.
    """
    t, heights, widths = grid_thw.to(torch.int64).numpy().T
    counts = t * heights * widths
    heights, widths = np.repeat(heights, counts), np.repeat(widths, counts)  # [total] each
    index_in_frame = offsets_within_items(counts) % (heights * widths)
    rows, cols = index_in_frame // widths, index_in_frame % widths
    centre_y = (rows.astype(np.float32) + np.float32(0.5)) / heights.astype(np.float32)
    centre_x = (cols.astype(np.float32) + np.float32(0.5)) / widths.astype(np.float32)
    # [total, 2] in [0, 1] → (-1, 1)
    return torch.from_numpy(np.float32(2.0) * np.stack([centre_y, centre_x], axis=-1) - np.float32(1.0))


# ---------------------------------------------------------------------------------------------
# Rotary tables


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[..., hd]`` → ``[-x[..., hd/2:], x[..., :hd/2]]`` (dimension j pairs with j + hd/2)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """``[..., hd]`` → rot(x) with ``rot[2i] = -x[2i+1]``, ``rot[2i+1] = x[2i]``."""
    pairs = x.unflatten(-1, (-1, 2))  # [..., hd] → [..., hd/2, 2]
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


@dataclass
class RotaryTable:
    """Per-token ``cos, sin [S, head_dim]`` applied to queries and keys ``[S, H, head_dim]``.

    ``pairing``: ``"half"`` (dimension j with j + hd/2, the tables in the activation dtype) or
    ``"interleaved"`` (dimensions 2i and 2i+1, computed in float32 and cast back). Rows with
    cos 1, sin 0 leave their token unchanged.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    pairing: str

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos[:, None, :], self.sin[:, None, :]  # [S, 1, hd], broadcast over heads
        if self.pairing == "half":
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # a no-op but under autocast
            return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        q32, k32 = q.float(), k.float()
        return ((q32 * cos + rotate_interleaved(q32) * sin).to(q.dtype),
                (k32 * cos + rotate_interleaved(k32) * sin).to(k.dtype))


def rope_2d_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """Frequencies ``theta ** (-4k / head_dim)`` for ``k < head_dim / 4``: float32 ``[head_dim // 4]``
    (each of the axes y, x gets ``head_dim / 4`` frequencies, each on two dimension pairs)."""
    if head_dim <= 0 or head_dim % 4:
        raise ValueError(
            f"a 2-D RoPE needs a head_dim that is a positive multiple of 4, got {head_dim}; choose hidden_size "
            f"and num_attention_heads so that hidden_size / num_attention_heads is a multiple of 4."
        )
    inv_freq = 1 / theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32, device=device)
    if inv_freq.numel() != head_dim // 4:
        raise ValueError(f"head_dim {head_dim} gives {inv_freq.numel()} RoPE frequencies instead of {head_dim // 4}")
    return inv_freq


def rope_2d_cos_sin(coordinates: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[S, head_dim]`` in ``dtype`` for float32 (y, x) ``coordinates [S, 2]``.

    Angles ``2 pi * coordinate * inv_freq`` laid out [y | x | y | x] (the ``"half"`` pairing),
    computed in float32 on the coordinates' device and cast to ``dtype``.
    """
    inv_freq = rope_2d_inv_freq(head_dim, theta, coordinates.device)
    # [S, 2, 1] * [1, 1, hd/4] → [S, 2, hd/4] → [S, hd/2] → [S, hd]
    angles = 2 * torch.pi * coordinates[:, :, None] * inv_freq[None, None, :]
    angles = angles.flatten(1, 2).tile(2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


# The OneVision 3-D RoPE: for a token at integer (t, r, c) the angles are
# f = [t * w_t | r * w_h | c * w_w] (width hd/2), with ladders w_axis[k] = theta ** (-k / axis_width)
# and axis widths 4u : 6u : 6u, u = hd / 32; expanded by concatenation, a = [f | f], and applied
# with the interleaved pairing
#     out[2i]   = x[2i]   cos a[2i]   - x[2i+1] sin a[2i]
#     out[2i+1] = x[2i+1] cos a[2i+1] + x[2i]   sin a[2i+1].
# The two entries of a pair use two different angles, so this is not a rotation; the published
# weights depend on it exactly.


def rope_3d_axis_widths(head_dim: int) -> tuple[int, int, int]:
    """Angle widths (t, h, w) of the 4:6:6 split of ``head_dim / 2``: hd 64 → (8, 12, 12)."""
    if head_dim <= 0 or head_dim % 32:
        raise ValueError(
            f"the 3-D RoPE splits head_dim / 2 into 16 units (4 temporal, 6 height, 6 width), so head_dim "
            f"must be a positive multiple of 32; got head_dim {head_dim}. Choose hidden_size and "
            f"num_attention_heads so that hidden_size / num_attention_heads is 32, 64, 96, 128, ..."
        )
    unit = head_dim // 32
    return 4 * unit, 6 * unit, 6 * unit


def rope_3d_inv_freqs(head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, ...]:
    """The three frequency ladders ``theta ** (-k / width)``, ``k < width``, float32 each."""
    return tuple(
        1.0 / (theta ** (torch.arange(width, dtype=torch.float32, device=device) / width))
        for width in rope_3d_axis_widths(head_dim)
    )


def rope_3d_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``cos(a), sin(a)`` ``[S, head_dim]`` with ``a = [f | f]`` for integer (t, r, c)
    ``positions [S, 3]``, on the positions' device."""
    inv_t, inv_h, inv_w = rope_3d_inv_freqs(head_dim, theta, positions.device)
    positions = positions.to(torch.float32)
    # [S, 1] * [1, width] per axis → [S, hd/2] → [S, hd]
    angles = torch.cat([positions[:, 0:1] * inv_t, positions[:, 1:2] * inv_h, positions[:, 2:3] * inv_w], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


# ---------------------------------------------------------------------------------------------
# Sin-cos embedding


def sincos_2d(grid_thw: torch.Tensor, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 2-D sin-cos embedding of every patch of a pack: ``[total_patches, dim]``.

    The patch at row r, column c gets ``[sin(c*w) | cos(c*w) | sin(r*w) | cos(r*w)]`` with
    ``w_k = 10000^(-k/(dim/4))``, computed in float64 (float32 on MPS) from one 1-D table over
    ``0 .. max side`` and cast to ``dtype``: value for value AIMv2's per-grid table.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs a hidden size divisible by 4, got {dim}")
    t, heights, widths = grid_thw.to(torch.int64).numpy().T
    counts = t * heights * widths
    widths_per_token = np.repeat(widths, counts)
    index_in_frame = offsets_within_items(counts) % np.repeat(heights * widths, counts)
    rows, cols = index_in_frame // widths_per_token, index_in_frame % widths_per_token
    quarter = dim // 4
    compute_dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=compute_dtype, device=device) / quarter)  # [D/4]
    side = int(max(heights.max(), widths.max()))
    angles = torch.arange(side, dtype=compute_dtype, device=device).outer(omega)  # [side, D/4]
    table = torch.cat([angles.sin(), angles.cos()], dim=1).to(dtype)  # [side, D/2]
    halves = table[to_device(torch.from_numpy(np.stack([cols, rows])), torch.device(device))]  # [2, S, D/2]: column, row part
    return torch.cat([halves[0], halves[1]], dim=1)  # [S, D]


# ---------------------------------------------------------------------------------------------
# Learned tables resized to a grid
#
# Antialiased resampling with explicit separable weights, the same on every device: output pixel i
# of a side resized from n to m samples source pixel j with weight k((j + 0.5 - (i + 0.5) * s) / a),
# s = n / m, a = max(s, 1), normalised over j; k is the triangle (bilinear) or the cubic
# convolution kernel with a = -0.5 (bicubic). This is what PyTorch's CUDA F.interpolate(antialias=
# True), Pillow and JAX's scale_and_translate compute; PyTorch's CPU kernel is wrong whenever an
# output side is 1 and the other side is resized (16x16 → 23x1 is off by up to 1.2).

RESIZE_MODES = ("bilinear", "bicubic")


#: half-width of each mode's kernel, in source pixels at scale 1
RESIZE_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}


def resize_kernel(distance: torch.Tensor, mode: str) -> torch.Tensor:
    """The antialiased resize's filter at ``distance`` (source pixels over the support's stretch):
    the triangle (bilinear) or the cubic convolution kernel with a = -0.5 (bicubic)."""
    x = distance.abs()
    if mode == "bilinear":
        return (1.0 - x).clamp_(min=0.0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, 0.0))


def resize_weights_tensor(in_size: int, out_size: int, mode: str, device=None,
                          rows: tuple[int, int] | None = None) -> torch.Tensor:
    """``resize_weights`` as a float64 tensor computed on ``device``; ``rows``: only output rows
    ``[start, stop)`` of the ``[out_size, in_size]`` matrix."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be positive, got {in_size} → {out_size}")
    start, stop = (0, out_size) if rows is None else rows
    scale = in_size / out_size
    support = max(scale, 1.0)
    inputs = torch.arange(in_size, dtype=torch.float64, device=device)
    outputs = torch.arange(start, stop, dtype=torch.float64, device=device)
    distance = (inputs[None, :] + 0.5 - (outputs[:, None] + 0.5) * scale) / support  # [rows, in_size]
    weights = resize_kernel(distance, mode)
    return weights / weights.sum(dim=1, keepdim=True)


def resize_weights(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """Float64 ``[out_size, in_size]`` matrix of an antialiased 1-D resize (rows sum to 1)."""
    return resize_weights_tensor(in_size, out_size, mode).numpy()


def resize_table(table: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """A learned grid table ``[Gh, Gw, D]`` resized to ``[height * width, D]`` (row-major), in
    float32 on the table's device, returned in the table's dtype; differentiable."""
    grid_h, grid_w, _ = table.shape
    if (grid_h, grid_w) == (height, width):
        return table.reshape(height * width, -1)
    device = table.device
    rows = to_device(torch.from_numpy(resize_weights(grid_h, height, mode).astype(np.float32)), device)  # [h, Gh]
    cols = to_device(torch.from_numpy(resize_weights(grid_w, width, mode).astype(np.float32)), device)  # [w, Gw]
    # [h, Gh] x [Gh, Gw, D] x [w, Gw] → [h, w, D]
    resized = torch.einsum("hi,ijd,wj->hwd", rows, table.float(), cols)
    return resized.reshape(height * width, -1).to(table.dtype)


@dataclass
class TableLookup:
    """Where every patch of a pack reads a learned ``Gh x Gw`` table resized to its item's grid.

    A patch at row r, column c of an (h, w) grid takes ``sum_ab wy[a] wx[b] table[a, b]`` with
    ``wy = resize_weights(Gh, h)[r]`` and ``wx = resize_weights(Gw, w)[c]``. Built on the host from
    ``grid_thw``: ``row_weights [Rh, Gh]`` and ``col_weights [Rw, Gw]`` stack the weight rows of
    every distinct height and width, ``row_index`` / ``col_index [total_patches]`` pick each
    patch's rows. ``identity``: every grid is the table's own (the lookup is a plain gather).
    """

    source: tuple[int, int]
    row_weights: torch.Tensor
    col_weights: torch.Tensor
    row_index: torch.Tensor
    col_index: torch.Tensor
    identity: bool

    @classmethod
    def build(cls, grid_thw: torch.Tensor, source: tuple[int, int], mode: str, device: torch.device) -> "TableLookup":
        t, heights, widths = grid_thw.to(torch.int64).numpy().T
        counts = t * heights * widths
        index_in_frame = offsets_within_items(counts) % np.repeat(heights * widths, counts)
        widths_per_token = np.repeat(widths, counts)
        rows, cols = index_in_frame // widths_per_token, index_in_frame % widths_per_token

        def stacked(sizes: np.ndarray, within: np.ndarray, source_size: int) -> tuple[np.ndarray, np.ndarray]:
            distinct = np.unique(sizes)
            starts = np.cumsum(distinct) - distinct  # first weight row of each distinct size
            weights = np.concatenate([resize_weights(source_size, int(n), mode) for n in distinct])
            return weights.astype(np.float32), np.repeat(starts[np.searchsorted(distinct, sizes)], counts) + within

        row_weights, row_index = stacked(heights, rows, source[0])
        col_weights, col_index = stacked(widths, cols, source[1])
        identity = bool((heights == source[0]).all() and (widths == source[1]).all())
        # the two index maps travel in one non-blocking copy, the two weight tables in another
        indices = to_device(torch.from_numpy(np.stack([row_index, col_index])), device)
        weights = to_device(torch.from_numpy(np.concatenate([row_weights.ravel(), col_weights.ravel()])), device)
        return cls(source, weights[: row_weights.size].view(row_weights.shape), weights[row_weights.size :].view(col_weights.shape),
                   indices[0], indices[1], identity)

    def __call__(self, table: torch.Tensor) -> torch.Tensor:
        """``table [Gh * Gw, D]`` (row-major) → every patch's position embedding ``[total_patches, D]``,
        in the table's dtype, computed in float32; differentiable."""
        grid_h, grid_w = self.source
        if self.identity:
            return table.index_select(0, self.row_index * grid_w + self.col_index)
        # [S, Gh] and [S, Gw] → [S, Gh * Gw]: each patch's weights over the whole table
        weights = (self.row_weights.index_select(0, self.row_index)[:, :, None]
                   * self.col_weights.index_select(0, self.col_index)[:, None, :]).reshape(-1, grid_h * grid_w)
        return (weights @ table.float()).to(table.dtype)  # [S, Gh * Gw] x [Gh * Gw, D] → [S, D]
