"""``packvit bench``: speed and memory of the packed models against their references.

Implements ``BENCHMARKS.md``: the workloads ``uniform``, ``mixed``, ``mixed-4k``, ``video``
(OneVision only) and ``online``, generated from ``numpy.random.default_rng(0)`` with random-normal
pixels; the baseline is the reference used the best way its API allows, in bf16 with SDPA; packvit
runs the same items packed into batches of at most ``--token_budget`` tokens, in workload order.
Reported: items/s and tokens/s (median of ``--repeats`` timed passes after a warm-up), speed-up,
MFU against the bf16 GEMM rate measured in the same run, peak memory for one baseline batch of 32
items against the same items packed, and the host time ``model.prepare`` takes over one pass's
packs. ``online`` is the first 64 ``mixed`` items, one call each (the reference one image per
call through its own API, packvit ``model(batch)`` with eager and compiled layers and, on CUDA,
``packvit.cuda_graphs.GraphedEncoder``): p50 and p90 latency per call over ``--repeats`` passes.

Every baseline is timed before any packvit code runs in the process: first each family's
reference on every workload (then freed), then packvit, so that no baseline pays for a side
effect of a compile or a graph capture. Writes ``bench.json``, ``bench.md`` and ``bench.png``.

Full-size models need a GPU; ``--smoke`` runs tiny models on few items anywhere (CI runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .arguments import device as device_argument, output_folder, positive_int
from .checkpoint import read_config_dict, resolve_checkpoint
from .cuda_graphs import DEFAULT_BUDGETS, GraphedEncoder, select_budget
from .attention import BACKENDS
from .harness import FAMILIES, FamilyAdapter, get_adapter
from .layers import GatedMlp, layers_compiled
from .models.registry import model_class

__all__ = ["WORKLOADS", "workload_grids", "forward_flops", "kernel_category", "latency_percentiles", "BenchResult",
           "OnlineResult", "add_arguments", "run"]

WORKLOADS = ("uniform", "mixed", "mixed-4k", "video", "online")
#: the online workload: the first items of ``mixed``, one model call each
ONLINE_ITEMS = 64
UNIFORM_GRIDS = {"siglip2": (16, 16), "dinov3": (14, 14), "aimv2": (16, 16), "llava_vit": (32, 32)}
BENCH_SIZES = {"siglip2": "so400m", "dinov3": "ViT-L", "aimv2": "large native", "llava_vit": "large"}


def _naflex_grid(aspect: float, cap: int) -> tuple[int, int]:
    """The largest (h, w) with h*w <= cap at aspect ratio w/h (the NaFlex rule): the tallest
    h with w = floor(h * aspect) (at least 1) that fits."""
    best = (1, 1)
    for h in range(1, cap + 1):
        w = max(1, int(h * aspect))
        if h * w > cap:
            break
        best = (h, w)
    return best


def workload_grids(workload: str, family: str, num_items: int | None = None) -> list[tuple[int, int, int]]:
    """The (t, h, w) grids of a workload, from ``numpy.random.default_rng(0)``; ``online`` is the
    first ``num_items`` (64 by default) of the 512 ``mixed`` items."""
    if num_items is not None and num_items < 1:
        raise ValueError(f"a workload needs at least one item, got num_items={num_items}")
    if workload == "online":
        mixed = workload_grids("mixed", family)
        count = ONLINE_ITEMS if num_items is None else num_items
        if count > len(mixed):
            raise ValueError(f"the online workload takes at most the {len(mixed)} mixed items, got num_items={count}")
        return mixed[:count]
    rng = np.random.default_rng(0)
    if workload == "uniform":
        h, w = UNIFORM_GRIDS[family]
        return [(1, h, w)] * (512 if num_items is None else num_items)
    if workload in ("mixed", "mixed-4k"):
        count = num_items if num_items is not None else (512 if workload == "mixed" else 256)
        low, high = (64, 1024) if workload == "mixed" else (256, 4096)
        aspects = np.exp(rng.uniform(math.log(1 / 3), math.log(3), count))
        caps = np.exp(rng.uniform(math.log(low), math.log(high), count)).astype(int)
        return [(1, *_naflex_grid(float(a), int(c))) for a, c in zip(aspects, caps)]
    if workload == "video":
        return [(16, 16, 16)] * (64 if num_items is None else num_items)
    raise ValueError(f"unknown workload {workload!r}; choose from {WORKLOADS}")


def _model_shape(model: torch.nn.Module) -> dict:
    """Hidden size, MLP width, depth and MLP kind of a packed model."""
    return {
        "hidden": model.hidden_size,
        "mlp": model.config.intermediate_size,
        "layers": model.num_hidden_layers,
        "gated": isinstance(model.blocks[0].mlp, GatedMlp),
    }


def _default_is_compiled(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether the model's default (``compile_layers=None``) runs its encoder blocks compiled here."""
    with torch.inference_mode():
        return layers_compiled(None, model.blocks[0], torch.empty(0, device=device))


