"""The parity and benchmark harness: each model family against its reference implementation.

One module per family (``packvit.harness.siglip2`` ...) defines a ``FamilyAdapter``: how to write
a random reference checkpoint, load the reference from it, turn images into reference inputs and
run the reference the best way its own API allows. The packed side is the same for every family
(``packvit.from_pretrained`` and ``model(batch)``). ``packvit align``, ``packvit bench`` and the
parity tests are built on these adapters and on nothing family-specific.

An *item* is one model input in pixel space: an image ``[C, H, W]`` or a video ``[T, C, H, W]``,
already resized and normalised the way the model expects, with H and W multiples of the patch
size. The references come from transformers (``pip install 'packvit[align]'``), except OneVision's,
which is packvit's dense ``LlavaViTModel`` (``packvit.harness.llava_vit_reference``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..models.registry import FAMILIES, normalize_family
from ..packing import PackedBatch, patchify, prefix_token_index, to_device, unpatchify

__all__ = [
    "ItemOutput",
    "FamilyAdapter",
    "FAMILIES",
    "get_adapter",
    "require_transformers",
    "reference_from_pretrained",
    "randomize_parameters",
]


def require_transformers(class_name: str, family: str):
    """The transformers class a reference needs; ``ValueError`` naming the install when it is missing."""
    try:
        import transformers
    except ImportError as error:
        raise ValueError(
            f"the {family} reference is transformers' {class_name}, and transformers is not installed; "
            f"pip install 'packvit[align]'"
        ) from error
    if not hasattr(transformers, class_name):
        raise ValueError(
            f"the {family} reference is transformers' {class_name}, which transformers {transformers.__version__} "
            f"does not have (SigLIP2 arrived in 4.49, AIMv2 and DINOv3 in 4.56); upgrade transformers"
        )
    return getattr(transformers, class_name)


def reference_from_pretrained(model_class, ckpt, dtype, **kwargs):
    """``model_class.from_pretrained`` with the dtype argument this transformers takes (``dtype``
    from 4.56 on, ``torch_dtype`` before) and SDPA attention."""
    import transformers

    version = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    dtype_argument = "dtype" if version >= (4, 56) else "torch_dtype"
    return model_class.from_pretrained(str(ckpt), attn_implementation="sdpa", **{dtype_argument: dtype}, **kwargs)


@torch.no_grad()
def randomize_parameters(model: torch.nn.Module, generator: torch.Generator, norm_scale: float = 0.1) -> None:
    """Random values for every parameter, so that none is a no-op in a parity test.

    Learned queries and prefix tokens (``probe``, ``cls_token``, ``register_tokens``) N(0, 1),
    LayerScale 0.3 + N(0, 0.1²), other tensors of two or more axes N(0, 1/fan_in) (deep models
    stay well conditioned), norm weights 1 + N(0, norm_scale²), other vectors (biases) N(0, 0.1²).
    """
    for name, parameter in model.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
        if name.endswith(("probe", "cls_token", "register_tokens")):
            value = noise
        elif "lambda1" in name:
            value = 0.3 + 0.1 * noise
        elif parameter.dim() >= 2:
            value = noise / parameter[0].numel() ** 0.5
        elif "norm" in name and name.endswith("weight"):
            value = 1 + norm_scale * noise
        else:
            value = 0.1 * noise
        parameter.copy_(value.to(parameter.dtype))


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

    def write_random_checkpoint(self, directory: Path, size: str = "tiny", seed: int = 0, **overrides) -> Path:
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
        """The packed model, through packvit's own loading path."""
        from ..models.registry import model_class

        return model_class(self.name).from_pretrained(ckpt, device=device, dtype=dtype)

    @staticmethod
    def preprocess(ckpt, images: Sequence, **overrides) -> list[torch.Tensor]:
        """The checkpoint's own image processor (``packvit.load_processor``): images → items, the
        normalised pixels ``[3, H, W]`` the processor cut into patches."""
        from ..preprocess import load_processor

        batch = load_processor(ckpt, **overrides)(images)
        patch_size = round((batch.patch_dim / 3) ** 0.5)  # three channels of p x p pixels
        frames = unpatchify(batch.patches, batch.grid_thw, patch_size, batch.patch_layout)  # [T, C, H, W] each
        return [item[0] if item.shape[0] == 1 else item for item in frames]

    def random_items(self, grids: Sequence[tuple[int, ...]], patch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        """Random-normal items for (h, w) or (t, h, w) patch grids: images ``[3, H, W]`` where t is 1."""
        items = []
        for grid in grids:
            t, h, w = (1, *grid) if len(grid) == 2 else grid
            shape = (3, h * patch_size, w * patch_size) if t == 1 else (t, 3, h * patch_size, w * patch_size)
            items.append(torch.randn(shape, generator=generator))
        return items

    @staticmethod
    def pack(items: Sequence[torch.Tensor], model) -> PackedBatch:
        """Items → one ``PackedBatch`` in the model's patch layout (patches on the items' device)."""
        patches, grid_thw = patchify(list(items), model.patch_size, model.patch_layout)
        return PackedBatch(patches, grid_thw, model.patch_layout)

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
        """The packed model on all ``items`` in one pack; each item's tokens in the reference's order
        (prefix tokens first)."""
        batch = self.pack(items, model)
        out = model(batch)
        tokens = out.last_hidden_state
        segment_lengths = batch.token_counts
        if out.prefix_tokens is not None:
            # rows of cat([prefix tokens (N*P rows), patch tokens]) in segment order [prefix_i, patches_i]
            num_prefix, hidden = out.prefix_tokens.shape[1:]
            prefix_rows, patch_rows = prefix_token_index(segment_lengths, num_prefix)
            order = np.empty(prefix_rows.numel() + patch_rows.numel(), dtype=np.int64)
            order[prefix_rows.numpy().ravel()] = np.arange(prefix_rows.numel())
            order[patch_rows.numpy()] = prefix_rows.numel() + np.arange(patch_rows.numel())
            tokens = torch.cat([out.prefix_tokens.reshape(-1, hidden), tokens])
            tokens = tokens.index_select(0, to_device(torch.from_numpy(order), tokens.device))  # [S, D], reference order
            segment_lengths = [num_prefix + n for n in segment_lengths]
        per_item = torch.split(tokens, segment_lengths)
        pooled = out.pooler_output
        return [ItemOutput(t, pooled[i] if pooled is not None else None) for i, t in enumerate(per_item)]


def get_adapter(name: str) -> FamilyAdapter:
    return importlib.import_module(f"{__name__}.{normalize_family(name)}").ADAPTER
