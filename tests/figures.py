"""The GPU tests' figures: each record printed as a ``FIGURES`` line and appended as a JSON line to
``$PACKVIT_GPU_REPORT`` when it is set (``scripts/gpu_check.sh`` collects them into its summary);
the agreement figures of a packed model's items against the reference's."""

import json
import os

import torch

from packvit.metrics import compute_similarity_metrics


def report(record: dict) -> None:
    print("FIGURES", json.dumps(record))
    path = os.environ.get("PACKVIT_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def compare(reference, packed):
    """Agreement of packed items with the reference's (``harness.ItemOutput``s): every token, each
    item's first token (DINOv3's CLS), and the pooled vectors (None without them)."""
    tokens = compute_similarity_metrics(torch.cat([p.tokens for p in packed]), torch.cat([r.tokens for r in reference]))
    first = compute_similarity_metrics(torch.stack([p.tokens[0] for p in packed]), torch.stack([r.tokens[0] for r in reference]))
    pooled = None
    if reference[0].pooled is not None:
        pooled = compute_similarity_metrics(torch.stack([p.pooled for p in packed]), torch.stack([r.pooled for r in reference]))
    return tokens, first, pooled
