import importlib.util
import json
import math

import pytest

from packvit import cli
from packvit.benchmarks import common
from packvit.benchmarks.common import group_by_budget, latency_percentiles
from packvit.benchmarks.common import forward_flops
from packvit.benchmarks.inference import kernel_category
from packvit.benchmarks.workloads import naflex_grid, workload_grids
from packvit.harness import get_adapter
from packvit.models import base
from family_helpers import require_references


def test_workloads_follow_benchmarks_md():
    mixed = workload_grids("mixed", "siglip2")
    assert len(mixed) == 512 and mixed == workload_grids("mixed", "dinov3")  # one seed, same items for every model
    assert all(t == 1 and h * w <= 1024 and h * w >= 40 for t, h, w in mixed)
    assert max(w / h for _, h, w in mixed) > 2.5 and min(w / h for _, h, w in mixed) < 0.4
    mixed_4k = workload_grids("mixed-4k", "aimv2")
    assert len(mixed_4k) == 256 and max(h * w for _, h, w in mixed_4k) <= 4096
    assert workload_grids("uniform", "llava_vit") == [(1, 32, 32)] * 512
    assert workload_grids("uniform", "dinov3")[0] == (1, 14, 14)
    assert workload_grids("video", "llava_vit") == [(16, 16, 16)] * 64
    with pytest.raises(ValueError, match="unknown workload"):
        workload_grids("huge", "siglip2")


def test_online_workload_is_the_first_mixed_items():
    mixed = workload_grids("mixed", "aimv2")
    assert workload_grids("online", "aimv2") == mixed[:64]
    assert workload_grids("online", "dinov3", 6) == mixed[:6]  # not a fresh draw of 6 items
    assert workload_grids("mixed", "dinov3", 6) != mixed[:6]
    with pytest.raises(ValueError, match="at most the 512 mixed items"):
        workload_grids("online", "siglip2", 513)


def test_latency_percentiles_interpolate():
    assert latency_percentiles([float(n) for n in range(10, 0, -1)]) == (5.5, 9.1)
    assert latency_percentiles([2.0]) == (2.0, 2.0)


def test_naflex_grid_is_the_largest_under_the_cap():
    for aspect, cap in [(1.0, 256), (3.0, 1024), (1 / 3, 64), (1.7, 500)]:
        h, w = naflex_grid(aspect, cap)
        assert h * w <= cap
        assert (h + 1) * max(1, int((h + 1) * aspect)) > cap  # one step larger at that aspect breaks the cap
        assert abs(math.log((w / h) / aspect)) < 0.5


def test_token_budget_chunks_keep_order_and_budget():
    chunks = group_by_budget(list("abcdef"), [10, 20, 30, 5, 40, 1], 45)
    assert chunks == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert group_by_budget(["big"], [100], 45) == [["big"]]


def test_forward_flops_counts_projections_mlp_attention_and_patch_embedding():
    shape = {"hidden": 8, "mlp": 32, "layers": 2, "gated": False}
    flops = forward_flops(shape, [3, 5], patch_dim=12, num_patches=8)
    per_layer = 2 * (4 * 64 + 2 * 8 * 32) * 8 + 4 * 8 * (9 + 25)
    assert flops == 2 * per_layer + 2 * 12 * 8 * 8


def test_bench_smoke_writes_json_table_and_chart(tmp_path):
    require_references("siglip2", "dinov3")
    out = tmp_path / "bench"
    assert cli.main(["bench", "--smoke", "--models", "siglip2", "dinov3", "--workloads", "mixed", "--repeats", "1",
                     "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    rows = report["results"]
    assert [(r["model"], r["workload"]) for r in rows] == [("siglip2", "mixed"), ("dinov3", "mixed")]
    assert all(r["items"] == 6 and r["packvit_items_per_s"] > 0 and r["baseline_items_per_s"] > 0 for r in rows)
    assert "| siglip2 (tiny) | mixed | 6 |" in (out / "bench.md").read_text()
    if importlib.util.find_spec("matplotlib"):
        assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not (out / "bench.png").exists()


@pytest.mark.parametrize("name, category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmul"),
    ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NTN", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64", "attention"),
    ("triton_red_fused_add_native_layer_norm_0", "fused (compiled)"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>", "norm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise"),
    ("void at::native::index_elementwise_kernel<128, 4>", "copy / index"),
    ("Memcpy HtoD (Pinned -> Device)", "copy / index"),
])
def test_kernel_categories(name, category):
    assert kernel_category(name) == category


