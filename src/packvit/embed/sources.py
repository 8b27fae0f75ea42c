"""The sources stage of ``packvit embed``: what to read, split into deterministic tasks, and one
reader per input kind.

An input is one folder (read recursively), one list file (``.txt``: a path a line; ``.csv`` or
``.parquet``: a path column), or WebDataset-style ``.tar`` shards (paths, brace patterns such as
``shards/{000..009}.tar``, or globs). ``plan_inputs`` resolves them the same way on every rank, in
a fixed order, into tasks: ``shard_size`` consecutive files per task, or one tar per task. Each task
becomes one output shard. A task's reader (``reader_of``) deals it in ``Chunk``s to DataLoader
workers and reads a chunk into ``SourceInput``s: ``FilesReader`` for files, ``TarReader`` for a tar's
samples.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

from .._optional import require
from .decode import InputError, media_kind
from .layout import Row

__all__ = [
    "LIST_EXTENSIONS",
    "PATH_COLUMNS",
    "CHUNK_INPUTS",
    "Task",
    "Chunk",
    "SourceInput",
    "InputPlan",
    "FolderListing",
    "FilesReader",
    "TarReader",
    "reader_of",
    "expand_braces",
    "list_folder",
    "read_path_list",
    "plan_inputs",
    "task_chunks",
    "iter_tar_samples",
]

LIST_EXTENSIONS = (".txt", ".csv", ".parquet")
#: columns a ``.csv`` / ``.parquet`` list is searched for, in order, when no column is named
PATH_COLUMNS = ("image_path", "path", "filepath", "file", "filename")
#: inputs of a files task are dealt to DataLoader workers in chunks of this many
CHUNK_INPUTS = 32


@dataclass(frozen=True)
class Task:
    """One unit of work and of output: shard ``index``, read by the reader named ``reader``.

    ``"files"``: ``paths`` are the task's input files, the first having source index
    ``first_index``. ``"tar"``: ``paths`` is the one tar shard, whose samples are only known once
    it is read.
    """

    index: int
    reader: str
    paths: tuple[str, ...]
    first_index: int = 0

    @property
    def num_inputs(self) -> int | None:
        """Inputs in the task, ``None`` for a tar until it is read."""
        return len(self.paths) if self.reader == "files" else None


@dataclass(frozen=True)
class Chunk:
    """Inputs ``start .. stop`` of a task; ``stop`` is ``None`` for a whole task whose size is only
    known once it is read (a tar)."""

    task: int
    start: int
    stop: int | None


@dataclass
class SourceInput:
    """One input as its reader gives it: the ``input_index``-th of task ``task``, its metadata
    ``row`` (where it came from), the ``name`` whose extension gives its media kind and its ``data``
    (a path to read, or the bytes of a tar member); ``failure`` where it already failed to read."""

    task: int
    input_index: int
    row: Row
    name: str
    data: str | bytes | None = None
    failure: InputError | None = None


@dataclass(frozen=True)
class InputPlan:
    """The tasks of an input (``kind``: ``"folder"``, ``"list"`` or ``"tar"``), its fingerprint (a
    hash of every input path, in order) and, for a folder, the files that are not inputs, counted by
    extension."""

    kind: str
    tasks: tuple[Task, ...]
    num_inputs: int | None
    fingerprint: str
    skipped: dict[str, int] = field(default_factory=dict)


def _text(data: bytes) -> str:
    """A caption or JSON file's text (UTF-8; bytes that are not become U+FFFD)."""
    return data.decode("utf-8", errors="replace")


def _sidecar(path: str, extension: str) -> str | None:
    """The text of the file beside ``path`` with its stem and ``extension``, if there is one."""
    try:
        with open(os.path.splitext(path)[0] + extension, "rb") as handle:
            return _text(handle.read())
    except OSError:
        return None


class FilesReader:
    """Files on disk, ``CHUNK_INPUTS`` of a task at a time; a same-stem ``.txt`` and ``.json`` beside
    a file are its ``caption`` and ``json``."""

    @staticmethod
    def chunks(task: Task) -> list[Chunk]:
        return [Chunk(task.index, start, min(start + CHUNK_INPUTS, len(task.paths)))
                for start in range(0, len(task.paths), CHUNK_INPUTS)]

    @staticmethod
    def read(task: Task, chunk: Chunk) -> Iterator[SourceInput]:
        for input_index in range(chunk.start, chunk.stop):
            path = task.paths[input_index]
            row = Row(image_path=path, source_index=task.first_index + input_index)
            if media_kind(path) is not None:
                row = replace(row, caption=_sidecar(path, ".txt"), json=_sidecar(path, ".json"))
            yield SourceInput(task.index, input_index, row, name=path, data=path)


