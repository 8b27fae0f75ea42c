"""OneVision Encoder checkpoint conversion: published and training layouts → the packing format.

Sources are random standard models (``save_pretrained``, the published layout) and training-format
state dicts written from them by the inverse key mapping below; the converted checkpoint, loaded
with ``LlavaViTPackingModel.from_pretrained``, must reproduce the standard model to 1e-6.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from packvit.cli import main as packvit_main
from packvit.convert import convert_llava_vit
from packvit.models import llava_vit
from packvit.harness.llava_vit_reference import LlavaViTModel
from packvit.models.llava_vit import (
    LlavaViTPackingModel,
    checkpoint_layout,
    config_from_training_state,
    map_training_to_published,
)
from packvit.packing import patchify
from packvit.harness.llava_vit import ADAPTER, TINY

TOLERANCE = 1e-6  # converted against the packed model loaded from the source
PARITY = 1e-5  # against the standard model
PATCH = TINY["patch_size"]


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module", params=[True, False], ids=["head", "no_head"])
def published(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("published")
    return ADAPTER.write_random_checkpoint(directory, seed=11, use_head=request.param)


def to_training_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published keys → the training code's keys (q, k, v fused into ``attn.in_proj``)."""
    out = {}
    renames = [("embeddings.patch_embedding.", "conv1."), ("layernorm_pre.", "ln_pre."), ("layernorm_post.", "ln_post."),
               ("encoder.layers.", "transformer.layers.")]
    for key, value in state.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
        for old, new in ((".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."), (".mlp.fc1.", ".mlp.0."),
                         (".mlp.fc2.", ".mlp.2."), (".self_attn.out_proj.", ".attn.out_proj.")):
            if key.startswith("transformer.layers."):
                key = key.replace(old, new)
        out[key] = value
    for key in [k for k in out if ".self_attn.q_proj." in k]:
        prefix, suffix = key.split(".self_attn.q_proj.")
        parts = [out.pop(f"{prefix}.self_attn.{name}_proj.{suffix}") for name in "qkv"]
        out[f"{prefix}.attn.in_proj.{suffix}"] = torch.cat(parts)
    return out


def assert_converted(converted_dir, source_dir):
    """The converted checkpoint equals the packed model loaded straight from the published source
    (to 1e-6), and the standard model (to the parity tolerance 1e-5)."""
    standard = LlavaViTModel.from_pretrained(source_dir).eval()
    direct = LlavaViTPackingModel.from_pretrained(source_dir)
    converted = LlavaViTPackingModel.from_pretrained(converted_dir)
    items = ADAPTER.random_items([(3, 4), (2, 3, 5), (6, 2)], PATCH, torch.Generator().manual_seed(3))
    patches, grid_thw = patchify(items, PATCH, layout="cpp")
    out, expected = converted(patches, grid_thw), direct(patches, grid_thw)
    assert (out.last_hidden_state - expected.last_hidden_state).abs().max().item() <= TOLERANCE
    if standard.config.use_head:
        assert (out.pooler_output - expected.pooler_output).abs().max().item() <= TOLERANCE
    else:
        assert out.pooler_output is None
    for index, (item, tokens) in enumerate(zip(items, out.last_hidden_state.split(grid_thw.prod(1).tolist()))):
        reference = standard(item[None] if item.dim() == 3 else item.transpose(0, 1)[None])
        assert (tokens - reference.last_hidden_state[0]).abs().max().item() <= PARITY
        if standard.config.use_head:
            assert (out.pooler_output[index] - reference.pooler_output[0]).abs().max().item() <= PARITY


def test_layouts_are_detected(published, tmp_path):
    assert checkpoint_layout(published) == "published"
    convert_llava_vit(published, tmp_path / "packing")
    assert checkpoint_layout(tmp_path / "packing") == "packing"


