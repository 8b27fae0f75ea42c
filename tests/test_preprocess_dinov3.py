"""DINOv3 preprocessing: the fixed 224×224 processor equals transformers' DINOv3ViTImageProcessor
bit for bit (torchvision backend, so that test needs torchvision); the native-resolution mode
keeps aspect ratios under a patch budget and packs directly."""

import numpy as np
import pytest
import torch
from PIL import Image

from packvit.packing import PackedBatch, patchify
from packvit.preprocess.common import IMAGENET_MEAN, IMAGENET_STD
from packvit.preprocess.dinov3 import (
    image_to_uint8,
    native_size,
    dinov3_preprocess,
    preprocess_fixed,
    preprocess_native,
    rescale_resize_normalize,
)

skimage_data = pytest.importorskip("skimage.data")

PHOTOGRAPHS = [
    "astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina",
    "rocket", "text", "checkerboard",
]


def photographs():
    """uint8 arrays: RGB, grayscale and RGBA photographs, and crops of exactly 224×224 and 10×7."""
    arrays = [getattr(skimage_data, name)() for name in PHOTOGRAPHS]
    astronaut = skimage_data.astronaut()
    return arrays + [skimage_data.stereo_motorcycle()[0], astronaut[:224, :224], astronaut[100:110, 50:57]]


def test_fixed_mode_equals_the_reference_processor():
    pytest.importorskip("transformers")
    pytest.importorskip("torchvision")
    from transformers import DINOv3ViTImageProcessor

    arrays = photographs()
    assert len(arrays) >= 20
    # the reference takes RGB images; packvit converts grayscale and RGBA itself (PIL's convert)
    expected = DINOv3ViTImageProcessor()([Image.fromarray(a).convert("RGB") for a in arrays], return_tensors="pt")
    pixel_values = preprocess_fixed(arrays)
    assert pixel_values.shape == expected["pixel_values"].shape == (len(arrays), 3, 224, 224)
    assert pixel_values.dtype == torch.float32
    assert torch.equal(pixel_values, expected["pixel_values"])


def test_fixed_mode_without_a_resize_is_rescale_and_normalize():
    array = skimage_data.astronaut()[:224, :224]
    expected = (torch.from_numpy(array).permute(2, 0, 1).float() * (1 / 255) - torch.tensor(IMAGENET_MEAN)[:, None, None])
    expected = expected / torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.equal(preprocess_fixed([array])[0], expected)


def test_inputs_pil_array_and_tensor_agree():
    array = skimage_data.chelsea()
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    assert torch.equal(image_to_uint8(Image.fromarray(array)), tensor)
    assert torch.equal(image_to_uint8(array), tensor)
    assert torch.equal(image_to_uint8(tensor), tensor)
    gray = image_to_uint8(skimage_data.camera())
    assert gray.shape == (3, 512, 512) and torch.equal(gray[0], gray[2])


@pytest.mark.parametrize(
    "size, budget, expected",
    [
        ((300, 451), 1024, (304, 448)),  # fits: nearest multiples of 16, not enlarged
        ((512, 512), 1024, (512, 512)),
        ((1411, 1411), 1024, (512, 512)),  # scaled down to the budget
        ((400, 600), 256, (208, 304)),  # 13×20 = 260 would exceed 256: the largest fitting scale gives 13×19
        ((77, 1500), 64, (32, 512)),  # 2×32, not 1×35: the aspect ratio is kept
        ((5, 7), 1024, (16, 16)),  # at least one patch per side
        ((16, 4000), 64, (16, 1024)),  # a side at one patch: the other fills the budget
    ],
)
def test_native_size(size, budget, expected):
    assert native_size(*size, patch_size=16, max_num_patches=budget) == expected


def test_native_size_keeps_aspect_ratio_under_the_budget():
    for height, width in [(300, 451), (427, 640), (1000, 872), (191, 384), (3000, 2000), (77, 1500)]:
        for budget in (64, 256, 1024):
            h, w = native_size(height, width, 16, budget)
            assert (h // 16) * (w // 16) <= budget
            assert h <= max(16, height + 8) and w <= max(16, width + 8)  # never enlarged beyond rounding
            if min(h, w) >= 64:
                assert abs((w / h) / (width / height) - 1) < 0.15


def test_native_mode_packs_every_image_at_its_own_size():
    arrays = [skimage_data.chelsea(), skimage_data.rocket(), skimage_data.page(), skimage_data.hubble_deep_field()]
    batch = dinov3_preprocess(arrays, native=True, max_num_patches=256)
    assert isinstance(batch, PackedBatch)
    expected_grids = [[1, *(s // 16 for s in native_size(*a.shape[:2], 16, 256))] for a in arrays]
    assert batch.grid_thw.tolist() == expected_grids
    items = preprocess_native(arrays, max_num_patches=256)
    patches, grid_thw = patchify(items, 16, layout="ppc")
    assert torch.equal(batch.patches, patches) and torch.equal(batch.grid_thw, grid_thw)
    # a resized item is the same pipeline as the fixed mode, at the native size
    expected = rescale_resize_normalize(image_to_uint8(arrays[0])[None], native_size(300, 451, 16, 256))[0]
    assert torch.equal(items[0], expected)


def test_fixed_mode_packs_196_patches_per_image():
    arrays = [skimage_data.coffee(), skimage_data.coins()]
    batch = dinov3_preprocess(arrays)  # native=False: the published processor
    assert batch.grid_thw.tolist() == [[1, 14, 14], [1, 14, 14]]
    patches, _ = patchify(preprocess_fixed(arrays), 16, layout="ppc")
    assert torch.equal(batch.patches, patches)


def test_bad_settings_are_refused():
    image = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match=r"max_num_patches=100 caps processing that keeps each image's aspect ratio, "
                                         r"but this dinov3 processor resizes every image to 224x224"):
        dinov3_preprocess([image], max_num_patches=100)
    with pytest.raises(ValueError, match="max_num_patches must be at least 1"):
        native_size(100, 100, 16, 0)
    with pytest.raises(ValueError, match="max_num_patches must be at least 1"):
        dinov3_preprocess([image], native=True, max_num_patches=0)