def forward_flops(shape: dict, segment_lengths: list[int], patch_dim: int, num_patches: int) -> float:
    """Model FLOPs of one forward, counted as BENCHMARKS.md defines them (head excluded)."""
    d, f, layers = shape["hidden"], shape["mlp"], shape["layers"]
    m = 3 if shape["gated"] else 2
    tokens = sum(segment_lengths)
    per_layer = 2 * (4 * d * d + m * d * f) * tokens + 4 * d * sum(n * n for n in segment_lengths)
    return layers * per_layer + 2 * patch_dim * d * num_patches


#: kernel-name fragments → the part of the forward a kernel belongs to (first match wins)
KERNEL_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("matmul", ("gemm", "gemv", "xmma", "nvjet", "cutlass", "cublas", "matmul", "addmm", "aten::mm", "aten::bmm", "linear")),
    ("fused (compiled)", ("triton",)),
    ("norm", ("norm", "rsqrt")),
    ("copy / index", ("copy", "index", "cat", "gather", "scatter", "memcpy", "memset", "fill", "clone", "contiguous")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "reduce", "gelu", "silu", "mul", "add", "sub", "div",
                     "pow", "mean", "cos", "sin", "neg", "exp", "to_copy")),
)


def kernel_category(name: str) -> str:
    """The part of the forward a kernel (or CPU op) named ``name`` belongs to."""
    lowered = name.lower()
    for category, fragments in KERNEL_CATEGORIES:
        if any(fragment in lowered for fragment in fragments):
            return category
    return "other"


