import pytest
import torch

from packvit import attention
from packvit.attention import BACKENDS, backend_report, select_backend, varlen_attention
from packvit.packing import SegmentLayout


def dense_per_item(q, k, v, lengths_q, lengths_k, scale=None):
    """Attention computed item by item with explicit softmax in float64."""
    outputs, start_q, start_k = [], 0, 0
    for n_q, n_k in zip(lengths_q, lengths_k):
        qi = q[start_q : start_q + n_q].double().transpose(0, 1)
        ki = k[start_k : start_k + n_k].double().transpose(0, 1)
        vi = v[start_k : start_k + n_k].double().transpose(0, 1)
        s = scale if scale is not None else q.shape[-1] ** -0.5
        weights = torch.softmax(qi @ ki.transpose(-1, -2) * s, dim=-1)
        outputs.append((weights @ vi).transpose(0, 1))
        start_q, start_k = start_q + n_q, start_k + n_k
    return torch.cat(outputs).to(q.dtype)


def random_qkv(lengths_q, lengths_k, heads=3, head_dim=24, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths_q), heads, head_dim, generator=g, requires_grad=requires_grad)
    k = torch.randn(sum(lengths_k), heads, head_dim, generator=g, requires_grad=requires_grad)
    v = torch.randn(sum(lengths_k), heads, head_dim, generator=g, requires_grad=requires_grad)
    return q, k, v


LENGTHS = [1, 7, 1, 33, 2, 64]


@pytest.mark.parametrize("scale", [None, 0.3])
def test_reference_equals_dense_per_item_equal_lengths(scale):
    q, k, v = random_qkv(LENGTHS, LENGTHS)
    layout = SegmentLayout.from_lengths(LENGTHS)
    out = varlen_attention(q, k, v, layout.cu_seqlens_host, layout.cu_seqlens_host, layout.max_seqlen,
                           layout.max_seqlen, scale=scale, backend="reference")
    expected = dense_per_item(q, k, v, LENGTHS, LENGTHS, scale)
    assert out.shape == q.shape
    assert (out - expected).abs().max() <= 1e-6


def test_reference_one_query_per_item():
    lengths_q = [1] * len(LENGTHS)
    q, k, v = random_qkv(lengths_q, LENGTHS, seed=1)
    cu_q = SegmentLayout.one_per_item(len(LENGTHS)).cu_seqlens_host
    cu_k = SegmentLayout.from_lengths(LENGTHS).cu_seqlens_host
    out = varlen_attention(q, k, v, cu_q, cu_k, 1, max(LENGTHS))
    assert out.shape == (len(LENGTHS), 3, 24)
    assert (out - dense_per_item(q, k, v, lengths_q, LENGTHS)).abs().max() <= 1e-6


def test_reference_backward_matches_dense_gradients():
    lengths_q, lengths_k = [1, 5, 3], [4, 5, 1]
    q, k, v = random_qkv(lengths_q, lengths_k, seed=2, requires_grad=True)
    cu_q = SegmentLayout.from_lengths(lengths_q).cu_seqlens_host
    cu_k = SegmentLayout.from_lengths(lengths_k).cu_seqlens_host
    upstream = torch.randn(sum(lengths_q), 3, 24)
    (varlen_attention(q, k, v, cu_q, cu_k, 5, 5) * upstream).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (dense_per_item(q, k, v, lengths_q, lengths_k) * upstream).sum().backward()
    for g_varlen, t in zip(got, (q, k, v)):
        assert (g_varlen - t.grad).abs().max() <= 1e-6


def test_cpu_auto_selection_is_reference_and_report_explains_others():
    assert select_backend("cpu", torch.float32, 64) == "reference"
    report = backend_report("cpu", torch.bfloat16, 64)
    assert report["reference"] is None
    for name in ("torch_varlen", "aten_flash", "efficient"):
        assert report[name] and "CUDA" in report[name]
    assert set(report) == set(BACKENDS)


