"""The DataLoader side: each worker reads, decodes and preprocesses its chunks and yields ``Pack``s.

Chunks are dealt to workers round-robin (chunk ``i`` to worker ``i % num_workers``), so every
worker starts on the first task and tasks finish roughly in order. Every input becomes an
``InputResult`` (its rows and, when it decodes, its preprocessed items); nothing a file does stops
the worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .decode import DEFAULT_MAX_PIXELS, InputError, decode_video, open_image, read_file
from .model import ProcessorSpec
from .packer import InputResult, Pack, Packer, Row
from .sources import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Chunk, Task, iter_tar_samples, media_kind

__all__ = ["DecodeOptions", "EmbedDataset", "init_worker"]


@dataclass(frozen=True)
class DecodeOptions:
    """``max_pixels``: larger images are ``too_large``; ``num_frames`` sampled per video;
    ``clips``: a video is one item (OneVision) rather than its frames as items."""

    max_pixels: int | None = DEFAULT_MAX_PIXELS
    num_frames: int = 16
    clips: bool = False


def init_worker(_worker_id: int) -> None:
    """One intra-op thread per worker: the parallelism is across workers."""
    torch.set_num_threads(1)


def _unsupported(name: str) -> InputError:
    extension = os.path.splitext(name)[1] or "(none)"
    return InputError("unsupported", f"extension {extension} is not an image ({' '.join(sorted(IMAGE_EXTENSIONS))}) "
                                     f"or a video ({' '.join(sorted(VIDEO_EXTENSIONS))})")


class EmbedDataset(IterableDataset):
    """Yields ``Pack``s of at most ``token_budget`` tokens for the given chunks of ``tasks``, their
    patches in ``patch_dtype`` (the model's dtype; ``None`` leaves the processor's float32)."""

    def __init__(self, tasks: Sequence[Task], chunks: Sequence[Chunk], processor: ProcessorSpec, token_budget: int,
                 options: DecodeOptions = DecodeOptions(), patch_dtype: torch.dtype | None = None):
        self.tasks = {task.index: task for task in tasks}
        self.chunks = list(chunks)
        self.processor = processor
        self.token_budget = token_budget
        self.options = options
        self.patch_dtype = patch_dtype

    def __iter__(self) -> Iterator[Pack]:
        info = get_worker_info()
        chunks = self.chunks if info is None else self.chunks[info.id::info.num_workers]
        processor = self.processor.build()
        packer = Packer(self.token_budget, self.patch_dtype)
        for chunk in chunks:
            task = self.tasks[chunk.task]
            if task.kind == "tar":
                count = 0
                for result in self._tar_inputs(task, processor):
                    count += 1
                    yield from packer.add(result)
                packer.end_task(task.index, count)
                continue
            for position in range(chunk.start, chunk.stop):
                path = task.paths[position]
                row = Row(image_path=path, source_index=task.first_index + position)
                yield from packer.add(self._input(task.index, position, row, path, path, processor))
        yield from packer.flush()

    def _tar_inputs(self, task: Task, processor) -> Iterator[InputResult]:
        tar_path, count = task.paths[0], 0
        try:
            for key, members in iter_tar_samples(tar_path):
                name = next((extension for extension in members if media_kind(extension)), None)
                row = Row(image_path=f"{tar_path}/{key}{name or ''}", source_index=count, key=key)
                if name is None:
                    row.status = "no_image"
                    row.error = f"the sample has no image or video member (members: {', '.join(members) or 'none'})"
                    yield InputResult(task.index, count, [row])
                else:
                    yield self._input(task.index, count, row, name, members[name], processor)
                count += 1
        except Exception as error:  # tarfile raises OSError, EOFError or TarError for damaged shards
            row = Row(image_path=tar_path, source_index=count, status="unreadable",
                      error=f"the tar shard cannot be read past its first {count} samples ({type(error).__name__}: {error})")
            yield InputResult(task.index, count, [row])

    def _input(self, task: int, position: int, row: Row, name: str, source: str | bytes, processor) -> InputResult:
        """One input → its rows and items; ``source`` is a path or the input's bytes."""
        try:
            kind = media_kind(name)
            if kind is None:
                raise _unsupported(name)
            if kind == "image":
                image = open_image(read_file(source) if isinstance(source, str) else source, self.options.max_pixels)
                return self._items(task, position, [row], processor, images=[image])
            try:
                frames, indices, _ = decode_video(source, self.options.num_frames)
            except ImportError as error:
                raise InputError("unsupported", str(error)) from None
            if self.options.clips:
                return self._items(task, position, [row], processor, videos=[frames])
            rows = [Row(row.image_path, row.source_index, row.key, frame=index) for index in indices]
            return self._items(task, position, rows, processor, images=frames)
        except InputError as error:
            row.status, row.error = error.status, str(error)
            return InputResult(task, position, [row])

    @staticmethod
    def _items(task: int, position: int, rows: list[Row], processor, **inputs) -> InputResult:
        try:
            batch = processor(**inputs)
        except Exception as error:  # a processor refuses an item it cannot resize (too small, ...)
            raise InputError("preprocess_error", f"{type(error).__name__}: {error}") from None
        for row, grid in zip(rows, batch.grid_thw.tolist()):
            row.grid = tuple(grid)
        return InputResult(task, position, rows, batch)