class TarReader:
    """A WebDataset tar, start to end, as one chunk: each sample is an input (its first image or
    video member; its ``.txt`` and ``.json`` members are its ``caption`` and ``json``); a sample
    without one is a ``no_image`` input, a tar that breaks off ends with an ``unreadable`` one."""

    @staticmethod
    def chunks(task: Task) -> list[Chunk]:
        return [Chunk(task.index, 0, None)]

    @staticmethod
    def read(task: Task, chunk: Chunk) -> Iterator[SourceInput]:
        tar_path, count = task.paths[0], 0
        try:
            for key, members in iter_tar_samples(tar_path):
                name = next((extension for extension in members if media_kind(extension)), None)
                row = Row(image_path=f"{tar_path}/{key}{name or ''}", source_index=count, key=key,
                          caption=_text(members[".txt"]) if ".txt" in members else None,
                          json=_text(members[".json"]) if ".json" in members else None)
                if name is None:
                    failure = InputError("no_image", f"the sample has no image or video member (members: "
                                                     f"{', '.join(members) or 'none'})")
                    yield SourceInput(task.index, count, row, name=key, failure=failure)
                else:
                    yield SourceInput(task.index, count, row, name=name, data=members[name])
                count += 1
        except Exception as error:  # tarfile raises OSError, EOFError or TarError for damaged shards
            failure = InputError("unreadable", f"the tar shard cannot be read past its first {count} samples "
                                               f"({type(error).__name__}: {error})")
            yield SourceInput(task.index, count, Row(image_path=tar_path, source_index=count), name=tar_path,
                              failure=failure)


_READERS = {"files": FilesReader, "tar": TarReader}


def reader_of(task: Task):
    """The reader of a task's kind of input."""
    return _READERS[task.reader]


