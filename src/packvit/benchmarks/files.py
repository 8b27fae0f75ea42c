"""``packvit bench --suite files``: the ``files`` workload of ``docs/benchmarks.md``, ``packvit embed``
end to end on JPEG files, on each decode route.

Writes ``--num_files`` JPEGs (``workloads.write_files``: crops of scikit-image's photographs,
longer side log-uniform in 200–2,000 px, quality 90, seed 0) and a random SigLIP2 checkpoint
(so400m with ``--size full``), and measures in one process, on the same files:

1. transformers as a user runs it today: ``Siglip2ImageProcessor`` + ``Siglip2VisionModel`` (sdpa),
   batches of 32 behind a DataLoader with the same workers, writing pooled embeddings (timed first,
   before packvit has run anything);
2. where each file's time goes, per stage, on one thread (``--profile_files`` of them): the CPU
   route's read, decode, EXIF, convert, resize and patchify as a worker runs them, then per pack
   the join, pin, transfer and normalisation; the GPU route's read and header parse (a worker),
   then nvJPEG in the pack's batch, the EXIF orientation and the device path (the main process);
3. each route's input pipeline alone: the DataLoader ``packvit embed`` runs, its packs made into
   the model's input on the device (``Encoder.pack_batch``: normalised, or decoded there);
4. packvit's forward alone on those inputs, already on the device (median of ``--repeats``);
5. ``packvit embed`` end to end on each route (after a warm-up run on the first files).

``--decode`` picks the routes (``both``: the GPU route where it can run, said why not where it
cannot). Prints a table and writes ``bench_files.json`` and ``bench_files.md``: items/s of each,
end to end as a fraction of forward-only (target ≥ 85%), the speed-up over transformers (target
≥ 3×), peak GPU memory, the pooled cosine between the routes and against transformers, and where
the end-to-end time went (waiting for the workers, waiting on the GPU and writer).
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import arguments
from .common import environment, median_seconds, mib, peak_memory, print_report, require_cuda, synchronize, write_report
from .workloads import write_files

__all__ = ["FilesSettings", "BASELINE_BATCH", "CPU_STAGES", "GPU_STAGES", "add_arguments", "run"]

#: images per transformers batch
BASELINE_BATCH = 32
#: files of the warm-up run of ``packvit embed``
WARM_UP_FILES = 512
#: the stages of each route the profile times, per file
CPU_STAGES = ("read", "decode", "exif", "convert", "resize", "patchify", "pack", "pin", "transfer", "normalize")
GPU_STAGES = ("read", "parse", "pack", "nvjpeg", "upright", "device_path")


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
    #: the routes to run: "cpu", "gpu" or "both"
    decode: str = "both"
    #: files the per-stage profile times
    profile_files: int = 200

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
                   patch_token_budget=args.patch_token_budget, repeats=args.repeats, decode=args.decode,
                   profile_files=args.profile_files)


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


def _routes(settings: FilesSettings, processor) -> tuple[list[str], str | None]:
    """The routes to run, and why the GPU route is left out where it is (``embed.run.resolve_decode``)."""
    from ..embed.run import resolve_decode

    wanted = ["cpu", "gpu"] if settings.decode == "both" else [settings.decode]
    if "gpu" not in wanted:
        return wanted, None
    try:
        resolve_decode("gpu", None, settings.device, processor, settings.workers)
    except ValueError as error:
        if settings.decode == "gpu":
            raise
        return ["cpu"], str(error)
    return wanted, None


def _embed_loader(processor_spec, folder: Path, settings: FilesSettings, route: str) -> torch.utils.data.DataLoader:
    """The DataLoader ``packvit embed`` runs on ``folder`` on ``route`` (``embed.dataset.make_loader``):
    workers that read, decode, preprocess and pack the files into ``embed.packer.Pack``s."""
    from ..embed.dataset import make_loader
    from ..embed.decode import DecodeOptions
    from ..embed.sources import plan_inputs

    return make_loader(plan_inputs(str(folder)).tasks, processor_spec, settings.patch_token_budget,
                       DecodeOptions(gpu=route == "gpu"), settings.workers, settings.device)


def _timed(clock: dict, stage: str, device: torch.device | None = None):
    """Adds the seconds since ``clock["at"]`` to ``clock[stage]`` (after a device sync) and restarts it."""
    if device is not None:
        synchronize(device)
    now = time.perf_counter()
    clock[stage] = clock.get(stage, 0.0) + now - clock["at"]
    clock["at"] = now


def _cpu_stages(processor, paths: list[str], settings: FilesSettings) -> dict:
    """ms per file of each of ``CPU_STAGES`` on one thread: a worker's stages of each file (full
    decodes), then per pack of ``--token_budget`` tokens its join, and the main process's pin,
    transfer and normalisation (pin and transfer only on CUDA)."""
    from PIL import Image, ImageOps

    from ..packing import patchify
    from ..preprocess import PixelBatch
    from ..preprocess.common import rgb_pixels

    device, native = settings.device, processor.keeps_aspect_ratio(processor.native)
    clock, items, packs, tokens = {"at": time.perf_counter()}, [], [], 0
    for path in paths:
        clock["at"] = time.perf_counter()
        with open(path, "rb") as handle:
            data = handle.read()
        _timed(clock, "read")
        image = Image.open(io.BytesIO(data))
        image.load()
        _timed(clock, "decode")
        ImageOps.exif_transpose(image, in_place=True)
        _timed(clock, "exif")
        rgb = rgb_pixels(image, processor.backend)
        rgb.hwc()
        _timed(clock, "convert")
        resized = processor.resize_image(rgb, native, processor.max_num_patches, processor.backend)  # uint8 [3, H', W']
        _timed(clock, "resize")
        patches, grid = patchify([resized], processor.patch_size, processor.patch_layout)  # uint8 [h*w, p*p*3]
        items.append(processor.pixel_batch(patches, grid, processor.backend))
        _timed(clock, "patchify")
        if tokens + patches.shape[0] > settings.patch_token_budget:
            packs.append(items[:-1])
            items, tokens = items[-1:], 0
        tokens += patches.shape[0]
    packs.append(items)
    for pack in packs:
        clock["at"] = time.perf_counter()
        pixels = PixelBatch.concat(pack)
        _timed(clock, "pack")
        if device.type == "cuda":
            pixels = pixels.pin_memory()
            _timed(clock, "pin")
            pixels = pixels.to(device)
            _timed(clock, "transfer", device)
        processor.normalize(pixels, dtype=settings.dtype)
        _timed(clock, "normalize", device)
    return {stage: 1e3 * clock[stage] / len(paths) if stage in clock else None for stage in CPU_STAGES}


def _gpu_stages(processor, paths: list[str], settings: FilesSettings) -> dict:
    """ms per file of each of ``GPU_STAGES``: a worker's read and header parse of each file, then per
    pack the join of its files, and the main process's batched nvJPEG decode, the EXIF orientation
    and the device path (resize, patchify, normalise), each until the device is done."""
    from ..embed.gpu_decode import JpegFile, JpegFiles, nvjpeg_decode, read_header, upright

    device, clock, files, packs, tokens = settings.device, {}, [], [], 0
    for path in paths:
        clock["at"] = time.perf_counter()
        with open(path, "rb") as handle:
            data = handle.read()
        _timed(clock, "read")
        header = read_header(data, processor.max_pixels)
        grid = processor.device_grid(*header.upright_size)
        files.append(JpegFile(data, header, path))
        _timed(clock, "parse")
        if tokens + grid[1] * grid[2] > settings.patch_token_budget:
            packs.append(files[:-1])
            files, tokens = files[-1:], 0
        tokens += grid[1] * grid[2]
    packs.append(files)
    nvjpeg_decode([JpegFiles.join(packs[0][:1]).file(0)], device)  # warm-up: nvJPEG's handle and buffers
    for pack in packs:
        clock["at"] = time.perf_counter()
        jpegs = JpegFiles.join(pack)
        _timed(clock, "pack")
        decoded = nvjpeg_decode([jpegs.file(index) for index in range(len(jpegs))], device)
        _timed(clock, "nvjpeg", device)
        images = [upright(image, header.orientation) for image, header in zip(decoded, jpegs.headers)]
        _timed(clock, "upright", device)
        processor.on_device(images, dtype=settings.dtype)
        _timed(clock, "device_path", device)
    return {stage: 1e3 * clock[stage] / len(paths) for stage in GPU_STAGES}


def _stage_profile(settings: FilesSettings, processor, paths: list[str], routes: list[str]) -> dict:
    """Per-stage ms per file of each route (``_cpu_stages``, ``_gpu_stages``) and the worker's whole
    per-file call (``processor.resize([path])``), the best of two passes per stage, on one thread."""
    sample, threads = paths[: settings.profile_files], torch.get_num_threads()
    torch.set_num_threads(1)  # as a worker runs (embed.dataset.init_worker)
    try:
        profile = {}
        for route in routes:
            stages = _cpu_stages if route == "cpu" else _gpu_stages
            passes = [stages(processor, sample, settings) for _ in range(2)]
            profile[route] = {stage: min(p[stage] for p in passes) if passes[0][stage] is not None else None
                              for stage in passes[0]}
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            for path in sample:
                processor.resize([path])
            best = min(best, time.perf_counter() - start)
        profile["worker_call_ms"] = 1e3 * best / len(sample)
    finally:
        torch.set_num_threads(threads)
    return profile


def _input_pass(settings: FilesSettings, encoder, processor_spec, folder: Path, route: str) -> tuple[list, float]:
    """One route's input pipeline alone: its packs read, decoded and preprocessed by the workers and
    made into the model's input on the device; the inputs and the seconds it took."""
    start = time.perf_counter()
    batches = [encoder.pack_batch(pack) for pack in _embed_loader(processor_spec, folder, settings, route)]
    synchronize(settings.device)
    return [batch for batch in batches if batch is not None], time.perf_counter() - start


