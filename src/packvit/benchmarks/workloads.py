"""The benchmark workloads of ``docs/benchmarks.md``: the patch grids of the random-pixel workloads,
their items, and the JPEG files of the ``files`` workload."""

from __future__ import annotations

import math
import multiprocessing
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..harness import FamilyAdapter

__all__ = ["WORKLOADS", "ONLINE_ITEMS", "MIXED_ITEMS", "UNIFORM_GRIDS", "FULL_SIZES", "size_label", "naflex_grid",
           "workload_grids", "workload_items", "SAMPLE_PHOTOS", "SIDE_RANGE", "file_recipes", "write_files"]

WORKLOADS = ("uniform", "mixed", "mixed-4k", "video", "online")
#: items of ``mixed`` (``online`` takes its first ``ONLINE_ITEMS``, one model call each)
MIXED_ITEMS = 512
ONLINE_ITEMS = 64
UNIFORM_GRIDS = {"siglip2": (16, 16), "dinov3": (14, 14), "aimv2": (16, 16), "llava_vit": (32, 32)}
#: the published size each family's full-size random checkpoint has
FULL_SIZES = {"siglip2": "so400m", "dinov3": "ViT-L", "aimv2": "large native", "llava_vit": "large"}


def size_label(family: str, smoke: bool) -> str:
    """How a report names the size of a family's model: ``tiny`` in a smoke run."""
    return "tiny" if smoke else FULL_SIZES[family]


def naflex_grid(aspect: float, cap: int) -> tuple[int, int]:
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
    """The (t, h, w) grids of a workload, from ``numpy.random.default_rng(0)``; ``num_items``
    replaces the workload's item count (``online``: the first ``num_items`` of ``mixed``)."""
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
        return [(1, h, w)] * (MIXED_ITEMS if num_items is None else num_items)
    if workload in ("mixed", "mixed-4k"):
        count = num_items if num_items is not None else (MIXED_ITEMS if workload == "mixed" else 256)
        low, high = (64, 1024) if workload == "mixed" else (256, 4096)
        aspects = np.exp(rng.uniform(math.log(1 / 3), math.log(3), count))
        caps = np.exp(rng.uniform(math.log(low), math.log(high), count)).astype(int)
        return [(1, *naflex_grid(float(a), int(c))) for a, c in zip(aspects, caps)]
    if workload == "video":
        return [(16, 16, 16)] * (64 if num_items is None else num_items)
    raise ValueError(f"unknown workload {workload!r}; choose from {WORKLOADS}")


def workload_items(adapter: FamilyAdapter, grids: Sequence[tuple[int, int, int]], patch_size: int,
                   device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """Random-normal items for ``grids`` from ``torch.Generator().manual_seed(0)`` (the same in every
    call): images ``[3, H, W]``, videos ``[T, 3, H, W]``, on ``device`` in ``dtype``."""
    generator = torch.Generator().manual_seed(0)
    return [item.to(device=device, dtype=dtype) for item in adapter.random_items(grids, patch_size, generator)]


# --- the `files` workload: JPEGs from scikit-image's photographs ------------------------------------

#: scikit-image's bundled photographs (no download needed)
SAMPLE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field", "immunohistochemistry",
                 "moon", "retina", "rocket")
#: the longer side of a file, in pixels (log-uniform)
SIDE_RANGE = (200, 2000)


def file_recipes(num_files: int, seed: int) -> list[tuple]:
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
    """One file of ``file_recipes``: the crop, rescaled bicubically, saved as a quality-90 JPEG."""
    import skimage.data
    from PIL import Image

    path, (photo, top, left, height, width, side) = job
    image = Image.fromarray(getattr(skimage.data, photo)()[top: top + height, left: left + width]).convert("RGB")
    scale = side / max(height, width)
    image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)
    image.save(path, quality=90)


def write_files(directory: Path, num_files: int, seed: int = 0, processes: int = 1) -> list[str]:
    """The ``files`` workload's JPEGs in ``directory`` (reused when a complete set is there); returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [str(directory / f"{index:06d}.jpg") for index in range(num_files)]
    marker = directory / ".complete"  # hidden: not an input
    if marker.is_file() and marker.read_text() == f"{num_files} {seed}":
        return paths
    jobs = list(zip(paths, file_recipes(num_files, seed)))
    with multiprocessing.Pool(max(1, processes)) as pool:
        pool.map(_write_file, jobs, chunksize=16)
    marker.write_text(f"{num_files} {seed}")
    return paths
