import pytest
import torch

import packvit
from packvit.packing import (
    PackedBatch,
    SegmentLayout,
    item_token_counts,
    patchify,
    prefix_token_index,
    split_items,
    to_device,
    token_positions,
    unpatchify,
    validate_grid_thw,
    validate_patches,
)


def test_segment_layout_from_grids_with_videos_and_1x1():
    grid = validate_grid_thw([[1, 1, 1], [3, 2, 5], [1, 23, 2], [1, 1, 37]])
    counts = item_token_counts(grid)
    assert counts == [1, 30, 46, 37]
    layout = SegmentLayout.from_lengths(counts)
    assert layout.cu_seqlens_host.dtype == torch.int32
    assert layout.cu_seqlens_host.tolist() == [0, 1, 31, 77, 114]
    assert layout.max_seqlen == 46 and isinstance(layout.max_seqlen, int)
    assert layout.total == 114 and layout.num_segments == 4
    assert layout.cu_seqlens("cpu") is layout.cu_seqlens_host


def test_token_positions_follow_t_row_column_order():
    positions = token_positions(torch.tensor([[2, 2, 3], [1, 1, 1]]))
    assert positions.shape == (13, 3)
    assert positions[:6].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]
    assert positions[6].tolist() == [1, 0, 0] and positions[11].tolist() == [1, 1, 2]
    assert positions[12].tolist() == [0, 0, 0]


def test_token_positions_equal_an_item_by_item_construction():
    grid = torch.tensor([[1, 3, 5], [4, 2, 3], [1, 1, 1], [2, 7, 2]])
    expected = torch.cat([
        torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 3)
        for t, h, w in grid.tolist()
    ])
    assert torch.equal(token_positions(grid), expected)


def test_split_items_round_trip():
    x = torch.randn(10, 4)
    parts = split_items(x, [3, 1, 6])
    assert [p.shape[0] for p in parts] == [3, 1, 6]
    assert torch.equal(torch.cat(parts), x)
    with pytest.raises(ValueError, match="cannot split"):
        split_items(x, [3, 3])


def test_prefix_token_index_places_prefix_before_patches():
    prefix_rows, patch_rows = prefix_token_index([2, 1, 3], num_prefix_tokens=2)
    assert prefix_rows.tolist() == [[0, 1], [4, 5], [7, 8]]
    assert patch_rows.tolist() == [2, 3, 6, 9, 10, 11]
    everything = torch.cat([prefix_rows.flatten(), patch_rows]).sort().values
    assert torch.equal(everything, torch.arange(12))


@pytest.mark.parametrize("layout", ["ppc", "cpp"])
def test_patchify_unpatchify_identity_for_batch_list_and_video(layout):
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(2, 3, 32, 48, generator=g)
    patches, grid = patchify(batch, 16, layout)
    assert patches.shape == (2 * 2 * 3, 3 * 16 * 16) and grid.tolist() == [[1, 2, 3], [1, 2, 3]]
    restored = unpatchify(patches, grid, 16, layout)
    assert all(torch.equal(r[0], b) for r, b in zip(restored, batch))

    mixed = [torch.randn(3, 14, 28, generator=g), torch.randn(4, 3, 28, 14, generator=g), torch.randn(3, 14, 14, generator=g)]
    patches, grid = patchify(mixed, 14, layout)
    assert grid.tolist() == [[1, 1, 2], [4, 2, 1], [1, 1, 1]]
    restored = unpatchify(patches, grid, 14, layout)
    assert torch.equal(restored[0][0], mixed[0]) and torch.equal(restored[1], mixed[1]) and torch.equal(restored[2][0], mixed[2])


def test_patch_layouts_flatten_in_their_named_order():
    image = torch.arange(3 * 2 * 2, dtype=torch.float32).reshape(3, 2, 2)  # [C, p, p], one patch
    ppc, _ = patchify([image], 2, "ppc")
    cpp, _ = patchify([image], 2, "cpp")
    assert torch.equal(cpp[0], image.flatten())
    assert torch.equal(ppc[0], image.permute(1, 2, 0).flatten())


def test_ppc_patches_times_permuted_conv_weight_equal_conv():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 4, 4)
    image = torch.randn(1, 3, 8, 12)
    expected = conv(image).flatten(2).transpose(1, 2)[0]  # [h*w, 8]
    for layout, weight in (("ppc", conv.weight.permute(0, 2, 3, 1)), ("cpp", conv.weight)):
        patches, _ = patchify(image, 4, layout)
        got = patches @ weight.reshape(8, -1).T + conv.bias
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_seed_helpers():
    image = torch.randn(3, 32, 16)
    patches, grid = packvit.image_to_packing_input(image, 16)
    assert patches.shape == (2, 768) and grid.tolist() == [[1, 2, 1]]
    patches2, grid2 = packvit.convert_to_patches(image[None], 16)
    assert torch.equal(patches, patches2) and torch.equal(grid, grid2)
    patches3, grid3 = packvit.batch_images_to_packing_input([image, torch.randn(3, 16, 16)], 16)
    assert grid3.tolist() == [[1, 2, 1], [1, 1, 1]] and torch.equal(patches3[:2], patches)
    with pytest.raises(ValueError, match="one image"):
        packvit.image_to_packing_input(torch.randn(2, 3, 16, 16), 16)


