"""The fp8 mode on the CPU: the number format and its rules for odd rows, the e4m3 product against
a float64 one, every family's fp8 model against its float32 model, the switch and its refusals.

PyTorch's CPU ``_scaled_mm`` is the real call the GPU makes (the CPU has no Triton kernel: the
rows are quantised by ``quantize_rows``, the definition the GPU kernel is tested against in
tests/test_fp8_gpu.py).
"""

import pytest
import torch

import packvit
from packvit.fp8 import E4M3_MAX, MIN_AMAX, Fp8GatedMlp, Fp8Linear, Fp8Mlp, check_fp8_device, quantize_rows, quantize_weight
from packvit.harness import randomize_parameters
from packvit.layers import GatedMlp, Mlp
from packvit.models.aimv2 import AIMv2Config, AIMv2Packing
from packvit.models.dinov3 import DINOv3Config, DINOv3ViTPacking
from packvit.models.llava_vit import LlavaViTPackingConfig, LlavaViTPackingModel
from packvit.models.siglip2 import Siglip2NaflexConfig, Siglip2NaflexPacking
from packvit.packing import PackedBatch

FAMILIES = ("siglip2", "dinov3", "aimv2", "llava_vit")
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=2, patch_size=4)
#: fp8 against float32 on these tiny random models (3 blocks of width 64), measured with torch 2.13
#: on the CPU: mean token cosine 0.99869 (AIMv2, OneVision) to 0.99985 (DINOv3), smallest token
#: cosine 0.99667, smallest pooled cosine 0.99785 (OneVision); bf16 alone: 0.99993 or more
MEAN_TOKEN_COSINE, MIN_TOKEN_COSINE, POOLED_COSINE = 0.998, 0.99, 0.997


def build(family: str, **overrides):
    """A random float32 model of the family (every parameter drawn, none left at its init)."""
    if family == "siglip2":
        model = Siglip2NaflexPacking(Siglip2NaflexConfig(**{**TINY, **overrides}, num_patches=16))
    elif family == "dinov3":
        model = DINOv3ViTPacking(DINOv3Config(**{**TINY, **overrides}, num_register_tokens=2))
    elif family == "aimv2":
        model = AIMv2Packing(AIMv2Config(**{**TINY, **overrides}, is_native=True))
    else:
        model = LlavaViTPackingModel(LlavaViTPackingConfig(**{**TINY, **overrides}))
    randomize_parameters(model, torch.Generator().manual_seed(0))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{family: directory}``: a random model of each family saved by packvit's save_pretrained."""
    root = tmp_path_factory.mktemp("fp8")
    paths = {}
    for family in FAMILIES:
        paths[family] = root / family
        build(family).save_pretrained(paths[family])
    return paths


def random_batch(model, grids, seed=0) -> PackedBatch:
    grid_thw = torch.tensor(grids, dtype=torch.int64)
    patches = torch.randn(int(grid_thw.prod(dim=1).sum()), model.patch_dim, generator=torch.Generator().manual_seed(seed))
    return PackedBatch(patches, grid_thw, model.patch_layout)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


# --- the number format -------------------------------------------------------------------------


def test_rows_round_trip_with_one_scale_per_row():
    generator = torch.Generator().manual_seed(0)
    magnitudes = torch.logspace(-6, 6, 13)[:, None]  # rows from 1e-6 to 1e6
    x = torch.randn(13, 96, generator=generator) * magnitudes
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (13, 1)
    assert torch.equal(scale, x.abs().amax(dim=1, keepdim=True) / E4M3_MAX)
    # the largest entry of every row lands exactly on ±448
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((13,), E4M3_MAX))
    restored = q.float() * scale
    # e4m3: 3 mantissa bits (half-ulp 2^-4 relative), subnormal steps of 2^-9 in units of the scale
    bound = torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10)
    assert ((restored - x).abs() <= bound).all()


