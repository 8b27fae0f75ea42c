"""OneVision Encoder: the 3-D RoPE against its formula, and packed ↔ standard parity.

The standard ``LlavaViTModel`` (published layout) is the reference: each checkpoint is a random
standard model saved with ``save_pretrained`` and loaded back through
``LlavaViTPackingModel.from_pretrained`` (which maps the published keys). float32, CPU; tolerance
1e-5 absolute on every token, the pooled output and every hidden_states entry.
"""

import math

import pytest
import torch

import packvit
from packvit.harness.llava_vit import ADAPTER, TINY
from packvit.harness.llava_vit_reference import LlavaViTModel, _apply_rope, _rope_freqs
from packvit.models.llava_vit import (
    LLAVA_VIT_SIZES,
    LlavaViTConfig,
    LlavaViTPackingConfig,
    LlavaViTPackingModel,
    llava_vit_packing_config,
)
from packvit.packing import patchify
from packvit.positions import RotaryTable, rope_3d_axis_widths, rope_3d_cos_sin
from packvit.preprocess.llava_vit import timeline_positions, timeline_slots


def apply_onevision_rope(x, cos, sin):
    return RotaryTable(cos, sin, "interleaved").apply(x, x)[0]
from family_helpers import import_timm, load_model_pairs, write_variant_checkpoints

ATOL = 1e-5
PATCH = TINY["patch_size"]
VARIANTS = {
    "ln_head": dict(layer_norm_type="layer_norm", use_head=True),
    "rms_no_head": dict(layer_norm_type="rms_norm", use_head=False),
    # head_dim 96 (not a power of two; split 12:18:18)
    "hd96_rms_head": dict(hidden_size=192, num_attention_heads=2, intermediate_size=160, layer_norm_type="rms_norm",
                          use_head=True),
}


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_variant_checkpoints(ADAPTER, tmp_path_factory.mktemp("llava_vit"), VARIANTS)


@pytest.fixture(scope="module")
def models(checkpoints):
    return load_model_pairs(ADAPTER, checkpoints)


def items_for(grids, seed=0):
    return ADAPTER.random_items(grids, PATCH, torch.Generator().manual_seed(seed))


def standard(model, item, **kwargs):
    """The standard model on one item ([C, H, W] or [T, C, H, W]), batch of one."""
    batch = item[None] if item.dim() == 3 else item.transpose(0, 1)[None]
    return model(batch, output_hidden_states=True, **kwargs)


def assert_item_parity(reference_out, packed_out, index, counts, use_head):
    """Tokens, pooled output and every hidden_states entry of item ``index`` of a pack."""
    tokens = packed_out.last_hidden_state.split(counts)[index]
    assert (tokens - reference_out.last_hidden_state[0]).abs().max().item() <= ATOL
    if use_head:
        assert (packed_out.pooler_output[index] - reference_out.pooler_output[0]).abs().max().item() <= ATOL
    else:
        assert packed_out.pooler_output is None and reference_out.pooler_output is None
    assert len(packed_out.hidden_states) == len(reference_out.hidden_states)
    for packed_hidden, reference_hidden in zip(packed_out.hidden_states, reference_out.hidden_states):
        assert (packed_hidden.split(counts)[index] - reference_hidden[0]).abs().max().item() <= ATOL


# --- the 3-D RoPE against its formula ------------------------------------------------------------


def rope_by_formula(x, positions, theta):
    """REFERENCE §4.4, one element at a time in float64: ``x [S, H, hd]``, ``positions [S, 3]``."""
    tokens, heads, head_dim = x.shape
    half = head_dim // 2
    unit = half // 16
    widths = (4 * unit, 6 * unit, 6 * unit)
    out = torch.empty(x.shape, dtype=torch.float64)
    for s in range(tokens):
        f = []
        for axis, width in enumerate(widths):
            f += [float(positions[s, axis]) * theta ** (-k / width) for k in range(width)]
        for h in range(heads):
            for i in range(half):
                m = (2 * i) % half
                alpha, beta = f[m], f[m + 1]
                x0, x1 = float(x[s, h, 2 * i]), float(x[s, h, 2 * i + 1])
                out[s, h, 2 * i] = x0 * math.cos(alpha) - x1 * math.sin(alpha)
                out[s, h, 2 * i + 1] = x1 * math.cos(beta) + x0 * math.sin(beta)
    return out