def _forward_pass(settings: FilesSettings, encoder, batches: list) -> tuple[float, float | None]:
    """Median seconds of the forward alone over ``batches``, already on the device, and its peak memory."""

    def forward_pass():
        for batch in batches:
            encoder.forward(batch)

    with peak_memory(settings.device) as memory:
        seconds = median_seconds(forward_pass, settings.device, settings.repeats)
    return seconds, memory.peak_mib


def _pipeline_parts(settings: FilesSettings, checkpoint: Path, folder: Path, paths: list[str], routes: list[str]) -> dict:
    """The parts of ``packvit embed`` measured apart: the stage profile, each route's input pipeline,
    then the forward on the CPU route's inputs."""
    from ..embed.gpu_decode import JpegDecoder
    from ..embed.model import describe_checkpoint, load_encoder
    from ..embed.preprocess import ProcessorSpec

    info = describe_checkpoint(str(checkpoint))
    spec = ProcessorSpec(str(info.directory), info.family, True, settings.max_num_patches)
    processor = spec.build()
    jpeg_decoder = JpegDecoder(settings.device) if "gpu" in routes else None
    encoder = load_encoder(info, processor, jpeg_decoder, device=settings.device, dtype=settings.dtype)
    result = {"stages_ms_per_file": _stage_profile(settings, processor, paths, routes), "input_items_per_s": {}}
    for route in routes:
        batches, seconds = _input_pass(settings, encoder, spec, folder, route)
        result["input_items_per_s"][route] = sum(batch.num_items for batch in batches) / seconds
        if route == routes[0]:
            items = sum(batch.num_items for batch in batches)
            tokens = sum(batch.patches.shape[0] for batch in batches)  # patch tokens
            forward_seconds, peak_mib = _forward_pass(settings, encoder, batches)
        del batches
    result.update({"forward_items_per_s": items / forward_seconds, "forward_tokens_per_s": tokens / forward_seconds,
                   "forward_peak_mib": peak_mib, "items": items, "tokens": tokens})
    return result


