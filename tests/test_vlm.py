"""The vision-tower interface: selected layers without running blocks past them, CLS + patches,
the 2x2 merge in Qwen2-VL's order (odd grids refused, cropped or padded), packed and per-item
output, metadata reuse, freezing, parameter groups, the placeholder batch, and docs/vlm.md's
example run as written."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import packvit
from packvit.harness import FAMILIES, get_adapter
from packvit.vlm import VisionTower, param_groups, placeholder_batch, spatial_merge_index

CPU = torch.device("cpu")
DOC = Path(__file__).resolve().parents[1] / "docs" / "vlm.md"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    paths = {}
    for family in FAMILIES:
        try:
            paths[family] = get_adapter(family).cached_random_checkpoint(root, "tiny", seed=2)
        except ValueError as error:  # a reference transformers does not have
            paths[family] = error
    return paths


def load(checkpoints, family):
    if isinstance(checkpoints[family], Exception):
        pytest.skip(str(checkpoints[family]))
    return packvit.from_pretrained(checkpoints[family], device="cpu")


def pack(model, grids, seed=0):
    adapter = get_adapter(model.family)
    return adapter.pack(adapter.random_items(grids, model.patch_size, torch.Generator().manual_seed(seed)), model)


def merged_by_reshape(tokens, grid, m=2, odd_grids="error"):
    """The merge of one item written the way Qwen2-VL's processor orders patches: ``[t, h, w, D]``
    → ``[t, h/m, m, w/m, m, D]`` → blocks row-major, each block's m x m tokens row-major."""
    t, h, w = grid
    x = tokens.view(t, h, w, -1)
    if odd_grids == "pad":
        x = F.pad(x, (0, 0, 0, -w % m, 0, -h % m))
    elif odd_grids == "crop":
        x = x[:, : h // m * m, : w // m * m]
    t, h, w, d = x.shape
    return x.view(t, h // m, m, w // m, m, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, m * m * d)


@pytest.mark.parametrize("family", FAMILIES)
def test_selected_layers_without_later_blocks(checkpoints, family):
    model = load(checkpoints, family)
    grids = [(4, 6), (2, 2), (6, 4)] if family != "llava_vit" else [(4, 6), (2, 2), (3, 6, 4)]
    batch = pack(model, grids)
    calls = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: calls.append(module))
    with torch.no_grad():
        everything = model(batch, output_hidden_states=True)
        calls.clear()
        one = VisionTower(model, select_layer=1)(batch)
        assert calls == [model.blocks[0]]  # the second block never ran
        two = VisionTower(model, select_layer=[-1, 0])(batch)
        final = VisionTower(model)(batch)
    assert torch.equal(one.features, everything.hidden_states[1])
    assert torch.equal(two.features, torch.cat([everything.hidden_states[-1], everything.hidden_states[0]], dim=-1))
    assert torch.equal(final.features, everything.last_hidden_state)
    assert one.lengths == batch.token_counts and one.cu_seqlens.tolist() == [0, *torch.tensor(batch.token_counts).cumsum(0).tolist()]
    assert [f.shape for f in two.split()] == [(n, 2 * model.hidden_size) for n in batch.token_counts]
    with pytest.raises(ValueError, match="hidden layer 9 does not exist"):
        VisionTower(model, select_layer=9)


@pytest.mark.parametrize("family", FAMILIES)
def test_cls_patch_where_there_is_a_cls_token(checkpoints, family):
    model = load(checkpoints, family)
    batch = pack(model, [(2, 3), (1, 1), (3, 2)])
    if not model.has_cls_token:
        with pytest.raises(ValueError, match=rf"{family} has no CLS token \(the families with one: dinov3\)"):
            VisionTower(model, select_feature="cls_patch")
        assert model.num_prefix_tokens == 0
        return
    with torch.no_grad():
        out = model(batch, hidden_layers=[-2])
        tower = VisionTower(model, select_layer=-2, select_feature="cls_patch")(batch)
        final = VisionTower(model, select_feature="cls_patch")(batch)
    for i, (tokens, cls) in enumerate(zip(batch.split(out.hidden_states[0]), out.prefix_hidden_states[0][:, 0])):
        assert torch.equal(tower.split()[i], torch.cat([cls[None], tokens]))
    assert torch.equal(final.split()[1], torch.cat([model(batch).pooler_output[1:2], batch.split(model(batch).last_hidden_state)[1]]))
    assert tower.lengths == [7, 2, 7]
    with pytest.raises(ValueError, match="use select_feature='patch' with spatial_merge"):
        VisionTower(model, select_feature="cls_patch", spatial_merge=2)


@pytest.mark.parametrize("odd_grids", ["error", "crop", "pad"])
def test_spatial_merge_in_qwen2_vl_order(checkpoints, odd_grids):
    model = load(checkpoints, "llava_vit")
    grids = [(4, 6), (2, 2, 4)] + ([(3, 5), (5, 2)] if odd_grids != "error" else [])
    batch = pack(model, grids)
    tower = VisionTower(model, select_layer=-1, spatial_merge=2, odd_grids=odd_grids)
    with torch.no_grad():
        out = tower(batch)
        tokens = model(batch, hidden_layers=[-1]).hidden_states[0]
    expected = [merged_by_reshape(x, g, 2, odd_grids) for x, g in zip(batch.split(tokens), batch.grid_thw.tolist())]
    assert tower.feature_size == 4 * model.hidden_size
    assert out.lengths == [e.shape[0] for e in expected] == tower.feature_lengths(batch.grid_thw)
    assert all(torch.equal(a, b) for a, b in zip(out.split(), expected))
    # the first merged row of the first item is the 2x2 block at the top left: (0,0), (0,1), (1,0), (1,1)
    first = batch.split(tokens)[0]
    assert torch.equal(out.features[0], torch.cat([first[0], first[1], first[6], first[7]]))


def test_odd_grids_are_refused_by_default_with_the_fix():
    with pytest.raises(ValueError, match=r"item 1 has a 3x4 patch grid.*multiples of 2 patches.*odd_grids='crop'.*odd_grids='pad'"):
        spatial_merge_index(torch.tensor([[1, 4, 4], [1, 3, 4]]), 2)
    with pytest.raises(ValueError, match=r"item 0 has a 1x4 patch grid, smaller than one 2x2 block.*odd_grids='pad'"):
        spatial_merge_index(torch.tensor([[1, 1, 4]]), 2, "crop")
    with pytest.raises(ValueError, match="odd_grids must be one of"):
        spatial_merge_index(torch.tensor([[1, 2, 2]]), 2, "round")


def test_metadata_is_prepared_once_and_reused(checkpoints):
    model = load(checkpoints, "dinov3")
    batch = pack(model, [(4, 4), (2, 6)])
    tower = VisionTower(model, select_layer=-2, spatial_merge=2)
    meta = tower.prepare(batch)
    prepared = []
    prepare = model.prepare
    model.prepare = lambda *args, **kwargs: prepared.append(1) or prepare(*args, **kwargs)
    with torch.no_grad():
        reused = tower(batch, metadata=meta)
        from_pack = tower(batch, metadata=meta.model_metadata)
    assert prepared == []  # neither call built the model's metadata again
    fresh = VisionTower(model, select_layer=-2, spatial_merge=2)(batch)
    assert torch.equal(reused.features, fresh.features) and torch.equal(from_pack.features, fresh.features)
    with pytest.raises(ValueError, match="metadata was prepared for another grid_thw"):
        tower(pack(model, [(2, 2)]), metadata=meta)


def test_gradients_reach_the_tower_through_the_merge_and_freezing_stops_them(checkpoints):
    model = load(checkpoints, "siglip2")
    batch = pack(model, [(4, 4), (2, 6)])
    tower = VisionTower(model, select_layer=-1, spatial_merge=2)
    tower(batch).features.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for n, p in model.named_parameters() if not n.startswith(("head.", "final_norm.")))
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith(("head.", "final_norm.")))  # unused
    model.zero_grad(set_to_none=True)
    tower.freeze(num_blocks=1)
    assert not any(p.requires_grad for p in model.embeddings.parameters()) and not any(p.requires_grad for p in model.blocks[0].parameters())
    assert all(p.requires_grad for p in model.blocks[1].parameters())
    tower.requires_grad_(False)
    features = tower(batch).features
    assert not features.requires_grad and features.grad_fn is None  # nothing recorded for a frozen tower


