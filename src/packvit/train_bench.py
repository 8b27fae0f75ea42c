"""``python -m packvit.train_bench``: training (forward + backward) speed and memory of the packed
models against their references' own training path, as BENCHMARKS.md defines it.

SigLIP2 so400m and DINOv3 ViT-L with random full-size weights, on the ``mixed`` workload
(random-normal pixels from seed 0). The reference is its own training path in bf16 with SDPA:
SigLIP2 in padded batches of 32 with ``pixel_attention_mask`` (padding rows left out of the loss),
DINOv3 in dense groups of up to 32 equal-size images. packvit runs bf16 parameters, the default
attention backend and packs of at most ``--token_budget`` tokens in workload order, without and
with gradient checkpointing. The loss is the sum of a fixed random projection ``w [D]`` of every
output token and pooled vector. Both sides' inputs are built beforehand (the processor's work);
a timed pass is every batch's forward and backward, gradients accumulating, then cleared.

Reported: items/s (median of ``--repeats`` passes after a warm-up; the reference first, and
nothing in the process compiled), speed-up, and for one reference batch of 32 items against the
same items in one pack: activation memory (allocated at the end of a forward, the most over a
reference loop) and peak memory above the resident weights (``torch.cuda.max_memory_allocated``).
Then the bf16 gradient agreement at full size: the cosine of the flattened parameter gradients of
that batch, the reference's mapped through the family's checkpoint map. Targets: speed-up >= 3x
(SigLIP2) and >= 10x (DINOv3); checkpointing cuts activation memory >= 3x for <= 35% extra time;
gradient cosine >= 0.999. Writes ``train_bench.json`` and ``train_bench.md`` to ``--out``.

``--smoke`` runs tiny models on a few items in float32 on any device (memory figures need CUDA).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .arguments import device as device_argument, output_folder, positive_int
from .attention import BACKENDS, select_backend
from .bench import BENCH_SIZES, _median_seconds, _synchronize, _token_budget_chunks, workload_grids
from .harness import get_adapter
from .packing import PackedBatch, patchify

__all__ = ["TRAIN_FAMILIES", "SPEEDUP_TARGETS", "TrainResult", "training_steps", "bench_training", "markdown_table", "main"]

TRAIN_FAMILIES = ("siglip2", "dinov3")
#: packvit ÷ reference fwd+bwd items/s wanted on ``mixed``
SPEEDUP_TARGETS = {"siglip2": 3.0, "dinov3": 10.0}
#: gradient checkpointing: activation memory divided by at least this, for at most this much extra time
CHECKPOINTING_MEMORY_CUT = 3.0
CHECKPOINTING_TIME_OVERHEAD = 0.35
GRADIENT_COSINE = 0.999
#: items of the workload BENCHMARKS.md defines
WORKLOAD_ITEMS = 512


@dataclass
class TrainResult:
    model: str
    attention_backend: str
    items: int
    tokens: int
    packs: int
    reference_batches: int
    reference_items_per_s: float
    packvit_items_per_s: float
    checkpointed_items_per_s: float
    speedup: float
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
                   token_budget: int) -> tuple[list, list]:
    """(reference steps, packvit steps) over ``items``: callables returning each batch's loss, their
    inputs built beforehand on the items' device."""
    packed_steps = []
    patch_counts = [item.shape[-2] * item.shape[-1] // packed.patch_size**2 for item in items]
    segments = [n + packed.num_prefix_tokens for n in patch_counts]
    for chunk in _token_budget_chunks(items, segments, token_budget):
        batch = PackedBatch(*patchify(chunk, packed.patch_size, packed.patch_layout), packed.patch_layout)

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
    _synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device)
    activation = 0
    for step in steps:
        before = torch.cuda.memory_allocated(device)
        loss = step()
        activation = max(activation, torch.cuda.memory_allocated(device) - before)
        loss.backward()
        del loss
    _synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - resident
    model.zero_grad(set_to_none=True)
    return activation / 2**20, peak / 2**20


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


