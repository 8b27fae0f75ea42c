"""``packvit bench --suite files``: the ``files`` workload of ``docs/benchmarks.md``, ``packvit embed``
end to end on JPEG files.

Writes ``--num_files`` JPEGs (``workloads.write_files``: crops of scikit-image's photographs,
longer side log-uniform in 200–2,000 px, quality 90, seed 0) and a random SigLIP2 checkpoint
(so400m with ``--size full``), and measures in one process, on the same files:

1. transformers as a user runs it today: ``Siglip2ImageProcessor`` + ``Siglip2VisionModel`` (sdpa),
   batches of 32 behind a DataLoader with the same workers, writing pooled embeddings (timed first,
   before packvit has run anything);
2. packvit's input pipeline alone: the DataLoader ``packvit embed`` runs, its workers decoding,
   preprocessing and packing (packs of at most ``--token_budget`` patch tokens, as embed counts them);
3. packvit's forward alone on those packs, already on the device (median of ``--repeats``);
4. ``packvit embed`` end to end (after a warm-up run on the first files).

Prints a table and writes ``bench_files.json`` and ``bench_files.md``: items/s of each, end to end
as a fraction of forward-only (target ≥ 85%), the speed-up over transformers (target ≥ 3×), peak
GPU memory, the pooled-embedding cosine between the two pipelines (target ≥ 0.999 in bf16), and
where the end-to-end time went (waiting for the workers, waiting on the GPU and writer).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import arguments
from .common import environment, median_seconds, mib, peak_memory, print_report, require_cuda, write_report
from .workloads import write_files

__all__ = ["FilesSettings", "BASELINE_BATCH", "add_arguments", "run"]

#: images per transformers batch
BASELINE_BATCH = 32
#: files of the warm-up run of ``packvit embed``
WARM_UP_FILES = 512


@dataclass(frozen=True)
class FilesSettings:
    """One run of the files suite, checked before anything runs (``from_args``)."""

    device: torch.device
    #: DataLoader workers of both pipelines
    workers: int
    work_dir: Path
    out: Path
    num_files: int = 5000
    #: the random SigLIP2: "tiny", or "full" (so400m)
    size: str = "full"
    max_num_patches: int = 256
    #: most patch tokens in one pack (``packvit embed --token_budget``: prefix tokens not counted)
    patch_token_budget: int = 32768
    repeats: int = 5

    @property
    def dtype(self) -> torch.dtype:
        from ..models.base import default_dtype

        return default_dtype(self.device)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FilesSettings:
        device = arguments.device_or_default(args.device)
        if args.size == "full":
            require_cuda(device, "files", "on the CPU run --size tiny with few --num_files")
        return cls(device=device, workers=args.workers, work_dir=args.work_dir.resolve(), out=args.out,
                   num_files=args.num_files, size=args.size, max_num_patches=args.max_num_patches,
                   patch_token_budget=args.patch_token_budget, repeats=args.repeats)


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image

        return Image.open(self.paths[index]).convert("RGB")


class _Collate:
    """The processor on a batch of images, in the worker (what a user's ``collate_fn`` does)."""

    def __init__(self, processor, max_num_patches: int):
        self.processor, self.max_num_patches = processor, max_num_patches

    def __call__(self, images):
        return self.processor(images=images, max_num_patches=self.max_num_patches, return_tensors="pt")


def _baseline_processor():
    """transformers' SigLIP2 processor as ``AutoImageProcessor`` gives it: torchvision-backed where
    torchvision is installed (5.x ``Siglip2ImageProcessor``, 4.x ``...Fast``), else the PIL class."""
    import importlib.util

    import transformers

    five = int(transformers.__version__.split(".")[0]) >= 5
    if importlib.util.find_spec("torchvision") is not None:
        name = "Siglip2ImageProcessor" if five else "Siglip2ImageProcessorFast"
        return getattr(transformers, name)(), f"{name} (torchvision backend)"
    name = "Siglip2ImageProcessorPil" if five else "Siglip2ImageProcessor"
    return getattr(transformers, name)(), f"{name} (PIL backend: torchvision not installed)"


@torch.inference_mode()
def _transformers_pass(settings: FilesSettings, checkpoint: Path, paths: list[str]) -> dict:
    """transformers' processor and model behind a DataLoader, batches of 32, pooled embeddings saved."""
    from ..embed.dataset import init_worker
    from ..harness import get_adapter

    device, dtype = settings.device, settings.dtype
    model = get_adapter("siglip2").load_reference(checkpoint, device, dtype)  # Siglip2VisionModel, sdpa
    processor, processor_name = _baseline_processor()

    def loader(subset):
        return torch.utils.data.DataLoader(_Files(subset), batch_size=BASELINE_BATCH, num_workers=settings.workers,
                                           collate_fn=_Collate(processor, settings.max_num_patches),
                                           worker_init_fn=init_worker, pin_memory=device.type == "cuda")

    def encode(batch):
        out = model(pixel_values=batch["pixel_values"].to(device, dtype, non_blocking=True),
                    pixel_attention_mask=batch["pixel_attention_mask"].to(device, non_blocking=True),
                    spatial_shapes=batch["spatial_shapes"].to(device))
        return out.pooler_output.float().cpu()

    for batch in loader(paths[: 2 * BASELINE_BATCH]):  # warm-up: kernels, allocator
        encode(batch)
    start = time.perf_counter()
    with peak_memory(device) as memory:
        pooled = torch.cat([encode(batch) for batch in loader(paths)]).numpy()  # [files, D]
        np.save(settings.work_dir / "transformers_pooled.npy", pooled.astype(np.float16))
    seconds = time.perf_counter() - start
    return {"items_per_s": len(paths) / seconds, "seconds": seconds, "peak_mib": memory.peak_mib,
            "processor": processor_name, "pooled": pooled}


def _embed_loader(encoder, processor, folder: Path, settings: FilesSettings) -> torch.utils.data.DataLoader:
    """The DataLoader ``packvit embed`` runs on ``folder`` (``embed.dataset.make_loader``): workers
    that read, decode, preprocess and pack the files into ``embed.packer.Pack``s."""
    from ..embed.decode import DecodeOptions
    from ..embed.dataset import make_loader
    from ..embed.sources import plan_inputs

    return make_loader(plan_inputs(str(folder)).tasks, processor, settings.patch_token_budget, DecodeOptions(),
                       settings.workers, settings.device)


def _input_pass(settings: FilesSettings, encoder, processor, folder: Path) -> tuple[list, float]:
    """packvit's input pipeline alone (read, decode, preprocess, pack): its packs' batches and the seconds it took."""
    start = time.perf_counter()
    batches = [encoder.pack_batch(pack) for pack in _embed_loader(encoder, processor, folder, settings) if pack.num_items]
    return batches, time.perf_counter() - start


def _forward_pass(settings: FilesSettings, encoder, batches: list) -> tuple[float, float | None]:
    """Median seconds of the forward alone over ``batches``, already on the device, and its peak memory."""
    on_device = [batch.to(settings.device) for batch in batches]

    def forward_pass():
        for batch in on_device:
            encoder.forward(batch)

    with peak_memory(settings.device) as memory:
        seconds = median_seconds(forward_pass, settings.device, settings.repeats)
    return seconds, memory.peak_mib


def _pipeline_parts(settings: FilesSettings, checkpoint: Path, folder: Path) -> dict:
    """The two parts of ``packvit embed`` measured apart: its input pipeline, then its forward on those packs."""
    from ..embed.model import describe_checkpoint, load_encoder
    from ..embed.preprocess import ProcessorSpec

    info = describe_checkpoint(str(checkpoint))
    processor = ProcessorSpec(str(info.directory), info.family, True, settings.max_num_patches)
    encoder = load_encoder(info, processor.build(), device=settings.device, dtype=settings.dtype)
    batches, input_seconds = _input_pass(settings, encoder, processor, folder)
    items = sum(batch.num_items for batch in batches)
    tokens = sum(batch.patches.shape[0] for batch in batches)  # patch tokens
    forward_seconds, peak_mib = _forward_pass(settings, encoder, batches)
    return {"input_items_per_s": items / input_seconds, "forward_items_per_s": items / forward_seconds,
            "forward_tokens_per_s": tokens / forward_seconds, "forward_peak_mib": peak_mib, "items": items,
            "tokens": tokens, "packs": len(batches)}


def _packvit_pass(settings: FilesSettings, checkpoint: Path, folder: Path, paths: list[str]) -> dict:
    """``packvit embed`` end to end: a warm-up run on the first files, then the timed run on all."""
    from ..embed.run import embed

    work = settings.work_dir
    options = dict(workers=settings.workers, device=str(settings.device), max_num_patches=settings.max_num_patches,
                   token_budget=settings.patch_token_budget, overwrite=True, quiet=True)
    warm_list = work / "warm-up.txt"
    warm_list.write_text("\n".join(paths[:WARM_UP_FILES]) + "\n")
    embed(str(checkpoint), warm_list, work / "out-warm-up", **options)
    start = time.perf_counter()
    with peak_memory(settings.device) as memory:
        summary = embed(str(checkpoint), folder, work / "out", **options)
    call_seconds = time.perf_counter() - start
    stats = summary.stats
    return {"items_per_s": stats.items / stats.wall_s, "tokens_per_s": stats.tokens / stats.wall_s,
            "loop_seconds": stats.wall_s, "call_seconds": call_seconds, "peak_mib": memory.peak_mib,
            "data_wait_share": stats.data_wait_s / stats.wall_s,
            "writer_wait_share": stats.writer_wait_s / stats.wall_s, "workers": stats.workers,
            "ok": summary.ok, "failed": summary.failed, "output": str(work / "out")}


def _agreement(output: Path, paths: list[str], baseline: np.ndarray) -> dict:
    """Cosine between packvit's stored pooled embeddings and the baseline's ``[files, D]``, matched by path."""
    import pyarrow.parquet as parquet

    rows, embeddings = [], []
    for metadata in sorted((output / "metadata").glob("metadata_*.parquet")):
        rows += parquet.read_table(metadata, columns=["image_path"]).column("image_path").to_pylist()
        embeddings.append(np.load(output / "img_emb" / metadata.name.replace("metadata", "img_emb").replace(".parquet", ".npy")))
    packed = dict(zip(rows, np.concatenate(embeddings).astype(np.float32)))
    ours = np.stack([packed[os.path.abspath(path)] for path in paths])  # [files, D]
    cosine = (ours * baseline).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(baseline, axis=-1))
    return {"min": float(cosine.min()), "mean": float(cosine.mean())}


