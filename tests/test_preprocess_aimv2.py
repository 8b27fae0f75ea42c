"""The CLIP processor reproduction and AIMv2 preprocessing, against transformers' processors, bit for bit.

``CLIPImageProcessorPil`` runs wherever transformers is installed; the torchvision-backend
``CLIPImageProcessor`` only where torchvision is installed too (skipped otherwise).
"""

import numpy as np
import pytest
import torch
from packaging.version import Version
from PIL import Image

from packvit.packing import patchify
from packvit.preprocess.aimv2 import aimv2_pixels, aimv2_preprocess, floor_patch_grid
from packvit.preprocess.clip import (
    clip_center_crop,
    clip_preprocess,
    clip_resize_center_crop,
    shortest_edge_size,
    to_rgb_uint8,
)
from family_helpers import reference_processor

data = pytest.importorskip("skimage.data")


def hf():
    """transformers, or a skip where it is not installed."""
    return pytest.importorskip("transformers")

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel", "logo"]
GRAYSCALE = ["camera", "page", "moon", "coins", "horse", "text", "clock", "brick", "grass", "gravel"]


def as_uint8(array):
    return (array * 255).astype(np.uint8) if array.dtype == bool else array.astype(np.uint8)


@pytest.fixture(scope="module")
def photos():
    """20 real images from skimage.data: RGB photos, one RGBA logo, grayscale ones, one binary."""
    images = {name: as_uint8(getattr(data, name)()) for name in PHOTOS + GRAYSCALE}
    assert len(images) == 20 and images["logo"].shape[2] == 4 and images["camera"].ndim == 2
    return images


def hf_inputs(array):
    """The same image as a PIL image, and as an array where every transformers 5 accepts one ([H, W, 3])."""
    return [Image.fromarray(array)] + ([array] if array.ndim == 3 and array.shape[2] == 3 else [])


def hf_pixels(processor, image):
    return processor(image, return_tensors="pt")["pixel_values"][0]


CLIP_SETTINGS = [(224, (224, 224)), (336, (336, 336)), (448, (448, 448)), (100, (90, 130))]


def check_clip_backend(processor_class, backend, photos):
    checked = 0
    for size, (crop_h, crop_w) in CLIP_SETTINGS:
        processor = processor_class(size={"shortest_edge": size}, crop_size={"height": crop_h, "width": crop_w})
        for name, array in photos.items():
            for image in hf_inputs(array):
                expected = hf_pixels(processor, image)
                ours = clip_preprocess([image], size=size, crop_size=(crop_h, crop_w), backend=backend)[0]
                assert ours.dtype == torch.float32 and ours.shape == expected.shape == (3, crop_h, crop_w)
                assert torch.equal(ours, expected), f"{name} {type(image).__name__} at {size}: {(ours - expected).abs().max()}"
                checked += 1
    return checked


def test_clip_pil_backend_equals_clip_image_processor_pil(photos):
    CLIPImageProcessorPil = reference_processor("CLIPImageProcessor", "pil")

    assert check_clip_backend(CLIPImageProcessorPil, "pil", photos) >= 4 * 20


def test_clip_torch_backend_equals_torchvision_clip_image_processor(photos):
    pytest.importorskip("torchvision")
    CLIPImageProcessor = reference_processor("CLIPImageProcessor", "torch")

    assert check_clip_backend(CLIPImageProcessor, "torch", photos) >= 4 * 20


def test_clip_backends_differ_only_by_resampling(photos):
    """The two resize kernels differ slightly; crops of an unresized image agree exactly."""
    image = photos["astronaut"]
    pil = clip_preprocess(image, size=224, crop_size=224, backend="pil")[0]
    tv = clip_preprocess(image, size=224, crop_size=224, backend="torch")[0]
    assert not torch.equal(pil, tv) and (pil - tv).abs().max() < 0.2
    same_pil = clip_preprocess(image, size=512, crop_size=256, backend="pil")[0]
    same_tv = clip_preprocess(image, size=512, crop_size=256, backend="torch")[0]
    assert (same_pil - same_tv).abs().max() <= 1e-6


