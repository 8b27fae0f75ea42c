"""``packvit bench --suite training``: forward + backward speed and memory of the packed models
against their references' own training path, as ``docs/benchmarks.md`` defines it.

SigLIP2 so400m and DINOv3 ViT-L with random full-size weights, on the ``mixed`` workload
(random-normal pixels from seed 0). The reference is its own training path in bf16 with SDPA:
SigLIP2 in padded batches of 32 with ``pixel_attention_mask`` (padding rows left out of the loss),
DINOv3 in dense groups of up to 32 equal-size images. packvit runs bf16 parameters, the default
attention backend and packs of at most ``--token_budget`` sequence tokens (patch tokens plus each
item's prefix tokens) in workload order, without and with gradient checkpointing. The loss is the
sum of a fixed random projection ``w [D]`` of every output token and pooled vector. Both sides'
inputs are built beforehand (the processor's work); a timed pass is every batch's forward and
backward, gradients accumulating, then cleared.

Reported: items/s (median of ``--repeats`` passes after a warm-up; the reference first, and
nothing in the process compiled), speed-up, and for one reference batch of 32 items against the
same items in one pack: activation memory (allocated at the end of a forward, the most over a
reference loop) and peak memory above the resident weights (``common.peak_memory``). Then the
bf16 gradient agreement at full size: the cosine of the flattened parameter gradients of that
batch, the reference's mapped through the family's checkpoint map. Targets: speed-up >= 3x
(SigLIP2) and >= 10x (DINOv3); checkpointing cuts activation memory >= 3x for <= 35% extra time;
gradient cosine >= 0.999. Writes ``train_bench.json`` and ``train_bench.md`` to ``--out``, after
every model. ``--smoke``: tiny models on a few items in float32 on any device (memory needs CUDA).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import arguments
from ..attention import BACKENDS, select_backend
from ..harness import get_adapter
from ..packing import PackedBatch, patchify
from .common import (environment, forward_flops, gemm_tflops, group_by_budget, median_seconds, mib, model_shape, peak_memory,
                     print_report, require_cuda, write_report)
from .workloads import MIXED_ITEMS, size_label, workload_grids, workload_items

__all__ = ["TRAIN_FAMILIES", "SPEEDUP_TARGETS", "TrainingSettings", "TrainResult", "training_steps", "bench_training",
           "markdown_table", "add_arguments", "run"]

TRAIN_FAMILIES = ("siglip2", "dinov3")
#: packvit ÷ reference fwd+bwd items/s wanted on ``mixed``
SPEEDUP_TARGETS = {"siglip2": 3.0, "dinov3": 10.0}
#: gradient checkpointing: activation memory divided by at least this, for at most this much extra time
CHECKPOINTING_MEMORY_CUT = 3.0
CHECKPOINTING_TIME_OVERHEAD = 0.35
GRADIENT_COSINE = 0.999
#: items of the mixed workload in a smoke run
SMOKE_ITEMS = 6


@dataclass(frozen=True)
class TrainingSettings:
    """One run of the training suite, checked before anything runs (``from_args``)."""

    families: tuple[str, ...]
    device: torch.device
    #: items of the mixed workload
    items: int = MIXED_ITEMS
    #: most sequence tokens (patch tokens plus each item's prefix tokens) in one packvit pack
    sequence_token_budget: int = 32768
    #: items per reference batch, and the items of the memory and gradient figures
    batch_size: int = 32
    repeats: int = 3
    #: packvit's attention backend (None: automatic)
    attention_backend: str | None = None
    smoke: bool = False
    out: Path = Path("train_bench_out")
    #: where the random checkpoints are kept across runs (None: a temporary folder)
    checkpoint_dir: Path | None = None

    @property
    def dtype(self) -> torch.dtype:
        """bf16 at full size on CUDA; float32 in a smoke run, where both sides give the same gradients."""
        return torch.bfloat16 if self.device.type == "cuda" and not self.smoke else torch.float32

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainingSettings:
        device = arguments.device_or_default(args.device)
        if not args.smoke:
            require_cuda(device, "training", "on the CPU run `packvit bench --suite training --smoke` to check that "
                                             "the suite works")
        items = args.items if args.items is not None else (SMOKE_ITEMS if args.smoke else MIXED_ITEMS)
        return cls(families=tuple(dict.fromkeys(args.models)), device=device, items=items,
                   sequence_token_budget=args.sequence_token_budget, batch_size=args.batch_size, repeats=args.repeats,
                   attention_backend=args.backend, smoke=args.smoke, out=args.out, checkpoint_dir=args.ckpt_dir)


@dataclass
class TrainResult:
    model: str
    attention_backend: str
    items: int
    #: patch tokens of the workload
    tokens: int
    packs: int
    reference_batches: int
    reference_items_per_s: float
    packvit_items_per_s: float
    checkpointed_items_per_s: float
    speedup: float
    #: forward + backward model FLOPs (three forwards' worth, ``forward_flops``) over packvit's time,
    #: as a share of the bf16 GEMM rate measured in the same run (NaN off CUDA)
    packvit_mfu: float
    checkpointed_speedup: float
    speedup_target: float
    #: checkpointed time ÷ plain time - 1
    checkpointing_time_overhead: float
    memory_items: int
    #: MiB allocated at the end of a forward (the most over the reference's batches); None off CUDA
    reference_activation_mib: float | None
    packvit_activation_mib: float | None
    checkpointed_activation_mib: float | None
    #: MiB of peak memory above the resident weights, forward and backward; None off CUDA
    reference_peak_mib: float | None
    packvit_peak_mib: float | None
    checkpointed_peak_mib: float | None
    checkpointing_memory_cut: float | None
    gradient_cosine: float
    gradient_min_tensor_cosine: float
    meets_speedup_target: bool
    meets_checkpointing_target: bool | None
    meets_gradient_target: bool


def _projection(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum(x @ w)`` in float32, for ``x [..., D]``."""
    return (x @ w).float().sum()


