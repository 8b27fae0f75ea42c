"""The one model API: from_pretrained → load_processor → model(batch), the same for every family;
the attributes every model exposes; metadata reuse and hidden-layer selection; saving; and the
errors of loading."""

import json
import re

import pytest
import torch

import packvit
from packvit.harness import FAMILIES, get_adapter
from packvit.models.base import PackedVisionOutput
from packvit.packing import PackedBatch, patchify

PHOTOS = ("astronaut", "chelsea", "coffee")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A small random checkpoint per family (the references need transformers, except OneVision's)."""
    paths = {}
    for family in FAMILIES:
        try:
            paths[family] = get_adapter(family).write_random_checkpoint(tmp_path_factory.mktemp(family), size="tiny", seed=1)
        except ValueError as error:  # a reference transformers does not have
            paths[family] = error
    return paths


def checkpoint(checkpoints, family):
    path = checkpoints[family]
    if isinstance(path, Exception):
        pytest.skip(str(path))
    return path


@pytest.fixture(scope="module")
def photos():
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    return [Image.fromarray(getattr(data, name)()) for name in PHOTOS]


@pytest.mark.parametrize("family", FAMILIES)
def test_one_path_for_every_family(checkpoints, photos, family):
    ckpt = checkpoint(checkpoints, family)
    model = packvit.from_pretrained(ckpt, device="cpu")
    processor = packvit.load_processor(ckpt)
    batch = processor(photos)
    assert isinstance(batch, PackedBatch) and batch.num_items == 3 and batch.patch_layout == model.patch_layout
    with torch.no_grad():
        out = model(batch)
        alone = [model(processor([photo])) for photo in photos]
    assert isinstance(out, PackedVisionOutput)
    assert out.last_hidden_state.shape == (batch.patches.shape[0], model.hidden_size)
    assert out.pooler_output.shape == (3, model.hidden_size)  # one row per item in every family
    if model.num_prefix_tokens:
        assert out.prefix_tokens.shape == (3, model.num_prefix_tokens, model.hidden_size)
    else:
        assert out.prefix_tokens is None
    # each item's outputs are those of the item alone
    for tokens, pooled, single in zip(batch.split(out.last_hidden_state), out.pooler_output, alone):
        assert (tokens - single.last_hidden_state).abs().max() <= 1e-5
        assert (pooled - single.pooler_output[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_every_model_exposes_its_shape(checkpoints, family):
    model = packvit.from_pretrained(checkpoint(checkpoints, family), device="cpu")
    config = model.config
    assert model.family == family
    assert model.patch_size == config.patch_size and model.patch_dim == 3 * config.patch_size**2
    assert model.patch_layout == ("cpp" if family == "llava_vit" else "ppc")
    assert model.num_prefix_tokens == (5 if family == "dinov3" else 0)
    assert model.hidden_size == config.hidden_size and model.num_hidden_layers == len(model.blocks)
    assert type(model) is packvit.models.registry.model_class(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_metadata_is_reusable_and_hidden_layers_are_selected(checkpoints, family):
    model = packvit.from_pretrained(checkpoint(checkpoints, family), device="cpu")
    items = get_adapter(family).random_items([(3, 4), (1, 1), (2, 5)], model.patch_size, torch.Generator().manual_seed(0))
    batch = PackedBatch(*patchify(items, model.patch_size, model.patch_layout), model.patch_layout)
    meta = model.prepare(batch)
    with torch.no_grad():
        fresh = model(batch, output_hidden_states=True)
        reused = model(batch, metadata=meta, hidden_layers=[-1, 0, 1])
    assert torch.equal(fresh.last_hidden_state, reused.last_hidden_state)
    assert len(fresh.hidden_states) == model.num_hidden_layers + 1 and len(reused.hidden_states) == 3
    for selected, index in zip(reused.hidden_states, [-1, 0, 1]):
        assert torch.equal(selected, fresh.hidden_states[index])
    other = PackedBatch(*patchify(items[:2], model.patch_size, model.patch_layout), model.patch_layout)
    with pytest.raises(ValueError, match="metadata was prepared for another grid_thw"):
        model(other, metadata=meta)
    with pytest.raises(ValueError, match=r"hidden layer 5 does not exist: the model has 3 hidden states"):
        model(batch, hidden_layers=[5])


def test_contradictory_options_are_refused(checkpoints):
    model = packvit.from_pretrained(checkpoint(checkpoints, "llava_vit"), device="cpu")
    batch, patches, grid_thw = seed_inputs(model, "llava_vit")
    with pytest.raises(ValueError, match="output_hidden_states=True asks for every hidden state and hidden_layers"):
        model(batch, output_hidden_states=True, hidden_layers=[0])
    with pytest.raises(ValueError, match="pass a PackedBatch alone"):
        model(batch, patch_positions=torch.zeros(patches.shape[0], 3, dtype=torch.long))
    with torch.no_grad():  # output_hidden_states=False and return_dict=True add nothing to a PackedBatch
        plain, spelled = model(batch), model(batch, output_hidden_states=False, return_dict=True)
    assert torch.equal(plain.last_hidden_state, spelled.last_hidden_state) and spelled.hidden_states is None


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip(checkpoints, family, tmp_path):
    model = packvit.from_pretrained(checkpoint(checkpoints, family), device="cpu")
    model.save_pretrained(tmp_path)
    reloaded = packvit.from_pretrained(tmp_path, device="cpu")
    assert type(reloaded) is type(model) and reloaded.config == model.config
    state, reloaded_state = model.state_dict(), reloaded.state_dict()
    assert state.keys() == reloaded_state.keys() and all(torch.equal(state[k], reloaded_state[k]) for k in state)


def test_unknown_model_type_lists_what_is_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match=r"model_type 'bert'.*no packvit family loads.*siglip2: siglip2, siglip2_vision_model.*"
                                         r"dinov3: dinov3_vit.*aimv2:.*llava_vit: onevision_encoder"):
        packvit.from_pretrained(tmp_path)


def test_loading_errors_name_the_file(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="does not exist: it is neither a local directory nor a hub id"):
        packvit.from_pretrained(tmp_path / "missing" / "checkpoint")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken/config.json is not valid JSON"):
        packvit.from_pretrained(broken)
    source = checkpoint(checkpoints, "llava_vit")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((source / "config.json").read_text())
    data = (source / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated/model.safetensors cannot be read as safetensors.*truncated or corrupt"):
        packvit.from_pretrained(truncated)
    with pytest.raises(ValueError, match=r"dtype 'float33' is not a torch dtype"):
        packvit.from_pretrained(source, dtype="float33")
    with pytest.raises(ValueError, match=r"has no fields \['use_heads'\]"):
        packvit.from_pretrained(source, use_heads=False)


def test_grid_on_the_meta_device_is_refused(checkpoints):
    model = packvit.from_pretrained(checkpoint(checkpoints, "llava_vit"), device="cpu")
    with pytest.raises(ValueError, match="grid_thw is on the meta device"):
        model(torch.randn(4, model.patch_dim), torch.ones(1, 3, dtype=torch.long, device="meta"))


def test_batch_and_tensors_are_not_mixed(checkpoints):
    model = packvit.from_pretrained(checkpoint(checkpoints, "llava_vit"), device="cpu")
    batch = PackedBatch(torch.randn(4, model.patch_dim), [[1, 2, 2]], "cpp")
    with pytest.raises(ValueError, match="pass a PackedBatch alone"):
        model(batch, batch.grid_thw)
    with pytest.raises(ValueError, match="with grid_thw"):
        model(batch.patches)


def test_runtime_sets_modes_and_restores_them(checkpoints):
    model = packvit.from_pretrained(checkpoint(checkpoints, "llava_vit"))  # OneVision's reference needs nothing
    model.compile_layers, model.attention_backend = None, None
    with model.runtime(compile_layers=False, attention_backend="reference", gradient_checkpointing=True):
        assert (model.compile_layers, model.attention_backend, model.gradient_checkpointing) == (False, "reference", True)
    assert (model.compile_layers, model.attention_backend, model.gradient_checkpointing) == (None, None, False)
    with pytest.raises(RuntimeError), model.runtime(compile_layers=True):
        raise RuntimeError("restored on errors too")
    assert model.compile_layers is None
    with pytest.raises(ValueError, match="unknown runtime modes"), model.runtime(speed=11):
        pass


# --- the earlier packed models' call forms -----------------------------------------------------------
# Every family's first release took ``forward(hidden_states, grid_thw, *, return_dict=False,
# output_hidden_states=False)`` (AIMv2 also ``interpolate_pos_encoding``) and returned the
# last_hidden_state tensor; OneVision's published LlavaViTPackingModel takes ``forward(hidden_states,
# grid_thw, patch_positions=None, output_hidden_states=None, return_dict=None)`` and returns the output.


def seed_inputs(model, family):
    items = get_adapter(family).random_items([(3, 4), (2, 2)], model.patch_size, torch.Generator().manual_seed(3))
    patches, grid_thw = patchify(items, model.patch_size, model.patch_layout)
    return PackedBatch(patches, grid_thw, model.patch_layout), patches, grid_thw


@pytest.mark.parametrize("family", FAMILIES)
def test_seed_call_forms_keyword_and_positional(checkpoints, family):
    model = packvit.from_pretrained(checkpoint(checkpoints, family), device="cpu")
    batch, patches, grid_thw = seed_inputs(model, family)
    with torch.no_grad():
        expected = model(batch, hidden_layers=range(model.num_hidden_layers + 1))
        keyword = model(hidden_states=patches, grid_thw=grid_thw)
        positional = model(patches, grid_thw)
        as_output = model(hidden_states=patches, grid_thw=grid_thw, return_dict=True)
        with_hidden = model(hidden_states=patches, grid_thw=grid_thw, output_hidden_states=True, return_dict=True)
    if family == "llava_vit":  # the published packed model returns its output object
        for out in (keyword, positional):
            assert torch.equal(out.last_hidden_state, expected.last_hidden_state)
            assert torch.equal(out.pooler_output, expected.pooler_output)
    else:  # the image families' first releases returned the last_hidden_state tensor
        assert torch.equal(keyword, expected.last_hidden_state) and torch.equal(positional, expected.last_hidden_state)
    assert torch.equal(as_output.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(as_output.pooler_output, expected.pooler_output) and as_output.hidden_states is None
    assert len(with_hidden.hidden_states) == model.num_hidden_layers + 1
    for seed_hidden, hidden in zip(with_hidden.hidden_states, expected.hidden_states):
        assert seed_hidden.shape == (patches.shape[0], model.hidden_size) and torch.equal(seed_hidden, hidden)
    with pytest.raises(ValueError, match="as the first argument or as hidden_states=, not both"):
        model(patches, grid_thw, hidden_states=patches)


def test_seed_call_forms_of_the_published_onevision_model(checkpoints):
    """patch_positions, output_hidden_states and return_dict by keyword and by position."""
    from packvit.packing import token_positions

    model = packvit.from_pretrained(checkpoint(checkpoints, "llava_vit"), device="cpu")
    batch, patches, grid_thw = seed_inputs(model, "llava_vit")
    positions = token_positions(grid_thw) * 2  # any (t, row, column): they change the output
    with torch.no_grad():
        expected = model(PackedBatch(patches, grid_thw, "cpp", positions), hidden_layers=range(model.num_hidden_layers + 1))
        keyword = model(hidden_states=patches, grid_thw=grid_thw, patch_positions=positions)
        positional = model(patches, grid_thw, positions)
        hidden = model(patches, grid_thw, positions, True)
        as_tuple = model(patches, grid_thw, positions, True, False)
        default = model(patches, grid_thw)
    for out in (keyword, positional, hidden):
        assert torch.equal(out.last_hidden_state, expected.last_hidden_state)
        assert torch.equal(out.pooler_output, expected.pooler_output)
    assert keyword.hidden_states is None and len(hidden.hidden_states) == model.num_hidden_layers + 1
    assert all(torch.equal(a, b) for a, b in zip(hidden.hidden_states, expected.hidden_states))
    assert torch.equal(as_tuple[0], expected.last_hidden_state) and torch.equal(as_tuple[1], expected.pooler_output)
    assert len(as_tuple[2]) == model.num_hidden_layers + 1
    assert (default.last_hidden_state - expected.last_hidden_state).abs().max() > 1e-3


def test_seed_loading_spellings(checkpoints):
    """transformers' torch_dtype and device_map, as the earlier packed models took them."""
    ckpt = checkpoint(checkpoints, "llava_vit")
    model = packvit.LlavaViTPackingModel.from_pretrained(ckpt, torch_dtype=torch.bfloat16, device_map=None)
    assert model.dtype == torch.bfloat16 and model.device == packvit.models.base.default_device()
    assert packvit.from_pretrained(ckpt, torch_dtype=torch.float64, device_map="cpu").dtype == torch.float64
    assert packvit.from_pretrained(ckpt, device_map={"": "cpu"}).device == torch.device("cpu")
    with pytest.raises(ValueError, match="pass dtype or torch_dtype .*not both"):
        packvit.from_pretrained(ckpt, dtype=torch.float32, torch_dtype=torch.float32)
    with pytest.raises(ValueError, match="a packed model runs on one device"):
        packvit.from_pretrained(ckpt, device_map={"embeddings": "cpu", "blocks": "meta"})


# --- what a pack's metadata and a batch's origin guard ------------------------------------------------


def test_metadata_checks_everything_it_was_built_from(checkpoints):
    from packvit.packing import token_positions

    model = packvit.from_pretrained(checkpoint(checkpoints, "llava_vit"), device="cpu")
    _, patches, grid_thw = seed_inputs(model, "llava_vit")
    positions = token_positions(grid_thw)
    batch_a = PackedBatch(patches, grid_thw, "cpp", positions)
    batch_b = PackedBatch(patches, grid_thw, "cpp", positions * 2)  # same grid, other positions
    meta = model.prepare(batch_a)
    with torch.no_grad():
        expected = model(batch_a).last_hidden_state
        assert torch.equal(model(batch_a, metadata=meta).last_hidden_state, expected)
        equal_copy = PackedBatch(patches, grid_thw, "cpp", positions.clone())  # equal host positions: the same pack
        assert torch.equal(model(equal_copy, metadata=meta).last_hidden_state, expected)
    with pytest.raises(ValueError, match=r"metadata was prepared for other patch_positions.*call model.prepare\(batch\)"):
        model(batch_b, metadata=meta)
    with pytest.raises(ValueError, match="metadata was prepared for other patch_positions"):
        model(PackedBatch(patches, grid_thw, "cpp"), metadata=meta)
    with pytest.raises(ValueError, match="metadata was prepared for other patch_positions"):
        model(patches, grid_thw, patch_positions=positions * 2, metadata=meta)
    model.attention_backend = "reference"
    with pytest.raises(ValueError, match="prepared for the attention backend None and the model now has attention_backend='reference'"):
        model(batch_a, metadata=meta)
    model.attention_backend = None
    siglip2 = packvit.from_pretrained(checkpoint(checkpoints, "siglip2"), device="cpu")
    dinov3 = packvit.from_pretrained(checkpoint(checkpoints, "dinov3"), device="cpu")
    image = PackedBatch(torch.randn(6, siglip2.patch_dim), [[1, 2, 3]])
    with pytest.raises(ValueError, match="metadata was prepared by another model"):
        siglip2(image, metadata=dinov3.prepare(image))
    siglip2.interpolate_pos_encoding = True
    with pytest.raises(ValueError, match="prepared with interpolate_pos_encoding=False and the model now has True"):
        siglip2(image, metadata=siglip2.prepare(image, interpolate_pos_encoding=False))


def test_image_families_refuse_patch_positions(checkpoints):
    model = packvit.from_pretrained(checkpoint(checkpoints, "siglip2"), device="cpu")
    batch = PackedBatch(torch.randn(6, model.patch_dim), [[1, 2, 3]], patch_positions=torch.zeros(6, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="has no use for patch_positions"):
        model(batch)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_of_another_family_is_refused(checkpoints, family):
    from packvit.packing import BatchOrigin

    model = packvit.from_pretrained(checkpoint(checkpoints, family), device="cpu")
    patches, grid_thw = patchify(get_adapter(family).random_items([(2, 3)], model.patch_size, torch.Generator()),
                                 model.patch_size, model.patch_layout)
    other = "siglip2" if family != "siglip2" else "dinov3"
    stranger = PackedBatch(patches, grid_thw, model.patch_layout, origin=BatchOrigin(other, (0.5,) * 3, (0.5,) * 3))
    with pytest.raises(ValueError, match=rf"made by the {other} processor.*is a {family} model.*packvit.load_processor\(model\)"):
        model(stranger)
    own = PackedBatch(patches, grid_thw, model.patch_layout, origin=BatchOrigin(family, (0.5,) * 3, (0.5,) * 3))
    with torch.no_grad():
        assert torch.equal(model(own).last_hidden_state, model(PackedBatch(patches, grid_thw, model.patch_layout)).last_hidden_state)


# --- which files of a checkpoint folder are read ------------------------------------------------------


def test_checkpoint_files_are_those_transformers_reads(checkpoints, tmp_path):
    """model.safetensors, else the shards of model.safetensors.index.json; a stray *.safetensors beside
    them is never merged in, a folder with only other names is refused, overlapping shards too."""
    from safetensors.torch import load_file, save_file

    source = checkpoint(checkpoints, "llava_vit")
    state = load_file(str(source / "model.safetensors"))
    reference = packvit.from_pretrained(source, device="cpu").state_dict()
    stray = {key: value + 1 for key, value in state.items()}  # sorts after model.safetensors: it won before

    def folder(name, files):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "config.json").write_text((source / "config.json").read_text())
        for file_name, tensors in files.items():
            if file_name.endswith(".json"):
                (directory / file_name).write_text(json.dumps(tensors))
            else:
                save_file(tensors, str(directory / file_name), metadata={"format": "pt"})
        return directory

    def loads_the_reference(directory):
        loaded = packvit.from_pretrained(directory, device="cpu").state_dict()
        return all(torch.equal(loaded[key], reference[key]) for key in reference)

    assert loads_the_reference(folder("stray", {"model.safetensors": state, "model_old.safetensors": stray}))
    with pytest.raises(ValueError, match=r"has neither model.safetensors nor model.safetensors.index.json.*"
                                         r"\['model_old.safetensors'\]: rename the weights file"):
        packvit.from_pretrained(folder("only_other", {"model_old.safetensors": state}), device="cpu")
    names = sorted(state)
    first, second = names[: len(names) // 2], names[len(names) // 2:]
    shards = {"model-00001-of-00002.safetensors": {k: state[k] for k in first},
              "model-00002-of-00002.safetensors": {k: state[k] for k in second}}
    index = {"metadata": {}, "weight_map": {**dict.fromkeys(first, "model-00001-of-00002.safetensors"),
                                           **dict.fromkeys(second, "model-00002-of-00002.safetensors")}}
    assert loads_the_reference(folder("sharded", {**shards, "model.safetensors.index.json": index,
                                                  "zz_old.safetensors": stray}))
    overlapping = {**shards, "model-00002-of-00002.safetensors": {**shards["model-00002-of-00002.safetensors"],
                                                                   first[0]: stray[first[0]]}}
    with pytest.raises(ValueError, match=rf"tensor {re.escape(first[0])} is in both model-00001-of-00002.safetensors "
                                         r"and model-00002-of-00002.safetensors"):
        packvit.from_pretrained(folder("overlap", {**overlapping, "model.safetensors.index.json": index}), device="cpu")
    missing_shard = {"model.safetensors.index.json": index, "model-00001-of-00002.safetensors": shards["model-00001-of-00002.safetensors"]}
    with pytest.raises(ValueError, match=r"places .* in 'model-00002-of-00002.safetensors', which is not a file"):
        packvit.from_pretrained(folder("missing_shard", missing_shard), device="cpu")


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_mismatches_are_named_as_the_checkpoint_names_them(checkpoints, family, tmp_path):
    """One absent key projection, one stray tensor: named as they are in the file, before any fusing,
    and the present q/v projections of that layer are not called unexpected."""
    from safetensors.torch import load_file, save_file

    source = checkpoint(checkpoints, family)
    state = load_file(str(source / "model.safetensors"))
    absent = max((key for key in state if key.endswith("k_proj.weight")), key=lambda key: [int(p) for p in key.split(".") if p.isdigit()])
    del state[absent]
    state["extra.scale"] = torch.ones(3)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    with pytest.raises(ValueError, match=rf"missing \['{re.escape(absent)}'\], unexpected \['extra.scale'\] \(the checkpoint's names\)\. "):
        packvit.from_pretrained(tmp_path, device="cpu")
