"""The vision tower of a vision-language model: per-item features of a packed batch, for a
projector and a language model, in training as in inference.

    model = packvit.from_pretrained("google/siglip2-so400m-patch16-naflex")
    tower = VisionTower(model, select_layer=-2, spatial_merge=2, odd_grids="pad")
    out = tower(processor(images))          # TowerOutput: features [T, 4 * 1152], lengths, cu_seqlens
    image_tokens = projector(out.features)  # [T, text hidden], item after item

- ``select_layer``: which hidden state (an index into the ``num_hidden_layers + 1`` hidden states:
  0 = the embeddings, -1 = the last block, before the final norm; or a list, concatenated along
  channels), or ``None`` for the model's output after its final norm. Only the hidden states
  asked for are kept, and no block past the deepest of them runs.
- ``select_feature``: ``"patch"`` (patch tokens) or ``"cls_patch"`` (each item's CLS token, then its
  patches; models with a CLS token only, ``has_cls_token``; register tokens are never returned).
- ``spatial_merge``: ``m`` (2 for Qwen2-VL's merger) concatenates each ``m x m`` block of patch
  tokens into one ``[m*m*F]`` row: within a block (r, c), (r, c+1), (r+1, c), (r+1, c+1) (for
  m = 2), blocks row-major, frame after frame for items of several frames. ``odd_grids`` says what
  happens to a grid side that is not a multiple of ``m``: ``"error"`` (the default: resize the
  images), ``"crop"`` (the last rows/columns that do not fill a block are dropped) or ``"pad"``
  (the missing neighbours of the last blocks are zero features).
- The output is packed (``features [T, F]`` with ``lengths`` and host ``cu_seqlens``) and splits
  per item with ``split()``. ``tower.prepare(batch)`` builds the metadata on the host (the model's
  ``PackMetadata`` and the output index), to pass back as ``tower(batch, metadata=meta)`` from
  outside a compiled region or across several calls.

Training: ``tower.requires_grad_(False)`` (or ``freeze``) freezes it, ``param_groups`` gives the
tower its own learning rate, ``shard_tower`` applies FSDP2 per block, and a rank without images
runs ``placeholder_batch(model)`` with its loss multiplied by zero, so that every rank runs the
same collectives (docs/vlm.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .models.base import PackedVisionModel, PackMetadata, normalize_layer_indices
from .models.registry import FAMILIES, model_class
from .packing import (PackedBatch, SegmentLayout, item_token_counts, offsets_within_items, prefix_token_index, to_device,
                      validate_grid_thw)

__all__ = [
    "SELECT_FEATURES",
    "ODD_GRIDS",
    "spatial_merge_index",
    "TowerMetadata",
    "TowerOutput",
    "VisionTower",
    "placeholder_batch",
    "param_groups",
    "shard_tower",
]

SELECT_FEATURES = ("patch", "cls_patch")
ODD_GRIDS = ("error", "crop", "pad")


def spatial_merge_index(grid_thw: torch.Tensor, merge_size: int, odd_grids: str = "error") -> tuple[np.ndarray, list[int]]:
    """Where each merged row's tokens come from, for patch tokens in packed (t, row, column) order.

    Returns int64 ``index [sum(lengths) * merge_size**2]``: row ``j`` of the merged sequence,
    viewed as ``[sum(lengths), merge_size**2 * F]``, is tokens ``index[j*m*m : (j+1)*m*m]``
    (row ``total_patches`` is a zero row, used by ``odd_grids="pad"`` only), and ``lengths``:
    merged rows per item. Built on the host without a loop over items.
    """
    if odd_grids not in ODD_GRIDS:
        raise ValueError(f"odd_grids must be one of {ODD_GRIDS}, got {odd_grids!r}")
    m = merge_size
    t, h, w = grid_thw.to(torch.int64).numpy().T  # [N] each
    odd = (h % m != 0) | (w % m != 0)
    if odd_grids == "error" and odd.any():
        i = int(np.argmax(odd))
        raise ValueError(
            f"item {i} has a {h[i]}x{w[i]} patch grid, and a {m}x{m} spatial merge needs both sides to be multiples "
            f"of {m}: resize the images to sides that are multiples of {m} patches, or pass odd_grids='crop' (drop the "
            f"rows and columns that do not fill a block) or odd_grids='pad' (zero features for the missing neighbours)"
        )
    if odd_grids == "pad":
        rows, cols = -(-h // m) * m, -(-w // m) * m
    else:
        rows, cols = h // m * m, w // m * m
    if (rows == 0).any() or (cols == 0).any():
        i = int(np.argmax((rows == 0) | (cols == 0)))
        raise ValueError(
            f"item {i} has a {h[i]}x{w[i]} patch grid, smaller than one {m}x{m} block, so cropping leaves nothing of "
            f"it; pass odd_grids='pad', or resize it to at least {m} patches per side"
        )
    counts = t * h * w  # [N] patches per item
    starts = np.cumsum(counts) - counts  # [N] first patch row of each item
    gathered = t * rows * cols  # [N] tokens gathered per item
    j = offsets_within_items(gathered)  # [sum] position in the item's merged sequence
    item = np.repeat(np.arange(len(t)), gathered)
    h, w, block_cols = h[item], w[item], (cols // m)[item]
    block, within = j // (m * m), j % (m * m)
    blocks_per_frame = (rows // m)[item] * block_cols
    frame, block = block // blocks_per_frame, block % blocks_per_frame
    row = block // block_cols * m + within // m
    col = block % block_cols * m + within % m
    source = starts[item] + frame * h * w + row * w + col
    index = np.where((row < h) & (col < w), source, counts.sum())  # out of the grid: the zero row
    return index.astype(np.int64), (gathered // (m * m)).tolist()


def _cls_patch_index(patch_counts: list[int]) -> np.ndarray:
    """Rows of ``cat(cls [N, F], patches [S, F])`` in the order CLS_0, patches_0, CLS_1, ...: ``[N + S]``."""
    cls_rows, patch_rows = prefix_token_index(patch_counts, 1)
    index = np.empty(len(patch_counts) + patch_rows.numel(), dtype=np.int64)
    index[cls_rows.numpy().ravel()] = np.arange(len(patch_counts))
    index[patch_rows.numpy()] = len(patch_counts) + np.arange(patch_rows.numel())
    return index


@dataclass
class TowerMetadata:
    """A pack's metadata for a ``VisionTower``, built on the host once: the model's metadata
    (``model_metadata``; ``None``: the model builds its own in the forward, where it may run its
    captured graphs), the output ``lengths`` per item and their host int32 ``cu_seqlens [N + 1]``,
    and ``index`` (device int64), the rows the output gathers: ``[N + total_patches]`` for CLS +
    patches, ``[m*m, merged rows]`` for a spatial merge (row k: the k-th token of every block),
    ``None`` for the patch tokens as they are."""

    model_metadata: PackMetadata | None
    lengths: list[int]
    cu_seqlens: torch.Tensor
    index: torch.Tensor | None = None


@dataclass
class TowerOutput:
    """Per-item features, packed: ``features [sum(lengths), feature_size]`` item after item,
    ``lengths`` (tokens per item) and ``cu_seqlens`` (host int32 ``[N + 1]``)."""

    features: torch.Tensor
    lengths: list[int]
    cu_seqlens: torch.Tensor

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths)

    def split(self) -> list[torch.Tensor]:
        """One ``[lengths[i], feature_size]`` tensor per item (views; no device read)."""
        return list(torch.split(self.features, self.lengths))


class VisionTower(nn.Module):
    """A packed model as a VLM's vision tower: ``tower(batch)`` → ``TowerOutput``.

    ``model``: a packed model (``packvit.from_pretrained``), a submodule of the tower, so that
    ``tower.requires_grad_(False)``, ``.train()``, ``.to()`` and optimisers reach it. The options
    are those of this module's docstring; ``interpolate_pos_encoding``, if given, sets the model's
    attribute of that name.
    """

    def __init__(self, model: PackedVisionModel, *, select_layer: int | Sequence[int] | None = None,
                 select_feature: str = "patch", spatial_merge: int | None = None, odd_grids: str = "error",
                 interpolate_pos_encoding: bool | None = None):
        super().__init__()
        if not isinstance(model, PackedVisionModel):
            raise ValueError(f"VisionTower wraps a packed model (packvit.from_pretrained(...)), got {type(model).__name__}")
        if select_feature not in SELECT_FEATURES:
            raise ValueError(f"select_feature must be one of {SELECT_FEATURES}, got {select_feature!r}")
        if select_feature == "cls_patch" and not model.has_cls_token:
            with_cls = [family for family in FAMILIES if model_class(family).has_cls_token]
            raise ValueError(
                f"select_feature='cls_patch' returns each item's CLS token before its patches, and {model.family} has no "
                f"CLS token (the families with one: {', '.join(with_cls)}); use select_feature='patch'"
            )
        if spatial_merge is not None and (not isinstance(spatial_merge, int) or isinstance(spatial_merge, bool)
                                          or spatial_merge < 1):
            raise ValueError(f"spatial_merge must be a positive int (2 for a 2x2 merge) or None, got {spatial_merge!r}")
        if spatial_merge and spatial_merge > 1 and select_feature == "cls_patch":
            raise ValueError("a spatial merge combines patch tokens, and a CLS token has no place in the grid; "
                             "use select_feature='patch' with spatial_merge")
        if odd_grids not in ODD_GRIDS:
            raise ValueError(f"odd_grids must be one of {ODD_GRIDS}, got {odd_grids!r}")
        self.model = model
        if select_layer is None:
            self.layers = None
        else:
            layers = [select_layer] if isinstance(select_layer, int) else list(select_layer)
            if not layers:
                raise ValueError("select_layer is an empty list; pass a layer index, a list of them, or None")
            self.layers = normalize_layer_indices(layers, model.num_hidden_layers)
        self.select_feature = select_feature
        self.merge_size = spatial_merge if spatial_merge and spatial_merge > 1 else 1
        self.odd_grids = odd_grids
        if interpolate_pos_encoding is not None:
            model.interpolate_pos_encoding = interpolate_pos_encoding

    @property
    def feature_size(self) -> int:
        """Width of an output row: hidden size x selected layers x merge_size²."""
        return self.model.hidden_size * (len(self.layers) if self.layers else 1) * self.merge_size**2

    def _layout(self, grid_thw: torch.Tensor) -> tuple[list[int], np.ndarray | None]:
        """(output tokens per item, host index of the rows gathered, or None)."""
        counts = item_token_counts(grid_thw)
        if self.merge_size > 1:
            index, lengths = spatial_merge_index(grid_thw, self.merge_size, self.odd_grids)
            return lengths, index
        if self.select_feature == "cls_patch":
            return [n + 1 for n in counts], _cls_patch_index(counts)
        return counts, None

    def feature_lengths(self, grid_thw) -> list[int]:
        """Output tokens of each item of a ``grid_thw`` (or a ``PackedBatch``), known before the tower
        runs: the number of image tokens to reserve in the language model's sequence."""
        grid_thw = grid_thw.grid_thw if isinstance(grid_thw, PackedBatch) else validate_grid_thw(grid_thw)
        return self._layout(grid_thw)[0]

    def prepare(self, batch: PackedBatch, model_metadata: PackMetadata | None = None) -> TowerMetadata:
        """The metadata of ``batch`` (host work and non-blocking copies only); ``model_metadata``: the
        model's metadata of this batch if already built (``model.prepare(batch)``)."""
        return self._output_metadata(batch, self.model.prepare(batch) if model_metadata is None else model_metadata)

    def _output_metadata(self, batch: PackedBatch, model_metadata: PackMetadata | None) -> TowerMetadata:
        lengths, index = self._layout(batch.grid_thw)
        cu_seqlens = SegmentLayout.from_lengths(lengths).cu_seqlens_host
        if index is not None and self.merge_size > 1:
            index = np.ascontiguousarray(index.reshape(-1, self.merge_size**2).T)  # [T * m²] → [m², T]
        device_index = None if index is None else to_device(torch.from_numpy(index), self.model.device)
        return TowerMetadata(model_metadata, lengths, cu_seqlens, device_index)

    def forward(self, batch: PackedBatch, metadata: TowerMetadata | PackMetadata | None = None) -> TowerOutput:
        """``batch`` (a ``PackedBatch`` in the model's layout) → ``TowerOutput``; ``metadata`` from
        ``prepare`` (or the model's ``PackMetadata``) is reused instead of built again. Without it,
        the model builds its own in its forward, where in inference it may run captured graphs
        (``model.cuda_graphs``)."""
        if not isinstance(batch, PackedBatch):
            raise ValueError(f"a VisionTower takes a PackedBatch (the model's processor output), got {type(batch).__name__}")
        if not isinstance(metadata, TowerMetadata):
            metadata = self._output_metadata(batch, metadata)
        if self.layers is None:
            out = self.model(batch, metadata=metadata.model_metadata, output_pooled=False)
            selected, prefixes = [out.last_hidden_state], [out.prefix_tokens]
        else:
            out = self.model(batch, metadata=metadata.model_metadata, hidden_layers=self.layers, hidden_states_only=True)
            selected, prefixes = list(out.hidden_states), list(out.prefix_hidden_states or [])
        x = selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)  # [total_patches, F]
        if self.select_feature == "cls_patch":
            cls = torch.cat([p[:, 0] for p in prefixes], dim=-1)  # [N, P, D] each → [N, F]
            x = torch.cat([cls, x]).index_select(0, metadata.index)  # [N + total_patches, F]
        elif self.merge_size > 1:
            if self.odd_grids == "pad":
                x = torch.cat([x, x.new_zeros(1, x.shape[-1])])  # the zero row missing neighbours read
            # m² gathers of [T, F] side by side → [T, m² * F] (a tensor of its own, not a view)
            x = torch.cat([x.index_select(0, rows) for rows in metadata.index], dim=-1)
        return TowerOutput(x, metadata.lengths, metadata.cu_seqlens)

    def unused_parameters(self) -> list[nn.Parameter]:
        """The model's parameters this tower never runs: the pooling head, and with ``select_layer``
        the blocks past the deepest layer selected and the final norm. They take no gradient
        (``param_groups`` leaves them out; DDP would need ``find_unused_parameters`` for them)."""
        modules = [self.model.head]
        if self.layers is not None:
            modules += [*self.model.blocks[max(self.layers):], self.model.final_norm]
        return [p for module in modules if module is not None for p in module.parameters()]

    def freeze(self, num_blocks: int | None = None) -> "VisionTower":
        """Freezes the whole tower (``None``: as ``requires_grad_(False)``), or its embeddings and first
        ``num_blocks`` blocks, the later blocks, final norm and head still training. Returns the tower."""
        if num_blocks is None:
            return self.requires_grad_(False)
        if not 0 <= num_blocks <= self.model.num_hidden_layers:
            raise ValueError(f"num_blocks must be between 0 and {self.model.num_hidden_layers}, got {num_blocks}")
        self.model.embeddings.requires_grad_(False)
        for block in self.model.blocks[:num_blocks]:
            block.requires_grad_(False)
        return self

    def placeholder_batch(self) -> PackedBatch:
        """``placeholder_batch(self.model)``."""
        return placeholder_batch(self.model)