def test_rows_of_zeros_tiny_and_huge_values():
    x = torch.zeros(4, 32)
    x[1] = 1e-30  # below MIN_AMAX: quantised against it, to zeros
    x[2] = 3e38  # near float32's largest
    x[3, 0] = -1e-3
    q, scale = quantize_rows(x)
    assert torch.equal(scale[:2, 0], torch.full((2,), MIN_AMAX / E4M3_MAX))
    assert torch.equal(q[:2].float(), torch.zeros(2, 32))
    assert torch.isfinite(scale).all() and torch.isfinite(q.float()).all()
    assert torch.allclose(q[2].float() * scale[2], x[2], rtol=2**-4)
    assert q[3, 0].float() == -E4M3_MAX and torch.equal(q[3, 1:].float(), torch.zeros(31))


def test_infinite_and_nan_rows_follow_the_rule():
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    x[1, 3] = float("inf")
    x[2, 5] = float("-inf")
    x[3, 7] = float("nan")
    q, scale = quantize_rows(x)
    # ±inf: the largest float32 scale, the infinite entries at ±448, no NaN anywhere
    assert torch.isfinite(scale[1:3]).all() and not torch.isnan(q[:3].float()).any()
    assert q[1, 3].float() == E4M3_MAX and q[2, 5].float() == -E4M3_MAX
    # NaN: the row's scale is NaN, the other rows are untouched
    assert torch.isnan(scale[3]).all() and torch.isfinite(scale[:3]).all()
    assert torch.equal(quantize_rows(x[:1])[0].float(), q[:1].float())


def test_weights_are_quantised_per_output_channel():
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(2)) * torch.logspace(-3, 3, 48)[:, None]
    q, scale = quantize_weight(weight)
    assert scale.shape == (1, 48)
    assert torch.equal(scale[0], weight.abs().amax(dim=1) / E4M3_MAX)
    assert ((q.float() * scale.t() - weight).abs() <= torch.maximum(weight.abs() * 2.0**-4, scale.t() * 2.0**-10)).all()


# --- the e4m3 product ----------------------------------------------------------------------------


@pytest.mark.parametrize("act, gated", [(None, False), ("gelu_pytorch_tanh", False), ("gelu", False), ("silu", True)])
def test_scaled_product_equals_the_float64_product_of_the_quantised_operands(act, gated):
    generator = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(80, 64, generator=generator) / 8, torch.randn(80, generator=generator)
    layer = Fp8Linear(weight, bias, torch.bfloat16, act=act, gated=gated)
    x = torch.randn(37, 128 if gated else 64, generator=generator).bfloat16()
    with torch.inference_mode():
        out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (37, 80)
    qx, sx = quantize_rows(x, act, gated)
    expected = (qx.double() * sx.double()) @ (layer.weight.double() * layer.weight_scale.double().t()).t()
    expected += layer.bias.double()
    # the only rounding left: float32 accumulation and the bf16 output (8 bits)
    assert ((out.double() - expected).abs() <= 2**-8 * expected.abs() + 1e-3).all()
    # and against the float layer: the e4m3 error, a few percent of the output's scale
    reference_input = x.float()
    if gated:
        gate, up = reference_input.chunk(2, dim=-1)
        reference_input = torch.nn.functional.silu(gate) * up
    elif act is not None:
        reference_input = packvit.layers.activation(act)(reference_input)
    reference = torch.nn.functional.linear(reference_input, weight, bias)
    assert cosines(out.float(), reference).min() >= 0.998


def test_zero_infinite_and_nan_rows_through_the_layer():
    generator = torch.Generator().manual_seed(4)
    layer = Fp8Linear(torch.randn(32, 48, generator=generator) / 7, torch.randn(32, generator=generator), torch.bfloat16)
    x = torch.randn(4, 48, generator=generator).bfloat16()
    x[0] = 0
    x[1, 2] = float("inf")
    x[2, 9] = float("nan")
    with torch.inference_mode():
        out = layer(x)
    assert torch.equal(out[0], layer.bias)  # zeros: the bias exactly
    assert not torch.isnan(out[1]).any()  # inf: no NaN made
    assert torch.isnan(out[2]).all()  # NaN: the whole row, as in bf16
    assert torch.isfinite(out[3]).all()  # the other rows untouched
    with torch.inference_mode():
        assert torch.equal(layer(x[3:]), out[3:])


