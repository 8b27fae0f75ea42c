"""``packvit bench --suite training --smoke``: tiny models on the CPU, every figure in the JSON."""

import json

import pytest
import torch

from family_helpers import require_references
from packvit import cli
from packvit.benchmarks import training
from packvit.benchmarks.common import forward_flops, model_shape
from packvit.benchmarks.workloads import workload_grids
from packvit.harness import get_adapter



def test_smoke_run_writes_every_figure(tmp_path, capsys, monkeypatch):
    require_references("siglip2", "dinov3")
    monkeypatch.setattr(training, "gemm_tflops", lambda device: 1.0)  # a known ceiling for the MFU (NaN off CUDA)
    out = tmp_path / "train"
    arguments = ["--smoke", "--items", "3", "--repeats", "1", "--out", str(out), "--ckpt_dir", str(tmp_path / "ckpts")]
    assert cli.main(["bench", "--suite", "training", *arguments]) == 0
    report = json.loads((out / "train_bench.json").read_text())
    rows = {row["model"]: row for row in report["results"]}
    assert sorted(rows) == ["dinov3", "siglip2"]
    for family, row in rows.items():
        assert row["items"] == 3 and row["tokens"] > 0 and row["packs"] == 1
        assert row["reference_batches"] == (1 if family == "siglip2" else 3)  # one padded batch; three distinct sizes
        assert row["reference_items_per_s"] > 0 and row["packvit_items_per_s"] > 0 and row["checkpointed_items_per_s"] > 0
        assert row["speedup"] == pytest.approx(row["packvit_items_per_s"] / row["reference_items_per_s"])
        assert row["speedup_target"] == training.SPEEDUP_TARGETS[family]
        assert row["gradient_cosine"] >= 0.99999 and row["meets_gradient_target"]  # float32: the same gradients
        assert row["gradient_min_tensor_cosine"] >= 0.9999
        assert row["packvit_activation_mib"] is None and row["meets_checkpointing_target"] is None  # memory needs CUDA
        assert row["attention_backend"] == "reference"
        adapter = get_adapter(family)
        checkpoint = adapter.cached_random_checkpoint(tmp_path / "ckpts", size="tiny")  # the run's own
        model = adapter.load_packed(checkpoint, torch.device("cpu"), torch.float32)
        grids = workload_grids("mixed", family, 3)
        pass_flops = 3 * forward_flops(model_shape(model), [model.num_prefix_tokens + t * h * w for t, h, w in grids],
                                       3 * model.patch_size**2, sum(t * h * w for t, h, w in grids))  # forward + backward
        assert row["packvit_mfu"] == pytest.approx(pass_flops * row["packvit_items_per_s"] / 3 / 1e12)
    environment = report["environment"]
    assert environment["smoke"] and environment["dtype"] == "float32" and "3 of the 512 items" in environment["items_note"]
    table = (out / "train_bench.md").read_text()
    assert "| siglip2 (tiny) | 3 |" in table and "| dinov3 (tiny) | 3 |" in table
    assert table in capsys.readouterr().out
