"""Helpers shared by the per-family CPU parity tests."""

import torch


def write_variant_checkpoints(adapter, root, variants: dict) -> dict:
    """One random reference checkpoint per variant (``{name: write_random_checkpoint options}``)."""
    return {name: adapter.write_random_checkpoint(root / name, seed=i, **options)
            for i, (name, options) in enumerate(variants.items())}


def load_model_pairs(adapter, checkpoints: dict) -> dict:
    """``{name: (reference, packed)}`` in float32 on the CPU."""
    cpu = torch.device("cpu")
    return {name: (adapter.load_reference(path, cpu, torch.float32), adapter.load_packed(path, cpu, torch.float32))
            for name, path in checkpoints.items()}


def max_diffs(reference, packed):
    """Largest |reference - packed| over the items' tokens, and over their pooled vectors (None when
    the reference has none, in which case packvit must have none either)."""
    tokens = max((r.tokens - p.tokens).abs().max().item() for r, p in zip(reference, packed))
    if reference[0].pooled is None:
        assert all(p.pooled is None for p in packed)
        return tokens, None
    pooled = max((r.pooled - p.pooled).abs().max().item() for r, p in zip(reference, packed))
    return tokens, pooled
