"""Every attention backend available on this GPU against the float32 reference path; FlashAttention 4
in detail (gradients, no host sync, automatic choice on Hopper, one compilation for many packs);
float32 on CUDA; offsets given on the host."""

import dataclasses
import importlib
import importlib.metadata
import json
import os

import pytest
import torch
from figures import report

from packvit import attention
from packvit.attention import BACKENDS, backend_report, select_backend, varlen_attention
from packvit.layers import VarlenContext
from packvit.metrics import relative_error
from packvit.packing import SegmentLayout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LENGTHS = [1, 2, 17, 128, 300, 1, 1024, 5000, 77]
HALF_BACKENDS = [name for name in BACKENDS if name != "reference"]


def available(name, dtype, head_dim):
    return torch.cuda.is_available() and backend_report("cuda", dtype, head_dim)[name] is None


def inputs(lengths_q, lengths_k, head_dim, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    heads = 4
    make = lambda n: torch.randn(n, heads, head_dim, device="cuda", generator=g).to(dtype).requires_grad_()
    q, k, v = make(sum(lengths_q)), make(sum(lengths_k)), make(sum(lengths_k))
    cu_q = SegmentLayout.from_lengths(lengths_q).cu_seqlens("cuda")
    cu_k = SegmentLayout.from_lengths(lengths_k).cu_seqlens("cuda")
    return q, k, v, cu_q, cu_k


def forward_backward(backend, q, k, v, cu_q, cu_k, max_q, max_k, upstream, uniform_seqlen=None):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, backend=backend, uniform_seqlen=uniform_seqlen)
    (out.float() * upstream).sum().backward()
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("head_dim", [64, 72, 128])
@pytest.mark.parametrize("name", HALF_BACKENDS)
@pytest.mark.parametrize("queries", ["self", "one_per_item"])
def test_backend_matches_reference_bf16(name, head_dim, queries):
    if not available(name, torch.bfloat16, head_dim):
        pytest.skip(f"{name}: {backend_report('cuda', torch.bfloat16, head_dim)[name]}")
    lengths_k = [300] * 7 if name == "dense_sdpa" else LENGTHS  # dense batches need equal lengths
    if name == "dense_sdpa" and queries != "self":
        pytest.skip("dense_sdpa serves equal-length self-attention")
    lengths_q = lengths_k if queries == "self" else [1] * len(lengths_k)
    uniform = lengths_k[0] if name == "dense_sdpa" else None
    q, k, v, cu_q, cu_k = inputs(lengths_q, lengths_k, head_dim, torch.bfloat16, seed=head_dim)
    upstream = torch.randn(q.shape, device="cuda")
    got = forward_backward(name, q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), upstream, uniform)
    ref = forward_backward("reference", q.float(), k.float(), v.float(), cu_q, cu_k, max(lengths_q), max(lengths_k), upstream)
    for label, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert relative_error(a, b) <= 1e-2, f"{name} {label} hd {head_dim}: {relative_error(a, b):.2e}"


@pytest.mark.parametrize("head_dim", [64, 72])
def test_efficient_float32_is_exact(head_dim):
    if not available("efficient", torch.float32, head_dim):
        pytest.skip("no efficient-attention kernel")
    q, k, v, cu_q, cu_k = inputs(LENGTHS, LENGTHS, head_dim, torch.float32, seed=3)
    out = varlen_attention(q, k, v, cu_q, cu_k, max(LENGTHS), max(LENGTHS), backend="efficient")
    ref = varlen_attention(q, k, v, cu_q, cu_k, max(LENGTHS), max(LENGTHS), backend="reference")
    assert (out - ref).abs().max().item() <= 1e-5


def test_uniform_segments_choose_dense_sdpa_automatically():
    lengths = [256] * 6
    q, k, v, cu, _ = inputs(lengths, lengths, 64, torch.bfloat16, seed=5)
    dense = varlen_attention(q, k, v, cu, cu, 256, 256, uniform_seqlen=256)
    varlen = varlen_attention(q, k, v, cu, cu, 256, 256, backend="torch_varlen")
    assert relative_error(dense, varlen) <= 1e-2


