"""``torchrun --nproc_per_node 2 -m packvit.embed`` on the CPU (gloo): the same rows and
embeddings as one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from packvit.embed import embed
from test_embed_support import FOLDER_BAD, GOOD, MAX_NUM_PATCHES, random_checkpoint, read_output, write_image_folder

pytest.importorskip("pyarrow")
ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_write_what_one_process_writes(tmp_path):
    checkpoint = random_checkpoint(tmp_path / "checkpoint")
    images = write_image_folder(tmp_path / "images")
    options = dict(max_num_patches=MAX_NUM_PATCHES, shard_size=4, dtype="float32", workers=0, quiet=True)
    embed(checkpoint, images, tmp_path / "one", **options)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "packvit.embed", "--model", str(checkpoint), "--input", str(images), "--output", str(tmp_path / "two")]
    command += [f"--{key}={value}" for key, value in options.items() if key != "quiet"] + ["--quiet"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[rank 1/2] shard" in result.stderr and "[rank 0/2] shard" in result.stderr, "both ranks wrote shards"
    assert result.stderr.count(f"{len(GOOD)} ok, {len(FOLDER_BAD)} failed") == 1, "rank 0 alone prints the summary"
    one_rows, one = read_output(tmp_path / "one")
    two_rows, two = read_output(tmp_path / "two")
    assert two_rows == one_rows
    np.testing.assert_allclose(two, one, atol=1e-5, rtol=0)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["runs"][-1]["world_size"] == 2 and len(manifest["shards"]["done"]) == -(-len(one_rows) // 4)
