"""DINOv3ViTPacking against transformers' DINOv3ViTModel: float32 parity on small random configs
(GELU and SwiGLU MLPs, with and without q/v biases), hidden states, training mode, key spellings,
RoPE tables and error paths."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import packvit
from packvit.models.dinov3 import DINOv3Config, DINOv3ViTPacking, DINOV3_RELEASES
from packvit.packing import patchify
from packvit.harness.dinov3 import ADAPTER, reference_config
from packvit.positions import RotaryTable, normalized_patch_centres, rope_2d_cos_sin, rope_2d_inv_freq

transformers = pytest.importorskip("transformers")
# the reference arrived in transformers 4.56
hf_dinov3 = pytest.importorskip("transformers.models.dinov3_vit.modeling_dinov3_vit")
from family_helpers import max_diffs

TOLERANCE = 1e-5
# 1×1 and non-square grids, two images of one size (a dense reference batch of two)
GRIDS = [(2, 3), (1, 1), (3, 2), (4, 4), (1, 5), (2, 3)]

CONFIGS = {
    # head_dim 24: not a power of two
    "gelu": dict(),
    # SwiGLU, head_dim 12
    "swiglu": dict(hidden_size=48, num_attention_heads=4, intermediate_size=80, use_gated_mlp=True, hidden_act="silu"),
    # the 7B layout: SwiGLU without q/v biases (and no k bias), head_dim 16
    "no_qv_bias": dict(hidden_size=64, num_attention_heads=4, intermediate_size=96, use_gated_mlp=True,
                       hidden_act="silu", query_bias=False, value_bias=False),
    # no register tokens: the prefix is the CLS token alone
    "no_registers": dict(num_register_tokens=0),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"dinov3-{request.param}")
    ADAPTER.write_random_checkpoint(directory, size="tiny", seed=3, **CONFIGS[request.param])
    return directory


@pytest.fixture(scope="module")
def gelu_checkpoint(tmp_path_factory):
    return ADAPTER.write_random_checkpoint(tmp_path_factory.mktemp("dinov3-gelu"), size="tiny", seed=5)


def random_items(grids, seed=0):
    return ADAPTER.random_items(grids, 16, torch.Generator().manual_seed(seed))


def test_packed_matches_reference_for_every_token(checkpoint):
    reference = ADAPTER.load_reference(checkpoint, "cpu", torch.float32)
    packed = ADAPTER.load_packed(checkpoint, "cpu", torch.float32)
    items = random_items(GRIDS)
    ref_out = ADAPTER.run_reference(reference, items, batch_size=2)
    packed_out = ADAPTER.run_packed(packed, items)
    num_prefix = 1 + reference.config.num_register_tokens
    for item, r, p in zip(items, ref_out, packed_out):
        assert p.tokens.shape == r.tokens.shape == (num_prefix + item[0].numel() // 256, reference.config.hidden_size)
    tokens, pooled = max_diffs(ref_out, packed_out)
    assert tokens <= TOLERANCE and pooled <= TOLERANCE, (tokens, pooled)

    # the same items in another order: each image's outputs stay those of the reference
    order = [4, 2, 0, 5, 1, 3]
    shuffled = ADAPTER.run_packed(packed, [items[i] for i in order])
    tokens, pooled = max_diffs([ref_out[i] for i in order], shuffled)
    assert tokens <= TOLERANCE and pooled <= TOLERANCE, (tokens, pooled)


def test_native_resolution_photographs_packed_together(gelu_checkpoint):
    skimage_data = pytest.importorskip("skimage.data")
    photographs = [skimage_data.chelsea(), skimage_data.page(), skimage_data.astronaut(),
                   skimage_data.hubble_deep_field(), skimage_data.coffee()]
    items = ADAPTER.preprocess(gelu_checkpoint, photographs, native=True, max_num_patches=48)
    # four sizes; chelsea and coffee share an aspect ratio, so one size, one dense reference batch
    assert len({tuple(item.shape) for item in items}) == 4
    reference = ADAPTER.load_reference(gelu_checkpoint, "cpu", torch.float32)
    packed = ADAPTER.load_packed(gelu_checkpoint, "cpu", torch.float32)
    tokens, pooled = max_diffs(ADAPTER.run_reference(reference, items, 4), ADAPTER.run_packed(packed, items))
    assert tokens <= TOLERANCE and pooled <= TOLERANCE, (tokens, pooled)


def test_adapter_takes_one_frame_items_and_refuses_videos(gelu_checkpoint):
    reference = ADAPTER.load_reference(gelu_checkpoint, "cpu", torch.float32)
    packed = ADAPTER.load_packed(gelu_checkpoint, "cpu", torch.float32)
    items = [item.unsqueeze(0) for item in random_items([(2, 3), (1, 1)], seed=4)]  # [1, 3, H, W] each
    tokens, pooled = max_diffs(ADAPTER.run_reference(reference, items, 2), ADAPTER.run_packed(packed, items))
    assert tokens <= TOLERANCE and pooled <= TOLERANCE, (tokens, pooled)
    with pytest.raises(ValueError, match="every grid_thw row needs t = 1, got \\[2, 2, 2\\].*frames_as_items"):
        ADAPTER.run_packed(packed, random_items([(2, 2, 2)]))


def test_default_return_and_output_fields(gelu_checkpoint):
    model = DINOv3ViTPacking.from_pretrained(gelu_checkpoint, device="cpu")
    patches, grid_thw = patchify(random_items([(2, 3), (1, 1)]), 16)
    with torch.no_grad():
        default = model(patches, grid_thw)
        output = model(patches, grid_thw, return_dict=True)
    assert isinstance(default, torch.Tensor) and default.shape == (7, 48)
    assert torch.equal(default, output.last_hidden_state)
    assert output.prefix_tokens.shape == (2, 5, 48)
    assert torch.equal(output.pooler_output, output.prefix_tokens[:, 0])
    assert output.hidden_states is None


def test_hidden_states_split_into_patch_and_prefix_tokens(gelu_checkpoint):
    """hidden_states hold the patch tokens of every entry, prefix_hidden_states the CLS and
    registers: together each item's reference sequence [CLS, registers, patches]."""
    reference = ADAPTER.load_reference(gelu_checkpoint, "cpu", torch.float32)
    model = DINOv3ViTPacking(ckpt=gelu_checkpoint, device="cpu")
    grids = [(3, 2), (1, 1), (2, 4)]
    items = random_items(grids, seed=1)
    patches, grid_thw = patchify(items, 16)
    with torch.no_grad():
        output = model(patches, grid_thw, return_dict=True, output_hidden_states=True)
        ref_outputs = [reference(pixel_values=item[None], output_hidden_states=True) for item in items]
    ref_states = [out.hidden_states for out in ref_outputs]
    assert len(output.hidden_states) == reference.config.num_hidden_layers + 1 == len(ref_states[0])
    assert len(output.prefix_hidden_states) == len(output.hidden_states)
    # transformers 4.x puts the final norm into its last hidden state; 5.x, like packvit, does not
    normed_last = torch.equal(ref_states[0][-1], ref_outputs[0].last_hidden_state)
    counts = [h * w for h, w in grids]
    for depth, (state, prefix) in enumerate(zip(output.hidden_states, output.prefix_hidden_states)):
        assert state.shape == (sum(counts), 48) and prefix.shape == (3, 5, 48)
        if normed_last and depth == len(ref_states[0]) - 1:
            state, prefix = model.final_norm(state), model.final_norm(prefix)
        for i, (patch_state, ref) in enumerate(zip(torch.split(state, counts), ref_states)):
            assert (torch.cat([prefix[i], patch_state]) - ref[depth][0]).abs().max().item() <= TOLERANCE
    # the last state is the sequence before the final norm
    assert torch.allclose(model.final_norm(output.hidden_states[-1]), output.last_hidden_state, atol=1e-6)
    assert torch.allclose(model.final_norm(output.prefix_hidden_states[-1]), output.prefix_tokens, atol=1e-6)


