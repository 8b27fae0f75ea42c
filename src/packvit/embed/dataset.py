"""The worker side of ``packvit embed``: read → decode → preprocess → pack, in DataLoader workers.

The workers send uint8: each pack's pixels as the processor's first stage leaves them (a quarter of
float32's bytes), and on the GPU route its JPEG files; the main process normalises or decodes them
on the model's device (``model.Encoder``). Chunks are dealt to workers round-robin (chunk ``i`` to
worker ``i % num_workers``), so every worker starts on the first task and tasks finish roughly in
order. Every input becomes an ``InputResult`` (its rows and, when it decodes, its items); nothing a
file does stops the worker. ``make_loader`` is the one DataLoader of a run (and of its benchmark).
"""

from __future__ import annotations

import multiprocessing
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..preprocess import PixelBatch
from .decode import DecodeOptions, InputError, decode
from .gpu_decode import JpegFile
from .packer import InputResult, Pack, Packer
from .preprocess import ProcessorSpec, preprocess
from .sources import Chunk, SourceInput, Task, reader_of, task_chunks

__all__ = ["InputCounter", "EmbedDataset", "init_worker", "make_loader"]


def init_worker(_worker_id: int) -> None:
    """One intra-op thread per worker: the parallelism is across workers."""
    torch.set_num_threads(1)


class InputCounter:
    """How many inputs the workers have finished (read, decoded, preprocessed), shared by every
    worker process and the main process."""

    def __init__(self):
        self._count = multiprocessing.Value("q", 0)

    def add(self, count: int = 1) -> None:
        with self._count.get_lock():
            self._count.value += count

    @property
    def value(self) -> int:
        return self._count.value


class EmbedDataset(IterableDataset):
    """Yields ``Pack``s of at most ``token_budget`` tokens for the given chunks of ``tasks``,
    counting each input in ``counter`` as it is finished."""

    def __init__(self, tasks: Sequence[Task], chunks: Sequence[Chunk], processor: ProcessorSpec, token_budget: int,
                 options: DecodeOptions = DecodeOptions(), counter: InputCounter | None = None):
        self.tasks = {task.index: task for task in tasks}
        self.chunks = list(chunks)
        self.processor = processor
        self.token_budget = token_budget
        self.options = options
        self.counter = counter

    def __iter__(self) -> Iterator[Pack]:
        info = get_worker_info()
        chunks = self.chunks if info is None else self.chunks[info.id::info.num_workers]
        processor = self.processor.build()
        packer = Packer(self.token_budget)
        for chunk in chunks:
            task = self.tasks[chunk.task]
            count = 0
            for source in reader_of(task).read(task, chunk):
                result, items = self._process(source, processor)
                if self.counter is not None:
                    self.counter.add()
                yield from packer.add(result, items)
                count += 1
            if chunk.stop is None:  # the whole task: now its size is known
                packer.end_tar(task.index, count)
        yield from packer.flush()

    def _process(self, source: SourceInput, processor) -> tuple[InputResult, PixelBatch | JpegFile | None]:
        """One input → its result and the items of its ok rows (``None`` when it failed)."""
        try:
            if source.failure is not None:
                raise source.failure
            return preprocess(source, decode(source.name, source.data, self.options), processor)
        except InputError as error:
            source.row.status, source.row.error = error.status, str(error)
            return InputResult(source.task, source.input_index, [source.row]), None


def make_loader(tasks: Sequence[Task], processor: ProcessorSpec, token_budget: int, options: DecodeOptions,
                workers: int, device: torch.device, counter: InputCounter | None = None) -> DataLoader:
    """The DataLoader of ``tasks``' packs: ``workers`` processes (at most one per chunk; 0: in this
    process), packs pinned for a CUDA ``device``, yielded as they are ready; ``counter`` counts the
    inputs as the workers finish them."""
    chunks = task_chunks(tasks)
    dataset = EmbedDataset(tasks, chunks, processor, token_budget, options, counter)
    return DataLoader(dataset, batch_size=None, num_workers=min(workers, len(chunks)),
                      pin_memory=torch.device(device).type == "cuda", worker_init_fn=init_worker, in_order=False)
