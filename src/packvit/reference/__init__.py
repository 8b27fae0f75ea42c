"""How each model family is checked and timed against its reference implementation.

One module per family (``packvit.reference.siglip2`` ...) defines a ``FamilyAdapter``: how to
write a random reference checkpoint, load the reference and the packed model from it, turn images
into model inputs, and run both on the same items. ``packvit align``, ``packvit bench`` and the
parity tests are built on these adapters and on nothing family-specific.

An *item* is one model input in pixel space: an image ``[C, H, W]`` or a video ``[T, C, H, W]``,
already resized and normalised the way the model expects, with H and W multiples of the patch
size.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..packing import patchify

__all__ = ["ItemOutput", "FamilyAdapter", "FAMILIES", "get_adapter"]

FAMILIES = ("siglip2", "dinov3", "aimv2", "llava_vit")


@dataclass
class ItemOutput:
    """One item's outputs: ``tokens [n, hidden]`` (every token the model returns for the item,
    prefix tokens first) and ``pooled [hidden]`` or ``None``."""

    tokens: torch.Tensor
    pooled: torch.Tensor | None = None


class FamilyAdapter:
    """The family-specific half of align, bench and the parity tests."""

    name: str = ""
    #: sizes used by the CLI's random configuration: "tiny" (CPU tests, align default) and "full".
    sizes: tuple[str, ...] = ("tiny", "full")
    #: (h, w) grids of the same-size align scenario when no --image_size is given
    default_grids: tuple[tuple[int, int], ...] = ((16, 16),)
    #: how the packed model flattens a patch: "ppc" (p, p, C) or "cpp" (C, p, p)
    patch_layout: str = "ppc"

    def write_random_checkpoint(self, directory: Path, size: str = "tiny", seed: int = 0) -> Path:
        """Saves a reference model with random weights (``save_pretrained``) and returns its directory."""
        raise NotImplementedError

    def cached_random_checkpoint(self, root: Path, size: str = "tiny", seed: int = 0) -> Path:
        """``write_random_checkpoint`` under ``root``, written once and reused by later calls."""
        directory = Path(root) / f"{self.name}-{size}-{seed}"
        marker = directory / "CHECKPOINT"  # written last: the path of a complete checkpoint
        if marker.is_file():
            return Path(marker.read_text())
        directory.mkdir(parents=True, exist_ok=True)
        checkpoint = self.write_random_checkpoint(directory, size=size, seed=seed)
        marker.write_text(str(checkpoint))
        return Path(checkpoint)

    def load_reference(self, ckpt, device, dtype) -> torch.nn.Module:
        raise NotImplementedError

    def load_packed(self, ckpt, device, dtype) -> torch.nn.Module:
        raise NotImplementedError

    def patch_size(self, model: torch.nn.Module) -> int:
        raise NotImplementedError

    def preprocess(self, images: Sequence, **options) -> list[torch.Tensor]:
        """The family's own image processor: PIL images or arrays → items."""
        raise NotImplementedError

    def random_items(self, grids: Sequence[tuple[int, ...]], patch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        """Random-normal items for (h, w) or (t, h, w) patch grids: images ``[3, H, W]`` where t is 1."""
        items = []
        for grid in grids:
            t, h, w = (1, *grid) if len(grid) == 2 else grid
            shape = (3, h * patch_size, w * patch_size) if t == 1 else (t, 3, h * patch_size, w * patch_size)
            items.append(torch.randn(shape, generator=generator))
        return items

    def pack(self, items: Sequence[torch.Tensor], patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Items → ``(patches [total, C*p*p]`` on the items' device, ``grid_thw [N, 3]`` on the host)."""
        return patchify(list(items), patch_size, self.patch_layout)

    def extra_scenarios(self, patch_size: int, generator: torch.Generator) -> list[tuple[str, list[torch.Tensor]]]:
        """Family-specific align scenarios (videos, mixed image+video packs), as (name, items)."""
        return []

    @staticmethod
    def run_dense_groups(forward, items: Sequence[torch.Tensor], batch_size: int) -> list[ItemOutput]:
        """Items grouped by identical shape, in dense batches of at most ``batch_size``, through
        ``forward(stacked items)`` (an output with ``last_hidden_state`` and ``pooler_output``)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(tuple(item.shape), []).append(index)
        outputs: list[ItemOutput | None] = [None] * len(items)
        for indices in groups.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                result = forward(torch.stack([items[i] for i in chunk]))
                for row, i in enumerate(chunk):
                    pooled = result.pooler_output[row] if result.pooler_output is not None else None
                    outputs[i] = ItemOutput(result.last_hidden_state[row], pooled)
        return outputs

    def run_reference(self, model, items: Sequence[torch.Tensor], batch_size: int) -> list[ItemOutput]:
        """The reference on ``items``, batched the best way its API allows."""
        raise NotImplementedError

    def run_packed(self, model, items: Sequence[torch.Tensor]) -> list[ItemOutput]:
        """The packed model on all ``items`` in one pack."""
        raise NotImplementedError


def get_adapter(name: str) -> FamilyAdapter:
    name = name.replace("-", "_").lower()
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; packvit has {list(FAMILIES)}")
    return importlib.import_module(f"{__name__}.{name}").ADAPTER
