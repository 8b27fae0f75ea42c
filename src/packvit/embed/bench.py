"""The ``files`` benchmark of BENCHMARKS.md: ``packvit embed`` end to end on JPEG files.

``python -m packvit.embed.bench`` writes ``--num_files`` JPEGs from scikit-image's sample
photographs (random crops and rescales, longer side log-uniform in 200–2,000 px, aspect as
cropped, quality 90, ``numpy.random.default_rng(0)``), a random SigLIP2 checkpoint (so400m with
``--size full``), and measures in one process, on the same files:

1. transformers as a user runs it today: ``Siglip2ImageProcessor`` + ``Siglip2VisionModel`` (sdpa),
   batches of 32 behind a DataLoader with the same workers, writing pooled embeddings (timed first,
   before packvit has run anything);
2. packvit's input pipeline alone: the DataLoader workers decoding, preprocessing and packing;
3. packvit's forward alone on those packs, already on the device (median of ``--repeats``);
4. ``packvit embed`` end to end (after a warm-up run on the first files).

It prints a table and writes ``bench_files.json``: items/s of each, end-to-end as a fraction of
forward-only (target ≥ 85%), the speed-up over transformers (target ≥ 3×), peak GPU memory, the
pooled-embedding cosine between the two pipelines (target ≥ 0.999 in bf16), and where the
end-to-end time went (waiting for the workers, waiting on the GPU and writer).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..arguments import device as device_argument, output_folder, positive_int

__all__ = ["SAMPLE_PHOTOS", "write_files", "add_arguments", "run", "main"]

#: scikit-image's bundled photographs (no download needed)
SAMPLE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field", "immunohistochemistry",
                 "moon", "retina", "rocket")
SIDE_RANGE = (200, 2000)
BASELINE_BATCH = 32


def _file_recipes(num_files: int, seed: int) -> list[tuple]:
    """``(photo, top, left, height, width, longer side)`` per file, all drawn from one generator."""
    import skimage.data

    shapes = {name: getattr(skimage.data, name)().shape[:2] for name in SAMPLE_PHOTOS}
    rng = np.random.default_rng(seed)
    recipes = []
    for _ in range(num_files):
        photo = SAMPLE_PHOTOS[rng.integers(len(SAMPLE_PHOTOS))]
        full_height, full_width = shapes[photo]
        height = max(8, int(full_height * rng.uniform(0.3, 1.0)))
        width = max(8, int(full_width * rng.uniform(0.3, 1.0)))
        top, left = int(rng.integers(full_height - height + 1)), int(rng.integers(full_width - width + 1))
        side = int(round(math.exp(rng.uniform(math.log(SIDE_RANGE[0]), math.log(SIDE_RANGE[1])))))
        recipes.append((photo, top, left, height, width, side))
    return recipes


def _write_file(job: tuple) -> None:
    import skimage.data
    from PIL import Image

    path, (photo, top, left, height, width, side) = job
    image = Image.fromarray(getattr(skimage.data, photo)()[top: top + height, left: left + width]).convert("RGB")
    scale = side / max(height, width)
    image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)
    image.save(path, quality=90)


def write_files(directory: Path, num_files: int, seed: int = 0, processes: int = 1) -> list[str]:
    """The benchmark's JPEGs in ``directory`` (reused when a complete set is there); returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [str(directory / f"{index:06d}.jpg") for index in range(num_files)]
    marker = directory / ".complete"  # hidden: not an input
    if marker.is_file() and marker.read_text() == f"{num_files} {seed}":
        return paths
    jobs = list(zip(paths, _file_recipes(num_files, seed)))
    with multiprocessing.Pool(max(1, processes)) as pool:
        pool.map(_write_file, jobs, chunksize=16)
    marker.write_text(f"{num_files} {seed}")
    return paths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


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
def _transformers_pass(checkpoint: Path, paths: list[str], workers: int, device: torch.device, dtype: torch.dtype,
                       max_num_patches: int, output: Path) -> dict:
    """transformers' processor and model behind a DataLoader, batches of 32, pooled embeddings saved."""
    from ..harness import get_adapter
    from .dataset import init_worker

    model = get_adapter("siglip2").load_reference(checkpoint, device, dtype)  # Siglip2VisionModel, sdpa
    processor, processor_name = _baseline_processor()

    def loader(subset):
        return torch.utils.data.DataLoader(_Files(subset), batch_size=BASELINE_BATCH, num_workers=workers,
                                           collate_fn=_Collate(processor, max_num_patches), worker_init_fn=init_worker,
                                           pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)

    def encode(batch):
        out = model(pixel_values=batch["pixel_values"].to(device, dtype, non_blocking=True),
                    pixel_attention_mask=batch["pixel_attention_mask"].to(device, non_blocking=True),
                    spatial_shapes=batch["spatial_shapes"].to(device))
        return out.pooler_output.float().cpu()

    for batch in loader(paths[: 2 * BASELINE_BATCH]):  # warm-up: kernels, allocator
        encode(batch)
    _reset_peak(device)
    start = time.perf_counter()
    pooled = torch.cat([encode(batch) for batch in loader(paths)]).numpy()
    np.save(output, pooled.astype(np.float16))
    _sync(device)
    seconds = time.perf_counter() - start
    peak = _peak_mib(device)
    return {"items_per_s": len(paths) / seconds, "seconds": seconds, "peak_mib": peak, "processor": processor_name,
            "pooled": pooled}


