"""``scripts/fp8_error_budget.py`` measures the fp8 mode's error by variant: its variants must be
the computations they name, or the figures in ``docs/fp8.md`` describe others."""

import importlib.util
from pathlib import Path

import torch

from family_helpers import require_references

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fp8_error_budget.py"


def load_script():
    spec = importlib.util.spec_from_file_location("fp8_error_budget", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_variants_are_what_they_name(tmp_path):
    require_references("siglip2")
    script = load_script()
    rows = {row["variant"]: row for row in script.error_budget("siglip2", "tiny", 3, tmp_path)}
    assert list(rows) == ["bf16", "fp8", "fp8, attention projections in bf16"]
    for row in rows.values():
        assert 0.9 < row["token_cosine_min"] <= row["token_cosine_mean"] <= 1 and row["pooled_cosine_mean"] <= 1
    # e4m3 rounds far coarser than bf16, and keeping a part of the products in bf16 removes a part of it
    assert rows["fp8"]["token_cosine_mean"] < rows["fp8, attention projections in bf16"]["token_cosine_mean"]
    assert rows["fp8, attention projections in bf16"]["token_cosine_mean"] < rows["bf16"]["token_cosine_mean"]


def test_keeping_attention_in_bf16_swaps_the_projections_only(tmp_path):
    require_references("siglip2")
    script = load_script()
    from packvit.fp8 import Fp8Linear
    from packvit.harness import get_adapter

    adapter = get_adapter("siglip2")
    checkpoint = adapter.cached_random_checkpoint(tmp_path, size="tiny")
    fp8 = adapter.load_packed(checkpoint, torch.device("cpu"), "fp8")
    bf16 = adapter.load_packed(checkpoint, torch.device("cpu"), torch.bfloat16)
    script.keep_attention_in_bf16(fp8, bf16)
    for block, kept in zip(fp8.blocks, bf16.blocks):
        assert block.attn.qkv is kept.attn.qkv and block.attn.proj is kept.attn.proj
        assert isinstance(block.mlp.fc1, Fp8Linear) and isinstance(block.mlp.fc2, Fp8Linear)
