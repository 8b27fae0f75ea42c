"""The write stage: each task's shard, written exactly once, on a background thread.

``ShardWriter`` collects every pack's outputs per task (``Pack.split``) and writes a task's files
(``layout``) as soon as all its inputs have arrived: tokens, then embeddings, then the metadata,
whose rename commits the shard. A task's tokens wait in spill files, not in memory.
"""

from __future__ import annotations

import json
import queue
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .._optional import require
from .layout import OutputFormat, OutputLayout, Row, metadata_table, temporary_path, write_atomic
from .packer import HostOutputs, Pack

__all__ = ["write_token_shard", "ShardWriter"]

_SAFETENSORS_DTYPES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}


def write_token_shard(path: Path, offsets: np.ndarray, grid_thw: np.ndarray, sources: dict[str, np.ndarray],
                      ranges: Sequence[tuple[int, int]]) -> None:
    """A safetensors file of ``offsets [rows + 1]``, ``grid_thw [rows, 3]`` and, per name, the rows
    ``start:start + count`` of ``sources[name] [spilled, D]`` for each range, in order, streamed."""
    total = sum(count for _, count in ranges)
    entries, header, start = [("offsets", offsets), ("grid_thw", grid_thw)], {}, 0
    for name, array in entries:
        header[name] = {"dtype": "I64", "shape": list(array.shape), "data_offsets": [start, start + array.nbytes]}
        start += array.nbytes
    for name, source in sources.items():
        size = total * source.shape[1] * source.dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[source.dtype], "shape": [total, source.shape[1]],
                        "data_offsets": [start, start + size]}
        start += size
    header["__metadata__"] = {"format": "pt", "layers": ",".join(sources)}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned

    def write(handle):
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for _, array in entries:
            handle.write(np.ascontiguousarray(array).tobytes())
        for source in sources.values():
            for first, count in ranges:
                handle.write(np.ascontiguousarray(source[first: first + count]).tobytes())

    write_atomic(path, write)


@dataclass
class _TaskBuffer:
    """The results of one task received so far, keyed by input index."""

    expected: int | None
    rows: dict[int, list[Row]] = field(default_factory=dict)
    #: per input index, the pooled embeddings of its ok rows ``[ok rows, D]``
    pooled: dict[int, np.ndarray] = field(default_factory=dict)
    #: per input index, ``(first spill row, rows)`` of each ok row's tokens
    token_ranges: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    spill_rows: int = 0
    #: per token name, the open spill file its ``[spill_rows, D]`` rows are appended to
    spills: dict[str, object] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.expected is not None and len(self.rows) == self.expected


