"""CUDA graphs over token budgets, on the CPU: the padding, the budget choice, the copies into the
static buffers and the static-shape forward that the graphs capture (run eagerly here)."""

import pytest
import torch

from packvit.cuda_graphs import GraphedEncoder, StaticPack, graph_backend, padded_segment_lengths, select_budget
from packvit.models.aimv2 import AIMv2Config, AIMv2Packing
from packvit.models.dinov3 import DINOv3Config, DINOv3ViTPacking
from packvit.models.llava_vit import LlavaViTPackingConfig, LlavaViTPackingModel
from packvit.models.siglip2 import Siglip2NaflexConfig, Siglip2NaflexPacking
from packvit.packing import PackedBatch

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, patch_size=4)
BUDGETS = (32, 64, 128)
MAX_ITEMS = 3


def tiny_model(family: str, **overrides):
    """A small random model of a family, every parameter perturbed (no bias or scale left at its init)."""
    if family == "siglip2":
        model = Siglip2NaflexPacking(Siglip2NaflexConfig(**TINY, num_patches=16, **overrides))
    elif family == "dinov3":
        model = DINOv3ViTPacking(DINOv3Config(**TINY, num_register_tokens=2, **overrides))
    elif family == "aimv2":
        model = AIMv2Packing(AIMv2Config(**TINY, is_native=True, **overrides))
    else:
        model = LlavaViTPackingModel(LlavaViTPackingConfig(**{**TINY, "hidden_size": 64, **overrides}))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def random_batch(model, grids, seed=0) -> PackedBatch:
    grid_thw = torch.tensor(grids, dtype=torch.int64)
    patches = torch.randn(int(grid_thw.prod(dim=1).sum()), model.patch_dim, generator=torch.Generator().manual_seed(seed))
    return PackedBatch(patches, grid_thw, model.patch_layout)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def close(a, b) -> bool:
    """Equal to 1e-6 of the outputs' scale: a one-row matrix product (an item of one patch alone)
    takes another kernel than the padded rows' and rounds a few float32 ulps differently."""
    return max_diff(a, b) <= 1e-6 * max(1.0, b.abs().max().item())


#: packs of every budget (with max_items 3, so 4 segment slots): one item, several, every item
#: slot used, a pack that fills its budget exactly (tokens + one per unused slot); the largest
#: first, so later packs meet stale rows from earlier ones
PACKS = [
    [(1, 8, 9), (1, 5, 5), (1, 3, 4)],  # 72 + 25 + 12 patches + 1 filler → 128
    [(1, 4, 4)],  # 16 + 3 fillers → 32
    [(1, 2, 3), (1, 1, 1), (1, 3, 3)],  # 6 + 1 + 9 + 1 → 32
    [(1, 5, 6), (1, 4, 8)],  # 30 + 32 + 2 = 64 exactly (DINOv3's prefix tokens: 128)
    [(1, 5, 5), (1, 3, 3)],  # 25 + 9 + 2 → 64
    [(1, 1, 1)],  # one patch → 32
]


@pytest.mark.parametrize("family", ["siglip2", "dinov3", "aimv2", "llava_vit"])
def test_padded_pack_gives_the_unpadded_outputs(family):
    model = tiny_model(family)
    graphed = GraphedEncoder(model, budgets=BUDGETS, max_items=MAX_ITEMS)
    assert not graphed.captured and graphed.backend == "reference"
    packs = PACKS + ([[(2, 3, 3), (1, 4, 2)]] if family == "llava_vit" else [])  # a clip of two frames
    used = set()
    for index, grids in enumerate(packs):
        batch = random_batch(model, grids, seed=index)
        used.add(graphed.budget_for(batch))
        with torch.inference_mode():
            expected = model(batch)
            out = graphed(batch)
        assert out.last_hidden_state.shape == expected.last_hidden_state.shape
        assert close(out.last_hidden_state, expected.last_hidden_state)
        assert (out.pooler_output is None) == (expected.pooler_output is None)
        if expected.pooler_output is not None:
            assert close(out.pooler_output, expected.pooler_output)
        assert (out.prefix_tokens is None) == (family != "dinov3")
        if family == "dinov3":  # CLS and registers, normed
            assert out.prefix_tokens.shape == (len(grids), 3, model.hidden_size)
            assert close(out.prefix_tokens, expected.prefix_tokens)
    assert used == set(BUDGETS)
    assert graphed.fallback_calls == 0


