"""DINOv3 ViT against transformers' ``DINOv3ViTModel``: the family's half of align, bench and tests.

The reference takes dense batches of equal-size images ``[B, 3, H, W]`` and returns, per image,
``1 + R + h*w`` tokens ``[CLS, registers, patches]`` after the final norm, and the normalised CLS
as ``pooler_output``. The packed model returns the same tokens as ``prefix_tokens`` plus the patch
tokens; ``run_packed`` reassembles them in the reference's order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..models.dinov3 import DINOV3_RELEASES
from . import FamilyAdapter, ItemOutput, randomize_parameters, reference_from_pretrained, require_transformers

__all__ = ["DINOv3Adapter", "ADAPTER", "reference_config"]

#: tiny: a quick CPU configuration (head_dim 24, not a power of two); full: ViT-L/16
_SIZES = {
    "tiny": dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96),
    "full": {
        name: getattr(DINOV3_RELEASES["facebook/dinov3-vitl16-pretrain-lvd1689m"], name)
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    },
}


def reference_config(size: str = "tiny", **overrides):
    """A transformers ``DINOv3ViTConfig`` of a named size (4 registers, patch 16, GELU) with overrides."""
    config_class = require_transformers("DINOv3ViTConfig", "dinov3")
    if size not in _SIZES:
        raise ValueError(f"unknown DINOv3 size {size!r}; choose one of {sorted(_SIZES)}")
    values = dict(_SIZES[size], patch_size=16, num_register_tokens=4, hidden_act="gelu")
    values.update(overrides)
    return config_class(**values)


class DINOv3Adapter(FamilyAdapter):
    """``DINOv3ViTModel`` (dense, equal-size batches) vs ``DINOv3ViTPacking`` (one pack)."""

    name = "dinov3"
    default_grids = ((14, 14), (20, 30))

    def write_random_checkpoint(self, directory: Path, size: str = "tiny", seed: int = 0, **overrides) -> Path:
        """Saves a random ``DINOv3ViTModel`` (``size`` "tiny" or "full" = ViT-L/16) with ``save_pretrained``.

        ``overrides`` change fields of the configuration (``use_gated_mlp``, ``query_bias`` ...).
        """
        model_class = require_transformers("DINOv3ViTModel", self.name)
        directory = Path(directory)
        config = reference_config(size, **overrides)
        torch.manual_seed(seed)
        model = model_class(config)
        randomize_parameters(model, torch.Generator().manual_seed(seed))
        model.save_pretrained(directory)
        return directory

    def load_reference(self, ckpt, device, dtype) -> torch.nn.Module:
        model = reference_from_pretrained(require_transformers("DINOv3ViTModel", self.name), ckpt, dtype)
        return model.to(device).eval()

    def run_reference(self, model, items: Sequence[torch.Tensor], batch_size: int) -> list[ItemOutput]:
        """Items grouped by identical size into dense batches of up to ``batch_size``."""
        parameter = next(model.parameters())
        images = [_as_image(item).to(parameter.device, parameter.dtype) for item in items]
        return self.run_dense_groups(lambda pixels: model(pixel_values=pixels), images, batch_size)


def _as_image(item: torch.Tensor) -> torch.Tensor:
    """An item ``[3, H, W]`` or a one-frame ``[1, 3, H, W]`` → ``[3, H, W]``."""
    if item.dim() == 4:
        if item.shape[0] != 1:
            raise ValueError(f"DINOv3 takes images, got a video item of {item.shape[0]} frames; pass frames as separate items")
        return item[0]
    return item


ADAPTER = DINOv3Adapter()