def placeholder_batch(model: PackedVisionModel) -> PackedBatch:
    """A one-item batch of zero pixels (host) that ``model`` accepts: its ``placeholder_grid()``, one
    patch, or for a model whose learned position table serves one grid only, that grid.

    A rank with no images in a step runs it through the tower and adds its loss times zero: every
    rank then runs the same collectives (FSDP2 all-gathers each block's weights in the forward and
    reduce-scatters the gradients of the same parameters in the backward), and the zero gradients
    change nothing.
    """
    grid_thw = model.placeholder_grid()
    return PackedBatch(torch.zeros(int(grid_thw.prod()), model.patch_dim), grid_thw, model.patch_layout)


def param_groups(module: nn.Module, tower: nn.Module, *, lr: float, tower_lr: float,
                 weight_decay: float = 0.0) -> list[dict]:
    """Optimiser parameter groups: ``tower``'s trainable parameters at ``tower_lr``, the rest of
    ``module``'s (the projector, the language model) at ``lr``; ``weight_decay`` on matrices, none on
    vectors (biases, norm weights, LayerScale). Frozen parameters are left out, and so are those a
    ``VisionTower`` never runs (``unused_parameters``); empty groups are dropped. Each group is
    named: ``"tower"``, ``"tower_no_decay"``, ``"other"``, ``"other_no_decay"``. With FSDP2, call it
    after sharding (``fully_shard`` replaces the parameters).
    """
    tower_parameters = {id(p) for p in tower.parameters()}
    unused = {id(p) for p in tower.unused_parameters()} if isinstance(tower, VisionTower) else set()
    groups: dict[str, dict] = {}
    for parameter in module.parameters():
        if not parameter.requires_grad or id(parameter) in unused:
            continue
        part = "tower" if id(parameter) in tower_parameters else "other"
        decays = parameter.dim() >= 2
        name = part if decays or not weight_decay else f"{part}_no_decay"
        group = groups.setdefault(name, {"name": name, "params": [], "lr": tower_lr if part == "tower" else lr,
                                         "weight_decay": weight_decay if decays else 0.0})
        group["params"].append(parameter)
    return list(groups.values())


def shard_tower(module: nn.Module, **fsdp_kwargs) -> nn.Module:
    """FSDP2 per layer: ``fully_shard`` on every encoder block, then on ``module`` (a ``VisionTower``
    or a packed model) for the rest (embeddings, final norm, head). ``fsdp_kwargs`` go to every
    ``fully_shard`` call (``mesh``, ``mp_policy``, ``reshard_after_forward``); with a mixed-precision
    policy the model's ``compute_dtype`` becomes its ``param_dtype``, so metadata built outside the
    forward matches it. Returns ``module``; shard the enclosing model afterwards as usual.
    """
    from torch.distributed.fsdp import fully_shard

    model = module.model if isinstance(module, VisionTower) else module
    if not isinstance(model, PackedVisionModel):
        raise ValueError(f"shard_tower takes a VisionTower or a packed model, got {type(module).__name__}")
    for block in model.blocks:
        fully_shard(block, **fsdp_kwargs)
    fully_shard(module, **fsdp_kwargs)
    policy = fsdp_kwargs.get("mp_policy")
    model.compute_dtype = getattr(policy, "param_dtype", None)
    return module
