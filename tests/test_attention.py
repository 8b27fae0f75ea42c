import sys
import types

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


# ---------------------------------------------------------------------------------------------
# Offsets checked on the host (the CPU path, a CPU tensor, or a SegmentLayout)


def seven_rows(lengths=(3, 4), seed=3):
    """q, k, v of 7 rows in two segments, and the segments' correct layout."""
    q, k, v = random_qkv(list(lengths), list(lengths), seed=seed)
    return q, k, v, SegmentLayout.from_lengths(list(lengths))


def int32(values):
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize(
    "bad_q, max_q, message",
    [
        (int32([0, 3, 6]), 4, "cu_seqlens_q ends at 6 but q has 7 rows"),  # last offset short of the rows
        (int32([0, 3, 8]), 5, "cu_seqlens_q ends at 8 but q has 7 rows"),  # last offset past the rows
        (int32([1, 3, 7]), 4, "cu_seqlens_q starts at 1, not 0"),
        (int32([0, 5, 3, 7]), 5, "cu_seqlens_q decreases from 5 to 3 \\(entries 1 and 2\\)"),
        (int32([0, 3, 7]), 3, "max_seqlen_q 3 is less than the longest segment of q \\(4 tokens, segment 1\\)"),
        (int32([0]), 4, "cu_seqlens_q has 1 entries, but the offsets of n segments have n \\+ 1"),
        (int32([]), 4, "cu_seqlens_q has 0 entries"),
    ],
)
def test_host_offsets_that_do_not_describe_q_are_refused(bad_q, max_q, message):
    q, k, v, layout = seven_rows()
    cu_k = layout.cu_seqlens_host if bad_q.shape[0] != 4 else int32([0, 3, 3, 7])
    with pytest.raises(ValueError, match=message):
        varlen_attention(q, k, v, bad_q, cu_k, max_q, 4)


def test_host_offsets_of_the_keys_are_checked_too():
    q, k, v, layout = seven_rows()
    with pytest.raises(ValueError, match="cu_seqlens_k ends at 6 but k has 7 rows"):
        varlen_attention(q, k, v, layout.cu_seqlens_host, int32([0, 2, 6]), 4, 4)
    with pytest.raises(ValueError, match="max_seqlen_k 2 is less than the longest segment of k"):
        varlen_attention(q, k, v, layout.cu_seqlens_host, layout.cu_seqlens_host, 4, 2)


def test_query_segment_without_keys_is_refused():
    q, k, v = random_qkv([2, 3], [0, 5])
    with pytest.raises(ValueError, match="query segment 0 has 2 tokens but key segment 0 is empty"):
        varlen_attention(q, k, v, int32([0, 2, 5]), int32([0, 0, 5]), 3, 5)


def test_empty_segments_on_both_sides_are_allowed():
    q, k, v = random_qkv([3, 4], [3, 4])
    cu = int32([0, 3, 3, 7])  # the middle segment is empty for queries and keys alike
    out = varlen_attention(q, k, v, cu, cu, 4, 4)
    assert (out - dense_per_item(q, k, v, [3, 4], [3, 4])).abs().max() <= 1e-6


@pytest.mark.parametrize("max_seqlen", [torch.tensor(4), -1, 4.0, True])
def test_max_seqlen_must_be_a_host_integer(max_seqlen):
    q, k, v, layout = seven_rows()
    cu = layout.cu_seqlens_host
    with pytest.raises(ValueError, match="max_seqlen_q must be a non-negative Python int"):
        varlen_attention(q, k, v, cu, cu, max_seqlen, 4)


def test_segment_layout_and_host_offsets_without_max_seqlen():
    q, k, v, layout = seven_rows()
    expected = dense_per_item(q, k, v, [3, 4], [3, 4])
    for cu in (layout, layout.cu_seqlens_host):
        out = varlen_attention(q, k, v, cu, cu)  # max_seqlen computed from the host offsets
        assert (out - expected).abs().max() <= 1e-6
    _, _, _, max_q, max_k = attention._prepare(q, k, v, layout, layout, None, 9, None, None)
    assert (max_q, max_k) == (4, 9)  # the longest segment, or the caller's upper bound


def test_segment_layout_is_checked_against_the_tensors():
    q, k, v, _ = seven_rows()
    with pytest.raises(ValueError, match="cu_seqlens_q ends at 8 but q has 7 rows"):
        varlen_attention(q, k, v, SegmentLayout.from_lengths([4, 4]), SegmentLayout.from_lengths([3, 4]))