def test_similarity_metrics():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 0.5], [0.0, -2.0]])
    metrics = packvit.compute_similarity_metrics(a, b)
    assert metrics["max_diff"] == pytest.approx(4.0)
    assert metrics["mean_diff"] == pytest.approx(4.5 / 4)
    assert metrics["min_cosine"] == pytest.approx(-1.0)
    assert metrics["max_cosine"] == pytest.approx(1 / 1.25 ** 0.5)


@pytest.mark.parametrize(
    "grid, message",
    [
        (torch.tensor([1, 2, 3]), "shape \\[num_items, 3\\]"),
        (torch.tensor([[1, 2]]), "shape \\[num_items, 3\\]"),
        (torch.tensor([[1.0, 2.5, 3.0]]), "whole patch counts"),
        (torch.tensor([[1, 0, 3]]), "must be positive"),
        (torch.tensor([[1, -2, 3]]), "must be positive"),
        (torch.zeros(0, 3, dtype=torch.long), "empty"),
    ],
)
def test_grid_validation_errors(grid, message):
    with pytest.raises(ValueError, match=message):
        validate_grid_thw(grid)


def test_float_grid_with_whole_values_is_accepted():
    assert validate_grid_thw(torch.tensor([[1.0, 2.0, 3.0]])).dtype == torch.int64


def test_patch_validation_errors():
    grid = validate_grid_thw([[1, 2, 2]])
    with pytest.raises(ValueError, match="patches has 5 rows but grid_thw describes 4"):
        validate_patches(torch.randn(5, 768), grid, 768)
    with pytest.raises(ValueError, match="patch_dim 588 but the model expects 768"):
        validate_patches(torch.randn(4, 588), grid, 768)
    with pytest.raises(ValueError, match="2-D tensor"):
        validate_patches(torch.randn(4, 16, 48), grid, 768)
    with pytest.raises(ValueError, match="not normalised pixels"):
        validate_patches(torch.zeros(4, 768, dtype=torch.uint8), grid, 768)
    with pytest.raises(ValueError, match="patches are on meta but the model is on cpu"):
        validate_patches(torch.empty(4, 768, device="meta"), grid, 768, torch.device("cpu"))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        patchify(torch.randn(1, 3, 30, 32), 16)


def test_packed_batch_validates_and_splits():
    patches, grid = patchify([torch.randn(3, 16, 32), torch.randn(3, 48, 16)], 16)
    batch = PackedBatch(patches, grid)
    assert batch.num_items == 2 and batch.token_counts == [2, 3]
    assert [p.shape[0] for p in batch.split(torch.randn(5, 7))] == [2, 3]
    joined = PackedBatch.concat([batch, batch])
    assert joined.grid_thw.tolist() == [[1, 1, 2], [1, 3, 1]] * 2
    with pytest.raises(ValueError, match="grid_thw describes"):
        PackedBatch(patches[:4], grid)
    with_positions = PackedBatch(patches, grid, patch_positions=torch.zeros(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="some carry patch_positions and some do not"):
        PackedBatch.concat([batch, with_positions])
    with pytest.raises(ValueError, match="different patch layouts"):
        PackedBatch.concat([batch, PackedBatch(patches, grid, "cpp")])
    with pytest.raises(ValueError, match=r"patch_positions must be \[total_patches, 3\] = \[5, 3\]"):
        PackedBatch(patches, grid, patch_positions=torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="patch layout must be one of"):
        PackedBatch(patches, grid, "chw")


def test_frames_as_items_splits_clips_into_images():
    video, image = torch.randn(3, 3, 32, 16), torch.randn(3, 16, 48)
    batch = PackedBatch(*patchify([video, image], 16))
    frames = batch.frames_as_items()
    assert frames.grid_thw.tolist() == [[1, 2, 1]] * 3 + [[1, 1, 3]]
    assert frames.patches is batch.patches
    per_frame = PackedBatch(*patchify([*video.unbind(0), image], 16))
    assert torch.equal(per_frame.patches, frames.patches) and torch.equal(per_frame.grid_thw, frames.grid_thw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.bfloat16])
def test_to_device_copies_exactly_to_cuda(dtype):
    host = (torch.arange(600, dtype=torch.float32) * 1.25 - 7).to(dtype).reshape(20, 30)[:, ::2]  # non-contiguous
    on_device = to_device(host, torch.device("cuda"))
    assert on_device.device.type == "cuda" and on_device.dtype == dtype
    assert torch.equal(on_device.cpu(), host)


def test_pack_by_budget_is_greedy_and_keeps_order():
    from packvit.packing import GreedyPacker, pack_by_budget

    assert pack_by_budget([3, 3, 3, 10, 1, 1], 6) == [range(0, 2), range(2, 3), range(3, 4), range(4, 6)]
    assert pack_by_budget([], 5) == []
    assert pack_by_budget([7], 5) == [range(0, 1)]  # an oversized item alone
    packer = GreedyPacker(4)
    assert [packer.add(n) for n in (2, 2, 1, 4, 4)] == [False, False, True, True, True]
    with pytest.raises(ValueError, match="positive whole number"):
        GreedyPacker(0)
