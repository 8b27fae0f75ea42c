"""Preprocessed inputs → packs of at most a token budget, with the metadata rows they carry.

An input gives one or more rows (an image: one; a clip cut into frames: one per frame; a failed
input: one error row) and, for its ``ok`` rows, one packed item each. The packer joins inputs in
the order they come until the next would overflow ``token_budget``; an input is never split across
packs, and one larger than the budget travels alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..packing import PackedBatch

__all__ = ["Row", "InputResult", "Pack", "Packer"]


@dataclass
class Row:
    """One metadata row: where the item came from, its patch grid and its status."""

    image_path: str
    source_index: int
    key: str | None = None
    frame: int | None = None
    grid: tuple[int, int, int] = (0, 0, 0)
    status: str = "ok"
    error: str | None = None

    @property
    def num_tokens(self) -> int:
        """Patch tokens of the row's item (0 for a failed row)."""
        t, h, w = self.grid
        return t * h * w


@dataclass
class InputResult:
    """One input of task ``task`` at row ``position`` of its shard order: its rows and, for the
    ``ok`` rows, their items in ``batch`` (one item per ``ok`` row, in row order; ``None`` if none)."""

    task: int
    position: int
    rows: list[Row]
    batch: PackedBatch | None = None


@dataclass
class Pack:
    """What a DataLoader worker yields: the packed items of several inputs, and their rows.

    ``inputs`` are ``(task, position, rows)``; the batch's items are the ``ok`` rows of the inputs in
    that order. ``task_totals`` holds the input count of tar tasks read to their end.
    """

    batch: PackedBatch | None
    inputs: list[tuple[int, int, list[Row]]]
    task_totals: dict[int, int] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return 0 if self.batch is None else self.batch.patches.shape[0]

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def pin_memory(self) -> "Pack":
        """The pack with its patches in pinned memory (called by the DataLoader's pinning thread)."""
        batch = self.batch.pin_memory() if self.batch is not None else None
        return Pack(batch, self.inputs, self.task_totals)


class Packer:
    """Greedy packing in arrival order to at most ``token_budget`` patch tokens per pack, patches
    cast to ``patch_dtype`` (``None``: kept as the processor made them)."""

    def __init__(self, token_budget: int, patch_dtype: torch.dtype | None = None):
        if token_budget < 1:
            raise ValueError(f"--token_budget must be at least 1, got {token_budget}")
        self.token_budget = token_budget
        self.patch_dtype = patch_dtype
        self._results: list[InputResult] = []
        self._tokens = 0
        self._task_totals: dict[int, int] = {}

    def add(self, result: InputResult) -> Iterator[Pack]:
        """Adds one input; yields the current pack first if the input would overflow it."""
        tokens = sum(row.num_tokens for row in result.rows)
        if self._results and self._tokens + tokens > self.token_budget:
            yield self._take()
        self._results.append(result)
        self._tokens += tokens

    def end_task(self, task: int, num_inputs: int) -> None:
        """Records that a tar task holds ``num_inputs`` inputs (sent with the next pack)."""
        self._task_totals[task] = num_inputs

    def flush(self) -> Iterator[Pack]:
        """The last, partly filled pack (also when it only carries task totals)."""
        if self._results or self._task_totals:
            yield self._take()

    def _take(self) -> Pack:
        batches = [result.batch for result in self._results if result.batch is not None]
        batch = PackedBatch.concat(batches) if batches else None
        if batch is not None and self.patch_dtype is not None:
            batch = batch.to(dtype=self.patch_dtype)
        pack = Pack(
            batch=batch,
            inputs=[(result.task, result.position, result.rows) for result in self._results],
            task_totals=self._task_totals,
        )
        self._results, self._tokens, self._task_totals = [], 0, {}
        return pack
