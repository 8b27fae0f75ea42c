"""AIMv2 parity against transformers' Aimv2VisionModel (float32, CPU, small random checkpoints).

Every checkpoint is a random reference model saved with ``save_pretrained`` and loaded back through
``AIMv2Packing(ckpt=...)``; tolerance 1e-5 absolute on every token and on the pooled output.
"""

import json
import re

import pytest
import torch
import torch.nn.functional as F

import packvit
from packvit.models.aimv2 import AIMv2Config, AIMv2Packing
from packvit.packing import patchify
from packvit.positions import sincos_2d
from packvit.harness.aimv2 import ADAPTER, TINY
from family_helpers import load_model_pairs, max_diffs, write_variant_checkpoints

# the reference arrived in transformers 4.56
pytest.importorskip("transformers.models.aimv2.modeling_aimv2")

ATOL = 1e-5
PATCH = 14
MIXED_GRIDS = [(4, 4), (1, 1), (3, 5), (4, 4), (7, 2), (2, 9), (3, 5), (5, 3)]
VARIANTS = {
    "native": dict(is_native=True, use_head=False),
    "native_head": dict(is_native=True, use_head=True),
    "learned": dict(is_native=False, use_head=False),
    "learned_head": dict(is_native=False, use_head=True),
    "lit": dict(is_native=False, use_head=True, clip_model=True),
}


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_variant_checkpoints(ADAPTER, tmp_path_factory.mktemp("aimv2"), VARIANTS)


@pytest.fixture(scope="module")
def models(checkpoints):
    return load_model_pairs(ADAPTER, checkpoints)


def items_for(grids, seed=0):
    return ADAPTER.random_items(grids, PATCH, torch.Generator().manual_seed(seed))


def grids_for(name):
    return MIXED_GRIDS if name.startswith("native") else [(4, 4)] * 4


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parity_packed_in_any_order(models, name):
    reference_model, packed_model = models[name]
    items = items_for(grids_for(name))
    reference = ADAPTER.run_reference(reference_model, items, batch_size=8)
    for order in (list(range(len(items))), list(reversed(range(len(items)))), [3, 0, 2, 1] + list(range(4, len(items)))):
        packed = ADAPTER.run_packed(packed_model, [items[i] for i in order])
        restored = [None] * len(items)
        for position, i in enumerate(order):
            restored[i] = packed[position]
        tokens, pooled = max_diffs(reference, restored)
        assert tokens <= ATOL, f"{name}: token diff {tokens}"
        assert (pooled is None) == (not VARIANTS[name]["use_head"])
        if pooled is not None:
            assert pooled <= ATOL, f"{name}: pooled diff {pooled}"
    assert [r.tokens.shape[0] for r in reference] == [h * w for h, w in grids_for(name)]


@pytest.mark.parametrize("name", ["native_head", "learned"])
def test_hidden_states_parity(models, name):
    reference_model, packed_model = models[name]
    grids = grids_for(name)
    items = items_for(grids, seed=1)
    patches, grid_thw = patchify(items, PATCH)
    out = packed_model(patches, grid_thw, return_dict=True, output_hidden_states=True)
    assert len(out.hidden_states) == packed_model.config.num_hidden_layers + 1
    counts = grid_thw.prod(dim=1).tolist()
    per_item = [torch.split(h, counts) for h in out.hidden_states]
    for i, item in enumerate(items):
        ref = reference_model(item[None], output_hidden_states=True)
        assert len(ref.hidden_states) == len(out.hidden_states)
        for layer, reference_hidden in enumerate(ref.hidden_states):
            assert (reference_hidden[0] - per_item[layer][i]).abs().max() <= ATOL
        assert (ref.last_hidden_state[0] - torch.split(out.last_hidden_state, counts)[i]).abs().max() <= ATOL