def test_auto_backend_call_makes_no_host_sync():
    layout = SegmentLayout.from_lengths(LENGTHS)
    q = torch.randn(layout.total, 4, 64, device="cuda", dtype=torch.bfloat16)
    cu = layout.cu_seqlens("cuda")
    varlen_attention(q, q, q, cu, cu, layout.max_seqlen, layout.max_seqlen)  # selection, and FA4's compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fresh = SegmentLayout.from_lengths(LENGTHS)
        cu = fresh.cu_seqlens("cuda")
        out = varlen_attention(q, q, q, cu, cu, fresh.max_seqlen, fresh.max_seqlen)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.shape == q.shape


def test_tanh_gelu_mlp_epilogue_is_the_tanh_gelu():
    """On CUDA the tanh-GELU Mlp runs fc1 with cuBLASLt's GELU epilogue: it must equal the unfused
    tanh GELU, and differ measurably from the exact (erf) GELU, in float32 without TF32."""
    from packvit.layers import Mlp

    torch.backends.cuda.matmul.allow_tf32 = False
    mlp = Mlp(96, 200, "gelu_pytorch_tanh").cuda()
    x = torch.randn(333, 96, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    with torch.no_grad():
        fused = mlp(x)
        strided = mlp(x.t().contiguous().t())  # a column-major input takes another cuBLAS path
        tanh = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x), approximate="tanh"))
        erf = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x)))
    assert (fused - tanh).abs().max() <= 1e-5
    assert (strided - tanh).abs().max() <= 1e-5
    assert (fused - erf).abs().max() >= 1e-4


def test_host_offsets_on_cuda_are_checked_and_copied_without_sync(monkeypatch):
    monkeypatch.delenv(attention.ENV_VAR, raising=False)  # the automatic choice, never the syncing reference
    layout = SegmentLayout.from_lengths(LENGTHS)
    q = torch.randn(layout.total, 4, 64, device="cuda", dtype=torch.bfloat16)
    cu = layout.cu_seqlens("cuda")
    expected = varlen_attention(q, q, q, cu, cu, layout.max_seqlen, layout.max_seqlen)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        from_layout = varlen_attention(q, q, q, layout, layout)
        from_host_tensor = varlen_attention(q, q, q, layout.cu_seqlens_host, layout.cu_seqlens_host)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(from_layout, expected) and torch.equal(from_host_tensor, expected)
    short = SegmentLayout.from_lengths(LENGTHS[:-1])
    with pytest.raises(ValueError, match=f"cu_seqlens_q ends at {short.total} but q has {layout.total} rows"):
        varlen_attention(q, q, q, short, short)


# ---------------------------------------------------------------------------------------------
# FlashAttention 4 (flash-attn-4)

#: mixed lengths: single tokens, short, long and one long segment
FA4_LENGTHS = [1, 5, 1, 64, 200, 1, 1500, 4096, 3, 77]


def skip_without_fa4(head_dim):
    """Skips, with the reason, where fa4 cannot run bf16 at this head_dim (flash-attn-4 absent, GPU)."""
    reason = backend_report("cuda", torch.bfloat16, head_dim)["fa4"]
    if reason:
        pytest.skip(f"fa4: {reason}")


def fa4_pass(lengths, head_dim=72, seed=0):
    """One FA4 forward and backward over a fresh pack of these segment lengths."""
    layout = SegmentLayout.from_lengths(lengths)
    q, k, v, cu, _ = inputs(lengths, lengths, head_dim, torch.bfloat16, seed)
    out = varlen_attention(q, k, v, cu, cu, layout.max_seqlen, layout.max_seqlen, backend="fa4")
    out.float().square().sum().backward()
    return out