def _bound(result: dict) -> str:
    """What limits the end-to-end rate: the input pipeline, the forward, or neither."""
    p, f = result["packvit"], result["forward_only"]
    ceiling = min(f["input_items_per_s"], f["forward_items_per_s"])
    limit = (f"the input pipeline ({p['workers']} workers decode and preprocess {f['input_items_per_s']:,.0f} items/s)"
             if f["input_items_per_s"] < f["forward_items_per_s"] else
             f"the forward ({f['forward_items_per_s']:,.0f} items/s)")
    return (f"bound by {limit}: end to end reaches {p['items_per_s'] / ceiling:.0%} of that; the other runs at "
            f"{max(f['input_items_per_s'], f['forward_items_per_s']):,.0f} items/s")


def _table(result: dict) -> str:
    p, f, b = result["packvit"], result["forward_only"], result["transformers"]
    lines = [
        "| pipeline | items/s | GPU peak MiB |",
        "|---|---|---|",
        f"| packvit embed, end to end ({p['workers']} workers) | {p['items_per_s']:,.1f} | {mib(p['peak_mib'])} |",
        f"| packvit forward only, same packs on the device | {f['forward_items_per_s']:,.1f} | {mib(f['forward_peak_mib'])} |",
        f"| packvit input pipeline only ({p['workers']} workers: decode, preprocess, pack) | {f['input_items_per_s']:,.1f} | - |",
        f"| transformers: {b['processor']} + Siglip2VisionModel (sdpa), batches of {BASELINE_BATCH} | "
        f"{b['items_per_s']:,.1f} | {mib(b['peak_mib'])} |",
        "",
        f"end to end / forward only: {result['end_to_end_share']:.1%} (target >= 85%)",
        f"speed-up over transformers: {result['speedup']:.2f}x (target >= 3x)",
        f"pooled cosine packvit vs transformers: min {result['cosine']['min']:.5f}, mean {result['cosine']['mean']:.5f} "
        f"(target >= 0.999 in bf16)",
        f"end-to-end time: {p['data_wait_share']:.0%} waiting for the workers, {p['writer_wait_share']:.0%} waiting on "
        f"the GPU and writer",
        _bound(result),
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..embed.options import default_workers

    parser.add_argument("--num_files", type=arguments.positive_int, default=5000, help="JPEG files to write and embed")
    parser.add_argument("--size", choices=("tiny", "full"), default="full", help="random SigLIP2: tiny, or full (so400m)")
    parser.add_argument("--workers", type=arguments.non_negative_int, default=default_workers("cuda"),
                        help="DataLoader workers (both pipelines; 0: in the main process)")
    parser.add_argument("--device", type=arguments.device,
                        help="cuda or cuda:N (another device with --size tiny; default: cuda when available)")
    parser.add_argument("--max_num_patches", type=arguments.positive_int, default=256,
                        help="patch budget per image of both processors")
    parser.add_argument("--token_budget", dest="patch_token_budget", type=arguments.positive_int, default=32_768,
                        help="most patch tokens in one pack (packvit embed's --token_budget; prefix tokens not counted)")
    parser.add_argument("--repeats", type=arguments.positive_int, default=5, help="timed forward-only passes (median)")
    parser.add_argument("--work_dir", type=arguments.output_folder,
                        default=str(Path(tempfile.gettempdir()) / "packvit-bench-files"),
                        help="folder for the files, checkpoint and outputs (reused by later runs)")
    parser.add_argument("--out", type=arguments.output_folder, default="bench_files_out",
                        help="folder for bench_files.json and bench_files.md")


def run(args: argparse.Namespace) -> int:
    from ..harness import get_adapter

    settings = FilesSettings.from_args(args)
    work = settings.work_dir
    stages = {}
    clock = time.perf_counter()
    paths = write_files(work / "files", settings.num_files, seed=0, processes=max(settings.workers, 1))
    checkpoint = get_adapter("siglip2").cached_random_checkpoint(work / "checkpoints", size=settings.size)
    stages["prepare_s"] = time.perf_counter() - clock
    folder = work / "files"
    clock = time.perf_counter()
    baseline = _transformers_pass(settings, checkpoint, paths)
    stages["transformers_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    forward = _pipeline_parts(settings, checkpoint, folder)
    stages["input_and_forward_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    packvit = _packvit_pass(settings, checkpoint, folder, paths)
    stages["packvit_s"] = time.perf_counter() - clock
    result = {
        "workload": "files", "num_files": settings.num_files, "size": settings.size, "device": str(settings.device),
        "dtype": str(settings.dtype).replace("torch.", ""), "max_num_patches": settings.max_num_patches,
        "patch_token_budget": settings.patch_token_budget, "workers": settings.workers,
        "packvit": packvit, "forward_only": forward,
        "transformers": {key: value for key, value in baseline.items() if key != "pooled"},
        "end_to_end_share": packvit["items_per_s"] / forward["forward_items_per_s"],
        "speedup": packvit["items_per_s"] / baseline["items_per_s"],
        "cosine": _agreement(Path(packvit["output"]), paths, baseline["pooled"]),
        "stages_s": stages, "environment": environment(settings.device),
    }
    table = _table(result)
    print_report(table, write_report(settings.out, "bench_files", result, table))
    return 0
