"""Position code against independent oracles: the antialiased table resize (SigLIP2's bilinear,
AIMv2's bicubic) against a float64 evaluation of its definition and against Pillow's resampler, on
every kind of grid — one wide, one tall, shrunk, grown, unchanged — and the table cache."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from packvit.positions import TableLookup, resize_table, resize_weights

GRIDS = [(23, 1), (1, 23), (40, 1), (1, 1), (5, 9), (40, 3), (7, 30), (16, 16), (16, 1), (3, 16)]


def cubic(x, a=-0.5):
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def triangle(x):
    return max(0.0, 1.0 - abs(x))


def oracle_resize(table: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """The antialiased separable resize from its definition, element by element in float64: output
    pixel i of a side n → m samples source pixel j with weight k((j + 0.5 - (i + 0.5) n/m) / max(n/m, 1)),
    normalised; k is the triangle or the a = -0.5 cubic kernel."""
    kernel = triangle if mode == "bilinear" else cubic

    def weights(n, m):
        scale = n / m
        support = max(scale, 1.0)
        rows = []
        for i in range(m):
            row = [kernel((j + 0.5 - (i + 0.5) * scale) / support) for j in range(n)]
            total = math.fsum(row)
            rows.append([w / total for w in row])
        return rows

    wy, wx = weights(table.shape[0], height), weights(table.shape[1], width)
    out = np.zeros((height, width, table.shape[2]))
    for i in range(height):
        for j in range(width):
            for a in range(table.shape[0]):
                for b in range(table.shape[1]):
                    if wy[i][a] and wx[j][b]:
                        out[i, j] += wy[i][a] * wx[j][b] * table[a, b]
    return out


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("grid", GRIDS)
def test_resize_equals_the_float64_definition(mode, grid):
    table = torch.randn(16, 16, 3, generator=torch.Generator().manual_seed(sum(grid)))
    expected = oracle_resize(table.double().numpy(), *grid, mode).reshape(-1, 3)
    assert np.abs(resize_table(table, *grid, mode).double().numpy() - expected).max() < 2e-6


@pytest.mark.parametrize("mode, resample", [("bilinear", Image.Resampling.BILINEAR), ("bicubic", Image.Resampling.BICUBIC)])
@pytest.mark.parametrize("grid", GRIDS)
def test_resize_equals_pillow(mode, resample, grid):
    """Pillow's float ("F") resampler implements the same filters independently."""
    height, width = grid
    table = torch.randn(16, 16, 2, generator=torch.Generator().manual_seed(height * 100 + width))
    channels = [np.asarray(Image.fromarray(table[..., c].numpy(), mode="F").resize((width, height), resample)) for c in range(2)]
    expected = torch.from_numpy(np.stack(channels, axis=-1)).reshape(-1, 2)
    assert (resize_table(table, height, width, mode) - expected).abs().max() < 1e-5


def test_weights_are_normalised_and_identity_at_the_same_size():
    for mode in ("bilinear", "bicubic"):
        for n, m in [(16, 1), (16, 23), (16, 5), (4, 4)]:
            weights = resize_weights(n, m, mode)
            assert weights.shape == (m, n)
            assert np.allclose(weights.sum(axis=1), 1.0)
        assert np.array_equal(resize_weights(16, 16, mode), np.eye(16))
    table = torch.randn(4, 6, 3)
    assert torch.equal(resize_table(table, 4, 6, "bicubic"), table.reshape(24, 3))
    with pytest.raises(ValueError, match="resize mode must be one of"):
        resize_weights(4, 2, "nearest")


def test_resize_is_differentiable_and_keeps_the_dtype():
    table = torch.randn(16, 16, 8, dtype=torch.bfloat16, requires_grad=True)
    resized = resize_table(table, 23, 1, "bilinear")
    assert resized.dtype == torch.bfloat16 and resized.shape == (23, 8)
    resized.float().sum().backward()
    # every source row contributes to the 23 rows, and the weights of each output sum to one
    assert torch.allclose(table.grad.float().sum(), torch.tensor(23.0 * 8), atol=0.5)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_lookup_of_a_pack_equals_each_items_resized_table(mode):
    """One lookup for the whole pack (frames included) gives every patch its grid's resized row."""
    grid_thw = torch.tensor([[1, 23, 1], [2, 3, 5], [1, 16, 16], [1, 1, 1], [1, 3, 5], [1, 40, 3]])
    table = torch.randn(16 * 16, 8, generator=torch.Generator().manual_seed(1))
    lookup = TableLookup.build(grid_thw, (16, 16), mode, torch.device("cpu"))
    expected = torch.cat([resize_table(table.reshape(16, 16, 8), h, w, mode).repeat(t, 1) for t, h, w in grid_thw.tolist()])
    assert not lookup.identity
    assert (lookup(table) - expected).abs().max() < 1e-5
    native = TableLookup.build(torch.tensor([[1, 16, 16], [3, 16, 16]]), (16, 16), mode, torch.device("cpu"))
    assert native.identity and torch.equal(native(table), table.repeat(4, 1))


def test_lookup_is_differentiable_and_keeps_the_dtype():
    table = torch.randn(16 * 16, 4, dtype=torch.bfloat16, requires_grad=True)
    lookup = TableLookup.build(torch.tensor([[1, 23, 1], [1, 5, 9]]), (16, 16), "bilinear", torch.device("cpu"))
    positions = lookup(table)
    assert positions.dtype == torch.bfloat16 and positions.shape == (23 + 45, 4)
    positions.float().sum().backward()
    # the weights of each output row sum to one, so the gradients sum to the number of outputs
    assert torch.allclose(table.grad.float().sum(), torch.tensor(68.0 * 4), atol=0.5)
