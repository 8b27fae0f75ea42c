"""Fixtures shared by the test modules."""

import os
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def checkpoint_root():
    """Where the GPU tests keep their random checkpoints: ``$PACKVIT_CKPT_DIR`` (reused across
    calls of ``scripts/gpu_check.sh``), else a temporary directory."""
    root = os.environ.get("PACKVIT_CKPT_DIR")
    if root:
        yield Path(root)
    else:
        with tempfile.TemporaryDirectory(prefix="packvit-gpu-") as scratch:
            yield Path(scratch)