def test_bench_profile_reports_kernel_time(tmp_path):
    require_references("aimv2")
    out = tmp_path / "bench"
    assert cli.main(["bench", "--smoke", "--models", "aimv2", "--workloads", "mixed", "--repeats", "1", "--no-compile",
                     "--profile", "--out", str(out)]) == 0
    (row,) = json.loads((out / "bench.json").read_text())["results"]
    assert row["profile_ms"]["matmul"] > 0 and sum(row["profile_ms"].values()) > row["profile_ms"]["matmul"]
    assert "| aimv2 | mixed |" in (out / "bench.md").read_text().split("Kernel time")[1]


def test_bench_times_every_baseline_before_packvit_and_reports_online_latency(tmp_path, monkeypatch):
    require_references("siglip2", "dinov3")
    """Both families' references run before any packvit block (the compiled ones included); the
    online workload reports p50/p90 per call, the CUDA graphs skipped on the CPU with the reason."""
    events = []

    def recording_run_layer(layer, x, *args, compiled=None):  # stands in for the compiler on the CPU
        events.append("compiled" if compiled else "packvit")
        return layer(x, *args)

    monkeypatch.setattr(base, "run_layer", recording_run_layer)
    for family in ("siglip2", "dinov3"):
        adapter = get_adapter(family)
        run_reference = adapter.run_reference

        def recording_reference(model, items, batch_size, run_reference=run_reference, family=family):
            events.append(f"reference {family}")
            return run_reference(model, items, batch_size)

        monkeypatch.setattr(adapter, "run_reference", recording_reference)
    out = tmp_path / "bench"
    assert cli.main(["bench", "--smoke", "--models", "siglip2", "dinov3", "--workloads", "mixed", "online", "--items", "3",
                     "--repeats", "2", "--out", str(out)]) == 0
    first_packvit = min(events.index("packvit"), events.index("compiled"))
    assert {"reference siglip2", "reference dinov3"} <= set(events[:first_packvit])
    assert not any(event.startswith("reference") for event in events[first_packvit:])

    report = json.loads((out / "bench.json").read_text())
    assert [(r["model"], r["workload"]) for r in report["results"]] == [("siglip2", "mixed"), ("dinov3", "mixed")]
    assert all(r["packs"] == 1 and r["host_prepare_ms"] > 0 for r in report["results"])
    online = report["online"]
    assert [r["model"] for r in online] == ["siglip2", "dinov3"]
    for row in online:
        assert row["items"] == 3 and row["calls"] == 6  # 2 passes over 3 items, one call each
        assert row["tokens"] == sum(t * h * w for t, h, w in workload_grids("mixed", row["model"])[:3])
        for figure in ("reference", "default", "eager", "compiled"):
            assert 0 < row[f"{figure}_p50_ms"] <= row[f"{figure}_p90_ms"]
        assert row["graphs_p50_ms"] is None and "need a CUDA device" in row["graphs_skipped"]
        assert row["speedup_p50"] == pytest.approx(row["reference_p50_ms"] / row["default_p50_ms"])
    table = (out / "bench.md").read_text()
    assert "| siglip2 (tiny) | 3 |" in table.split("Online:")[1]
    assert "skipped: CUDA graphs need a CUDA device" in table