def profile_breakdown(fn, device) -> dict[str, float]:
    """Milliseconds of kernel time (CPU op self time on the CPU) per category for one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    fn()  # warm-up outside the profile
    _synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        _synchronize(device)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if device.type == "cuda":
            microseconds = getattr(event, "self_device_time_total", None)
            if microseconds is None:
                microseconds = event.self_cuda_time_total
        else:
            microseconds = event.self_cpu_time_total
        if microseconds:
            category = kernel_category(event.key)
            totals[category] = totals.get(category, 0.0) + microseconds / 1000
    return totals


@dataclass
class BenchResult:
    model: str
    workload: str
    items: int
    tokens: int
    packvit_items_per_s: float
    packvit_tokens_per_s: float
    baseline_items_per_s: float
    baseline_tokens_per_s: float
    speedup: float
    packvit_mfu: float
    baseline_mfu: float
    packvit_peak_mib: float
    baseline_peak_mib: float
    packvit_activation_peak_mib: float
    baseline_activation_peak_mib: float
    memory_items: int
    compiled_items_per_s: float | None = None
    compiled_speedup: float | None = None
    compiled_mfu: float | None = None
    #: whether packvit's default configuration is the compiled one (else the eager one)
    default_compiled: bool = False
    #: kernel milliseconds per category for one packvit pass in the default configuration
    #: (``--profile``), and the matmul rate
    profile_ms: dict | None = None
    profile_matmul_tflops: float | None = None
    profile_attention_tflops: float | None = None
    #: packs of one packvit pass, and the host milliseconds ``model.prepare`` takes over them
    #: (median of the timed passes): host work the GPU waits for unless it is overlapped
    packs: int = 0
    host_prepare_ms: float | None = None


@dataclass
class OnlineResult:
    """Latency of one model call per item, in ms (p50 and p90 over every timed call).

    ``eager``/``compiled``: packvit's ``model(batch)`` with eager or compiled encoder layers;
    ``graphs``: ``GraphedEncoder`` over ``graphs_budgets`` (``graphs_skipped`` says why when it did
    not run; ``graphs_fallback_items`` counts the items that fit no budget, whose calls ran
    ``model(batch)``). Speed-ups are the reference's p50 over packvit's, for the default layers
    and for the graphs.
    """

    model: str
    items: int
    tokens: int
    calls: int
    reference_p50_ms: float
    reference_p90_ms: float
    eager_p50_ms: float
    eager_p90_ms: float
    compiled_p50_ms: float | None = None
    compiled_p90_ms: float | None = None
    graphs_p50_ms: float | None = None
    graphs_p90_ms: float | None = None
    graphs_budgets: list | None = None
    graphs_capture_s: float | None = None
    graphs_fallback_items: int | None = None
    graphs_skipped: str | None = None
    default_compiled: bool = False
    speedup_p50: float = 0.0
    graphs_speedup_p50: float | None = None


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device, repeats: int) -> float:
    fn()  # warm-up: kernel selection, caches, allocator
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _call_latencies_ms(call, inputs, device, repeats: int) -> list[float]:
    """Milliseconds of ``call(x)`` for every ``x`` of ``inputs``, each until its result is ready,
    over ``repeats`` passes after a warm-up pass."""
    for x in inputs:
        call(x)
    _synchronize(device)
    times = []
    for _ in range(repeats):
        for x in inputs:
            start = time.perf_counter()
            call(x)
            _synchronize(device)
            times.append((time.perf_counter() - start) * 1000)
    return times


def latency_percentiles(times_ms: list[float]) -> tuple[float, float]:
    """(p50, p90) of call latencies, linear interpolation between samples."""
    p50, p90 = np.percentile(np.asarray(times_ms, dtype=np.float64), [50, 90])
    return float(p50), float(p90)


def _peak_memory(fn, device) -> tuple[float, float]:
    """(peak allocated, peak above what was allocated before the call), in MiB; zeros on the CPU."""
    if device.type != "cuda":
        fn()
        return 0.0, 0.0
    _synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak / 2**20, (peak - before) / 2**20


def measure_gemm_tflops(device, size: int = 8192, repeats: int = 10) -> float:
    """bf16 ``size³`` matrix product rate on random data, in TFLOP/s (NaN on the CPU)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    seconds = _median_seconds(lambda: torch.mm(a, b), device, repeats)
    return 2 * size**3 / seconds / 1e12


def _token_budget_chunks(items: list[torch.Tensor], token_counts: list[int], budget: int) -> list[list[torch.Tensor]]:
    """Consecutive items grouped into packs of at most ``budget`` tokens (an oversized item alone)."""
    chunks, current, used = [], [], 0
    for item, count in zip(items, token_counts):
        if current and used + count > budget:
            chunks.append(current)
            current, used = [], 0
        current.append(item)
        used += count
    return chunks + [current] if current else chunks


def _workload_items(adapter: FamilyAdapter, family: str, workload: str, args, patch_size: int, device, dtype):
    """The workload's grids and its random items on ``device`` (the same in every call)."""
    grids = workload_grids(workload, family, args.items)
    generator = torch.Generator().manual_seed(0)
    return grids, [item.to(device=device, dtype=dtype) for item in adapter.random_items(grids, patch_size, generator)]


