"""Training through the packed forward: gradients equal to the references', no gradient between
packed items, gradient checkpointing (same gradients, metadata built once, fewer saved
activations), compiled layers under autograd (no graph break but the attention call, no
recompilation across packs) and bf16 mixed precision."""

import pytest
import torch
import torch.nn.functional as F

from packvit.harness import FAMILIES, get_adapter
from packvit.models.base import PackedVisionModel
from packvit.packing import PackedBatch
from family_helpers import require_references


CPU = torch.device("cpu")
#: largest gradient difference allowed, relative to the largest gradient of the model (float32)
GRADIENT_TOLERANCE = 1e-5
#: grids per family: sizes that differ (padding for SigLIP2), repeat (a dense reference batch of two),
#: a 1x1 image, and for OneVision a video item
GRIDS = {
    "siglip2": [(3, 4), (5, 2), (1, 1), (4, 6)],
    "dinov3": [(3, 4), (2, 5), (3, 4), (1, 1)],
    "aimv2": [(3, 4), (2, 5), (3, 4), (1, 1)],
    "llava_vit": [(3, 4), (2, 5), (3, 4), (2, 2, 3)],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``checkpoints(family)``: the family's small random checkpoint, written once (a skip where the
    installed transformers lacks its reference)."""
    root = tmp_path_factory.mktemp("training")

    def checkpoint(family):
        require_references(family)
        return get_adapter(family).cached_random_checkpoint(root, "tiny", seed=3)

    return checkpoint


def random_items(adapter, grids, patch_size, seed=0):
    items = adapter.random_items(grids, patch_size, torch.Generator().manual_seed(seed))
    return [item.requires_grad_() for item in items]


def projection_loss(outputs, seed=1):
    """A fixed random projection of every item's tokens and pooled vector, summed."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.cat([o.tokens for o in outputs])  # [total tokens, D]
    loss = (tokens * torch.randn(tokens.shape, generator=generator)).sum()
    if outputs[0].pooled is not None:
        pooled = torch.stack([o.pooled for o in outputs])  # [N, D]
        loss = loss + (pooled * torch.randn(pooled.shape, generator=generator)).sum()
    return loss


def gradients(loss, inputs, model):
    """(input gradients, {parameter name: gradient}) of ``loss``; unused parameters get zeros."""
    names, parameters = zip(*model.named_parameters())
    grads = torch.autograd.grad(loss, [*inputs, *parameters], allow_unused=True)
    by_name = {name: torch.zeros_like(p) if g is None else g for name, p, g in zip(names, parameters, grads[len(inputs):])}
    return grads[: len(inputs)], by_name


def assert_close(expected: dict, actual: dict, tolerance=GRADIENT_TOLERANCE):
    assert expected.keys() == actual.keys()
    largest = max(g.abs().max() for g in expected.values())
    assert largest > 0
    worst = max(expected, key=lambda name: (expected[name] - actual[name]).abs().max())
    assert (expected[worst] - actual[worst]).abs().max() <= tolerance * largest, worst


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_equal_the_reference(checkpoints, family):
    adapter = get_adapter(family)
    reference = adapter.load_reference(checkpoints(family), CPU, torch.float32)  # eval mode: DINOv3 rescales RoPE in train
    packed = adapter.load_packed(checkpoints(family), CPU, torch.float32).train()  # deterministic in train mode too
    items = random_items(adapter, GRIDS[family], packed.patch_size)
    reference_inputs, reference_grads = gradients(projection_loss(adapter.run_reference(reference, items, 32)), items, reference)
    packed_inputs, packed_grads = gradients(projection_loss(adapter.run_packed(packed, items)), items, packed)
    # through the checkpoint map: q/k/v and gate/up fused, the conv weight a linear one; the
    # reference's absent k bias (DINOv3) becomes a zero gradient
    assert_close(packed.map_checkpoint(reference_grads), packed_grads)
    largest = max(g.abs().max() for g in reference_inputs)
    assert max((r - p).abs().max() for r, p in zip(reference_inputs, packed_inputs)) <= GRADIENT_TOLERANCE * largest
    for index, block in enumerate(packed.blocks):
        if block.attn.qkv.bias is not None:
            for part, kept in zip(packed_grads[f"blocks.{index}.attn.qkv.bias"].view(3, -1), block.attn.bias_parts):
                assert kept or torch.equal(part, torch.zeros_like(part))  # an absent bias part takes no gradient at all
    assert (packed.blocks[0].attn.bias_parts == (True, False, True)) == (family == "dinov3")


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_items_do_not_leak_gradient(checkpoints, family):
    adapter = get_adapter(family)
    packed = adapter.load_packed(checkpoints(family), CPU, torch.float32)
    batch = adapter.pack(adapter.random_items(GRIDS[family], packed.patch_size, torch.Generator().manual_seed(0)), packed)
    patches = batch.patches.requires_grad_()
    out = packed(PackedBatch(patches, batch.grid_thw, batch.patch_layout))
    first = batch.token_counts[0]
    # item 0's tokens and pooled vector only
    loss = out.last_hidden_state[:first].square().sum() + out.pooler_output[0].square().sum()
    (grad,) = torch.autograd.grad(loss, patches)
    assert grad[:first].abs().max() > 0
    assert torch.equal(grad[first:], torch.zeros_like(grad[first:]))  # exactly zero, not merely small


