"""Every attention backend available on this GPU against the float32 reference path."""

import pytest
import torch

from packvit.attention import BACKENDS, backend_report, varlen_attention
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
    labels = ("out", "dq", "dk", "dv") if BACKENDS[name].has_backward else ("out",)
    for label, a, b in zip(labels, got, ref):
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