def training_steps(family: str, reference, packed, items: list[torch.Tensor], w: torch.Tensor, batch_size: int,
                   sequence_token_budget: int) -> tuple[list, list]:
    """(reference steps, packvit steps) over ``items``: callables returning each batch's loss, their
    inputs built beforehand on the items' device."""
    packed_steps = []
    patch_counts = [item.shape[-2] * item.shape[-1] // packed.patch_size**2 for item in items]
    sequence_lengths = [n + packed.num_prefix_tokens for n in patch_counts]
    for pack in group_by_budget(items, sequence_lengths, sequence_token_budget):
        batch = PackedBatch(*patchify(pack, packed.patch_size, packed.patch_layout), packed.patch_layout)

        def packed_step(batch=batch):
            out = packed(batch)
            loss = _projection(out.last_hidden_state, w) + _projection(out.pooler_output, w)
            return loss + _projection(out.prefix_tokens, w) if out.prefix_tokens is not None else loss

        packed_steps.append(packed_step)
    if family == "siglip2":
        return _siglip2_reference_steps(reference, items, w, batch_size), packed_steps
    return _dense_reference_steps(reference, items, w, batch_size), packed_steps


def _siglip2_reference_steps(reference, items, w, batch_size):
    """Batches of ``batch_size`` in workload order, padded to their longest item, with the mask."""
    patch_size, steps = reference.config.patch_size, []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        patches = [patchify([image], patch_size)[0] for image in chunk]  # [h*w, p*p*C] each
        longest = max(p.shape[0] for p in patches)
        pixel_values = chunk[0].new_zeros(len(chunk), longest, patches[0].shape[1])  # [B, longest, p*p*C]
        mask = torch.zeros(len(chunk), longest, dtype=torch.int32, device=chunk[0].device)
        for row, image_patches in enumerate(patches):
            pixel_values[row, : image_patches.shape[0]] = image_patches
            mask[row, : image_patches.shape[0]] = 1
        shapes = torch.tensor([[f.shape[-2] // patch_size, f.shape[-1] // patch_size] for f in chunk], device=mask.device)

        def step(pixel_values=pixel_values, mask=mask, shapes=shapes):
            out = reference(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
            # [B, longest, D] @ [D] → [B, longest], padding rows multiplied by 0
            tokens = ((out.last_hidden_state @ w) * mask.to(w.dtype)).float().sum()
            return tokens + _projection(out.pooler_output, w)

        steps.append(step)
    return steps


def _dense_reference_steps(reference, items, w, batch_size):
    """Items grouped by identical size into dense batches of at most ``batch_size``."""
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for item in items:
        groups.setdefault(tuple(item.shape), []).append(item)
    steps = []
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            pixels = torch.stack(group[start : start + batch_size])  # [B, 3, H, W]

            def step(pixels=pixels):
                out = reference(pixel_values=pixels)
                return _projection(out.last_hidden_state, w) + _projection(out.pooler_output, w)

            steps.append(step)
    return steps


def _run_pass(steps, model) -> None:
    for step in steps:
        step().backward()
    model.zero_grad(set_to_none=True)


def _memory(steps, model, device) -> tuple[float | None, float | None]:
    """(activation MiB, peak MiB above the resident weights) of one pass over ``steps``; Nones off CUDA."""
    if device.type != "cuda":
        _run_pass(steps, model)
        return None, None
    model.zero_grad(set_to_none=True)
    activation = 0
    with peak_memory(device) as memory:
        for step in steps:
            before = torch.cuda.memory_allocated(device)
            loss = step()
            activation = max(activation, torch.cuda.memory_allocated(device) - before)
            loss.backward()
            del loss
    model.zero_grad(set_to_none=True)
    return activation / 2**20, memory.above_start_mib


def _gradients(steps, model) -> dict[str, torch.Tensor]:
    """``{name: gradient}`` of one pass on the host (zeros for parameters without one)."""
    model.zero_grad(set_to_none=True)
    for step in steps:
        step().backward()
    grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def _gradient_agreement(reference, packed, reference_steps, packed_steps) -> tuple[float, float]:
    """(cosine of the flattened gradients, least cosine of one tensor's), reference mapped to packvit's names."""
    expected = packed.map_checkpoint(_gradients(reference_steps, reference))
    actual = _gradients(packed_steps, packed)
    dot = norm_expected = norm_actual = 0.0
    least = 1.0
    for name, grad in actual.items():
        a, b = expected[name].double(), grad.double()
        tensor_dot, a_norm, b_norm = float((a * b).sum()), float(a.square().sum()), float(b.square().sum())
        dot, norm_expected, norm_actual = dot + tensor_dot, norm_expected + a_norm, norm_actual + b_norm
        if a_norm > 0 and b_norm > 0:
            least = min(least, tensor_dot / (a_norm * b_norm) ** 0.5)
    return dot / (norm_expected * norm_actual) ** 0.5, least


def _timed_passes(reference, packed, reference_steps, packed_steps, settings: TrainingSettings) -> tuple[float, float, float]:
    """Median seconds of a pass: the reference first, then packvit without and with checkpointing."""
    device, repeats = settings.device, settings.repeats
    reference_s = median_seconds(lambda: _run_pass(reference_steps, reference), device, repeats)
    with packed.runtime(gradient_checkpointing=False):
        packed_s = median_seconds(lambda: _run_pass(packed_steps, packed), device, repeats)
    with packed.runtime(gradient_checkpointing=True):
        checkpointed_s = median_seconds(lambda: _run_pass(packed_steps, packed), device, repeats)
    return reference_s, packed_s, checkpointed_s


def bench_training(family: str, checkpoint: Path, settings: TrainingSettings, gemm: float) -> TrainResult:
    """The training figures of one family: speed, MFU (against ``gemm`` TFLOP/s), memory and gradient
    agreement."""
    device, dtype = settings.device, settings.dtype
    adapter = get_adapter(family)
    reference = adapter.load_reference(checkpoint, device, dtype)  # eval: DINOv3's train mode rescales RoPE at random
    packed = adapter.load_packed(checkpoint, device, dtype)
    backend = select_backend(device, dtype, packed.config.head_dim, backend=settings.attention_backend, backward=True)
    packed.gradient_checkpointing_enable()  # its recompute options; each pass below sets the mode itself
    grids = workload_grids("mixed", family, settings.items)
    items = workload_items(adapter, grids, packed.patch_size, device, dtype)
    projection = torch.randn(packed.hidden_size, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    with packed.runtime(attention_backend=settings.attention_backend, compile_layers=False):
        reference_steps, packed_steps = training_steps(family, reference, packed, items, projection, settings.batch_size,
                                                       settings.sequence_token_budget)
        started = time.perf_counter()
        reference_s, packed_s, checkpointed_s = _timed_passes(reference, packed, reference_steps, packed_steps, settings)
        timed_s = time.perf_counter() - started

        memory_items = items[: settings.batch_size]
        memory_reference, memory_packed = training_steps(family, reference, packed, memory_items, projection,
                                                         settings.batch_size, sys.maxsize)
        reference_memory = _memory(memory_reference, reference, device)
        with packed.runtime(gradient_checkpointing=False):
            packed_memory = _memory(memory_packed, packed, device)
            cosine, least = _gradient_agreement(reference, packed, memory_reference, memory_packed)
        with packed.runtime(gradient_checkpointing=True):
            checkpointed_memory = _memory(memory_packed, packed, device)

    memory_cut = packed_memory[0] / checkpointed_memory[0] if checkpointed_memory[0] else None
    overhead = checkpointed_s / packed_s - 1
    speedup = reference_s / packed_s
    sequence_lengths = [packed.num_prefix_tokens + t * h * width for t, h, width in grids]
    flops = 3 * forward_flops(model_shape(packed), sequence_lengths, 3 * packed.patch_size**2,
                              sum(t * h * width for t, h, width in grids))
    result = TrainResult(
        model=family, attention_backend=backend,
        items=len(items), tokens=sum(t * h * width for t, h, width in grids), packs=len(packed_steps),
        reference_batches=len(reference_steps),
        reference_items_per_s=len(items) / reference_s, packvit_items_per_s=len(items) / packed_s,
        checkpointed_items_per_s=len(items) / checkpointed_s,
        speedup=speedup, packvit_mfu=flops / packed_s / (gemm * 1e12), checkpointed_speedup=reference_s / checkpointed_s,
        speedup_target=SPEEDUP_TARGETS[family], checkpointing_time_overhead=overhead,
        memory_items=len(memory_items),
        reference_activation_mib=reference_memory[0], packvit_activation_mib=packed_memory[0],
        checkpointed_activation_mib=checkpointed_memory[0],
        reference_peak_mib=reference_memory[1], packvit_peak_mib=packed_memory[1], checkpointed_peak_mib=checkpointed_memory[1],
        checkpointing_memory_cut=memory_cut, gradient_cosine=cosine, gradient_min_tensor_cosine=least,
        meets_speedup_target=speedup >= SPEEDUP_TARGETS[family],
        meets_checkpointing_target=(memory_cut >= CHECKPOINTING_MEMORY_CUT and overhead <= CHECKPOINTING_TIME_OVERHEAD
                                    if memory_cut is not None else None),
        meets_gradient_target=cosine >= GRADIENT_COSINE,
    )
    print(f"{family}: reference {result.reference_items_per_s:.1f} items/s, packvit {result.packvit_items_per_s:.1f} "
          f"({result.speedup:.2f}x), checkpointed {result.checkpointed_items_per_s:.1f} (+{overhead:.0%} time), "
          f"gradient cosine {cosine:.6f}; timed passes {timed_s:.0f} s", flush=True)
    return result


def markdown_table(results: list[TrainResult], environment: dict) -> str:
    lines = [
        f"Device: {environment['device']}; torch {environment['torch']}; attention backend {environment['attention_backend']}; "
        f"{environment['dtype']}; `mixed` workload, {environment['items_note']}; packs of at most "
        f"{environment['sequence_token_budget']} sequence tokens; median of {environment['repeats']} passes; "
        f"bf16 GEMM {environment['gemm_tflops']:.0f} TFLOP/s (measured in this run)",
        "",
        "| model | items | tokens | reference items/s | packvit items/s | speed-up (target) | packvit MFU | checkpointed items/s | "
        "checkpointing extra time | activation MiB reference / packvit / checkpointed | checkpointing memory cut | "
        "peak MiB reference / packvit / checkpointed | gradient cosine (least tensor) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cut = "-" if r.checkpointing_memory_cut is None else f"{r.checkpointing_memory_cut:.1f}x"
        lines.append(
            f"| {r.model} ({size_label(r.model, environment['smoke'])}) | {r.items} | {r.tokens} | "
            f"{r.reference_items_per_s:.1f} | {r.packvit_items_per_s:.1f} | "
            f"{r.speedup:.2f}x ({r.speedup_target:.0f}x) | {r.packvit_mfu:.1%} | {r.checkpointed_items_per_s:.1f} | {r.checkpointing_time_overhead:+.0%} | "
            f"{mib(r.reference_activation_mib)} / {mib(r.packvit_activation_mib)} / {mib(r.checkpointed_activation_mib)} | "
            f"{cut} | {mib(r.reference_peak_mib)} / {mib(r.packvit_peak_mib)} / {mib(r.checkpointed_peak_mib)} | "
            f"{r.gradient_cosine:.6f} ({r.gradient_min_tensor_cosine:.4f}) |"
        )
    lines += ["", f"Memory: one reference batch of {results[0].memory_items} items against the same items in one pack; "
              f"activation = allocated at the end of a forward, peak = above the resident weights."]
    return "\n".join(lines) + "\n"


def _report(results: list[TrainResult], settings: TrainingSettings, gemm: float, started: float) -> tuple[str, list]:
    """Writes ``train_bench.json`` and ``train_bench.md`` for the results so far; returns the table and the files."""
    items_note = (f"{settings.items} items (docs/benchmarks.md's {MIXED_ITEMS})" if settings.items == MIXED_ITEMS
                  else f"{settings.items} of the {MIXED_ITEMS} items docs/benchmarks.md defines (--items)")
    run_environment = {
        **environment(settings.device),
        "attention_backend": ", ".join(f"{r.model} {r.attention_backend}" for r in results),
        "gemm_tflops": gemm,
        "dtype": str(settings.dtype).replace("torch.", ""),
        "smoke": settings.smoke,
        "items_note": items_note,
        "sequence_token_budget": settings.sequence_token_budget,
        "batch_size": settings.batch_size,
        "repeats": settings.repeats,
        "seconds": time.perf_counter() - started,
    }
    table = markdown_table(results, run_environment)
    payload = {"environment": run_environment, "results": [asdict(r) for r in results]}
    return table, write_report(settings.out, "train_bench", payload, table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=list(TRAIN_FAMILIES), choices=TRAIN_FAMILIES)
    parser.add_argument("--items", type=arguments.positive_int,
                        help=f"items of the mixed workload (default {MIXED_ITEMS}; {SMOKE_ITEMS} with --smoke)")
    parser.add_argument("--token_budget", dest="sequence_token_budget", type=arguments.positive_int, default=32768,
                        help="most sequence tokens (patch tokens plus each item's prefix tokens) in one packvit pack")
    parser.add_argument("--batch_size", type=arguments.positive_int, default=32, help="items per reference batch")
    parser.add_argument("--repeats", type=arguments.positive_int, default=3, help="timed passes per figure (median reported)")
    parser.add_argument("--backend", choices=BACKENDS, help="attention backend for packvit (default: automatic)")
    parser.add_argument("--device", type=arguments.device,
                        help="cuda or cuda:N (another device with --smoke; default: cuda when available)")
    parser.add_argument("--out", type=arguments.output_folder, default="train_bench_out",
                        help="folder for train_bench.json and train_bench.md")
    parser.add_argument("--ckpt_dir", type=arguments.output_folder,
                        help="folder holding (or to hold) the random checkpoints, reused across runs")
    parser.add_argument("--smoke", action="store_true", help="tiny models, few items, float32: a check that runs on the CPU")


def run(args: argparse.Namespace) -> int:
    settings = TrainingSettings.from_args(args)
    started = time.perf_counter()
    results = []
    gemm = gemm_tflops(settings.device)
    with tempfile.TemporaryDirectory(prefix="packvit-train-bench-") as scratch:
        root = settings.checkpoint_dir or Path(scratch)
        for family in settings.families:
            checkpoint = get_adapter(family).cached_random_checkpoint(root, size="tiny" if settings.smoke else "full")
            print(f"{family}: checkpoint ready at {time.perf_counter() - started:.0f} s", flush=True)
            results.append(bench_training(family, checkpoint, settings, gemm))
            if settings.device.type == "cuda":
                torch.cuda.empty_cache()
            table, paths = _report(results, settings, gemm, started)  # after every model: a partial run keeps its figures
    print_report(table, paths)
    return 0