def _input_and_forward_passes(checkpoint: Path, folder: Path, workers: int, device: torch.device, dtype: torch.dtype,
                              max_num_patches: int, token_budget: int, repeats: int) -> dict:
    """packvit's DataLoader alone (decode, preprocess, pack), then the forward alone on its packs."""
    from .dataset import DecodeOptions, EmbedDataset, init_worker
    from .model import ProcessorSpec, describe_checkpoint, load_encoder
    from .sources import plan_inputs, task_chunks

    info = describe_checkpoint(str(checkpoint))
    encoder = load_encoder(info, ProcessorSpec.of(info, max_num_patches=max_num_patches), device=device, dtype=dtype)
    plan = plan_inputs(str(folder))
    chunks = task_chunks(plan.tasks)
    dataset = EmbedDataset(plan.tasks, chunks, encoder.processor, token_budget, DecodeOptions(), encoder.dtype)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=min(workers, len(chunks)),
                                         worker_init_fn=init_worker, in_order=False,
                                         prefetch_factor=4 if workers else None)
    start = time.perf_counter()
    batches = [pack.batch for pack in loader if pack.batch is not None]
    input_seconds = time.perf_counter() - start
    items = sum(batch.num_items for batch in batches)
    tokens = sum(batch.patches.shape[0] for batch in batches)
    on_device, num_packs = [batch.to(device) for batch in batches], len(batches)
    del batches
    encoder(on_device[0])
    _sync(device)
    _reset_peak(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in on_device:
            encoder(batch)
        _sync(device)
        times.append(time.perf_counter() - start)
    forward_seconds = statistics.median(times)
    peak = _peak_mib(device)
    del encoder, on_device
    return {"input_items_per_s": items / input_seconds, "forward_items_per_s": items / forward_seconds,
            "forward_tokens_per_s": tokens / forward_seconds, "forward_peak_mib": peak, "items": items, "tokens": tokens,
            "packs": num_packs}


def _packvit_pass(checkpoint: Path, folder: Path, paths: list[str], work: Path, workers: int, device: torch.device,
                  max_num_patches: int, token_budget: int) -> dict:
    """``packvit embed`` end to end: a warm-up run on the first files, then the timed run on all."""
    from .run import embed

    options = dict(workers=workers, device=str(device), max_num_patches=max_num_patches, token_budget=token_budget,
                   overwrite=True, quiet=True)
    warm_list = work / "warm-up.txt"
    warm_list.write_text("\n".join(paths[: min(len(paths), 512)]) + "\n")
    embed(str(checkpoint), warm_list, work / "out-warm-up", **options)
    _reset_peak(device)
    start = time.perf_counter()
    summary = embed(str(checkpoint), folder, work / "out", **options)
    call_seconds = time.perf_counter() - start
    stats = summary.stats
    return {"items_per_s": stats["items"] / stats["wall_s"], "tokens_per_s": stats["tokens"] / stats["wall_s"],
            "loop_seconds": stats["wall_s"], "call_seconds": call_seconds, "peak_mib": _peak_mib(device),
            "data_wait_share": stats["data_wait_s"] / stats["wall_s"],
            "writer_wait_share": stats["writer_wait_s"] / stats["wall_s"], "workers": stats["workers"],
            "ok": summary.ok, "failed": summary.failed, "output": str(work / "out")}


def _agreement(output: Path, paths: list[str], baseline: np.ndarray) -> dict:
    """Cosine between packvit's stored pooled embeddings and the baseline's, matched by path."""
    import pyarrow.parquet as parquet

    rows, embeddings = [], []
    for metadata in sorted((output / "metadata").glob("metadata_*.parquet")):
        rows += parquet.read_table(metadata, columns=["image_path"]).column("image_path").to_pylist()
        embeddings.append(np.load(output / "img_emb" / metadata.name.replace("metadata", "img_emb").replace(".parquet", ".npy")))
    packed = dict(zip(rows, np.concatenate(embeddings).astype(np.float32)))
    ours = np.stack([packed[os.path.abspath(path)] for path in paths])
    cosine = (ours * baseline).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(baseline, axis=-1))
    return {"min": float(cosine.min()), "mean": float(cosine.mean())}


