"""CUDA graphs over token budgets on the GPU: captured graphs give ``model(batch)``'s outputs for
packs of every budget (bf16: cosine per item; float32 through the efficient kernel: 1e-4), a
graphed call reads nothing back from the device, and a one-image call at full size is faster
graphed than through ``model(batch)``.

The latency figures go to ``figures.report``.
"""

import statistics
import time

import pytest
import torch
from figures import report

from packvit.benchmarks.workloads import workload_grids
from packvit.cuda_graphs import DEFAULT_BUDGETS, GraphedEncoder, select_budget
from packvit.harness import FAMILIES, get_adapter
from packvit.packing import PackedBatch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MAX_ITEMS = 8
PACKS_PER_BUDGET = 3
LATENCY_CALLS = 30


def packs_per_budget(grids, num_prefix: int) -> dict[int, list]:
    """Runs of 1 to ``MAX_ITEMS`` consecutive grids, ``PACKS_PER_BUDGET`` for each default budget."""
    packs = {budget: [] for budget in DEFAULT_BUDGETS}
    for size in range(1, MAX_ITEMS + 1):
        for start in range(0, len(grids) - size + 1, size):
            group = grids[start : start + size]
            total = sum(t * h * w + num_prefix for t, h, w in group)
            budget = select_budget(total, size, DEFAULT_BUDGETS, MAX_ITEMS)
            if budget is not None and len(packs[budget]) < PACKS_PER_BUDGET:
                packs[budget].append(group)
    return packs


def per_item(out, batch) -> list[torch.Tensor]:
    """Each item's outputs flattened into one float32 vector: patch tokens, prefix tokens, pooled."""
    vectors = []
    for index, tokens in enumerate(batch.split(out.last_hidden_state)):
        parts = [tokens.float().flatten()]
        if out.prefix_tokens is not None:
            parts.append(out.prefix_tokens[index].float().flatten())
        if out.pooler_output is not None:
            parts.append(out.pooler_output[index].float())
        vectors.append(torch.cat(parts))
    return vectors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("family", FAMILIES)
