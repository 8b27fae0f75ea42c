"""SigLIP2 NaFlex against transformers' ``Siglip2VisionModel``.

The reference runs the processor's padded format: each batch of images is patchified, padded
with zero rows to its longest image, and passed with ``pixel_attention_mask`` (1 = valid row) and
``spatial_shapes`` (h, w). Its valid rows are an image's tokens; padding rows are discarded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..packing import patchify
from . import FamilyAdapter, ItemOutput, reference_from_pretrained, require_transformers

__all__ = ["Siglip2Adapter", "ADAPTER", "REFERENCE_SIZES", "randomize_vectors", "reference_resizes_one_wide_grids_right"]

#: Siglip2VisionConfig arguments of each random size. "tiny": head_dim 48, not a power of two,
#: and a multiple of 8 so the flash kernels take it; "full": google/siglip2-so400m-patch16-naflex.
REFERENCE_SIZES = {
    "tiny": dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2),
    "full": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
}


def randomize_vectors(model: torch.nn.Module, generator: torch.Generator, scale: float = 0.1) -> None:
    """Gives every bias, norm weight and the probe random values (the reference's init leaves
    most biases at zero, which would hide a mis-mapped bias)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1 or name.endswith("probe"):
                center = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                parameter.copy_(center + scale * noise)


def reference_resizes_one_wide_grids_right() -> bool:
    """Whether the installed reference resizes position tables right for one-wide grids on the CPU.

    transformers up to 5.23 resized them with PyTorch's CPU ``F.interpolate(antialias=True)``,
    which is wrong whenever the output width is 1 and the height is resized; 5.24 computes the
    antialiased weights explicitly. Checked by running the reference's own resize on a 16x16 table
    to a 23x1 grid against packvit's (whose weights the tests check against independent oracles).
    """
    from ..positions import resize_table

    embeddings_class = require_transformers("Siglip2VisionModel", "siglip2")
    module = __import__(embeddings_class.__module__, fromlist=["Siglip2VisionEmbeddings"])
    table = torch.randn(16, 16, 8, generator=torch.Generator().manual_seed(0))
    # [G, G, D] → [1, 23, D]
    resized = module.Siglip2VisionEmbeddings.resize_positional_embeddings(table, torch.tensor([[23, 1]]), max_length=23)[0]
    return bool((resized - resize_table(table, 23, 1, "bilinear")).abs().max() < 1e-5)


class Siglip2Adapter(FamilyAdapter):
    name = "siglip2"
    default_grids = ((16, 16), (24, 24))

    def reference_config(self, size: str = "tiny"):
        config_class = require_transformers("Siglip2VisionConfig", self.name)
        if size not in REFERENCE_SIZES:
            raise ValueError(f"unknown size {size!r}; siglip2 has {sorted(REFERENCE_SIZES)}")
        return config_class(**REFERENCE_SIZES[size], num_patches=256, patch_size=16, vision_use_head=True)

    def write_random_checkpoint(self, directory: Path, size: str = "tiny", seed: int = 0, **overrides) -> Path:
        model_class = require_transformers("Siglip2VisionModel", self.name)
        config = self.reference_config(size)
        for key, value in overrides.items():
            setattr(config, key, value)
        torch.manual_seed(seed)
        model = model_class(config)
        randomize_vectors(model, torch.Generator().manual_seed(seed))
        path = Path(directory) / f"siglip2-naflex-{size}"
        model.save_pretrained(path)
        return path

    def load_reference(self, ckpt, device, dtype) -> torch.nn.Module:
        model = reference_from_pretrained(require_transformers("Siglip2VisionModel", self.name), ckpt, dtype)
        return model.to(device).eval()

    def run_reference(self, model, items: Sequence[torch.Tensor], batch_size: int) -> list[ItemOutput]:
        patch_size = model.config.patch_size
        outputs = []
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            patches = [patchify([image], patch_size)[0] for image in batch]  # [h*w, p*p*C] each
            longest = max(p.shape[0] for p in patches)
            first = batch[0]
            pixel_values = first.new_zeros(len(batch), longest, patches[0].shape[1])  # [B, longest, p*p*C]
            mask = torch.zeros(len(batch), longest, dtype=torch.int32, device=first.device)
            for row, image_patches in enumerate(patches):
                pixel_values[row, : image_patches.shape[0]] = image_patches
                mask[row, : image_patches.shape[0]] = 1
            shapes = torch.tensor([[f.shape[-2] // patch_size, f.shape[-1] // patch_size] for f in batch], device=first.device)
            out = model(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
            for row, image_patches in enumerate(patches):
                pooled = out.pooler_output[row] if out.pooler_output is not None else None
                outputs.append(ItemOutput(out.last_hidden_state[row, : image_patches.shape[0]], pooled))
        return outputs


ADAPTER = Siglip2Adapter()
