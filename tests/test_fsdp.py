"""FSDP2 per layer, two CPU processes over gloo: a vision tower and projector trained for a few
steps end where one process training on both ranks' batches ends — with the tower trainable
(gradient checkpointing on), with a rank that has no images (the placeholder batch, loss times
zero), with the tower frozen, and under a bf16 mixed-precision policy with float32 master weights."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import packvit
from packvit.harness import get_adapter
from packvit.vlm import VisionTower, shard_tower


WORLD_SIZE = 2
STEPS = 3
#: name: (tower frozen, rank without images or None, bf16 mixed precision, gradient checkpointing)
SCENARIOS = {
    "trainable": (False, None, False, True),
    "rank_without_images": (False, 1, False, False),
    "frozen_tower": (True, 1, False, False),
    "bf16_policy": (False, None, True, False),
}


class TinyVLM(nn.Module):
    """A tower and a two-layer projector; the loss stands in for a language model's."""

    def __init__(self, ckpt):
        super().__init__()
        model = packvit.from_pretrained(ckpt, device="cpu")
        self.tower = VisionTower(model, select_layer=-1, spatial_merge=2, odd_grids="pad")
        generator = torch.Generator().manual_seed(1)
        self.projector = nn.Sequential(nn.Linear(self.tower.feature_size, 32), nn.GELU(), nn.Linear(32, 16))
        with torch.no_grad():
            for parameter in self.projector.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)

    def forward(self, batch, placeholder: bool = False):
        features = self.tower(batch).features  # [T, 4 * D]
        loss = self.projector(features).float().square().mean()
        return (0.0 * loss if placeholder else loss), features.dtype


def rank_batch(model, rank: int, step: int):
    adapter = get_adapter(model.family)
    grids = [(2 + step, 3), (4, 2)] if rank == 0 else [(3, 3 + step), (2, 2), (1, 5)]
    items = adapter.random_items(grids, model.patch_size, torch.Generator().manual_seed(100 * step + rank))
    return adapter.pack(items, model)


def full(parameter):
    from torch.distributed.tensor import DTensor

    return parameter.full_tensor() if isinstance(parameter, DTensor) else parameter.detach()


def run_scenario(ckpt, rank, frozen, empty_rank, mixed, checkpointing):
    """Trains the FSDP2 model; on rank 0 also one process on both ranks' batches. Returns figures (rank 0)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    models = {"fsdp": TinyVLM(ckpt), "single": TinyVLM(ckpt)}
    initial = [p.detach().clone() for p in models["single"].parameters()]
    for vlm in models.values():
        if frozen:
            vlm.tower.requires_grad_(False)
        if checkpointing:
            vlm.tower.model.gradient_checkpointing_enable()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else None
    options = {"mp_policy": policy} if policy else {}
    shard_tower(models["fsdp"].tower, **options)
    fully_shard(models["fsdp"], **options)
    optimizers = {name: torch.optim.SGD([p for p in vlm.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
                  for name, vlm in models.items()}
    compute_dtypes, grad_dtypes = set(), set()
    for step in range(STEPS):
        vlm = models["fsdp"]
        placeholder = rank == empty_rank
        batch = vlm.tower.placeholder_batch() if placeholder else rank_batch(vlm.tower.model, rank, step)
        loss, dtype = vlm(batch, placeholder)
        loss.backward()
        compute_dtypes.add(str(dtype))
        grad_dtypes |= {str(p.grad.dtype) for p in vlm.parameters() if p.grad is not None}
        optimizers["fsdp"].step()
        optimizers["fsdp"].zero_grad()
        if rank == 0:  # FSDP averages gradients over ranks: one process steps on the mean loss
            single = models["single"]
            losses = [single(rank_batch(single.tower.model, r, step))[0] for r in range(WORLD_SIZE) if r != empty_rank]
            (sum(losses) / WORLD_SIZE).backward()
            optimizers["single"].step()
            optimizers["single"].zero_grad()
    trained = [full(p) for p in models["fsdp"].parameters()]  # every rank takes part in the gathers
    if rank != 0:
        return None
    moved = torch.cat([(p - start).flatten() for p, start in zip(trained, initial)])
    expected = torch.cat([(p.detach() - start).flatten() for p, start in zip(models["single"].parameters(), initial)])
    tower_count = len(list(models["single"].tower.parameters()))
    return {
        "max_update": expected.abs().max().item(),
        "max_update_difference": (moved - expected).abs().max().item(),
        "update_cosine": F.cosine_similarity(moved, expected, dim=0).item(),
        "tower_unchanged": all(torch.equal(p, start) for p, start in zip(trained[:tower_count], initial[:tower_count])),
        "parameter_dtypes": sorted({str(p.dtype) for p in models["fsdp"].parameters()}),
        "compute_dtypes": sorted(compute_dtypes),
        "grad_dtypes": sorted(grad_dtypes),
    }


def worker(rank: int, init_file: str, ckpt: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        figures = {name: run_scenario(ckpt, rank, *options) for name, options in SCENARIOS.items()}
        dist.barrier()  # no rank tears gloo down while its peer still has work in flight
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(figures, f)


def test_fsdp2_training_matches_one_process(tmp_path):
    ckpt = get_adapter("llava_vit").write_random_checkpoint(tmp_path / "ckpt", "tiny", seed=5)  # needs no transformers
    out = tmp_path / "figures.json"
    mp.spawn(worker, args=(str(tmp_path / "init"), str(ckpt), str(out)), nprocs=WORLD_SIZE, join=True)
    figures = json.loads(out.read_text())
    for name in ("trainable", "rank_without_images", "frozen_tower"):
        result = figures[name]
        assert result["max_update"] > 1e-3, (name, result)
        assert result["max_update_difference"] <= 1e-5 * max(1.0, result["max_update"]), (name, result)
        assert result["parameter_dtypes"] == result["compute_dtypes"] == result["grad_dtypes"] == ["torch.float32"]
    assert figures["frozen_tower"]["tower_unchanged"]
    assert not figures["trainable"]["tower_unchanged"] and not figures["rank_without_images"]["tower_unchanged"]
    mixed = figures["bf16_policy"]
    assert mixed["parameter_dtypes"] == ["torch.float32"] and mixed["grad_dtypes"] == ["torch.float32"]  # master weights
    assert mixed["compute_dtypes"] == ["torch.bfloat16"]
    assert mixed["update_cosine"] >= 0.99 and mixed["max_update_difference"] <= 0.1 * mixed["max_update"], mixed