def test_param_groups_give_the_tower_its_learning_rate(checkpoints):
    model = load(checkpoints, "dinov3")
    tower = VisionTower(model)
    projector = torch.nn.Sequential(torch.nn.Linear(model.hidden_size, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    vlm = torch.nn.ModuleDict({"tower": tower, "projector": projector})
    groups = {g["name"]: g for g in param_groups(vlm, tower, lr=1e-3, tower_lr=1e-5, weight_decay=0.1)}
    assert sorted(groups) == ["other", "other_no_decay", "tower", "tower_no_decay"]
    assert groups["tower"]["lr"] == groups["tower_no_decay"]["lr"] == 1e-5 and groups["other"]["lr"] == 1e-3
    assert groups["other"]["params"] == [projector[0].weight, projector[2].weight] and groups["other"]["weight_decay"] == 0.1
    assert groups["tower_no_decay"]["weight_decay"] == 0.0 and all(p.dim() < 2 for p in groups["tower_no_decay"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(list(vlm.parameters()))  # no head: DINOv3 pools the CLS
    penultimate = VisionTower(model, select_layer=-2)
    assert penultimate.unused_parameters() == [*model.blocks[-1].parameters(), *model.final_norm.parameters()]
    grouped = [p for g in param_groups(penultimate, penultimate, lr=1e-3, tower_lr=1e-5) for p in g["params"]]
    assert len(grouped) == len(list(model.parameters())) - len(penultimate.unused_parameters())
    tower.freeze()
    assert [g["name"] for g in param_groups(vlm, tower, lr=1e-3, tower_lr=1e-5)] == ["other"]
    torch.optim.AdamW(param_groups(vlm, tower, lr=1e-3, tower_lr=1e-5, weight_decay=0.1))


def test_placeholder_batch_runs_every_parameter_the_real_batches_do(checkpoints, tmp_path):
    models = [load(checkpoints, family) for family in FAMILIES]
    models.append(get_adapter("aimv2").load_packed(
        get_adapter("aimv2").write_random_checkpoint(tmp_path, "tiny", is_native=False), CPU, torch.float32))
    for model in models:
        tower = VisionTower(model)
        placeholder = placeholder_batch(model)
        assert placeholder.num_items == 1
        (0.0 * tower(placeholder).features.sum()).backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters() if p.grad is not None)
        model.zero_grad(set_to_none=True)
        tower(pack(model, [(4, 4), (2, 3)] if getattr(model.config, "is_native", True) else [(4, 4)])).features.sum().backward()
        assert with_grad == {n for n, p in model.named_parameters() if p.grad is not None}


def test_errors_name_the_fix(checkpoints):
    model = load(checkpoints, "siglip2")
    with pytest.raises(ValueError, match="select_feature must be one of"):
        VisionTower(model, select_feature="cls")
    with pytest.raises(ValueError, match="spatial_merge must be a positive int"):
        VisionTower(model, spatial_merge=0)
    with pytest.raises(ValueError, match="VisionTower wraps a packed model"):
        VisionTower(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="takes a PackedBatch"):
        VisionTower(model)(torch.zeros(4, model.patch_dim))
    with pytest.raises(ValueError, match="hidden_states_only=True needs the hidden states"):
        model(pack(model, [(2, 2)]), hidden_states_only=True)


def test_the_documented_example_runs(checkpoints, monkeypatch):
    """docs/vlm.md's first example, run as written on a small random SigLIP2 checkpoint."""
    pytest.importorskip("skimage")
    load(checkpoints, "siglip2")  # skips where transformers cannot write the checkpoint
    ckpt = checkpoints["siglip2"]
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    for snippet in code[1:]:
        compile(snippet, str(DOC), "exec")  # the other snippets at least parse
    example = code[0].replace('"google/siglip2-so400m-patch16-naflex"', repr(str(ckpt)))
    assert example != code[0]
    namespace = {}
    exec(compile(example, str(DOC), "exec"), namespace)
    tower, features, batch = namespace["tower"], namespace["features"], namespace["batch"]
    assert features.features.shape == (sum(features.lengths), 4 * tower.model.hidden_size)
    assert features.lengths == tower.feature_lengths(batch) and len(namespace["per_item"]) == 3
    assert torch.isfinite(namespace["loss"])
    stepped = [p for group in namespace["optimizer"].param_groups for p in group["params"]]
    assert len(namespace["optimizer"].state) == len(stepped)  # every parameter given to the optimiser stepped
    assert {id(p) for p in tower.unused_parameters()}.isdisjoint(map(id, stepped)) and tower.unused_parameters()
    assert all(p.grad is None for p in tower.parameters())
    assert namespace["model"].is_gradient_checkpointing
