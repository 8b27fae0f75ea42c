"""``packvit embed`` exactly once: interrupted runs (an exception, kill -9) resume without
recomputing finished shards, and end with every input once, as an uninterrupted run does."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from packvit.embed import embed
from test_embed_support import FOLDER_BAD, GOOD, MAX_NUM_PATCHES, random_checkpoint, read_output, write_image_folder

pytest.importorskip("pyarrow")
ROOT = Path(__file__).resolve().parents[1]
# small packs (one image each) and shards of two inputs: many tasks, each finished on its own, so an
# interruption after the first ones leaves most to do (the writer is at most a few packs behind)
RUN = dict(max_num_patches=MAX_NUM_PATCHES, token_budget=MAX_NUM_PATCHES, shard_size=2, dtype="float32", quiet=True)
NUM_SHARDS = -(-(len(GOOD) + len(FOLDER_BAD)) // 2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def uninterrupted(checkpoint, images, tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted")
    embed(checkpoint, images, output, workers=0, **RUN)
    return read_output(output)


def _shard_files(output: Path) -> dict[str, tuple[int, int]]:
    """``{file: (inode, mtime_ns)}`` of the files of every finished shard: one whose metadata, renamed
    last, is there (a killed run can leave a shard with its npy renamed and its metadata not)."""
    files = {}
    for metadata in sorted(output.glob("metadata/metadata_*.parquet")):
        embeddings = output / "img_emb" / metadata.name.replace("metadata", "img_emb").replace(".parquet", ".npy")
        for f in (metadata, embeddings):
            files[str(f.relative_to(output))] = (f.stat().st_ino, f.stat().st_mtime_ns)
    return files


def _assert_same_results(output: Path, uninterrupted) -> None:
    rows, embeddings = read_output(output)
    expected_rows, expected = uninterrupted
    assert [row["image_path"] for row in rows] == [row["image_path"] for row in expected_rows], "every input once, in order"
    assert [row["status"] for row in rows] == [row["status"] for row in expected_rows]
    np.testing.assert_allclose(embeddings, expected, atol=1e-5, rtol=0)
    assert not list(output.rglob(".*.tmp-*")), "no half-written file is left"


class _Stop(Exception):
    pass


def test_interrupted_run_resumes_without_redoing_finished_shards(checkpoint, images, tmp_path, uninterrupted):
    output = tmp_path / "out"

    def stop_after_two(task):
        if task == 1:
            raise _Stop

    with pytest.raises(_Stop):
        embed(checkpoint, images, output, workers=0, on_task_done=stop_after_two, **RUN)
    before = _shard_files(output)
    finished = {name.split("_")[-1].split(".")[0] for name in before if name.startswith("metadata/")}
    assert {"00", "01"} <= finished and len(finished) < NUM_SHARDS, finished
    redone = []
    summary = embed(checkpoint, images, output, workers=0, on_task_done=redone.append, **RUN)
    assert sorted(f"{task:02d}" for task in redone) == sorted({f"{task:02d}" for task in range(NUM_SHARDS)} - finished), \
        "the rerun does exactly the shards that were not finished"
    after = _shard_files(output)
    assert {name: after[name] for name in before} == before, "finished shards are not rewritten (same inode, mtime)"
    assert summary.ok == len(GOOD) and summary.failed == len(FOLDER_BAD) and not summary.missing_shards
    _assert_same_results(output, uninterrupted)
    again = []
    embed(checkpoint, images, output, workers=0, on_task_done=again.append, **RUN)
    assert again == [] and _shard_files(output) == after, "a finished folder is left as it is"


def test_killed_process_resumes_to_the_same_result(checkpoint, images, tmp_path, uninterrupted):
    output = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal
        from packvit.embed import embed

        def kill_after_three(task):
            if task == 2:
                os.kill(os.getpid(), signal.SIGKILL)

        embed({str(checkpoint)!r}, {str(images)!r}, {str(output)!r}, workers=1, on_task_done=kill_after_three, **{RUN!r})
    """)
    killed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    before = _shard_files(output)
    assert 3 <= len(before) // 2 < NUM_SHARDS
    command = [sys.executable, "-m", "packvit.embed", "--model", str(checkpoint), "--input", str(images), "--output",
               str(output), "--workers", "1", "--quiet"] + [f"--{key}={value}" for key, value in RUN.items() if key != "quiet"]
    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(GOOD)} ok, {len(FOLDER_BAD)} failed" in resumed.stderr
    after = _shard_files(output)
    assert {name: after[name] for name in before} == before
    _assert_same_results(output, uninterrupted)