@pytest.mark.parametrize("head_dim", [64, 72, 80, 104, 128])
def test_fa4_forward_and_backward_match_reference(head_dim):
    skip_without_fa4(head_dim)
    longest = max(FA4_LENGTHS)
    q, k, v, cu, _ = inputs(FA4_LENGTHS, FA4_LENGTHS, head_dim, torch.bfloat16, seed=10 + head_dim)
    upstream = torch.randn(q.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(head_dim))
    got = forward_backward("fa4", q, k, v, cu, cu, longest, longest, upstream)
    ref = forward_backward("reference", q.float(), k.float(), v.float(), cu, cu, longest, longest, upstream)
    for label, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all(), f"fa4 {label} hd {head_dim}"
        assert relative_error(a, b) <= 1e-2, f"fa4 {label} hd {head_dim}: {relative_error(a, b):.2e}"
    # every segment's output on its own, single tokens included (their output is their value row)
    bounds = SegmentLayout.from_lengths(FA4_LENGTHS).cu_seqlens_host.tolist()
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        error = relative_error(got[0][start:end], ref[0][start:end])
        assert error <= 1e-2, f"fa4 out hd {head_dim} segment {i} ({end - start} tokens): {error:.2e}"


def test_fa4_backward_probe_on_this_gpu():
    """The probe's verdict per head_dim, and that gradient calls run where the probe found them right:
    64 and 128 native, 72 (SigLIP2 so400m), 80 and 104 zero-padded or native as measured."""
    skip_without_fa4(72)
    verdicts = {}
    for head_dim in (64, 72, 80, 96, 104, 128):
        run_at, findings = attention.fa4_backward_head_dim("cuda", torch.bfloat16, head_dim)
        verdicts[head_dim] = {"runs_at": run_at, "findings": findings}
        assert run_at in (head_dim, -(-head_dim // 32) * 32), (head_dim, findings)
    report({"check": "fa4_backward_probe", "version": importlib.metadata.version("flash-attn-4"),
            "gpu": torch.cuda.get_device_name(), "verdicts": verdicts})
    assert verdicts[64]["runs_at"] == 64 and verdicts[128]["runs_at"] == 128


def test_fa4_training_attention_is_the_fastest_right_one():
    """At head_dim 72 a call that takes a gradient runs the fastest right kernel: FA4 (zero-padded
    where its own backward is wrong) against torch's varlen FA2, forward + backward on `mixed`-like packs."""
    skip_without_fa4(72)
    lengths = [64, 1024, 256, 729, 100, 900, 400, 1024] * 8
    layout = SegmentLayout.from_lengths(lengths)
    q, k, v, cu, _ = inputs(lengths, lengths, 72, torch.bfloat16, seed=7)
    upstream = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)

    def seconds(backend, repeats=10):
        step = lambda: forward_backward(backend, q, k, v, cu, cu, layout.max_seqlen, layout.max_seqlen, upstream)
        step(), step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeats / 1e3

    timings = {name: seconds(name) for name in ("fa4", "torch_varlen") if available(name, torch.bfloat16, 72)}
    chosen = select_backend("cuda", torch.bfloat16, 72, backward=True)
    flops = 3.5 * 4 * sum(n * n for n in lengths) * 4 * 72  # forward 4·n²·hd per head, backward 2.5x
    report({"check": "fa4_training_attention", "head_dim": 72, "chosen": chosen,
            "seconds": timings, "tflops": {name: flops / t / 1e12 for name, t in timings.items()},
            "fa4_runs_at": attention.fa4_backward_head_dim("cuda", torch.bfloat16, 72)[0]})
    assert chosen == min(timings, key=timings.get), timings


def test_fa4_forward_and_backward_make_no_host_sync():
    skip_without_fa4(72)
    fa4_pass([1, 300, 77, 1024], seed=1)  # compiles the kernels this pack composition needs
    lengths = [5, 700, 1, 1, 2048, 33]  # another composition served by the same kernels
    q, k, v, _, _ = inputs(lengths, lengths, 72, torch.bfloat16, seed=2)
    layout = SegmentLayout.from_lengths(lengths)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cu = layout.cu_seqlens("cuda")
        out = varlen_attention(q, k, v, cu, cu, layout.max_seqlen, layout.max_seqlen, backend="fa4")
        out.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(t).all() for t in (out, q.grad, k.grad, v.grad))