def test_training_mode_never_augments(gelu_checkpoint):
    reference = ADAPTER.load_reference(gelu_checkpoint, "cpu", torch.float32)
    model = DINOv3ViTPacking(ckpt=gelu_checkpoint, device="cpu")
    item = random_items([(3, 4)], seed=2)[0]
    patches, grid_thw = patchify([item], 16)
    with torch.no_grad():
        eval_out = model(patches, grid_thw, return_dict=True)
        model.train()
        train_outs = [model(patches, grid_thw, return_dict=True) for _ in range(2)]
        reference_eval = reference(pixel_values=item[None]).last_hidden_state[0]
        reference.train()
        torch.manual_seed(0)
        reference_train = reference(pixel_values=item[None]).last_hidden_state[0]
    for out in train_outs:
        assert torch.equal(out.last_hidden_state, eval_out.last_hidden_state)
        assert torch.equal(out.prefix_tokens, eval_out.prefix_tokens)
    # the reference rescales its RoPE coordinates at random in training mode; packvit stays at eval
    assert (reference_train - reference_eval).abs().max().item() > 1e-3
    assert (reference_eval[5:] - eval_out.last_hidden_state).abs().max().item() <= TOLERANCE


def test_model_layer_key_spelling_loads_identically(gelu_checkpoint, tmp_path):
    state = load_file(str(gelu_checkpoint / "model.safetensors"))
    renamed = {("model." + key if key.startswith("layer.") else key): value for key, value in state.items()}
    assert any(key.startswith("model.layer.0.") for key in renamed)
    save_file(renamed, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((gelu_checkpoint / "config.json").read_text())
    patches, grid_thw = patchify(random_items([(2, 2), (1, 3)]), 16)
    with torch.no_grad():
        original = DINOv3ViTPacking(ckpt=gelu_checkpoint, device="cpu")(patches, grid_thw)
        spelled = DINOv3ViTPacking(ckpt=tmp_path, device="cpu")(patches, grid_thw)
    assert torch.equal(original, spelled)


def test_lazy_export_and_random_weights_from_a_config():
    assert packvit.DINOv3ViTPacking is DINOv3ViTPacking
    config = DINOv3Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          patch_size=4, num_register_tokens=2)
    model = DINOv3ViTPacking(config, device="cpu")
    assert not list(model.buffers())
    patches, grid_thw = patchify([torch.randn(3, 8, 12), torch.randn(3, 4, 4)], 4)
    with torch.no_grad():
        output = model(patches, grid_thw, return_dict=True)
    assert output.last_hidden_state.shape == (7, 32) and output.prefix_tokens.shape == (2, 3, 32)
    assert torch.isfinite(output.last_hidden_state).all()


