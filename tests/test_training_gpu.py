"""Training on CUDA: bf16 gradients of every family against its bf16 reference at a moderate size,
no gradient between packed items with the GPU kernels, gradient checkpointing (same gradients, far
less activation memory), no host synchronisation in forward + backward (eager, checkpointed,
compiled), and a float32 tower training on the ``efficient`` attention backend against the float32
reference."""

import pytest
import torch
from figures import report
import torch.nn.functional as F

from packvit.attention import select_backend
from packvit.benchmarks.workloads import workload_grids
from packvit.harness import FAMILIES, get_adapter
from packvit.packing import PackedBatch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda")
#: between the tiny CPU configurations and the full sizes: head_dim 64, six blocks
MODERATE = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6)
ITEMS = 16  # the first items of the `mixed` workload


@pytest.fixture(scope="module")
def moderate(tmp_path_factory):
    return {family: get_adapter(family).write_random_checkpoint(tmp_path_factory.mktemp(family), "tiny", seed=0, **MODERATE)
            for family in FAMILIES}


@pytest.fixture
def without_tf32():
    """float32 matrix products and convolutions in full float32 for the test, as before it afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def mixed_items(adapter, family, patch_size, dtype, count=ITEMS, seed=0):
    """The first ``count`` items of ``mixed`` on CUDA, leaves that take a gradient."""
    grids = workload_grids("mixed", family, count)
    items = adapter.random_items(grids, patch_size, torch.Generator().manual_seed(seed))
    return [item.to(CUDA, dtype).requires_grad_() for item in items]


def projection_loss(outputs, seed=1):
    """A fixed random projection of every item's tokens and pooled vector, summed in float32."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.cat([o.tokens for o in outputs]).float()  # [total tokens, D]
    loss = (tokens * torch.randn(tokens.shape, generator=generator).to(CUDA)).sum()
    if outputs[0].pooled is not None:
        pooled = torch.stack([o.pooled for o in outputs]).float()  # [N, D]
        loss = loss + (pooled * torch.randn(pooled.shape, generator=generator).to(CUDA)).sum()
    return loss


def gradients(loss, inputs, model):
    """(input gradients, {name: parameter gradient} on the host, float32; zeros for unused ones)."""
    names, parameters = zip(*model.named_parameters())
    grads = torch.autograd.grad(loss, [*inputs, *parameters], allow_unused=True)
    by_name = {name: (torch.zeros_like(p) if g is None else g).float().cpu()
               for name, p, g in zip(names, parameters, grads[len(inputs):])}
    return [g.float() for g in grads[: len(inputs)]], by_name


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten().float().cpu() for t in tensors])


def reference_and_packed_gradients(adapter, ckpt, family, dtype, count=ITEMS, by_parameter=False):
    """Gradients of one loss on the same items, the reference's mapped to packvit's names: flat
    (inputs, parameters) pairs, or with ``by_parameter`` the two ``{name: gradient}`` dicts."""
    reference = adapter.load_reference(ckpt, CUDA, dtype)  # eval: DINOv3 rescales RoPE at random in train mode
    packed = adapter.load_packed(ckpt, CUDA, dtype)
    items = mixed_items(adapter, family, packed.patch_size, dtype, count=count)
    reference_inputs, reference_grads = gradients(projection_loss(adapter.run_reference(reference, items, 32)), items, reference)
    del reference
    packed_inputs, packed_grads = gradients(projection_loss(adapter.run_packed(packed, items)), items, packed)
    expected = packed.map_checkpoint(reference_grads)  # on the host: the map builds absent biases there
    if by_parameter:
        return {name: expected[name] for name in packed_grads}, packed_grads, packed
    names = list(packed_grads)
    return (flat(reference_inputs), flat(packed_inputs)), (flat(expected[n] for n in names), flat(packed_grads[n] for n in names)), packed