@pytest.mark.parametrize("head_dim", [32, 64, 96])
def test_rope_matches_formula(head_dim):
    generator = torch.Generator().manual_seed(head_dim)
    positions = torch.tensor([[0, 0, 0], [0, 3, 5], [7, 1, 2], [63, 15, 15], [21, 30, 2]])
    x = torch.randn(len(positions), 2, head_dim, generator=generator)
    expected = rope_by_formula(x, positions, 10000.0)
    cos, sin = rope_3d_cos_sin(positions, head_dim, 10000.0)
    packed = apply_onevision_rope(x, cos, sin)
    # the standard model's own implementation: [B, H, L, hd] with freqs [B, L, hd/2]
    standard_out = _apply_rope(x.transpose(0, 1)[None], _rope_freqs(positions[None], head_dim, 10000.0))
    assert (packed.double() - expected).abs().max().item() < 1e-5
    assert (standard_out[0].transpose(0, 1).double() - expected).abs().max().item() < 1e-5


def test_rope_layout_facts():
    assert rope_3d_axis_widths(64) == (8, 12, 12)
    assert rope_3d_axis_widths(96) == (12, 18, 18)
    x = torch.randn(3, 1, 64, generator=torch.Generator().manual_seed(0))
    # images (t = 0): the temporal dimensions 0-7 and 32-39 are exactly the identity
    cos, sin = rope_3d_cos_sin(torch.tensor([[0, 4, 9], [0, 0, 1], [0, 12, 3]]), 64, 10000.0)
    out = apply_onevision_rope(x, cos, sin)
    temporal = list(range(8)) + list(range(32, 40))
    assert torch.equal(out[..., temporal], x[..., temporal])
    assert not torch.allclose(out, x)
    # two angles per pair: not a rotation, so norms change
    cos, sin = rope_3d_cos_sin(torch.tensor([[5, 9, 11]] * 3), 64, 10000.0)
    out = apply_onevision_rope(x, cos, sin)
    assert (out.norm(dim=-1) - x.norm(dim=-1)).abs().max().item() > 1e-3


def test_rope_bf16_computes_in_float32():
    x = torch.randn(4, 2, 64, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_3d_cos_sin(torch.tensor([[40, 31, 30]] * 4), 64, 10000.0)
    out = apply_onevision_rope(x.bfloat16(), cos, sin)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, apply_onevision_rope(x.bfloat16().float(), cos, sin).bfloat16())


# --- packed ↔ standard parity ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_images_of_several_sizes(models, name):
    reference, packed = models[name]
    items = items_for([(4, 4), (1, 1), (3, 5), (7, 2), (2, 9)])
    patches, grid_thw = patchify(items, PATCH, layout="cpp")
    out = packed(patches, grid_thw, output_hidden_states=True)
    counts = grid_thw.prod(1).tolist()
    assert out.last_hidden_state.shape == (sum(counts), packed.config.hidden_size)
    assert len(out.hidden_states) == packed.config.num_hidden_layers + 1
    for index, item in enumerate(items):
        assert_item_parity(standard(reference, item), out, index, counts, VARIANTS[name]["use_head"])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_mixed_images_and_videos_in_any_order(models, name):
    reference, packed = models[name]
    items = items_for([(3, 4, 5), (5, 6), (2, 3, 3), (4, 4), (1, 2, 7)], seed=1)
    references = [standard(reference, item) for item in items]
    for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [1, 0, 3, 2, 4]):
        patches, grid_thw = patchify([items[i] for i in order], PATCH, layout="cpp")
        out = packed(patches, grid_thw, output_hidden_states=True)
        counts = grid_thw.prod(1).tolist()
        for position, i in enumerate(order):
            assert_item_parity(references[i], out, position, counts, VARIANTS[name]["use_head"])