def test_filler_segments_are_isolated():
    """A NaN in the filler rows reaches no real row: fillers are attention segments of their own."""
    model = tiny_model("dinov3")
    graphed = GraphedEncoder(model, budgets=(64,), max_items=MAX_ITEMS)
    batch = random_batch(model, [(1, 3, 5), (1, 2, 2)])
    graphed.packs[64].x.fill_(float("nan"))
    with torch.inference_mode():
        out = graphed(batch)
        expected = model(batch)
    assert close(out.last_hidden_state, expected.last_hidden_state)
    assert close(out.prefix_tokens, expected.prefix_tokens)


def test_padded_segment_lengths():
    assert padded_segment_lengths([5, 3], 16, 4) == [5, 3, 7, 1]  # one filler of the rest, one-token fillers
    assert padded_segment_lengths([5, 3], 10, 4) == [5, 3, 1, 1]  # exactly one token per filler
    assert padded_segment_lengths([5, 3], 8, 2) == [5, 3]  # every slot used, no tokens left: no filler
    assert padded_segment_lengths([4], 32, 2) == [4, 28]
    for lengths, budget, slots in [([5, 3], 9, 4), ([5, 3], 9, 2), ([1, 1, 1], 32, 2)]:
        with pytest.raises(ValueError, match="does not fit a budget"):
            padded_segment_lengths(lengths, budget, slots)


def test_select_budget_counts_one_token_per_unused_segment():
    budgets = (32, 64, 128)
    assert select_budget(20, 1, budgets, max_items=3) == 32
    assert select_budget(29, 1, budgets, max_items=3) == 32  # 29 + 3 fillers = 32
    assert select_budget(30, 1, budgets, max_items=3) == 64  # 30 + 3 fillers > 32
    assert select_budget(30, 3, budgets, max_items=3) == 32  # 30 + 1 filler
    assert select_budget(125, 3, budgets, max_items=3) == 128
    assert select_budget(128, 3, budgets, max_items=3) is None  # over the largest budget
    assert select_budget(10, 4, budgets, max_items=3) is None  # more items than segment slots


def test_packs_that_fit_no_budget_fall_back_or_are_refused():
    model = tiny_model("siglip2")
    batches = [random_batch(model, [(1, 12, 12)]),  # 144 patches, over the largest budget
               random_batch(model, [(1, 2, 2)] * (MAX_ITEMS + 1))]  # more items than max_items
    graphed = GraphedEncoder(model, budgets=BUDGETS, max_items=MAX_ITEMS)
    for count, batch in enumerate(batches, start=1):
        assert graphed.budget_for(batch) is None
        with torch.inference_mode():
            out, expected = graphed(batch), model(batch)
        assert torch.equal(out.last_hidden_state, expected.last_hidden_state)
        assert torch.equal(out.pooler_output, expected.pooler_output)
        assert graphed.fallback_calls == count
    strict = GraphedEncoder(model, budgets=BUDGETS, max_items=MAX_ITEMS, fallback=False)
    for batch in batches:
        with pytest.raises(ValueError, match="fits no captured budget"):
            strict(batch)


