"""SigLIP2 NaFlex preprocessing: packvit's packed patches and grids equal transformers' processors
(padding removed) bit for bit. The PIL backend is checked wherever transformers is installed; the
torchvision backend where torchvision is installed too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from packvit import PackedBatch
from packvit.preprocess.siglip2 import (
    siglip2_images,
    siglip2_preprocess,
    target_size_for_max_num_patches,
    to_rgb_uint8,
)
from family_helpers import reference_processor

data = pytest.importorskip("skimage.data")


def hf():
    """transformers, or a skip where it is not installed."""
    return pytest.importorskip("transformers")

MAX_NUM_PATCHES = (64, 256, 576, 1024, 4096)


def _photographs() -> list[Image.Image]:
    """24 RGB images: photographs, grey photographs as RGB, crops of odd shapes, and noise."""
    rgb = [getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                                              "immunohistochemistry", "retina")]
    rgb.append(data.stereo_motorcycle()[0])
    grey = [np.repeat(getattr(data, name)()[:, :, None], 3, axis=2)
            for name in ("camera", "moon", "coins", "page", "text", "clock")]
    astronaut, coffee, rocket, hubble, chelsea, retina = rgb[0], rgb[2], rgb[3], rgb[4], rgb[1], rgb[6]
    crops = [astronaut[:37, :500], coffee[:400, :13], rocket[100:101], hubble[:5, :3], chelsea[:299, :299], retina[:1000, :333]]
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in ((1, 1), (16, 16), (700, 9), (33, 1200))]
    return [Image.fromarray(np.ascontiguousarray(array)) for array in rgb + grey + crops + noise]


@pytest.fixture(scope="module")
def photographs():
    return _photographs()


def _assert_equal_to_reference(packed: PackedBatch, reference) -> None:
    """Packed patches and grids equal the reference's unpadded rows and spatial shapes, exactly."""
    shapes = reference["spatial_shapes"]
    assert packed.grid_thw.tolist() == [[1, h, w] for h, w in shapes.tolist()]
    counts = shapes.prod(dim=1)
    assert reference["pixel_attention_mask"].sum(dim=1).tolist() == counts.tolist()
    for row, item_patches in enumerate(packed.split(packed.patches)):
        assert item_patches.dtype == reference["pixel_values"].dtype == torch.float32
        assert torch.equal(item_patches, reference["pixel_values"][row, : counts[row]])


def test_target_size_matches_the_reference_search():
    hf()
    try:  # transformers 5 keeps it beside the PIL class, 4.x beside the only one
        from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches
    except ImportError:
        from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

    rng = np.random.default_rng(1)
    sizes = [(480, 640), (1024, 224), (1, 1), (1, 5000), (16, 16), (300, 451)]
    sizes += [tuple(int(s) for s in rng.integers(1, 3000, size=2)) for _ in range(200)]
    for height, width in sizes:
        for max_num_patches in (1, 7, 64, 256, 1000, 4096):
            expected = get_image_size_for_max_num_patches(height, width, 16, max_num_patches)
            assert target_size_for_max_num_patches(height, width, 16, max_num_patches) == expected
    assert target_size_for_max_num_patches(480, 640) == (224, 288)  # 14 x 18 = 252 patches
    assert target_size_for_max_num_patches(1024, 224) == (512, 112)


@pytest.mark.parametrize("max_num_patches", MAX_NUM_PATCHES)
def test_pil_backend_matches_siglip2_image_processor_pil(photographs, max_num_patches):
    processor = reference_processor("Siglip2ImageProcessor", "pil")()
    reference = processor(photographs, max_num_patches=max_num_patches, return_tensors="pt")
    packed = siglip2_preprocess(photographs, max_num_patches=max_num_patches, backend="pil")
    assert packed.num_items == len(photographs) >= 20
    assert all(h * w <= max_num_patches for _, h, w in packed.grid_thw.tolist())
    _assert_equal_to_reference(packed, reference)


@pytest.mark.parametrize("max_num_patches", MAX_NUM_PATCHES)
def test_torch_backend_matches_siglip2_image_processor(photographs, max_num_patches):
    pytest.importorskip("torchvision")
    processor = reference_processor("Siglip2ImageProcessor", "torch")()
    assert processor.backend == "torchvision"
    reference = processor(photographs, max_num_patches=max_num_patches, return_tensors="pt")
    packed = siglip2_preprocess(photographs, max_num_patches=max_num_patches)  # "torch" is the default
    _assert_equal_to_reference(packed, reference)


