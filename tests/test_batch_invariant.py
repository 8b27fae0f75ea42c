"""Batch-invariant mode on the CPU: every output of an item is the same bits alone, packed with
others, in another order, duplicated and in packs of other budgets, for every family; its
gradients with respect to the inputs too; the switches, the refusals and ``packvit embed
--batch_invariant`` (byte-identical files for one and two processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import packvit
from packvit.batch_invariant import INVARIANT_ATTENTION_BACKENDS, attention_backend, invariant_kernels, normalize_rows
from packvit.batch_invariant import ops
from packvit.cuda_graphs import GraphedEncoder
from packvit.harness import FamilyAdapter, randomize_parameters
from packvit.models.aimv2 import AIMv2Config, AIMv2Packing
from packvit.models.dinov3 import DINOv3Config, DINOv3ViTPacking
from packvit.models.llava_vit import LlavaViTPackingModel, llava_vit_packing_config
from packvit.models.siglip2 import Siglip2NaflexConfig, Siglip2NaflexPacking
from packvit.packing import pack_by_budget

ROOT = Path(__file__).resolve().parents[1]


def tiny_models() -> dict:
    """A small random model of every family (and of the variants whose code differs), built from
    its configuration: no reference library needed."""
    models = {
        "siglip2": Siglip2NaflexPacking(Siglip2NaflexConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                                                            num_attention_heads=2)),
        "dinov3": DINOv3ViTPacking(DINOv3Config(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                                num_attention_heads=2)),
        "dinov3_swiglu": DINOv3ViTPacking(DINOv3Config(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                                       num_attention_heads=2, use_gated_mlp=True, hidden_act="silu")),
        "aimv2": AIMv2Packing(AIMv2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=2, is_native=True)),
        "aimv2_resized_table": AIMv2Packing(AIMv2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                        num_attention_heads=2, image_size=56),
                                            interpolate_pos_encoding=True),
        "llava_vit": LlavaViTPackingModel(llava_vit_packing_config("small", hidden_size=64, intermediate_size=128,
                                                                   num_hidden_layers=2, num_attention_heads=2,
                                                                   patch_size=8)),
    }
    for seed, model in enumerate(models.values()):
        randomize_parameters(model, torch.Generator().manual_seed(seed))
    return models


MODELS = tiny_models()


def grids_of(name: str) -> list[tuple[int, int, int]]:
    """Grids of many sizes: one patch, tall, wide, square, and for OneVision a clip."""
    grids = [(1, 3, 4), (1, 1, 1), (1, 9, 2), (1, 6, 6), (1, 7, 7), (1, 10, 13), (1, 2, 11)]
    return grids + [(3, 2, 5)] if name == "llava_vit" else grids


def random_items(model, grids, seed: int) -> list[torch.Tensor]:
    return FamilyAdapter().random_items(grids, model.patch_size, torch.Generator().manual_seed(seed))


def layers_of(model) -> list[int]:
    return [0, 1, -1]


def item_outputs(model, items, layers=None) -> list[torch.Tensor]:
    """Every output of each item of one pack, as one flat float tensor per item: patch tokens,
    hidden states (``layers``), prefix tokens and pooled vector."""
    batch = FamilyAdapter.pack(items, model)
    out = model(batch, hidden_layers=layers)
    counts = batch.token_counts
    per_item = [torch.split(out.last_hidden_state, counts)]
    per_item += [torch.split(hidden, counts) for hidden in out.hidden_states or ()]
    if out.prefix_tokens is not None:
        per_item.append(out.prefix_tokens.unbind(0))
        per_item += [prefix.unbind(0) for prefix in out.prefix_hidden_states or ()]
    if out.pooler_output is not None:
        per_item.append(out.pooler_output.unbind(0))
    return [torch.cat([part[i].float().flatten() for part in per_item]) for i in range(len(items))]


def arrangements(model, items, layers, budgets) -> dict[str, list[torch.Tensor]]:
    """Each item's outputs (in item order) alone, packed together, reversed, duplicated (both
    copies), between items of other sizes, and in packs of each token budget."""
    count = len(items)
    others = [x.to(items[0].device) for x in random_items(model, [(1, 5, 3), (1, 12, 12), (1, 1, 9)], seed=99)]
    reversed_outputs = item_outputs(model, items[::-1], layers)[::-1]
    duplicated = item_outputs(model, items + items, layers)
    interleaved = item_outputs(model, [x for pair in zip(others * 3, items) for x in pair], layers)[1::2]
    found = {
        "alone": [item_outputs(model, [item], layers)[0] for item in items],
        "together": item_outputs(model, items, layers),
        "reversed": reversed_outputs,
        "first copy": duplicated[:count],
        "second copy": duplicated[count:],
        "between others": interleaved,
    }
    counts = [item.numel() // item.shape[-3] // model.patch_size**2 + model.num_prefix_tokens for item in items]
    for budget in budgets:
        outputs = []
        for pack in pack_by_budget(counts, budget):
            outputs += item_outputs(model, [items[i] for i in pack], layers)
        found[f"budget {budget}"] = outputs
    return found


def assert_bit_identical(found: dict[str, list[torch.Tensor]], label: str) -> None:
    reference = found["alone"]
    for name, outputs in found.items():
        for index, (expected, got) in enumerate(zip(reference, outputs)):
            assert torch.equal(expected, got), (
                f"{label}: item {index} {name} differs from it alone by {(expected - got).abs().max().item():.3g}")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_output_of_an_item_is_the_same_bits_whatever_its_pack(name):
    model = MODELS[name]
    items = random_items(model, grids_of(name) if name != "aimv2_resized_table" else [(1, 4, 4), (1, 3, 5), (1, 4, 4)], 0)
    with model.runtime(batch_invariant=True), torch.no_grad():
        found = arrangements(model, items, layers_of(model), budgets=(40, 150))
    assert_bit_identical(found, name)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batch_invariant_outputs_match_the_default_mode(name):
    """The invariant kernels compute what the default ones do, to float32 rounding (and so keep the
    float32 parity with the references that the family tests measure in the default mode)."""
    model = MODELS[name]
    items = random_items(model, grids_of(name) if name != "aimv2_resized_table" else [(1, 4, 4), (1, 3, 5)], 1)
    with torch.no_grad():
        default = item_outputs(model, items, layers_of(model))
        with model.runtime(batch_invariant=True):
            invariant = item_outputs(model, items, layers_of(model))
    worst = max((d - i).abs().max().item() for d, i in zip(default, invariant))
    assert worst <= 1e-5


def test_a_thousand_token_pack_keeps_the_bits_of_an_item_alone():
    """Packs past one thread's share of an elementwise kernel and past 64-row product blocks."""
    model = MODELS["siglip2"]
    items = random_items(model, grids_of("siglip2"), 2)
    with model.runtime(batch_invariant=True), torch.no_grad():
        alone = [item_outputs(model, [item])[0] for item in items]
        packed = item_outputs(model, items * 12)
    for index, expected in enumerate(alone):
        assert all(torch.equal(expected, packed[index + k * len(items)]) for k in range(12)), index


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("name", ["siglip2", "aimv2", "dinov3_swiglu", "llava_vit"])
def test_gradients_with_respect_to_an_item_are_the_same_bits_whatever_its_pack(name, checkpointing):
    """The gradient with respect to an item's patches, for fixed upstream gradients per item (a loss
    that sums per-item terms), alone and packed; with gradient checkpointing the recomputed blocks
    run the invariant kernels too."""
    model = MODELS[name]
    items = random_items(model, grids_of(name)[:5], 3)
    counts = FamilyAdapter.pack(items, model).token_counts
    token_gradients = [torch.randn(n, model.hidden_size, generator=torch.Generator().manual_seed(i))
                       for i, n in enumerate(counts)]
    pooled_gradients = [torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(100 + i))
                        for i in range(len(items))]

    def input_gradients(order):
        batch = FamilyAdapter.pack([items[i] for i in order], model)
        patches = batch.patches.clone().requires_grad_()
        out = model(type(batch)(patches, batch.grid_thw, batch.patch_layout))
        outputs, upstream = [out.last_hidden_state], [torch.cat([token_gradients[i] for i in order])]
        if out.pooler_output is not None:
            outputs.append(out.pooler_output)
            upstream.append(torch.stack([pooled_gradients[i] for i in order]))
        (gradient,) = torch.autograd.grad(outputs, patches, upstream)
        return dict(zip(order, torch.split(gradient, batch.token_counts)))  # {item index: its gradient}

    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    try:
        with model.runtime(batch_invariant=True):
            alone = [input_gradients([i])[i] for i in range(len(items))]
            together = input_gradients(list(range(len(items))))
            reversed_order = input_gradients(list(reversed(range(len(items)))))
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    for index, expected in enumerate(alone):
        assert torch.equal(expected, together[index]), (index, (expected - together[index]).abs().max().item())
        assert torch.equal(expected, reversed_order[index]), index