def saved_activation_bytes(model: PackedVisionModel, batch) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct storages a forward keeps for the backward (saved tensors, and the
    block inputs a checkpoint holds), parameters and the input patches excluded; and the loss."""
    excluded = {p.untyped_storage().data_ptr() for p in model.parameters()} | {batch.patches.untyped_storage().data_ptr()}
    kept = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            kept[storage.data_ptr()] = storage.nbytes()

    def pack(tensor):
        keep(tensor)
        return tensor

    handles = [block.register_forward_pre_hook(lambda module, args: keep(args[0])) for block in model.blocks]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(batch)
    for handle in handles:
        handle.remove()
    return sum(kept.values()), out.last_hidden_state.square().mean() + out.pooler_output.square().mean()


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_recomputes_blocks_on_the_same_metadata(tmp_path, family):
    require_references(family)
    adapter = get_adapter(family)
    ckpt = adapter.write_random_checkpoint(tmp_path, "tiny", seed=4, num_hidden_layers=6)
    model = adapter.load_packed(ckpt, CPU, torch.float32)
    items = adapter.random_items([(6, 7), (4, 9), (5, 5)], model.patch_size, torch.Generator().manual_seed(0))
    batch = adapter.pack(items, model)
    prepared, contexts = [], []
    prepare = model.prepare
    model.prepare = lambda *args, **kwargs: prepared.append(prepare(*args, **kwargs)) or prepared[-1]
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: contexts.append(args[1]))

    plain_bytes, plain_loss = saved_activation_bytes(model, batch)
    plain = torch.autograd.grad(plain_loss, list(model.parameters()))
    assert len(contexts) == model.num_hidden_layers
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    prepared.clear(), contexts.clear()
    checkpointed_bytes, checkpointed_loss = saved_activation_bytes(model, batch)
    checkpointed = torch.autograd.grad(checkpointed_loss, list(model.parameters()))
    # every block ran twice (forward, recompute), on the one context built on the host for the forward
    assert len(prepared) == 1 and len(contexts) == 2 * model.num_hidden_layers
    assert all(context is prepared[0].context for context in contexts)
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed))
    assert checkpointed_bytes * 3 <= plain_bytes, (checkpointed_bytes, plain_bytes)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    with pytest.raises(ValueError, match="use_reentrant=True is not supported"):
        model.gradient_checkpointing_enable({"use_reentrant": True})


def test_compiled_training_breaks_only_at_attention_and_never_recompiles(checkpoints):
    """Compiled blocks under autograd, eager and checkpointed: gradients equal to eager ones, the
    one graph break is the attention call kept out on purpose, and new packs compile nothing."""
    counters = pytest.importorskip("torch._dynamo.utils").counters
    torch._dynamo.reset()
    counters.clear()
    adapter = get_adapter("dinov3")
    model = adapter.load_packed(checkpoints("dinov3"), CPU, torch.float32)
    generator = torch.Generator().manual_seed(0)
    graphs_after_first_pack = None
    for grids in ([(3, 4), (5, 2)], [(1, 2), (7, 3), (2, 9)], [(6, 6)]):
        batch = adapter.pack(adapter.random_items(grids, model.patch_size, generator), model)
        runs = {}
        for name, compiled, checkpointing in (("eager", False, False), ("compiled", True, False),
                                              ("compiled+checkpointing", True, True)):
            model.compile_layers = compiled
            model.gradient_checkpointing = checkpointing
            out = model(batch)
            loss = out.last_hidden_state.square().mean() + out.pooler_output.square().mean()
            runs[name] = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
        assert_close(runs["eager"], runs["compiled"])
        assert_close(runs["eager"], runs["compiled+checkpointing"])
        if graphs_after_first_pack is None:
            graphs_after_first_pack = counters["stats"]["unique_graphs"]
            assert graphs_after_first_pack > 0
    assert sum(counters["recompiles"].values()) == 0
    assert counters["stats"]["unique_graphs"] == graphs_after_first_pack
    breaks = list(counters["graph_break"])
    assert breaks and all("torch.compiler.disable" in reason and "VarlenContext.attend" in reason for reason in breaks), breaks


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_autocast_trains_close_to_float32(checkpoints, family):
    adapter = get_adapter(family)
    model = adapter.load_packed(checkpoints(family), CPU, torch.float32)
    batch = adapter.pack(adapter.random_items([(3, 4), (5, 2), (2, 2)], model.patch_size, torch.Generator().manual_seed(0)), model)
    projection = torch.randn(batch.patches.shape[0], model.hidden_size, generator=torch.Generator().manual_seed(1))
    matmul_dtypes = []
    model.blocks[0].attn.proj.register_forward_hook(lambda module, args, out: matmul_dtypes.append(out.dtype))

    def step():
        out = model(batch)
        loss = (out.last_hidden_state.float() * projection).sum() + out.pooler_output.float().sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return out.last_hidden_state.float(), torch.cat([g.flatten() for g in grads])

    tokens32, grads32 = step()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens16, grads16 = step()
    assert matmul_dtypes == [torch.float32, torch.bfloat16]
    assert grads16.dtype == torch.float32 and torch.isfinite(grads16).all()  # float32 parameters, float32 gradients
    assert (tokens16 - tokens32).abs().max() <= 0.05 * tokens32.abs().max()
    assert F.cosine_similarity(grads16, grads32, dim=0) >= 0.999


@pytest.mark.parametrize("family", ["siglip2", "llava_vit"])
def test_bf16_parameters_with_float32_master_weights(checkpoints, family):
    """The bf16 compute copy takes the gradients; float32 master weights take the optimiser step
    and are copied back; three steps follow the float32 run within bf16 tolerance."""
    adapter = get_adapter(family)
    reference, master = (adapter.load_packed(checkpoints(family), CPU, torch.float32) for _ in range(2))
    compute = adapter.load_packed(checkpoints(family), CPU, torch.bfloat16)
    initial = [p.detach().clone() for p in master.parameters()]
    items = adapter.random_items([(3, 4), (5, 2), (2, 2)], reference.patch_size, torch.Generator().manual_seed(0))
    batch = adapter.pack(items, reference)

    def loss_of(model):
        out = model(batch)
        return out.last_hidden_state.float().square().mean() + out.pooler_output.float().square().mean()

    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (reference, master)]
    for _ in range(3):
        loss_of(reference).backward()
        loss16 = loss_of(compute)
        loss16.backward()
        assert all(p.grad.dtype == torch.bfloat16 for p in compute.parameters())
        for master_parameter, parameter in zip(master.parameters(), compute.parameters()):
            master_parameter.grad = parameter.grad.float()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        compute.zero_grad()
        with torch.no_grad():
            for master_parameter, parameter in zip(master.parameters(), compute.parameters()):
                parameter.copy_(master_parameter)
    assert all(p.dtype == torch.float32 for p in master.parameters())
    assert all(p.dtype == torch.bfloat16 for p in compute.parameters())
    moved = torch.cat([(m.detach() - start).flatten() for m, start in zip(master.parameters(), initial)])
    expected = torch.cat([(r.detach() - start).flatten() for r, start in zip(reference.parameters(), initial)])
    assert moved.abs().max() > 0 and torch.isfinite(moved).all()
    assert F.cosine_similarity(moved, expected, dim=0) >= 0.99  # the bf16 run's updates follow the float32 run's
