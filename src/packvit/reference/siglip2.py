"""SigLIP2 NaFlex against transformers' ``Siglip2VisionModel``.

The reference runs the processor's padded format: each batch of images is patchified, padded
with zero rows to its longest image, and passed with ``pixel_attention_mask`` (1 = valid row) and
``spatial_shapes`` (h, w). Its valid rows are an image's tokens; padding rows are discarded. A
video item ``[T, C, H, W]`` is run as T separate images, the way the packed model treats frames,
and its ``pooled`` is ``[T, hidden]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..packing import patchify
from ..preprocess.siglip2 import SIGLIP2_MAX_NUM_PATCHES, siglip2_images
from . import FamilyAdapter, ItemOutput

__all__ = ["Siglip2Adapter", "ADAPTER", "REFERENCE_SIZES"]

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


class Siglip2Adapter(FamilyAdapter):
    name = "siglip2"
    default_grids = ((16, 16), (24, 24))

    def reference_config(self, size: str = "tiny"):
        from transformers import Siglip2VisionConfig

        if size not in REFERENCE_SIZES:
            raise ValueError(f"unknown size {size!r}; siglip2 has {sorted(REFERENCE_SIZES)}")
        return Siglip2VisionConfig(**REFERENCE_SIZES[size], num_patches=256, patch_size=16, vision_use_head=True)

    def write_random_checkpoint(self, directory: Path, size: str = "tiny", seed: int = 0) -> Path:
        from transformers import Siglip2VisionModel

        config = self.reference_config(size)
        torch.manual_seed(seed)
        model = Siglip2VisionModel(config)
        randomize_vectors(model, torch.Generator().manual_seed(seed))
        path = Path(directory) / f"siglip2-naflex-{size}"
        model.save_pretrained(path)
        return path

    def load_reference(self, ckpt, device, dtype) -> torch.nn.Module:
        from transformers import Siglip2VisionModel

        model = Siglip2VisionModel.from_pretrained(str(ckpt), dtype=dtype, attn_implementation="sdpa")
        return model.to(device).eval()

    def load_packed(self, ckpt, device, dtype) -> torch.nn.Module:
        from ..models.siglip2 import Siglip2NaflexPacking

        return Siglip2NaflexPacking(ckpt=ckpt, device=device, dtype=dtype)

    def patch_size(self, model: torch.nn.Module) -> int:
        return model.config.patch_size

    def preprocess(self, images: Sequence, max_num_patches: int = SIGLIP2_MAX_NUM_PATCHES, backend: str = "torch",
                   **options) -> list[torch.Tensor]:
        """Images → normalised ``[3, H, W]`` items, exactly as ``Siglip2ImageProcessor`` resizes them."""
        return siglip2_images(images, max_num_patches=max_num_patches, backend=backend, **options)

    def run_reference(self, model, items: Sequence[torch.Tensor], batch_size: int) -> list[ItemOutput]:
        frames = [frame for item in items for frame in (item if item.dim() == 4 else item.unsqueeze(0))]
        patch_size = model.config.patch_size
        tokens, pooled = [], []
        for start in range(0, len(frames), batch_size):
            batch = frames[start : start + batch_size]
            patches = [patchify([frame], patch_size)[0] for frame in batch]  # [h*w, p*p*C] each
            longest = max(p.shape[0] for p in patches)
            first = batch[0]
            pixel_values = first.new_zeros(len(batch), longest, patches[0].shape[1])  # [B, longest, p*p*C]
            mask = torch.zeros(len(batch), longest, dtype=torch.int32, device=first.device)
            for row, frame_patches in enumerate(patches):
                pixel_values[row, : frame_patches.shape[0]] = frame_patches
                mask[row, : frame_patches.shape[0]] = 1
            shapes = torch.tensor([[f.shape[-2] // patch_size, f.shape[-1] // patch_size] for f in batch], device=first.device)
            out = model(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
            for row, frame_patches in enumerate(patches):
                tokens.append(out.last_hidden_state[row, : frame_patches.shape[0]])
                pooled.append(out.pooler_output[row] if out.pooler_output is not None else None)
        return self._regroup(items, tokens, pooled)

    def run_packed(self, model, items: Sequence[torch.Tensor]) -> list[ItemOutput]:
        patches, grid_thw = patchify(list(items), model.config.patch_size)
        out = model(patches, grid_thw, return_dict=True)
        frame_sizes = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0]).tolist()
        tokens = list(out.last_hidden_state.split(frame_sizes))
        pooled = list(out.pooler_output) if out.pooler_output is not None else [None] * len(tokens)
        return self._regroup(items, tokens, pooled)

    @staticmethod
    def _regroup(items, frame_tokens: list, frame_pooled: list) -> list[ItemOutput]:
        """Per-frame outputs → one ``ItemOutput`` per item (videos: tokens of all frames, pooled [T, D])."""
        outputs, frame = [], 0
        for item in items:
            if item.dim() == 3:
                outputs.append(ItemOutput(frame_tokens[frame], frame_pooled[frame]))
                frame += 1
                continue
            count = item.shape[0]
            pooled = frame_pooled[frame : frame + count]
            outputs.append(ItemOutput(torch.cat(frame_tokens[frame : frame + count]),
                                      torch.stack(pooled) if pooled[0] is not None else None))
            frame += count
        return outputs


ADAPTER = Siglip2Adapter()
