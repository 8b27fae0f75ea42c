"""What every benchmark suite measures the same way (``docs/benchmarks.md``, "Figures").

Times are read after a synchronize (``synchronize``), so each covers the work it launched;
``median_seconds`` is the median of timed passes after a warm-up pass. Peak memory has one
meaning everywhere: ``torch.cuda.max_memory_allocated`` over a block of work, in total and above
what was allocated when the block began (``peak_memory``); off CUDA it is not measured (None).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from .._version import __version__
from ..packing import pack_by_budget

__all__ = ["synchronize", "median_seconds", "call_latencies_ms", "latency_percentiles", "PeakMemory", "peak_memory",
           "model_shape", "forward_flops", "gemm_tflops", "group_by_budget", "require_cuda", "environment", "mib", "write_report", "print_report"]

T = TypeVar("T")


def synchronize(device: torch.device) -> None:
    """Waits for the work launched on ``device`` (nothing to wait for off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` timed passes, after one warm-up pass (kernel
    selection, caches, allocator)."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def call_latencies_ms(call: Callable[[T], object], inputs: Sequence[T], device: torch.device, repeats: int) -> list[float]:
    """Milliseconds of ``call(x)`` for every ``x`` of ``inputs``, each until its result is ready,
    over ``repeats`` passes after a warm-up pass: ``repeats * len(inputs)`` figures."""
    for x in inputs:
        call(x)
    synchronize(device)
    times = []
    for _ in range(repeats):
        for x in inputs:
            start = time.perf_counter()
            call(x)
            synchronize(device)
            times.append((time.perf_counter() - start) * 1000)
    return times


def latency_percentiles(times_ms: Sequence[float]) -> tuple[float, float]:
    """(p50, p90) of call latencies, linear interpolation between samples."""
    p50, p90 = np.percentile(np.asarray(times_ms, dtype=np.float64), [50, 90])
    return float(p50), float(p90)


@dataclass
class PeakMemory:
    """MiB of ``torch.cuda.max_memory_allocated`` over a block (``peak_mib``) and of that peak above
    what was allocated when the block began (``above_start_mib``); None off CUDA."""

    peak_mib: float | None = None
    above_start_mib: float | None = None


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[PeakMemory]:
    """``with peak_memory(device) as memory: work()``: ``memory`` holds the block's peak after it."""
    memory = PeakMemory()
    if device.type != "cuda":
        yield memory
        return
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    yield memory
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    memory.peak_mib, memory.above_start_mib = peak / 2**20, (peak - start) / 2**20


def model_shape(model: torch.nn.Module) -> dict:
    """Hidden size, MLP width, depth and MLP kind of a packed model."""
    return {
        "hidden": model.hidden_size,
        "mlp": model.config.intermediate_size,
        "layers": model.num_hidden_layers,
        "gated": model.blocks[0].mlp.gated,
    }


def forward_flops(shape: dict, segment_lengths: list[int], patch_dim: int, num_patches: int) -> float:
    """Model FLOPs of one forward as ``docs/benchmarks.md`` counts them (two per multiply-add, head
    excluded): per layer, ``2·(4·d² + m·d·f)`` per token — the q, k, v and output projections (4·d²)
    and the MLP (m·d·f, m = 3 for a gated MLP, else 2) — plus ``4·d·n²`` per segment of n tokens
    (QKᵀ and PV); plus ``2·patch_dim·d`` per patch for the patch embedding."""
    d, f, layers = shape["hidden"], shape["mlp"], shape["layers"]
    m = 3 if shape["gated"] else 2
    tokens = sum(segment_lengths)
    per_layer = 2 * (4 * d * d + m * d * f) * tokens + 4 * d * sum(n * n for n in segment_lengths)
    return layers * per_layer + 2 * patch_dim * d * num_patches


def gemm_tflops(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    """The bf16 ``size³`` matrix product rate on random data, TFLOP/s: the ceiling MFU is measured
    against, in the same run (NaN off CUDA)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    seconds = median_seconds(lambda: torch.mm(a, b), device, repeats)
    return 2 * size**3 / seconds / 1e12


def group_by_budget(items: Sequence[T], token_counts: Sequence[int], budget: int) -> list[list[T]]:
    """Consecutive items in packs of at most ``budget`` tokens (``packvit.packing.pack_by_budget``),
    in the unit of ``token_counts``."""
    return [list(items[pack.start : pack.stop]) for pack in pack_by_budget(token_counts, budget)]


def require_cuda(device: torch.device, suite: str, elsewhere: str) -> None:
    """``ValueError`` unless ``device`` is a CUDA device: full-size figures need a GPU;
    ``elsewhere`` says how to check the suite on another device."""
    if device.type != "cuda":
        raise ValueError(f"the {suite} benchmark measures full-size models and needs a CUDA GPU, and this run is on "
                         f"{device}; {elsewhere}")


def _installed(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device) -> dict:
    """The machine and the versions of a run, the same keys in every suite's report."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type} ({platform.processor() or platform.machine() or 'unknown'})"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "device": name,
        "cpu_cores": cores,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packvit": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": _installed("transformers"),
    }


def mib(value: float | None) -> str:
    """A MiB figure for a table; ``-`` where it was not measured."""
    return "-" if value is None else f"{value:.0f}"


def write_report(out: Path, name: str, payload: dict, table: str) -> list[Path]:
    """``out/name.json`` (every figure) and ``out/name.md`` (the tables), replaced whole; returns their paths."""
    out.mkdir(exist_ok=True)
    json_path, table_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    table_path.write_text(table.rstrip("\n") + "\n")
    return [json_path, table_path]


def print_report(table: str, paths: Sequence[Path]) -> None:
    """The tables on stdout, the files written on stderr."""
    print("\n" + table.rstrip("\n"), flush=True)
    print("wrote " + ", ".join(str(path) for path in paths), file=sys.stderr)
