"""SigLIP2 NaFlex: packed model vs transformers' Siglip2VisionModel, float32 on the CPU.

Every checkpoint is a small random reference model saved with ``save_pretrained`` and loaded back
through packvit's own loading path.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import packvit
from packvit import patchify
from packvit.models.siglip2 import Siglip2NaflexConfig, Siglip2NaflexPacking
from packvit.packing import PackedBatch
from packvit.harness.siglip2 import ADAPTER, randomize_vectors, reference_resizes_one_wide_grids_right

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-5
MIXED_GRIDS = [(1, 1), (1, 37), (23, 2), (16, 16), (7, 13), (40, 3)]
# one patch wide with the height resized: PyTorch's CPU F.interpolate(antialias=True), which
# transformers <= 5.23 used, is wrong there (packvit's weights are checked against oracles in test_positions)
ONE_WIDE_GRIDS = [(23, 1), (5, 1), (40, 1), (1, 1), (1, 9)]


def _write_vision_checkpoint(directory, seed=0, **config):
    """A random Siglip2VisionModel saved with save_pretrained; returns its directory."""
    torch.manual_seed(seed)
    model = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(num_hidden_layers=2, **config))
    randomize_vectors(model, torch.Generator().manual_seed(seed))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["tiny-hd48", "hd36"])
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    if request.param == "tiny-hd48":
        return ADAPTER.write_random_checkpoint(directory, size="tiny", seed=1)
    return _write_vision_checkpoint(directory / "ckpt", seed=2, hidden_size=72, intermediate_size=100, num_attention_heads=2)


@pytest.fixture(scope="module")
def models(checkpoint):
    reference = ADAPTER.load_reference(checkpoint, "cpu", torch.float32)
    packed = Siglip2NaflexPacking(ckpt=checkpoint, device="cpu")
    return reference, packed


def _items(grids, seed=0):
    return ADAPTER.random_items(grids, 16, torch.Generator().manual_seed(seed))


def _max_diff(outputs_a, outputs_b):
    tokens = max((a.tokens - b.tokens).abs().max().item() for a, b in zip(outputs_a, outputs_b))
    pooled = max((a.pooled - b.pooled).abs().max().item() for a, b in zip(outputs_a, outputs_b))
    return tokens, pooled


@torch.no_grad()
def test_mixed_pack_matches_reference(models):
    reference, packed = models
    items = _items(MIXED_GRIDS)
    ref_out = ADAPTER.run_reference(reference, items, batch_size=3)  # padded batches, as the processor pads
    packed_out = ADAPTER.run_packed(packed, items)
    for item, out in zip(items, packed_out):
        assert out.tokens.shape == (item.shape[1] * item.shape[2] // 256, packed.config.hidden_size)
    token_diff, pooled_diff = _max_diff(packed_out, ref_out)
    assert token_diff <= TOLERANCE and pooled_diff <= TOLERANCE, (token_diff, pooled_diff)


@torch.no_grad()
def test_one_wide_grids_match_a_reference_that_resizes_them_right(models):
    if not reference_resizes_one_wide_grids_right():
        pytest.skip(f"transformers {transformers.__version__} resizes one-wide position tables with PyTorch's "
                    f"wrong CPU kernel (fixed in 5.24); packvit's resize is pinned by tests/test_positions.py")
    reference, packed = models
    items = _items(ONE_WIDE_GRIDS, seed=11)
    token_diff, pooled_diff = _max_diff(ADAPTER.run_packed(packed, items), ADAPTER.run_reference(reference, items, 3))
    assert token_diff <= TOLERANCE and pooled_diff <= TOLERANCE, (token_diff, pooled_diff)


@torch.no_grad()
def test_pack_order_does_not_matter(models):
    reference, packed = models
    items = _items(MIXED_GRIDS, seed=1)
    ref_out = ADAPTER.run_reference(reference, items, batch_size=1)
    baseline = ADAPTER.run_packed(packed, items)
    for order in ([5, 4, 3, 2, 1, 0], [3, 0, 5, 1, 4, 2]):
        permuted = ADAPTER.run_packed(packed, [items[i] for i in order])
        restored = [permuted[order.index(i)] for i in range(len(items))]
        assert max(_max_diff(restored, ref_out)) <= TOLERANCE
        assert max(_max_diff(restored, baseline)) <= TOLERANCE


@torch.no_grad()
def test_hidden_states_match_reference(models):
    reference, packed = models
    grids = [(16, 16), (5, 9), (1, 37)]
    items = _items(grids, seed=2)
    patches, grid_thw = patchify(items, 16)
    out = packed(patches, grid_thw, return_dict=True, output_hidden_states=True)
    longest = max(h * w for h, w in grids)
    pixel_values = torch.zeros(len(grids), longest, 768)
    mask = torch.zeros(len(grids), longest, dtype=torch.int32)
    for row, piece in enumerate(patches.split([h * w for h, w in grids])):
        pixel_values[row, : piece.shape[0]], mask[row, : piece.shape[0]] = piece, 1
    ref = reference(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=torch.tensor(grids),
                    output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == packed.config.num_hidden_layers + 1
    for packed_state, ref_state in zip(out.hidden_states, ref.hidden_states):
        for row, piece in enumerate(packed_state.split([h * w for h, w in grids])):
            assert (piece - ref_state[row, : piece.shape[0]]).abs().max().item() <= TOLERANCE
    # the default return is the tensor after post_layernorm, equal to last_hidden_state
    assert torch.equal(packed(patches, grid_thw), out.last_hidden_state)
    assert not torch.allclose(out.hidden_states[-1], out.last_hidden_state)


@torch.no_grad()
def test_real_photographs_through_the_processor(models, checkpoint):
    checkpoint_dir = checkpoint
    from PIL import Image
    from skimage import data

    reference, packed = models
    photos = [Image.fromarray(getattr(data, name)()) for name in ("astronaut", "chelsea", "coffee", "rocket")]
    items = ADAPTER.preprocess(checkpoint_dir, photos, max_num_patches=256)
    assert [tuple(item.shape[1:]) for item in items] == [(256, 256), (208, 304), (208, 304), (208, 304)]
    token_diff, pooled_diff = _max_diff(ADAPTER.run_packed(packed, items), ADAPTER.run_reference(reference, items, 2))
    assert token_diff <= TOLERANCE and pooled_diff <= TOLERANCE


@torch.no_grad()
def test_video_rows_are_refused_and_frames_encode_as_images(models):
    reference, packed = models
    video = torch.randn(3, 3, 5 * 16, 7 * 16, generator=torch.Generator().manual_seed(3))
    image = torch.randn(3, 4 * 16, 4 * 16, generator=torch.Generator().manual_seed(4))
    batch = PackedBatch(*patchify([image, video], 16))
    assert batch.grid_thw.tolist() == [[1, 4, 4], [3, 5, 7]]
    with pytest.raises(ValueError, match=r"encodes images: every grid_thw row needs t = 1, got \[3, 5, 7\].*frames_as_items"):
        packed(batch)
    out = packed(batch.frames_as_items())
    assert out.last_hidden_state.shape[0] == 16 + 3 * 35
    assert out.pooler_output.shape == (4, packed.config.hidden_size)  # one row per item: the image, then each frame
    frames = [image, *video.unbind(0)]
    ref_out = ADAPTER.run_reference(reference, frames, batch_size=4)
    for frame_tokens, frame_pooled, ref in zip(out.last_hidden_state.split([16, 35, 35, 35]), out.pooler_output, ref_out):
        assert (frame_tokens - ref.tokens).abs().max().item() <= TOLERANCE
        assert (frame_pooled - ref.pooled).abs().max().item() <= TOLERANCE


def test_full_siglip2_checkpoint_with_text_tower(tmp_path):
    vision = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                bos_token_id=None, eos_token_id=None, pad_token_id=1)
    torch.manual_seed(5)
    full = transformers.Siglip2Model(transformers.Siglip2Config(vision_config=vision, text_config=text))
    randomize_vectors(full, torch.Generator().manual_seed(5))
    full.save_pretrained(tmp_path)
    assert any(key.startswith("text_model.") for key in load_file(str(tmp_path / "model.safetensors")))
    packed = Siglip2NaflexPacking.from_pretrained(tmp_path, device="cpu")
    assert packed.config == Siglip2NaflexConfig(**vision)
    items = _items([(3, 11), (16, 16)], seed=6)
    # the reference: a Siglip2VisionModel holding the full model's vision tower
    reference = transformers.Siglip2VisionModel(full.config.vision_config).eval()
    tower = full.vision_model.state_dict()
    target = reference.vision_model if hasattr(reference, "vision_model") else reference  # transformers 4.x nests it
    target.load_state_dict(tower)
    with torch.no_grad():
        token_diff, pooled_diff = _max_diff(ADAPTER.run_packed(packed, items), ADAPTER.run_reference(reference, items, 2))
    assert token_diff <= TOLERANCE and pooled_diff <= TOLERANCE


def test_vision_only_checkpoint_with_and_without_prefix(tmp_path, checkpoint):
    """transformers 4.x saves Siglip2VisionModel under ``vision_model.``, 5.x without; both load alike."""
    state = load_file(str(checkpoint / "model.safetensors"))
    prefixed = any(key.startswith("vision_model.") for key in state)
    other = ({key.removeprefix("vision_model."): value for key, value in state.items()} if prefixed
             else {f"vision_model.{key}": value for key, value in state.items()})
    save_file(other, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    patches, grid_thw = patchify(_items([(6, 5)], seed=7), 16)
    with torch.no_grad():
        expected = Siglip2NaflexPacking(ckpt=checkpoint, device="cpu")(patches, grid_thw)
        assert torch.equal(Siglip2NaflexPacking(ckpt=tmp_path, device="cpu")(patches, grid_thw), expected)


def test_a_stray_tensor_is_reported_in_the_checkpoint_names(tmp_path, checkpoint):
    """One extra tensor (here one that looks like a prefixed layout's) is the one unexpected name,
    in a vision-only checkpoint with or without the prefix; nothing else is called missing."""
    state = load_file(str(checkpoint / "model.safetensors"))
    prefix = "vision_model." if any(key.startswith("vision_model.") for key in state) else ""
    for stray in ("vision_model.stray.weight", "stray.weight"):
        directory = tmp_path / stray
        directory.mkdir()
        save_file({**state, stray: torch.zeros(2)}, str(directory / "model.safetensors"))
        (directory / "config.json").write_text((checkpoint / "config.json").read_text())
        with pytest.raises(ValueError, match=rf"missing \[\], unexpected \['{re.escape(stray)}'\]"):
            Siglip2NaflexPacking(ckpt=directory, device="cpu")
    del state[f"{prefix}encoder.layers.1.mlp.fc2.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(ValueError, match=rf"missing \['{prefix}encoder.layers.1.mlp.fc2.bias'\], unexpected \[\]"):
        Siglip2NaflexPacking(ckpt=tmp_path, device="cpu")


def test_model_without_head(tmp_path):
    checkpoint = _write_vision_checkpoint(tmp_path, seed=8, hidden_size=48, intermediate_size=64,
                                          num_attention_heads=3, vision_use_head=False)
    packed = Siglip2NaflexPacking(ckpt=checkpoint, device="cpu")
    assert packed.head is None
    reference = ADAPTER.load_reference(checkpoint, "cpu", torch.float32)
    items = _items([(2, 9), (12, 12)], seed=9)
    with torch.no_grad():
        packed_out, ref_out = ADAPTER.run_packed(packed, items), ADAPTER.run_reference(reference, items, 2)
    assert all(out.pooled is None for out in packed_out)
    assert max((a.tokens - b.tokens).abs().max().item() for a, b in zip(packed_out, ref_out)) <= TOLERANCE


def test_position_table_follows_weight_changes_and_takes_gradients(checkpoint):
    packed = Siglip2NaflexPacking(ckpt=checkpoint, device="cpu")
    patches, grid_thw = patchify(_items([(5, 9), (16, 16)], seed=10), 16)
    with torch.no_grad():
        first = packed(patches, grid_thw)
        packed.embeddings.position_embedding.weight.mul_(2.0)
        changed = packed(patches, grid_thw)
        fresh = Siglip2NaflexPacking(ckpt=checkpoint, device="cpu")
        fresh.embeddings.position_embedding.weight.mul_(2.0)
        expected = fresh(patches, grid_thw)
    assert not torch.allclose(changed, first)
    assert torch.equal(changed, expected)
    packed.embeddings.position_embedding.weight.requires_grad_(True)
    packed(patches, grid_thw).square().mean().backward()
    grad = packed.embeddings.position_embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0

def test_loading_defaults_and_lazy_export(checkpoint):
    packed = packvit.Siglip2NaflexPacking(ckpt=str(checkpoint))
    on_cuda = torch.cuda.is_available()
    assert packed.device.type == ("cuda" if on_cuda else "cpu")
    assert packed.dtype == (torch.bfloat16 if on_cuda else torch.float32)
    assert not packed.training
    assert packed.patch_size == 16
    half = Siglip2NaflexPacking.from_pretrained(checkpoint, device="cpu", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert not any(name.endswith(("q_proj.weight", "k_proj.weight")) for name, _ in packed.named_parameters())
    assert not list(packed.buffers())


# ---------------------------------------------------------------------------------------------
# Errors


def test_grid_that_does_not_match_the_patches(models):
    _, packed = models
    patches, _ = patchify(_items([(4, 4)]), 16)
    with pytest.raises(ValueError, match=r"patches has 16 rows but grid_thw describes 20"):
        packed(patches, torch.tensor([[1, 4, 5]]))


def test_wrong_patch_dim(models):
    _, packed = models
    with pytest.raises(ValueError, match=r"patch_dim 588 but the model expects 768"):
        packed(torch.randn(4, 3 * 14 * 14), torch.tensor([[1, 2, 2]]))


def test_batch_in_another_layout_is_refused(models):
    _, packed = models
    patches, grid_thw = patchify(_items([(2, 3)]), 16, layout="cpp")
    with pytest.raises(ValueError, match=r"flattened 'cpp' but Siglip2NaflexPacking reads 'ppc'.*load_processor"):
        packed(PackedBatch(patches, grid_thw, "cpp"))


def test_non_positive_grid(models):
    _, packed = models
    with pytest.raises(ValueError, match="grid_thw entries must be positive"):
        packed(torch.randn(0, 768), torch.tensor([[1, 0, 4]]))


@pytest.mark.parametrize("model_type", ["dinov3_vit", "clip"])
def test_checkpoint_of_another_family(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ValueError, match=f"model_type '{model_type}', which Siglip2NaflexConfig does not read"):
        Siglip2NaflexPacking(ckpt=tmp_path, device="cpu")


def test_siglip_checkpoint_is_explained(tmp_path):
    transformers.SiglipConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'siglip'.*fixed-resolution.*Supported model types: siglip2"):
        packvit.from_pretrained(tmp_path)


def test_siglip2_config_without_vision_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    with pytest.raises(ValueError, match="no vision_config"):
        Siglip2NaflexPacking(ckpt=tmp_path, device="cpu")


def test_adapter_sizes():
    full = ADAPTER.reference_config("full")
    assert (full.hidden_size, full.num_hidden_layers, full.num_attention_heads, full.intermediate_size) == (1152, 27, 16, 4304)
    assert full.hidden_size // full.num_attention_heads == 72
    assert all(h * w <= 4096 for h, w in ADAPTER.default_grids)
    with pytest.raises(ValueError, match="unknown size"):
        ADAPTER.reference_config("huge")