# --- the models ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_in_fp8_stays_close_to_float32(checkpoints, family):
    reference = packvit.from_pretrained(checkpoints[family], dtype=torch.float32)
    model = packvit.from_pretrained(checkpoints[family], dtype="fp8")
    batch = random_batch(reference, [(1, 4, 4), (1, 3, 7), (1, 1, 1), (1, 6, 5)] + ([(2, 3, 3)] if family == "llava_vit" else []))
    with torch.inference_mode():
        expected, out = reference(batch), model(batch)
    assert out.last_hidden_state.dtype == torch.bfloat16
    tokens = cosines(out.last_hidden_state.float(), expected.last_hidden_state)
    assert tokens.mean() >= MEAN_TOKEN_COSINE and tokens.min() >= MIN_TOKEN_COSINE, (tokens.mean(), tokens.min())
    if expected.pooler_output is not None:
        assert cosines(out.pooler_output.float(), expected.pooler_output).min() >= POOLED_COSINE
    if expected.prefix_tokens is not None:
        assert cosines(out.prefix_tokens.float(), expected.prefix_tokens).min() >= MIN_TOKEN_COSINE


@pytest.mark.parametrize("family", FAMILIES)
def test_the_switch_quantises_the_block_projections_only(checkpoints, family):
    float_model = packvit.from_pretrained(checkpoints[family], dtype=torch.float32)
    model = packvit.from_pretrained(checkpoints[family], dtype="fp8")
    assert float_model.quantization is None and model.quantization == "fp8"
    assert model.dtype == model.activation_dtype == torch.bfloat16
    for float_block, block in zip(float_model.blocks, model.blocks):
        assert isinstance(block.attn.qkv, Fp8Linear) and isinstance(block.attn.proj, Fp8Linear)
        expected_mlp = Fp8GatedMlp if isinstance(float_block.mlp, GatedMlp) else Fp8Mlp
        assert isinstance(block.mlp, expected_mlp) and isinstance(float_block.mlp, (Mlp, GatedMlp))
        for layer in [block.attn.qkv, block.attn.proj, *block.mlp.children()]:
            assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    # the patch embedding, norms and heads stay in bf16 modules: every parameter left is bf16, frozen
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())
    assert all(isinstance(m, torch.nn.Linear) for name, m in model.named_modules() if not name.startswith("blocks.")
               and isinstance(m, (torch.nn.Linear, Fp8Linear)))
    # the weights are quantised from the checkpoint's float32 values, not from a bf16 copy
    weight = float_model.blocks[0].mlp.get_submodule("fc1" if expected_mlp is Fp8Mlp else "gate_up").weight
    q, scale = quantize_weight(weight)
    first = model.blocks[0].mlp.fc1 if expected_mlp is Fp8Mlp else model.blocks[0].mlp.gate_up
    assert torch.equal(first.weight.float(), q.float()) and torch.equal(first.weight_scale, scale)


def test_a_model_built_from_its_configuration_takes_the_switch_too():
    model = DINOv3ViTPacking(DINOv3Config(**TINY, num_register_tokens=2), dtype="fp8")
    assert model.quantization == "fp8" and isinstance(model.blocks[0].attn.qkv, Fp8Linear)


def test_absent_qkv_bias_parts_stay_zero_in_fp8(tmp_path):
    """DINOv3 has no key bias: the fused bias's key part is used as zeros whatever it holds."""
    model = build("dinov3")
    assert model.blocks[0].attn.bias_parts == (True, False, True)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.bias[TINY["hidden_size"]: 2 * TINY["hidden_size"]] = 5.0  # what project never adds
    model.save_pretrained(tmp_path)
    reference = packvit.from_pretrained(tmp_path, dtype=torch.float32)
    fp8 = packvit.from_pretrained(tmp_path, dtype="fp8")
    hidden = TINY["hidden_size"]
    assert torch.equal(fp8.blocks[0].attn.qkv.bias[hidden: 2 * hidden].float(), torch.zeros(hidden))
    batch = random_batch(reference, [(1, 5, 5), (1, 2, 3)])
    with torch.inference_mode():
        assert cosines(fp8(batch).last_hidden_state.float(), reference(batch).last_hidden_state).mean() >= MEAN_TOKEN_COSINE


