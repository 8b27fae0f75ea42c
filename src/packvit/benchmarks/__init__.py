"""packvit's measurements against the references: ``packvit bench --suite inference|training|files|vlm``.

The workloads, baselines and figures are defined in ``docs/benchmarks.md``. ``common`` measures
what every suite measures the same way (device sync, timing, call latencies, peak memory, the
GEMM rate, the environment block, the report files) and ``workloads`` builds the inputs; each
suite is one module with ``add_arguments(parser)`` and ``run(args) -> int``:

- ``inference``: forward throughput, memory and online latency of every family (the default suite);
- ``training``: forward + backward speed, memory and gradient agreement;
- ``files``: ``packvit embed`` end to end on JPEG files against a transformers pipeline;
- ``vlm``: LFM2-VL's image path with transformers' SigLIP2 tower and with packvit's.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["SUITES", "suite"]

SUITES = ("inference", "training", "files", "vlm")


def suite(name: str) -> ModuleType:
    """The module of a suite of ``SUITES``."""
    if name not in SUITES:
        raise ValueError(f"unknown benchmark suite {name!r}; choose from {SUITES}")
    return importlib.import_module(f"{__name__}.{name}")
