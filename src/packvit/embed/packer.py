"""The pack stage: inputs → packs of at most a token budget, and the pack's outputs → back per input.

An input gives one or more rows (an image: one; a clip cut into frames: one per frame; a failed
input: one error row) and, for its ``ok`` rows, its items: the uint8 ``PixelBatch`` of the
processor's first stage (one item per ok row), or, on the GPU route, its ``JpegFile`` (one row, one
item, decoded in the main process). ``Packer`` joins inputs in the order they come until the next
would overflow the budget (``packing.GreedyPacker``); an input is never split across packs, and
one larger than the budget travels alone. The layout of a pack is stated once, here: **the pack's
items are the ok rows of its inputs, input after input, in row order, the inputs with pixels
first, then those with JPEG files** (the writer places each input by its index, not its place in
the pack); ``Packer._take`` builds it and ``Pack.split`` is its inverse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..packing import GreedyPacker
from ..preprocess import PixelBatch
from .gpu_decode import JpegFile, JpegFiles
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
    """What a DataLoader worker yields: the items of several inputs, and their results.

    ``pixels`` holds the uint8 items of the inputs decoded on the CPU, ``jpegs`` the files of
    the GPU route's inputs (``None`` where there are none), in the order of ``inputs`` (module
    docstring); ``tar_sizes`` the input count of each tar task read to its end.
    """

    pixels: PixelBatch | None
    jpegs: JpegFiles | None
    inputs: list[InputResult]
    tar_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """Patch tokens of the pack's ok rows."""
        return sum(result.num_tokens for result in self.inputs)

    @property
    def num_items(self) -> int:
        return sum(len(result.ok_rows) for result in self.inputs)

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def jpeg_rows(self) -> list[Row]:
        """The row of each file of ``jpegs``, in order (a row that failed in the main process included)."""
        return [result.rows[0] for result in self.inputs[len(self.inputs) - len(self.jpegs or ()):]]

    def pin_memory(self) -> "Pack":
        """The pack with its pixels in pinned memory (called by the DataLoader's pinning thread;
        nvJPEG reads the JPEG files from any host memory)."""
        pixels = self.pixels.pin_memory() if self.pixels is not None else None
        return Pack(pixels, self.jpegs, self.inputs, self.tar_sizes)

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
    """Packs inputs in arrival order to at most ``token_budget`` patch tokens per pack."""

    def __init__(self, token_budget: int):
        self.budget = GreedyPacker(token_budget)
        self._results: list[InputResult] = []
        self._pixels: list[PixelBatch] = []
        self._jpeg_results: list[InputResult] = []
        self._jpegs: list[JpegFile] = []
        self._tar_sizes: dict[int, int] = {}

    def add(self, result: InputResult, items: PixelBatch | JpegFile | None):
        """Adds one input and the items of its ok rows (``None`` when none); yields the current pack
        first if the input does not fit it."""
        if self.budget.add(result.num_tokens):
            yield self._take()
        if isinstance(items, JpegFile):
            self._jpeg_results.append(result)
            self._jpegs.append(items)
            return
        self._results.append(result)
        if items is not None:
            self._pixels.append(items)

    def end_tar(self, task: int, num_inputs: int) -> None:
        """Records that tar task ``task`` holds ``num_inputs`` inputs (sent with the next pack)."""
        self._tar_sizes[task] = num_inputs

    def flush(self):
        """The last, partly filled pack (also when it only carries tar sizes)."""
        if self._results or self._jpeg_results or self._tar_sizes:
            yield self._take()
            self.budget.reset()

    def _take(self) -> Pack:
        pixels = PixelBatch.concat(self._pixels) if self._pixels else None
        jpegs = JpegFiles.join(self._jpegs) if self._jpegs else None
        pack = Pack(pixels, jpegs, self._results + self._jpeg_results, self._tar_sizes)
        self._results, self._pixels, self._jpeg_results, self._jpegs, self._tar_sizes = [], [], [], [], {}
        return pack
