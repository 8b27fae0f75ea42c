"""``packvit bench`` (``--suite inference``): forward speed, memory and latency against the references.

Measures the workloads of ``docs/benchmarks.md`` — ``uniform``, ``mixed``, ``mixed-4k``, ``video``
(models that take videos) and ``online`` — on random-weight models of the published sizes. The
baseline is the reference used the best way its API allows (bf16, SDPA); packvit runs the same
items in workload order, in packs of at most ``--token_budget`` sequence tokens (patch tokens plus
each item's prefix tokens). Reported: items/s and tokens/s (median of ``--repeats`` passes after a
warm-up), speed-up, MFU against the bf16 GEMM rate measured in the same run, peak memory of one
baseline batch against the same items packed, the host time ``model.prepare`` takes over a
pass's packs, and for ``online`` (one call per item) p50 and p90 latency of the reference, of
``model(batch)`` as loaded (automatic graphs included), with eager layers and no graphs, with compiled
layers and, on CUDA, of ``GraphedEncoder``.

Every baseline is timed before any packvit model exists in the process: each family's reference
on every workload, then freed; then packvit, family by family, the report files rewritten after
each (``bench.json``, ``bench.md``, ``bench.png``). ``--smoke``: tiny models on six items, on any device.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import arguments
from ..attention import BACKENDS, select_backend
from ..checkpoint import read_config_dict
from ..cuda_graphs import DEFAULT_BUDGETS, GraphedEncoder, select_budget
from ..harness import FAMILIES, FamilyAdapter, get_adapter
from ..layers import layers_compiled
from ..models.registry import model_class
from .common import (
    PeakMemory, call_latencies_ms, environment, forward_flops, gemm_tflops, group_by_budget, latency_percentiles, median_seconds, mib,
    model_shape, peak_memory, print_report, require_cuda, synchronize, write_report,
)
from .workloads import WORKLOADS, size_label, workload_grids, workload_items

__all__ = ["InferenceSettings", "FamilyPlan", "plan_family", "BenchResult", "OnlineResult", "Baseline",
           "kernel_category", "profile_breakdown", "time_baselines", "bench_family", "markdown_table", "write_chart",
           "add_arguments", "run"]

#: items per workload in a smoke run
SMOKE_ITEMS = 6


@dataclass(frozen=True)
class InferenceSettings:
    """One run of the inference suite, checked before anything runs (``from_args``)."""

    families: tuple[str, ...]
    workloads: tuple[str, ...]
    device: torch.device
    #: most sequence tokens (patch tokens plus each item's prefix tokens) in one packvit pack
    sequence_token_budget: int = 32768
    #: items per baseline batch, and the items of the peak-memory pair
    batch_size: int = 32
    #: packvit's attention backend (None: automatic)
    attention_backend: str | None = None
    repeats: int = 5
    #: items per workload; None: the counts of docs/benchmarks.md
    items: int | None = None
    compile: bool = True
    profile: bool = False
    graphs: bool = True
    graph_budgets: tuple[int, ...] = DEFAULT_BUDGETS
    #: also time packvit in FP8 (``dtype="fp8"``) on the throughput workloads, against its bf16
    fp8: bool = False
    smoke: bool = False
    out: Path = Path("bench_out")
    #: where the random checkpoints are kept across runs (None: a temporary folder)
    checkpoint_dir: Path | None = None

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> InferenceSettings:
        device = arguments.device_or_default(args.device)
        if not args.smoke:
            require_cuda(device, "inference", "on the CPU run `packvit bench --smoke` (tiny models, few items) to "
                                              "check that the suite works")
        return cls(families=tuple(dict.fromkeys(args.models)), workloads=tuple(dict.fromkeys(args.workloads)),
                   device=device, sequence_token_budget=args.sequence_token_budget, batch_size=args.batch_size,
                   attention_backend=args.backend, repeats=args.repeats,
                   items=SMOKE_ITEMS if args.smoke and args.items is None else args.items,
                   compile=args.compile, profile=args.profile, graphs=args.graphs, fp8=args.fp8,
                   graph_budgets=tuple(args.graph_budgets or DEFAULT_BUDGETS), smoke=args.smoke, out=args.out,
                   checkpoint_dir=args.ckpt_dir)


@dataclass(frozen=True)
class FamilyPlan:
    """One family's part of a run: its adapter, random checkpoint and workloads."""

    adapter: FamilyAdapter
    checkpoint: Path
    workloads: tuple[str, ...]
    patch_size: int
    #: the attention backend packvit runs for this family's head_dim (the forced one, or the automatic choice)
    attention_backend: str

    @property
    def family(self) -> str:
        return self.adapter.name