def _packvit_pass(settings: FilesSettings, checkpoint: Path, folder: Path, paths: list[str], route: str) -> dict:
    """``packvit embed --decode route`` end to end: a warm-up run on the first files, then the timed run on all."""
    from ..embed.run import embed

    work = settings.work_dir
    options = dict(workers=settings.workers, device=str(settings.device), max_num_patches=settings.max_num_patches,
                   token_budget=settings.patch_token_budget, decode=route, overwrite=True, quiet=True)
    warm_list = work / "warm-up.txt"
    warm_list.write_text("\n".join(paths[:WARM_UP_FILES]) + "\n")
    embed(str(checkpoint), warm_list, work / f"out-warm-up-{route}", **options)
    start = time.perf_counter()
    with peak_memory(settings.device) as memory:
        summary = embed(str(checkpoint), folder, work / f"out-{route}", **options)
    call_seconds = time.perf_counter() - start
    stats = summary.stats
    return {"items_per_s": stats.items / stats.wall_s, "tokens_per_s": stats.tokens / stats.wall_s,
            "loop_seconds": stats.wall_s, "call_seconds": call_seconds, "peak_mib": memory.peak_mib,
            "data_wait_share": stats.data_wait_s / stats.wall_s,
            "writer_wait_share": stats.writer_wait_s / stats.wall_s, "workers": stats.workers,
            "gpu_decoded": stats.gpu_decoded, "gpu_fallbacks": stats.gpu_fallbacks,
            "ok": summary.ok, "failed": summary.failed, "output": str(work / f"out-{route}")}