@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_gradients_match_the_reference(checkpoint_root, family):
    """Full size, bf16, the automatic attention backend (FlashAttention 4 where installed: SigLIP2
    so400m's head_dim 72 is where its own backward is wrong): every parameter's gradient against
    the reference's on the first `mixed` items."""
    adapter = get_adapter(family)
    ckpt = adapter.cached_random_checkpoint(checkpoint_root, size="full")
    expected, actual, packed = reference_and_packed_gradients(adapter, ckpt, family, torch.bfloat16, count=8,
                                                             by_parameter=True)
    backend = select_backend(CUDA, torch.bfloat16, packed.config.head_dim, backward=True)
    cosines = {name: F.cosine_similarity(expected[name].double().flatten(), actual[name].double().flatten(), dim=0).item()
               for name in actual if expected[name].abs().max() > 0}
    overall = F.cosine_similarity(flat(expected.values()).double(), flat(actual.values()).double(), dim=0).item()
    least = min(cosines, key=cosines.get)
    record = {"check": "full_size_gradients", "family": family, "backend": backend, "head_dim": packed.config.head_dim,
              "items": 8, "overall_cosine": overall, "least_parameter": least, "least_cosine": cosines[least],
              "mean_parameter_cosine": sum(cosines.values()) / len(cosines)}
    report(record)
    assert overall >= 0.999, record
    assert cosines[least] >= 0.98, record


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_gradients_match_the_bf16_reference(moderate, family):
    (ref_in, packed_in), (ref_params, packed_params), _ = reference_and_packed_gradients(
        get_adapter(family), moderate[family], family, torch.bfloat16)
    for expected, actual in ((ref_in, packed_in), (ref_params, packed_params)):
        assert torch.isfinite(actual).all() and actual.abs().max() > 0
        cosine = F.cosine_similarity(expected.double(), actual.double(), dim=0).item()
        assert cosine >= 0.999, (family, cosine)


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_tower_trains_on_the_efficient_backend(moderate, family, without_tf32):
    adapter = get_adapter(family)
    (ref_in, packed_in), (ref_params, packed_params), packed = reference_and_packed_gradients(
        adapter, moderate[family], family, torch.float32)
    assert select_backend(CUDA, torch.float32, packed.config.head_dim) == "efficient"
    assert packed.dtype == torch.float32
    assert (ref_in - packed_in).abs().max() <= 1e-4 * ref_in.abs().max()
    assert (ref_params - packed_params).abs().max() <= 1e-4 * ref_params.abs().max(), family
    # one normalised gradient step lowers the loss
    batch = adapter.pack([x.detach() for x in mixed_items(adapter, family, packed.patch_size, torch.float32)], packed)

    def loss_of():
        out = packed(batch)
        return out.last_hidden_state.square().mean() + out.pooler_output.square().mean()

    loss = loss_of()
    loss.backward()
    norm = torch.sqrt(sum(p.grad.square().sum() for p in packed.parameters() if p.grad is not None))
    with torch.no_grad():
        for p in packed.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad / norm
    assert loss_of() < loss


@pytest.mark.parametrize("family", ["siglip2", "dinov3"])
def test_packed_items_do_not_leak_gradient_on_cuda(moderate, family):
    adapter = get_adapter(family)
    packed = adapter.load_packed(moderate[family], CUDA, torch.bfloat16)
    items = mixed_items(adapter, family, packed.patch_size, torch.bfloat16, count=8)
    batch = adapter.pack([x.detach() for x in items], packed)
    patches = batch.patches.requires_grad_()
    out = packed(PackedBatch(patches, batch.grid_thw, batch.patch_layout))
    first = batch.token_counts[0]
    loss = out.last_hidden_state[:first].float().square().sum() + out.pooler_output[0].float().square().sum()
    (grad,) = torch.autograd.grad(loss, patches)
    assert grad[:first].abs().max() > 0
    assert torch.equal(grad[first:], torch.zeros_like(grad[first:]))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_on_cuda(moderate, family):
    """Same gradients as without checkpointing (the backward kernels accumulate in a varying order,
    so up to bf16 rounding), one metadata build per step, and at least 3x less activation memory."""
    adapter = get_adapter(family)
    model = adapter.load_packed(moderate[family], CUDA, torch.bfloat16)
    batch = adapter.pack([x.detach() for x in mixed_items(adapter, family, model.patch_size, torch.bfloat16)], model)
    prepared = []
    prepare = model.prepare
    model.prepare = lambda *args, **kwargs: prepared.append(1) or prepare(*args, **kwargs)

    def run():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = model(batch)
        loss = out.last_hidden_state.float().square().mean() + out.pooler_output.float().square().mean()
        activations = torch.cuda.memory_allocated() - before
        return activations, flat(torch.autograd.grad(loss, list(model.parameters())))

    plain_bytes, plain = run()
    model.gradient_checkpointing_enable()
    prepared.clear()
    checkpointed_bytes, checkpointed = run()
    assert prepared == [1]  # the recompute reused the forward's metadata
    assert plain_bytes >= 3 * checkpointed_bytes, (family, plain_bytes, checkpointed_bytes)
    assert F.cosine_similarity(plain.double(), checkpointed.double(), dim=0) >= 0.9999
    assert (plain - checkpointed).abs().max() <= 2e-2 * plain.abs().max()


@pytest.mark.parametrize("mode", ["eager", "checkpointed", "compiled"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_backward_make_no_host_sync(moderate, family, mode):
    """A training step (forward, loss, backward) on a fresh host grid reads nothing back from the GPU."""
    adapter = get_adapter(family)
    model = adapter.load_packed(moderate[family], CUDA, torch.bfloat16)
    if mode == "compiled":
        torch._dynamo.reset()  # a fresh compile cache, whatever ran before in this process
    model.compile_layers = mode == "compiled"
    if mode == "checkpointed":
        model.gradient_checkpointing_enable()
    items = [x.detach() for x in mixed_items(adapter, family, model.patch_size, torch.bfloat16, seed=1)]
    batch = adapter.pack(items, model)
    assert batch.grid_thw.device.type == "cpu"

    def step(b):
        out = model(b)
        loss = out.last_hidden_state.float().square().mean() + out.pooler_output.float().square().mean()
        loss.backward()

    step(batch)  # warm-up: compilation, kernel selection, pinned staging buffers, gradient buffers
    step(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(PackedBatch(batch.patches, batch.grid_thw.clone(), batch.patch_layout))  # a fresh host grid
    finally:
        torch.cuda.set_sync_debug_mode(0)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g.float()).all() for g in grads)