def test_bench_leaves_the_model_in_its_modes_and_writes_after_each_family(tmp_path, monkeypatch):
    """Every timed block sets its modes with model.runtime, so the model ends in the modes it was
    loaded with; the report is rewritten after each family, so a run that stops keeps its figures."""
    require_references("aimv2")
    from packvit.benchmarks import inference

    loaded = {}
    for family in ("llava_vit", "aimv2"):
        adapter = get_adapter(family)

        def recording_load_packed(ckpt, device, dtype, load_packed=adapter.load_packed, family=family):
            loaded[family] = load_packed(ckpt, device, dtype)
            return loaded[family]

        monkeypatch.setattr(adapter, "load_packed", recording_load_packed)
    bench_family = inference.bench_family

    def stopping_after_llava_vit(plan, *args):
        figures = bench_family(plan, *args)
        if plan.family == "aimv2":
            raise KeyboardInterrupt("stopped")
        return figures

    monkeypatch.setattr(inference, "bench_family", stopping_after_llava_vit)
    out = tmp_path / "bench"
    with pytest.raises(KeyboardInterrupt):
        cli.main(["bench", "--smoke", "--models", "llava_vit", "aimv2", "--workloads", "mixed", "online", "--items", "2",
                  "--repeats", "1", "--profile", "--no-compile", "--backend", "reference", "--out", str(out)])
    model = loaded["llava_vit"]
    assert (model.compile_layers, model.attention_backend, model.gradient_checkpointing) == (None, None, False)
    report = json.loads((out / "bench.json").read_text())
    assert [(r["model"], r["workload"]) for r in report["results"]] == [("llava_vit", "mixed")]
    assert [r["model"] for r in report["online"]] == ["llava_vit"]
    environment = report["environment"]
    assert environment["attention_backend"] == "reference" and environment["sequence_token_budget"] == 32768
    assert set(common.environment(__import__("torch").device("cpu"))) <= set(environment)


def test_a_forced_attention_backend_that_cannot_run_is_refused_before_any_baseline(tmp_path, capsys, monkeypatch):
    events = []
    adapter = get_adapter("llava_vit")
    monkeypatch.setattr(adapter, "load_reference", lambda *args: events.append("reference"))
    code = cli.main(["bench", "--smoke", "--models", "llava_vit", "--workloads", "mixed", "--backend", "fa3",
                     "--ckpt_dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert code == 2 and events == []
    assert "packvit bench: error: attention backend 'fa3' cannot run on cpu" in capsys.readouterr().err


@pytest.mark.parametrize("shim, suite_flag", [("packvit.train_bench", "--models {siglip2,dinov3}"),
                                               ("packvit.embed.bench", "--num_files NUM_FILES")])
def test_old_benchmark_entry_points_run_their_suites(shim, suite_flag, monkeypatch, capsys):
    """``python -m packvit.train_bench`` and ``python -m packvit.embed.bench`` are their suites of ``packvit bench``."""
    import runpy

    monkeypatch.setattr("sys.argv", [shim, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(shim, run_name="__main__")
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: packvit bench")
    assert suite_flag in " ".join(out.split())


def test_bench_fp8_reports_speed_and_agreement_against_bf16(tmp_path):
    """``--fp8``: the FP8 model of each checkpoint beside packvit's own, on the same packs (tiny models,
    the CPU's float8 products in a smoke run)."""
    require_references("siglip2", "aimv2")
    out = tmp_path / "bench"
    assert cli.main(["bench", "--smoke", "--models", "siglip2", "aimv2", "--workloads", "mixed", "--repeats", "1",
                     "--no-compile", "--no-graphs", "--items", "4", "--fp8", "--out", str(out)]) == 0
    results = json.loads((out / "bench.json").read_text())["results"]
    assert [r["model"] for r in results] == ["siglip2", "aimv2"]
    for r in results:
        assert r["fp8_items_per_s"] > 0 and r["fp8_speedup_over_bf16"] > 0
        assert 0.99 < r["fp8_token_cosine_mean"] < 1.0  # quantised: close to, and not equal to, the model's own
        assert 0.99 < r["fp8_pooled_cosine_min"] <= 1.0
    assert "FP8 (dtype='fp8', default layers)" in (out / "bench.md").read_text()