@pytest.mark.parametrize(
    "cu, got",
    [
        ([0, 3, 7], "got list"),
        (torch.tensor([0, 9, 3, 9, 7, 9], dtype=torch.int32)[::2], "torch.int32 \\(3,\\)"),  # not contiguous
        (torch.tensor([[0, 3, 7]], dtype=torch.int32), "torch.int32 \\(1, 3\\)"),
    ],
)
def test_offsets_that_are_not_a_contiguous_int32_vector_are_refused(cu, got):
    q, k, v, layout = seven_rows()
    with pytest.raises(ValueError, match=f"cu_seqlens_q must be a contiguous 1-D int32 tensor.*{got}"):
        varlen_attention(q, k, v, cu, layout.cu_seqlens_host, 4, 4)


# ---------------------------------------------------------------------------------------------
# Offsets on a device are never read: meta tensors have no values, so any read would raise


def meta_inputs(rows=7, segments=2, head_dim=24):
    q = torch.empty(rows, 3, head_dim, device="meta")
    return q, q, q, torch.empty(segments + 1, dtype=torch.int32, device="meta")


def test_device_offsets_pass_through_unread():
    q, k, v, cu = meta_inputs()
    name, cu_q, cu_k, max_q, max_k = attention._prepare(q, k, v, cu, cu, 4, 4, None, None)
    assert cu_q is cu and cu_k is cu and (max_q, max_k) == (4, 4)
    assert name == "reference"  # nothing but the reference path claims the meta device


def test_device_offsets_checks_that_need_no_values():
    q, k, v, cu = meta_inputs()
    with pytest.raises(ValueError, match="max_seqlen_q is needed with cu_seqlens_q on meta"):
        attention._prepare(q, k, v, cu, cu, None, 4, None, None)
    with pytest.raises(ValueError, match="2 segments of at most 3 tokens cannot hold the 7 rows of q"):
        attention._prepare(q, k, v, cu, cu, 3, 4, None, None)
    with pytest.raises(ValueError, match="cu_seqlens_k has 1 entries"):
        attention._prepare(q, k, v, cu, cu[:1], 4, 4, None, None)
    with pytest.raises(ValueError, match="uniform_seqlen 4 does not describe 7 query and 7 key tokens in 2 segments"):
        attention._prepare(q, k, v, cu, cu, 4, 4, None, 4)
    with pytest.raises(ValueError, match="contiguous 1-D int32 tensor on meta or the CPU"):
        attention._prepare(q, k, v, cu.long(), cu, 4, 4, None, None)


def test_host_offsets_are_moved_to_the_tensors_device():
    q, k, v, _ = meta_inputs()
    layout = SegmentLayout.from_lengths([3, 4])
    _, cu_q, cu_k, max_q, _ = attention._prepare(q, k, v, layout, layout.cu_seqlens_host, None, None, None, None)
    assert cu_q.device.type == "meta" and cu_k.device.type == "meta" and max_q == 4


# ---------------------------------------------------------------------------------------------
# Tensors, uniform_seqlen, head_dim and dtype


@pytest.mark.parametrize("uniform_seqlen", [0, -4, True, 4.0])
def test_uniform_seqlen_must_be_a_positive_integer(uniform_seqlen):
    q, k, v = random_qkv([4, 4], [4, 4])
    cu = SegmentLayout.from_lengths([4, 4]).cu_seqlens_host
    with pytest.raises(ValueError, match="uniform_seqlen must be a positive integer"):
        varlen_attention(q, k, v, cu, cu, 4, 4, uniform_seqlen=uniform_seqlen)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_tensors_are_refused(dtype):
    q, k, v, layout = seven_rows()
    cu = layout.cu_seqlens_host
    q, k, v = (t.to(dtype) for t in (q, k, v))
    with pytest.raises(ValueError, match=f"attention takes floating-point q, k and v .*got {dtype}"):
        varlen_attention(q, k, v, cu, cu, 4, 4)


def test_tensors_without_heads_or_head_dim_are_refused():
    cu = SegmentLayout.from_lengths([3, 4]).cu_seqlens_host
    no_heads = torch.randn(7, 0, 24)
    with pytest.raises(ValueError, match="q, k and v have no heads"):
        varlen_attention(no_heads, no_heads, no_heads, cu, cu, 4, 4)
    no_dim = torch.randn(7, 3, 0)
    with pytest.raises(ValueError, match="head_dim must be a positive integer .* got 0"):
        varlen_attention(no_dim, no_dim, no_dim, cu, cu, 4, 4)


