"""``packvit.embed.embed``: the run — plan, claim tasks per rank, encode, write, summarise.

One process per GPU (``torchrun``) or a single process. Rank 0 checks the output folder against
the settings (``manifest.json``), clears half-written files and lists the tasks not done yet; every
rank takes every ``world_size``-th of those, encodes them through its DataLoader workers, and
writes their shards. After a barrier rank 0 counts every shard's rows and records the summary.
Process-group traffic is gloo only: the task list, the barrier and the summary.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from .._optional import require
from ..models.base import default_dtype
from .dataset import make_loader
from .decode import DecodeOptions, media_kind, require_av
from .layout import OutputLayout
from .manifest import RunStats, Summary, build_settings, finish_manifest, open_output, summarize
from .model import Encoder, describe_checkpoint, load_encoder
from .options import EmbedOptions, default_workers
from .packer import Pack
from .preprocess import ProcessorSpec
from .sources import InputPlan, Task, plan_inputs
from .writer import ShardWriter

__all__ = ["embed"]


@dataclass
class _Ranks:
    """This process's place among the torchrun processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    owns_group: bool = False

    @classmethod
    def from_environment(cls) -> "_Ranks":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        ranks = cls(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")),
                    int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if world_size > 1 and not dist.is_initialized():
            # only the task list, one barrier and the summary go through it: gloo, with no deadline
            # short enough to fire while the slowest rank finishes its share
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
            ranks.owns_group = True
        return ranks

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def _device(options: EmbedOptions, ranks: _Ranks) -> torch.device:
    if options.device is not None:
        return torch.device(options.device)
    return torch.device(f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu")


def _check_inputs(plan: InputPlan) -> None:
    """Fails early, naming the extra, when the inputs hold video files and PyAV is missing."""
    if plan.kind != "tar" and any(media_kind(path) == "video" for task in plan.tasks for path in task.paths):
        require_av()


def _claim_tasks(layout: OutputLayout, plan: InputPlan, settings: dict | None, options: EmbedOptions,
                 ranks: _Ranks) -> list[Task]:
    """Rank 0 opens the folder and lists the tasks not done; every rank checks that it sees the
    same input as rank 0 and takes its share."""
    open_tasks: list[int] | BaseException | None = None
    if ranks.rank == 0:
        try:
            open_output(layout, settings, ranks.world_size, options.overwrite)
            layout.make_folders(options.save_tokens)
            layout.remove_temporary_files()
            open_tasks = [task.index for task in plan.tasks if not layout.is_complete(task.index, options.save_tokens)]
        except (ValueError, OSError) as error:
            open_tasks = error
    open_tasks, fingerprint, num_tasks = ranks.broadcast((open_tasks, plan.fingerprint, len(plan.tasks)))
    if isinstance(open_tasks, BaseException):
        raise open_tasks
    if fingerprint != plan.fingerprint:
        raise ValueError(f"rank {ranks.rank} sees another input than rank 0 ({len(plan.tasks)} tasks against {num_tasks}); "
                         f"the input must be on a filesystem every host sees, unchanged while the run lasts")
    return [plan.tasks[index] for index in open_tasks[ranks.rank::ranks.world_size]]


class _Progress:
    """A tqdm bar on rank 0 (inputs, items/s, tokens/s, ETA), or with ``quiet`` one log line per shard."""

    def __init__(self, tasks: Sequence[Task], ranks: _Ranks, quiet: bool):
        counts = [task.num_inputs for task in tasks]
        total = sum(counts) if None not in counts else None
        self.num_tasks, self.done_tasks, self.inputs, self.tokens = len(tasks), 0, 0, 0
        self.quiet, self.prefix = quiet, f"[rank {ranks.rank}/{ranks.world_size}] " if ranks.world_size > 1 else ""
        self.start = time.perf_counter()
        self.bar = None if quiet or ranks.rank != 0 else tqdm(total=total, unit="input", dynamic_ncols=True,
                                                              desc=f"{self.prefix}embed", smoothing=0.05)

    def pack(self, pack: Pack) -> None:
        self.inputs += pack.num_inputs
        self.tokens += pack.num_tokens
        if self.bar is not None:
            self.bar.update(pack.num_inputs)
            self._postfix()

    def _postfix(self) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s, shards {self.done_tasks}/{self.num_tasks}",
                                 refresh=False)

    def shard(self, name: str) -> None:
        self.done_tasks += 1
        if self.bar is not None:
            self._postfix()
        if self.quiet:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            print(f"{self.prefix}shard {name} done ({self.done_tasks}/{self.num_tasks}): {self.inputs / elapsed:,.1f} "
                  f"inputs/s, {self.tokens / elapsed:,.0f} tokens/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _waiting(iterator: Iterator[Pack], stats: RunStats) -> Iterator[Pack]:
    """The packs of ``iterator``, adding the time spent waiting for each to ``stats.data_wait_s``."""
    while True:
        waited = time.perf_counter()
        pack = next(iterator, None)
        stats.data_wait_s += time.perf_counter() - waited
        if pack is None:
            return
        yield pack


def _encode_tasks(encoder: Encoder, processor: ProcessorSpec, decode: DecodeOptions, tasks: Sequence[Task],
                  layout: OutputLayout, options: EmbedOptions, ranks: _Ranks,
                  on_task_done: Callable[[int], None] | None) -> RunStats:
    """Encodes and writes ``tasks``; returns this process's figures."""
    workers = options.workers if options.workers is not None else default_workers(ranks.local_world_size)
    loader = make_loader(tasks, processor, options.token_budget, decode, encoder.dtype, workers, encoder.device)
    stats = RunStats(workers=loader.num_workers)
    output_format = encoder.output_format(processor.probe())
    start = time.perf_counter()
    iterator = iter(loader)  # workers fork here, before the writer thread starts
    writer = ShardWriter(layout, {task.index: task.num_inputs for task in tasks}, output_format)
    progress = _Progress(tasks, ranks, options.quiet)

    def finished(done: list[int]) -> None:
        for task in done:
            progress.shard(layout.shard_name(task))
            if on_task_done is not None:
                on_task_done(task)

    closed = False
    try:
        for pack in _waiting(iterator, stats):
            outputs = encoder.encode(pack)
            waited = time.perf_counter()
            writer.submit(pack, outputs)
            stats.writer_wait_s += time.perf_counter() - waited
            stats.inputs, stats.items, stats.tokens = (stats.inputs + pack.num_inputs, stats.items + pack.num_items,
                                                       stats.tokens + pack.num_tokens)
            progress.pack(pack)
            finished(writer.completed())
        closed = True
        finished(writer.close())
    finally:
        if not closed:
            writer.abort()
        progress.close()
        del iterator  # shuts the workers down now, also when an error is on its way up
    stats.wall_s = time.perf_counter() - start
    return stats


def embed(model: str, input, output: str | os.PathLike, *, on_task_done: Callable[[int], None] | None = None,
          **options) -> Summary:
    """Embeds every input into ``output`` (see ``EmbedOptions`` for the options); returns the summary.

    ``model``: a checkpoint directory or hub id. ``input``: a folder, a list file, or tar shards
    (a path, a brace pattern, or a list of them). Reruns continue where a run stopped.
    ``on_task_done(task_index)`` is called after each shard this process writes.
    """
    options = EmbedOptions.of(**options)
    require("pyarrow.parquet", "embed", "writing the metadata parquet files")
    ranks = _Ranks.from_environment()
    try:
        given = [str(value) for value in ([input] if isinstance(input, (str, os.PathLike)) else input)]
        plan = plan_inputs([os.path.abspath(value) for value in given], options.shard_size, options.path_column)
        _check_inputs(plan)
        device = _device(options, ranks)
        info = describe_checkpoint(model)
        info.check_layers(options.layers)
        processor = ProcessorSpec(str(info.directory), info.family, not options.fixed, options.max_num_patches)
        processor.probe()
        model_dtype = default_dtype(device, options.model_dtype)
        layout = OutputLayout(Path(output), len(plan.tasks))
        settings = build_settings(info, plan, given, options, model_dtype) if ranks.rank == 0 else None
        tasks = _claim_tasks(layout, plan, settings, options, ranks)
        stats = None
        if tasks:
            encoder = load_encoder(info, device=device, dtype=model_dtype, token_names=options.token_names,
                                   layers=options.layers, normalize=options.normalize, output_dtype=options.dtype)
            decode = DecodeOptions(options.max_pixels, options.num_frames, video_as_item=info.takes_video)
            stats = _encode_tasks(encoder, processor, decode, tasks, layout, options, ranks, on_task_done)
        if ranks.world_size > 1:
            dist.barrier()
        summary = None
        if ranks.rank == 0:
            summary = summarize(layout, range(len(plan.tasks)), options.save_tokens)
            finish_manifest(layout, summary)
        summary = ranks.broadcast(summary)
        summary.stats = stats
        return summary
    finally:
        ranks.close()
