"""OneVision Encoder preprocessing: the published CLIP processor (448, bicubic, centre crop), native
resolution, video frames on the 64-slot timeline, and packed output in the (C, p, p) layout."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from packvit.packing import patchify, unpatchify
from packvit.preprocess.common import CLIP_MEAN, CLIP_STD
from packvit.preprocess.llava_vit import (
    llava_vit_preprocess,
    nearest_patch_grid,
    pack_items,
    preprocess_images,
    preprocess_native,
    preprocess_video,
    timeline_positions,
    timeline_slots,
)
from family_helpers import reference_processor

PHOTOS = {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket()}


def published_processor(backend):
    cls = reference_processor("CLIPImageProcessor", backend)
    return cls(size={"shortest_edge": 448}, crop_size={"height": 448, "width": 448}, resample=3,
               image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)


def test_published_processor_pil_backend():
    images = list(PHOTOS.values())
    expected = published_processor("pil")(images=images, return_tensors="pt")["pixel_values"]
    ours = torch.stack(preprocess_images(images))
    assert ours.shape == (4, 3, 448, 448)
    assert torch.equal(ours, expected)


def test_published_processor_torch_backend():
    pytest.importorskip("torchvision")
    images = list(PHOTOS.values())
    expected = published_processor("torch")(images=images, return_tensors="pt")["pixel_values"]
    ours = torch.stack(preprocess_images(images, backend="torch"))
    assert torch.equal(ours, expected)


def test_nearest_patch_grid_rules():
    assert nearest_patch_grid(448, 448) == (32, 32)
    assert nearest_patch_grid(300, 500) == (21, 36)  # nearest whole patches: 21.4, 35.7
    assert nearest_patch_grid(3, 5) == (1, 1)
    rows, cols = nearest_patch_grid(1000, 3000, max_num_patches=1024)
    assert rows * cols <= 1024 and cols / rows == pytest.approx(3, rel=0.05)
    assert nearest_patch_grid(1000, 3000, max_num_patches=None) == (71, 214)
    with pytest.raises(ValueError, match="max_num_patches must be positive"):
        nearest_patch_grid(1000, 1000, max_num_patches=0)


def test_native_resolution_pixels():
    astronaut = PHOTOS["astronaut"][:140, :98]  # already 10 x 7 patches: no resampling
    exact = preprocess_native([astronaut])[0]
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    expected = (torch.from_numpy(astronaut).permute(2, 0, 1).double() / 255).float()
    assert torch.allclose(exact, (expected - mean) / std, atol=1e-6)
    resized = preprocess_native([PHOTOS["coffee"]], max_num_patches=256)[0]  # 400 x 600
    rows, cols = nearest_patch_grid(400, 600, max_num_patches=256)
    assert resized.shape == (3, rows * 14, cols * 14) and rows * cols <= 256
    reference = Image.fromarray(PHOTOS["coffee"]).resize((cols * 14, rows * 14), Image.Resampling.BICUBIC)
    expected = (torch.from_numpy(np.array(reference)).permute(2, 0, 1).double() / 255).float()
    assert torch.allclose(resized, (expected - mean) / std, atol=1e-6)


def test_video_frames_on_the_timeline():
    frames = [PHOTOS["chelsea"]] * 8
    pixels, slots = preprocess_video(frames)
    assert pixels.shape == (8, 3, 224, 224)
    assert slots.tolist() == [0, 9, 18, 27, 36, 45, 54, 63]
    assert torch.equal(pixels[3], preprocess_images([PHOTOS["chelsea"]], size=224)[0])
    _, slots = preprocess_video(frames[:4], frame_indices=[0, 10, 20, 120], total_frames=121)
    assert slots.tolist() == [0, 5, 10, 63]
    array_video = np.stack([PHOTOS["astronaut"]] * 2)  # uint8 [T, H, W, C]
    assert preprocess_video(array_video)[0].shape == (2, 3, 224, 224)
    with pytest.raises(ValueError, match="frame_indices need total_frames"):
        preprocess_video(frames, frame_indices=list(range(8)))
    with pytest.raises(ValueError, match="got 3 frame indices for 8 frames"):
        preprocess_video(frames, frame_indices=[0, 1, 2], total_frames=3)


def test_pack_items_layout_and_positions():
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(3, 28, 42, generator=generator)
    video = torch.randn(2, 3, 14, 28, generator=generator)
    batch = pack_items([image, video, image], slots=[None, torch.tensor([7, 50]), None])
    assert batch.grid_thw.tolist() == [[1, 2, 3], [2, 1, 2], [1, 2, 3]]
    assert batch.patches.shape == (16, 3 * 14 * 14)
    # (C, p, p) layout: the first patch is the top-left 14 x 14 block, channel-major
    assert torch.equal(batch.patches[0], image[:, :14, :14].reshape(-1))
    assert torch.equal(unpatchify(batch.patches, batch.grid_thw, 14, layout="cpp")[1], video)
    positions = batch.patch_positions
    assert positions[:6].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]
    assert positions[6:10].tolist() == [[7, 0, 0], [7, 0, 1], [50, 0, 0], [50, 0, 1]]
    default = pack_items([video]).patch_positions
    assert default[:, 0].tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="an item of 2 frames got 3 timeline slots"):
        pack_items([video], slots=[[0, 1, 2]])


def test_llava_vit_preprocess_images_then_videos():
    images = [PHOTOS["astronaut"], PHOTOS["rocket"]]
    batch = llava_vit_preprocess(images, videos=[[PHOTOS["coffee"]] * 4])
    assert batch.grid_thw.tolist() == [[1, 32, 32], [1, 32, 32], [4, 16, 16]]
    expected, _ = patchify(preprocess_images(images), 14, layout="cpp")
    assert torch.equal(batch.patches[: 2 * 1024], expected)
    video_t = batch.patch_positions[2048:, 0].reshape(4, 256)
    assert video_t[:, 0].tolist() == [0, 21, 42, 63]
    native = llava_vit_preprocess(images, native=True, max_num_patches=400)
    assert all(h * w <= 400 for _, h, w in native.grid_thw.tolist())
    assert torch.equal(native.patches, patchify(preprocess_native(images, max_num_patches=400), 14, layout="cpp")[0])
    assert batch.patch_layout == native.patch_layout == "cpp"
    with pytest.raises(ValueError, match="images is empty"):
        llava_vit_preprocess([])
    with pytest.raises(ValueError, match="nothing to preprocess"):
        llava_vit_preprocess()
    with pytest.raises(ValueError, match="max_num_patches=400 caps processing that keeps each image's aspect ratio"):
        llava_vit_preprocess(images, max_num_patches=400)
    videos_only = llava_vit_preprocess(videos=[[PHOTOS["coffee"]] * 2])
    assert videos_only.grid_thw.tolist() == [[2, 16, 16]]


def test_timeline_slots():
    assert timeline_slots(range(8), 8).tolist() == [0, 9, 18, 27, 36, 45, 54, 63]
    assert timeline_slots(range(16), 16).tolist()[:7] == [0, 4, 8, 13, 17, 21, 25]  # rounding, not truncation
    assert timeline_slots([0, 50, 99], 100).tolist() == [0, 32, 63]
    assert timeline_slots([0], 1).tolist() == [0]
    with pytest.raises(ValueError, match="frame indices must lie in"):
        timeline_slots([3, 10], 10)
    positions = timeline_positions([5, 40], 2, 3)
    assert positions.shape == (12, 3) and positions.dtype == torch.int64
    assert positions[:6, 0].tolist() == [5] * 6 and positions[6:, 0].tolist() == [40] * 6
    assert positions[:6, 1:].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_preprocessing_does_not_import_the_models():
    """The timeline lives with the processor: preprocessing pulls in no model code (nor transformers)."""
    import subprocess
    import sys

    code = ("import sys, packvit.preprocess.llava_vit; "
            "print(sorted(m for m in sys.modules if m.startswith('packvit.models.llava_vit') or m == 'transformers'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
