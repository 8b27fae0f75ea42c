"""The output folder of ``packvit embed``: its file names, the metadata rows, the output format,
and how each file is written exactly once.

For task ``i`` (shard name ``i`` zero-padded to the digits of the task count, as clip-retrieval
names its partitions) the folder gets:

- ``img_emb/img_emb_{i}.npy``: pooled embeddings ``[rows, D]`` (a zero vector for a failed row);
- ``metadata/metadata_{i}.parquet``: one ``Row`` per item (``METADATA_COLUMNS``), aligned with the npy;
- with tokens, ``tokens/tokens_{i}.safetensors``: ``offsets [rows + 1]`` (int64; row ``r`` owns
  token rows ``offsets[r]:offsets[r+1]``, none when it failed), ``grid_thw [rows, 3]`` and one
  ``[total_tokens, D]`` tensor per token layer;

and, for the whole folder, ``manifest.json`` and ``failures.parquet``. Each file is written under a
temporary name, flushed to disk and renamed; the metadata file is renamed last, so a shard is
complete exactly when its metadata file exists.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .._optional import require

__all__ = ["METADATA_COLUMNS", "Row", "metadata_table", "OutputFormat", "OutputLayout", "check_output_folder",
           "temporary_path", "write_atomic"]

_TEMP_MARK = ".tmp-"


@dataclass
class Row:
    """One metadata row: where the item came from, its patch grid and its status."""

    image_path: str
    source_index: int
    key: str | None = None
    #: the text of a same-stem ``.txt`` beside the file (or a tar sample's ``.txt`` member)
    caption: str | None = None
    #: the text of a same-stem ``.json`` beside the file (or a tar sample's ``.json`` member)
    json: str | None = None
    frame: int | None = None
    grid: tuple[int, int, int] = (0, 0, 0)
    status: str = "ok"
    error: str | None = None

    @property
    def num_tokens(self) -> int:
        """Patch tokens of the row's item (0 for a failed row)."""
        t, h, w = self.grid
        return t * h * w


#: the metadata columns, in order, with their Arrow types (``grid`` is stored as ``t``, ``h``, ``w``)
_COLUMN_TYPES = (("image_path", "string"), ("caption", "string"), ("json", "string"), ("key", "string"),
                 ("source_index", "int64"), ("frame", "int32"),
                 ("t", "int32"), ("h", "int32"), ("w", "int32"), ("status", "string"), ("error", "string"))
METADATA_COLUMNS = tuple(name for name, _ in _COLUMN_TYPES)


def metadata_table(rows: Sequence[Row]):
    """The rows as a ``pyarrow.Table`` of ``METADATA_COLUMNS``."""
    pa = require("pyarrow", "embed", "writing the metadata parquet files")
    values = {field.name: [getattr(row, field.name) for row in rows] for field in fields(Row) if field.name != "grid"}
    for axis, name in enumerate("thw"):
        values[name] = [row.grid[axis] for row in rows]
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in _COLUMN_TYPES])
    return pa.table({name: values[name] for name in METADATA_COLUMNS}, schema=schema)


@dataclass(frozen=True)
class OutputFormat:
    """What a shard stores per row: a pooled embedding of ``embedding_dim`` and, per name in
    ``token_names``, patch tokens of ``token_dim``, all as ``dtype`` (``"float16"`` or ``"float32"``)."""

    embedding_dim: int
    dtype: str
    token_names: tuple[str, ...] = ()
    token_dim: int | None = None

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)


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


def check_output_folder(root: Path) -> None:
    """``ValueError`` unless ``root`` is a folder this process can write in, or can be made in its
    (existing) parent folder; creates nothing."""
    if root.exists():
        if not root.is_dir():
            raise ValueError(f"--output {root} is a file; pass a folder (it is made if it does not exist)")
        if not os.access(root, os.W_OK | os.X_OK):
            raise ValueError(f"--output {root} is not writable by this user; fix its permissions or pass another --output")
        return
    parent = root.absolute().parent
    if not parent.is_dir():
        what = "is a file" if parent.exists() else "does not exist"
        raise ValueError(f"--output {root} cannot be made: its parent {parent} {what}; make the parent folder first, "
                         f"or check the path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--output {root} cannot be made: {parent} is not writable by this user; pass another --output")


def temporary_path(path: Path) -> Path:
    """The name ``path`` is written under until it is complete (hidden, unique to this host and process)."""
    return path.with_name(f".{path.name}{_TEMP_MARK}{socket.gethostname()}-{os.getpid()}")


def write_atomic(path: Path, write: Callable[[object], None]) -> None:
    """``write(file)`` into a temporary file beside ``path``, flushed to disk, then renamed to ``path``."""
    temporary = temporary_path(path)
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
