"""Rotary position embeddings: DINOv3's 2-D half-split RoPE and OneVision's 3-D 4:6:6 RoPE.

Tables are computed from positions at forward time (never stored in buffers), once per forward
and shared by all layers.
"""

from __future__ import annotations

import torch

__all__: list[str] = []

# --- DINOv3: 2-D RoPE over normalised patch centres, rotate_half pairing -----------------------


# --- OneVision Encoder: 3-D RoPE over integer (t, h, w), 4:6:6 split, interleaved pairs --------
