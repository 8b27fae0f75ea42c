"""packvit's SigLIP2 inside transformers' LFM2-VL: the VLM with the packed tower against itself with
transformers' tower, float32 on the CPU (logits, greedy generation, a fine-tuning step's gradients),
the weights shared and moved back, the state dict and save_pretrained in transformers' names, and the
errors; GPU tests (marked) run LFM2-VL's real image processor and count host synchronisations.

The VLM is a small random LFM2-VL saved with ``save_pretrained`` and loaded back. Its inputs are real
photos in LFM2-VL's padded format: resized by LFM2-VL's processor rule (``lfm2_vl_size``), normalised
and patchified by packvit's SigLIP2 processor (mean = std = 0.5, LFM2-VL's own), padded to LFM2-VL's
``max_image_tokens * 4`` rows. LFM2-VL's processor needs torchvision, which CPU CI lacks; the GPU test
checks this construction against it. The token ids are built by hand (the tokenizer cannot be built
offline): each image's ``(h / 2) * (w / 2)`` image tokens among plain text ids.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from skimage import data

import packvit
from packvit.attention import select_backend
from packvit.harness.siglip2 import randomize_vectors
from packvit.integrations.transformers import (PackedSiglip2VisionModel, find_vision_tower, padded_inputs,
                                               restore_vision_tower, use_packed_vision_tower)
from packvit.packing import PackedBatch, patchify
from packvit.preprocess.siglip2 import siglip2_normalize, siglip2_resize, to_rgb_uint8

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Lfm2VlForConditionalGeneration"):
    pytest.skip(f"transformers {transformers.__version__} has no LFM2-VL (added in 4.57)", allow_module_level=True)

DOC = Path(__file__).resolve().parents[1] / "docs" / "vlm.md"
IMAGE_TOKEN = 396  # LFM2-VL's image token id
#: LFM2-VL's processor settings, smaller than its defaults (64, 256) to keep the tests fast
MIN_IMAGE_TOKENS, MAX_IMAGE_TOKENS = 16, 64
MAX_NUM_PATCHES = MAX_IMAGE_TOKENS * 4  # what LFM2-VL's processor pads to without tiling


def photos() -> list:
    """Five photos of different sizes and aspects, one grey: 16x16, 12x18, 6x18, 18x10 and 14x18 patch
    grids at the settings above."""
    return [data.astronaut(), data.coffee(), data.astronaut()[:100, :300], data.chelsea()[:, :150], data.coins()]


def lfm2_vl_size(height: int, width: int, min_image_tokens: int, max_image_tokens: int, patch_size: int = 16,
                 downsample_factor: int = 2) -> tuple[int, int]:
    """The (height, width) LFM2-VL's processor resizes an image to when it does not tile it: sides
    multiples of ``patch_size * downsample_factor``, as near the image's as the token bounds allow
    (scaled by the square root of the area ratio when outside them)."""
    unit = patch_size * downsample_factor
    low, high = min_image_tokens * unit**2, max_image_tokens * unit**2
    h, w = max(unit, round(height / unit) * unit), max(unit, round(width / unit) * unit)
    if h * w > high:
        scale = math.sqrt(height * width / high)
        h, w = max(unit, math.floor(height / scale / unit) * unit), max(unit, math.floor(width / scale / unit) * unit)
    elif h * w < low:
        scale = math.sqrt(low / (height * width))
        h, w = math.ceil(height * scale / unit) * unit, math.ceil(width * scale / unit) * unit
    return h, w


def lfm2_vl_images(images, min_image_tokens=MIN_IMAGE_TOKENS, max_image_tokens=MAX_IMAGE_TOKENS) -> dict:
    """LFM2-VL's processor output for ``images`` (without tiling), made with packvit's SigLIP2 processor."""
    items = []
    for image in images:
        rgb = to_rgb_uint8(image, "torch")  # [3, H, W]
        size = lfm2_vl_size(*rgb.shape[-2:], min_image_tokens, max_image_tokens)
        items.append(siglip2_normalize(siglip2_resize(rgb, size)))
    patches, grid_thw = patchify(items, 16, layout="ppc")
    return padded_inputs(PackedBatch(patches, grid_thw), max_num_patches=max_image_tokens * 4)


def prompts(spatial_shapes: torch.Tensor, images_per_prompt=(3, 2)) -> dict:
    """Hand-built token ids: prompts of ``images_per_prompt`` images each, every image's tokens between
    plain text ids, left-padded (pad id 0) to one length, with their attention mask."""
    tokens = [h * w // 4 for h, w in spatial_shapes.tolist()]
    sequences, image = [], 0
    for p, count in enumerate(images_per_prompt):
        ids = [1, 40 + p]
        for _ in range(count):
            ids += [IMAGE_TOKEN] * tokens[image] + [50 + image, 60 + p]
            image += 1
        sequences.append(ids + [70, 71 + p])
    length = max(map(len, sequences))
    input_ids = torch.tensor([[0] * (length - len(s)) + s for s in sequences])
    return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}


def write_lfm2_vl(directory: Path, seed: int = 0, vision_use_head: bool = False) -> Path:
    """A small random LFM2-VL saved with save_pretrained (a SigLIP2 tower with a 16x16 position table,
    like the published ones; random biases and norms so that a mis-mapped one shows). Its head_dim
    is 16, which every CUDA attention kernel runs."""
    torch.manual_seed(seed)
    vision = dict(model_type="siglip2_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_patches=256, vision_use_head=vision_use_head)
    text = dict(model_type="lfm2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, layer_types=["conv", "full_attention"],
                initializer_range=0.2)
    config = transformers.Lfm2VlConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                                       projector_hidden_size=64)
    vlm = transformers.Lfm2VlForConditionalGeneration(config)
    randomize_vectors(vlm.model.vision_tower, torch.Generator().manual_seed(seed))
    vlm.save_pretrained(directory)
    return directory


def load(checkpoint: Path, dtype=torch.float32):
    return transformers.Lfm2VlForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_lfm2_vl(tmp_path_factory.mktemp("lfm2-vl") / "ckpt")


@pytest.fixture(scope="module")
def inputs():
    images = lfm2_vl_images(photos())
    return {**prompts(images["spatial_shapes"]), **images}


@pytest.fixture(scope="module")
def pair(checkpoint):
    """(transformers' VLM, the same checkpoint with the packed tower)."""
    original, packed = load(checkpoint), load(checkpoint)
    use_packed_vision_tower(packed)
    return original, packed


def test_inputs_are_several_sizes_in_one_padded_batch(inputs):
    assert inputs["spatial_shapes"].tolist() == [[16, 16], [12, 18], [6, 18], [18, 10], [14, 18]]
    assert inputs["pixel_values"].shape == (5, MAX_NUM_PATCHES, 768)
    assert (inputs["input_ids"] == IMAGE_TOKEN).sum() == inputs["pixel_attention_mask"].sum() // 4


@torch.no_grad()
def test_logits_equal_the_original_vlm(pair, inputs):
    original, packed = pair
    assert isinstance(packed.model.vision_tower, PackedSiglip2VisionModel)
    expected, got = original(**inputs).logits, packed(**inputs).logits
    assert (expected - got).abs().max() <= 1e-4
    # the images matter: other pixels give other logits
    blank = {**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}
    assert (packed(**blank).logits - got).abs().max() > 1e-2


@torch.no_grad()
def test_image_features_equal_the_original(pair, inputs):
    original, packed = pair
    images = {key: inputs[key] for key in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}
    expected, got = original.get_image_features(**images), packed.get_image_features(**images)
    features = lambda out: out.pooler_output if hasattr(out, "pooler_output") else out  # a list before 5.0
    assert [f.shape for f in features(expected)] == [f.shape for f in features(got)]
    assert max((a - b).abs().max() for a, b in zip(features(expected), features(got))) <= 1e-5


@torch.no_grad()
def test_greedy_generation_gives_the_same_tokens(pair, inputs):
    original, packed = pair
    options = dict(max_new_tokens=8, do_sample=False)
    expected = original.generate(**inputs, **options)
    got = packed.generate(**inputs, **options)
    assert torch.equal(expected, got)
    new_tokens = got[:, inputs["input_ids"].shape[1]:]
    blank = {**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}
    assert not torch.equal(packed.generate(**blank, **options)[:, inputs["input_ids"].shape[1]:], new_tokens)


def _training_step(vlm, inputs, mode: str) -> dict[str, torch.Tensor]:
    """One step's loss.backward(): {name: grad} of every parameter that took one."""
    if mode == "frozen":
        vlm.model.vision_tower.requires_grad_(False)
    if mode == "checkpointed":
        # transformers 5.25 renamed the switch; both reach every module with a gradient_checkpointing flag
        enable = getattr(vlm, "activation_checkpointing_enable", None) or vlm.gradient_checkpointing_enable
        enable()
        vlm.train()
    labels = inputs["input_ids"].masked_fill((inputs["input_ids"] == IMAGE_TOKEN) | (inputs["input_ids"] == 0), -100)
    vlm(**inputs, labels=labels).loss.backward()
    return {name: p.grad for name, p in vlm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["trainable", "frozen", "checkpointed"])
def test_a_training_step_gives_the_same_gradients(checkpoint, inputs, mode):
    original, packed = load(checkpoint), load(checkpoint)
    tower = use_packed_vision_tower(packed)
    expected, got = _training_step(original, inputs, mode), _training_step(packed, inputs, mode)
    if mode == "checkpointed":
        assert tower.model.is_gradient_checkpointing  # the VLM's switch reaches the packed blocks
    prefix = "model.vision_tower."
    theirs = {key[len(prefix):]: grad for key, grad in expected.items() if key.startswith(prefix)}
    ours = {key[len(prefix) + len("model."):]: grad for key, grad in got.items() if key.startswith(prefix)}
    if mode == "frozen":
        assert not theirs and not ours
    else:
        theirs = tower.model.map_checkpoint(theirs)  # q, k, v gradients fused as the weights are
        assert theirs.keys() == ours.keys() and len(ours) == len(list(tower.model.parameters()))
        assert max((theirs[key] - ours[key]).abs().max() for key in ours) <= 1e-5
        assert min(ours[key].abs().max() for key in ours) > 0
    rest = {key for key in expected if not key.startswith(prefix)}
    assert rest == {key for key in got if not key.startswith(prefix)} and "model.multi_modal_projector.linear_1.weight" in rest
    assert max((expected[key] - got[key]).abs().max() for key in rest) <= 1e-5


def test_weights_are_the_vlms_own_moved_not_copied(checkpoint):
    vlm = load(checkpoint).to(torch.bfloat16)
    original = vlm.model.vision_tower
    before = dict(original.named_parameters())
    tensors = {key: value.detach().clone() for key, value in before.items()}
    count, size = sum(p.numel() for p in vlm.parameters()), sum(p.numel() * p.element_size() for p in vlm.parameters())
    tower = use_packed_vision_tower(vlm)
    assert vlm.model.vision_tower is tower and find_vision_tower(vlm) == ("model.vision_tower", tower)
    assert tower.dtype == torch.bfloat16 and tower.device == torch.device("cpu")
    ours = dict(tower.model.named_parameters())
    assert ours["embeddings.patch_embedding.weight"] is before["embeddings.patch_embedding.weight"]
    assert ours["blocks.1.mlp.fc2.weight"] is before["encoder.layers.1.mlp.fc2.weight"]
    assert ours["final_norm.bias"] is before["post_layernorm.bias"]
    shared = {id(p) for p in before.values()}
    assert sum(id(p) in shared for p in ours.values()) == len(ours) - 4  # all but two layers' qkv weight and bias
    q, k, v = (tensors[f"encoder.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(ours["blocks.0.attn.qkv.weight"], torch.cat([q, k, v]))
    assert original.encoder.layers[0].self_attn.q_proj.weight.is_meta  # not held twice
    assert sum(p.numel() for p in vlm.parameters()) == count
    assert sum(p.numel() * p.element_size() for p in vlm.parameters()) == size


def test_restore_gives_transformers_tower_with_the_current_weights(checkpoint, inputs):
    vlm = load(checkpoint)
    original = vlm.model.vision_tower
    tower = use_packed_vision_tower(vlm)
    with torch.no_grad():
        q_rows = tower.model.hidden_size  # the fused projection's first rows are q's
        tower.model.blocks[0].attn.qkv.weight[:q_rows] += 1.0  # a trained q
        tower.model.final_norm.weight.mul_(2.0)
        trained_q = tower.model.blocks[0].attn.qkv.weight[:q_rows].clone()
    tower.model.blocks[1].attn.qkv.requires_grad_(False)
    with torch.no_grad():
        packed_logits = vlm(**inputs).logits
    norm = tower.model.final_norm.weight
    restored = restore_vision_tower(vlm)
    assert restored is original and vlm.model.vision_tower is original
    layers = restored.encoder.layers
    assert torch.equal(layers[0].self_attn.q_proj.weight, trained_q) and restored.post_layernorm.weight is norm
    assert tower.is_restored and tower.model.blocks[0].attn.qkv.weight.is_meta  # the fused copies are gone
    assert not any(p.requires_grad for n in "qkv" for p in getattr(layers[1].self_attn, f"{n}_proj").parameters())
    assert layers[0].self_attn.q_proj.weight.requires_grad
    with torch.no_grad():
        assert (vlm(**inputs).logits - packed_logits).abs().max() <= 1e-4
    with pytest.raises(RuntimeError, match="gave its weights back"):
        tower(inputs["pixel_values"], inputs["pixel_attention_mask"], inputs["spatial_shapes"])
    with pytest.raises(ValueError, match="no packed tower to restore"):
        restore_vision_tower(vlm)
    use_packed_vision_tower(vlm)
    with pytest.raises(ValueError, match="packed tower already"):
        use_packed_vision_tower(vlm)


def test_state_dict_and_save_pretrained_keep_transformers_names(checkpoint, inputs, tmp_path):
    original, packed = load(checkpoint), load(checkpoint)
    expected = original.state_dict()
    use_packed_vision_tower(packed)
    state = packed.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in state)
    packed.save_pretrained(tmp_path / "saved")
    reloaded = load(tmp_path / "saved")
    with torch.no_grad():
        assert (reloaded(**inputs).logits - original(**inputs).logits).abs().max() == 0
    with torch.no_grad():
        for parameter in packed.model.vision_tower.parameters():
            parameter.zero_()
    packed.load_state_dict(expected)
    with torch.no_grad():
        assert (packed(**inputs).logits - original(**inputs).logits).abs().max() <= 1e-4


@torch.no_grad()
def test_the_tower_alone_matches_transformers_with_head_and_hidden_states(tmp_path, inputs):
    vlm = load(write_lfm2_vl(tmp_path / "head", seed=3, vision_use_head=True))
    reference = vlm.model.vision_tower
    images = (inputs["pixel_values"], inputs["pixel_attention_mask"], inputs["spatial_shapes"])
    expected = reference(*images, output_hidden_states=True)
    tower = use_packed_vision_tower(vlm)
    got = tower(*images, output_hidden_states=True)
    real = inputs["pixel_attention_mask"].bool()
    assert (expected.last_hidden_state - got.last_hidden_state)[real].abs().max() <= 1e-5
    assert got.last_hidden_state[~real].abs().max() == 0  # padding rows are zeros
    assert (expected.pooler_output - got.pooler_output).abs().max() <= 1e-5
    assert len(got.hidden_states) == len(expected.hidden_states) == 3
    assert max((a - b)[real].abs().max() for a, b in zip(expected.hidden_states, got.hidden_states)) <= 1e-5
    as_tuple = tower(*images, return_dict=False)
    assert len(as_tuple) == 2 and torch.equal(as_tuple[0], got.last_hidden_state)


def test_bad_inputs_are_refused(pair, inputs):
    tower = pair[1].model.vision_tower
    values, mask, shapes = inputs["pixel_values"], inputs["pixel_attention_mask"], inputs["spatial_shapes"]
    wrong_mask = mask.clone()
    wrong_mask[1, 0] = 0
    with pytest.raises(ValueError, match="image 1's pixel_attention_mask does not mark exactly its first 216 rows"):
        tower(values, wrong_mask, shapes)
    with pytest.raises(ValueError, match=r"image 0 has spatial_shapes \[17, 16\]"):
        tower(values, mask, shapes + torch.tensor([[1, 0]] + [[0, 0]] * 4))
    with pytest.raises(ValueError, match=r"pixel_values must be \[batch, max_num_patches, 768\]"):
        tower(values[..., :100], mask, shapes)
    with pytest.raises(ValueError, match="computes no attention probabilities"):
        tower(values, mask, shapes, output_attentions=True)


def test_unsupported_towers_are_refused(checkpoint):
    siglip = torch.nn.Module()
    siglip.vision_tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32))
    with pytest.raises(ValueError, match=r"vision_tower \(SiglipVisionModel\).*replaces a Siglip2VisionModel"):
        use_packed_vision_tower(siglip)
    dinov3 = torch.nn.Module()
    dinov3.vision_tower = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="vision_tower is a DINOv3ViTModel; packvit replaces SigLIP2 NaFlex towers"):
        use_packed_vision_tower(dinov3)
    vlm = load(checkpoint)
    with pytest.raises(ValueError, match="not the tower itself"):
        use_packed_vision_tower(vlm.model.vision_tower)
    vlm.model.vision_tower.encoder.layers[1].self_attn.k_proj.requires_grad_(False)
    with pytest.raises(ValueError, match="layer 1 of the tower trains some of q_proj, k_proj and v_proj"):
        use_packed_vision_tower(vlm)
    vlm = load(checkpoint)
    vlm.model.vision_tower.config.attention_dropout = 0.1
    with pytest.raises(ValueError, match="attention_dropout=0.1"):
        use_packed_vision_tower(vlm)
    assert type(vlm.model.vision_tower) is transformers.Siglip2VisionModel  # a refusal changes nothing