@pytest.mark.parametrize("family", ["dinov3", "llava_vit"])
def test_load_writes_the_pack_into_the_static_buffers_in_place(family):
    model = tiny_model(family)
    graphed = GraphedEncoder(model, budgets=(64,), max_items=MAX_ITEMS)
    pack: StaticPack = graphed.packs[64]
    addresses = [pack.x.data_ptr(), pack.cu_seqlens.data_ptr(), pack.rotary.cos.data_ptr(), pack.rotary.sin.data_ptr()]
    assert pack.context.cu_seqlens is pack.cu_seqlens and pack.context.max_seqlen == 64
    for grids in ([(1, 3, 5), (1, 2, 2)], [(1, 6, 7)]):
        batch = random_batch(model, grids)
        lengths = [n + model.num_prefix_tokens for n in batch.token_counts]
        with torch.inference_mode():
            meta = model.prepare(batch, context=pack.context_for(lengths, model.attention_backend))
            x = model.embed(batch.patches, meta)
            pack.load(x, meta)
        assert list(meta.context.segments.lengths) == lengths
        total = sum(lengths)
        expected_lengths = padded_segment_lengths(lengths, 64, MAX_ITEMS + 1)
        assert pack.cu_seqlens.dtype == torch.int32
        assert pack.cu_seqlens.tolist() == torch.tensor([0] + expected_lengths).cumsum(0).tolist()
        assert torch.equal(pack.x[:total], x)
        assert torch.equal(pack.rotary.cos[:total], meta.rotary.cos)
        assert torch.equal(pack.rotary.sin[:total], meta.rotary.sin)
        assert pack.rotary.pairing == meta.rotary.pairing
        assert [pack.x.data_ptr(), pack.cu_seqlens.data_ptr(), pack.rotary.cos.data_ptr(),
                pack.rotary.sin.data_ptr()] == addresses


def test_outputs_survive_the_next_call_without_a_final_norm():
    """OneVision without its head has no final norm: its outputs are copied out of the static buffer."""
    model = tiny_model("llava_vit", use_head=False)
    assert model.final_norm is None
    graphed = GraphedEncoder(model, budgets=(64,), max_items=MAX_ITEMS)
    first_batch = random_batch(model, [(1, 4, 5)], seed=1)
    with torch.inference_mode():
        first = graphed(first_batch)
        kept = first.last_hidden_state.clone()
        graphed(random_batch(model, [(1, 5, 5)], seed=2))
        expected = model(first_batch)
    assert torch.equal(first.last_hidden_state, kept)
    assert close(kept, expected.last_hidden_state)
    assert first.pooler_output is None


def test_refusals():
    model = tiny_model("aimv2")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        GraphedEncoder(model, capture=True)
    with pytest.raises(ValueError, match="cannot run inside a CUDA graph"):
        graph_backend(model, torch.device("cpu"), torch.float32)  # the CPU's only backend is the reference
    model.attention_backend = "reference"
    with pytest.raises(ValueError, match="'reference' attention backend"):
        graph_backend(model, torch.device("cpu"), torch.float32)
    model.attention_backend = None
    with pytest.raises(ValueError, match="budgets must be integers above max_items"):
        GraphedEncoder(model, budgets=(8, 64), max_items=8)
    with pytest.raises(ValueError, match="max_items must be a positive integer"):
        GraphedEncoder(model, max_items=0)
    model.compile_layers = True
    with pytest.raises(ValueError, match="compile_layers is True"):
        GraphedEncoder(model)
    model.compile_layers = None
    graphed = GraphedEncoder(model, budgets=(64,), max_items=2)
    batch = random_batch(model, [(1, 2, 2)])
    with pytest.raises(ValueError, match="flattened 'cpp'"):
        graphed(PackedBatch(batch.patches, batch.grid_thw, "cpp"))
    with pytest.raises(ValueError, match="takes a PackedBatch"):
        graphed(batch.patches)


