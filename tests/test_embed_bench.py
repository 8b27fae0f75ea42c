"""The ``files`` benchmark (``packvit bench --suite files``) with a tiny model on a few files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from packvit import cli
from packvit.benchmarks.files import CPU_STAGES, GPU_STAGES
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
                     "--repeats", "1", "--profile_files", "8", "--work_dir", str(tmp_path / "work"),
                     "--out", str(tmp_path / "out")])
    assert code == 0
    result = json.loads((tmp_path / "out" / "bench_files.json").read_text())
    assert result["routes"] == ["cpu"] and "not a CUDA device" in result["gpu_route_left_out"]
    packvit = result["packvit"]["cpu"]
    assert packvit["ok"] == 16 and packvit["failed"] == 0 and packvit["gpu_decoded"] == 0
    assert result["forward_only"]["items"] == 16
    for figure in (packvit["items_per_s"], result["forward_only"]["forward_items_per_s"],
                   result["forward_only"]["input_items_per_s"]["cpu"], result["transformers"]["items_per_s"]):
        assert figure > 0
    assert np.isclose(result["speedup"]["cpu"], packvit["items_per_s"] / result["transformers"]["items_per_s"])
    assert result["cosine"]["cpu"]["min"] > 0.9999, "float32 on the CPU: the two pipelines give the same embeddings"
    stages = result["forward_only"]["stages_ms_per_file"]
    assert set(stages["cpu"]) == set(CPU_STAGES) and stages["cpu"]["pin"] is None and stages["cpu"]["transfer"] is None
    assert all(stages["cpu"][stage] > 0 for stage in ("read", "decode", "resize", "patchify", "pack", "normalize"))
    assert stages["worker_call_ms"] > stages["cpu"]["decode"], "a worker's call decodes and resizes"
    table = capsys.readouterr().out
    assert "end to end / forward only" in table and "speed-up over transformers" in table and "the GPU route was not run" in table
    assert "| cpu route | read | decode | exif |" in table
    assert (tmp_path / "out" / "bench_files.md").read_text().strip() == table.strip()


def test_the_gpu_route_stages_run_with_a_stand_in_decoder(tmp_path, monkeypatch):
    from packvit.benchmarks import files as bench_files
    from packvit.embed import gpu_decode
    from packvit.preprocess.siglip2 import Siglip2Processor
    from test_embed_support import pil_stand_in

    monkeypatch.setattr(gpu_decode, "nvjpeg_decode", pil_stand_in)
    paths = write_files(tmp_path / "files", 6, seed=0)
    settings = bench_files.FilesSettings(device=torch.device("cpu"), workers=0, work_dir=tmp_path, out=tmp_path,
                                         size="tiny", patch_token_budget=512, profile_files=6)
    stages = bench_files._gpu_stages(Siglip2Processor(max_num_patches=256), paths, settings)
    assert set(stages) == set(GPU_STAGES) and all(value > 0 for value in stages.values())
