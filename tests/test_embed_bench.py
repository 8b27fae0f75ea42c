"""The ``files`` benchmark (``packvit bench --suite files``) with a tiny model on a few files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from packvit import cli
from packvit.benchmarks.workloads import SIDE_RANGE, write_files

pytest.importorskip("transformers")
pytest.importorskip("skimage")
pytest.importorskip("pyarrow")


def test_files_are_deterministic_jpegs_in_the_size_range(tmp_path):
    first = write_files(tmp_path / "a", 12, seed=0)
    second = write_files(tmp_path / "b", 12, seed=0)
    sizes = []
    for a, b in zip(first, second):
        assert open(a, "rb").read() == open(b, "rb").read()
        with Image.open(a) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            sizes.append(max(image.size))
    assert SIDE_RANGE[0] <= min(sizes) and max(sizes) <= SIDE_RANGE[1] and len(set(sizes)) > 6


def test_bench_reports_every_figure_and_the_pipelines_agree(tmp_path, capsys):
    code = cli.main(["bench", "--suite", "files", "--size", "tiny", "--num_files", "16", "--device", "cpu", "--workers", "1",
                     "--repeats", "1", "--work_dir", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert code == 0
    result = json.loads((tmp_path / "out" / "bench_files.json").read_text())
    assert result["packvit"]["ok"] == 16 and result["packvit"]["failed"] == 0
    assert result["forward_only"]["items"] == 16
    for figure in (result["packvit"]["items_per_s"], result["forward_only"]["forward_items_per_s"],
                   result["forward_only"]["input_items_per_s"], result["transformers"]["items_per_s"]):
        assert figure > 0
    assert np.isclose(result["speedup"], result["packvit"]["items_per_s"] / result["transformers"]["items_per_s"])
    assert result["cosine"]["min"] > 0.9999, "float32 on the CPU: the two pipelines give the same embeddings"
    table = capsys.readouterr().out
    assert "end to end / forward only" in table and "speed-up over transformers" in table
    assert (tmp_path / "out" / "bench_files.md").read_text().strip() == table.strip()
