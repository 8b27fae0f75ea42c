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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from .._optional import require
from ..attention import select_backend
from ..batch_invariant import attention_backend as invariant_attention_backend
from ..batch_invariant import from_environment as batch_invariant_from_environment
from ..models.base import default_dtype
from .dataset import InputCounter, make_loader
from .decode import DecodeOptions, media_kind, require_av
from .gpu_decode import JpegDecoder, gpu_decode_unavailable
from .layout import OutputLayout, check_output_folder
from .manifest import RunStats, Summary, build_settings, finish_manifest, open_output, summarize
from .model import Encoder, describe_checkpoint, load_encoder
from .options import AUTO_CPU_ROUTE_WORKERS, EmbedOptions, default_workers
from .packer import Pack
from .preprocess import ProcessorSpec
from .sources import InputPlan, Task, plan_inputs
from .writer import ShardWriter

__all__ = ["embed", "resolve_decode"]


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
    """The device to run on; ``ValueError`` for one torch does not know or cannot use here."""
    if options.device is None:
        return torch.device(f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(options.device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"--device {options.device!r} is not a device torch knows ({error}); pass cpu, cuda or "
                         f"cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {options.device}: this torch ({torch.__version__}) sees no CUDA device (built "
                             f"for CUDA: {torch.version.cuda or 'no'}); pass --device cpu, or install a CUDA build of "
                             f"torch on a machine with a GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {options.device}: there are {torch.cuda.device_count()} CUDA devices (0 .. "
                             f"{torch.cuda.device_count() - 1}); pass one of them")
    elif device.type != "cpu":
        module = getattr(torch, device.type, None)
        if not callable(getattr(module, "is_available", None)) or not module.is_available():
            raise ValueError(f"--device {options.device}: this torch cannot run on {device.type} here; pass cpu or cuda")
    return device


def _check_attention(device: torch.device, dtype: torch.dtype, info, batch_invariant: bool) -> None:
    """Refuses a compute dtype or a forced attention backend that cannot run on ``device`` (or, for a
    batch-invariant run, that cannot serve that mode)."""
    try:
        if batch_invariant:
            invariant_attention_backend(device, dtype, info.head_dim)
        else:
            select_backend(device, dtype, info.head_dim)
    except ValueError as error:
        raise ValueError(f"the model cannot run as asked on {device} in {str(dtype).replace('torch.', '')}: {error}") from None


def resolve_decode(decode: str, jpeg_draft: float | None, device: torch.device, processor, workers: int) -> str:
    """Where a run decodes its JPEGs, ``"gpu"`` or ``"cpu"``, from ``--decode``: ``auto`` is the GPU
    where the device is CUDA, torchvision decodes JPEGs there (nvJPEG), the processor has a device
    path and the run has fewer than ``AUTO_CPU_ROUTE_WORKERS`` workers per process, unless
    ``--jpeg_draft`` asks for the CPU's reduced decoding; ``ValueError`` for ``gpu`` where the GPU
    route cannot run."""
    if decode == "cpu" or (decode == "auto" and (jpeg_draft is not None or workers >= AUTO_CPU_ROUTE_WORKERS)):
        return "cpu"
    reason = gpu_decode_unavailable(device)
    if reason is None and not callable(getattr(processor, "on_device", None)):
        reason = f"the {type(processor).__name__} has no device path (on_device)"
    if reason is None:
        return "gpu"
    if decode == "gpu":
        raise ValueError(f"--decode gpu cannot run here: {reason}; pass --decode cpu, or auto (the GPU where it can "
                         f"decode, else the CPU)")
    return "cpu"


def _check_inputs(plan: InputPlan) -> None:
    """Fails early, naming the extra, when the inputs hold video files and PyAV is missing."""
    if plan.kind != "tar" and any(media_kind(path) == "video" for task in plan.tasks for path in task.paths):
        require_av()


def _claim_tasks(layout: OutputLayout, plan: InputPlan, settings: dict | None, options: EmbedOptions,
                 ranks: _Ranks, decode: str) -> list[Task]:
    """Rank 0 opens the folder and lists the tasks not done; every rank checks that it sees the
    same input as rank 0 and decodes where rank 0 does (``decode``), and takes its share."""
    open_tasks: list[int] | BaseException | None = None
    if ranks.rank == 0:
        try:
            open_output(layout, settings, ranks.world_size, options.overwrite)
            layout.make_folders(options.save_tokens)
            layout.remove_temporary_files()
            open_tasks = [task.index for task in plan.tasks if not layout.is_complete(task.index, options.save_tokens)]
        except ValueError as error:
            open_tasks = error
        except OSError as error:
            open_tasks = ValueError(f"--output {layout.root} cannot be written ({error}); check its permissions and "
                                    f"free space, or pass another --output")
    open_tasks, fingerprint, num_tasks, first_decode = ranks.broadcast((open_tasks, plan.fingerprint, len(plan.tasks),
                                                                         decode))
    if isinstance(open_tasks, BaseException):
        raise open_tasks
    if fingerprint != plan.fingerprint:
        raise ValueError(f"rank {ranks.rank} sees another input than rank 0 ({len(plan.tasks)} tasks against {num_tasks}); "
                         f"the input must be on a filesystem every host sees, unchanged while the run lasts")
    if first_decode != decode:
        raise ValueError(f"rank {ranks.rank} decodes JPEGs on the {decode.upper()}, rank 0 on the {first_decode.upper()} "
                         f"(--decode {options.decode}): the embeddings of the two differ slightly; pass --decode "
                         f"{first_decode}, or install the same torchvision on every host")
    return [plan.tasks[index] for index in open_tasks[ranks.rank::ranks.world_size]]


class _Progress:
    """Progress on rank 0: a tqdm bar of the inputs the workers have finished (``counter``, redrawn
    twice a second, so it moves input by input), with the inputs embedded, tokens/s and shards done
    beside it; with ``quiet`` one log line per shard instead."""

    def __init__(self, tasks: Sequence[Task], ranks: _Ranks, quiet: bool, counter: InputCounter):
        counts = [task.num_inputs for task in tasks]
        total = sum(counts) if None not in counts else None
        self.counter = counter
        self.num_tasks, self.done_tasks, self.inputs, self.tokens = len(tasks), 0, 0, 0
        self.quiet, self.prefix = quiet, f"[rank {ranks.rank}/{ranks.world_size}] " if ranks.world_size > 1 else ""
        self.start = time.perf_counter()
        self.bar = None if quiet or ranks.rank != 0 else tqdm(total=total, unit="input", dynamic_ncols=True,
                                                              desc=f"{self.prefix}embed", smoothing=0.05)
        self._stop = threading.Event()
        self._thread = None
        if self.bar is not None:
            self._thread = threading.Thread(target=self._redraw, name="packvit-embed-progress", daemon=True)
            self._thread.start()

    def _redraw(self) -> None:
        while not self._stop.wait(0.5):
            self.refresh()

    def refresh(self) -> None:
        """Draws the bar at the inputs finished so far (the only place the bar is drawn)."""
        if self.bar is None:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.n = self.counter.value
        self.bar.set_postfix_str(f"embedded {self.inputs}, {self.tokens / elapsed:,.0f} tok/s, "
                                 f"shards {self.done_tasks}/{self.num_tasks}", refresh=False)
        self.bar.refresh()

    def pack(self, pack: Pack) -> None:
        self.inputs += pack.num_inputs
        self.tokens += pack.num_tokens

    def shard(self, name: str) -> None:
        self.done_tasks += 1
        if self.quiet:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            print(f"{self.prefix}shard {name} done ({self.done_tasks}/{self.num_tasks}): {self.inputs / elapsed:,.1f} "
                  f"inputs/s, {self.tokens / elapsed:,.0f} tokens/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self.bar is not None:
            self.refresh()
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
                  layout: OutputLayout, options: EmbedOptions, workers: int, ranks: _Ranks,
                  on_task_done: Callable[[int], None] | None) -> RunStats:
    """Encodes and writes ``tasks`` with ``workers`` DataLoader workers; returns this process's figures."""
    counter = InputCounter()
    loader = make_loader(tasks, processor, options.token_budget, decode, workers, encoder.device, counter)
    stats = RunStats(workers=loader.num_workers, decode="gpu" if decode.gpu else "cpu")
    output_format = encoder.output_format(processor.probe())
    start = time.perf_counter()
    iterator = iter(loader)  # workers fork here, before the writer thread starts
    writer = ShardWriter(layout, {task.index: task.num_inputs for task in tasks}, output_format)
    progress = _Progress(tasks, ranks, options.quiet, counter)

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
            stats.inputs += pack.num_inputs
            stats.items += pack.num_items
            stats.tokens += pack.num_tokens
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
    if encoder.jpeg_decoder is not None:
        stats.gpu_decoded, stats.gpu_fallbacks = encoder.jpeg_decoder.decoded, encoder.jpeg_decoder.cpu_fallbacks
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
    check_output_folder(Path(output))
    ranks = _Ranks.from_environment()
    try:
        # every check before anything is written
        given = [str(value) for value in ([input] if isinstance(input, (str, os.PathLike)) else input)]
        plan = plan_inputs([os.path.abspath(value) for value in given], options.shard_size, options.path_column,
                           exclude=output)
        _check_inputs(plan)
        device = _device(options, ranks)
        model_dtype = default_dtype(device, options.model_dtype)
        info = describe_checkpoint(model)
        info.check_layers(options.layers)
        batch_invariant = options.batch_invariant or batch_invariant_from_environment()
        _check_attention(device, model_dtype, info, batch_invariant)
        processor = ProcessorSpec(str(info.directory), info.family, not options.fixed, options.max_num_patches,
                                  options.max_pixels, options.jpeg_draft)
        processor.probe()
        workers = options.workers if options.workers is not None else default_workers(device, ranks.local_world_size)
        route = resolve_decode(options.decode, options.jpeg_draft, device, processor.build(), workers)
        layout = OutputLayout(Path(output), len(plan.tasks))
        settings = (build_settings(info, processor.settings(), plan, given, options, model_dtype, batch_invariant, route)
                    if ranks.rank == 0 else None)
        tasks = _claim_tasks(layout, plan, settings, options, ranks, route)
        stats = None
        if tasks:
            jpeg_decoder = JpegDecoder(device) if route == "gpu" else None
            encoder = load_encoder(info, processor.build(), jpeg_decoder, device=device, dtype=model_dtype,
                                   token_names=options.token_names, layers=options.layers, normalize=options.normalize,
                                   output_dtype=options.dtype, batch_invariant=batch_invariant)
            decode = DecodeOptions(options.max_pixels, options.num_frames, video_as_item=info.takes_video,
                                   gpu=route == "gpu")
            stats = _encode_tasks(encoder, processor, decode, tasks, layout, options, workers, ranks, on_task_done)
        if ranks.world_size > 1:
            dist.barrier()
        summary = None
        if ranks.rank == 0:
            summary = summarize(layout, range(len(plan.tasks)), options.save_tokens, plan.skipped)
            finish_manifest(layout, summary)
        summary = ranks.broadcast(summary)
        summary.stats = stats
        return summary
    finally:
        ranks.close()