def test_auto_image_processor_gives_the_default_backend(tmp_path):
    pytest.importorskip("torchvision")
    transformers = hf()
    transformers.Siglip2ImageProcessor().save_pretrained(tmp_path)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert processor.backend == "torchvision"


def _mixed_inputs(backend):
    """Arrays, grey and transparent images, for the conversions of do_convert_rgb=True. (The PIL
    processor cannot take a 2-D array, so it gets the grey array as [H, W, 1].)"""
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, size=(50, 70, 4), dtype=np.uint8)
    return [
        data.coffee(),  # uint8 [H, W, 3] array
        data.camera() if backend == "torch" else data.camera()[:, :, None],  # grey uint8 array
        Image.fromarray(data.moon()),  # PIL "L"
        data.logo(),  # uint8 [H, W, 4] array with transparency
        Image.fromarray(data.logo()),  # PIL "RGBA"
        Image.fromarray(rgba),
        Image.fromarray(data.chelsea()).convert("P"),  # palette image
    ]


@pytest.mark.parametrize("backend", ["pil", "torch"])
def test_other_inputs_match_the_processor_converting_to_rgb(backend):
    transformers = hf()
    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 23):
        pytest.skip("transformers before 5.23 rejects RGBA arrays and drops alpha instead of compositing")
    if backend == "torch":
        pytest.importorskip("torchvision")
        processor = reference_processor("Siglip2ImageProcessor", "torch")(do_convert_rgb=True)
    else:
        processor = reference_processor("Siglip2ImageProcessor", "pil")(do_convert_rgb=True)
    inputs = _mixed_inputs(backend)
    for max_num_patches in (64, 1024):
        reference = processor(inputs, max_num_patches=max_num_patches, return_tensors="pt")
        _assert_equal_to_reference(siglip2_preprocess(inputs, max_num_patches=max_num_patches, backend=backend), reference)


def test_the_reference_rejects_grey_images_without_conversion():
    """Why packvit converts: with its default settings the reference cannot normalise one channel."""
    with pytest.raises(ValueError):
        reference_processor("Siglip2ImageProcessor", "pil")()(Image.fromarray(data.camera()), return_tensors="pt")
    assert siglip2_preprocess(Image.fromarray(data.camera()), backend="pil").patches.shape == (256, 768)


def test_array_tensor_and_pil_inputs_agree():
    array = data.rocket()
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    for backend in ("pil", "torch"):
        from_pil, from_array, from_tensor = (siglip2_preprocess([x], backend=backend) for x in (Image.fromarray(array), array, tensor))
        assert torch.equal(from_pil.patches, from_array.patches) and torch.equal(from_pil.patches, from_tensor.patches)
        assert from_pil.grid_thw.tolist() == [[1, 13, 19]]


def test_backends_differ_by_at_most_one_uint8_level(photographs):
    pil, torch_backend = (siglip2_preprocess(photographs[:8], backend=backend) for backend in ("pil", "torch"))
    assert torch.equal(pil.grid_thw, torch_backend.grid_thw)
    assert (pil.patches - torch_backend.patches).abs().max().item() <= 1 / 127.5 + 1e-6


def test_items_unpatchify_to_the_packed_patches(photographs):
    from packvit import unpatchify

    packed = siglip2_preprocess(photographs[:4], max_num_patches=100, backend="pil")
    items = siglip2_images(photographs[:4], max_num_patches=100, backend="pil")
    assert all(torch.equal(a[0], b) for a, b in zip(unpatchify(packed.patches, packed.grid_thw, 16), items))
    assert float(packed.patches.min()) >= -1.0 and float(packed.patches.max()) <= 1.0


def test_invalid_inputs():
    with pytest.raises(ValueError, match="must be uint8"):
        siglip2_preprocess(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        siglip2_preprocess(np.zeros((8, 8, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="backend must be one of"):
        siglip2_preprocess(Image.new("RGB", (8, 8)), backend="cv2")
    with pytest.raises(ValueError, match="max_num_patches must be at least 1"):
        siglip2_preprocess(Image.new("RGB", (8, 8)), max_num_patches=0)
    with pytest.raises(ValueError, match="images is empty: pass at least one image"):
        siglip2_preprocess([])
    assert to_rgb_uint8(np.full((2, 3), 7, dtype=np.uint8)).shape == (3, 2, 3)
