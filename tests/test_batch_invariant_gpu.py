"""Batch-invariant mode on the GPU at full size: each item's outputs the same bits alone, packed
with others, shuffled, duplicated and in packs of other token budgets, for every family; the
invariant matrix product against cuBLAS; the cost (``mixed`` items/s against the default mode in
the same run, target >= 0.75x) with parity against the bf16 reference unchanged (mean token cosine
>= 0.999). Figures as JSON lines to ``$PACKVIT_GPU_REPORT``.

``check_bit_identity`` and ``measure_cost`` take any model, so they also serve models built from a
configuration (random weights, no checkpoint written).
"""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch
import torch.nn.functional as F
from figures import report
from test_batch_invariant import arrangements, assert_bit_identical, grids_of

from packvit.benchmarks.common import group_by_budget, median_seconds
from packvit.benchmarks.workloads import workload_grids, workload_items
from packvit.harness import FAMILIES, get_adapter
from packvit.metrics import compute_similarity_metrics
from packvit.packing import PackedBatch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")]

#: the (K, N) of the full-size models' products: SigLIP2 so400m, DINOv3 ViT-L and OneVision large,
#: AIMv2 large; and the position-table product of SigLIP2 (K 256, in float32)
PRODUCT_SHAPES = [(1152, 3456), (1152, 1152), (1152, 4304), (4304, 1152), (1024, 3072), (1024, 4096), (4096, 1024),
                  (1024, 5632), (2816, 1024), (768, 1152)]
BIT_IDENTITY_ITEMS = 24
SEQUENCE_TOKEN_BUDGET = 32768  # the bench's packs of `mixed`
COST_TARGET = 0.75
PARITY_ITEMS = 128


def test_invariant_product_rows_are_the_same_bits_and_match_cublas():
    """A block of rows gives the same bits in products of 5, 133 and 9000 rows, at any offset;
    against cuBLAS it is as close as bf16 (float32) rounding; and its speed beside cuBLAS's."""
    from packvit.batch_invariant import ops

    torch.backends.cuda.matmul.allow_tf32 = False
    generator = torch.Generator(device="cuda").manual_seed(0)
    for dtype, shapes in ((torch.bfloat16, PRODUCT_SHAPES), (torch.float32, [(256, 1152), (1152, 1152)])):
        for k, n in shapes:
            weight = torch.randn(n, k, device="cuda", generator=generator).div(k**0.5).to(dtype)
            bias = torch.randn(n, device="cuda", generator=generator).to(dtype)
            rows = torch.randn(9000, k, device="cuda", generator=generator).to(dtype)
            probe = rows[:5]
            expected = ops.linear(probe, weight, bias)
            for count, offset in ((133, 64), (133, 128), (9000, 8995), (9000, 4001)):
                block = torch.cat([rows[5 : 5 + offset], probe, rows[5 + offset : count]])[:count]
                got = ops.linear(block, weight, bias)[offset : offset + 5]
                assert torch.equal(got, expected), (dtype, k, n, count, offset)
            cublas = F.linear(rows, weight, bias).float()
            error = ((ops.linear(rows, weight, bias).float() - cublas).abs().max() / cublas.abs().max()).item()
            assert error <= (2e-2 if dtype == torch.bfloat16 else 1e-5), (dtype, k, n, error)
            many = torch.randn(32768, k, device="cuda", generator=generator).to(dtype)
            seconds = {name: median_seconds(lambda: fn(many, weight, bias), torch.device("cuda"), 10)
                       for name, fn in (("invariant", ops.linear), ("cublas", F.linear))}
            flops = 2 * many.shape[0] * k * n
            report({"check": "batch_invariant_product", "dtype": str(dtype).replace("torch.", ""), "k": k, "n": n,
                    "relative_error": error, "invariant_tflops": flops / seconds["invariant"] / 1e12,
                    "cublas_tflops": flops / seconds["cublas"] / 1e12})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_small_items_are_the_same_bits_whatever_their_pack(family, dtype, checkpoint_root):
    """The tiny checkpoints in float32 (the efficient attention kernel, IEEE products) and bf16."""
    adapter = get_adapter(family)
    model = adapter.load_packed(adapter.cached_random_checkpoint(checkpoint_root, size="tiny"), torch.device("cuda"), dtype)
    items = [x.cuda() for x in adapter.random_items(grids_of(family), model.patch_size, torch.Generator().manual_seed(3))]
    with torch.inference_mode(), model.runtime(batch_invariant=True):
        assert model.prepare(adapter.pack(items[:1], model)).context.backend in ("aten_flash", "fa2", "efficient")
        found = arrangements(model, items, [0, 1, -1], budgets=(40, 150))
    assert_bit_identical(found, f"{family} {dtype}")


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_invariant_forward_makes_no_host_sync(family, checkpoint_root):
    adapter = get_adapter(family)
    model = adapter.load_packed(adapter.cached_random_checkpoint(checkpoint_root, size="tiny"), torch.device("cuda"),
                                torch.bfloat16)
    model.batch_invariant = True
    items = [x.cuda().bfloat16() for x in adapter.random_items(grids_of(family), model.patch_size,
                                                                torch.Generator().manual_seed(1))]
    batch = adapter.pack(items, model)
    with torch.inference_mode():
        model(batch)  # warm-up: the Triton kernels compile
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = model(PackedBatch(batch.patches, batch.grid_thw.clone(), batch.patch_layout), hidden_layers=[0, -1])
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out.last_hidden_state.float()).all()