def test_row_blocks_make_a_product_row_invariant():
    """A row's product is the same bits among 1, 7, 63, 64, 65 or 3000 rows and at any position."""
    generator = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(96, 160, generator=generator), torch.randn(96, generator=generator)
    rows = torch.randn(3000, 160, generator=generator)
    with invariant_kernels():
        expected = F.linear(rows[:1], weight, bias)[0]
        for count in (7, 63, 64, 65, 3000):
            for position in {0, count // 2, count - 1}:
                block = torch.cat([rows[1:count], rows[:1]])[torch.arange(count).roll(position + 1)]
                assert torch.equal(F.linear(block, weight, bias)[position], expected), (count, position)
        assert torch.equal((rows @ weight.t())[0], (rows[:1] @ weight.t())[0])


@pytest.mark.parametrize("function", [F.silu, torch.sigmoid, lambda x: F.gelu(x, approximate="tanh"), F.gelu,
                                      lambda x: x.sigmoid()])
def test_cpu_activations_do_not_depend_on_where_an_element_sits(function):
    """torch's vectorised CPU activations compute the elements at the end of each vector loop with a
    scalar formula; the invariant ones agree with themselves wherever a row is, and with torch's to
    float32 rounding."""
    generator = torch.Generator().manual_seed(6)
    values = 4 * torch.randn(3001, 37, generator=generator)
    with invariant_kernels():
        whole = function(values)
        assert all(torch.equal(function(values[start:stop].clone()), whole[start:stop])
                   for start, stop in [(0, 1), (5, 9), (3000, 3001), (17, 2900)])
    assert torch.allclose(whole, function(values), rtol=1e-6, atol=1e-6)


def test_normalize_rows_is_per_row_and_is_f_normalize():
    rows = torch.randn(300, 77, generator=torch.Generator().manual_seed(7))
    whole = normalize_rows(rows)
    assert torch.equal(normalize_rows(rows[7:8].clone()), whole[7:8])
    assert torch.allclose(whole, F.normalize(rows, dim=-1), atol=1e-7, rtol=0)


def test_operations_without_an_invariant_version_are_refused():
    x = torch.randn(2, 3, 4)
    with invariant_kernels():
        with pytest.raises(NotImplementedError, match="torch.bmm"):
            torch.bmm(x, x.transpose(1, 2))
        with pytest.raises(NotImplementedError, match="torch.einsum"):
            torch.einsum("bij,bkj->bik", x, x)
        with pytest.raises(NotImplementedError, match="addmm with a scale"):
            torch.addmm(torch.zeros(4), x[0].t(), x[0], beta=0.5)
        with pytest.raises(ValueError, match="fewer than 32768"):
            torch.zeros(2, 40000).mean(-1)


def test_attention_backend_of_the_mode():
    assert attention_backend("cpu", torch.float32, 48) == "reference"
    assert list(INVARIANT_ATTENTION_BACKENDS)[-1] == "reference"
    with pytest.raises(ValueError, match="attention_backend='fa4' cannot serve batch-invariant mode: its kernel variant"):
        attention_backend("cpu", torch.float32, 48, "fa4")
    with pytest.raises(ValueError, match="cannot run on cpu"):
        attention_backend("cpu", torch.float32, 48, "aten_flash")


def test_the_mode_refuses_an_attention_backend_that_does_not_qualify(monkeypatch):
    model = MODELS["dinov3"]
    batch = FamilyAdapter.pack(random_items(model, [(1, 2, 2)], 8), model)
    monkeypatch.setenv("PACKVIT_ATTENTION", "dense_sdpa")
    with model.runtime(batch_invariant=True), pytest.raises(ValueError, match="PACKVIT_ATTENTION='dense_sdpa' cannot"):
        model(batch)
    monkeypatch.delenv("PACKVIT_ATTENTION")
    with model.runtime(batch_invariant=True):
        meta = model.prepare(batch)
        assert meta.context.backend == "reference"
    with pytest.raises(ValueError, match=r"attention backend 'reference' and the model now has attention_backend=None"):
        model(batch, metadata=meta)  # prepared in batch-invariant mode, run in the default one


def test_switches_environment_argument_attribute_and_runtime(tmp_path, monkeypatch):
    model = MODELS["siglip2"]
    model.save_pretrained(tmp_path / "ckpt")
    assert packvit.from_pretrained(tmp_path / "ckpt").batch_invariant is False
    assert packvit.from_pretrained(tmp_path / "ckpt", batch_invariant=True).batch_invariant is True
    monkeypatch.setenv("PACKVIT_BATCH_INVARIANT", "1")
    assert Siglip2NaflexPacking.from_pretrained(tmp_path / "ckpt").batch_invariant is True
    assert Siglip2NaflexPacking.from_pretrained(tmp_path / "ckpt", batch_invariant=False).batch_invariant is False
    monkeypatch.setenv("PACKVIT_BATCH_INVARIANT", "sometimes")
    with pytest.raises(ValueError, match="PACKVIT_BATCH_INVARIANT='sometimes' is not a switch"):
        Siglip2NaflexPacking.from_pretrained(tmp_path / "ckpt")
    assert model.batch_invariant is False
    with model.runtime(batch_invariant=True):
        assert model.batch_invariant is True
    assert model.batch_invariant is False


def test_settings_the_mode_cannot_serve_are_refused():
    model = MODELS["dinov3"]
    batch = FamilyAdapter.pack(random_items(model, [(1, 2, 2)], 9), model)
    with model.runtime(batch_invariant=True, compile_layers=True), pytest.raises(ValueError, match="runs the encoder blocks eagerly"):
        model(batch)
    with model.runtime(batch_invariant=True), pytest.raises(ValueError, match="with the default kernels"):
        GraphedEncoder(model, capture=False)
    model.quantization = "fp8"
    try:
        with model.runtime(batch_invariant=True), pytest.raises(ValueError, match="load it without dtype='fp8'"):
            model(batch)
    finally:
        del model.quantization


# --- packvit embed --batch_invariant -----------------------------------------------------------------


def test_embed_batch_invariant_writes_the_same_bytes_with_one_and_two_processes(tmp_path):
    pytest.importorskip("pyarrow")
    from test_embed_support import MAX_NUM_PATCHES, random_checkpoint, write_image_folder

    from packvit.embed import embed

    checkpoint = random_checkpoint(tmp_path / "checkpoint")
    images = write_image_folder(tmp_path / "images", with_bad=False)
    options = dict(max_num_patches=MAX_NUM_PATCHES, shard_size=4, dtype="float32", workers=0, batch_invariant=True,
                   token_budget=200)
    embed(checkpoint, images, tmp_path / "one", quiet=True, **options)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "packvit.embed", "--model", str(checkpoint), "--input", str(images), "--output", str(tmp_path / "two"),
               "--quiet", "--batch_invariant"]
    command += [f"--{key}={value}" for key, value in options.items() if key != "batch_invariant"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (sorted((tmp_path / run / "img_emb").iterdir()) for run in ("one", "two"))
    assert [path.name for path in one] == [path.name for path in two] and len(one) >= 3
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["settings"]["model"]["batch_invariant"] is True
    # the default mode on the same folder is refused: its files would not be the same bytes
    with pytest.raises(ValueError, match="model.batch_invariant: True → None"):
        embed(checkpoint, images, tmp_path / "two", quiet=True,
                            **{**options, "batch_invariant": False})
    embeddings = np.concatenate([np.load(path) for path in one])
    assert np.isfinite(embeddings).all() and np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
