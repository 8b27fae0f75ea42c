"""Rotary position embeddings: DINOv3's 2-D half-split RoPE and OneVision's 3-D 4:6:6 RoPE.

Tables are computed from positions at forward time (never stored in buffers), once per forward
and shared by all layers.
"""

from __future__ import annotations

import numpy as np
import torch

from .packing import offsets_within_items

__all__: list[str] = []

# --- DINOv3: 2-D RoPE over normalised patch centres, rotate_half pairing -----------------------

__all__ += [
    "dinov3_inv_freq",
    "dinov3_patch_coordinates",
    "dinov3_rope_cos_sin",
    "dinov3_rotate_half",
    "apply_dinov3_rope",
]


def dinov3_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """Frequencies ``theta ** (-4k / head_dim)`` for ``k < head_dim / 4``: float32 ``[head_dim // 4]``.

    Each of the two axes (y, x) gets ``head_dim / 4`` frequencies, each used on two dimension pairs.
    """
    inv_freq = 1 / theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32, device=device)
    if head_dim % 4 or inv_freq.numel() != head_dim // 4:
        raise ValueError(
            f"DINOv3 RoPE needs a head_dim that is a multiple of 4 and gives head_dim / 4 frequencies, "
            f"got head_dim {head_dim} ({inv_freq.numel()} frequencies); choose hidden_size and "
            f"num_attention_heads so that hidden_size / num_attention_heads is a multiple of 4."
        )
    return inv_freq


def dinov3_patch_coordinates(grid_hw: torch.Tensor) -> torch.Tensor:
    """Normalised patch centres of every patch of a pack, in the token order of the patches.

    ``grid_hw [num_items, 2]`` (h, w in patches, host) → float32 ``[sum h*w, 2]`` holding
    (y, x) = (2 (row + 0.5) / h - 1, 2 (col + 0.5) / w - 1): each axis normalised by its own
    length, row-major within each item.
    """
    heights, widths = grid_hw.to(torch.int64).numpy().T
    counts = heights * widths
    heights, widths = np.repeat(heights, counts), np.repeat(widths, counts)  # [total] each
    index_in_item = offsets_within_items(counts)
    rows, cols = index_in_item // widths, index_in_item % widths
    # float32 throughout, operation for operation as the reference computes it
    centre_y = (rows.astype(np.float32) + np.float32(0.5)) / heights.astype(np.float32)
    centre_x = (cols.astype(np.float32) + np.float32(0.5)) / widths.astype(np.float32)
    # [total, 2] in [0, 1] → (-1, 1)
    return torch.from_numpy(np.float32(2.0) * np.stack([centre_y, centre_x], axis=-1) - np.float32(1.0))