def test_video_is_one_segment(models):
    """A video's frames attend to each other: the packed video differs from its frames packed apart."""
    reference, packed = models["ln_head"]
    video = items_for([(3, 4, 4)], seed=2)[0]
    patches, grid_thw = patchify([video], PATCH, layout="cpp")
    together = packed(patches, grid_thw).last_hidden_state
    apart = packed(patches, torch.tensor([[1, 4, 4]] * 3), patch_positions=timeline_positions(torch.arange(3), 4, 4))
    assert (together - apart.last_hidden_state).abs().max().item() > 1e-3
    assert (together - standard(reference, video).last_hidden_state[0]).abs().max().item() <= ATOL


@pytest.mark.parametrize("name", ["ln_head", "rms_no_head"])
def test_explicit_patch_positions(models, name):
    """patch_positions [S, 3] against the standard model's patch_positions [B, L, 3]."""
    reference, packed = models[name]
    items = items_for([(4, 3, 3), (3, 5), (2, 2, 6)], seed=3)
    patches, grid_thw = patchify(items, PATCH, layout="cpp")
    counts = grid_thw.prod(1).tolist()
    generator = torch.Generator().manual_seed(4)
    positions = [torch.randint(0, 64, (count, 3), generator=generator) for count in counts]
    out = packed(patches, grid_thw, patch_positions=torch.cat(positions), output_hidden_states=True)
    for index, (item, item_positions) in enumerate(zip(items, positions)):
        expected = standard(reference, item, patch_positions=item_positions[None])
        assert_item_parity(expected, out, index, counts, VARIANTS[name]["use_head"])
    default = packed(patches, grid_thw).last_hidden_state
    assert (default - out.last_hidden_state).abs().max().item() > 1e-3


def test_timeline_matches_visible_indices(models):
    """8 frames sampled from a 40-frame clip: packed ``patch_positions`` from ``timeline_slots`` equal the
    standard model given the same slots as ``visible_indices`` into its 64 x h x w grid."""
    reference, packed = models["ln_head"]
    video = items_for([(8, 3, 4)], seed=5)[0]
    slots = timeline_slots([0, 5, 11, 16, 22, 27, 33, 39], 40)
    positions = timeline_positions(slots, 3, 4)
    visible = (positions[:, 0] * 12 + positions[:, 1] * 4 + positions[:, 2])[None]
    patches, grid_thw = patchify([video], PATCH, layout="cpp")
    out = packed(patches, grid_thw, patch_positions=positions, output_hidden_states=True)
    assert_item_parity(standard(reference, video, visible_indices=visible), out, 0, [96], True)


