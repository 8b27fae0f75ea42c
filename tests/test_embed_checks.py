"""``packvit embed`` takes no wrong data: resume checks what decides the outputs, a run that cannot
start leaves nothing behind, and bad flags are ``packvit embed: error: ...`` with exit status 2."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from packvit.embed import embed
from packvit.embed.cli import main as embed_main
from test_embed_support import GOOD, random_checkpoint, read_output, write_image_folder

pytest.importorskip("pyarrow")
RUN = dict(max_num_patches=16, dtype="float32", workers=0, quiet=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three good images."""
    every = write_image_folder(tmp_path_factory.mktemp("every"), with_bad=False)
    few = tmp_path_factory.mktemp("images")
    for name in GOOD[:3]:
        shutil.copy(every / name, few / name)
    return few


def _cli(checkpoint, images, output, *flags) -> list[str]:
    return ["--model", str(checkpoint), "--input", str(images), "--output", str(output), "--workers", "0", "--quiet",
            "--max_num_patches", "16", *flags]


def test_manifest_records_the_resolved_processor_and_a_hash_of_every_deciding_file(checkpoint, images, tmp_path):
    embed(checkpoint, images, tmp_path / "out", **{**RUN, "max_num_patches": None})
    settings = json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]
    assert settings["processor"]["max_num_patches"] == 256, "the cap the processor applies, not the None asked for"
    assert settings["processor"]["class"] == "Siglip2Processor" and settings["processor"]["native"] is True
    assert set(settings["model"]["files_sha256"]) == {"config.json", "model.safetensors"}
    assert all(len(digest) == 64 for digest in settings["model"]["files_sha256"].values())


def test_a_changed_preprocessor_config_is_refused_with_the_differences(checkpoint, images, tmp_path):
    copy = Path(shutil.copytree(checkpoint, tmp_path / "checkpoint"))
    processor_file = copy / "preprocessor_config.json"
    processor_file.write_text(json.dumps({"image_processor_type": "Siglip2ImageProcessor", "max_num_patches": 16}))
    output = tmp_path / "out"
    embed(copy, images, output, **{**RUN, "max_num_patches": None})
    rows, _ = read_output(output)
    assert max(row["h"] * row["w"] for row in rows) <= 16
    processor_file.write_text(json.dumps({"image_processor_type": "Siglip2ImageProcessor", "max_num_patches": 8}))
    with pytest.raises(ValueError, match=r"other settings \(.*model\.files_sha256\.preprocessor_config\.json: '[0-9a-f]{64}' → "
                                         r"'[0-9a-f]{64}'; processor\.max_num_patches: 16 → 8\).*--overwrite"):
        embed(copy, images, output, **{**RUN, "max_num_patches": None})


def test_weights_changed_in_place_with_the_same_size_and_time_are_refused(checkpoint, images, tmp_path):
    copy = Path(shutil.copytree(checkpoint, tmp_path / "checkpoint"))
    output = tmp_path / "out"
    embed(copy, images, output, **RUN)
    weights = copy / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    with pytest.raises(ValueError, match=r"model\.files_sha256\.model\.safetensors"):
        embed(copy, images, output, **RUN)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_a_device_torch_cannot_use_is_refused_before_anything_is_written(checkpoint, images, tmp_path, capsys):
    for device, message in (("cuda", "--device cuda: this torch .* sees no CUDA device"),
                            ("tpu", "--device 'tpu' is not a device torch knows")):
        assert embed_main(_cli(checkpoint, images, tmp_path / "out", "--device", device)) == 2
        error = capsys.readouterr().err
        assert error.startswith("packvit embed: error: ") and "Traceback" not in error
        assert pytest.importorskip("re").search(message, error), error
        assert not (tmp_path / "out").exists()
    summary = embed(checkpoint, images, tmp_path / "out", **RUN)
    assert summary.ok == 3


