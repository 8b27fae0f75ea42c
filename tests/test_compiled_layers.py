"""Compiled encoder layers: same outputs as eager, and no recompilation across pack compositions."""

import pytest
import torch

from family_helpers import require_references
from packvit.harness import get_adapter


def test_compiled_layers_match_eager_without_recompiling(tmp_path):
    dynamo_counters = pytest.importorskip("torch._dynamo.utils").counters
    torch._dynamo.reset()
    dynamo_counters.clear()
    require_references("dinov3")
    adapter = get_adapter("dinov3")
    model = adapter.load_packed(adapter.write_random_checkpoint(tmp_path, "tiny"), torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(0)
    graphs_after_first_pack = None
    for grids in ([(3, 4), (5, 2)], [(1, 1), (7, 3), (2, 9)], [(6, 6)]):
        batch = adapter.pack(adapter.random_items(grids, model.patch_size, generator), model)
        with torch.inference_mode():
            model.compile_layers = False
            eager = model(batch)
            model.compile_layers = True
            compiled = model(batch)
        assert (compiled.last_hidden_state - eager.last_hidden_state).abs().max() <= 1e-5
        assert (compiled.pooler_output - eager.pooler_output).abs().max() <= 1e-5
        if graphs_after_first_pack is None:
            graphs_after_first_pack = dynamo_counters["stats"]["unique_graphs"]
            assert graphs_after_first_pack > 0  # the layers did go through the compiler
    assert sum(dynamo_counters["recompiles"].values()) == 0
    assert dynamo_counters["stats"]["unique_graphs"] == graphs_after_first_pack  # later packs compiled nothing new


def test_compile_layers_setting_is_obeyed_and_auto_is_eager_on_the_cpu():
    from packvit.layers import layers_compiled

    layer, x = torch.nn.Linear(2, 2), torch.zeros(1, 2)
    assert layers_compiled(True, layer, x) is True
    assert layers_compiled(False, layer, x) is False
    with torch.inference_mode():
        assert layers_compiled(None, layer, x) is False  # compiled by default on CUDA only
