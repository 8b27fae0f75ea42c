"""The pack stage: inputs → packs of at most a token budget, and the pack's outputs → back per input.

An input gives one or more rows (an image: one; a clip cut into frames: one per frame; a failed
input: one error row) and, for its ``ok`` rows, one packed item each. ``Packer`` joins inputs in the
order they come until the next would overflow the budget (``packing.GreedyPacker``); an input is
never split across packs, and one larger than the budget travels alone. The layout of a pack is
stated once, here: **the pack's items are the ok rows of its inputs, input after input, in row
order**; ``Packer._take`` builds it and ``Pack.split`` is its inverse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..packing import GreedyPacker, PackedBatch
from .layout import Row

__all__ = ["InputResult", "InputOutputs", "HostOutputs", "Pack", "Packer"]


@dataclass
class InputResult:
    """The outcome of the ``input_index``-th input of task ``task``: its rows, one per item, or one
    failed row."""

    task: int
    input_index: int
    rows: list[Row]

    @property
    def ok_rows(self) -> list[int]:
        """Indices of the rows that have an item."""
        return [index for index, row in enumerate(self.rows) if row.status == "ok"]

    @property
    def num_tokens(self) -> int:
        return sum(row.num_tokens for row in self.rows)


@dataclass
class InputOutputs:
    """One input's share of a pack's outputs: ``pooled [ok rows, D]`` (``None`` without ok rows) and
    ``tokens {name: [the input's tokens, D]}``, ok row after ok row."""

    input: InputResult
    pooled: object | None
    tokens: dict[str, object]


@dataclass
class HostOutputs:
    """A pack's outputs on the host: ``pooled [num_items, D]`` (``None`` for a pack without items) and
    ``tokens {name: [num_tokens, D]}``; on CUDA they are complete once ``ready`` has passed."""

    pooled: torch.Tensor | None
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    ready: torch.cuda.Event | None = None

    def numpy(self):
        """``(pooled, tokens)`` as numpy arrays, after waiting for the copies."""
        if self.ready is not None:
            self.ready.synchronize()
        pooled = self.pooled.numpy() if self.pooled is not None else None
        return pooled, {name: tensor.numpy() for name, tensor in self.tokens.items()}


@dataclass
class Pack:
    """What a DataLoader worker yields: the packed items of several inputs, and their results.

    ``batch`` holds the ok rows' items of ``inputs``, input after input (``None`` when no row is
    ok); ``tar_sizes`` the input count of each tar task read to its end.
    """

    batch: PackedBatch | None
    inputs: list[InputResult]
    tar_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return 0 if self.batch is None else self.batch.patches.shape[0]

    @property
    def num_items(self) -> int:
        return 0 if self.batch is None else self.batch.num_items

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def pin_memory(self) -> "Pack":
        """The pack with its patches in pinned memory (called by the DataLoader's pinning thread)."""
        batch = self.batch.pin_memory() if self.batch is not None else None
        return Pack(batch, self.inputs, self.tar_sizes)

    def split(self, pooled, tokens: Mapping[str, object]) -> list[InputOutputs]:
        """The pack's outputs, ``pooled [num_items, D]`` and ``tokens {name: [num_tokens, D]}`` (numpy
        arrays or tensors), cut back per input."""
        parts, item, token = [], 0, 0
        for result in self.inputs:
            ok = [result.rows[index] for index in result.ok_rows]
            count = sum(row.num_tokens for row in ok)
            parts.append(InputOutputs(result, pooled[item: item + len(ok)] if ok else None,
                                      {name: value[token: token + count] for name, value in tokens.items()}))
            item, token = item + len(ok), token + count
        return parts


class Packer:
    """Packs inputs in arrival order to at most ``token_budget`` patch tokens per pack, patches cast
    to ``patch_dtype`` (``None``: kept as the processor made them)."""

    def __init__(self, token_budget: int, patch_dtype: torch.dtype | None = None):
        self.budget = GreedyPacker(token_budget)
        self.patch_dtype = patch_dtype
        self._results: list[InputResult] = []
        self._items: list[PackedBatch] = []
        self._tar_sizes: dict[int, int] = {}

    def add(self, result: InputResult, items: PackedBatch | None):
        """Adds one input and the items of its ok rows (in row order; ``None`` when none); yields
        the current pack first if the input does not fit it."""
        if self.budget.add(result.num_tokens):
            yield self._take()
        self._results.append(result)
        if items is not None:
            self._items.append(items)

    def end_tar(self, task: int, num_inputs: int) -> None:
        """Records that tar task ``task`` holds ``num_inputs`` inputs (sent with the next pack)."""
        self._tar_sizes[task] = num_inputs

    def flush(self):
        """The last, partly filled pack (also when it only carries tar sizes)."""
        if self._results or self._tar_sizes:
            yield self._take()
            self.budget.reset()

    def _take(self) -> Pack:
        batch = PackedBatch.concat(self._items) if self._items else None
        if batch is not None and self.patch_dtype is not None:
            batch = batch.to(dtype=self.patch_dtype)
        pack = Pack(batch, self._results, self._tar_sizes)
        self._results, self._items, self._tar_sizes = [], [], {}
        return pack