def test_padded_inputs_round_trip():
    batch = packvit.load_processor(packvit.Siglip2NaflexPacking(
        packvit.models.siglip2.Siglip2NaflexConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2), device="cpu"))(photos()[:3])
    padded = padded_inputs(batch, max_num_patches=300)
    counts = batch.token_counts
    assert padded["pixel_values"].shape == (3, 300, 768) and padded["spatial_shapes"].tolist() == batch.grid_thw[:, 1:].tolist()
    assert padded["pixel_attention_mask"].sum(1).tolist() == counts
    assert torch.equal(torch.cat([padded["pixel_values"][i, :n] for i, n in enumerate(counts)]), batch.patches)
    assert padded["pixel_values"][padded["pixel_attention_mask"] == 0].abs().max() == 0
    assert padded_inputs(batch)["pixel_values"].shape[1] == max(counts)
    with pytest.raises(ValueError, match="more than max_num_patches=100"):
        padded_inputs(batch, max_num_patches=100)


def test_the_documented_example_runs(checkpoint):
    """docs/vlm.md's LFM2-VL example, run as written on the small random checkpoint (the one name it
    needs: ``checkpoint``, a hub id replaced by the directory)."""
    snippets = [s for s in re.findall(r"```python[^\n]*\n(.*?)```", DOC.read_text(), flags=re.S) if "use_packed_vision_tower" in s]
    example = snippets[0].replace('"LiquidAI/LFM2-VL-450M"', repr(str(checkpoint)))
    assert example != snippets[0]
    namespace = {}
    exec(compile(example, str(DOC), "exec"), namespace)
    vlm, generated = namespace["vlm"], namespace["generated"]
    assert type(vlm.model.vision_tower) is transformers.Siglip2VisionModel  # restored at the end
    assert torch.equal(generated, namespace["expected"])


