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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..models.base import default_dtype
from .dataset import DecodeOptions, EmbedDataset, init_worker
from .decode import DEFAULT_MAX_PIXELS, require_av
from .manifest import Summary, finish_manifest, open_output, summarize
from .model import Encoder, ProcessorSpec, describe_checkpoint, load_encoder, token_names
from .packer import Pack
from .sources import InputPlan, Task, media_kind, plan_inputs, task_chunks
from .writer import OutputLayout, ShardWriter, require_pyarrow

__all__ = ["EmbedOptions", "embed", "default_workers"]

OUTPUT_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class EmbedOptions:
    """The settings of a run (the CLI flags of ``packvit embed`` have the same names)."""

    fixed: bool = False
    max_num_patches: int | None = None
    token_budget: int = 32_768
    workers: int | None = None
    dtype: str = "float16"
    normalize: bool = False
    save_tokens: bool = False
    layers: tuple[int, ...] = ()
    shard_size: int = 10_000
    num_frames: int = 16
    path_column: str | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    device: str | None = None
    model_dtype: str | None = None
    overwrite: bool = False
    quiet: bool = False

    def __post_init__(self):
        if self.dtype not in OUTPUT_DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(OUTPUT_DTYPES)}, got {self.dtype!r}")
        if self.layers and not self.save_tokens:
            raise ValueError("--layers chooses which hidden states --save_tokens writes; add --save_tokens")
        if self.num_frames < 1:
            raise ValueError(f"--num_frames must be at least 1, got {self.num_frames}")
        if self.token_budget < 1:
            raise ValueError(f"--token_budget must be at least 1, got {self.token_budget}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be 0 (decode in the main process) or more, got {self.workers}")


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