def time_baselines(family: str, adapter: FamilyAdapter, ckpt, workloads, args, device) -> dict[str, dict]:
    """The reference on every workload: ``{workload: {"seconds", "peak"} or {"latencies_ms"}}``.

    Runs before any packvit model of the process, so that the baseline pays for no compile.
    """
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reference = adapter.load_reference(ckpt, device, dtype)
    patch_size = model_class(family).config_from_dict(read_config_dict(resolve_checkpoint(ckpt))).patch_size
    figures = {}
    for workload in workloads:
        _, items = _workload_items(adapter, family, workload, args, patch_size, device, dtype)
        with torch.inference_mode():
            if workload == "online":
                def one_image(item):
                    return adapter.run_reference(reference, [item], 1)

                figures[workload] = {"latencies_ms": _call_latencies_ms(one_image, items, device, args.repeats)}
                continue
            seconds = _median_seconds(lambda: adapter.run_reference(reference, items, args.batch_size), device, args.repeats)
            memory_items = items[: args.batch_size]
            peak = _peak_memory(lambda: adapter.run_reference(reference, memory_items, args.batch_size), device)
        figures[workload] = {"seconds": seconds, "peak": peak}
    return figures


def _online_result(family: str, adapter: FamilyAdapter, packed, grids, items, args, device, baseline: dict,
                   default_compiled: bool) -> OnlineResult:
    """packvit on the online workload, one ``model(batch)`` (or graphed) call per item."""
    def packed_call(item):
        return packed(adapter.pack([item], packed))

    with torch.inference_mode():
        packed.compile_layers = False
        eager = latency_percentiles(_call_latencies_ms(packed_call, items, device, args.repeats))
        compiled = None
        if args.compile:
            packed.compile_layers = True
            compiled = latency_percentiles(_call_latencies_ms(packed_call, items, device, args.repeats))
        packed.compile_layers = None
    reference = latency_percentiles(baseline["latencies_ms"])
    default = compiled if default_compiled and compiled is not None else eager
    result = OnlineResult(
        model=family, items=len(items), tokens=sum(t * h * w for t, h, w in grids), calls=len(baseline["latencies_ms"]),
        reference_p50_ms=reference[0], reference_p90_ms=reference[1], eager_p50_ms=eager[0], eager_p90_ms=eager[1],
        compiled_p50_ms=compiled[0] if compiled else None, compiled_p90_ms=compiled[1] if compiled else None,
        default_compiled=default_compiled, speedup_p50=reference[0] / default[0],
    )
    if not args.graphs:
        result.graphs_skipped = "not asked for (--no-graphs)"
    elif device.type != "cuda":
        result.graphs_skipped = f"CUDA graphs need a CUDA device, this run is on {device.type}"
    else:
        start = time.perf_counter()
        try:
            graphed = GraphedEncoder(packed, budgets=args.graph_budgets or DEFAULT_BUDGETS, max_items=1)
        except (ValueError, RuntimeError) as error:  # a backend that cannot be captured, a failed capture
            result.graphs_skipped = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            return result
        _synchronize(device)
        result.graphs_capture_s = time.perf_counter() - start

        def graphed_call(item):
            return graphed(adapter.pack([item], packed))

        graphs = latency_percentiles(_call_latencies_ms(graphed_call, items, device, args.repeats))
        result.graphs_p50_ms, result.graphs_p90_ms = graphs
        result.graphs_budgets = list(graphed.budgets)
        result.graphs_fallback_items = sum(
            select_budget(t * h * w + packed.num_prefix_tokens, 1, graphed.budgets, 1) is None for t, h, w in grids)
        result.graphs_speedup_p50 = reference[0] / graphs[0]
        del graphed
    return result