def test_graphed_outputs_equal_the_model(family, dtype, checkpoint_root):
    """Three packs of `mixed` items per default budget, one to eight items each."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    adapter = get_adapter(family)
    packed = adapter.load_packed(adapter.cached_random_checkpoint(checkpoint_root, size="tiny"), torch.device("cuda"), dtype)
    packed.compile_layers = False
    if dtype == torch.float32:
        packed.attention_backend = "efficient"
    graphed = GraphedEncoder(packed, max_items=MAX_ITEMS)
    assert graphed.captured and graphed.backend != "reference"
    packs = packs_per_budget(workload_grids("mixed", family), packed.num_prefix_tokens)
    assert all(len(groups) == PACKS_PER_BUDGET for groups in packs.values()), {b: len(g) for b, g in packs.items()}
    generator = torch.Generator().manual_seed(4)
    worst = {}
    with torch.inference_mode():
        for budget, groups in packs.items():
            for group in groups:
                items = [x.cuda().to(dtype) for x in adapter.random_items(group, packed.patch_size, generator)]
                batch = adapter.pack(items, packed)
                assert graphed.budget_for(batch) == budget
                with packed.runtime(cuda_graphs=False):  # the eager forward
                    expected = per_item(packed(batch), batch)
                out = per_item(graphed(batch), batch)
                for reference, output in zip(expected, out):
                    if dtype == torch.float32:
                        difference = (reference - output).abs().max().item()
                        worst[budget] = max(worst.get(budget, 0.0), difference)
                        assert difference <= 1e-4, (budget, len(group), difference)
                    else:
                        cosine = torch.nn.functional.cosine_similarity(reference, output, dim=0).item()
                        worst[budget] = min(worst.get(budget, 1.0), cosine)
                        assert cosine >= 0.9999, (budget, len(group), cosine)
    assert graphed.fallback_calls == 0
    report({"test": "graphed_equals_model", "family": family, "dtype": str(dtype).replace("torch.", ""),
            "backend": graphed.backend, "worst_per_budget": worst})


@pytest.mark.parametrize("family", FAMILIES)
def test_graphed_call_makes_no_host_sync(family, checkpoint_root):
    adapter = get_adapter(family)
    packed = adapter.load_packed(adapter.cached_random_checkpoint(checkpoint_root, size="tiny"), torch.device("cuda"),
                                 torch.bfloat16)
    graphed = GraphedEncoder(packed, budgets=(256, 1024), max_items=4)
    generator = torch.Generator().manual_seed(5)
    items = [x.cuda().bfloat16() for x in adapter.random_items([(1, 5, 7), (1, 3, 4), (1, 6, 2), (1, 20, 30)],
                                                               packed.patch_size, generator)]
    batches = [adapter.pack(items[:1], packed), adapter.pack(items[1:], packed)]
    assert [graphed.budget_for(batch) for batch in batches] == [256, 1024]
    with torch.inference_mode():
        for batch in batches:
            graphed(batch)  # warm-up: pinned staging buffers, position caches
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            outputs = [graphed(PackedBatch(b.patches, b.grid_thw.clone(), b.patch_layout)) for b in batches]  # fresh host grids
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for out, batch in zip(outputs, batches):
        assert out.last_hidden_state.shape[0] == sum(batch.token_counts)
        assert torch.isfinite(out.last_hidden_state.float()).all()


def median_latency_ms(call, batch) -> float:
    for _ in range(3):
        call(batch)
    torch.cuda.synchronize()
    times = []
    for _ in range(LATENCY_CALLS):
        start = time.perf_counter()
        call(batch)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_image_call_is_faster_graphed_at_full_size(family, checkpoint_root):
    """One 16x16-patch image per call, bf16, full-size random weights: model(batch) with eager
    layers and no graphs, against one GraphedEncoder graph of budget 384 and against the default
    model(batch), whose automatic graphs capture the image's budget on the first call (the memory
    that takes is reported)."""
    adapter = get_adapter(family)
    packed = adapter.load_packed(adapter.cached_random_checkpoint(checkpoint_root, size="full"), torch.device("cuda"),
                                 torch.bfloat16)
    item = adapter.random_items([(1, 16, 16)], packed.patch_size, torch.Generator().manual_seed(6))[0]
    batch = adapter.pack([item.cuda().bfloat16()], packed)
    start = time.perf_counter()
    graphed = GraphedEncoder(packed, budgets=(384,), max_items=1)
    capture_s = time.perf_counter() - start
    with torch.inference_mode():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        packed(batch)  # the automatic graphs: captures the budget
        torch.cuda.synchronize()
        auto_capture_s, auto_mib = time.perf_counter() - start, (torch.cuda.memory_allocated() - before) / 2**20
        default_ms = median_latency_ms(packed, batch)
        (default_out,) = per_item(packed(batch), batch)
        with packed.runtime(cuda_graphs=False, compile_layers=False):
            eager_ms = median_latency_ms(packed, batch)
            (expected,) = per_item(packed(batch), batch)
        graphed_ms = median_latency_ms(graphed, batch)
        (out,) = per_item(graphed(batch), batch)
    cosine = torch.nn.functional.cosine_similarity(expected, out, dim=0).item()
    default_cosine = torch.nn.functional.cosine_similarity(expected, default_out, dim=0).item()
    report({"test": "one_image_latency", "family": family, "tokens": sum(batch.token_counts), "backend": graphed.backend,
            "capture_s": capture_s, "graphed_ms": graphed_ms, "eager_ms": eager_ms, "cosine": cosine,
            "default_ms": default_ms, "default_cosine": default_cosine, "auto_capture_s": auto_capture_s,
            "auto_graph_mib": auto_mib})
    assert cosine >= 0.999 and default_cosine >= 0.999
    assert graphed_ms < eager_ms and default_ms < eager_ms


@pytest.mark.parametrize("family", FAMILIES)
def test_model_call_graphs_small_packs_by_default(family, checkpoint_root):
    """model(batch) in inference: small packs through graphs captured per budget on first use, the
    eager forward's outputs, no host sync once captured; larger packs and hidden states eager; a
    VisionTower's call and the earlier tensor form graphed too; casting the model makes new graphs."""
    from packvit.cuda_graphs import AUTO_BUDGETS
    from packvit.vlm import VisionTower

    adapter = get_adapter(family)
    packed = adapter.load_packed(adapter.cached_random_checkpoint(checkpoint_root, size="tiny"), torch.device("cuda"),
                                 torch.bfloat16)
    generator = torch.Generator().manual_seed(7)
    small = [adapter.pack([x.cuda().bfloat16() for x in adapter.random_items(grids, packed.patch_size, generator)], packed)
             for grids in ([(1, 9, 11)], [(1, 4, 4), (1, 6, 3), (1, 2, 2)], [(1, 20, 25)])]
    large = adapter.pack([x.cuda().bfloat16() for x in adapter.random_items([(1, 40, 40)], packed.patch_size, generator)],
                         packed)
    with torch.inference_mode():
        for batch in small + [large]:
            with packed.runtime(cuda_graphs=False):
                expected = per_item(packed(batch), batch)
            out = per_item(packed(batch), batch)
            assert min(torch.nn.functional.cosine_similarity(a, b, dim=0).item() for a, b in zip(expected, out)) >= 0.9999
        key, graphs = packed._auto_graphs
        budgets = {graphs.budget_for(batch) for batch in small}
        assert graphs.captured and set(graphs.packs) == budgets and budgets <= set(AUTO_BUDGETS)
        assert graphs.budget_for(large) is None
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            packed(PackedBatch(small[0].patches, small[0].grid_thw.clone(), small[0].patch_layout))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        served = []
        run = graphs.run
        graphs.run = lambda *args, **kwargs: served.append(1) or run(*args, **kwargs)
        tower_out = VisionTower(packed)(small[1]).features
        packed(hidden_states=small[1].patches, grid_thw=small[1].grid_thw, return_dict=True)  # the earlier form too
        packed(small[1], hidden_layers=[1])  # hidden states: eager
        assert served == [1, 1]
        with packed.runtime(cuda_graphs=False):
            assert torch.nn.functional.cosine_similarity(VisionTower(packed)(small[1]).features.float().flatten(),
                                                         tower_out.float().flatten(), dim=0).item() >= 0.9999
    packed.float()
    with torch.inference_mode():
        out = packed(small[0])
        assert packed._auto_graphs[0] != key and packed._auto_graphs[1].dtype == torch.float32
        with packed.runtime(cuda_graphs=False):
            expected = packed(small[0])
    assert (out.last_hidden_state - expected.last_hidden_state).abs().max().item() <= 1e-4