def default_workers(local_world_size: int = 1) -> int:
    """DataLoader workers per process: this process's share of the CPU cores, less one for itself."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(local_world_size, 1) - 1)


def _device(options: EmbedOptions, ranks: _Ranks) -> torch.device:
    if options.device is not None:
        return torch.device(options.device)
    return torch.device(f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu")


def _check_inputs(plan: InputPlan) -> None:
    """Fails early, naming the extra, when the inputs hold video files and PyAV is missing."""
    if plan.kind != "tar" and any(media_kind(path) == "video" for task in plan.tasks for path in task.paths):
        require_av()


def _settings(info, plan: InputPlan, given: Sequence[str], options: EmbedOptions, model_dtype: torch.dtype) -> dict:
    return {
        "model": {"checkpoint": info.checkpoint, "family": info.family, "config_sha256": info.config_sha256,
                  "weights": info.weights, "dtype": str(model_dtype).replace("torch.", "")},
        "processor": {"native": not options.fixed, "max_num_patches": options.max_num_patches,
                      "max_pixels": options.max_pixels, "num_frames": options.num_frames,
                      "videos": "clips" if info.family == "llava_vit" else "frames as items"},
        "output": {"dtype": options.dtype, "normalize": options.normalize,
                   "tokens": token_names(options.layers) if options.save_tokens else [], "shard_size": options.shard_size},
        "input": {"given": list(given), "kind": plan.kind, "num_inputs": plan.num_inputs, "num_tasks": len(plan.tasks),
                  "fingerprint": plan.fingerprint},
    }


def _claim_tasks(layout: OutputLayout, plan: InputPlan, settings: dict, options: EmbedOptions, ranks: _Ranks) -> list[Task]:
    """Rank 0 opens the folder and lists the tasks not done; every rank checks that it sees the
    same input as rank 0 and takes its share."""
    claimed: object = None
    if ranks.rank == 0:
        try:
            open_output(layout, settings, ranks.world_size, options.overwrite)
            layout.make_folders(options.save_tokens)
            layout.remove_temporary_files()
            claimed = [task.index for task in plan.tasks if not layout.is_complete(task.index, options.save_tokens)]
        except (ValueError, OSError) as error:
            claimed = error
    claimed, fingerprint, num_tasks = ranks.broadcast((claimed, plan.fingerprint, len(plan.tasks)))
    if isinstance(claimed, BaseException):
        raise claimed
    if fingerprint != plan.fingerprint:
        raise ValueError(f"rank {ranks.rank} sees another input than rank 0 ({len(plan.tasks)} tasks against {num_tasks}); "
                         f"the input must be on a filesystem every host sees, unchanged while the run lasts")
    return [plan.tasks[index] for index in claimed[ranks.rank::ranks.world_size]]


def _output_dims(encoder: Encoder) -> tuple[int, int | None]:
    """``(pooled dim, token dim)`` from one forward of a small grey image (also a warm-up)."""
    pooled, tokens = encoder(encoder.processor.probe())
    return pooled.shape[-1], next((t.shape[-1] for t in tokens.values()), None)


class _Progress:
    """A tqdm bar on rank 0 (inputs, items/s, tokens/s, ETA), or with ``quiet`` one log line per shard."""

    def __init__(self, tasks: Sequence[Task], ranks: _Ranks, quiet: bool):
        counts = [task.num_inputs for task in tasks]
        total = sum(counts) if None not in counts else None
        self.num_tasks, self.done_tasks, self.tokens = len(tasks), 0, 0
        self.quiet, self.prefix = quiet, f"[rank {ranks.rank}/{ranks.world_size}] " if ranks.world_size > 1 else ""
        self.start = time.perf_counter()
        self.inputs = 0
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


def _to_device(pack: Pack, device: torch.device, copy_stream) -> Pack:
    """The pack's patches on ``device``; on CUDA copied on ``copy_stream`` (overlapping the forward
    in flight), which the compute stream then waits for."""
    if pack.batch is None or device.type != "cuda":
        return pack
    with torch.cuda.stream(copy_stream):
        batch = pack.batch.to(device)
    compute = torch.cuda.current_stream(device)
    compute.wait_stream(copy_stream)
    batch.patches.record_stream(compute)
    return replace(pack, batch=batch)


def _to_host(pooled: torch.Tensor, tokens: dict[str, torch.Tensor]):
    """Device outputs → host tensors (pinned, copied without blocking) and the event they are
    ready at (``None`` on the CPU, where they already are)."""
    if pooled.device.type != "cuda":
        return pooled, tokens, None

    def copy(tensor):
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)

    host_pooled, host_tokens = copy(pooled), {name: copy(value) for name, value in tokens.items()}
    ready = torch.cuda.Event()
    ready.record()
    return host_pooled, host_tokens, ready


def _timed(iterator, stats: dict):
    """The packs of ``iterator``, adding the time spent waiting for each to ``stats["data_wait_s"]``."""
    while True:
        waited = time.perf_counter()
        pack = next(iterator, None)
        stats["data_wait_s"] += time.perf_counter() - waited
        if pack is None:
            return
        yield pack


def _encode_tasks(encoder: Encoder, tasks: Sequence[Task], layout: OutputLayout, options: EmbedOptions,
                  ranks: _Ranks, on_task_done: Callable[[int], None] | None) -> dict[str, float]:
    """Encodes and writes ``tasks``; returns timings: wall, waiting for data, waiting on the writer."""
    chunks = task_chunks(tasks)
    workers = options.workers if options.workers is not None else default_workers(ranks.local_world_size)
    workers = min(workers, len(chunks))
    decode = DecodeOptions(options.max_pixels, options.num_frames, clips=encoder.takes_videos)
    dataset = EmbedDataset(tasks, chunks, encoder.processor, options.token_budget, decode, encoder.dtype)
    device = encoder.device
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                        worker_init_fn=init_worker, in_order=False)
    embedding_dim, token_dim = _output_dims(encoder)
    out_dtype = getattr(torch, options.dtype)
    copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    stats = {"wall_s": 0.0, "data_wait_s": 0.0, "writer_wait_s": 0.0, "inputs": 0, "items": 0, "tokens": 0,
             "workers": workers}
    start = time.perf_counter()
    iterator = iter(loader)  # workers fork here, before the writer thread starts
    writer = ShardWriter(layout, {task.index: task.num_inputs for task in tasks}, embedding_dim, OUTPUT_DTYPES[options.dtype], encoder.token_names, token_dim)
    progress = _Progress(tasks, ranks, options.quiet)

    def finished(done: list[int]) -> None:
        for task in done:
            progress.shard(layout.shard_name(task))
            if on_task_done is not None:
                on_task_done(task)

    closed = False
    try:
        for pack in _timed(iterator, stats):
            pooled = tokens = ready = None
            if pack.batch is not None:
                with torch.inference_mode():
                    pooled, tokens = encoder(_to_device(pack, device, copy_stream).batch)
                    if options.normalize:
                        pooled = F.normalize(pooled.float(), dim=-1)
                    pooled, tokens, ready = _to_host(pooled.to(out_dtype), {k: v.to(out_dtype) for k, v in tokens.items()})
                stats["items"] += pack.batch.num_items
            waited = time.perf_counter()
            writer.submit(pack.inputs, pack.task_totals, pooled, tokens or {}, ready)
            stats["writer_wait_s"] += time.perf_counter() - waited
            stats["inputs"] += pack.num_inputs
            stats["tokens"] += pack.num_tokens
            progress.pack(pack)
            finished(writer.completed())
        closed = True
        finished(writer.close())
    finally:
        if not closed:
            writer.abort()
        progress.close()
        del iterator  # shuts the workers down now, also when an error is on its way up
    stats["wall_s"] = time.perf_counter() - start
    return stats


def embed(model: str, input, output: str | os.PathLike, *, on_task_done: Callable[[int], None] | None = None,
          **options) -> Summary:
    """Embeds every input into ``output`` (see ``EmbedOptions`` for the options); returns the summary.

    ``model``: a checkpoint directory or hub id. ``input``: a folder, a list file, or tar shards
    (a path, a brace pattern, or a list of them). Reruns continue where a run stopped.
    ``on_task_done(task_index)`` is called after each shard this process writes.
    """
    options = EmbedOptions(**{key: tuple(value or ()) if key == "layers" else value for key, value in options.items()})
    require_pyarrow()
    ranks = _Ranks.from_environment()
    try:
        given = [str(value) for value in ([input] if isinstance(input, (str, os.PathLike)) else input)]
        plan = plan_inputs([os.path.abspath(value) for value in given], options.shard_size, options.path_column)
        _check_inputs(plan)
        device = _device(options, ranks)
        info = describe_checkpoint(model)
        info.check_layers(options.layers)
        processor = ProcessorSpec.of(info, native=not options.fixed, max_num_patches=options.max_num_patches)
        processor.probe()
        model_dtype = default_dtype(device, options.model_dtype)
        layout = OutputLayout(Path(output), len(plan.tasks))
        settings = _settings(info, plan, given, options, model_dtype)
        tasks = _claim_tasks(layout, plan, settings, options, ranks)
        stats = {}
        if tasks:
            encoder = load_encoder(info, processor, device=device, dtype=model_dtype, save_tokens=options.save_tokens,
                                   layers=options.layers)
            stats = _encode_tasks(encoder, tasks, layout, options, ranks, on_task_done)
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