def _host_prepare_seconds(packed, adapter: FamilyAdapter, chunks, device, repeats: int) -> float:
    """Median seconds of ``model.prepare`` over every pack of a pass: the pack's host metadata and
    its non-blocking copies, without the forward."""
    batches = [adapter.pack(chunk, packed) for chunk in chunks]

    def prepare_all():
        for batch in batches:
            packed.prepare(batch)

    return _median_seconds(prepare_all, device, repeats)


def bench_family(family: str, adapter: FamilyAdapter, ckpt, workloads, args, device, gemm_tflops,
                 baselines: dict[str, dict]) -> tuple[list[BenchResult], list[OnlineResult]]:
    """packvit on every workload, against the baseline figures ``time_baselines`` measured."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    packed = adapter.load_packed(ckpt, device, dtype)
    packed.attention_backend = args.backend
    patch_size = packed.patch_size
    shape = _model_shape(packed)
    num_prefix = packed.num_prefix_tokens
    default_compiled = _default_is_compiled(packed, device)
    results, online = [], []
    for workload in workloads:
        grids, items = _workload_items(adapter, family, workload, args, patch_size, device, dtype)
        baseline = baselines[workload]
        if workload == "online":
            online.append(_online_result(family, adapter, packed, grids, items, args, device, baseline, default_compiled))
            row = online[-1]
            tqdm.write(
                f"{family:9s} online    p50 ms: reference {row.reference_p50_ms:7.2f}  packvit eager {row.eager_p50_ms:7.2f}"
                + (f"  compiled {row.compiled_p50_ms:7.2f}" if row.compiled_p50_ms is not None else "")
                + (f"  CUDA graphs {row.graphs_p50_ms:7.2f}" if row.graphs_p50_ms is not None else f"  ({row.graphs_skipped})")
            )
            continue
        patch_counts = [t * h * w for t, h, w in grids]
        segments = [n + num_prefix for n in patch_counts]
        flops = forward_flops(shape, segments, 3 * patch_size * patch_size, sum(patch_counts))
        chunks = _token_budget_chunks(items, segments, args.token_budget)

        def run_packed():
            for chunk in chunks:
                adapter.run_packed(packed, chunk)

        with torch.inference_mode():
            packed.compile_layers = False
            packed_s = _median_seconds(run_packed, device, args.repeats)
            compiled_s = None
            if args.compile:
                packed.compile_layers = True
                compiled_s = _median_seconds(run_packed, device, args.repeats)
                packed.compile_layers = False
            memory_items = items[: args.batch_size]
            packed_peak = _peak_memory(lambda: adapter.run_packed(packed, memory_items), device)
            host_prepare_s = _host_prepare_seconds(packed, adapter, chunks, device, args.repeats)
        baseline_s, baseline_peak = baseline["seconds"], baseline["peak"]
        tokens = sum(patch_counts)
        result = BenchResult(
            model=family, workload=workload, items=len(items), tokens=tokens,
            packvit_items_per_s=len(items) / packed_s, packvit_tokens_per_s=tokens / packed_s,
            baseline_items_per_s=len(items) / baseline_s, baseline_tokens_per_s=tokens / baseline_s,
            speedup=baseline_s / packed_s,
            packvit_mfu=flops / packed_s / (gemm_tflops * 1e12), baseline_mfu=flops / baseline_s / (gemm_tflops * 1e12),
            packvit_peak_mib=packed_peak[0], baseline_peak_mib=baseline_peak[0],
            packvit_activation_peak_mib=packed_peak[1], baseline_activation_peak_mib=baseline_peak[1],
            memory_items=len(memory_items), default_compiled=default_compiled,
            packs=len(chunks), host_prepare_ms=host_prepare_s * 1000,
        )
        if args.profile:
            with torch.inference_mode():
                packed.compile_layers = None
                result.profile_ms = profile_breakdown(run_packed, device)
                packed.compile_layers = False
            matmul_ms, attention_ms = result.profile_ms.get("matmul", 0.0), result.profile_ms.get("attention", 0.0)
            attention_flops = shape["layers"] * 4 * shape["hidden"] * sum(n * n for n in segments)
            if matmul_ms:
                result.profile_matmul_tflops = (flops - attention_flops) / (matmul_ms / 1000) / 1e12
            if attention_ms:
                result.profile_attention_tflops = attention_flops / (attention_ms / 1000) / 1e12
        if compiled_s is not None:
            result.compiled_items_per_s = len(items) / compiled_s
            result.compiled_speedup = baseline_s / compiled_s
            result.compiled_mfu = flops / compiled_s / (gemm_tflops * 1e12)
        tqdm.write(
            f"{family:9s} {workload:9s} packvit {result.packvit_items_per_s:9.1f} items/s  baseline "
            f"{result.baseline_items_per_s:9.1f} items/s  speed-up {result.speedup:5.2f}x  MFU {result.packvit_mfu:6.1%}  "
            f"peak {result.packvit_peak_mib:.0f}/{result.baseline_peak_mib:.0f} MiB  host prepare {result.host_prepare_ms:.1f} ms"
            + (f"  compiled {result.compiled_speedup:5.2f}x MFU {result.compiled_mfu:6.1%}" if compiled_s else "")
        )
        results.append(result)
    return results, online


def _size(model: str, environment: dict) -> str:
    return "tiny" if environment["smoke"] else BENCH_SIZES[model]


def _latency_cell(p50: float | None, p90: float | None) -> str:
    return f"{p50:.2f} / {p90:.2f}" if p50 is not None else "-"


def markdown_table(results: list[BenchResult], environment: dict, online: list[OnlineResult] = ()) -> str:
    """The run's figures as markdown: throughput, kernel time (``--profile``) and online latency."""
    lines = [
        f"GPU: {environment['gpu']}; torch {environment['torch']}; attention backend {environment['attention_backend']}; "
        f"bf16 GEMM {environment['gemm_tflops']:.0f} TFLOP/s (measured in this run)",
        "",
    ]
    if results:
        header = ("| model | workload | items | tokens | packvit items/s (eager layers) | baseline items/s | speed-up | packvit MFU "
                  "| baseline MFU | peak MiB packvit / baseline (32 items) | activation peak MiB packvit / baseline |")
        rule = "|---|---|---|---|---|---|---|---|---|---|---|"
        compiled = any(r.compiled_items_per_s is not None for r in results)
        if compiled:
            header += " compiled layers: items/s, speed-up, MFU | default layers |"
            rule += "---|---|"
        lines += [header + " host prepare ms per pass (packs) |", rule + "---|"]
        for r in results:
            extra = (f" {r.compiled_items_per_s:.1f}, {r.compiled_speedup:.2f}x, {r.compiled_mfu:.1%} | {'compiled' if r.default_compiled else 'eager'} |"
                     if r.compiled_items_per_s is not None else (" - | - |" if compiled else ""))
            host = f" {r.host_prepare_ms:.2f} ({r.packs}) |" if r.host_prepare_ms is not None else " - |"
            lines.append(
                f"| {r.model} ({_size(r.model, environment)}) | {r.workload} | {r.items} | {r.tokens} | {r.packvit_items_per_s:.1f} | "
                f"{r.baseline_items_per_s:.1f} | {r.speedup:.2f}x | {r.packvit_mfu:.1%} | {r.baseline_mfu:.1%} | "
                f"{r.packvit_peak_mib:.0f} / {r.baseline_peak_mib:.0f} | {r.packvit_activation_peak_mib:.0f} / {r.baseline_activation_peak_mib:.0f} |"
                + extra + host
            )
    profiled = [r for r in results if r.profile_ms]
    if profiled:
        categories = [c for c, _ in KERNEL_CATEGORIES] + ["other"]
        lines += [
            "",
            "Kernel time of one packvit pass with the default layers, "
            "ms and share; matmul rate = projection, MLP and patch-embedding FLOPs over matmul kernel time "
            "(ceiling: the GEMM rate above); attention rate = attention FLOPs over attention kernel time",
            "",
            "| model | workload | total ms | " + " | ".join(categories) + " | matmul TFLOP/s | attention TFLOP/s |",
            "|---|---|---|" + "---|" * (len(categories) + 2),
        ]
        for r in profiled:
            total = sum(r.profile_ms.values())
            cells = [f"{r.profile_ms.get(c, 0.0):.1f} ({r.profile_ms.get(c, 0.0) / total:.0%})" for c in categories]
            rates = [f"{rate:.0f}" if rate else "-" for rate in (r.profile_matmul_tflops, r.profile_attention_tflops)]
            lines.append(f"| {r.model} | {r.workload} | {total:.1f} | " + " | ".join(cells) + f" | {rates[0]} | {rates[1]} |")
    if online:
        lines += ([""] if results else []) + [
            f"Online: one call per item (the first {online[0].items} `mixed` items), ms per call until its result is "
            f"ready, p50 / p90 over {online[0].calls} calls ({environment['repeats']} passes); speed-up = reference p50 "
            f"over packvit p50",
            "",
            "| model | items | tokens | reference p50 / p90 | packvit eager layers p50 / p90 | compiled layers p50 / p90 "
            "| CUDA graphs p50 / p90 | speed-up, default layers | speed-up, CUDA graphs | default layers |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in online:
            graphs = _latency_cell(r.graphs_p50_ms, r.graphs_p90_ms) if r.graphs_skipped is None else f"skipped: {r.graphs_skipped}"
            graphs_speedup = f"{r.graphs_speedup_p50:.2f}x" if r.graphs_speedup_p50 is not None else "-"
            lines.append(
                f"| {r.model} ({_size(r.model, environment)}) | {r.items} | {r.tokens} | "
                f"{_latency_cell(r.reference_p50_ms, r.reference_p90_ms)} | {_latency_cell(r.eager_p50_ms, r.eager_p90_ms)} | "
                f"{_latency_cell(r.compiled_p50_ms, r.compiled_p90_ms)} | {graphs} | {r.speedup_p50:.2f}x | {graphs_speedup} | "
                f"{'compiled' if r.default_compiled else 'eager'} |"
            )
        graphed = [r for r in online if r.graphs_budgets]
        if graphed:
            lines += ["", f"CUDA graphs over the budgets {graphed[0].graphs_budgets} (one item per call); capture s, "
                          "items that fit no budget (served by `model(batch)`): "
                      + "; ".join(f"{r.model} {r.graphs_capture_s:.1f} s, {r.graphs_fallback_items}" for r in graphed)]
    return "\n".join(lines) + "\n"


def write_chart(results: list[BenchResult], path: Path, smoke: bool = False) -> bool:
    """Items/s per workload, packvit beside the baseline, one panel per model. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = list(dict.fromkeys(r.model for r in results))
    figure, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4), squeeze=False)
    for axis, model in zip(axes[0], models):
        rows = [r for r in results if r.model == model]
        compiled = [r.compiled_items_per_s for r in rows]
        bars = [("reference", [r.baseline_items_per_s for r in rows], None),
                ("packvit, eager layers", [r.packvit_items_per_s for r in rows], [r.speedup for r in rows])]
        if all(c is not None for c in compiled):
            bars.append(("packvit, compiled layers", compiled, [r.compiled_speedup for r in rows]))
        x, width = np.arange(len(rows)), 0.8 / len(bars)
        for index, (label, values, speedups) in enumerate(bars):
            positions = x + (index - (len(bars) - 1) / 2) * width
            axis.bar(positions, values, width, label=label)
            for position, value, speedup in zip(positions, values, speedups or []):
                axis.annotate(f"{speedup:.1f}x", (position, value), ha="center", va="bottom", fontsize=7)
        axis.set_xticks(x, [r.workload for r in rows])
        axis.set_title(f"{model} ({'tiny' if smoke else BENCH_SIZES[model]})")
        axis.set_ylabel("items/s")
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS,
                        help="video runs for llava_vit only; online: one call per item, p50/p90 latency")
    parser.add_argument("--token_budget", type=positive_int, default=32768, help="most tokens in one packvit pack")
    parser.add_argument("--batch_size", type=positive_int, default=32, help="items per baseline batch")
    parser.add_argument("--backend", choices=BACKENDS, help="attention backend for packvit (default: automatic)")
    parser.add_argument("--device", type=device_argument, help="cuda or cuda:N (cpu with --smoke; default: cuda when available)")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed passes per figure (median reported; online: passes over its items)")
    parser.add_argument("--items", type=positive_int, help="items per workload (default: as BENCHMARKS.md defines)")
    parser.add_argument("--out", type=output_folder, default="bench_out", help="directory for bench.json, bench.md and bench.png")
    parser.add_argument("--ckpt_dir", type=output_folder, help="directory holding (or to hold) the random full-size checkpoints, reused across runs")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time packvit with compiled encoder layers (model.compile_layers = True)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one packvit pass per workload: kernel time per category and the matmul rate")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the online workload with CUDA graphs (packvit.cuda_graphs.GraphedEncoder; CUDA only)")
    parser.add_argument("--graph_budgets", type=positive_int, nargs="+",
                        help=f"token budgets the CUDA graphs are captured for (default: {' '.join(map(str, DEFAULT_BUDGETS))})")
    parser.add_argument("--smoke", action="store_true", help="tiny models and few items: a check that runs on the CPU")


def run(args) -> int:
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise ValueError(
            "the inference benchmark measures full-size models and needs a CUDA GPU; on the CPU run "
            "`packvit bench --smoke` (tiny models, few items) to check that the harness works."
        )
    if args.smoke and args.items is None:
        args.items = 6
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    gemm_tflops = measure_gemm_tflops(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, online = [], []
    with tempfile.TemporaryDirectory(prefix="packvit-bench-") as scratch:
        root = Path(args.ckpt_dir or scratch)
        plan = {}  # family → (adapter, checkpoint, workloads)
        for family in args.models:
            adapter = get_adapter(family)
            workloads = [w for w in args.workloads if w != "video" or family == "llava_vit"]
            plan[family] = (adapter, adapter.cached_random_checkpoint(root, size="tiny" if args.smoke else "full"), workloads)
        # every baseline first, before any packvit layer is compiled or graph captured in this process
        baselines = {family: time_baselines(family, adapter, ckpt, workloads, args, device)
                     for family, (adapter, ckpt, workloads) in tqdm(plan.items(), desc="baselines")}
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the references are gone with time_baselines' frames
        for family, (adapter, ckpt, workloads) in tqdm(plan.items(), desc="packvit"):
            family_results, family_online = bench_family(family, adapter, ckpt, workloads, args, device, gemm_tflops,
                                                         baselines[family])
            results.extend(family_results)
            online.extend(family_online)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the family's packed model is gone with bench_family's frame
    from .attention import select_backend

    environment = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'unknown'})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "attention_backend": args.backend or select_backend(device, torch.bfloat16 if device.type == "cuda" else torch.float32, 64),
        "gemm_tflops": gemm_tflops,
        "smoke": args.smoke,
        "token_budget": args.token_budget,
        "repeats": args.repeats,
        "order": "every baseline before any packvit model",
    }
    report = {"environment": environment, "results": [asdict(r) for r in results], "online": [asdict(r) for r in online]}
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(results, environment, online)
    (out / "bench.md").write_text(table)
    charted = write_chart(results, out / "bench.png", smoke=args.smoke) if results else False
    chart_note = f", {out / 'bench.png'}" if charted else (
        " (no chart: matplotlib missing)" if results else " (no chart: no throughput workload ran)")
    print("\n" + table)
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}{chart_note}")
    return 0