def dinov3_rope_cos_sin(coordinates: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[S, head_dim]`` in ``dtype`` for float32 coordinates ``[S, 2]``.

    Angles ``2 pi * coordinate * inv_freq`` laid out [y | x | y | x] (rotate_half pairing: dimension
    j shares its angle with j + head_dim / 2), computed in float32 and cast to ``dtype``.
    """
    # [S, 2, 1] * [1, 1, hd/4] → [S, 2, hd/4] → [S, hd/2] → [S, hd]
    angles = 2 * torch.pi * coordinates[:, :, None] * inv_freq[None, None, :]
    angles = angles.flatten(1, 2).tile(2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def dinov3_rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[..., hd]`` → ``[-x[..., hd/2:], x[..., :hd/2]]``."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_dinov3_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates ``q, k [S, H, hd]`` by per-token ``cos, sin [S, hd]``; rows with cos 1, sin 0 pass unchanged."""
    cos, sin = cos[:, None, :], sin[:, None, :]  # [S, 1, hd], broadcast over heads
    return q * cos + dinov3_rotate_half(q) * sin, k * cos + dinov3_rotate_half(k) * sin


# --- OneVision Encoder: 3-D RoPE over integer (t, h, w), 4:6:6 split, interleaved pairs --------
#
# For a token at (t, r, c) the angles are f = [t * w_t | r * w_h | c * w_w] (width hd/2), with
# ladders w_axis[k] = theta ** (-k / axis_width) and axis widths 4u : 6u : 6u, u = hd / 32. They
# are expanded by concatenation, a = [f | f] (width hd), and dimension pairs (2i, 2i+1) are mixed
#     out[2i]   = x[2i]   cos a[2i]   - x[2i+1] sin a[2i]
#     out[2i+1] = x[2i+1] cos a[2i+1] + x[2i]   sin a[2i+1]
# i.e. x * cos(a) + rot(x) * sin(a) with rot(x)[2i] = -x[2i+1], rot(x)[2i+1] = x[2i]. The two
# entries of a pair use two different angles, so this is not a rotation; the published weights
# depend on it exactly.

__all__ += [
    "onevision_rope_axis_widths",
    "onevision_inv_freqs",
    "onevision_rope_angles",
    "onevision_rope_cos_sin",
    "onevision_rotate_pairs",
    "apply_onevision_rope",
]


def onevision_rope_axis_widths(head_dim: int) -> tuple[int, int, int]:
    """Angle widths (t, h, w) of the 4:6:6 split of ``head_dim / 2``: hd 64 → (8, 12, 12)."""
    if head_dim <= 0 or head_dim % 32:
        raise ValueError(
            f"the OneVision 3-D RoPE splits head_dim / 2 into 16 units (4 temporal, 6 height, 6 width), "
            f"so head_dim must be a positive multiple of 32; got head_dim {head_dim}. Choose hidden_size "
            f"and num_attention_heads so that hidden_size / num_attention_heads is 32, 64, 96, 128, ..."
        )
    unit = head_dim // 32
    return 4 * unit, 6 * unit, 6 * unit


def onevision_inv_freqs(head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three frequency ladders ``theta ** (-k / width)``, ``k < width``, float32 each."""
    return tuple(
        1.0 / (theta ** (torch.arange(width, dtype=torch.float32, device=device) / width))
        for width in onevision_rope_axis_widths(head_dim)
    )


def onevision_rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Angles f ``[S, head_dim / 2]`` float32 for integer (t, r, c) ``positions [S, 3]``."""
    inv_t, inv_h, inv_w = onevision_inv_freqs(head_dim, theta, positions.device)
    positions = positions.to(torch.float32)
    # [S, 1] * [1, width] per axis → [S, hd/2]
    return torch.cat(
        [positions[:, 0:1] * inv_t, positions[:, 1:2] * inv_h, positions[:, 2:3] * inv_w], dim=-1
    )


def onevision_rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``cos(a), sin(a)`` ``[S, head_dim]`` with ``a = [f | f]`` for ``positions [S, 3]``.

    Computed once per forward and shared by every layer.
    """
    angles = onevision_rope_angles(positions, head_dim, theta)
    angles = torch.cat([angles, angles], dim=-1)  # [S, hd/2] → [S, hd]
    return angles.cos(), angles.sin()


def onevision_rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """``[..., hd]`` → rot(x): ``rot[2i] = -x[2i+1]``, ``rot[2i+1] = x[2i]``."""
    pairs = x.unflatten(-1, (-1, 2))  # [..., hd] → [..., hd/2, 2]
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_onevision_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rot(x) * sin`` for ``x [S, H, hd]`` and float32 ``cos, sin [S, hd]``.

    Computed in float32 and cast back to ``x.dtype`` (as the original packing code does), rather
    than casting cos/sin to ``x.dtype`` first (as the published HF class does): bf16 tables carry
    an absolute error of up to 2**-9 per entry, float32 arithmetic none worth counting. At full
    size the end-to-end bf16 error is dominated by the GEMMs either way.
    """
    x32 = x.to(torch.float32)
    cos, sin = cos[:, None, :], sin[:, None, :]  # [S, 1, hd], broadcast over heads
    return (x32 * cos + onevision_rotate_pairs(x32) * sin).to(x.dtype)