def test_published_to_packing(published, tmp_path):
    figures = convert_llava_vit(published, tmp_path / "packing", source="published")
    assert figures["tokens_max_abs_diff"] <= PARITY
    config = json.loads((tmp_path / "packing" / "config.json").read_text())
    assert config["model_type"] == "llava_vit_packing"
    with safe_open(str(tmp_path / "packing" / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "encoder.layers.1.self_attn.qkv.weight" in keys and "patch_embed.proj.weight" in keys
    assert not any("q_proj" in key or "embeddings." in key for key in keys)
    assert_converted(tmp_path / "packing", published)


def test_training_to_packing_through_the_cli(published, tmp_path, capsys):
    state = LlavaViTModel.from_pretrained(published).state_dict()
    training = tmp_path / "training"
    training.mkdir()
    torch.save({"state_dict": {f"module.{k}": v for k, v in to_training_layout(state).items()}}, training / "ckpt.pt")
    # the tiny shapes match no named size, so the head count is given
    code = packvit_main(["convert", "llava-vit", "--src", str(training), "--dst", str(tmp_path / "packing"),
                         "--from", "training", "--num_attention_heads", str(TINY["num_attention_heads"])])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["tokens_max_abs_diff"] <= PARITY
    assert_converted(tmp_path / "packing", published)


def test_training_safetensors_with_config(published, tmp_path):
    state = to_training_layout(LlavaViTModel.from_pretrained(published).state_dict())
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((published / "config.json").read_text())
    assert checkpoint_layout(tmp_path) == "training"
    with pytest.raises(ValueError, match="training-format state dict.*packvit convert llava-vit"):
        LlavaViTPackingModel.from_pretrained(tmp_path)
    convert_llava_vit(tmp_path, tmp_path / "packing", source="training")
    assert_converted(tmp_path / "packing", published)


def test_training_mapping_inverts_to_the_published_layout(published):
    """training → published gives back the published state dict, key for key and value for value."""
    state = LlavaViTModel.from_pretrained(published).state_dict()
    mapped = map_training_to_published(to_training_layout(state))
    assert mapped.keys() == state.keys()
    assert all(torch.equal(mapped[key], state[key]) for key in state)


def test_verification_refuses_a_broken_mapping(published, tmp_path, monkeypatch):
    """A mapping that swaps q and k is caught before anything is written."""
    original = LlavaViTPackingModel.map_checkpoint

    def swapped(self, state):
        state = original(self, state)
        for key in [k for k in state if k.endswith("attn.qkv.weight")]:
            q, k, v = state[key].chunk(3)
            state[key] = torch.cat([k, q, v])
        return state

    training = tmp_path / "training"
    training.mkdir()
    torch.save(to_training_layout(LlavaViTModel.from_pretrained(published).state_dict()), training / "ckpt.pt")
    monkeypatch.setattr(LlavaViTPackingModel, "map_checkpoint", swapped)
    with pytest.raises(ValueError, match="disagrees with the source checkpoint"):
        convert_llava_vit(training, tmp_path / "packing", source="training", num_attention_heads=TINY["num_attention_heads"])
    assert not (tmp_path / "packing").exists()


def test_training_head_count_needed(published):
    training = to_training_layout(LlavaViTModel.from_pretrained(published).state_dict())
    with pytest.raises(ValueError, match="cannot tell the number of attention heads"):
        config_from_training_state(training)


def test_training_config_from_a_named_size():
    with torch.device("meta"):
        standard = LlavaViTModel(llava_vit.llava_vit_packing_config("base"))
    config = config_from_training_state(to_training_layout(standard.state_dict()))
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.patch_size) == (768, 12, 12, 16)
    assert config.use_head and config.layer_norm_type == "layer_norm"


def test_hub_style_published_checkpoint(published, tmp_path):
    """A config.json as on the hub (remote-code auto_map, OneVisionEncoderModel, bf16) with bf16 weights:
    loads in bf16 with the same values, and converts to a bf16 packing checkpoint."""
    from safetensors.torch import load_file

    config = json.loads((published / "config.json").read_text())
    config.update(architectures=["OneVisionEncoderModel"], dtype="bfloat16", transformers_version="4.57.1",
                  auto_map={"AutoConfig": "configuration_onevision_encoder.OneVisionEncoderConfig",
                            "AutoModel": "modeling_onevision_encoder.OneVisionEncoderModel"})
    source = tmp_path / "hub"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(config))
    state = {k: v.bfloat16() for k, v in load_file(str(published / "model.safetensors")).items()}
    save_file(state, str(source / "model.safetensors"), metadata={"format": "pt"})
    packed = LlavaViTPackingModel.from_pretrained(source, dtype=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    assert torch.equal(packed.blocks[0].attn.qkv.weight,
                       torch.cat([state[f"encoder.layers.0.self_attn.{n}_proj.weight"] for n in "qkv"]))
    convert_llava_vit(source, tmp_path / "packing")
    with safe_open(str(tmp_path / "packing" / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("encoder.layers.0.self_attn.qkv.weight").dtype == torch.bfloat16
    converted = LlavaViTPackingModel.from_pretrained(tmp_path / "packing", dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(converted.state_dict().values(), packed.state_dict().values()))


def test_conversion_errors_name_the_problem(published, tmp_path, capsys):
    existing_file = tmp_path / "file.bin"
    existing_file.write_bytes(b"x")
    with pytest.raises(ValueError, match="--dst .*file.bin is a file"):
        convert_llava_vit(published, existing_file)
    assert existing_file.read_bytes() == b"x"
    with pytest.raises(ValueError, match="holds the published layout, not the training one; pass --from published"):
        convert_llava_vit(published, tmp_path / "out", source="training")
    with pytest.raises(ValueError, match="does not exist"):
        convert_llava_vit(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "siglip2").mkdir()
    (tmp_path / "siglip2" / "config.json").write_text(json.dumps({"model_type": "siglip2_vision_model"}))
    with pytest.raises(ValueError, match="is a siglip2 checkpoint; `packvit convert llava-vit` converts OneVision"):
        convert_llava_vit(tmp_path / "siglip2", tmp_path / "out")
    convert_llava_vit(published, tmp_path / "done")
    with pytest.raises(ValueError, match="is not empty.*--overwrite"):
        convert_llava_vit(published, tmp_path / "done")
    convert_llava_vit(published, tmp_path / "done", overwrite=True)
    # through the command: an error line and exit status 2, no traceback, nothing printed as converted
    code = packvit_main(["convert", "llava-vit", "--src", str(published), "--dst", str(existing_file)])
    captured = capsys.readouterr()
    assert code == 2 and "converted" not in captured.out
    assert captured.err.startswith("packvit convert: error: --dst")
