"""AIMv2 against transformers' ``Aimv2VisionModel``: the family half of align, bench and the tests.

The reference takes dense batches of equal-size images, so ``run_reference`` groups items by
size; ``run_packed`` runs every item in one pack.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from . import FamilyAdapter, ItemOutput, reference_from_pretrained, require_transformers

__all__ = ["AIMv2Adapter", "ADAPTER", "TINY", "FULL"]

#: small random configuration for CPU tests: head_dim 24 (not a power of two, but a multiple of 8 so
#: that the flash kernels take it on a GPU), learned grid 4x4
TINY = dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, image_size=56,
            patch_size=14)
#: apple/aimv2-large-patch14-native
FULL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=8, image_size=224,
            patch_size=14)


class AIMv2Adapter(FamilyAdapter):
    name = "aimv2"
    default_grids = ((16, 16), (20, 28))

    def write_random_checkpoint(self, directory: Path, size: str = "tiny", seed: int = 0, *, is_native: bool = True,
                                use_head: bool = True, clip_model: bool = False, **overrides) -> Path:
        """Saves a random ``Aimv2VisionModel`` (or, with ``clip_model``, a whole ``Aimv2Model`` with a
        small text tower, the layout of the -lit checkpoint) and returns ``directory``.

        ``size``: ``"tiny"`` or ``"full"`` (the large native checkpoint's shape). ``is_native``
        picks sin-cos or a learned table; ``use_head`` (default on, so that align and the GPU test
        check the pooled output too) adds the attention-pooling head;
        ``overrides`` replace vision-config fields. Norm weights, biases and the head's query get
        random offsets (tiny: every parameter), so none of them is a no-op; full-size matrices keep
        transformers' initialisation.
        """
        if size not in self.sizes:
            raise ValueError(f"size must be one of {self.sizes}, got {size!r}")
        vision = dict(TINY if size == "tiny" else FULL, is_native=is_native, use_head=use_head, **overrides)
        torch.manual_seed(seed)
        if clip_model:
            text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                        max_position_embeddings=16, eos_token_id=2)
            model = require_transformers("Aimv2Model", self.name)(
                require_transformers("Aimv2Config", self.name)(vision_config=vision, text_config=text, projection_dim=16))
        else:
            model = require_transformers("Aimv2VisionModel", self.name)(require_transformers("Aimv2VisionConfig", self.name)(**vision))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if size == "tiny" or parameter.dim() == 1 or name.endswith("cls_token"):
                    parameter.add_(0.05 * torch.randn_like(parameter))
        directory = Path(directory)
        model.save_pretrained(directory)
        return directory

    def load_reference(self, ckpt, device, dtype) -> torch.nn.Module:
        """``Aimv2VisionModel`` with SDPA attention; the vision tower of an ``Aimv2Model`` checkpoint."""
        model_type = json.loads((Path(ckpt) / "config.json").read_text()).get("model_type")
        if model_type == "aimv2":
            model = reference_from_pretrained(require_transformers("Aimv2Model", self.name), ckpt, dtype).vision_model
        else:
            model = reference_from_pretrained(require_transformers("Aimv2VisionModel", self.name), ckpt, dtype)
        return model.to(device).eval()

    def run_reference(self, model, items: Sequence[torch.Tensor], batch_size: int) -> list[ItemOutput]:
        """Items grouped by size into dense batches of at most ``batch_size``."""
        return self.run_dense_groups(model, [_as_image(item) for item in items], batch_size)


def _as_image(item: torch.Tensor) -> torch.Tensor:
    """``[C, H, W]``, or a one-frame ``[1, C, H, W]`` item → ``[C, H, W]``; AIMv2 encodes images only."""
    if item.dim() == 4 and item.shape[0] == 1:
        return item[0]
    if item.dim() != 3:
        raise ValueError(f"AIMv2 encodes images [C, H, W] (or one frame [1, C, H, W]), got an item of shape {tuple(item.shape)}")
    return item


ADAPTER = AIMv2Adapter()