def test_named_backend_that_cannot_run_raises_instead_of_falling_back():
    q, k, v = random_qkv([4], [4])
    cu = SegmentLayout.from_lengths([4]).cu_seqlens_host
    with pytest.raises(ValueError, match="'torch_varlen' cannot run on cpu"):
        varlen_attention(q, k, v, cu, cu, 4, 4, backend="torch_varlen")
    with pytest.raises(ValueError, match="unknown attention backend"):
        varlen_attention(q, k, v, cu, cu, 4, 4, backend="flash9")


def test_environment_variable_overrides_selection(monkeypatch):
    monkeypatch.setenv(attention.ENV_VAR, "aten_flash")
    with pytest.raises(ValueError, match="'aten_flash' cannot run"):
        select_backend("cpu", torch.float32, 64)
    monkeypatch.setenv(attention.ENV_VAR, "reference")
    assert select_backend("cpu", torch.float32, 64) == "reference"
    monkeypatch.setenv(attention.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="PACKVIT_ATTENTION='nonsense'"):
        select_backend("cpu", torch.float32, 64)


def test_float32_to_half_only_kernel_is_refused_with_the_fix():
    reason = attention._flash_why_not(torch.device("cpu"), torch.float32, 64, module="torch")
    assert "CUDA" in reason
    if torch.cuda.is_available():
        reason = attention._flash_why_not(torch.device("cuda"), torch.float32, 64, module="torch")
        assert "float16/bfloat16 only" in reason and "dtype=torch.bfloat16" in reason


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda q, k, v, cu: (q[:, 0], k, v, cu), "q must be \\[total_tokens, heads, head_dim\\]"),
        (lambda q, k, v, cu: (q, k, v[:-1], cu), "k and v must have the same shape"),
        (lambda q, k, v, cu: (q[:, :, :8], k, v, cu), "q and k must agree"),
        (lambda q, k, v, cu: (q.double(), k, v, cu), "share one dtype"),
        (lambda q, k, v, cu: (q, k, v, cu.long()), "1-D int32"),
    ],
)
def test_input_validation(mutate, message):
    q, k, v = random_qkv([3, 4], [3, 4])
    cu = SegmentLayout.from_lengths([3, 4]).cu_seqlens_host
    q, k, v, cu = mutate(q, k, v, cu)
    with pytest.raises(ValueError, match=message):
        varlen_attention(q, k, v, cu, cu, 4, 4)


def test_segment_count_mismatch_is_rejected():
    q, k, v = random_qkv([3, 4], [3, 4])
    cu2 = SegmentLayout.from_lengths([3, 4]).cu_seqlens_host
    cu1 = SegmentLayout.from_lengths([7]).cu_seqlens_host
    with pytest.raises(ValueError, match="same number of segments"):
        varlen_attention(q, k, v, cu2, cu1, 4, 7)


def test_torch_varlen_signature_is_detected():
    call = attention._torch_varlen_call()
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        assert call is None
    else:
        assert callable(call)


def test_dense_sdpa_is_cuda_only_and_needs_uniform_segments():
    q, k, v = random_qkv([4, 4], [4, 4])
    cu = SegmentLayout.from_lengths([4, 4]).cu_seqlens_host
    with pytest.raises(ValueError, match="'dense_sdpa' cannot run on cpu"):
        varlen_attention(q, k, v, cu, cu, 4, 4, backend="dense_sdpa", uniform_seqlen=4)
    with pytest.raises(ValueError, match="needs segments of one length"):
        varlen_attention(q, k, v, cu, cu, 4, 4, backend="dense_sdpa")
    with pytest.raises(ValueError, match="uniform_seqlen 3 does not describe"):
        varlen_attention(q, k, v, cu, cu, 4, 4, uniform_seqlen=3)
    # on the CPU a uniform pack still takes the exact reference path
    out = varlen_attention(q, k, v, cu, cu, 4, 4, uniform_seqlen=4)
    assert (out - dense_per_item(q, k, v, [4, 4], [4, 4])).abs().max() <= 1e-6