def test_compiled_layers_run_the_fp8_path_without_recompiling(checkpoints):
    dynamo_counters = pytest.importorskip("torch._dynamo.utils").counters
    torch._dynamo.reset()
    dynamo_counters.clear()
    model = packvit.from_pretrained(checkpoints["dinov3"], dtype="fp8")
    graphs_after_first_pack = None
    for seed, grids in enumerate(([(1, 3, 4), (1, 5, 2)], [(1, 1, 1), (1, 7, 3), (1, 2, 9)])):
        batch = random_batch(model, grids, seed)
        with torch.inference_mode(), model.runtime(compile_layers=True):
            compiled = model(batch).last_hidden_state
        with torch.inference_mode(), model.runtime(compile_layers=False):
            eager = model(batch).last_hidden_state
        # the compiler keeps the norms' intermediates in float32, which moves a few e4m3 roundings
        assert cosines(compiled.float(), eager.float()).min() >= 0.999
        if graphs_after_first_pack is None:
            graphs_after_first_pack = dynamo_counters["stats"]["unique_graphs"]
            assert graphs_after_first_pack > 0
    assert sum(dynamo_counters["recompiles"].values()) == 0
    assert dynamo_counters["stats"]["unique_graphs"] == graphs_after_first_pack


SYNCING_CALLS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "nonzero", "any", "all",
                 "equal", "allclose", "unique", "masked_select"}


def test_fp8_forward_adds_no_call_that_reads_the_device_back(checkpoints):
    """Every torch function the fp8 forward calls that could wait for the device is one the bf16
    forward calls too (the template's host-side work on grid_thw). GPU check: test_fp8_gpu.py."""
    from torch.overrides import TorchFunctionMode, resolve_name

    class Recorder(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.add((resolve_name(func) or getattr(func, "__name__", str(func))).rsplit(".", 1)[-1])
            return func(*args, **(kwargs or {}))

    def called(model):
        batch = random_batch(model, [(1, 3, 4), (1, 2, 2)])
        with torch.inference_mode(), Recorder() as recorder:
            model(batch)
        return recorder.names

    bf16 = called(packvit.from_pretrained(checkpoints["siglip2"], dtype=torch.bfloat16))
    fp8 = called(packvit.from_pretrained(checkpoints["siglip2"], dtype="fp8"))
    assert "_scaled_mm" in fp8
    assert not (fp8 - bf16) & SYNCING_CALLS, sorted((fp8 - bf16) & SYNCING_CALLS)


# --- refusals ------------------------------------------------------------------------------------


def test_gpus_without_fp8_and_other_devices_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"A100.*compute capability 8\.0.*8\.9 or newer.*bf16"):
        check_fp8_device(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_device(torch.device("cuda"))  # Hopper: accepted
    check_fp8_device(torch.device("cpu"))
    with pytest.raises(ValueError, match="'cuda' or 'cpu'"):
        check_fp8_device(torch.device("meta"))


def test_sizes_the_gpu_kernels_cannot_take_are_refused_by_name():
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv \(40 → 120 features.*multiples of 16"):
        DINOv3ViTPacking(DINOv3Config(**{**TINY, "hidden_size": 40}, num_register_tokens=2), dtype="fp8")


def test_an_fp8_model_refuses_gradients_saving_and_casts(checkpoints, tmp_path):
    model = packvit.from_pretrained(checkpoints["aimv2"], dtype="fp8")
    batch = random_batch(model, [(1, 3, 3)])
    assert model(batch).last_hidden_state.grad_fn is None  # grad mode on, nothing requires grad: runs
    model.requires_grad_(True)
    with pytest.raises(RuntimeError, match="without gradients.*inference_mode"):
        model(batch)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="not saved.*dtype='fp8'"):
        model.save_pretrained(tmp_path / "fp8")
    assert not (tmp_path / "fp8").exists()
    first = model.embeddings.patch_embed.weight
    for cast in (lambda: model.to(torch.float32), lambda: model.half(), lambda: model.to("cpu", torch.bfloat16)):
        with pytest.raises(ValueError, match="keeps its formats"):
            cast()
        assert model.embeddings.patch_embed.weight is first and first.dtype == torch.bfloat16  # nothing moved
    assert model.to("cpu") is model and model.blocks[0].attn.qkv.weight.dtype == torch.float8_e4m3fn


def test_an_unknown_dtype_name_lists_fp8():
    with pytest.raises(ValueError, match="'fp8'"):
        DINOv3ViTPacking(DINOv3Config(**TINY, num_register_tokens=2), dtype="fp16")
