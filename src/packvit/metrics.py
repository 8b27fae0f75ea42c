"""Agreement between two outputs: the figures ``packvit align`` and the parity tests report."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["compute_similarity_metrics", "relative_error"]


def compute_similarity_metrics(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Max and mean absolute difference, and min/mean/max cosine over the last axis (per token).

    Both tensors are compared in float32 on the CPU; shapes must match.
    """
    if a.shape != b.shape:
        raise ValueError(f"cannot compare tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    a32, b32 = a.detach().float().cpu(), b.detach().float().cpu()
    diff = (a32 - b32).abs()
    cosine = F.cosine_similarity(a32.reshape(-1, a32.shape[-1]), b32.reshape(-1, b32.shape[-1]), dim=-1)
    return {
        "max_diff": diff.max().item(),
        "mean_diff": diff.mean().item(),
        "min_cosine": cosine.min().item(),
        "mean_cosine": cosine.mean().item(),
        "max_cosine": cosine.max().item(),
    }


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float32."""
    out32, ref32 = out.detach().float(), ref.detach().float()
    return ((out32 - ref32).norm() / ref32.norm().clamp_min(1e-30)).item()