def plan_family(family: str, settings: InferenceSettings, root: Path) -> FamilyPlan:
    """The family's checkpoint (written once under ``root``) and its workloads (``video`` only for
    models that take videos); ``ValueError`` for a forced attention backend that cannot run it."""
    adapter = get_adapter(family)
    checkpoint = adapter.cached_random_checkpoint(root, size="tiny" if settings.smoke else "full")
    config = model_class(family).config_from_dict(read_config_dict(checkpoint))
    backend = select_backend(settings.device, settings.dtype, config.head_dim, backend=settings.attention_backend)
    workloads = tuple(w for w in settings.workloads if w != "video" or model_class(family).takes_video)
    return FamilyPlan(adapter, checkpoint, workloads, config.patch_size, backend)


def _default_is_compiled(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether the model's default (``compile_layers=None``) runs its encoder blocks compiled here."""
    with torch.inference_mode():
        return layers_compiled(None, model.blocks[0], torch.empty(0, device=device))


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


def profile_breakdown(fn, device: torch.device) -> dict[str, float]:
    """Milliseconds of kernel time (CPU op self time on the CPU) per category for one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    fn()  # warm-up outside the profile
    synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
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
    """One family on one throughput workload. ``tokens`` counts patch tokens; memory figures are
    ``common.PeakMemory``'s (None off CUDA)."""

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
    packvit_peak_mib: float | None
    baseline_peak_mib: float | None
    packvit_activation_peak_mib: float | None
    baseline_activation_peak_mib: float | None
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
    #: ``--fp8``: items/s of the FP8 model (its default layers), its ratio to packvit's bf16 default,
    #: and its agreement with the bf16 model's outputs on the same items (mean token cosine, least
    #: pooled cosine)
    fp8_items_per_s: float | None = None
    fp8_speedup_over_bf16: float | None = None
    fp8_token_cosine_mean: float | None = None
    fp8_pooled_cosine_min: float | None = None


@dataclass
class OnlineResult:
    """Latency of one model call per item, in ms (p50 and p90 over every timed call).

    ``default``: packvit's ``model(batch)`` as loaded (automatic layers and automatic CUDA graphs);
    ``eager``/``compiled``: ``model(batch)`` with eager layers and no graphs, or compiled layers;
    ``graphs``: ``GraphedEncoder`` over ``graphs_budgets`` (``graphs_skipped`` says why when it did
    not run; ``graphs_fallback_items`` counts the items that fit no budget, whose calls ran
    ``model(batch)``). Speed-ups are the reference's p50 over packvit's, for the default call
    and for the graphs. ``tokens`` counts patch tokens.
    """

    model: str
    items: int
    tokens: int
    calls: int
    reference_p50_ms: float
    reference_p90_ms: float
    default_p50_ms: float
    default_p90_ms: float
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
    speedup_p50: float = 0.0
    graphs_speedup_p50: float | None = None


@dataclass
class Baseline:
    """The reference's figures on one workload: a pass's median seconds and the peak memory of one
    batch (throughput workloads), or every call's latency (``online``)."""

    seconds: float | None = None
    memory: PeakMemory = field(default_factory=PeakMemory)
    latencies_ms: list[float] | None = None


def time_baselines(plan: FamilyPlan, settings: InferenceSettings) -> dict[str, Baseline]:
    """The reference on every workload of ``plan``. Runs before any packvit model of the process
    exists, so that the baseline pays for no compile."""
    adapter, device = plan.adapter, settings.device
    reference = adapter.load_reference(plan.checkpoint, device, settings.dtype)
    figures = {}
    for workload in plan.workloads:
        grids = workload_grids(workload, plan.family, settings.items)
        items = workload_items(adapter, grids, plan.patch_size, device, settings.dtype)
        with torch.inference_mode():
            if workload == "online":
                def one_image(item):
                    return adapter.run_reference(reference, [item], 1)

                figures[workload] = Baseline(latencies_ms=call_latencies_ms(one_image, items, device, settings.repeats))
                continue
            seconds = median_seconds(lambda: adapter.run_reference(reference, items, settings.batch_size), device,
                                     settings.repeats)
            with peak_memory(device) as memory:
                adapter.run_reference(reference, items[: settings.batch_size], settings.batch_size)
        figures[workload] = Baseline(seconds=seconds, memory=memory)
    return figures


class _PackedRuns:
    """packvit's side of one family: the packed model and the figures of each workload on it.

    Every block sets the runtime modes it times with ``model.runtime(...)``, which restores them.
    """

    def __init__(self, plan: FamilyPlan, settings: InferenceSettings, gemm_tflops: float):
        self.plan, self.settings, self.gemm_tflops = plan, settings, gemm_tflops
        self.adapter, self.device = plan.adapter, settings.device
        self.model = self.adapter.load_packed(plan.checkpoint, self.device, settings.dtype)
        self.default_compiled = _default_is_compiled(self.model, self.device)

    def _items(self, workload: str) -> tuple[list[tuple[int, int, int]], list[torch.Tensor]]:
        grids = workload_grids(workload, self.plan.family, self.settings.items)
        return grids, workload_items(self.adapter, grids, self.plan.patch_size, self.device, self.settings.dtype)

    def throughput(self, workload: str, baseline: Baseline) -> BenchResult:
        """Items/s eager and compiled, MFU, peak memory, host preparation and (``--profile``) kernel time."""
        settings, model = self.settings, self.model
        grids, items = self._items(workload)
        patch_counts = [t * h * w for t, h, w in grids]
        sequence_lengths = [n + model.num_prefix_tokens for n in patch_counts]
        shape = model_shape(model)
        flops = forward_flops(shape, sequence_lengths, 3 * self.plan.patch_size**2, sum(patch_counts))
        packs = group_by_budget(items, sequence_lengths, settings.sequence_token_budget)

        def run_packed():
            for pack in packs:
                self.adapter.run_packed(model, pack)

        eager_s, compiled_s = self._time_throughput(run_packed)
        memory_items = items[: settings.batch_size]
        memory = self._time_memory(memory_items)
        host_prepare_s = self._host_prepare_seconds(packs)
        ceiling = self.gemm_tflops * 1e12
        tokens, baseline_s = sum(patch_counts), baseline.seconds
        result = BenchResult(
            model=self.plan.family, workload=workload, items=len(items), tokens=tokens,
            packvit_items_per_s=len(items) / eager_s, packvit_tokens_per_s=tokens / eager_s,
            baseline_items_per_s=len(items) / baseline_s, baseline_tokens_per_s=tokens / baseline_s,
            speedup=baseline_s / eager_s, packvit_mfu=flops / eager_s / ceiling, baseline_mfu=flops / baseline_s / ceiling,
            packvit_peak_mib=memory.peak_mib, baseline_peak_mib=baseline.memory.peak_mib,
            packvit_activation_peak_mib=memory.above_start_mib,
            baseline_activation_peak_mib=baseline.memory.above_start_mib,
            memory_items=len(memory_items), default_compiled=self.default_compiled,
            packs=len(packs), host_prepare_ms=host_prepare_s * 1000,
        )
        if compiled_s is not None:
            result.compiled_items_per_s = len(items) / compiled_s
            result.compiled_speedup = baseline_s / compiled_s
            result.compiled_mfu = flops / compiled_s / ceiling
        if settings.profile:
            self._profile(result, run_packed, shape, flops, sequence_lengths)
        if settings.fp8:
            self._fp8(result, packs)
        return result

    def _fp8(self, result: BenchResult, packs: list[list[torch.Tensor]]) -> None:
        """The FP8 model of the same checkpoint on the same packs: speed against the bf16 model's
        default layers and agreement with its outputs."""
        from ..metrics import compute_similarity_metrics

        fp8 = self.adapter.load_packed(self.plan.checkpoint, self.device, "fp8")

        def outputs(model):
            return [out for pack in packs for out in self.adapter.run_packed(model, pack)]

        with torch.inference_mode():
            bf16_s = median_seconds(lambda: outputs(self.model), self.device, self.settings.repeats)
            fp8_s = median_seconds(lambda: outputs(fp8), self.device, self.settings.repeats)
            expected, got = outputs(self.model), outputs(fp8)
        tokens = compute_similarity_metrics(torch.cat([o.tokens for o in got]), torch.cat([o.tokens for o in expected]))
        result.fp8_items_per_s, result.fp8_speedup_over_bf16 = result.items / fp8_s, bf16_s / fp8_s
        result.fp8_token_cosine_mean = tokens["mean_cosine"]
        if expected[0].pooled is not None:
            pooled = compute_similarity_metrics(torch.stack([o.pooled for o in got]), torch.stack([o.pooled for o in expected]))
            result.fp8_pooled_cosine_min = pooled["min_cosine"]
        del fp8

    def _time_throughput(self, run_packed) -> tuple[float, float | None]:
        """Median seconds of a pass with eager layers, and with compiled ones (``--compile``)."""
        with torch.inference_mode():
            with self.model.runtime(compile_layers=False):
                eager_s = median_seconds(run_packed, self.device, self.settings.repeats)
            if not self.settings.compile:
                return eager_s, None
            with self.model.runtime(compile_layers=True):
                return eager_s, median_seconds(run_packed, self.device, self.settings.repeats)

    def _time_memory(self, items: list[torch.Tensor]) -> PeakMemory:
        """Peak memory of the baseline batch's items in one pack, eager layers."""
        with torch.inference_mode(), self.model.runtime(compile_layers=False), peak_memory(self.device) as memory:
            self.adapter.run_packed(self.model, items)
        return memory

    def _host_prepare_seconds(self, packs: list[list[torch.Tensor]]) -> float:
        """Median seconds of ``model.prepare`` over every pack of a pass: the pack's host metadata and
        its non-blocking copies, without the forward."""
        batches = [self.adapter.pack(pack, self.model) for pack in packs]

        def prepare_all():
            for batch in batches:
                self.model.prepare(batch)

        with torch.inference_mode():
            return median_seconds(prepare_all, self.device, self.settings.repeats)

    def _profile(self, result: BenchResult, run_packed, shape: dict, flops: float, sequence_lengths: list[int]) -> None:
        """Kernel time per category of one pass in the default configuration, and the matmul and
        attention rates it implies."""
        with torch.inference_mode(), self.model.runtime(compile_layers=None):
            result.profile_ms = profile_breakdown(run_packed, self.device)
        matmul_ms, attention_ms = result.profile_ms.get("matmul", 0.0), result.profile_ms.get("attention", 0.0)
        attention_flops = shape["layers"] * 4 * shape["hidden"] * sum(n * n for n in sequence_lengths)
        if matmul_ms:
            result.profile_matmul_tflops = (flops - attention_flops) / (matmul_ms / 1000) / 1e12
        if attention_ms:
            result.profile_attention_tflops = attention_flops / (attention_ms / 1000) / 1e12

    def online(self, baseline: Baseline) -> OnlineResult:
        """One ``model(batch)`` call per item: as loaded, with eager layers and no graphs, with compiled
        layers; then ``GraphedEncoder``."""
        settings, model, device = self.settings, self.model, self.device
        grids, items = self._items("online")

        def packed_call(item):
            return model(self.adapter.pack([item], model))

        with torch.inference_mode():
            default = latency_percentiles(call_latencies_ms(packed_call, items, device, settings.repeats))
            with model.runtime(compile_layers=False, cuda_graphs=False):
                eager = latency_percentiles(call_latencies_ms(packed_call, items, device, settings.repeats))
            compiled = None
            if settings.compile:
                with model.runtime(compile_layers=True):
                    compiled = latency_percentiles(call_latencies_ms(packed_call, items, device, settings.repeats))
        reference = latency_percentiles(baseline.latencies_ms)
        result = OnlineResult(
            model=self.plan.family, items=len(items), tokens=sum(t * h * w for t, h, w in grids),
            calls=len(baseline.latencies_ms), reference_p50_ms=reference[0], reference_p90_ms=reference[1],
            default_p50_ms=default[0], default_p90_ms=default[1], eager_p50_ms=eager[0], eager_p90_ms=eager[1],
            compiled_p50_ms=compiled[0] if compiled else None, compiled_p90_ms=compiled[1] if compiled else None,
            speedup_p50=reference[0] / default[0],
        )
        if not settings.graphs:
            result.graphs_skipped = "not asked for (--no-graphs)"
        elif device.type != "cuda":
            result.graphs_skipped = f"CUDA graphs need a CUDA device, this run is on {device.type}"
        else:
            with model.runtime(compile_layers=None):
                self._time_graphs(result, grids, items, reference[0])
        return result

    def _time_graphs(self, result: OnlineResult, grids, items: list[torch.Tensor], reference_p50_ms: float) -> None:
        """``GraphedEncoder`` over the graph budgets (sequence tokens), one item per call."""
        model, device = self.model, self.device
        start = time.perf_counter()
        try:
            graphed = GraphedEncoder(model, budgets=self.settings.graph_budgets, max_items=1)
        except (ValueError, RuntimeError) as error:  # a backend that cannot be captured, a failed capture
            result.graphs_skipped = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            return
        synchronize(device)
        result.graphs_capture_s = time.perf_counter() - start

        def graphed_call(item):
            return graphed(self.adapter.pack([item], model))

        graphs = latency_percentiles(call_latencies_ms(graphed_call, items, device, self.settings.repeats))
        result.graphs_p50_ms, result.graphs_p90_ms = graphs
        result.graphs_budgets = list(graphed.budgets)
        result.graphs_fallback_items = sum(
            select_budget(t * h * w + model.num_prefix_tokens, 1, graphed.budgets, 1) is None for t, h, w in grids)
        result.graphs_speedup_p50 = reference_p50_ms / graphs[0]


def _print_throughput(r: BenchResult) -> None:
    tqdm.write(
        f"{r.model:9s} {r.workload:9s} packvit {r.packvit_items_per_s:9.1f} items/s  baseline "
        f"{r.baseline_items_per_s:9.1f} items/s  speed-up {r.speedup:5.2f}x  MFU {r.packvit_mfu:6.1%}  "
        f"peak {mib(r.packvit_peak_mib)}/{mib(r.baseline_peak_mib)} MiB  host prepare {r.host_prepare_ms:.1f} ms"
        + (f"  compiled {r.compiled_speedup:5.2f}x MFU {r.compiled_mfu:6.1%}" if r.compiled_speedup is not None else "")
    )


def _print_online(r: OnlineResult) -> None:
    tqdm.write(
        f"{r.model:9s} online    p50 ms: reference {r.reference_p50_ms:7.2f}  packvit default {r.default_p50_ms:7.2f}"
        f"  eager, no graphs {r.eager_p50_ms:7.2f}"
        + (f"  compiled {r.compiled_p50_ms:7.2f}" if r.compiled_p50_ms is not None else "")
        + (f"  CUDA graphs {r.graphs_p50_ms:7.2f}" if r.graphs_p50_ms is not None else f"  ({r.graphs_skipped})")
    )


def bench_family(plan: FamilyPlan, settings: InferenceSettings, gemm_tflops: float,
                 baselines: dict[str, Baseline]) -> tuple[list[BenchResult], list[OnlineResult]]:
    """packvit on every workload of ``plan``, against the figures ``time_baselines`` measured."""
    runs = _PackedRuns(plan, settings, gemm_tflops)
    results, online = [], []
    with runs.model.runtime(attention_backend=settings.attention_backend):
        for workload in plan.workloads:
            if workload == "online":
                online.append(runs.online(baselines[workload]))
                _print_online(online[-1])
            else:
                results.append(runs.throughput(workload, baselines[workload]))
                _print_throughput(results[-1])
    return results, online


def _latency_cell(p50: float | None, p90: float | None) -> str:
    return f"{p50:.2f} / {p90:.2f}" if p50 is not None else "-"


def _throughput_table(results: list[BenchResult], smoke: bool) -> list[str]:
    header = ("| model | workload | items | tokens | packvit items/s (eager layers) | baseline items/s | speed-up | packvit MFU "
              "| baseline MFU | peak MiB packvit / baseline (32 items) | activation peak MiB packvit / baseline |")
    rule = "|---|---|---|---|---|---|---|---|---|---|---|"
    compiled = any(r.compiled_items_per_s is not None for r in results)
    if compiled:
        header += " compiled layers: items/s, speed-up, MFU | default layers |"
        rule += "---|---|"
    lines = [header + " host prepare ms per pass (packs) |", rule + "---|"]
    for r in results:
        extra = (f" {r.compiled_items_per_s:.1f}, {r.compiled_speedup:.2f}x, {r.compiled_mfu:.1%} | "
                 f"{'compiled' if r.default_compiled else 'eager'} |"
                 if r.compiled_items_per_s is not None else (" - | - |" if compiled else ""))
        host = f" {r.host_prepare_ms:.2f} ({r.packs}) |" if r.host_prepare_ms is not None else " - |"
        lines.append(
            f"| {r.model} ({size_label(r.model, smoke)}) | {r.workload} | {r.items} | {r.tokens} | {r.packvit_items_per_s:.1f} | "
            f"{r.baseline_items_per_s:.1f} | {r.speedup:.2f}x | {r.packvit_mfu:.1%} | {r.baseline_mfu:.1%} | "
            f"{mib(r.packvit_peak_mib)} / {mib(r.baseline_peak_mib)} | "
            f"{mib(r.packvit_activation_peak_mib)} / {mib(r.baseline_activation_peak_mib)} |" + extra + host
        )
    return lines


def _fp8_table(results: list[BenchResult]) -> list[str]:
    lines = ["FP8 (dtype='fp8', default layers) against packvit's bf16 default layers on the same packs",
             "", "| model | workload | fp8 items/s | speed-up over bf16 | mean token cosine | least pooled cosine |",
             "|---|---|---|---|---|---|"]
    for r in results:
        pooled = f"{r.fp8_pooled_cosine_min:.5f}" if r.fp8_pooled_cosine_min is not None else "-"
        lines.append(f"| {r.model} | {r.workload} | {r.fp8_items_per_s:.1f} | {r.fp8_speedup_over_bf16:.2f}x | "
                     f"{r.fp8_token_cosine_mean:.5f} | {pooled} |")
    return lines


def _kernel_table(profiled: list[BenchResult]) -> list[str]:
    categories = [c for c, _ in KERNEL_CATEGORIES] + ["other"]
    lines = [
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
    return lines


def _online_table(online: list[OnlineResult], smoke: bool, repeats: int) -> list[str]:
    lines = [
        f"Online: one call per item (the first {online[0].items} `mixed` items), ms per call until its result is "
        f"ready, p50 / p90 over {online[0].calls} calls ({repeats} passes); speed-up = reference p50 over packvit p50",
        "",
        "| model | items | tokens | reference p50 / p90 | packvit `model(batch)` p50 / p90 | eager layers, no graphs "
        "p50 / p90 | compiled layers p50 / p90 | GraphedEncoder p50 / p90 | speed-up, `model(batch)` "
        "| speed-up, GraphedEncoder |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in online:
        graphs = _latency_cell(r.graphs_p50_ms, r.graphs_p90_ms) if r.graphs_skipped is None else f"skipped: {r.graphs_skipped}"
        graphs_speedup = f"{r.graphs_speedup_p50:.2f}x" if r.graphs_speedup_p50 is not None else "-"
        lines.append(
            f"| {r.model} ({size_label(r.model, smoke)}) | {r.items} | {r.tokens} | "
            f"{_latency_cell(r.reference_p50_ms, r.reference_p90_ms)} | {_latency_cell(r.default_p50_ms, r.default_p90_ms)} | "
            f"{_latency_cell(r.eager_p50_ms, r.eager_p90_ms)} | {_latency_cell(r.compiled_p50_ms, r.compiled_p90_ms)} | "
            f"{graphs} | {r.speedup_p50:.2f}x | {graphs_speedup} |"
        )
    graphed = [r for r in online if r.graphs_budgets]
    if graphed:
        lines += ["", f"CUDA graphs over the budgets {graphed[0].graphs_budgets} (sequence tokens, one item per call); "
                      "capture s, items that fit no budget (served by `model(batch)`): "
                  + "; ".join(f"{r.model} {r.graphs_capture_s:.1f} s, {r.graphs_fallback_items}" for r in graphed)]
    return lines


def markdown_table(results: list[BenchResult], environment: dict, online: list[OnlineResult] = ()) -> str:
    """The run's figures as markdown: throughput, kernel time (``--profile``) and online latency."""
    sections = [[
        f"Device: {environment['device']}; torch {environment['torch']}; attention backend "
        f"{environment['attention_backend']}; bf16 GEMM {environment['gemm_tflops']:.0f} TFLOP/s (measured in this run)"
    ]]
    if results:
        sections.append(_throughput_table(results, environment["smoke"]))
    profiled = [r for r in results if r.profile_ms]
    if profiled:
        sections.append(_kernel_table(profiled))
    quantized = [r for r in results if r.fp8_items_per_s is not None]
    if quantized:
        sections.append(_fp8_table(quantized))
    if online:
        sections.append(_online_table(online, environment["smoke"], environment["repeats"]))
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


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
        axis.set_title(f"{model} ({size_label(model, smoke)})")
        axis.set_ylabel("items/s")
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS,
                        help="video runs for models that take videos only; online: one call per item, p50/p90 latency")
    parser.add_argument("--token_budget", dest="sequence_token_budget", type=arguments.positive_int, default=32768,
                        help="most sequence tokens (patch tokens plus each item's prefix tokens) in one packvit pack")
    parser.add_argument("--batch_size", type=arguments.positive_int, default=32, help="items per baseline batch")
    parser.add_argument("--backend", choices=BACKENDS, help="attention backend for packvit (default: automatic)")
    parser.add_argument("--device", type=arguments.device,
                        help="cuda or cuda:N (another device with --smoke; default: cuda when available)")
    parser.add_argument("--repeats", type=arguments.positive_int, default=5,
                        help="timed passes per figure (median reported; online: passes over its items)")
    parser.add_argument("--items", type=arguments.positive_int,
                        help=f"items per workload (default: as docs/benchmarks.md defines; {SMOKE_ITEMS} with --smoke)")
    parser.add_argument("--out", type=arguments.output_folder, default="bench_out",
                        help="folder for bench.json, bench.md and bench.png")
    parser.add_argument("--ckpt_dir", type=arguments.output_folder,
                        help="folder holding (or to hold) the random full-size checkpoints, reused across runs")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time packvit with compiled encoder layers (compile_layers=True)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one packvit pass per workload: kernel time per category and the matmul rate")
    parser.add_argument("--fp8", action="store_true",
                        help="also time packvit in FP8 (dtype='fp8') on the throughput workloads, against its bf16 default "
                             "layers, with the agreement of its outputs (GPUs of compute capability 8.9 or later; the CPU "
                             "in --smoke)")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the online workload with CUDA graphs (packvit.cuda_graphs.GraphedEncoder; CUDA only)")
    parser.add_argument("--graph_budgets", type=arguments.positive_int, nargs="+",
                        help="sequence-token budgets the CUDA graphs are captured for "
                             f"(default: {' '.join(map(str, DEFAULT_BUDGETS))})")
    parser.add_argument("--smoke", action="store_true", help="tiny models and few items: a check that runs on the CPU")


@contextlib.contextmanager
def _tf32_matmuls(device: torch.device):
    """TF32 float32 matrix products on CUDA for the block, the setting restored after it."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = saved or device.type == "cuda"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _report(settings: InferenceSettings, plans: list[FamilyPlan], gemm: float, results: list[BenchResult],
            online: list[OnlineResult]) -> tuple[str, list[Path]]:
    """Writes the report files for the figures so far; returns the tables and the files."""
    backends = settings.attention_backend or "automatic: " + ", ".join(f"{p.family} {p.attention_backend}" for p in plans)
    run_environment = {
        **environment(settings.device),
        "attention_backend": backends,
        "gemm_tflops": gemm,
        "smoke": settings.smoke,
        "sequence_token_budget": settings.sequence_token_budget,
        "repeats": settings.repeats,
        "order": "every baseline before any packvit model",
    }
    payload = {"environment": run_environment, "results": [asdict(r) for r in results],
               "online": [asdict(r) for r in online]}
    table = markdown_table(results, run_environment, online)
    paths = write_report(settings.out, "bench", payload, table)
    if results and write_chart(results, settings.out / "bench.png", smoke=settings.smoke):
        paths.append(settings.out / "bench.png")
    return table, paths


def run(args: argparse.Namespace) -> int:
    settings = InferenceSettings.from_args(args)
    device = settings.device
    results, online = [], []
    with tempfile.TemporaryDirectory(prefix="packvit-bench-") as scratch, _tf32_matmuls(device):
        root = settings.checkpoint_dir or Path(scratch)
        plans = [plan_family(family, settings, root) for family in settings.families]
        gemm = gemm_tflops(device)
        # every baseline first, before any packvit layer is compiled or graph captured in this process
        baselines = {plan.family: time_baselines(plan, settings) for plan in tqdm(plans, desc="baselines")}
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the references are gone with time_baselines' frames
        for plan in tqdm(plans, desc="packvit"):
            family_results, family_online = bench_family(plan, settings, gemm, baselines[plan.family])
            results.extend(family_results)
            online.extend(family_online)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the family's packed model is gone with bench_family's frame
            table, paths = _report(settings, plans, gemm, results, online)  # a partial run keeps its figures
    print_report(table, paths)
    return 0
