"""``packvit embed`` on CUDA: the side-stream copies in, the pinned non-blocking copies out and the
writer thread's wait on their event give the rows and embeddings of the CPU run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from packvit.embed import embed
from test_embed_support import FOLDER_BAD, GOOD, MAX_NUM_PATCHES, random_checkpoint, read_output, write_image_folder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
pytest.importorskip("pyarrow")
RUN = dict(max_num_patches=MAX_NUM_PATCHES, token_budget=4 * MAX_NUM_PATCHES, shard_size=5, dtype="float32", quiet=True,
           save_tokens=True, layers=(-1, 0))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_cuda_run_writes_what_the_cpu_run_writes(tmp_path, workers):
    checkpoint = random_checkpoint(tmp_path / "checkpoint")
    images = write_image_folder(tmp_path / "images")
    embed(checkpoint, images, tmp_path / "cpu", device="cpu", workers=0, **RUN)
    summary = embed(checkpoint, images, tmp_path / "cuda", device="cuda", model_dtype="float32", workers=workers, **RUN)
    assert summary.stats.workers == workers and summary.ok == len(GOOD) and summary.failed == len(FOLDER_BAD)
    cpu_rows, cpu = read_output(tmp_path / "cpu")
    cuda_rows, cuda = read_output(tmp_path / "cuda")
    assert cuda_rows == cpu_rows
    ok = np.array([row["status"] == "ok" for row in cpu_rows])
    assert _cosine(cuda[ok], cpu[ok]).min() > 0.9999 and not cuda[~ok].any()
    for shard in sorted({row["shard"] for row in cpu_rows}):
        on_cpu = load_file(str(tmp_path / "cpu" / "tokens" / f"tokens_{shard}.safetensors"))
        on_cuda = load_file(str(tmp_path / "cuda" / "tokens" / f"tokens_{shard}.safetensors"))
        assert sorted(on_cuda) == sorted(on_cpu)
        np.testing.assert_array_equal(on_cuda["offsets"], on_cpu["offsets"])
        for name in ("hidden_states.-1", "hidden_states.0"):
            assert _cosine(on_cuda[name], on_cpu[name]).min() > 0.999, (shard, name)


def test_the_default_cuda_run_in_bfloat16_keeps_the_rows_and_directions(tmp_path):
    checkpoint = random_checkpoint(tmp_path / "checkpoint")
    images = write_image_folder(tmp_path / "images")
    embed(checkpoint, images, tmp_path / "cpu", device="cpu", workers=0, max_num_patches=MAX_NUM_PATCHES, quiet=True)
    embed(checkpoint, images, tmp_path / "cuda", max_num_patches=MAX_NUM_PATCHES, quiet=True)
    cpu_rows, cpu = read_output(tmp_path / "cpu")
    cuda_rows, cuda = read_output(tmp_path / "cuda")
    assert cuda_rows == cpu_rows and cuda.dtype == np.float16
    ok = np.array([row["status"] == "ok" for row in cpu_rows])
    np.testing.assert_allclose(np.linalg.norm(cuda[ok].astype(np.float32), axis=-1), 1.0, atol=2e-3)
    assert _cosine(cuda[ok].astype(np.float32), cpu[ok].astype(np.float32)).min() > 0.99