def test_non_tensor_inputs_are_refused():
    q, k, v, layout = seven_rows()
    cu = layout.cu_seqlens_host
    with pytest.raises(ValueError, match="q must be \\[total_tokens, heads, head_dim\\], got ndarray"):
        varlen_attention(q.numpy(), k, v, cu, cu, 4, 4)


@pytest.mark.parametrize("head_dim", [-8, 0, 7.5, True, "64"])
def test_head_dim_must_be_a_positive_integer_for_selection_and_report(head_dim):
    with pytest.raises(ValueError, match="head_dim must be a positive integer"):
        select_backend("cpu", torch.bfloat16, head_dim)
    with pytest.raises(ValueError, match="head_dim must be a positive integer"):
        backend_report("cpu", torch.bfloat16, head_dim)


def test_selection_refuses_integer_dtypes():
    with pytest.raises(ValueError, match="floating-point"):
        select_backend("cpu", torch.int64, 64)
    with pytest.raises(ValueError, match="floating-point"):
        backend_report("cpu", torch.bool, 64)


# ---------------------------------------------------------------------------------------------
# FlashAttention 4: availability, head dims, call convention, place in the automatic order

REAL_CACHED = (attention._auto_backend, attention._import_error, attention._fa4_import_error)


@pytest.fixture
def fresh_caches():
    """Empty the selection and import caches before and after a test that fakes the machine."""
    for cached in REAL_CACHED:
        cached.cache_clear()
    yield
    for cached in REAL_CACHED:
        cached.cache_clear()


def fake_fa4_module(monkeypatch, with_max_seqlen=True):
    """A stand-in ``flash_attn.cute`` with flash-attn-4 4.0.0b36's signature; records its calls."""
    calls = []
    if with_max_seqlen:
        def flash_attn_varlen_func(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                                   max_seqlen_k=None, min_seqlen_k=None, seqused_q=None, seqused_k=None,
                                   softmax_scale=None, causal=False, return_lse=False):
            calls.append(dict(qv=qv, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                              max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale, causal=causal))
            return q * 2, None
    else:
        def flash_attn_varlen_func(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, softmax_scale=None,
                                   causal=False):
            raise AssertionError("not called")
    module = types.ModuleType("flash_attn.cute")
    module.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", module)
    return calls


def test_fa4_missing_names_the_install_command(monkeypatch, fresh_caches):
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # an import of it raises ImportError
    reason = backend_report("cpu", torch.bfloat16, 64)["fa4"]
    assert "cannot import flash_attn.cute" in reason and "pip install 'packvit[fa4]'" in reason


def test_fa4_without_max_seqlen_asks_for_an_upgrade(monkeypatch, fresh_caches):
    fake_fa4_module(monkeypatch, with_max_seqlen=False)
    reason = attention._fa4_why_not(torch.device("cuda", 0), torch.bfloat16, 64)
    assert "takes no max_seqlen_q, max_seqlen_k" in reason and "pip install -U 'packvit[fa4]'" in reason


def test_fa4_call_passes_offsets_and_maxima_by_keyword(monkeypatch, fresh_caches):
    calls = fake_fa4_module(monkeypatch)
    q, k, v, layout = seven_rows()
    cu = layout.cu_seqlens_host
    out = attention._run_fa4(q, k, v, cu, cu, 4, 5, 0.25)
    assert torch.equal(out, q * 2)  # the output tensor, not the (out, lse) tuple
    (call,) = calls
    assert call["qv"] is None and call["cu_seqlens_q"] is cu and call["cu_seqlens_k"] is cu
    assert (call["max_seqlen_q"], call["max_seqlen_k"], call["softmax_scale"], call["causal"]) == (4, 5, 0.25, False)
    assert type(call["max_seqlen_q"]) is int


