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

from . import arguments
from .harness import FAMILIES, FamilyAdapter, ItemOutput, get_adapter
from .metrics import compute_similarity_metrics

__all__ = ["ScenarioResult", "AlignSettings", "align_family", "add_arguments", "run", "main"]

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


def _read_photographs(image_dir: Path) -> tuple:
    """Every image file of ``image_dir``, decoded to RGB; ``ValueError`` naming a file that does not decode."""
    from PIL import Image

    files = sorted(p for p in image_dir.iterdir() if p.is_file())
    paths = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not paths:
        raise ValueError(f"--image_dir {image_dir} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    if len(paths) < len(files):
        print(f"--image_dir {image_dir}: {len(paths)} images, {len(files) - len(paths)} other files left out",
              file=sys.stderr)
    photographs = []
    for path in paths:
        try:
            with Image.open(path) as image:
                photographs.append(image.convert("RGB"))
        except (OSError, Image.DecompressionBombError) as error:
            raise ValueError(f"--image_dir: {path} is not an image Pillow can read ({error}); "
                             f"remove or replace it") from error
    return tuple(photographs)


def _photographs(image_dir: Path | None, use_real_images: bool | None) -> tuple | None:
    """The real-images scenario's photographs: ``image_dir``'s, else scikit-image's; ``None`` for no
    such scenario (turned off, or neither source available when not asked for)."""
    from PIL import Image

    if use_real_images is False:
        if image_dir is not None:
            raise ValueError("--image_dir gives the photographs of the real-images scenario, which "
                             "--no-use_real_images turns off; drop one of the two")
        return None
    if image_dir is not None:
        return _read_photographs(image_dir)
    if not _has_skimage():
        if use_real_images:
            raise ValueError("--use_real_images needs --image_dir or scikit-image installed (pip install scikit-image)")
        return None
    from skimage import data

    return tuple(Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("astronaut", "chelsea", "coffee", "rocket"))


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


@dataclass(frozen=True)
class AlignSettings:
    """What ``packvit align`` compares, checked before anything runs (``from_args``)."""

    families: tuple[str, ...]
    device: torch.device
    #: a local checkpoint directory (a hub id already fetched), or None for a random checkpoint of ``size``
    checkpoint: Path | None = None
    size: str = "tiny"
    batch_size: int = 4
    #: pixel sides of the same-size scenarios; empty: each family's own grids
    image_sizes: tuple[int, ...] = ()
    #: float32 bound on max |diff|; None: 1e-5 for a tiny random checkpoint, 1e-4 otherwise
    threshold: float | None = None
    cosine_threshold: float = 0.999
    #: the real-images scenario's photographs (RGB images), or None for no such scenario
    photographs: tuple | None = None
    json: Path | None = None
    #: also compare packvit's FP8 model (``dtype="fp8"``) against the reference (bf16 on CUDA, float32 on the CPU)
    fp8: bool = False
    #: FP8 bound on mean token and pooled cosine; None: 0.997 for a tiny random checkpoint, 0.999 otherwise
    fp8_threshold: float | None = None

    @property
    def float32_threshold(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return 1e-5 if self.checkpoint is None and self.size == "tiny" else 1e-4

    @property
    def fp8_cosine_threshold(self) -> float:
        if self.fp8_threshold is not None:
            return self.fp8_threshold
        return 0.997 if self.checkpoint is None and self.size == "tiny" else 0.999

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AlignSettings:
        """The settings of a command line; ``ValueError`` for a checkpoint, family or image folder that
        cannot be used (a hub id is fetched here)."""
        from .checkpoint import read_config_dict, resolve_checkpoint
        from .models.registry import family_of, normalize_family

        families = tuple(dict.fromkeys(normalize_family(name) for name in args.models))
        checkpoint = None
        if args.ckpt is not None:
            if args.size is not None:
                raise ValueError("--size chooses the random checkpoint written when no --ckpt is given; drop one of the two")
            checkpoint = resolve_checkpoint(args.ckpt)
            family = family_of(read_config_dict(checkpoint), f"--ckpt {args.ckpt}")
            if families and families != (family,):
                raise ValueError(f"--ckpt {args.ckpt} is one {family} checkpoint; name {family} alone with it "
                                 f"(or no family), not {', '.join(families)}")
            families = (family,)
        if args.fp8_threshold is not None and not args.fp8:
            raise ValueError("--fp8_threshold bounds the FP8 comparison, which runs with --fp8; add --fp8 or drop it")
        device = arguments.device_or_default(args.device)
        return cls(families=families or FAMILIES, device=device, checkpoint=checkpoint, size=args.size or "tiny",
                   batch_size=args.batch_size, image_sizes=tuple(args.image_size or ()), threshold=args.threshold,
                   cosine_threshold=args.cosine_threshold, photographs=_photographs(args.image_dir, args.use_real_images),
                   json=args.json, fp8=args.fp8, fp8_threshold=args.fp8_threshold)


def _scenarios(adapter: FamilyAdapter, ckpt, patch_size: int, settings: AlignSettings) -> list[tuple[str, list[torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    scenarios = []
    if settings.image_sizes and min(settings.image_sizes) < patch_size:
        raise ValueError(f"--image_size {min(settings.image_sizes)} is smaller than one {patch_size}-pixel patch of {adapter.name}")
    grids = [(s // patch_size, s // patch_size) for s in settings.image_sizes] if settings.image_sizes else adapter.default_grids
    for h, w in grids:
        scenarios.append((f"same-size {h}x{w} x{settings.batch_size}",
                          adapter.random_items([(h, w)] * settings.batch_size, patch_size, generator)))
    scenarios.append(("mixed-resolution pack", adapter.random_items(MIXED_GRIDS, patch_size, generator)))
    if settings.photographs is not None:
        scenarios.append(("real images", adapter.preprocess(ckpt, settings.photographs)))
    rng = np.random.default_rng(0)
    random_grids = [tuple(int(x) for x in rng.integers(1, 41, size=2)) for _ in range(10)]
    scenarios.append(("ten random sizes", adapter.random_items(random_grids, patch_size, generator)))
    scenarios.extend(adapter.extra_scenarios(patch_size, generator))
    return scenarios


def align_family(name: str, settings: AlignSettings) -> list[ScenarioResult]:
    """Runs every scenario for one family, in each precision the device calls for."""
    adapter = get_adapter(name)
    device = settings.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory(prefix=f"packvit-align-{name}-") as scratch:
        ckpt = settings.checkpoint or adapter.write_random_checkpoint(Path(scratch), size=settings.size, seed=0)
        # (name, reference dtype, packed dtype, packed attention backend)
        precisions = [("float32", torch.float32, torch.float32, "reference")]
        if device.type == "cuda":
            precisions.insert(0, ("bfloat16", torch.bfloat16, torch.bfloat16, None))
        if settings.fp8:
            precisions.append(("fp8", torch.bfloat16 if device.type == "cuda" else torch.float32, "fp8", None))
        results = []
        for precision, dtype, packed_dtype, backend in precisions:
            reference = adapter.load_reference(ckpt, device, dtype)
            packed = adapter.load_packed(ckpt, device, packed_dtype)
            with packed.runtime(attention_backend=backend):
                for scenario, items in _scenarios(adapter, ckpt, packed.patch_size, settings):
                    items = [item.to(device=device, dtype=dtype) for item in items]
                    with torch.inference_mode():
                        ref_out = adapter.run_reference(reference, items, settings.batch_size)
                        packed_out = adapter.run_packed(packed, items)
                    cosine = settings.fp8_cosine_threshold if precision == "fp8" else settings.cosine_threshold
                    result = _compare(name, precision, scenario, ref_out, packed_out, settings.float32_threshold, cosine)
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", help=f"families to check (default: all of {', '.join(FAMILIES)}; "
                                                  f"with --ckpt: the checkpoint's)")
    parser.add_argument("--ckpt", help="checkpoint directory or hub id (default: a small random checkpoint written locally)")
    parser.add_argument("--device", type=arguments.device, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--batch_size", type=arguments.positive_int, default=4,
                        help="items per same-size scenario and per reference batch")
    parser.add_argument("--image_size", type=arguments.positive_int, nargs="*",
                        help="pixel sides of the same-size scenarios (default: per family)")
    parser.add_argument("--threshold", type=float, help="float32 pass bound on max |diff| (default 1e-5 small random, 1e-4 real checkpoints)")
    parser.add_argument("--cosine_threshold", type=float, default=0.999, help="bf16 pass bound on mean token and pooled cosine")
    parser.add_argument("--use_real_images", action=argparse.BooleanOptionalAction, default=None,
                        help="add a scenario of real photographs (from --image_dir, else scikit-image's; "
                             "default: when either is available)")
    parser.add_argument("--image_dir", type=arguments.input_folder, help="folder of images for the real-images scenario")
    parser.add_argument("--size", choices=("tiny", "full"),
                        help="size of the random checkpoint when no --ckpt is given (default: tiny)")
    parser.add_argument("--json", type=arguments.output_file, help="write every result to this JSON file")
    parser.add_argument("--fp8", action="store_true",
                        help="also compare packvit's FP8 model (dtype='fp8') against the reference: bf16 on CUDA "
                             "(compute capability 8.9 or later), float32 on the CPU")
    parser.add_argument("--fp8_threshold", type=float,
                        help="FP8 pass bound on mean token and pooled cosine (default 0.997 small random, 0.999 real "
                             "and full-size checkpoints)")


def run(args: argparse.Namespace) -> int:
    settings = AlignSettings.from_args(args)
    results = []
    for name in settings.families:
        results.extend(align_family(name, settings))
    failed = [r for r in results if not r.passed]
    print(f"\nsummary: {len(results) - len(failed)} passed, {len(failed)} failed "
          f"({len(settings.families)} families: {', '.join(settings.families)})")
    for r in failed:
        print(f"  FAILED {r.family} {r.precision} {r.scenario}: {r.criterion} "
              f"(max {r.max_diff:.2e}, mean cos {r.mean_cosine:.6f})")
    if settings.json is not None:
        settings.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 1 if failed else 0


def main(argv=None) -> int:
    """``python -m packvit.align``: ``packvit align`` on its own."""
    parser = argparse.ArgumentParser(prog="packvit align", description="Parity of packed models against their references.")
    add_arguments(parser)
    return arguments.run_command("align", run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