class ShardWriter:
    """Collects pack outputs per task on a background thread and writes each task's shard once all
    its inputs have arrived.

    ``expected`` gives each task's input count (``None`` for a tar until a pack brings its size).
    ``submit(pack, outputs)`` hands over one pack; ``completed`` returns the tasks written since the
    last call; ``close`` waits for everything submitted and re-raises the thread's error.
    """

    def __init__(self, layout: OutputLayout, expected: Mapping[int, int | None], output: OutputFormat,
                 max_pending: int = 8):
        self.layout = layout
        self.expected = dict(expected)
        self.output = output
        self._buffers: dict[int, _TaskBuffer] = {}
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._done: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="packvit-embed-writer", daemon=True)
        self._thread.start()

    def submit(self, pack: Pack, outputs: HostOutputs) -> None:
        """Queues one pack and its outputs (blocks while ``max_pending`` packs wait)."""
        while True:
            self._raise_error()
            try:
                self._queue.put((pack, outputs), timeout=0.5)
                return
            except queue.Full:
                continue

    def completed(self) -> list[int]:
        """Tasks whose shards were written since the last call."""
        self._raise_error()
        done = []
        while not self._done.empty():
            done.append(self._done.get())
        return done

    def close(self) -> list[int]:
        """Waits for every submitted pack to be written; returns the tasks written since ``completed``."""
        self._queue.put(None)
        self._thread.join()
        self._raise_error()
        return self.completed()

    def abort(self) -> None:
        """Stops after the pack in progress, dropping unfinished tasks (their temporary files go)."""
        self._error = self._error or _Aborted()
        while True:
            try:
                self._queue.put_nowait(None)
                break
            except queue.Full:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
        self._thread.join()
        for buffer in self._buffers.values():
            self._close_spills(buffer, remove=True)

    def _raise_error(self) -> None:
        if self._error is not None and not isinstance(self._error, _Aborted):
            raise RuntimeError(f"writing the output shards failed: {self._error}") from self._error

    def _loop(self) -> None:
        try:
            while (item := self._queue.get()) is not None and self._error is None:
                self._receive(*item)
        except BaseException as error:
            self._error = error

    def _receive(self, pack: Pack, outputs: HostOutputs) -> None:
        pooled, tokens = outputs.numpy()  # [items, D], {name: [pack tokens, D]}
        touched = set(pack.tar_sizes)
        for part in pack.split(pooled, tokens):
            result = part.input
            buffer = self._buffer(result.task)
            buffer.rows[result.input_index] = result.rows
            if part.pooled is not None:
                buffer.pooled[result.input_index] = part.pooled
            if self.output.token_names:
                self._spill(result.task, buffer, result.input_index,
                            [result.rows[index].num_tokens for index in result.ok_rows], part.tokens)
            touched.add(result.task)
        for task, total in pack.tar_sizes.items():
            self._buffer(task).expected = total
        for task in sorted(touched):
            if self._buffers[task].complete:
                self._write(task, self._buffers.pop(task))
                self._done.put(task)

    def _buffer(self, task: int) -> _TaskBuffer:
        if task not in self._buffers:
            self._buffers[task] = _TaskBuffer(self.expected[task])
        return self._buffers[task]

    def _spill(self, task: int, buffer: _TaskBuffer, input_index: int, counts: list[int],
               tokens: dict[str, np.ndarray]) -> None:
        """Appends an input's tokens (``[sum(counts), D]`` per name) to the task's spill files."""
        if not buffer.spills:
            buffer.spills = {name: open(temporary_path(self.layout.tokens(task).with_suffix(f".{index}.spill")), "w+b")
                             for index, name in enumerate(self.output.token_names)}
        ranges, start = [], buffer.spill_rows
        for count in counts:
            ranges.append((start, count))
            start += count
        for name, array in tokens.items():
            buffer.spills[name].write(np.ascontiguousarray(array).tobytes())
        buffer.token_ranges[input_index] = ranges
        buffer.spill_rows = start

    @staticmethod
    def _close_spills(buffer: _TaskBuffer, remove: bool) -> None:
        for handle in buffer.spills.values():
            handle.close()
            if remove:
                Path(handle.name).unlink(missing_ok=True)

    def _write(self, task: int, buffer: _TaskBuffer) -> None:
        """Writes a complete task: tokens, embeddings, then metadata (the commit)."""
        parquet = require("pyarrow.parquet", "embed", "writing the metadata parquet files")
        inputs = sorted(buffer.rows)
        rows = [row for index in inputs for row in buffer.rows[index]]
        embeddings = np.zeros((len(rows), self.output.embedding_dim), dtype=self.output.numpy_dtype)  # [rows, D]
        first = 0
        for index in inputs:
            ok = [first + position for position, row in enumerate(buffer.rows[index]) if row.status == "ok"]
            if ok:
                embeddings[ok] = buffer.pooled[index]
            first += len(buffer.rows[index])
        if self.output.token_names:
            self._write_tokens(task, buffer, inputs, rows)
        write_atomic(self.layout.img_emb(task), lambda handle: np.save(handle, embeddings))
        table = metadata_table(rows)
        write_atomic(self.layout.metadata(task), lambda handle: parquet.write_table(table, handle))

    def _write_tokens(self, task: int, buffer: _TaskBuffer, inputs: list[int], rows: list[Row]) -> None:
        counts = np.array([row.num_tokens for row in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [rows + 1]
        grid = np.array([row.grid for row in rows], dtype=np.int64).reshape(-1, 3)  # [rows, 3]
        ranges = [span for index in inputs for span in buffer.token_ranges.get(index, [])]
        for handle in buffer.spills.values():
            handle.flush()
        shape, dtype = (buffer.spill_rows, self.output.token_dim), self.output.numpy_dtype
        sources = {name: np.memmap(buffer.spills[name].name, dtype=dtype, mode="r", shape=shape) if buffer.spill_rows
                   else np.zeros(shape, dtype=dtype) for name in self.output.token_names}  # [spilled rows, D] each
        try:
            write_token_shard(self.layout.tokens(task), offsets, grid, sources, ranges)
        finally:
            sources.clear()
            self._close_spills(buffer, remove=True)


class _Aborted(Exception):
    """The writer was stopped on purpose (an interrupted run)."""