@pytest.mark.parametrize("name", sorted(DINOV3_RELEASES))
def test_release_configs_read_back_from_transformers(name):
    release = DINOV3_RELEASES[name]
    fields = {key: getattr(release, key) for key in release.__dataclass_fields__}
    config_dict = transformers.DINOv3ViTConfig(**fields).to_dict()
    assert DINOv3Config.from_dict(config_dict) == release
    assert release.patch_size == 16 and release.num_register_tokens == 4 and release.head_dim in (64, 128)


# ---------------------------------------------------------------------------------------------
# RoPE tables: exactly the reference's


@pytest.mark.parametrize("grid", [(1, 1), (3, 5), (14, 14), (7, 2)])
def test_rope_tables_equal_the_reference(grid):
    config = reference_config("tiny")
    head_dim = config.hidden_size // config.num_attention_heads
    coordinates = normalized_patch_centres(torch.tensor([[1, *grid]]))
    expected = hf_dinov3.get_patches_center_coordinates(*grid, dtype=torch.float32, device=torch.device("cpu"))
    assert torch.equal(coordinates, expected)
    rope = hf_dinov3.DINOv3ViTRopePositionEmbedding(config).eval()
    assert torch.equal(rope.inv_freq, rope_2d_inv_freq(head_dim, config.rope_theta))
    ref_cos, ref_sin = rope(torch.zeros(1, 3, grid[0] * 16, grid[1] * 16))
    cos, sin = rope_2d_cos_sin(coordinates, head_dim, config.rope_theta, torch.float32)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


def test_rope_coordinates_are_per_image_in_a_pack():
    coordinates = normalized_patch_centres(torch.tensor([[1, 2, 3], [1, 1, 1], [1, 3, 2]]))
    assert coordinates.shape == (13, 2)
    assert coordinates[6].tolist() == [0.0, 0.0]  # the 1×1 image: its single centre
    expected = torch.cat([hf_dinov3.get_patches_center_coordinates(h, w, torch.float32, torch.device("cpu"))
                          for h, w in [(2, 3), (1, 1), (3, 2)]])
    assert torch.equal(coordinates, expected)


def test_identity_rope_rows_leave_prefix_tokens_unchanged():
    q, k = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    cos, sin = rope_2d_cos_sin(torch.rand(4, 2) * 2 - 1, 8, 100.0, torch.float32)
    cos[:2], sin[:2] = 1.0, 0.0
    q_out, k_out = RotaryTable(cos, sin, "half").apply(q, k)
    assert torch.equal(q_out[:2], q[:2]) and torch.equal(k_out[:2], k[:2])
    assert not torch.allclose(q_out[2:], q[2:])


# ---------------------------------------------------------------------------------------------
# Errors


def test_grid_that_does_not_match_the_patches(gelu_checkpoint):
    model = DINOv3ViTPacking(ckpt=gelu_checkpoint, device="cpu")
    patches, _ = patchify(random_items([(2, 3)]), 16)
    with pytest.raises(ValueError, match="patches has 6 rows but grid_thw describes 4"):
        model(patches, torch.tensor([[1, 2, 2]]))


def test_wrong_patch_dim(gelu_checkpoint):
    model = DINOv3ViTPacking(ckpt=gelu_checkpoint, device="cpu")
    patches, grid_thw = patchify([torch.randn(3, 28, 42)], 14)
    with pytest.raises(ValueError, match="patch_dim 588 but the model expects 768"):
        model(patches, grid_thw)


def test_video_grid_is_refused(gelu_checkpoint):
    model = DINOv3ViTPacking(ckpt=gelu_checkpoint, device="cpu")
    patches, grid_thw = patchify([torch.randn(2, 3, 32, 32)], 16)
    with pytest.raises(ValueError, match="every grid_thw row needs t = 1"):
        model(patches, grid_thw)


def test_checkpoint_of_another_family_is_refused(tmp_path):
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=64, image_size=32, patch_size=16))
    vit.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'vit', which DINOv3Config does not read"):
        DINOv3ViTPacking(ckpt=tmp_path)


def test_dinov3_convnext_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov3_convnext"}))
    with pytest.raises(ValueError, match="DINOv3 ConvNeXt is not a vision transformer"):
        packvit.from_pretrained(tmp_path)


def test_head_dim_without_rope_frequencies_is_refused():
    with pytest.raises(ValueError, match="head_dim that is a positive multiple of 4"):
        DINOv3Config.from_dict({"model_type": "dinov3_vit", "hidden_size": 36, "num_attention_heads": 2})