@pytest.mark.parametrize(
    "capability, dtype, head_dim, expected",
    [
        ((8, 6), torch.bfloat16, 64, "compute capability 9.0, 10.x or 11.x), this GPU has 8.6"),
        ((12, 0), torch.bfloat16, 64, "this GPU has 12.0"),
        ((9, 0), torch.bfloat16, 72, None),  # native on Hopper, no padding to 96
        ((9, 0), torch.float16, 256, None),
        ((9, 0), torch.bfloat16, 264, "multiple of 8 and at most 256 on sm90"),
        ((9, 0), torch.bfloat16, 76, "multiple of 8 and at most 256 on sm90"),
        ((9, 0), torch.float32, 64, "float16/bfloat16 only"),
        ((10, 0), torch.bfloat16, 128, None),
        ((10, 0), torch.bfloat16, 256, None),
        ((10, 0), torch.bfloat16, 192, "multiple of 8 up to 128, or 256, on sm10x"),
    ],
)
def test_fa4_devices_dtypes_and_head_dims(monkeypatch, capability, dtype, head_dim, expected):
    monkeypatch.setattr(attention, "_fa4_import_error", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    reason = attention._fa4_why_not(torch.device("cuda", 0), dtype, head_dim)
    assert reason is None if expected is None else expected in reason


def fake_hopper(monkeypatch, fa4=True):
    """An sm90 GPU with FA2, FA3 and (if ``fa4``) FA4 importable, as selection sees it."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    monkeypatch.setattr(attention, "_import_error", lambda module, attribute=None: None)
    monkeypatch.setattr(attention, "_fa4_import_error", lambda: None if fa4 else "cannot import flash_attn.cute")
    monkeypatch.delenv(attention.ENV_VAR, raising=False)


@pytest.mark.parametrize("head_dim", [64, 72, 128])
def test_fa4_comes_first_on_hopper(monkeypatch, fresh_caches, head_dim):
    fake_hopper(monkeypatch)
    gpu = torch.device("cuda", 0)
    assert select_backend(gpu, torch.bfloat16, head_dim) == "fa4"
    assert select_backend(gpu, torch.float32, head_dim) == "efficient"  # the float32 kernel with a backward


def test_without_fa4_hopper_takes_fa3_then_fa2(monkeypatch, fresh_caches):
    fake_hopper(monkeypatch, fa4=False)
    gpu = torch.device("cuda", 0)
    assert select_backend(gpu, torch.bfloat16, 72) == "fa3"
    no_fa3 = lambda module, attribute=None: "absent" if module == "flash_attn_interface" else None
    monkeypatch.setattr(attention, "_import_error", no_fa3)
    attention._auto_backend.cache_clear()
    assert select_backend(gpu, torch.bfloat16, 72) == "fa2"


def test_namespace_flash_attn_from_fa4_alone_is_not_fa2(monkeypatch, fresh_caches):
    # flash-attn-4 installs flash_attn/cute without flash_attn/__init__.py
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    reason = attention._flash_why_not(
        torch.device("cuda", 0), torch.bfloat16, 64, module="flash_attn", attribute="flash_attn_varlen_func"
    )
    assert reason == "flash_attn has no flash_attn_varlen_func: the package that provides it is not installed"


# ---------------------------------------------------------------------------------------------
# FlashAttention 4's backward: measured per head_dim, zero-padded where it is wrong


class DefectiveFA4Attention(torch.autograd.Function):
    """Attention whose backward has flash-attn-4 4.0.0b36's sm90 defects: dQ wrong where head_dim
    is not a multiple of 32, no backward at all at head_dim 104; the forward and dK, dV right."""

    @staticmethod
    def forward(ctx, q, k, v, cu, scale):
        ctx.save_for_backward(q, k, v, cu)
        ctx.scale = scale
        return attention._run_reference(q, k, v, cu, cu, None, None, scale)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, cu = ctx.saved_tensors
        head_dim = q.shape[-1]
        if head_dim == 104:
            raise RuntimeError("failed to partition `input`")
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = attention._run_reference(*leaves, cu, cu, None, None, ctx.scale)
            dq, dk, dv = torch.autograd.grad(out, leaves, grad)
        if head_dim % 32:
            dq = dq + dq.flip(0)  # the unwritten accumulator tail read back into dQ
        return dq, dk, dv, None, None


def defective_fa4_module(monkeypatch):
    """A stand-in ``flash_attn.cute`` with the defective backward; records the head_dim of each call."""
    head_dims = []

    def flash_attn_varlen_func(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                               max_seqlen_k=None, softmax_scale=None, causal=False, return_lse=False):
        head_dims.append(q.shape[-1])
        return DefectiveFA4Attention.apply(q, k, v, cu_seqlens_q, softmax_scale), None

    module = types.ModuleType("flash_attn.cute")
    module.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", module)
    REAL_FA4_PLAN.cache_clear()
    return head_dims


REAL_FA4_PLAN = attention._fa4_backward_plan


@pytest.fixture
def fresh_fa4_plan():
    REAL_FA4_PLAN.cache_clear()
    yield
    REAL_FA4_PLAN.cache_clear()


def test_fa4_probe_finds_the_wrong_and_the_failing_backward(monkeypatch, fresh_fa4_plan):
    defective_fa4_module(monkeypatch)
    cpu = torch.device("cpu")
    for right in (64, 96, 128):
        assert attention.fa4_probe(cpu, torch.float32, right) is None
    assert "is wrong on this GPU (dq relative error" in attention.fa4_probe(cpu, torch.float32, 72)
    assert "fails (RuntimeError: failed to partition `input`)" in attention.fa4_probe(cpu, torch.float32, 104)
    assert attention.fa4_backward_head_dim(cpu, torch.float32, 64) == (64, "backward right at head_dim 64")
    for head_dim, padded in ((72, 96), (80, 96), (104, 128)):
        run_at, findings = attention.fa4_backward_head_dim(cpu, torch.float32, head_dim)
        assert run_at == padded and f"zero-padded to head_dim {padded}" in findings


@pytest.mark.parametrize("head_dim", [72, 104])
def test_fa4_gradients_are_right_at_every_head_dim(monkeypatch, fresh_fa4_plan, head_dim):
    """With the defective kernel, packvit's fa4 call still gives exact gradients (zero-padded q, k, v,
    the real head_dim's softmax scale), and inference keeps the native head_dim."""
    head_dims = defective_fa4_module(monkeypatch)
    lengths = [5, 1, 40, 9]
    layout = SegmentLayout.from_lengths(lengths)
    cu = layout.cu_seqlens_host
    generator = torch.Generator().manual_seed(head_dim)
    q, k, v, upstream = (torch.randn(layout.total, 3, head_dim, generator=generator) for _ in range(4))

    def run(call):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = call(*leaves, cu, cu, layout.max_seqlen, layout.max_seqlen, None)
        return [out, *torch.autograd.grad((out * upstream).sum(), leaves)]

    got, expected = run(attention._run_fa4), run(attention._run_reference)
    padded = 96 if head_dim == 72 else 128
    assert head_dims[-1] == padded
    for label, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5, label
    with torch.no_grad():
        out = attention._run_fa4(q, k, v, cu, cu, layout.max_seqlen, layout.max_seqlen, None)
    assert head_dims[-1] == head_dim and (out - expected[0]).abs().max() <= 1e-5


def test_fa4_that_no_padding_makes_right_is_refused_for_gradients(monkeypatch, fresh_caches, fresh_fa4_plan):
    defective_fa4_module(monkeypatch)
    fake_hopper(monkeypatch)
    broken = "its backward at head_dim 72 is wrong on this GPU (dq relative error 1.0 against float32 attention)"
    monkeypatch.setattr(attention, "_fa4_backward_plan", lambda device, dtype, head_dim: (None, broken))
    gpu = torch.device("cuda", 0)
    assert select_backend(gpu, torch.bfloat16, 72) == "fa4"  # inference: the forward is right
    assert select_backend(gpu, torch.bfloat16, 72, backward=True) == "fa3"  # the next backend whose backward is right
    with pytest.raises(ValueError, match=r"'fa4' cannot take gradients on cuda torch.bfloat16 head_dim 72: its backward"):
        select_backend(gpu, torch.bfloat16, 72, backend="fa4", backward=True)


def test_automatic_gradient_calls_leave_fa4_where_its_own_backward_is_wrong(monkeypatch, fresh_caches, fresh_fa4_plan):
    """Zero-padded FA4 was measured slower than torch's varlen FA2 for training at head_dim 72 (H200):
    the automatic choice takes the next backend whose backward is right; a forced fa4 pads."""
    fake_hopper(monkeypatch)
    plans = {64: (64, "backward right at head_dim 64"), 72: (96, "wrong at 72; zero-padded to head_dim 96")}
    monkeypatch.setattr(attention, "_fa4_backward_plan", lambda device, dtype, head_dim: plans[head_dim])
    gpu = torch.device("cuda", 0)
    assert select_backend(gpu, torch.bfloat16, 64, backward=True) == "fa4"
    assert select_backend(gpu, torch.bfloat16, 72, backward=True) == "fa3"
    assert select_backend(gpu, torch.bfloat16, 72) == "fa4"
    assert select_backend(gpu, torch.bfloat16, 72, backend="fa4", backward=True) == "fa4"