def _stored_pooled(output: Path, paths: list[str]) -> np.ndarray:
    """The pooled embeddings an output folder stores, ``[files, D]`` float32 in the order of ``paths``."""
    import pyarrow.parquet as parquet

    rows, embeddings = [], []
    for metadata in sorted((output / "metadata").glob("metadata_*.parquet")):
        rows += parquet.read_table(metadata, columns=["image_path"]).column("image_path").to_pylist()
        embeddings.append(np.load(output / "img_emb" / metadata.name.replace("metadata", "img_emb").replace(".parquet", ".npy")))
    stored = dict(zip(rows, np.concatenate(embeddings).astype(np.float32)))
    return np.stack([stored[os.path.abspath(path)] for path in paths])


def _cosine(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """Row cosines of two ``[files, D]`` arrays: min and mean."""
    cosine = (ours * theirs).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1))
    return {"min": float(cosine.min()), "mean": float(cosine.mean())}


def _bound(result: dict, route: str) -> str:
    """What limits a route's end-to-end rate: its input pipeline, the forward, or neither."""
    p, f = result["packvit"][route], result["forward_only"]
    feed, forward = f["input_items_per_s"][route], f["forward_items_per_s"]
    ceiling = min(feed, forward)
    limit = (f"its input pipeline ({p['workers']} workers and the main process feed {feed:,.0f} items/s)"
             if feed < forward else f"the forward ({forward:,.0f} items/s)")
    return (f"--decode {route}: bound by {limit}: end to end reaches {p['items_per_s'] / ceiling:.0%} of that; the "
            f"other runs at {max(feed, forward):,.0f} items/s")


def _stage_table(profile: dict) -> list[str]:
    def cell(value):
        return "-" if value is None else f"{value:.3f}"

    lines = []
    for route, stages in (("cpu", CPU_STAGES), ("gpu", GPU_STAGES)):
        if route in profile:
            figures = profile[route]
            known = [value for value in figures.values() if value is not None]
            lines += [f"| {route} route | " + " | ".join(stages) + " | sum |", "|---" * (len(stages) + 2) + "|",
                      f"| ms per file | " + " | ".join(cell(figures[stage]) for stage in stages) + f" | {sum(known):.3f} |",
                      ""]
    lines.append(f"a worker's whole per-file call (processor.resize([path])): {profile['worker_call_ms']:.3f} ms per file")
    return lines


