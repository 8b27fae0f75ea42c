"""``packvit align``: measured parity of every packed model against its reference implementation.

For each model family it loads the reference and the packed model from one checkpoint (by
default a small random one written with the reference library's ``save_pretrained`` and loaded
back through packvit's real loading path), runs both on the same items, and reports max/mean
absolute difference, min/mean/max per-token cosine and pooled-output cosine per scenario:
same-size batches, one mixed-resolution pack, real photographs, ten random sizes, and the
family's own extras (videos). On the CPU it compares in float32; on CUDA in bf16 (default
kernels) and in float32 through the reference attention path. Exit status 1 if any scenario
fails.

    packvit align                      # every family, small random checkpoints
    packvit align siglip2 --ckpt google/siglip2-so400m-patch16-naflex --device cuda
    python -m packvit.align dinov3 --image_size 224 448 --batch_size 4
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import compute_similarity_metrics
from .harness import FAMILIES, FamilyAdapter, ItemOutput, get_adapter

__all__ = ["ScenarioResult", "align_family", "positive_int", "add_arguments", "run", "main"]

MIXED_GRIDS = ((1, 1), (1, 37), (23, 2), (16, 16), (7, 13), (30, 9))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class ScenarioResult:
    family: str
    precision: str
    scenario: str
    items: int
    tokens: int
    max_diff: float
    mean_diff: float
    min_cosine: float
    mean_cosine: float
    max_cosine: float
    pooled_cosine: float | None
    passed: bool
    criterion: str = field(default="")


def _real_photographs(image_dir: str | None) -> list:
    """Photographs from ``image_dir``, else the ones scikit-image ships."""
    from PIL import Image

    if image_dir:
        paths = sorted(p for p in Path(image_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ValueError(f"--image_dir {image_dir} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return [Image.open(p).convert("RGB") for p in paths]
    try:
        from skimage import data
    except ImportError as error:
        raise ValueError("real images need --image_dir or scikit-image installed (pip install scikit-image)") from error
    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("astronaut", "chelsea", "coffee", "rocket")]


def _has_skimage() -> bool:
    return importlib.util.find_spec("skimage") is not None


def _compare(family, precision, scenario, reference: list[ItemOutput], packed: list[ItemOutput], threshold, cosine_threshold):
    tokens_ref = torch.cat([r.tokens.float().cpu() for r in reference])
    tokens_packed = torch.cat([p.tokens.float().cpu() for p in packed])
    metrics = compute_similarity_metrics(tokens_packed, tokens_ref)
    pooled_cosine = None
    if reference[0].pooled is not None:
        pooled_ref = torch.stack([r.pooled.float().cpu() for r in reference])
        pooled_packed = torch.stack([p.pooled.float().cpu() for p in packed])
        pooled_cosine = F.cosine_similarity(pooled_packed, pooled_ref, dim=-1).min().item()
        pooled_max_diff = (pooled_packed - pooled_ref).abs().max().item()
        metrics["max_diff"] = max(metrics["max_diff"], pooled_max_diff)
    if precision == "float32":
        passed, criterion = metrics["max_diff"] <= threshold, f"max |diff| <= {threshold:g}"
    else:
        passed = metrics["mean_cosine"] >= cosine_threshold and (pooled_cosine is None or pooled_cosine >= cosine_threshold)
        criterion = f"mean and pooled cosine >= {cosine_threshold:g}"
    return ScenarioResult(family, precision, scenario, len(reference), tokens_ref.shape[0], pooled_cosine=pooled_cosine,
                          passed=passed, criterion=criterion, **metrics)


def _scenarios(adapter: FamilyAdapter, ckpt, patch_size: int, args) -> list[tuple[str, list[torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    scenarios = []
    if args.image_size and min(args.image_size) < patch_size:
        raise ValueError(f"--image_size {min(args.image_size)} is smaller than one {patch_size}-pixel patch of {adapter.name}")
    grids = [(s // patch_size, s // patch_size) for s in args.image_size] if args.image_size else adapter.default_grids
    for h, w in grids:
        scenarios.append((f"same-size {h}x{w} x{args.batch_size}", adapter.random_items([(h, w)] * args.batch_size, patch_size, generator)))
    scenarios.append(("mixed-resolution pack", adapter.random_items(MIXED_GRIDS, patch_size, generator)))
    if args.image_dir or args.use_real_images or (args.use_real_images is None and _has_skimage()):
        scenarios.append(("real images", adapter.preprocess(ckpt, _real_photographs(args.image_dir))))
    rng = np.random.default_rng(0)
    random_grids = [tuple(int(x) for x in rng.integers(1, 41, size=2)) for _ in range(10)]
    scenarios.append(("ten random sizes", adapter.random_items(random_grids, patch_size, generator)))
    scenarios.extend(adapter.extra_scenarios(patch_size, generator))
    return scenarios


def align_family(name: str, args) -> list[ScenarioResult]:
    """Runs every scenario for one family, in each precision the device calls for."""
    adapter = get_adapter(name)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory(prefix=f"packvit-align-{name}-") as scratch:
        ckpt = args.ckpt or adapter.write_random_checkpoint(Path(scratch), size=args.size, seed=0)
        threshold = args.threshold if args.threshold is not None else (1e-4 if args.ckpt or args.size != "tiny" else 1e-5)
        precisions = [("float32", torch.float32, "reference")]
        if device.type == "cuda":
            precisions.insert(0, ("bfloat16", torch.bfloat16, None))
        results = []
        for precision, dtype, backend in precisions:
            reference = adapter.load_reference(ckpt, device, dtype)
            packed = adapter.load_packed(ckpt, device, dtype)
            packed.attention_backend = backend
            for scenario, items in _scenarios(adapter, ckpt, packed.patch_size, args):
                items = [item.to(device=device, dtype=dtype) for item in items]
                with torch.inference_mode():
                    ref_out = adapter.run_reference(reference, items, args.batch_size)
                    packed_out = adapter.run_packed(packed, items)
                result = _compare(name, precision, scenario, ref_out, packed_out, threshold, args.cosine_threshold)
                results.append(result)
                _print_row(result)
            del reference, packed
        return results


def _print_row(r: ScenarioResult) -> None:
    pooled = f"{r.pooled_cosine:.6f}" if r.pooled_cosine is not None else "   -    "
    print(
        f"{'PASS' if r.passed else 'FAIL'}  {r.family:9s} {r.precision:8s} {r.scenario:28s} items {r.items:3d} "
        f"tokens {r.tokens:6d}  max {r.max_diff:.2e}  mean {r.mean_diff:.2e}  cos min/mean/max "
        f"{r.min_cosine:.6f}/{r.mean_cosine:.6f}/{r.max_cosine:.6f}  pooled {pooled}",
        flush=True,
    )


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", help=f"families to check (default: all of {', '.join(FAMILIES)})")
    parser.add_argument("--ckpt", help="checkpoint directory or hub id (default: a small random checkpoint written locally)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch_size", type=positive_int, default=4, help="items per same-size scenario and per reference batch")
    parser.add_argument("--image_size", type=positive_int, nargs="*", help="pixel sides of the same-size scenarios (default: per family)")
    parser.add_argument("--threshold", type=float, help="float32 pass bound on max |diff| (default 1e-5 small random, 1e-4 real checkpoints)")
    parser.add_argument("--cosine_threshold", type=float, default=0.999, help="bf16 pass bound on mean token and pooled cosine")
    parser.add_argument("--use_real_images", action=argparse.BooleanOptionalAction, default=None,
                        help="add a scenario of real photographs (from --image_dir, else scikit-image's; "
                             "default: when either is available)")
    parser.add_argument("--image_dir", help="directory of images for the real-images scenario")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny", help="size of the random checkpoint when no --ckpt is given")
    parser.add_argument("--json", help="write every result to this JSON file")


def run(args) -> int:
    models = [m.replace("-", "_").lower() for m in args.models] or list(FAMILIES)
    if args.ckpt and len(models) != 1:
        raise SystemExit("--ckpt names one checkpoint: name exactly one model family with it")
    results = []
    for name in models:
        results.extend(align_family(name, args))
    failed = [r for r in results if not r.passed]
    print(f"\nsummary: {len(results) - len(failed)} passed, {len(failed)} failed "
          f"({len(models)} families: {', '.join(models)})")
    for r in failed:
        print(f"  FAILED {r.family} {r.precision} {r.scenario}: {r.criterion} "
              f"(max {r.max_diff:.2e}, mean cos {r.mean_cosine:.6f})")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="packvit align", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