def bench_training(family: str, ckpt, args, device: torch.device, dtype: torch.dtype) -> TrainResult:
    adapter = get_adapter(family)
    reference = adapter.load_reference(ckpt, device, dtype)  # eval: DINOv3's train mode rescales RoPE at random
    packed = adapter.load_packed(ckpt, device, dtype)
    packed.attention_backend, packed.compile_layers = args.backend, False
    grids = workload_grids("mixed", family, args.items)
    items = [x.to(device, dtype) for x in adapter.random_items(grids, packed.patch_size, torch.Generator().manual_seed(0))]
    projection = torch.randn(packed.hidden_size, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    reference_steps, packed_steps = training_steps(family, reference, packed, items, projection, args.batch_size,
                                                   args.token_budget)
    started = time.perf_counter()
    reference_s = _median_seconds(lambda: _run_pass(reference_steps, reference), device, args.repeats)
    packed_s = _median_seconds(lambda: _run_pass(packed_steps, packed), device, args.repeats)
    packed.gradient_checkpointing_enable()
    checkpointed_s = _median_seconds(lambda: _run_pass(packed_steps, packed), device, args.repeats)
    packed.gradient_checkpointing_disable()
    timed_s = time.perf_counter() - started

    memory_items = items[: args.batch_size]
    memory_reference, memory_packed = training_steps(family, reference, packed, memory_items, projection,
                                                     args.batch_size, sys.maxsize)
    reference_memory = _memory(memory_reference, reference, device)
    packed_memory = _memory(memory_packed, packed, device)
    packed.gradient_checkpointing_enable()
    checkpointed_memory = _memory(memory_packed, packed, device)
    packed.gradient_checkpointing_disable()
    cosine, least = _gradient_agreement(reference, packed, memory_reference, memory_packed)

    memory_cut = None
    if checkpointed_memory[0]:
        memory_cut = packed_memory[0] / checkpointed_memory[0]
    overhead = checkpointed_s / packed_s - 1
    result = TrainResult(
        model=family, attention_backend=args.backend or select_backend(device, dtype, packed.config.head_dim),
        items=len(items), tokens=sum(t * h * width for t, h, width in grids), packs=len(packed_steps),
        reference_batches=len(reference_steps),
        reference_items_per_s=len(items) / reference_s, packvit_items_per_s=len(items) / packed_s,
        checkpointed_items_per_s=len(items) / checkpointed_s,
        speedup=reference_s / packed_s, checkpointed_speedup=reference_s / checkpointed_s,
        speedup_target=SPEEDUP_TARGETS[family], checkpointing_time_overhead=overhead,
        memory_items=len(memory_items),
        reference_activation_mib=reference_memory[0], packvit_activation_mib=packed_memory[0],
        checkpointed_activation_mib=checkpointed_memory[0],
        reference_peak_mib=reference_memory[1], packvit_peak_mib=packed_memory[1], checkpointed_peak_mib=checkpointed_memory[1],
        checkpointing_memory_cut=memory_cut, gradient_cosine=cosine, gradient_min_tensor_cosine=least,
        meets_speedup_target=reference_s / packed_s >= SPEEDUP_TARGETS[family],
        meets_checkpointing_target=(memory_cut >= CHECKPOINTING_MEMORY_CUT and overhead <= CHECKPOINTING_TIME_OVERHEAD
                                    if memory_cut is not None else None),
        meets_gradient_target=cosine >= GRADIENT_COSINE,
    )
    print(f"{family}: reference {result.reference_items_per_s:.1f} items/s, packvit {result.packvit_items_per_s:.1f} "
          f"({result.speedup:.2f}x), checkpointed {result.checkpointed_items_per_s:.1f} (+{overhead:.0%} time), "
          f"gradient cosine {cosine:.6f}; timed passes {timed_s:.0f} s", flush=True)
    return result


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown_table(results: list[TrainResult], environment: dict) -> str:
    lines = [
        f"GPU: {environment['device']}; torch {environment['torch']}; attention backend {environment['attention_backend']}; "
        f"{environment['dtype']}; `mixed` workload, {environment['items_note']}; packs of at most "
        f"{environment['token_budget']} tokens; median of {environment['repeats']} passes",
        "",
        "| model | items | tokens | reference items/s | packvit items/s | speed-up (target) | checkpointed items/s | "
        "checkpointing extra time | activation MiB reference / packvit / checkpointed | checkpointing memory cut | "
        "peak MiB reference / packvit / checkpointed | gradient cosine (least tensor) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        size = "tiny" if environment["smoke"] else BENCH_SIZES[r.model]
        cut = "-" if r.checkpointing_memory_cut is None else f"{r.checkpointing_memory_cut:.1f}x"
        lines.append(
            f"| {r.model} ({size}) | {r.items} | {r.tokens} | {r.reference_items_per_s:.1f} | {r.packvit_items_per_s:.1f} | "
            f"{r.speedup:.2f}x ({r.speedup_target:.0f}x) | {r.checkpointed_items_per_s:.1f} | {r.checkpointing_time_overhead:+.0%} | "
            f"{_mib(r.reference_activation_mib)} / {_mib(r.packvit_activation_mib)} / {_mib(r.checkpointed_activation_mib)} | "
            f"{cut} | {_mib(r.reference_peak_mib)} / {_mib(r.packvit_peak_mib)} / {_mib(r.checkpointed_peak_mib)} | "
            f"{r.gradient_cosine:.6f} ({r.gradient_min_tensor_cosine:.4f}) |"
        )
    lines += ["", f"Memory: one reference batch of {results[0].memory_items} items against the same items in one pack; "
              f"activation = allocated at the end of a forward, peak = above the resident weights."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m packvit.train_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(TRAIN_FAMILIES), choices=TRAIN_FAMILIES)
    parser.add_argument("--items", type=positive_int, help=f"items of the mixed workload (default {WORKLOAD_ITEMS}; 6 with --smoke)")
    parser.add_argument("--token_budget", type=positive_int, default=32768, help="most tokens in one packvit pack")
    parser.add_argument("--batch_size", type=positive_int, default=32, help="items per reference batch")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed passes per figure (median reported)")
    parser.add_argument("--backend", choices=BACKENDS, help="attention backend for packvit (default: automatic)")
    parser.add_argument("--device", type=device_argument, help="cuda or cuda:N (cpu with --smoke; default: cuda when available)")
    parser.add_argument("--out", type=output_folder, default="train_bench_out", help="directory for train_bench.json and train_bench.md")
    parser.add_argument("--ckpt_dir", type=output_folder, help="directory holding (or to hold) the random checkpoints, reused across runs")
    parser.add_argument("--smoke", action="store_true", help="tiny models, few items, float32: a check that runs on the CPU")
    args = parser.parse_args(argv)
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("the training benchmark measures full-size models and needs a CUDA GPU; on the CPU run "
                         "`python -m packvit.train_bench --smoke` to check that it works")
    if args.items is None:
        args.items = 6 if args.smoke else WORKLOAD_ITEMS
    dtype = torch.bfloat16 if device.type == "cuda" and not args.smoke else torch.float32
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, table = [], ""
    with tempfile.TemporaryDirectory(prefix="packvit-train-bench-") as scratch:
        root = Path(args.ckpt_dir or scratch)
        for family in args.models:
            ckpt = get_adapter(family).cached_random_checkpoint(root, size="tiny" if args.smoke else "full")
            print(f"{family}: checkpoint ready at {time.perf_counter() - started:.0f} s", flush=True)
            results.append(bench_training(family, ckpt, args, device, dtype))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            table = _write(results, args, device, dtype, out, started)  # after every model: a partial run keeps its figures
    print("\n" + table)
    print(f"wrote {out / 'train_bench.json'} and {out / 'train_bench.md'} in {time.perf_counter() - started:.0f} s")
    return 0


def _write(results: list[TrainResult], args, device: torch.device, dtype: torch.dtype, out: Path, started: float) -> str:
    """Writes ``train_bench.json`` and ``train_bench.md`` for the results so far; returns the table."""
    items_note = (f"{args.items} items (BENCHMARKS.md's {WORKLOAD_ITEMS})" if args.items == WORKLOAD_ITEMS
                  else f"{args.items} of the {WORKLOAD_ITEMS} items BENCHMARKS.md defines (--items)")
    environment = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'unknown'})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "attention_backend": ", ".join(f"{r.model} {r.attention_backend}" for r in results),
        "dtype": str(dtype).replace("torch.", ""),
        "smoke": args.smoke,
        "items_note": items_note,
        "token_budget": args.token_budget,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "seconds": time.perf_counter() - started,
    }
    (out / "train_bench.json").write_text(json.dumps({"environment": environment, "results": [asdict(r) for r in results]}, indent=2))
    table = markdown_table(results, environment)
    (out / "train_bench.md").write_text(table)
    return table

if __name__ == "__main__":
    sys.exit(main())