def test_clip_bilinear_and_square_size(photos):
    CLIPImageProcessorPil = reference_processor("CLIPImageProcessor", "pil")

    processor = CLIPImageProcessorPil(size={"height": 150, "width": 200}, resample=2, do_center_crop=False)
    for name in ("chelsea", "camera"):
        image = Image.fromarray(photos[name])
        ours = clip_preprocess(image, size=(150, 200), crop_size=None, resample="bilinear")[0]
        assert torch.equal(ours, hf_pixels(processor, image))


def test_shortest_edge_size_truncates_like_transformers():
    assert shortest_edge_size(480, 640, 224) == (224, 298)
    assert shortest_edge_size(640, 480, 224) == (298, 224)
    assert shortest_edge_size(300, 300, 224) == (224, 224)
    assert shortest_edge_size(1000, 333, 224) == (672, 224)


def test_center_crop_pads_small_images_like_each_backend():
    image = torch.arange(1, 3 * 4 * 5 + 1, dtype=torch.uint8).reshape(3, 4, 5)
    pil = clip_center_crop(image, (7, 6), backend="pil")
    tv = clip_center_crop(image, (7, 6), backend="torch")
    assert pil.shape == tv.shape == (3, 7, 6)
    assert torch.equal(pil[:, 2:6, 1:6], image)  # numpy pads top with ceil: 2 rows
    assert torch.equal(tv[:, 1:5, 0:5], image)  # torchvision pads top with floor: 1 row


def test_rgb_conversion_composites_transparency_onto_white():
    CLIPImageProcessorPil = reference_processor("CLIPImageProcessor", "pil")

    as_is = CLIPImageProcessorPil(do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=False)
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255
    rgba[0, 1, 3] = 128
    for image in (Image.fromarray(rgba, mode="RGBA"), rgba):
        rgb = to_rgb_uint8(image)
        assert rgb[:, 0, 0].tolist() == [200, 0, 0] and rgb[:, 1, 1].tolist() == [255, 255, 255]
        assert rgb[:, 0, 1].tolist() == [227, 127, 127]  # 200*a + 255*(1-a) and 255*(1-a), a = 128/255
    if Version(hf().__version__) >= Version("5.23"):  # earlier versions drop alpha without compositing
        assert torch.equal(rgb.float(), hf_pixels(as_is, Image.fromarray(rgba, mode="RGBA")).float())
    gray = to_rgb_uint8(np.full((3, 4), 7, dtype=np.uint8))
    assert gray.shape == (3, 3, 4) and (gray == 7).all()