def test_fa4_is_chosen_automatically_on_hopper(monkeypatch):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the automatic choice checked here is Hopper's (sm90)")
    reason = attention._fa4_import_error()
    if reason:
        pytest.skip(f"fa4: {reason}")
    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    for head_dim in (64, 72, 128):
        assert backend_report("cuda", torch.bfloat16, head_dim)["fa4"] is None
        assert select_backend("cuda", torch.bfloat16, head_dim) == "fa4"
        assert select_backend("cuda", torch.float16, head_dim) == "fa4"
    calls = []
    fa4 = BACKENDS["fa4"]
    monkeypatch.setitem(BACKENDS, "fa4", dataclasses.replace(fa4, run=lambda *args: calls.append(1) or fa4.run(*args)))
    q, k, v, cu, _ = inputs(LENGTHS, LENGTHS, 72, torch.bfloat16, seed=4)
    with torch.no_grad():  # a forward-only call: gradient calls at head_dim 72 may take another backend
        out = varlen_attention(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS))
        ref = varlen_attention(q.float(), k.float(), v.float(), cu, cu, max(LENGTHS), max(LENGTHS), backend="reference")
    assert calls == [1] and relative_error(out, ref) <= 1e-2


def test_fa4_compiles_once_for_many_pack_compositions():
    skip_without_fa4(72)
    interface = importlib.import_module("flash_attn.cute.interface")
    caches = [
        getattr(getattr(interface, name, None), "compile_cache", None)
        for name in ("_flash_attn_fwd", "_flash_attn_bwd", "_bwd_preprocess", "_bwd_postprocess_convert")
    ]
    if not all(isinstance(getattr(cache, "cache", None), dict) for cache in caches):
        pytest.skip("this flash-attn-4 keeps its compiled kernels where this test cannot count them")

    def compiled():
        return [len(cache.cache) for cache in caches]

    # Segments longer than one tile (192 query rows at head_dim 72, 128 key rows) and at most 256
    # of them: one kernel set, whatever the token count, the number of segments or their lengths.
    fa4_pass([1, 300, 77, 1024], seed=1)
    before = compiled()
    for seed, lengths in enumerate([[2000], [193] * 40 + [1], [1, 1, 4000, 3, 900, 250] * 7, [5, 700, 2, 2048]]):
        fa4_pass(lengths, seed=10 + seed)
    assert compiled() == before
    # A pack whose segments all fit one tile takes FA4's one-tile variants: one more forward and
    # one more backward kernel at most, and none for the next such pack.
    fa4_pass([1, 17, 64, 33, 2], seed=20)
    short = compiled()
    assert short[0] - before[0] <= 1 and short[1] - before[1] <= 1 and short[2:] == before[2:]
    fa4_pass([3, 50, 9, 60], seed=21)
    assert compiled() == short


# ---------------------------------------------------------------------------------------------
# float32 on CUDA: the automatic choice is a float32 kernel with a backward


@pytest.mark.parametrize("head_dim", [64, 72])
def test_float32_tower_takes_efficient_with_float32_gradients(monkeypatch, head_dim):
    monkeypatch.delenv(attention.ENV_VAR, raising=False)
    if not available("efficient", torch.float32, head_dim):
        pytest.skip(f"efficient: {backend_report('cuda', torch.float32, head_dim)['efficient']}")
    assert select_backend("cuda", torch.float32, head_dim) == "efficient"
    g = torch.Generator(device="cuda").manual_seed(head_dim)
    q, k, v = (torch.randn(sum(LENGTHS), 4, head_dim, device="cuda", generator=g) for _ in range(3))
    query = torch.randn(len(LENGTHS), 4, head_dim, device="cuda", generator=g)
    up_tokens = torch.randn(q.shape, device="cuda", generator=g)
    up_pooled = torch.randn(query.shape, device="cuda", generator=g)

    def tower_attention(backend):
        """Self-attention and attention pooling the way a tower calls them, with gradients."""
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, query)]
        context = VarlenContext.from_lengths(LENGTHS, torch.device("cuda"), backend)
        tokens = context.attend(*leaves[:3])
        pooled = context.pool(leaves[3], *leaves[1:3])
        ((tokens * up_tokens).sum() + (pooled * up_pooled).sum()).backward()
        return [tokens, pooled] + [t.grad for t in leaves]

    got, ref = tower_attention(None), tower_attention("reference")
    labels = ("tokens", "pooled", "dq", "dk", "dv", "dquery")
    for label, a, b in zip(labels, got, ref):
        error = relative_error(a, b)
        assert a.dtype == torch.float32 and error <= 1e-4, f"{label} hd {head_dim}: {error:.2e}"