def test_a_forced_attention_backend_that_cannot_run_is_refused_before_anything_is_written(checkpoint, images, tmp_path,
                                                                                          capsys, monkeypatch):
    monkeypatch.setenv("PACKVIT_ATTENTION", "fa3")
    assert embed_main(_cli(checkpoint, images, tmp_path / "out")) == 2
    assert "packvit embed: error: the model cannot run as asked on cpu in float32" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_folder_whose_run_finished_no_shard_never_blocks_a_rerun(checkpoint, images, tmp_path, monkeypatch):
    import packvit.embed.run as run_module

    def fail(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    output = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(run_module, "load_encoder", fail)
        with pytest.raises(RuntimeError, match="out of memory"):
            embed(checkpoint, images, output, **{**RUN, "dtype": "float16"})
    assert json.loads((output / "manifest.json").read_text())["settings"]["output"]["dtype"] == "float16"
    summary = embed(checkpoint, images, output, **RUN)
    assert summary.ok == 3 and not summary.missing_shards
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["settings"]["output"]["dtype"] == "float32" and len(manifest["runs"]) == 1
    with pytest.raises(ValueError, match=r"other settings \(output\.dtype: 'float32' → 'float16'\)"):
        embed(checkpoint, images, output, **{**RUN, "dtype": "float16"})


def test_a_folder_of_another_manifest_format_is_refused_once_it_has_a_finished_shard(checkpoint, images, tmp_path):
    output = tmp_path / "out"
    embed(checkpoint, images, output, **RUN)
    manifest = json.loads((output / "manifest.json").read_text())
    (output / "manifest.json").write_text(json.dumps({**manifest, "format": "packvit-embed/1"}))
    with pytest.raises(ValueError, match=r"manifest format 'packvit-embed/1'.*--overwrite"):
        embed(checkpoint, images, output, **RUN)


def test_an_output_that_cannot_be_written_is_a_usage_error_before_any_work(checkpoint, images, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for output, message in ((a_file, "is a file"), (tmp_path / "missing" / "out", "its parent .* does not exist"),
                            (a_file / "out", "its parent .* is a file")):
        assert embed_main(_cli(checkpoint, images, output)) == 2, output
        error = capsys.readouterr().err
        assert error.startswith(f"packvit embed: error: --output {output}") and "Traceback" not in error
        assert pytest.importorskip("re").search(message, error), error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_output_without_write_permission_is_a_usage_error(checkpoint, images, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        assert embed_main(_cli(checkpoint, images, locked / "out")) == 2
        assert "is not writable by this user" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


def test_layers_parse_as_the_help_writes_them(checkpoint, images, tmp_path):
    from safetensors import safe_open

    from packvit.cli import main as packvit_main

    for main, output in ((embed_main, tmp_path / "a"), (packvit_main, tmp_path / "b")):
        prefix = [] if main is embed_main else ["embed"]
        assert main(prefix + _cli(checkpoint, images, output, "--save_tokens", "--layers", "-1,-2")) == 0
        with safe_open(str(output / "tokens" / "tokens_0.safetensors"), framework="np") as handle:
            assert {"hidden_states.-1", "hidden_states.-2"} <= set(handle.keys())


def test_help_shows_every_default(capsys):
    import argparse

    from packvit.embed.cli import add_arguments

    parser = argparse.ArgumentParser(prog="packvit embed")
    add_arguments(parser)
    for action in parser._actions:
        if action.dest != "help":
            assert action.required or "default" in (action.help or ""), action.option_strings


def test_embeddings_are_l2_normalised_by_default(checkpoint, images, tmp_path):
    default = embed(checkpoint, images, tmp_path / "default", **RUN)
    _, normalised = read_output(tmp_path / "default")
    np.testing.assert_allclose(np.linalg.norm(normalised, axis=-1), 1.0, atol=1e-6)
    embed(checkpoint, images, tmp_path / "raw", **RUN, normalize=False)
    _, raw = read_output(tmp_path / "raw")
    np.testing.assert_allclose(normalised, raw / np.linalg.norm(raw, axis=-1, keepdims=True), atol=1e-6)
    assert default.ok == 3
    for output, flag, normalize in ((tmp_path / "cli-raw", "--no-normalize", False), (tmp_path / "cli", "--normalize", True)):
        assert embed_main(_cli(checkpoint, images, output, flag)) == 0
        assert json.loads((output / "manifest.json").read_text())["settings"]["output"]["normalize"] is normalize


def test_the_progress_counts_each_input_as_the_workers_finish_it(checkpoint, images):
    from packvit.embed.dataset import EmbedDataset, InputCounter
    from packvit.embed.preprocess import ProcessorSpec
    from packvit.embed.sources import plan_inputs, task_chunks

    plan = plan_inputs(images)
    counter = InputCounter()
    dataset = EmbedDataset(plan.tasks, task_chunks(plan.tasks), ProcessorSpec(str(checkpoint), "siglip2", True, 16),
                           token_budget=10_000, counter=counter)
    seen = []
    for pack in dataset:  # one pack of all three inputs: the count is there before the pack
        seen.append((pack.num_inputs, counter.value))
    assert seen == [(3, 3)]
    from packvit.embed.run import _Progress, _Ranks

    progress = _Progress(plan.tasks, _Ranks(), quiet=False, counter=counter)
    try:
        progress.refresh()
        assert (progress.bar.n, progress.bar.total, progress.inputs) == (3, 3, 0), "the bar moved before any pack was embedded"
    finally:
        progress.close()


def test_the_default_workers_leave_the_cpu_to_the_forward_and_feed_a_gpu_with_every_spare_core(monkeypatch):
    from packvit.embed.options import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_workers("cpu") == 0 and default_workers(torch.device("cpu"), 8) == 0
    assert default_workers("cuda") == 15 and default_workers("cuda:1", 8) == 1 and default_workers("cuda", 32) == 1