def expand_braces(pattern: str) -> list[str]:
    """Expands ``{000..009}`` (zero padding kept from the first bound) and ``{a,b,c}``, left to right."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


@dataclass(frozen=True)
class FolderListing:
    """A folder's inputs (its image and video files, sorted by path relative to the folder) and what
    it holds besides, counted by extension (``"(none)"`` for names without one)."""

    inputs: list[str]
    skipped: dict[str, int]


def list_folder(root: Path, exclude: Path | None = None) -> FolderListing:
    """The image and video files under ``root`` (recursively, symlinks to files included, names
    starting with ``.`` and the folder ``exclude`` left out)."""
    excluded = os.path.realpath(exclude) if exclude is not None else None
    found, skipped = [], {}
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")
                             and os.path.realpath(os.path.join(directory, name)) != excluded]
        relative = os.path.relpath(directory, root)
        for name in files:
            if name.startswith("."):
                continue
            if media_kind(name) is None:
                extension = os.path.splitext(name)[1].lower() or "(none)"
                skipped[extension] = skipped.get(extension, 0) + 1
                continue
            found.append(name if relative == "." else os.path.join(relative, name))
    found.sort(key=lambda path: Path(path).as_posix())
    return FolderListing([os.path.join(str(root), path) for path in found], dict(sorted(skipped.items())))


def _path_column(columns: Sequence[str], path_column: str | None, source: Path) -> str:
    if path_column is not None:
        if path_column not in columns:
            raise ValueError(f"{source} has no column {path_column!r} (its columns: {list(columns)}); pass --path_column")
        return path_column
    for name in PATH_COLUMNS:
        if name in columns:
            return name
    raise ValueError(f"{source} has none of the path columns {list(PATH_COLUMNS)} (its columns: {list(columns)}); "
                     f"name the column with --path_column")


def read_path_list(source: Path, path_column: str | None = None) -> list[str]:
    """The paths of a list file, relative ones taken relative to the list's folder.

    ``.txt``: one path a line, blank lines skipped. ``.csv`` / ``.parquet``: the ``path_column``
    (or the first of ``PATH_COLUMNS`` present).
    """
    suffix = source.suffix.lower()
    if suffix == ".txt":
        paths = [line.strip() for line in source.read_text().splitlines() if line.strip()]
    elif suffix == ".csv":
        import csv

        with open(source, newline="") as handle:
            reader = csv.DictReader(handle)
            column = _path_column(reader.fieldnames or [], path_column, source)
            paths = [row[column] for row in reader]
    else:
        parquet = require("pyarrow.parquet", "embed", "reading a .parquet list")
        columns = parquet.read_schema(source).names
        column = _path_column(columns, path_column, source)
        paths = [str(value) for value in parquet.read_table(source, columns=[column]).column(column).to_pylist()]
    return [path if os.path.isabs(path) else os.path.join(str(source.parent), path) for path in paths]


def _tar_shards(inputs: Sequence[str]) -> list[str]:
    shards = []
    for pattern in inputs:
        for expanded in expand_braces(pattern):
            matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
            if not matches:
                raise ValueError(f"{expanded!r} (from --input {pattern!r}) matches no file; check the pattern")
            shards.extend(matches)
    return shards


def _fingerprint(kind: str, paths: Sequence[str]) -> str:
    digest = hashlib.sha256(kind.encode())
    for path in paths:
        digest.update(b"\n" + path.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def plan_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike], shard_size: int = 10_000,
                path_column: str | None = None, exclude: str | os.PathLike | None = None) -> InputPlan:
    """Resolves ``--input`` into tasks: one folder (its image and video files, never the folder
    ``exclude``, the output) or list file (every entry) split every ``shard_size`` inputs, or tar
    shards one task each."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [str(value) for value in inputs]
    if not inputs:
        raise ValueError("no input given: pass a folder, a list file (.txt, .csv, .parquet) or .tar shards")
    if shard_size < 1:
        raise ValueError(f"--shard_size must be at least 1, got {shard_size}")
    if all(".tar" in Path(value).name.lower() for value in inputs):
        shards = _tar_shards(inputs)
        tasks = tuple(Task(index, "tar", (path,)) for index, path in enumerate(shards))
        return InputPlan("tar", tasks, None, _fingerprint("tar", shards))
    if len(inputs) > 1:
        raise ValueError(f"got {len(inputs)} inputs {inputs[:3]}...: pass one folder or one list file, or any number "
                         f"of .tar shards")
    source, skipped = Path(inputs[0]), {}
    if source.is_dir():
        listing = list_folder(source, Path(exclude) if exclude is not None else None)
        kind, paths, skipped = "folder", listing.inputs, listing.skipped
    elif source.is_file() and source.suffix.lower() in LIST_EXTENSIONS:
        kind, paths = "list", read_path_list(source, path_column)
    elif source.exists():
        raise ValueError(f"--input {source} is a {source.suffix or 'extension-less'} file; pass a folder, a list file "
                         f"({', '.join(LIST_EXTENSIONS)}) or .tar shards")
    else:
        raise ValueError(f"--input {source} does not exist; check the path")
    if not paths and kind == "folder":
        besides = f" (it holds {_counts(skipped)})" if skipped else ""
        raise ValueError(f"--input {source} holds no files that are images or videos{besides}; check the path")
    if not paths:
        raise ValueError(f"--input {source} holds no paths; check the path")
    tasks = tuple(Task(index, "files", tuple(paths[start: start + shard_size]), start)
                  for index, start in enumerate(range(0, len(paths), shard_size)))
    return InputPlan(kind, tasks, len(paths), _fingerprint(kind, paths), skipped)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{extension} {count}" for extension, count in counts.items())


def task_chunks(tasks: Sequence[Task]) -> list[Chunk]:
    """The tasks' inputs in chunks, task after task: what DataLoader workers are dealt."""
    return [chunk for task in tasks for chunk in reader_of(task).chunks(task)]


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` for each WebDataset sample of a tar, in file order.

    A sample is the run of consecutive members sharing a key (the member name up to the first dot
    of its base name); extensions keep their leading dot and case (``".jpg"``, ``".seg.png"``).
    Raises ``OSError`` or ``tarfile.TarError`` where the tar cannot be read further.
    """
    import tarfile

    key, members = None, {}
    with tarfile.open(path, mode="r|*") as archive:
        for member in archive:
            if not member.isfile():
                continue
            directory, base = os.path.split(member.name)
            stem, dot, extension = base.partition(".")
            member_key = os.path.join(directory, stem)
            if member_key != key and key is not None:
                yield key, members
                members = {}
            key = member_key
            members["." + extension if dot else ""] = archive.extractfile(member).read()
    if key is not None:
        yield key, members
