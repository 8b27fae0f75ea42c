"""Output shards, written exactly once, on a background thread.

For task ``i`` (shard name ``i`` zero-padded to the digits of the task count, as clip-retrieval
names its partitions) the output folder gets:

- ``img_emb/img_emb_{i}.npy``: pooled embeddings ``[rows, D]`` (a zero vector for a failed row);
- ``metadata/metadata_{i}.parquet``: one row per item (``METADATA_SCHEMA``), aligned with the npy;
- with tokens, ``tokens/tokens_{i}.safetensors``: ``offsets [rows + 1]`` (int64; item ``r`` owns
  token rows ``offsets[r]:offsets[r+1]``, none when it failed), ``grid_thw [rows, 3]`` and one
  ``[total_tokens, D]`` tensor per token layer.

Each file is written under a temporary name, flushed to disk and renamed; the metadata file is
renamed last, so a shard is complete exactly when its metadata file exists.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from .._optional import require
from .packer import Row

__all__ = [
    "METADATA_COLUMNS",
    "require_pyarrow",
    "OutputLayout",
    "write_atomic",
    "write_token_shard",
    "ShardWriter",
]

#: the metadata columns, in order
METADATA_COLUMNS = ("image_path", "key", "source_index", "frame", "t", "h", "w", "status", "error")
_TEMP_MARK = ".tmp-"
_SAFETENSORS_DTYPES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}


def require_pyarrow(purpose: str = "writing the metadata parquet files"):
    """``pyarrow.parquet``, or an ``ImportError`` naming the extra to install."""
    return require("pyarrow.parquet", "embed", purpose)


def metadata_schema():
    import pyarrow as pa

    return pa.schema([("image_path", pa.string()), ("key", pa.string()), ("source_index", pa.int64()),
                      ("frame", pa.int32()), ("t", pa.int32()), ("h", pa.int32()), ("w", pa.int32()),
                      ("status", pa.string()), ("error", pa.string())])


@dataclass(frozen=True)
class OutputLayout:
    """The file names of an output folder of ``num_tasks`` shards."""

    root: Path
    num_tasks: int

    def shard_name(self, task: int) -> str:
        return str(task).zfill(len(str(max(self.num_tasks, 1))))

    def img_emb(self, task: int) -> Path:
        return self.root / "img_emb" / f"img_emb_{self.shard_name(task)}.npy"

    def metadata(self, task: int) -> Path:
        return self.root / "metadata" / f"metadata_{self.shard_name(task)}.parquet"

    def tokens(self, task: int) -> Path:
        return self.root / "tokens" / f"tokens_{self.shard_name(task)}.safetensors"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def failures(self) -> Path:
        return self.root / "failures.parquet"

    @property
    def folders(self) -> tuple[Path, ...]:
        return (self.root / "img_emb", self.root / "metadata", self.root / "tokens")

    def is_complete(self, task: int, with_tokens: bool) -> bool:
        """Whether shard ``task`` is done: its metadata (renamed last) and its other files exist."""
        files = [self.metadata(task), self.img_emb(task)] + ([self.tokens(task)] if with_tokens else [])
        return all(file.is_file() for file in files)

    def make_folders(self, with_tokens: bool) -> None:
        for folder in self.folders[: 3 if with_tokens else 2]:
            folder.mkdir(parents=True, exist_ok=True)

    def remove_temporary_files(self) -> int:
        """Deletes what interrupted runs left half-written; returns how many files."""
        removed = 0
        for folder in (self.root, *self.folders):
            for file in folder.glob(f".*{_TEMP_MARK}*") if folder.is_dir() else ():
                file.unlink(missing_ok=True)
                removed += 1
        return removed


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{_TEMP_MARK}{socket.gethostname()}-{os.getpid()}")


def write_atomic(path: Path, write: Callable[[object], None]) -> None:
    """``write(file)`` into a temporary file beside ``path``, flushed to disk, then renamed to ``path``."""
    temporary = _temporary_path(path)
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


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
    """The results of one task received so far, keyed by input position."""

    expected: int | None
    rows: dict[int, list[Row]] = field(default_factory=dict)
    pooled: dict[int, np.ndarray] = field(default_factory=dict)
    #: per input position, ``(first spill row, rows)`` of each ok row's tokens
    token_ranges: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    spill_rows: int = 0
    spills: dict[str, object] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.expected is not None and len(self.rows) == self.expected


@dataclass
class _Submission:
    inputs: list[tuple[int, int, list[Row]]]
    task_totals: dict[int, int]
    pooled: torch.Tensor | None
    tokens: dict[str, torch.Tensor]
    ready: torch.cuda.Event | None


class ShardWriter:
    """Collects pack results per task on a background thread and writes each task's shard once
    all its inputs have arrived.

    ``submit`` hands over one pack's host tensors (``ready``: a CUDA event the copies into them
    complete at); ``completed`` returns the tasks written since the last call; ``close`` waits
    for everything submitted and re-raises the thread's error.
    """

    def __init__(self, layout: OutputLayout, expected: Mapping[int, int | None], embedding_dim: int, dtype: np.dtype,
                 token_names: Sequence[str] = (), token_dim: int | None = None, max_pending: int = 8):
        self.layout = layout
        self.expected = dict(expected)  # task → its input count (None for a tar until it is read)
        self.embedding_dim = embedding_dim
        self.dtype = np.dtype(dtype)
        self.token_names = tuple(token_names)
        self.token_dim = token_dim
        self._buffers: dict[int, _TaskBuffer] = {}
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._done: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="packvit-embed-writer", daemon=True)
        self._thread.start()

    def submit(self, inputs, task_totals, pooled: torch.Tensor | None, tokens: dict[str, torch.Tensor],
               ready: torch.cuda.Event | None = None) -> None:
        """Queues one pack's results (blocks while ``max_pending`` packs wait)."""
        item = _Submission(inputs, task_totals, pooled, tokens, ready)
        while True:
            self._raise_error()
            try:
                self._queue.put(item, timeout=0.5)
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
                self._receive(item)
        except BaseException as error:
            self._error = error

    def _receive(self, item: _Submission) -> None:
        if item.ready is not None:
            item.ready.synchronize()
        pooled = item.pooled.numpy() if item.pooled is not None else None  # [ok items, D]
        tokens = {name: tensor.numpy() for name, tensor in item.tokens.items()}  # [pack tokens, D] each
        row_cursor = token_cursor = 0
        touched = set(item.task_totals)
        for task, position, rows in item.inputs:
            ok = [row for row in rows if row.status == "ok"]
            counts = [row.num_tokens for row in ok]
            buffer = self._buffer(task)
            buffer.rows[position] = rows
            if ok:
                buffer.pooled[position] = pooled[row_cursor: row_cursor + len(ok)]
            if self.token_names:
                self._spill(task, buffer, position, counts, {name: array[token_cursor: token_cursor + sum(counts)]
                                                       for name, array in tokens.items()})
            row_cursor, token_cursor = row_cursor + len(ok), token_cursor + sum(counts)
            touched.add(task)
        for task, total in item.task_totals.items():
            self._buffer(task).expected = total
        for task in sorted(touched):
            if self._buffers[task].complete:
                self._write(task, self._buffers.pop(task))
                self._done.put(task)

    def _buffer(self, task: int) -> _TaskBuffer:
        if task not in self._buffers:
            self._buffers[task] = _TaskBuffer(self.expected[task])
        return self._buffers[task]

    def _spill(self, task: int, buffer: _TaskBuffer, position: int, counts: list[int],
               tokens: dict[str, np.ndarray]) -> None:
        """Appends an input's tokens to the task's spill files, in arrival order."""
        if not buffer.spills:
            buffer.spills = {name: open(_temporary_path(self.layout.tokens(task).with_suffix(f".{index}.spill")), "w+b")
                             for index, name in enumerate(self.token_names)}
        ranges, start = [], buffer.spill_rows
        for count in counts:
            ranges.append((start, count))
            start += count
        for name, array in tokens.items():
            buffer.spills[name].write(np.ascontiguousarray(array).tobytes())
        buffer.token_ranges[position] = ranges
        buffer.spill_rows = start

    @staticmethod
    def _close_spills(buffer: _TaskBuffer, remove: bool) -> None:
        for handle in buffer.spills.values():
            handle.close()
            if remove:
                Path(handle.name).unlink(missing_ok=True)

    def _write(self, task: int, buffer: _TaskBuffer) -> None:
        """Writes a complete task: tokens, embeddings, then metadata (the commit)."""
        parquet = require_pyarrow()
        import pyarrow as pa

        positions = sorted(buffer.rows)
        rows = [row for position in positions for row in buffer.rows[position]]
        embeddings = np.zeros((len(rows), self.embedding_dim), dtype=self.dtype)  # [rows, D]
        cursor = 0
        for position in positions:
            ok = [index for index, row in enumerate(buffer.rows[position]) if row.status == "ok"]
            if ok:
                embeddings[[cursor + index for index in ok]] = buffer.pooled[position]
            cursor += len(buffer.rows[position])
        if self.token_names:
            self._write_tokens(task, buffer, positions, rows)
        write_atomic(self.layout.img_emb(task), lambda handle: np.save(handle, embeddings))
        columns = {
            "image_path": [row.image_path for row in rows],
            "key": [row.key for row in rows],
            "source_index": [row.source_index for row in rows],
            "frame": [row.frame for row in rows],
            "t": [row.grid[0] for row in rows],
            "h": [row.grid[1] for row in rows],
            "w": [row.grid[2] for row in rows],
            "status": [row.status for row in rows],
            "error": [row.error for row in rows],
        }
        table = pa.table(columns, schema=metadata_schema())
        write_atomic(self.layout.metadata(task), lambda handle: parquet.write_table(table, handle))

    def _write_tokens(self, task: int, buffer: _TaskBuffer, positions: list[int], rows: list[Row]) -> None:
        counts = np.array([row.num_tokens for row in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [rows + 1]
        grid = np.array([row.grid for row in rows], dtype=np.int64).reshape(-1, 3)  # [rows, 3]
        ranges = [span for position in positions for span in buffer.token_ranges.get(position, [])]
        for handle in buffer.spills.values():
            handle.flush()
        shape = (buffer.spill_rows, self.token_dim)
        sources = {name: np.memmap(buffer.spills[name].name, dtype=self.dtype, mode="r", shape=shape) if buffer.spill_rows
                   else np.zeros(shape, dtype=self.dtype) for name in self.token_names}  # [spilled rows, D] each
        try:
            write_token_shard(self.layout.tokens(task), offsets, grid, sources, ranges)
        finally:
            sources.clear()
            self._close_spills(buffer, remove=True)


class _Aborted(Exception):
    """The writer was stopped on purpose (an interrupted run)."""