def test_one_frame_items_and_videos_in_the_adapter(models):
    reference_model, packed_model = models["native_head"]
    items = items_for([(3, 4), (2, 2)], seed=5)
    as_frames = [item[None] for item in items]  # [1, C, H, W], as the benchmark workloads give them
    expected = ADAPTER.run_reference(reference_model, items, 4)
    for outputs in (ADAPTER.run_reference(reference_model, as_frames, 4), ADAPTER.run_packed(packed_model, as_frames)):
        tokens, pooled = max_diffs(expected, outputs)
        assert tokens <= ATOL and pooled <= ATOL
    with pytest.raises(ValueError, match="encodes images"):
        ADAPTER.run_reference(reference_model, [torch.randn(2, 3, 28, 28)], 1)


def test_default_return_is_last_hidden_state_tensor(models):
    _, packed_model = models["native_head"]
    patches, grid_thw = patchify(items_for([(2, 3), (4, 1)]), PATCH)
    plain = packed_model(patches, grid_thw)
    full = packed_model(patches, grid_thw, return_dict=True)
    assert isinstance(plain, torch.Tensor) and plain.shape == (10, TINY["hidden_size"])
    assert torch.equal(plain, full.last_hidden_state)
    assert full.pooler_output.shape == (2, TINY["hidden_size"]) and full.hidden_states is None and full.prefix_tokens is None