def test_graphs_run_through_the_forward_template():
    """The graphed call is model.encode with the replay as its blocks= hook: the template's own
    checks apply (a batch another family's processor made is refused), and the pack's metadata is
    prepared on the budget's static buffers (its cu_seqlens and pooling offsets are views of them,
    not a second copy)."""
    from packvit.packing import BatchOrigin

    model = tiny_model("siglip2")
    graphed = GraphedEncoder(model, budgets=(64,), max_items=MAX_ITEMS)
    batch = random_batch(model, [(1, 3, 5), (1, 2, 2)])
    prepared, encoded = [], []
    prepare, encode = model.prepare, model.encode
    model.prepare = lambda *args, **kwargs: prepared.append(prepare(*args, **kwargs)) or prepared[-1]
    model.encode = lambda *args, **kwargs: encoded.append(kwargs) or encode(*args, **kwargs)
    with torch.inference_mode():
        out = graphed(batch)
    (meta,), (call,) = prepared, encoded
    pack = graphed.packs[64]
    assert call["metadata"] is meta and call["blocks"] == pack.replay
    assert meta.context.cu_seqlens.data_ptr() == pack.cu_seqlens.data_ptr() and meta.context.cu_seqlens.shape == (3,)
    assert meta.context.pool_cu_seqlens.data_ptr() == pack.pool_offsets.data_ptr()
    assert meta.context.cu_seqlens.tolist() == [0, 15, 19] and meta.context.max_seqlen == 15
    with torch.inference_mode():
        assert close(out.pooler_output, model(batch).pooler_output)
    stranger = PackedBatch(batch.patches, batch.grid_thw, origin=BatchOrigin("dinov3", (0.5,) * 3, (0.5,) * 3))
    with pytest.raises(ValueError, match="made by the dinov3 processor"):
        graphed(stranger)
    with pytest.raises(ValueError, match="are not this pack's"):
        model.prepare(batch, context=pack.context_for([4, 4], None))


def test_lazy_budgets_are_made_on_first_use():
    """lazy=True (model(batch)'s automatic graphs): a budget's buffers (and graph) come with the first
    pack that needs them; run() gives None for a pack that fits no budget; pool=False skips the head."""
    model = tiny_model("siglip2")
    graphed = GraphedEncoder(model, budgets=BUDGETS, max_items=MAX_ITEMS, lazy=True, fallback=False)
    assert graphed.packs == {}
    small, large = random_batch(model, [(1, 4, 4)]), random_batch(model, [(1, 12, 12)])
    with torch.inference_mode():
        out = graphed.run(small)
        assert list(graphed.packs) == [32] and graphed.run(large) is None and list(graphed.packs) == [32]
        unpooled = graphed.run(small, pool=False)
        expected = model(small)
    assert close(out.last_hidden_state, expected.last_hidden_state) and close(out.pooler_output, expected.pooler_output)
    assert unpooled.pooler_output is None and torch.equal(unpooled.last_hidden_state, out.last_hidden_state)


def test_automatic_graphs_are_a_runtime_mode_dropped_when_the_model_changes():
    """model.cuda_graphs: on by default, a runtime mode; graphs apply on CUDA only (the CPU runs
    eagerly), and moving or casting the model, loading new tensors or copying it drops those captured."""
    import copy

    model = tiny_model("dinov3")
    assert model.cuda_graphs and "cuda_graphs" in model.RUNTIME_MODES
    batch = random_batch(model, [(1, 3, 3)])
    with torch.inference_mode():
        model(batch)
    assert model._auto_graphs is None  # the CPU: eager

    def captured():
        return ("key", GraphedEncoder(model, budgets=(32,), max_items=2, lazy=True, capture=False))

    for change in (lambda: model.to(torch.float64), lambda: model.load_state_dict(model.state_dict())):
        model._auto_graphs = captured()
        change()
        assert model._auto_graphs is None
    model._auto_graphs = kept = captured()
    assert copy.deepcopy(model)._auto_graphs is None and model._auto_graphs is kept
    with model.runtime(cuda_graphs=False):  # off for a block: the graphs are kept for later
        assert not model.cuda_graphs
    assert model.cuda_graphs and model._auto_graphs is kept