def test_codec_style_visible_subset(models):
    """Top-K patches of a 64-frame clip: the standard model gathers them by ``visible_indices``; the packed
    model takes just those patches with their positions as one segment (grid 1 x 1 x K)."""
    reference, packed = models["ln_head"]
    clip = items_for([(64, 2, 2)], seed=6)[0]
    visible = torch.randperm(64 * 4, generator=torch.Generator().manual_seed(7))[:40].sort().values
    all_patches, _ = patchify([clip], PATCH, layout="cpp")
    positions = torch.stack([visible // 4, (visible // 2) % 2, visible % 2], dim=-1)
    out = packed(all_patches[visible], torch.tensor([[1, 1, 40]]), patch_positions=positions, output_hidden_states=True)
    assert_item_parity(standard(reference, clip, visible_indices=visible[None]), out, 0, [40], True)


def test_hidden_states_meaning(models):
    """[0] is the layernorm_pre output, the last entry the raw last layer (before layernorm_post)."""
    _, packed = models["ln_head"]
    patches, grid_thw = patchify(items_for([(3, 3)]), PATCH, layout="cpp")
    out = packed(patches, grid_thw, output_hidden_states=True)
    embeddings = packed.embeddings
    assert torch.allclose(out.hidden_states[0], embeddings.layernorm_pre(embeddings.patch_embed(patches)))
    assert torch.allclose(out.last_hidden_state, packed.final_norm(out.hidden_states[-1]))
    assert not torch.allclose(out.last_hidden_state, out.hidden_states[-1])
    as_tuple = packed(patches, grid_thw, return_dict=False)
    assert torch.equal(as_tuple[0], out.last_hidden_state)


# --- loading ---------------------------------------------------------------------------------------


def test_no_buffers_and_lazy_exports():
    config = LlavaViTConfig(**TINY)
    assert list(LlavaViTModel(config).buffers()) == []
    assert list(LlavaViTPackingModel(LlavaViTPackingConfig(**TINY)).buffers()) == []
    assert packvit.LlavaViTPackingModel is LlavaViTPackingModel
    assert packvit.LlavaViTPackingConfig is LlavaViTPackingConfig
    assert packvit.LlavaViTModel is LlavaViTModel


def test_packing_format_round_trip_and_dtype(models, tmp_path):
    reference, packed = models["ln_head"]
    packed.save_pretrained(tmp_path / "packing")
    reloaded = LlavaViTPackingModel.from_pretrained(tmp_path / "packing")
    patches, grid_thw = patchify(items_for([(2, 3, 3), (4, 5)], seed=8), PATCH, layout="cpp")
    assert torch.equal(reloaded(patches, grid_thw).last_hidden_state, packed(patches, grid_thw).last_hidden_state)
    assert LlavaViTPackingModel.from_pretrained(tmp_path / "packing", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_prefixed_published_keys(checkpoints, models, tmp_path):
    """A published checkpoint whose keys carry ``onevision_encoder.`` loads into both models."""
    from safetensors.torch import load_file, save_file

    source = checkpoints["ln_head"]
    state = load_file(str(source / "model.safetensors"))
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    save_file({f"onevision_encoder.{k}": v for k, v in state.items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    reference, packed = models["ln_head"]
    item = items_for([(3, 4)], seed=9)[0]
    patches, grid_thw = patchify([item], PATCH, layout="cpp")
    assert torch.equal(LlavaViTPackingModel.from_pretrained(tmp_path)(patches, grid_thw).last_hidden_state,
                       packed(patches, grid_thw).last_hidden_state)
    assert torch.equal(standard(LlavaViTModel.from_pretrained(tmp_path), item).last_hidden_state,
                       standard(reference, item).last_hidden_state)


# --- errors ----------------------------------------------------------------------------------------


def test_error_grid_does_not_match_patches(models):
    _, packed = models["ln_head"]
    patches, _ = patchify(items_for([(3, 4)]), PATCH, layout="cpp")
    with pytest.raises(ValueError, match="patches has 12 rows but grid_thw describes 16"):
        packed(patches, torch.tensor([[1, 4, 4]]))


def test_error_wrong_patch_dim(models):
    _, packed = models["ln_head"]
    with pytest.raises(ValueError, match=r"patch_dim 192 but the model expects 588"):
        packed(torch.randn(12, 192), torch.tensor([[1, 3, 4]]))


def test_error_patch_positions_length(models):
    _, packed = models["ln_head"]
    patches, grid_thw = patchify(items_for([(3, 4)]), PATCH, layout="cpp")
    with pytest.raises(ValueError, match=r"patch_positions must be \[total_patches, 3\] = \[12, 3\].*got \(11, 3\)"):
        packed(patches, grid_thw, patch_positions=torch.zeros(11, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer .* indices, got torch.float32"):
        packed(patches, grid_thw, patch_positions=torch.zeros(12, 3))
    with pytest.raises(ValueError, match="non-negative"):
        packed(patches, grid_thw, patch_positions=torch.full((12, 3), -1, dtype=torch.long))


def test_error_unsupported_patch_merging():
    for name in ("temporal_patch_size", "spatial_merge_size"):
        with pytest.raises(ValueError, match=f"{name}=2 is not supported"):
            LlavaViTPackingModel(LlavaViTPackingConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                       num_attention_heads=2, **{name: 2}))


@pytest.mark.parametrize("hidden, heads", [(96, 2), (80, 1), (64, 4)])
def test_error_head_dim_not_divisible_by_split(hidden, heads):
    fields = dict(TINY, hidden_size=hidden, num_attention_heads=heads)
    with pytest.raises(ValueError, match=f"head_dim must be a positive multiple of 32; got head_dim {hidden // heads}"):
        LlavaViTPackingModel(LlavaViTPackingConfig(**fields))
    with pytest.raises(ValueError, match="4 temporal, 6 height, 6 width"):
        LlavaViTModel(LlavaViTConfig(**fields))


# --- video timeline ---------------------------------------------------------------------------------


def test_timeline_slots():
    assert timeline_slots(range(8), 8).tolist() == [0, 9, 18, 27, 36, 45, 54, 63]
    assert timeline_slots(range(16), 16).tolist()[:7] == [0, 4, 8, 13, 17, 21, 25]  # rounding, not truncation
    assert timeline_slots([0, 50, 99], 100).tolist() == [0, 32, 63]
    assert timeline_slots([0], 1).tolist() == [0]
    with pytest.raises(ValueError, match=r"frame indices must lie in \[0, 9\]"):
        timeline_slots([3, 10], 10)
    positions = timeline_positions([5, 40], 2, 3)
    assert positions.shape == (12, 3)
    assert positions[:6, 0].tolist() == [5] * 6 and positions[6:, 0].tolist() == [40] * 6
    assert positions[:6, 1:].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


# --- sizes and timm ---------------------------------------------------------------------------------

EXPECTED_SIZES = {
    "small": (384, 6, 6, 1536, 16),
    "base": (768, 12, 12, 3072, 16),
    "large": (1024, 24, 16, 4096, 14),
    "huge": (1280, 32, 20, 5120, 14),
    "giant": (1536, 40, 16, 6144, 14),
}


def check_model_size(model, size):
    hidden, layers, heads, mlp, patch = EXPECTED_SIZES[size]
    assert isinstance(model, LlavaViTPackingModel)
    assert model.config.num_attention_heads == heads and model.config.head_dim == hidden // heads
    assert model.embeddings.patch_embed.weight.shape == (hidden, 3 * patch * patch)
    assert len(model.blocks) == layers == model.num_hidden_layers
    layer = model.blocks[-1]
    assert layer.attn.qkv.weight.shape == (3 * hidden, hidden)
    assert layer.mlp.fc1.weight.shape == (mlp, hidden)
    assert model.head.mlp.fc2.weight.shape == (hidden, mlp)
    assert isinstance(layer.norm1, torch.nn.LayerNorm)


@pytest.mark.parametrize("size", list(EXPECTED_SIZES))
def test_size_table_without_timm(size):
    assert LLAVA_VIT_SIZES[size] == EXPECTED_SIZES[size]
    config = llava_vit_packing_config(f"hf_llava_vit_packing_{size}_ln")
    assert config.use_head and config.hidden_act == "gelu" and config.layer_norm_type == "layer_norm"
    with torch.device("meta"):
        check_model_size(LlavaViTPackingModel(config), size)


def test_size_table_unknown_name():
    with pytest.raises(ValueError, match="unknown OneVision Encoder size 'tiny'"):
        llava_vit_packing_config("tiny")


def test_timm_create_model():
    timm = import_timm()
    names = packvit.register_timm_models()
    assert packvit.register_timm_models() == names  # registering twice is harmless
    for size in EXPECTED_SIZES:
        with torch.device("meta"):
            model = timm.create_model(f"hf_llava_vit_packing_{size}_ln")
        check_model_size(model, size)
    small = timm.create_model("hf_llava_vit_packing_small_ln", num_hidden_layers=1, use_head=False)
    assert len(small.blocks) == 1 and small.head is None
    with pytest.raises(ValueError, match="has no timm weights"):
        timm.create_model("hf_llava_vit_packing_large_ln", pretrained=True)


def test_import_packvit_registers_nothing_with_timm():
    import subprocess
    import sys

    code = "import sys, packvit; packvit.from_pretrained; print('timm' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