def reference_sincos(height: int, width: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The reference's native table ``[h*w, dim]``: from 5.x a module function computing in float64 then
    casting (its halves swapped by the caller); in 4.56 a static method computing in the activation
    dtype, called here in float64 and cast, the precision packvit keeps in every release."""
    from transformers.models.aimv2 import modeling_aimv2

    if hasattr(modeling_aimv2, "build_2d_sinusoidal_position_embedding"):
        table = modeling_aimv2.build_2d_sinusoidal_position_embedding(height, width, dim, dtype=dtype)
        return torch.cat([table[:, dim // 2:], table[:, : dim // 2]], dim=1)  # the reference's swap
    builder = modeling_aimv2.Aimv2VisionEmbeddings.build_2d_sincos_position_embedding
    return builder(height, width, embed_dim=dim, dtype=torch.float64)[0].to(dtype)


def test_sincos_table_is_the_reference_layout():
    for height, width, dim in ((3, 5, 48), (7, 2, 64), (1, 1, 16)):
        grid = torch.tensor([[1, height, width]])
        for dtype in (torch.float32, torch.bfloat16):
            ours = sincos_2d(grid, dim, dtype, torch.device("cpu"))
            assert torch.equal(ours, reference_sincos(height, width, dim, dtype))
        # effective layout: [sin(c w) | cos(c w) | sin(r w) | cos(r w)]
        quarter = dim // 4
        omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
        r, c = height - 1, width - 1
        expected = torch.cat([torch.sin(c * omega), torch.cos(c * omega), torch.sin(r * omega), torch.cos(r * omega)])
        assert torch.equal(ours[-1], expected.to(torch.bfloat16))


def test_learned_table_rejects_other_grids(models):
    _, packed_model = models["learned"]
    patches, grid_thw = patchify(items_for([(4, 4), (3, 5)]), PATCH)
    with pytest.raises(ValueError, match=r"learned position table for a 4x4 patch grid.*\[\(3, 5\)\].*interpolate_pos_encoding=True"):
        packed_model(patches, grid_thw)


def test_interpolated_table_matches_reference_built_at_that_size(models, tmp_path):
    """interpolate_pos_encoding=True equals a reference model whose table was resized as timm's
    resample_abs_pos_embed does (bicubic, antialiased)."""
    from transformers import Aimv2VisionModel

    reference_model, packed_model = models["learned_head"]
    items = items_for([(4, 4)], seed=2)
    patches, grid_thw = patchify(items, PATCH)
    assert torch.equal(packed_model(patches, grid_thw), packed_model(patches, grid_thw, interpolate_pos_encoding=True))

    table = reference_model.embeddings.position_embedding.weight  # [16, D]
    for side in (6, 3):  # upsampling, and shrinking (antialiased)
        resized = F.interpolate(table.reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(side, side), mode="bicubic",
                                align_corners=False, antialias=True)
        config = reference_model.config.to_dict() | {"image_size": side * PATCH}
        resized_model = Aimv2VisionModel(type(reference_model.config)(**{k: v for k, v in config.items() if k != "transformers_version"}))
        state = reference_model.state_dict() | {"embeddings.position_embedding.weight": resized.permute(0, 2, 3, 1).reshape(side * side, -1)}
        resized_model.load_state_dict(state, strict=False)
        resized_model.eval()
        images = items_for([(side, side), (side, side)], seed=side)
        reference = ADAPTER.run_reference(resized_model, images, 2)
        patches, grid_thw = patchify(images + items, PATCH)
        out = packed_model(patches, grid_thw, return_dict=True, interpolate_pos_encoding=True)
        tokens = torch.split(out.last_hidden_state, grid_thw.prod(1).tolist())
        for i in range(2):
            assert (tokens[i] - reference[i].tokens).abs().max() <= ATOL
            assert (out.pooler_output[i] - reference[i].pooled).abs().max() <= ATOL


def test_interpolation_is_model_state(checkpoints, models):
    """model.interpolate_pos_encoding (set directly, through from_pretrained or a VisionTower) serves
    model(batch) as the per-call keyword does; the per-call keyword overrides it."""
    from packvit.packing import PackedBatch
    from packvit.vlm import VisionTower

    _, packed_model = models["learned"]
    batch = PackedBatch(*patchify(items_for([(3, 7), (4, 4)]), PATCH))
    expected = packed_model(batch.patches, batch.grid_thw, interpolate_pos_encoding=True)
    model = AIMv2Packing.from_pretrained(checkpoints["learned"], device="cpu", interpolate_pos_encoding=True)
    assert model.interpolate_pos_encoding and torch.equal(model(batch).last_hidden_state, expected)
    assert torch.equal(packvit.from_pretrained(checkpoints["learned"], interpolate_pos_encoding=True)(batch).last_hidden_state,
                       expected)
    with pytest.raises(ValueError, match="learned position table"):
        model(batch, interpolate_pos_encoding=False)
    assert not packed_model.interpolate_pos_encoding
    with pytest.raises(ValueError, match="learned position table"):
        packed_model(batch)
    model = AIMv2Packing.from_pretrained(checkpoints["learned"], device="cpu")
    VisionTower(model, interpolate_pos_encoding=True)
    assert torch.equal(model(batch).last_hidden_state, expected)
    model.interpolate_pos_encoding = False
    with pytest.raises(ValueError, match="learned position table"):
        model.prepare(batch)


def test_interpolation_serves_non_square_grids(models):
    _, packed_model = models["learned"]
    patches, grid_thw = patchify(items_for([(3, 7), (4, 4), (3, 7)]), PATCH)
    out = packed_model(patches, grid_thw, interpolate_pos_encoding=True)
    assert out.shape == (21 + 16 + 21, TINY["hidden_size"]) and torch.isfinite(out).all()
    single = packed_model(*patchify(items_for([(3, 7), (4, 4), (3, 7)])[2:], PATCH), interpolate_pos_encoding=True)
    assert (out[-21:] - single).abs().max() <= ATOL


def test_grid_that_does_not_match_patches(models):
    _, packed_model = models["native"]
    patches, _ = patchify(items_for([(4, 4)]), PATCH)
    with pytest.raises(ValueError, match="patches has 16 rows but grid_thw describes 15"):
        packed_model(patches, torch.tensor([[1, 3, 5]]))


def test_wrong_patch_dim(models):
    _, packed_model = models["native"]
    patches, grid_thw = patchify([torch.randn(3, 64, 64)], 16)
    with pytest.raises(ValueError, match="patch_dim 768 but the model expects 588"):
        packed_model(patches, grid_thw)


def test_videos_are_rejected(models):
    _, packed_model = models["native"]
    with pytest.raises(ValueError, match="t = 1"):
        packed_model(torch.randn(8, 588), torch.tensor([[2, 2, 2]]))


def test_checkpoint_that_is_not_aimv2(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=32, patch_size=16)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'siglip_vision_model', which AIMv2Config does not read"):
        AIMv2Packing(ckpt=tmp_path, device="cpu")


def test_loading_never_changes_the_architecture(checkpoints, tmp_path):
    """A config asking for a head whose weights the checkpoint lacks is refused (not loaded headless),
    and so are head weights the config does not use; use_head=False as an override loads it."""
    source = checkpoints["native"]
    for file in source.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["use_head"] is False
    (tmp_path / "config.json").write_text(json.dumps(config | {"use_head": True}))
    with pytest.raises(ValueError, match=r"missing \['head\..*never drops or adds modules"):
        AIMv2Packing(ckpt=tmp_path, device="cpu")
    model = AIMv2Packing(ckpt=tmp_path, device="cpu", use_head=False)
    assert model.head is None and model.config.use_head is False
    out = model(*patchify(items_for([(2, 2)]), PATCH), return_dict=True)
    assert out.pooler_output is None
    with pytest.raises(ValueError, match=r"unexpected \['head\."):
        AIMv2Packing(ckpt=checkpoints["native_head"], device="cpu", use_head=False)


def test_learned_config_without_table_is_rejected(checkpoints, tmp_path):
    source = checkpoints["native"]
    for file in source.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"is_native": False}))
    with pytest.raises(ValueError, match=r"is_native false .*missing \['embeddings.position_embedding.weight'\].*set is_native true"):
        AIMv2Packing(ckpt=tmp_path, device="cpu")


def test_native_config_with_a_table_names_is_native(checkpoints, tmp_path):
    source = checkpoints["learned"]
    for file in source.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"is_native": True}))
    with pytest.raises(ValueError, match=r"is_native true .*unexpected \['embeddings.position_embedding.weight'\].*set is_native false"):
        AIMv2Packing(ckpt=tmp_path, device="cpu")


def test_random_construction_has_no_buffers_and_lazy_export():
    model = AIMv2Packing(AIMv2Config(**TINY, is_native=True, use_head=True), device="cpu")
    assert list(model.buffers()) == []
    assert packvit.AIMv2Packing is AIMv2Packing
    out = model(*patchify(items_for([(2, 5), (3, 3)]), PATCH), return_dict=True)
    assert out.last_hidden_state.shape == (19, TINY["hidden_size"]) and out.pooler_output.shape == (2, TINY["hidden_size"])


def test_full_size_config_matches_the_native_checkpoint(tmp_path):
    """write_random_checkpoint(size="full") describes apple/aimv2-large-patch14-native (config only)."""
    from transformers import Aimv2VisionConfig

    from packvit.harness.aimv2 import FULL

    config = AIMv2Packing.config_from_dict(Aimv2VisionConfig(**FULL, is_native=True, use_head=False).to_dict())
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (1024, 24, 8, 2816)
    assert config.hidden_size // config.num_attention_heads == 128 and config.patch_size == 14 and config.is_native


def test_incomplete_checkpoint_names_the_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = ADAPTER.write_random_checkpoint(tmp_path / "full", seed=3, is_native=True, use_head=False)
    (file,) = directory.glob("*.safetensors")
    state = load_file(str(file))
    missing = next(key for key in state if key.endswith("attention.k_proj.weight"))
    del state[missing]
    save_file(state, str(file))
    with pytest.raises(ValueError, match=rf"missing \['{re.escape(missing)}'\], unexpected \[\] \(the checkpoint's names\)\. "):
        AIMv2Packing(ckpt=directory, device="cpu")


def test_dtype_string_is_checked(checkpoints):
    with pytest.raises(ValueError, match="'auto' is not a torch dtype"):
        AIMv2Packing(ckpt=checkpoints["native"], device="cpu", dtype="auto")
    assert AIMv2Packing(ckpt=checkpoints["native"], device="cpu", dtype="bfloat16").dtype == torch.bfloat16
