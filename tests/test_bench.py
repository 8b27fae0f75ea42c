import importlib.util
import json
import math

import pytest

from packvit import cli
from packvit.bench import _naflex_grid, _token_budget_chunks, forward_flops, kernel_category, workload_grids


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


def test_naflex_grid_is_the_largest_under_the_cap():
    for aspect, cap in [(1.0, 256), (3.0, 1024), (1 / 3, 64), (1.7, 500)]:
        h, w = _naflex_grid(aspect, cap)
        assert h * w <= cap
        assert (h + 1) * max(1, int((h + 1) * aspect)) > cap  # one step larger at that aspect breaks the cap
        assert abs(math.log((w / h) / aspect)) < 0.5


def test_token_budget_chunks_keep_order_and_budget():
    chunks = _token_budget_chunks(list("abcdef"), [10, 20, 30, 5, 40, 1], 45)
    assert chunks == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert _token_budget_chunks(["big"], [100], 45) == [["big"]]


def test_forward_flops_counts_projections_mlp_attention_and_patch_embedding():
    shape = {"hidden": 8, "mlp": 32, "layers": 2, "gated": False}
    flops = forward_flops(shape, [3, 5], patch_dim=12, num_patches=8)
    per_layer = 2 * (4 * 64 + 2 * 8 * 32) * 8 + 4 * 8 * (9 + 25)
    assert flops == 2 * per_layer + 2 * 12 * 8 * 8


def test_bench_smoke_writes_json_table_and_chart(tmp_path):
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
    out = tmp_path / "bench"
    assert cli.main(["bench", "--smoke", "--models", "aimv2", "--workloads", "mixed", "--repeats", "1", "--no-compile",
                     "--profile", "--out", str(out)]) == 0
    (row,) = json.loads((out / "bench.json").read_text())["results"]
    assert row["profile_ms"]["matmul"] > 0 and sum(row["profile_ms"].values()) > row["profile_ms"]["matmul"]
    assert "| aimv2 | mixed |" in (out / "bench.md").read_text().split("Kernel time")[1]
