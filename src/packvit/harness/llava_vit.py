"""OneVision Encoder against packvit's standard ``LlavaViTModel``: the family half of align, bench and the tests.

The reference is packvit's dense model with the published checkpoint layout
(``packvit.harness.llava_vit_reference``), so ``run_reference`` groups
items of equal shape (images ``[C, H, W]``, videos ``[T, C, H, W]``) into batches; ``run_packed``
runs every item in one pack, each video one attention segment. An item returns ``t*h*w`` tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from . import FamilyAdapter, ItemOutput, randomize_parameters

__all__ = ["LlavaViTAdapter", "ADAPTER", "TINY", "FULL"]

#: small random configuration for CPU tests (head_dim 32)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
            image_size=112)
#: lmms-lab-encoder/onevision-encoder-large
FULL = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
            image_size=448)


class LlavaViTAdapter(FamilyAdapter):
    name = "llava_vit"
    default_grids = ((32, 32), (16, 16))

    def write_random_checkpoint(self, directory: Path, size: str = "tiny", seed: int = 0, **overrides) -> Path:
        """Saves a random ``LlavaViTModel`` (the published layout) with ``save_pretrained``.

        ``size``: ``"tiny"`` or ``"full"`` (the large checkpoint's shape); ``overrides`` replace
        configuration fields (``use_head``, ``layer_norm_type``, ...).
        """
        from ..models.llava_vit import LlavaViTConfig
        from .llava_vit_reference import LlavaViTModel

        if size not in self.sizes:
            raise ValueError(f"size must be one of {self.sizes}, got {size!r}")
        config = LlavaViTConfig(**{**(TINY if size == "tiny" else FULL), **overrides})
        torch.manual_seed(seed)
        model = LlavaViTModel(config)
        randomize_parameters(model, torch.Generator().manual_seed(seed), norm_scale=0.2)
        directory = Path(directory)
        model.save_pretrained(directory)
        return directory

    def load_reference(self, ckpt, device, dtype) -> torch.nn.Module:
        from .llava_vit_reference import LlavaViTModel

        return LlavaViTModel.from_pretrained(ckpt, dtype=dtype).to(device).eval()

    def extra_scenarios(self, patch_size: int, generator: torch.Generator) -> list[tuple[str, list[torch.Tensor]]]:
        """A lone video, and a pack mixing images and videos of several sizes."""
        video = self.random_items([(4, 8, 8)], patch_size, generator)
        mixed = self.random_items([(6, 9), (3, 6, 5), (8, 8), (2, 4, 7), (5, 5)], patch_size, generator)
        return [("video", video), ("images+videos", mixed)]

    def run_reference(self, model, items: Sequence[torch.Tensor], batch_size: int) -> list[ItemOutput]:
        """Items grouped by shape into dense batches of at most ``batch_size``; videos ``[T, C, H, W]``
        are batched as ``[B, C, T, H, W]``."""
        def forward(batch: torch.Tensor):
            # videos arrive as [B, T, C, H, W]; the standard model takes [B, C, T, H, W]
            return model(batch.transpose(1, 2) if batch.dim() == 5 else batch)

        return self.run_dense_groups(forward, items, batch_size)


ADAPTER = LlavaViTAdapter()