def test_the_benchmark_runs_small(tmp_path):
    """``packvit bench --suite vlm --smoke``: both towers on the same padded batches."""
    from packvit.benchmarks.vlm import even_grids, main

    assert all(h % 2 == 0 and w % 2 == 0 for h, w in even_grids(64))
    assert main(["--smoke", "--items", "4", "--batch_size", "2", "--repeats", "1", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "lfm2_vl_image_features.json").read_text())
    assert results["workload"]["items"] == 4 and results["speedup"] > 0
    assert results["packvit_vs_transformers"]["token_cosine_min"] > 0.9999  # float32 on the CPU
    assert results["first_batch_vs_float32_transformers"]["transformers"]["max_abs_diff"] == 0


# --- GPU (scripts/gpu_check.sh): LFM2-VL's real processor, host synchronisations -------------------

def _real_image_processor():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("torchvision")
    name = next((n for n in ("Lfm2VlImageProcessor", "Lfm2VlImageProcessorFast") if hasattr(transformers, n)), None)
    if name is None:
        pytest.skip(f"transformers {transformers.__version__} has no LFM2-VL image processor")
    return getattr(transformers, name)(min_image_tokens=64, max_image_tokens=256, do_image_splitting=False)


@pytest.mark.gpu
def test_real_processor_inputs_match_and_give_the_same_logits(checkpoint):
    """LFM2-VL's own processor (torchvision): the CPU tests' construction of its output is the same, and
    the VLM's logits on it agree with the packed tower, float32 on the GPU."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    processor = _real_image_processor()
    rgb = [to_rgb_uint8(photo, "torch").permute(1, 2, 0).numpy() for photo in photos()]  # [H, W, 3] uint8 each
    real = processor(images=rgb, return_tensors="pt")
    ours = lfm2_vl_images(rgb, min_image_tokens=64, max_image_tokens=256)
    assert torch.equal(real["spatial_shapes"], ours["spatial_shapes"])
    assert torch.equal(real["pixel_attention_mask"].int(), ours["pixel_attention_mask"])
    assert (real["pixel_values"] - ours["pixel_values"]).abs().max() <= 1 / 127.5 + 1e-6  # one uint8 level at most
    device = torch.device("cuda")
    inputs = {**prompts(real["spatial_shapes"]), **{key: real[key] for key in ours}}
    inputs = {key: value.to(device) for key, value in inputs.items()}
    original, packed = load(checkpoint).to(device), load(checkpoint).to(device)
    use_packed_vision_tower(packed)
    with torch.no_grad():
        assert (original(**inputs).logits - packed(**inputs).logits).abs().max() <= 1e-4


@pytest.mark.gpu
def test_the_packed_tower_synchronises_once_per_call(checkpoint):
    """One host synchronisation (spatial_shapes and the mask check to the host) with the inputs on the
    GPU, none with spatial_shapes and the mask on the host."""
    import warnings

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda")
    vlm = load(checkpoint, dtype=torch.bfloat16).to(device)
    tower = use_packed_vision_tower(vlm)
    backend = select_backend(device, torch.bfloat16, tower.model.blocks[0].attn.head_dim, tower.model.attention_backend)
    assert backend != "reference", "the reference backend reads segment boundaries on the host: one sync per layer"
    images = lfm2_vl_images(photos())

    def synchronisations(values, mask, shapes) -> list[str]:
        """The file:line of every synchronising call of one tower call."""
        with torch.no_grad():
            tower(values, mask, shapes)  # warm-up: first-call allocations and kernel selection
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    tower(values, mask, shapes)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]

    values = images["pixel_values"].to(device)
    on_device = synchronisations(values, images["pixel_attention_mask"].to(device), images["spatial_shapes"].to(device))
    with tower.model.runtime(cuda_graphs=False):  # five small images: a pack the automatic graphs serve
        eager = synchronisations(values, images["pixel_attention_mask"].to(device), images["spatial_shapes"].to(device))
    assert len(on_device) == 1 and len(eager) == 1, {"graphs": on_device, "eager": eager}
    on_host = synchronisations(values, images["pixel_attention_mask"], images["spatial_shapes"])
    assert on_host == [], on_host
