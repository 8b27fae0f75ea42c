"""``EmbedOptions``: the settings of a ``packvit embed`` run, each checked once, here."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch

from .decode import DEFAULT_MAX_PIXELS

__all__ = ["OUTPUT_DTYPES", "DECODE_CHOICES", "AUTO_CPU_ROUTE_WORKERS", "WORKERS_RULE", "EmbedOptions", "default_workers"]

#: the dtypes the embeddings and tokens can be stored in
OUTPUT_DTYPES = ("float16", "float32")
#: where JPEGs are decoded: ``auto`` (by the run's device and workers: ``run.resolve_decode``), the CPU workers, or the GPU
DECODE_CHOICES = ("auto", "cpu", "gpu")
#: ``--decode auto`` takes the GPU route below this many DataLoader workers per process and the
#: CPU route from it on. The `files` benchmark (docs/embed.md, "Speed"; H100, 16 cores, SigLIP2
#: so400m): a CPU-route worker feeds 109 files/s and the run reaches 72% of its input pipeline, about
#: 78 items/s a worker; the GPU route, bound by the main process's device path (0.47 ms a file),
#: reaches 975 items/s whatever the workers; the two break even at 12 workers.
AUTO_CPU_ROUTE_WORKERS = 12


@dataclass(frozen=True)
class EmbedOptions:
    """The settings of a run (the CLI flags of ``packvit embed`` have the same names)."""

    fixed: bool = False
    max_num_patches: int | None = None
    token_budget: int = 32_768
    workers: int | None = None
    dtype: str = "float16"
    normalize: bool = True
    save_tokens: bool = False
    layers: tuple[int, ...] = ()
    shard_size: int = 10_000
    num_frames: int = 16
    path_column: str | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    decode: str = "auto"
    jpeg_draft: float | None = None
    device: str | None = None
    model_dtype: str | None = None
    batch_invariant: bool = False
    overwrite: bool = False
    quiet: bool = False

    def __post_init__(self):
        if self.dtype not in OUTPUT_DTYPES:
            raise ValueError(f"--dtype must be one of {list(OUTPUT_DTYPES)}, got {self.dtype!r}")
        if self.layers and not self.save_tokens:
            raise ValueError("--layers chooses which hidden states --save_tokens writes; add --save_tokens")
        if self.num_frames < 1:
            raise ValueError(f"--num_frames must be at least 1, got {self.num_frames}")
        if self.token_budget < 1:
            raise ValueError(f"--token_budget must be at least 1, got {self.token_budget}")
        if self.shard_size < 1:
            raise ValueError(f"--shard_size must be at least 1, got {self.shard_size}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be 0 (decode in the main process) or more, got {self.workers}")
        if self.decode not in DECODE_CHOICES:
            raise ValueError(f"--decode must be one of {list(DECODE_CHOICES)}, got {self.decode!r}")
        if self.jpeg_draft is not None and (isinstance(self.jpeg_draft, bool) or not isinstance(self.jpeg_draft, (int, float))
                                            or not self.jpeg_draft >= 1):
            raise ValueError(f"--jpeg_draft must be a number of at least 1 (the times the resize target a reduced JPEG "
                             f"decode keeps per side, e.g. 2), got {self.jpeg_draft!r}")
        if self.jpeg_draft is not None and self.decode == "gpu":
            raise ValueError("--jpeg_draft reduces the CPU's JPEG decoding; nvJPEG (--decode gpu) decodes in full: pass "
                             "one of them")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names (and CLI flags)."""
        return tuple(field.name for field in fields(cls))

    @classmethod
    def of(cls, **options) -> "EmbedOptions":
        """The options from keyword arguments (``layers`` as any sequence of ints, or ``None``)."""
        if "layers" in options:
            options["layers"] = tuple(options["layers"] or ())
        return cls(**options)

    @property
    def token_names(self) -> tuple[str, ...]:
        """The token tensors each shard stores: none; ``last_hidden_state`` with ``save_tokens``;
        ``hidden_states.{index}`` for each of ``layers`` with both."""
        if not self.save_tokens:
            return ()
        return ("last_hidden_state",) if not self.layers else tuple(f"hidden_states.{index}" for index in self.layers)


#: the default of ``--workers``, in words (docs/embed.md, "Speed", has the measurements behind it)
WORKERS_RULE = "on CUDA the CPU cores per process less one (at least 1); on the CPU 0, decoding in the main process"


def default_workers(device: torch.device | str, local_world_size: int = 1) -> int:
    """DataLoader workers per process (``WORKERS_RULE``)."""
    if torch.device(device).type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(local_world_size, 1) - 1)
