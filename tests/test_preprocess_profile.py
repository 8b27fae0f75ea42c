"""``scripts/profile_preprocess.py`` times the processor's stages one by one: what those stages
make must be the processor's own output, or the per-stage figures describe another computation."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "profile_preprocess.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("profile_preprocess", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory, script):
    pytest.importorskip("skimage")
    return script.write_files(tmp_path_factory.mktemp("files"), 4, processes=1)


def test_the_profiled_stages_are_the_processors_computation(script, files):
    for label, _, build in script.PROCESSORS:
        processor = build()
        for path in files:
            times, batch = script._stage_times(processor, path)
            expected = processor([path])
            assert len(times) == len(script.STAGES) and min(times) >= 0
            assert torch.equal(batch.patches, expected.patches) and torch.equal(batch.grid_thw, expected.grid_thw), label
