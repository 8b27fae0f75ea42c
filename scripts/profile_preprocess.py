"""Per-stage cost of the CPU preprocessing path, per file, on the ``files`` workload's JPEGs.

    PYTHONPATH=src python scripts/profile_preprocess.py [--num_files 200] [--repeats 3]
        [--families siglip2,onevision,aimv2,dinov3] [--jpeg_draft 2] [--effect]

Writes (or reuses) ``--num_files`` JPEGs as the ``files`` benchmark does (scikit-image photographs,
random crops and rescales, longer side log-uniform in 200-2,000 px, quality 90) and times, on one
thread, each stage of every file through each processor: read (the file's bytes), decode (Pillow),
EXIF (orientation), convert (RGB, and for the torch backend the pixels as a tensor), resize (uint8
resize and crop; DINOv3: its pixels into the flat stage-1 buffer), patchify (uint8) and normalise
(stage 2; DINOv3: rescale, resize and normalise, as its reference orders them), then the whole
``processor([path])`` call. Each figure is the mean over files of the fastest of ``--repeats``
runs per file (the minimum sheds other processes' interference). ``--jpeg_draft K`` times the
processors with ``jpeg_draft=K`` as well; ``--effect`` then measures what it changes: the
normalised values against the full decode, and the pooled-embedding cosine on a random tiny model
of the family (transformers needed to write it). ``--device_path`` measures the device path
(``processor.on_device``, run on the CPU) on the decoded files against the processor the same way.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from packvit.benchmarks.workloads import write_files
from packvit.packing import patchify
from packvit.preprocess.aimv2 import AIMv2Processor
from packvit.preprocess.common import rgb_pixels
from packvit.preprocess.dinov3 import DINOv3Processor
from packvit.preprocess.llava_vit import LlavaViTProcessor
from packvit.preprocess.processor import draft_scale
from packvit.preprocess.siglip2 import Siglip2Processor

STAGES = ("read", "decode", "exif", "convert", "resize", "patchify", "normalize")
#: (label, family for --families and the random model, processor settings)
PROCESSORS = (
    ("siglip2 torch 256", "siglip2", lambda **s: Siglip2Processor(max_num_patches=256, **s)),
    ("siglip2 pil 256", "siglip2", lambda **s: Siglip2Processor(max_num_patches=256, backend="pil", **s)),
    ("onevision pil 448", "onevision", lambda **s: LlavaViTProcessor(**s)),
    ("onevision native 1024", "onevision", lambda **s: LlavaViTProcessor(native=True, **s)),
    ("aimv2 pil 224", "aimv2", lambda **s: AIMv2Processor(image_size=224, **s)),
    ("dinov3 224", "dinov3", lambda **s: DINOv3Processor(**s)),
    ("dinov3 native 1024", "dinov3", lambda **s: DINOv3Processor(native=True, **s)),
)
MODEL_FAMILY = {"siglip2": "siglip2", "onevision": "llava_vit", "aimv2": "aimv2", "dinov3": "dinov3"}


def _stage_times(processor, path: str) -> tuple[list[float], object]:
    """Seconds of each of ``STAGES`` for one file (one run), and the batch the stages made (the
    processor's own output: tests/test_preprocess_profile.py checks it)."""
    native = bool(processor.native) or processor.family == "siglip2"
    cap, backend = processor.max_num_patches, processor.backend
    target = lambda height, width: processor.target_size(height, width, native, cap)  # noqa: E731
    ticks = [time.perf_counter()]
    with open(path, "rb") as handle:
        data = handle.read()
    ticks.append(time.perf_counter())
    image = Image.open(io.BytesIO(data))
    if processor.jpeg_draft is not None:
        scale = draft_scale(image.height, image.width, target, processor.jpeg_draft)  # the files carry no rotation
        if scale > 1:
            image.draft(image.mode, (image.width // scale, image.height // scale))
    image.load()
    ticks.append(time.perf_counter())
    ImageOps.exif_transpose(image, in_place=True)
    ticks.append(time.perf_counter())
    rgb = rgb_pixels(image, backend)
    if backend == "torch":
        rgb.hwc()
    ticks.append(time.perf_counter())
    if processor.family == "dinov3":
        pixels = processor.resize_items([rgb.pil()], [], native, cap, backend)
        ticks += [time.perf_counter()] * 2
    else:
        item = processor.resize_image(rgb, native, cap, backend)
        ticks.append(time.perf_counter())
        patches, grid_thw = patchify([item], processor.patch_size, processor.patch_layout)
        pixels = processor.pixel_batch(patches, grid_thw, backend)
        ticks.append(time.perf_counter())
    batch = pixels.normalize()
    ticks.append(time.perf_counter())
    return np.diff(ticks).tolist(), batch


def profile(processor, paths: list[str], repeats: int) -> dict:
    """Mean over files of the fastest run, per stage and for the whole call, in ms."""
    stages = np.full((len(paths), len(STAGES)), np.inf)
    whole = np.full(len(paths), np.inf)
    for _ in range(repeats):
        for index, path in enumerate(paths):
            stages[index] = np.minimum(stages[index], _stage_times(processor, path)[0])
            start = time.perf_counter()
            processor([path])
            whole[index] = min(whole[index], time.perf_counter() - start)
    return {"stages": dict(zip(STAGES, (1e3 * stages.mean(axis=0)).tolist())), "call": 1e3 * whole.mean()}


def _random_model(family: str, root: Path):
    import packvit
    from packvit.harness import get_adapter

    path = get_adapter(MODEL_FAMILY[family]).write_random_checkpoint(root / family, size="tiny")
    return packvit.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.inference_mode()
def effect(processor, drafted, paths: list[str], model) -> dict:
    """What ``jpeg_draft`` changes: normalised values (max and mean |difference|, the fraction that
    differ) and the pooled cosine of a random model, each file against its full decode."""
    differences, cosines, reduced = [], [], 0
    for path in paths:
        full, draft = processor([path]), drafted([path])
        assert torch.equal(full.grid_thw, draft.grid_thw), path
        differences.append((draft.patches - full.patches).abs())
        pooled = [model(batch).pooler_output.flatten() for batch in (full, draft)]
        cosines.append(torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=0).item())
        with Image.open(path) as image:
            reduced += draft_scale(image.height, image.width, lambda h, w: processor.target_size(
                h, w, bool(processor.native) or processor.family == "siglip2", processor.max_num_patches),
                drafted.jpeg_draft) > 1
    values = torch.cat([d.flatten() for d in differences])
    return {"files_reduced": reduced / len(paths), "max_abs": values.max().item(), "mean_abs": values.mean().item(),
            "differing": (values > 0).float().mean().item(), "pooled_cosine_min": min(cosines),
            "pooled_cosine_mean": statistics.fmean(cosines)}


@torch.inference_mode()
def device_agreement(processor, paths: list[str], model) -> dict:
    """The device path (``processor.on_device``, run here on the CPU) on the decoded files against
    the processor on the files: uint8 levels of the pixels and the pooled cosine of a random model."""
    keeps_aspect, cap, backend = processor._options(None, None, None)
    levels, cosines = [], []
    for path in paths:
        image = rgb_pixels(path, backend).chw()  # uint8 [3, H, W], as GPU decoding returns it
        reference = processor.resize([path])
        pixels = processor.resize_device_images([image], keeps_aspect, cap, backend)
        assert torch.equal(pixels.grid_thw, reference.grid_thw), path
        if pixels.source_sizes is None:
            levels.append((pixels.pixels.int() - reference.pixels.int()).abs().flatten())
        pooled = [model(processor.normalize(batch)).pooler_output.flatten() for batch in (reference, pixels)]
        cosines.append(torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=0).item())
    result = {"pooled_cosine_min": min(cosines), "pooled_cosine_mean": statistics.fmean(cosines)}
    if levels:
        values = torch.cat(levels)
        result.update(max_levels=values.max().item(), differing=(values > 0).float().mean().item())
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_files", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--files_dir", default=str(Path(tempfile.gettempdir()) / "packvit-profile-files"))
    parser.add_argument("--families", default="siglip2,onevision,aimv2,dinov3")
    parser.add_argument("--jpeg_draft", type=float, default=None)
    parser.add_argument("--effect", action="store_true")
    parser.add_argument("--device_path", action="store_true", help="the device path's agreement with the processor")
    parser.add_argument("--no_timing", action="store_true", help="only --effect and --device_path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    paths = write_files(Path(args.files_dir), args.num_files, processes=2)
    families = set(args.families.split(","))
    print(f"{len(paths)} files, fastest of {args.repeats} runs per file, ms per file on one thread")
    if not args.no_timing:
        print(f"{'processor':32s} " + " ".join(f"{stage:>9s}" for stage in STAGES) + f" {'sum':>7s} {'call':>7s}")
    models = {}
    with tempfile.TemporaryDirectory() as root:
        for label, family, make in PROCESSORS:
            if family not in families:
                continue
            settings = [("", {})] + ([(f" jpeg_draft={args.jpeg_draft:g}", {"jpeg_draft": args.jpeg_draft})]
                                     if args.jpeg_draft is not None else [])
            for suffix, options in settings if not args.no_timing else []:
                result = profile(make(**options), paths, args.repeats)
                times = result["stages"]
                print(f"{label + suffix:32s} " + " ".join(f"{times[stage]:9.2f}" for stage in STAGES)
                      + f" {sum(times.values()):7.2f} {result['call']:7.2f}")
            if (args.effect and args.jpeg_draft is not None or args.device_path) and family not in models:
                models[family] = _random_model(family, Path(root))
            if args.effect and args.jpeg_draft is not None:
                change = effect(make(), make(jpeg_draft=args.jpeg_draft), paths, models[family])
                print(f"{label:32s} jpeg_draft={args.jpeg_draft:g}: " + ", ".join(
                    f"{key} {value:.8g}" for key, value in change.items()))
            if args.device_path:
                agreement = device_agreement(make(), paths, models[family])
                print(f"{label:32s} device path: " + ", ".join(f"{key} {value:.8g}" for key, value in agreement.items()))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