def _table(result: dict) -> str:
    f, b = result["forward_only"], result["transformers"]
    lines = ["| pipeline | items/s | GPU peak MiB |", "|---|---|---|"]
    for route, p in result["packvit"].items():
        lines.append(f"| packvit embed --decode {route}, end to end ({p['workers']} workers) | {p['items_per_s']:,.1f} | "
                     f"{mib(p['peak_mib'])} |")
    lines.append(f"| packvit forward only, same packs on the device | {f['forward_items_per_s']:,.1f} | "
                 f"{mib(f['forward_peak_mib'])} |")
    for route, rate in f["input_items_per_s"].items():
        lines.append(f"| packvit input pipeline only, --decode {route} (workers, then the main process to the "
                     f"device) | {rate:,.1f} | - |")
    lines += [f"| transformers: {b['processor']} + Siglip2VisionModel (sdpa), batches of {BASELINE_BATCH} | "
              f"{b['items_per_s']:,.1f} | {mib(b['peak_mib'])} |", ""]
    if result["gpu_route_left_out"]:
        lines += [f"the GPU route was not run: {result['gpu_route_left_out']}", ""]
    for route, p in result["packvit"].items():
        lines += [
            f"--decode {route}: end to end / forward only {result['end_to_end_share'][route]:.1%} (target >= 85%), "
            f"speed-up over transformers {result['speedup'][route]:.2f}x (target >= 3x), pooled cosine against "
            f"transformers min {result['cosine'][route]['min']:.5f}, mean {result['cosine'][route]['mean']:.5f} "
            f"(target >= 0.999 in bf16); {p['data_wait_share']:.0%} of the time waiting for the workers, "
            f"{p['writer_wait_share']:.0%} on the GPU and writer",
            _bound(result, route),
        ]
        if route == "gpu":
            lines.append(f"--decode gpu: {p['gpu_decoded']} files decoded by nvJPEG, {p['gpu_fallbacks']} by the CPU "
                         f"opener after nvJPEG refused them")
    if "gpu_vs_cpu" in result["cosine"]:
        agreement = result["cosine"]["gpu_vs_cpu"]
        lines.append(f"pooled cosine --decode gpu vs cpu: min {agreement['min']:.6f}, mean {agreement['mean']:.6f} "
                     f"(target >= 0.9999)")
    lines += ["", "per-stage ms per file (one thread; pin and transfer on CUDA only):", ""]
    lines += _stage_table(f["stages_ms_per_file"])
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
    parser.add_argument("--decode", choices=("cpu", "gpu", "both"), default="both",
                        help="the decode routes of packvit embed to run (both: the GPU route where it can run)")
    parser.add_argument("--profile_files", type=arguments.positive_int, default=200,
                        help="files the per-stage profile times")
    parser.add_argument("--repeats", type=arguments.positive_int, default=5, help="timed forward-only passes (median)")
    parser.add_argument("--work_dir", type=arguments.output_folder,
                        default=str(Path(tempfile.gettempdir()) / "packvit-bench-files"),
                        help="folder for the files, checkpoint and outputs (reused by later runs)")
    parser.add_argument("--out", type=arguments.output_folder, default="bench_files_out",
                        help="folder for bench_files.json and bench_files.md")


def run(args: argparse.Namespace) -> int:
    from ..embed.preprocess import ProcessorSpec
    from ..harness import get_adapter

    settings = FilesSettings.from_args(args)
    work = settings.work_dir
    stages = {}
    clock = time.perf_counter()
    paths = write_files(work / "files", settings.num_files, seed=0, processes=max(settings.workers, 1))
    checkpoint = get_adapter("siglip2").cached_random_checkpoint(work / "checkpoints", size=settings.size)
    routes, left_out = _routes(settings, ProcessorSpec(str(checkpoint), "siglip2", True, settings.max_num_patches).build())
    stages["prepare_s"] = time.perf_counter() - clock
    folder = work / "files"
    clock = time.perf_counter()
    baseline = _transformers_pass(settings, checkpoint, paths)
    stages["transformers_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    forward = _pipeline_parts(settings, checkpoint, folder, paths, routes)
    stages["profile_input_and_forward_s"] = time.perf_counter() - clock
    packvit = {}
    for route in routes:
        clock = time.perf_counter()
        packvit[route] = _packvit_pass(settings, checkpoint, folder, paths, route)
        stages[f"packvit_{route}_s"] = time.perf_counter() - clock
    pooled = {route: _stored_pooled(Path(packvit[route]["output"]), paths) for route in routes}
    cosine = {route: _cosine(pooled[route], baseline["pooled"]) for route in routes}
    if len(routes) == 2:
        cosine["gpu_vs_cpu"] = _cosine(pooled["gpu"], pooled["cpu"])
    result = {
        "workload": "files", "num_files": settings.num_files, "size": settings.size, "device": str(settings.device),
        "dtype": str(settings.dtype).replace("torch.", ""), "max_num_patches": settings.max_num_patches,
        "patch_token_budget": settings.patch_token_budget, "workers": settings.workers, "routes": routes,
        "gpu_route_left_out": left_out, "packvit": packvit, "forward_only": forward,
        "transformers": {key: value for key, value in baseline.items() if key != "pooled"},
        "end_to_end_share": {route: packvit[route]["items_per_s"] / forward["forward_items_per_s"] for route in routes},
        "speedup": {route: packvit[route]["items_per_s"] / baseline["items_per_s"] for route in routes},
        "cosine": cosine, "stages_s": stages, "environment": environment(settings.device),
    }
    table = _table(result)
    print_report(table, write_report(settings.out, "bench_files", result, table))
    return 0