def full_size_items(adapter, model, family: str, count: int) -> list[torch.Tensor]:
    """The first ``count`` items of ``mixed`` (and for OneVision an 8-frame clip), on the GPU."""
    grids = workload_grids("mixed", family)[:count] + ([(8, 16, 16)] if family == "llava_vit" else [])
    return [item.cuda() for item in adapter.random_items(grids, model.patch_size, torch.Generator().manual_seed(0))]


def check_bit_identity(model, family: str, items) -> dict:
    """Asserts the bit identity of every item's outputs across arrangements (batch-invariant mode);
    returns the figures, with how far the default mode's outputs move for the same arrangements."""
    layers = [0, model.num_hidden_layers // 2, -1]
    with torch.inference_mode():
        with model.runtime(batch_invariant=True):
            found = arrangements(model, items, layers, budgets=(2048, 8192))
        with model.runtime(batch_invariant=False):
            default = arrangements(model, items, layers, budgets=(2048, 8192))
    assert_bit_identical(found, family)
    moved = max((a - b).abs().max().item() for outputs in default.values() for a, b in zip(default["alone"], outputs))
    return {"check": "batch_invariant_bits", "family": family, "items": len(items), "arrangements": sorted(found),
            "default_mode_max_diff": moved}


@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_items_are_the_same_bits_whatever_their_pack(family, checkpoint_root):
    adapter = get_adapter(family)
    model = adapter.load_packed(adapter.cached_random_checkpoint(checkpoint_root, size="full"), torch.device("cuda"),
                                torch.bfloat16)
    report(check_bit_identity(model, family, full_size_items(adapter, model, family, BIT_IDENTITY_ITEMS)))


def measure_cost(model, adapter, family: str, repeats: int = 3) -> dict:
    """``mixed`` items/s of the default mode and of batch-invariant mode, same run, same packs."""
    grids = workload_grids("mixed", family)
    items = workload_items(adapter, grids, model.patch_size, torch.device("cuda"), torch.bfloat16)
    lengths = [t * h * w + model.num_prefix_tokens for t, h, w in grids]
    packs = group_by_budget(items, lengths, SEQUENCE_TOKEN_BUDGET)

    def run_packed():
        for pack in packs:
            adapter.run_packed(model, pack)

    seconds = {}
    with torch.inference_mode():
        for mode in (False, True):
            with model.runtime(batch_invariant=mode):
                start = time.perf_counter()
                run_packed()  # warm-up: compilation of the default mode's layers, the Triton kernels
                torch.cuda.synchronize()
                warmup = time.perf_counter() - start
                seconds[mode] = median_seconds(run_packed, torch.device("cuda"), repeats)
                seconds[f"warmup {mode}"] = warmup
    return {"check": "batch_invariant_cost", "family": family, "workload": "mixed", "items": len(items),
            "packs": len(packs), "default_items_per_s": len(items) / seconds[False],
            "invariant_items_per_s": len(items) / seconds[True], "ratio": seconds[False] / seconds[True],
            "warmup_s": {"default": seconds["warmup False"], "invariant": seconds["warmup True"]}}


@pytest.mark.parametrize("family", FAMILIES)
def test_cost_and_parity_of_batch_invariant_mode(family, checkpoint_root):
    adapter = get_adapter(family)
    ckpt = adapter.cached_random_checkpoint(checkpoint_root, size="full")
    model = adapter.load_packed(ckpt, torch.device("cuda"), torch.bfloat16)
    cost = measure_cost(model, adapter, family)
    reference = adapter.load_reference(ckpt, torch.device("cuda"), torch.bfloat16)
    grids = workload_grids("mixed", family)[:PARITY_ITEMS]
    items = workload_items(adapter, grids, model.patch_size, torch.device("cuda"), torch.bfloat16)
    with torch.inference_mode(), model.runtime(batch_invariant=True):
        expected = adapter.run_reference(reference, items, 32)
        got = adapter.run_packed(model, items)
    tokens = compute_similarity_metrics(torch.cat([g.tokens for g in got]), torch.cat([e.tokens for e in expected]))
    pooled = None
    if expected[0].pooled is not None:
        pooled = compute_similarity_metrics(torch.stack([g.pooled for g in got]), torch.stack([e.pooled for e in expected]))
    record = {**cost, "parity_items": len(items), "parity_tokens": tokens, "parity_pooled": pooled}
    report(record)
    assert tokens["mean_cosine"] >= 0.999, record
    assert cost["ratio"] >= COST_TARGET, record
