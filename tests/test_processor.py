"""``load_processor``: one processor API for the four families, from checkpoint directories (only a
``config.json`` and optionally a ``preprocessor_config.json``, as a processor needs no weights) and
from model objects; batches equal to the family functions; ``preprocessor_config.json`` honoured or
refused; ``native``, ``max_num_patches``, overrides and videos as documented."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from packvit.preprocess import Processor, load_processor
from packvit.preprocess.aimv2 import AIMv2Processor, aimv2_preprocess
from packvit.preprocess.clip import clip_preprocess
from packvit.preprocess.dinov3 import DINOv3Processor, dinov3_preprocess
from packvit.preprocess.llava_vit import LlavaViTProcessor, llava_vit_preprocess, pack_items, preprocess_images
from packvit.preprocess.siglip2 import Siglip2Processor, siglip2_preprocess
from family_helpers import reference_processor

data = pytest.importorskip("skimage.data")

CONFIGS = {
    "siglip2": {"model_type": "siglip2_vision_model", "patch_size": 16, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 1, "num_attention_heads": 2},
    "dinov3": {"model_type": "dinov3_vit", "patch_size": 16, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 1, "num_attention_heads": 2},
    "aimv2": {"model_type": "aimv2_vision_model", "is_native": True, "patch_size": 14, "image_size": 224,
              "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2},
    "aimv2_336": {"model_type": "aimv2_vision_model", "is_native": False, "patch_size": 14, "image_size": 336},
    "llava_vit": {"model_type": "onevision_encoder", "patch_size": 14, "image_size": 448, "hidden_size": 64,
                  "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2},
}

#: what each family's published processor is, as the family functions compute it
PUBLISHED = {
    "siglip2": lambda images: siglip2_preprocess(images),
    "dinov3": lambda images: dinov3_preprocess(images),
    "aimv2": lambda images: aimv2_preprocess(images, native=True),
    "aimv2_336": lambda images: aimv2_preprocess(images, 336),
    "llava_vit": lambda images: llava_vit_preprocess(images),
}
LAYOUTS = {"siglip2": "ppc", "dinov3": "ppc", "aimv2": "ppc", "aimv2_336": "ppc", "llava_vit": "cpp"}
CLASSES = {"siglip2": Siglip2Processor, "dinov3": DINOv3Processor, "aimv2": AIMv2Processor,
           "aimv2_336": AIMv2Processor, "llava_vit": LlavaViTProcessor}


def checkpoint(root: Path, name: str, preprocessor: dict | None = None, **config) -> Path:
    """A checkpoint directory as far as a processor reads it: ``config.json`` (and
    ``preprocessor_config.json`` where given)."""
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**CONFIGS[name], **config}))
    if preprocessor is not None:
        (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return directory


@pytest.fixture(scope="module")
def images():
    """Photographs of different sizes and aspect ratios, grey and RGB."""
    return [data.chelsea(), data.rocket(), data.camera()[:300], data.coffee()[:200, :500]]


def assert_same_batch(a, b):
    assert a.patch_layout == b.patch_layout
    assert torch.equal(a.grid_thw, b.grid_thw)
    assert torch.equal(a.patches, b.patches)
    assert (a.patch_positions is None) == (b.patch_positions is None)
    if a.patch_positions is not None:
        assert torch.equal(a.patch_positions, b.patch_positions)


# --- one API, equal to the family functions ------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_processor_gives_the_published_processor(name, images, tmp_path):
    processor = load_processor(checkpoint(tmp_path, name))
    assert isinstance(processor, CLASSES[name]) and isinstance(processor, Processor)
    assert processor.family == name.split("_3")[0]
    batch = processor(images)
    assert batch.patch_layout == LAYOUTS[name]
    assert_same_batch(batch, PUBLISHED[name](images))
    assert_same_batch(processor(images, native=False), batch)
    assert_same_batch(load_processor(str(checkpoint(tmp_path, name)))(images), batch)  # a path as str


def test_every_processor_has_one_signature(tmp_path):
    import inspect

    signatures = {inspect.signature(processor_class.__call__) for processor_class in set(CLASSES.values())}
    assert len(signatures) == 1
    parameters = signatures.pop().parameters
    assert list(parameters) == ["self", "images", "videos", "max_num_patches", "native", "backend"]
    assert all(parameters[name].kind is inspect.Parameter.KEYWORD_ONLY for name in ("max_num_patches", "native", "backend"))


def test_a_model_object_gives_the_checkpoint_processor(images, tmp_path):
    from packvit.models.aimv2 import AIMv2Config, AIMv2Packing
    from packvit.models.registry import family_config

    for name in CONFIGS:
        family, config = family_config(CONFIGS[name])
        from_model = load_processor(SimpleNamespace(family=family, config=config))
        assert_same_batch(from_model(images[:2]), load_processor(checkpoint(tmp_path, name))(images[:2]))
    model = AIMv2Packing(AIMv2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=56, is_native=False))
    processor = load_processor(model)
    assert isinstance(processor, AIMv2Processor) and processor(images[:1]).grid_thw.tolist() == [[1, 4, 4]]


# --- native and max_num_patches -----------------------------------------------------------------


def test_siglip2_is_naflex_whatever_native_says(images, tmp_path):
    processor = load_processor(checkpoint(tmp_path, "siglip2"))
    published = processor(images)
    for native in (True, False, None):
        assert_same_batch(processor(images, native=native), published)
    capped = processor(images, max_num_patches=64, backend="pil")
    assert_same_batch(capped, siglip2_preprocess(images, max_num_patches=64, backend="pil"))
    assert all(h * w <= 64 for _, h, w in capped.grid_thw.tolist())


def test_dinov3_native_keeps_aspect_ratios_under_the_cap(images, tmp_path):
    processor = load_processor(checkpoint(tmp_path, "dinov3"))
    assert processor(images).grid_thw.tolist() == [[1, 14, 14]] * 4
    native = processor(images, native=True)
    assert_same_batch(native, dinov3_preprocess(images, native=True))
    capped = processor(images, native=True, max_num_patches=100)
    assert_same_batch(capped, dinov3_preprocess(images, native=True, max_num_patches=100))
    assert len(set(map(tuple, capped.grid_thw.tolist()))) > 1 and all(h * w <= 100 for _, h, w in capped.grid_thw.tolist())
    with pytest.raises(ValueError, match=r"max_num_patches=100 caps processing that keeps each image's aspect ratio, "
                                         r"but this dinov3 processor resizes every image to 224x224 \(196 patches\); pass native=True"):
        processor(images, max_num_patches=100)
    default_native = load_processor(checkpoint(tmp_path, "dinov3"), native=True, max_num_patches=100)
    assert_same_batch(default_native(images), capped)
    assert default_native(images, native=False).grid_thw.tolist() == [[1, 14, 14]] * 4  # a default cap is no error


def test_aimv2_fixed_size_refuses_native_grids(images, tmp_path):
    processor = load_processor(checkpoint(tmp_path, "aimv2_336"))
    assert processor(images).grid_thw.tolist() == [[1, 24, 24]] * 4
    with pytest.raises(ValueError, match=r"fixed-size \(336x336\): its learned position table serves only a 24x24 grid, "
                                         r"and native grids would need the model to resize that table "
                                         r"\(interpolate_pos_encoding"):
        processor(images, native=True)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        load_processor(checkpoint(tmp_path, "aimv2_336"), native=True)
    with pytest.raises(ValueError, match=r"max_num_patches=50 caps .* resizes and crops every image to 336x336"):
        processor(images, max_num_patches=50)


def test_aimv2_native_checkpoint_is_native_with_an_optional_cap(images, tmp_path):
    processor = load_processor(checkpoint(tmp_path, "aimv2"))
    published = processor(images)
    assert_same_batch(published, aimv2_preprocess(images, native=True))
    assert published.grid_thw.tolist()[0] == [1, 300 // 14, 451 // 14]  # no resize, remainder dropped
    assert_same_batch(processor(images, native=True), published)
    assert_same_batch(processor(images, max_num_patches=80), aimv2_preprocess(images, native=True, max_num_patches=80))


def test_onevision_images_native_and_videos(images, tmp_path):
    processor = load_processor(checkpoint(tmp_path, "llava_vit"))
    native = processor(images, native=True, max_num_patches=300)
    assert_same_batch(native, llava_vit_preprocess(images, native=True, max_num_patches=300))
    assert native.patch_layout == "cpp" and all(h * w <= 300 for _, h, w in native.grid_thw.tolist())
    frames = [data.chelsea(), data.coffee(), data.rocket(), data.astronaut()]
    video_array = np.stack([data.astronaut()[:300, :400]] * 3)  # uint8 [T, H, W, C]
    batch = processor(images[:1], videos=[frames, video_array])
    assert batch.grid_thw.tolist() == [[1, 32, 32], [4, 16, 16], [3, 16, 16]]
    assert_same_batch(batch, llava_vit_preprocess(images[:1], videos=[frames, video_array]))
    first_frame_t = batch.patch_positions[1024::256, 0].tolist()
    assert first_frame_t == [0, 21, 42, 63, 0, 32, 63]  # each video on the 64-slot timeline
    assert_same_batch(processor(videos=video_array), processor(videos=[video_array]))
    assert_same_batch(processor([], videos=[frames]), processor(videos=[frames]))
    with pytest.raises(ValueError, match=r"videos\[0\] is ndarray, not a video: a video is a sequence of frames"):
        processor(videos=[data.chelsea()])


@pytest.mark.parametrize("name", ["siglip2", "dinov3", "aimv2"])
def test_image_only_families_take_frames_as_images(name, tmp_path):
    processor = load_processor(checkpoint(tmp_path, name))
    frames = [data.chelsea()] * 3
    with pytest.raises(ValueError, match=r"encodes images, not videos: pass a video's frames as images, "
                                         r"processor\(images=frames\), one item per frame"):
        processor(videos=[frames])
    assert processor(images=frames).num_items == 3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nothing_to_preprocess(name, tmp_path):
    processor = load_processor(checkpoint(tmp_path, name))
    with pytest.raises(ValueError, match="nothing to preprocess: images is None"):
        processor()
    with pytest.raises(ValueError, match="images is empty: pass at least one image"):
        processor([])


# --- overrides ------------------------------------------------------------------------------------


def test_overrides_set_the_defaults(images, tmp_path):
    siglip2 = load_processor(checkpoint(tmp_path, "siglip2"), max_num_patches=100, backend="pil")
    assert_same_batch(siglip2(images), siglip2_preprocess(images, max_num_patches=100, backend="pil"))
    assert_same_batch(siglip2(images, max_num_patches=64), siglip2_preprocess(images, max_num_patches=64, backend="pil"))
    dinov3 = load_processor(checkpoint(tmp_path, "dinov3"), image_size=(160, 224))
    assert dinov3(images).grid_thw.tolist() == [[1, 10, 14]] * 4
    assert_same_batch(dinov3(images), dinov3_preprocess(images, size=(160, 224)))
    onevision = load_processor(checkpoint(tmp_path, "llava_vit"), image_size=224, native=True)
    assert_same_batch(onevision(images), llava_vit_preprocess(images, native=True))
    assert_same_batch(onevision(images, native=False), pack_items(preprocess_images(images, size=224)))
    aimv2 = load_processor(checkpoint(tmp_path, "aimv2"), max_num_patches=50)
    assert_same_batch(aimv2(images), aimv2_preprocess(images, native=True, max_num_patches=50))


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("siglip2", {"max_tokens": 64}, r"Siglip2Processor has no setting \['max_tokens'\]; its settings are "
                                        r"\['max_num_patches', 'native', 'backend', 'alpha', 'max_pixels', "
                                        r"'jpeg_draft', 'device'\]"),
        ("siglip2", {"image_size": 224}, r"has no setting \['image_size'\].*NaFlex has no fixed image size"),
        ("aimv2", {"image_size": 448}, r"AIMv2Processor has no setting \['image_size'\].*its learned position table's"),
        ("dinov3", {"backend": "pil"}, r"backend must be one of \('torch',\) for dinov3, got 'pil' "
                                       r"\(transformers has DINOv3's processor only with the torchvision backend\)"),
        ("llava_vit", {"backend": "cv2"}, r"backend must be one of \('pil', 'torch'\) for llava_vit, got 'cv2'"),
        ("siglip2", {"max_num_patches": 0}, r"max_num_patches must be at least 1"),
        ("siglip2", {"max_num_patches": 2.5}, r"max_num_patches must be at least 1"),
        ("dinov3", {"native": "yes"}, r"native must be True, False or None, got 'yes'"),
        ("dinov3", {"max_num_patches": 100}, r"max_num_patches=100 caps .* pass native=True with it"),
        ("llava_vit", {"max_num_patches": 100}, r"resizes and crops every image to 448x448 .* pass native=True with it"),
        ("dinov3", {"image_size": 200}, r"image_size \(200, 200\) must be positive multiples of the patch size 16"),
        ("llava_vit", {"image_size": 300}, r"image size \(300, 300\) must be a multiple of the patch size 14"),
    ],
)
def test_bad_overrides_are_refused(name, overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        load_processor(checkpoint(tmp_path, name), **overrides)


def test_bad_call_arguments_are_refused(images, tmp_path):
    processor = load_processor(checkpoint(tmp_path, "siglip2"))
    with pytest.raises(ValueError, match="backend must be one of"):
        processor(images, backend="cv2")
    with pytest.raises(ValueError, match="native must be True, False or None, got 1"):
        processor(images, native=1)
    with pytest.raises(ValueError, match="max_num_patches must be at least 1"):
        processor(images, max_num_patches=-3)
    with pytest.raises(TypeError):
        processor(images, max_tokens=64)


def test_bad_sources_are_refused(tmp_path):
    with pytest.raises(TypeError, match="load_processor takes a checkpoint directory, a hub id .* got int"):
        load_processor(3)
    with pytest.raises(ValueError, match="does not exist"):
        load_processor(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="has no config.json"):
        load_processor(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(ValueError, match="model_type 'siglip'.*no packvit family loads"):
        load_processor(tmp_path)


# --- preprocessor_config.json -------------------------------------------------------------------


def test_siglip2_preprocessor_config_is_honoured(images, tmp_path):
    published = {"do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
                 "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Siglip2ImageProcessorFast",
                 "image_std": [0.5, 0.5, 0.5], "max_num_patches": 64, "patch_size": 16,
                 "processor_class": "Siglip2Processor", "resample": 2, "rescale_factor": 0.00392156862745098}
    processor = load_processor(checkpoint(tmp_path, "siglip2", published))
    assert processor.max_num_patches == 64
    assert_same_batch(processor(images), siglip2_preprocess(images, max_num_patches=64))
    assert load_processor(checkpoint(tmp_path, "siglip2", published), max_num_patches=128).max_num_patches == 128
    # an override left None is unset: the checkpoint's cap holds (as for every argument left None)
    assert load_processor(checkpoint(tmp_path, "siglip2", published), max_num_patches=None).max_num_patches == 64


def test_dinov3_preprocessor_config_is_honoured(images, tmp_path):
    published = {"crop_pct": None, "crop_size": None, "data_format": "channels_first", "default_to_square": True,
                 "device": None, "disable_grouping": None, "do_center_crop": None, "do_convert_rgb": None,
                 "do_normalize": True, "do_rescale": True, "do_resize": True,
                 "image_mean": [0.485, 0.456, 0.406], "image_processor_type": "DINOv3ViTImageProcessorFast",
                 "image_std": [0.229, 0.224, 0.225], "input_data_format": None, "resample": 2,
                 "rescale_factor": 0.00392156862745098, "return_tensors": None, "size": {"height": 224, "width": 224}}
    assert_same_batch(load_processor(checkpoint(tmp_path, "dinov3", published))(images), dinov3_preprocess(images))
    resized = load_processor(checkpoint(tmp_path, "dinov3", {**published, "size": {"height": 256, "width": 320}}))
    assert resized(images).grid_thw.tolist() == [[1, 16, 20]] * 4
    assert_same_batch(resized(images), dinov3_preprocess(images, size=(256, 320)))


def test_clip_preprocessor_config_is_honoured(images, tmp_path):
    clip = {"crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
            "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
            "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336}}
    onevision = load_processor(checkpoint(tmp_path, "llava_vit", clip))
    assert_same_batch(onevision(images), pack_items(preprocess_images(images, size=336)))
    other = {**clip, "resample": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25],
             "size": {"shortest_edge": 392}}
    expected = clip_preprocess(images, size=392, crop_size=(336, 336), resample="bilinear", mean=(0.5,) * 3,
                               std=(0.25,) * 3)
    assert_same_batch(load_processor(checkpoint(tmp_path, "llava_vit", other))(images), pack_items(expected))
    aimv2 = load_processor(checkpoint(tmp_path, "aimv2_336", clip))
    assert_same_batch(aimv2(images), aimv2_preprocess(images, 336))
    with pytest.raises(ValueError, match=r"would not give the 336x336 images this fixed-size AIMv2 checkpoint's "
                                         r"learned position table takes"):
        load_processor(checkpoint(tmp_path, "aimv2_336", {**clip, "crop_size": {"height": 224, "width": 224}}))


def test_aimv2_native_checkpoint_with_a_preprocessor_config(images, tmp_path):
    no_resize = {"image_processor_type": "CLIPImageProcessor", "do_resize": False, "do_center_crop": False}
    processor = load_processor(checkpoint(tmp_path, "aimv2", no_resize))
    assert_same_batch(processor(images), aimv2_preprocess(images, native=True))
    cropping = {"image_processor_type": "CLIPImageProcessor"}  # CLIPImageProcessor's defaults: 224 crop
    processor = load_processor(checkpoint(tmp_path, "aimv2", cropping))
    assert_same_batch(processor(images), aimv2_preprocess(images, 224))
    assert_same_batch(processor(images, native=True), aimv2_preprocess(images, native=True))


def test_files_transformers_writes_load(images, tmp_path):
    for name, processor_class, kwargs in (
        ("siglip2", "Siglip2ImageProcessor", {"max_num_patches": 144}),
        ("llava_vit", "CLIPImageProcessor", {"size": {"shortest_edge": 448},
                                                           "crop_size": {"height": 448, "width": 448}}),
        ("aimv2_336", "CLIPImageProcessor", {"size": {"shortest_edge": 336},
                                                           "crop_size": {"height": 336, "width": 336}}),
    ):
        directory = checkpoint(tmp_path, name)
        reference_processor(processor_class, "pil")(**kwargs).save_pretrained(directory)
        assert (directory / "preprocessor_config.json").is_file()
        load_processor(directory)
    assert load_processor(tmp_path / "siglip2").max_num_patches == 144
    assert_same_batch(load_processor(tmp_path / "llava_vit")(images), llava_vit_preprocess(images))


@pytest.mark.parametrize(
    "name, fields, message",
    [
        ("siglip2", {"patch_size": 14}, r"has patch_size 14 but the model's config.json has 16"),
        ("siglip2", {"resample": 3}, r"sets resample=3, but packvit's siglip2 processor reproduces only resample=2"),
        ("siglip2", {"image_processor_type": "CLIPImageProcessor"}, r"image_processor_type='CLIPImageProcessor'"),
        ("siglip2", {"do_pad": True, "pad_size": 8}, r"sets do_pad=True, pad_size=8, which packvit's siglip2 "
                                                      r"processor does not reproduce"),
        ("dinov3", {"size": {"shortest_edge": 256}}, r"DINOv3's processor resizes to a fixed size"),
        ("dinov3", {"image_mean": [0.5, 0.5, 0.5]}, r"reproduces only image_mean=\[0.485, 0.456, 0.406\]"),
        ("dinov3", {"do_center_crop": True, "crop_size": {"height": 200, "width": 200}}, r"do_center_crop=True"),
        ("llava_vit", {"rescale_factor": 1.0}, r"rescale_factor=1.0"),
        ("llava_vit", {"do_normalize": False}, r"do_normalize=False"),
        ("llava_vit", {"resample": 1}, r"unsupported resample 1"),
        ("llava_vit", {"do_center_crop": False}, r"turns the centre crop off"),
        ("llava_vit", {"size": {"longest_edge": 448}}, r"packvit's CLIP processor resizes to \{'shortest_edge': n\}"),
        ("llava_vit", {"input_data_format": "channels_last"}, r"input_data_format='channels_last'"),
        ("aimv2", {"auto_map": {"AutoImageProcessor": "x.Y"}}, r"sets auto_map="),
    ],
)
def test_unsupported_preprocessor_settings_are_refused(name, fields, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        load_processor(checkpoint(tmp_path, name, fields))


def test_a_broken_preprocessor_config_names_the_file(tmp_path):
    directory = checkpoint(tmp_path, "siglip2")
    (directory / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"preprocessor_config.json is not valid JSON"):
        load_processor(directory)
    (directory / "preprocessor_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"preprocessor_config.json holds a JSON list"):
        load_processor(directory)


# --- without transformers -------------------------------------------------------------------------


def test_processors_work_without_transformers(tmp_path):
    """With transformers unimportable, every family's processor loads and runs."""
    for name in CONFIGS:
        checkpoint(tmp_path, name)
    code = f"""
import sys
sys.modules["transformers"] = None  # import transformers now raises ImportError
import numpy as np
from packvit.preprocess import load_processor
image = np.random.default_rng(0).integers(0, 256, size=(60, 90, 3), dtype=np.uint8)
for name in {list(CONFIGS)!r}:
    batch = load_processor({str(tmp_path)!r} + "/" + name)([image, image])
    print(name, batch.num_items, batch.patch_layout)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:-1] == [
        "siglip2 2 ppc", "dinov3 2 ppc", "aimv2 2 ppc", "aimv2_336 2 ppc", "llava_vit 2 cpp"]