def _environment(device: torch.device) -> dict:
    from .manifest import versions

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {**versions(), "gpu": gpu, "cpu_cores": cores, "platform": platform.platform()}


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
    mib = lambda value: "-" if value is None else f"{value:,.0f}"  # noqa: E731
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
    from .run import default_workers

    parser.add_argument("--num_files", type=positive_int, default=5000, help="JPEG files to write and embed")
    parser.add_argument("--size", choices=("tiny", "full"), default="full", help="random SigLIP2: tiny, or full (so400m)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="DataLoader workers (both pipelines)")
    parser.add_argument("--device", type=device_argument, default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--max_num_patches", type=int, default=256)
    parser.add_argument("--token_budget", type=int, default=32_768)
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed forward-only passes (median)")
    parser.add_argument("--work_dir", type=output_folder, default=str(Path(tempfile.gettempdir()) / "packvit-bench-files"),
                        help="files, checkpoint and outputs (reused by later runs)")
    parser.add_argument("--out", type=output_folder, default="bench_files_out", help="where bench_files.json and bench_files.md go")


def run(args: argparse.Namespace) -> int:
    from ..harness import get_adapter
    from ..models.base import default_dtype

    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.size == "full" and device.type != "cuda":
        raise ValueError("the full-size files benchmark needs a CUDA GPU; on the CPU run --size tiny with few --num_files")
    dtype = default_dtype(device)
    work, out = Path(args.work_dir).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = {}
    clock = time.perf_counter()
    paths = write_files(work / "files", args.num_files, seed=0, processes=max(args.workers, 1))
    checkpoint = get_adapter("siglip2").cached_random_checkpoint(work / "checkpoints", size=args.size)
    stages["prepare_s"] = time.perf_counter() - clock
    folder = work / "files"
    clock = time.perf_counter()
    baseline = _transformers_pass(checkpoint, paths, args.workers, device, dtype, args.max_num_patches,
                                  work / "transformers_pooled.npy")
    stages["transformers_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    forward = _input_and_forward_passes(checkpoint, folder, args.workers, device, dtype, args.max_num_patches,
                                        args.token_budget, args.repeats)
    stages["input_and_forward_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    packvit = _packvit_pass(checkpoint, folder, paths, work, args.workers, device, args.max_num_patches, args.token_budget)
    stages["packvit_s"] = time.perf_counter() - clock
    result = {
        "workload": "files", "num_files": args.num_files, "size": args.size, "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "max_num_patches": args.max_num_patches,
        "token_budget": args.token_budget, "workers": args.workers,
        "packvit": packvit, "forward_only": forward,
        "transformers": {key: value for key, value in baseline.items() if key != "pooled"},
        "end_to_end_share": packvit["items_per_s"] / forward["forward_items_per_s"],
        "speedup": packvit["items_per_s"] / baseline["items_per_s"],
        "cosine": _agreement(Path(packvit["output"]), paths, baseline["pooled"]),
        "stages_s": stages, "environment": _environment(device),
    }
    table = _table(result)
    print(table)
    (out / "bench_files.md").write_text(table + "\n")
    (out / "bench_files.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'bench_files.json'} and {out / 'bench_files.md'}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m packvit.embed.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, ImportError) as error:
        parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
