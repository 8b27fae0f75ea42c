"""Full-size parity of every family on the GPU: bf16 against the bf16 reference, float32 through
the reference attention path against the float32 reference, and a forward free of host syncs.

Random weights at the real sizes, the ``mixed`` items of docs/benchmarks.md (and the ``video`` clips
for OneVision). Each test appends its figures as a JSON line to ``$PACKVIT_GPU_REPORT`` if set.
"""

import json
import os

import pytest
import torch
from figures import compare, report

from packvit.benchmarks.workloads import workload_grids
from packvit.packing import PackedBatch
from packvit.harness import FAMILIES, get_adapter

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

POOLED_COSINE = {"siglip2": 0.999, "dinov3": 0.999, "aimv2": 0.999, "llava_vit": 0.9999}
FLOAT32_ITEMS = 128  # float32 runs on the first items of the workload


def workloads_for(family):
    return ["mixed", "video"] if family == "llava_vit" else ["mixed"]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_parity(family, checkpoint_root):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    adapter = get_adapter(family)
    ckpt = adapter.cached_random_checkpoint(checkpoint_root, size="full")
    device = torch.device("cuda")
    for workload in workloads_for(family):
        for dtype, backend in ((torch.bfloat16, None), (torch.float32, "reference")):
            reference = adapter.load_reference(ckpt, device, dtype)
            packed = adapter.load_packed(ckpt, device, dtype)
            packed.attention_backend = backend
            grids = workload_grids(workload, family)
            if dtype == torch.float32:
                grids = grids[:FLOAT32_ITEMS]
            items = [x.to(device, dtype) for x in adapter.random_items(grids, packed.patch_size, torch.Generator().manual_seed(0))]
            with torch.inference_mode():
                ref_out = adapter.run_reference(reference, items, 32)
                packed_out = adapter.run_packed(packed, items)
            tokens, first, pooled = compare(ref_out, packed_out)
            record = {"family": family, "workload": workload, "dtype": str(dtype).replace("torch.", ""),
                      "items": len(items), "tokens": tokens, "first_token": first, "pooled": pooled}
            report(record)
            if dtype == torch.bfloat16:
                assert tokens["mean_cosine"] >= 0.999, record
                if family == "dinov3":  # the first token of each item is its CLS
                    assert first["min_cosine"] >= 0.999, record
                if pooled is not None:
                    assert pooled["min_cosine"] >= POOLED_COSINE[family], record
            else:
                assert tokens["max_diff"] <= 1e-4, record
                if pooled is not None:
                    assert pooled["max_diff"] <= 1e-4, record
            del reference, packed
            torch.cuda.empty_cache()


@pytest.mark.parametrize("compile_layers", [False, None])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_makes_no_host_sync(family, compile_layers, checkpoint_root):
    """The model forward and the bench's whole packed path (pack, forward, per-item split) read
    nothing back from the GPU, eager and with the default (compiled on CUDA) layers."""
    adapter = get_adapter(family)
    ckpt = adapter.cached_random_checkpoint(checkpoint_root, size="tiny")
    packed = adapter.load_packed(ckpt, torch.device("cuda"), torch.bfloat16)
    packed.compile_layers = compile_layers
    grids = workload_grids("mixed", family, 16)
    items = [x.cuda().bfloat16() for x in adapter.random_items(grids, packed.patch_size, torch.Generator().manual_seed(1))]
    batch = adapter.pack(items, packed)
    assert batch.grid_thw.device.type == "cpu"
    with torch.inference_mode():
        packed(batch)  # warm-up: compilation, kernel selection, pinned staging buffers
        adapter.run_packed(packed, items)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = packed(PackedBatch(batch.patches, batch.grid_thw.clone(), batch.patch_layout))  # a fresh host grid
            per_item = adapter.run_packed(packed, items)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out.last_hidden_state.float()).all()
    assert len(per_item) == len(items)


def test_layers_compile_by_default_on_cuda_inference(checkpoint_root):
    """compile_layers=None compiles DINOv3's layers for CUDA inference, not with autograd on, and
    never SigLIP2's (measured slower); the compiled forward equals the eager one. (The automatic
    CUDA graphs, which serve packs this small with eager blocks, are off here.)"""
    dynamo_counters = pytest.importorskip("torch._dynamo.utils").counters
    device = torch.device("cuda")
    outputs = {}
    for family in ("siglip2", "dinov3"):
        adapter = get_adapter(family)
        packed = adapter.load_packed(adapter.cached_random_checkpoint(checkpoint_root, size="tiny"), device, torch.float32)
        packed.cuda_graphs = False
        items = [x.to(device) for x in adapter.random_items([(1, 5, 7), (1, 3, 2)], packed.patch_size, torch.Generator().manual_seed(2))]
        batch = adapter.pack(items, packed)
        patches, grid_thw = batch.patches, batch.grid_thw
        torch._dynamo.reset()
        dynamo_counters.clear()
        with torch.no_grad():
            compiled_default = packed(patches, grid_thw)
        outputs[family] = dynamo_counters["stats"]["unique_graphs"]
        packed(patches, grid_thw)  # autograd on: eager
        assert dynamo_counters["stats"]["unique_graphs"] == outputs[family]
        packed.compile_layers = False
        with torch.no_grad():
            eager = packed(patches, grid_thw)
        assert (compiled_default - eager).abs().max() <= 1e-4
    assert outputs["siglip2"] == 0
    assert outputs["dinov3"] > 0


@pytest.mark.parametrize("compile_layers", [None, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_items_are_independent_of_their_pack(family, dtype, compile_layers, checkpoint_root):
    """Each item's outputs are the same alone, packed with others, in another order and duplicated;
    a NaN in one item reaches no other. float32 (efficient kernel, no TF32) and bf16 (default
    kernel), default (compiled for CUDA inference) and forced-compiled layers."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    adapter = get_adapter(family)
    packed = adapter.load_packed(adapter.cached_random_checkpoint(checkpoint_root, size="tiny"), torch.device("cuda"), dtype)
    packed.compile_layers = compile_layers
    grids = [(1, 3, 4), (1, 1, 1), (1, 9, 2), (1, 6, 6)] + ([(3, 2, 5)] if family == "llava_vit" else [])
    items = [x.cuda().to(dtype) for x in adapter.random_items(grids, packed.patch_size, torch.Generator().manual_seed(3))]

    def per_item(outputs):
        return [torch.cat([o.tokens.float().flatten(), o.pooled.float()]) for o in outputs]

    with torch.inference_mode():
        alone = [per_item(adapter.run_packed(packed, [item]))[0] for item in items]
        together = per_item(adapter.run_packed(packed, items))
        order = list(reversed(range(len(items))))
        shuffled = per_item(adapter.run_packed(packed, [items[i] for i in order]))
        duplicated = per_item(adapter.run_packed(packed, items + items))
        poisoned = [items[0].clone().fill_(float("nan"))] + items[1:]
        with_nan = per_item(adapter.run_packed(packed, poisoned))
    candidates = [together, [shuffled[order.index(i)] for i in range(len(items))], duplicated[: len(items)],
                  duplicated[len(items):]]
    for outputs in candidates:
        for reference, output in zip(alone, outputs):
            if dtype == torch.float32:
                assert (reference - output).abs().max().item() <= 1e-4
            else:
                assert torch.nn.functional.cosine_similarity(reference, output, dim=0).item() >= 0.9999
    assert torch.isnan(with_nan[0]).any()
    assert all(torch.isfinite(output).all() for output in with_nan[1:])