def test_clip_errors():
    with pytest.raises(ValueError, match="must be uint8"):
        clip_preprocess(np.zeros((20, 20, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="unsupported resample 'lanczos'"):
        clip_preprocess(np.zeros((20, 20, 3), dtype=np.uint8), resample="lanczos")
    with pytest.raises(ValueError, match="backend must be one of"):
        clip_resize_center_crop(np.zeros((20, 20, 3), dtype=np.uint8), backend="cv2")


def test_aimv2_fixed_size_equals_the_reference_processor(photos):
    CLIPImageProcessorPil = reference_processor("CLIPImageProcessor", "pil")

    for image_size in (224, 336):
        processor = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
        images = [Image.fromarray(photos[name]) for name in ("astronaut", "coffee", "camera", "logo")]
        batch = aimv2_preprocess(images, image_size=image_size)
        expected = [hf_pixels(processor, image) for image in images]
        side = image_size // 14
        assert batch.grid_thw.tolist() == [[1, side, side]] * 4
        assert torch.equal(batch.patches, patchify(expected, 14, layout="ppc")[0])


def test_aimv2_native_resolution_is_the_unresized_reference(photos):
    """No cap: no resize, CLIP normalisation, remainder pixels dropped as the reference's conv drops them."""
    CLIPImageProcessorPil = reference_processor("CLIPImageProcessor", "pil")

    processor = CLIPImageProcessorPil(do_resize=False, do_center_crop=False)
    names = ["astronaut", "chelsea", "coffee", "rocket", "camera", "logo"]
    images = [Image.fromarray(photos[name]) for name in names]
    pixels = aimv2_pixels(images, native=True)
    batch = aimv2_preprocess(images, native=True)
    for name, image, ours, grid in zip(names, images, pixels, batch.grid_thw.tolist()):
        full = hf_pixels(processor, image)
        rows, cols = full.shape[1] // 14, full.shape[2] // 14
        assert grid == [1, rows, cols]
        assert torch.equal(ours, full[:, : rows * 14, : cols * 14]), name
    assert torch.equal(batch.patches, patchify(pixels, 14)[0])
    assert aimv2_pixels(Image.fromarray(photos["coffee"]), native=True)[0].shape == (3, 392, 588)  # 400x600 → 28x42 patches


def test_aimv2_native_token_cap_resizes_like_the_processor(photos):
    CLIPImageProcessorPil = reference_processor("CLIPImageProcessor", "pil")

    for name in ("rocket", "chelsea", "camera"):
        image = Image.fromarray(photos[name])
        rows, cols = floor_patch_grid(image.height, image.width, max_num_patches=256)
        assert rows * cols <= 256 and rows * cols >= 200
        assert abs(rows / cols - image.height / image.width) < 0.1
        processor = CLIPImageProcessorPil(size={"height": rows * 14, "width": cols * 14}, do_center_crop=False)
        ours = aimv2_pixels(image, native=True, max_num_patches=256)[0]
        assert torch.equal(ours, hf_pixels(processor, image))


def test_floor_patch_grid_rules():
    assert floor_patch_grid(480, 640) == (34, 45)  # the reference's 1530 tokens for a 640x480 image
    assert floor_patch_grid(480, 640, max_num_patches=2000) == (34, 45)
    rows, cols = floor_patch_grid(480, 640, max_num_patches=100)
    assert rows * cols <= 100 and (rows, cols) == (8, 11)
    assert floor_patch_grid(14, 5000, max_num_patches=10) == (1, 10)
    with pytest.raises(ValueError, match="smaller than one 14x14 patch"):
        floor_patch_grid(10, 300)
    with pytest.raises(ValueError, match=r"max_num_patches=10 caps processing that keeps each image's aspect ratio.*"
                                         r"pass native=True"):
        aimv2_pixels(np.zeros((30, 30, 3), dtype=np.uint8), image_size=224, max_num_patches=10)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        aimv2_pixels(np.zeros((30, 30, 3), dtype=np.uint8), image_size=200)
    with pytest.raises(ValueError, match="for native resolution pass native=True"):
        aimv2_pixels(np.zeros((30, 30, 3), dtype=np.uint8), image_size=None)


def test_real_photographs_through_both_models(tmp_path, photos):
    """Native-resolution photographs of different sizes, packed, against the reference one by one."""
    pytest.importorskip("transformers.models.aimv2.modeling_aimv2")  # the reference arrived in 4.56
    from packvit.harness.aimv2 import ADAPTER

    ckpt = ADAPTER.write_random_checkpoint(tmp_path / "native", use_head=True)
    reference = ADAPTER.load_reference(ckpt, torch.device("cpu"), torch.float32)
    packed = ADAPTER.load_packed(ckpt, torch.device("cpu"), torch.float32)
    images = [photos[name] for name in ("astronaut", "coffee", "camera", "rocket")]
    items = ADAPTER.preprocess(ckpt, images, native=True, max_num_patches=64)
    assert len({tuple(item.shape) for item in items}) > 1
    assert all(torch.equal(a, b) for a, b in zip(items, aimv2_pixels(images, native=True, max_num_patches=64)))
    with torch.no_grad():
        expected = ADAPTER.run_reference(reference, items, batch_size=4)
        got = ADAPTER.run_packed(packed, items)
    for e, g in zip(expected, got):
        assert (e.tokens - g.tokens).abs().max() <= 1e-5
        assert (e.pooled - g.pooled).abs().max() <= 1e-5
