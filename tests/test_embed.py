"""``packvit embed`` on the CPU: inputs, outputs, failures, tokens, settings checks."""

from __future__ import annotations

import csv
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import packvit
from packvit.embed import embed
from packvit.embed.cli import main as embed_main
from packvit.embed.dataset import make_loader
from packvit.embed.decode import DecodeOptions
from packvit.embed.model import Encoder
from packvit.embed.preprocess import ProcessorSpec
from packvit.embed.sources import expand_braces, list_folder, plan_inputs
from test_embed_support import BAD, FOLDER_BAD, GOOD, MAX_NUM_PATCHES, embed_alone, random_checkpoint, read_output, write_image_folder

pytest.importorskip("pyarrow")
TOLERANCE = 1e-5
RUN = dict(max_num_patches=MAX_NUM_PATCHES, dtype="float32", normalize=False, workers=0, quiet=True)



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def model(checkpoint):
    return packvit.from_pretrained(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def folder_run(checkpoint, images, tmp_path_factory):
    output = tmp_path_factory.mktemp("folder_run")
    summary = embed(checkpoint, images, output, shard_size=6, **RUN)
    return output, summary


def _by_name(rows, embeddings, images: Path):
    """``{input name: (row, embedding)}``: a file's path relative to ``images``, a tar member's name."""
    table = {}
    for row, embedding in zip(rows, embeddings):
        if row["key"] is not None:
            name = row["key"] + "".join(Path(row["image_path"]).suffixes[-1:]) if row["status"] != "no_image" else row["key"]
        else:
            name = str(Path(row["image_path"]).relative_to(images))
        table[name] = (row, embedding)
    return table


def _write_clip(path: Path, num_frames: int = 9) -> list:
    """An mpeg4 clip of ``num_frames`` 64 x 48 frames; returns its frames as PyAV decodes them."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(num_frames):
            frame = np.full((48, 64, 3), 20 * i, dtype=np.uint8) + np.arange(64, dtype=np.uint8)[None, :, None]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        return [frame.to_image() for frame in container.decode(video=0)]


def test_folder_one_row_per_input_and_embeddings_equal_the_model_alone(folder_run, images, checkpoint, model):
    output, summary = folder_run
    rows, embeddings = read_output(output)
    table = _by_name(rows, embeddings, images)
    assert sorted(table) == sorted(GOOD + tuple(FOLDER_BAD)), "every input, and nothing else, has exactly one row"
    assert [row["source_index"] for row in rows] == list(range(len(rows)))
    assert [row["image_path"] for row in rows] == list_folder(images).inputs
    for name, status in FOLDER_BAD.items():
        row, embedding = table[name]
        assert row["status"] == status, (name, row)
        assert row["error"], name
        assert not embedding.any(), "a failed row keeps the npy aligned with a zero vector"
    for name in GOOD:
        row, embedding = table[name]
        assert row["status"] == "ok" and row["error"] is None, (name, row)
        output_alone, batch = embed_alone(model, checkpoint, images / name)
        assert (row["t"], row["h"], row["w"]) == tuple(batch.grid_thw[0].tolist()), name
        np.testing.assert_allclose(embedding, output_alone.pooler_output[0].numpy(), atol=TOLERANCE, rtol=0)
    exif = table["exif_rotated.jpg"][0]
    assert exif["h"] > exif["w"], "EXIF orientation applied: 150 x 60 stored, shown 60 wide"
    assert summary.ok == len(GOOD) and summary.failed == len(FOLDER_BAD)
    assert summary.by_status["decode_error"] == 2 and summary.missing_shards == []
    assert summary.skipped == {".heic": 1}, "a file that is not an image or video is not an input of a folder"


def test_workers_send_uint8_that_the_main_process_normalises_as_the_processor_does(checkpoint, model, images):
    spec = ProcessorSpec(str(checkpoint), "siglip2", True, MAX_NUM_PATCHES)
    processor = spec.build()
    encoder = Encoder(model, processor)
    packs = list(make_loader(plan_inputs(images).tasks, spec, 4 * MAX_NUM_PATCHES, DecodeOptions(), workers=0,
                             device=torch.device("cpu")))
    assert len(packs) > 2 and sum(pack.num_items for pack in packs) == len(GOOD)
    for pack in packs:
        files = [result.rows[0].image_path for result in pack.inputs if result.ok_rows]  # the pack's items, in order
        if not files:
            assert pack.pixels is None and encoder.pack_batch(pack) is None
            continue
        assert pack.pixels.pixels.dtype == torch.uint8 and pack.jpegs is None
        expected = processor(images=files)  # what the workers sent before: normalised float32 patches
        batch = encoder.pack_batch(pack)
        assert torch.equal(batch.patches, expected.patches) and torch.equal(batch.grid_thw, expected.grid_thw)
        cast = processor.normalize(pack.pixels, dtype=torch.bfloat16)
        assert torch.equal(cast.patches, expected.patches.to(torch.bfloat16)), "the model's dtype: float32's values cast"


def test_summary_manifest_and_failures_file(folder_run, images):
    import pyarrow.parquet as parquet

    output, summary = folder_run
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["settings"]["model"]["family"] == "siglip2"
    assert manifest["settings"]["processor"]["max_num_patches"] == MAX_NUM_PATCHES
    assert set(manifest["runs"][0]["versions"]) == {"packvit", "torch", "transformers", "python"}
    assert manifest["shards"]["done"] == [f"{i}" for i in range(4)], "21 inputs in shards of 6: 0..3"
    assert manifest["summary"]["failed"] == len(FOLDER_BAD) and manifest["summary"]["skipped"] == {".heic": 1}
    failures = parquet.read_table(output / "failures.parquet").to_pylist()
    assert sorted(Path(row["image_path"]).name for row in failures) == sorted(Path(name).name for name in FOLDER_BAD)
    assert "failed items are listed in" in "\n".join(summary.lines())
    assert "not read: 1 files of the input folder that are not images or videos (.heic 1)" in "\n".join(summary.lines())


def test_file_lists_and_tar_shards_give_the_folders_results(folder_run, images, checkpoint, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as parquet

    reference = _by_name(*read_output(folder_run[0]), images)
    names = [name for name in list(GOOD) + list(BAD) if name != "dangling.jpg"]
    # a .txt list's relative paths are relative to the list's folder
    (images.parent / "list.txt").write_text("\n".join([""] + [f"{images.name}/{name}" for name in names]) + "\n\n")
    with open(tmp_path / "list.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["caption", "path"])
        writer.writerows([["a caption", str(images / name)] for name in names])
    parquet.write_table(pa.table({"image_path": [str(images / name) for name in names]}), tmp_path / "list.parquet")
    for index, part in enumerate((names[:9], names[9:])):
        with tarfile.open(tmp_path / f"shard-{index:02d}.tar", "w") as archive:
            for name in part:
                archive.add(images / name, arcname=name)
    runs = {"txt": images.parent / "list.txt", "csv": tmp_path / "list.csv", "parquet": tmp_path / "list.parquet",
            "tar": str(tmp_path / "shard-{00..01}.tar")}
    for kind, source in runs.items():
        output = _run(checkpoint, source, tmp_path / f"out-{kind}", shard_size=5)
        table = _by_name(*read_output(output), images)
        assert sorted(table) == sorted(name.removesuffix(".heic") if kind == "tar" else name for name in names), kind
        for name in names:
            if name == "photo.heic":
                if kind == "tar":
                    assert table["photo"][0]["status"] == "no_image", "a tar sample whose only member is not an image"
                else:
                    row, embedding = table[name]
                    assert row["status"] == "unsupported" and not embedding.any(), "a list keeps a row per entry"
                continue
            expected_row, expected = reference[name]
            row, embedding = table[name]
            assert row["status"] == expected_row["status"], (kind, name)
            assert (row["t"], row["h"], row["w"]) == (expected_row["t"], expected_row["h"], expected_row["w"])
            np.testing.assert_allclose(embedding, expected, atol=TOLERANCE, rtol=0, err_msg=f"{kind} {name}")
        shards = len(list((output / "metadata").glob("*.parquet")))
        assert shards == (2 if kind == "tar" else -(-len(names) // 5)), "a tar is one shard; lists are cut every 5"


def _run(checkpoint, source, output, **options) -> Path:
    summary = embed(checkpoint, source, output, **{**RUN, **options})
    assert not summary.missing_shards
    return output


def test_save_tokens_round_trip_to_the_models_tokens(checkpoint, model, images, tmp_path):
    from safetensors import safe_open

    for layers, names in (((), ["last_hidden_state"]), ((-1, -2, 0), ["hidden_states.-1", "hidden_states.-2", "hidden_states.0"])):
        output = _run(checkpoint, images, tmp_path / f"tokens{len(layers)}", shard_size=8, save_tokens=True,
                      layers=layers)
        rows, _ = read_output(output)
        checked = 0
        for shard in sorted({row["shard"] for row in rows}):
            shard_rows = [row for row in rows if row["shard"] == shard]
            with safe_open(str(output / "tokens" / f"tokens_{shard}.safetensors"), framework="pt") as handle:
                assert sorted(handle.keys()) == sorted(["offsets", "grid_thw", *names])
                offsets, grid = handle.get_tensor("offsets"), handle.get_tensor("grid_thw")
                assert offsets.shape == (len(shard_rows) + 1,)
                tensors = {name: handle.get_tensor(name) for name in names}
            for index, row in enumerate(shard_rows):
                start, stop = offsets[index].item(), offsets[index + 1].item()
                assert grid[index].tolist() == [row["t"], row["h"], row["w"]]
                if row["status"] != "ok":
                    assert start == stop
                    continue
                forward = {"hidden_layers": list(layers)} if layers else {}
                alone, _ = embed_alone(model, checkpoint, row["image_path"], **forward)
                expected = [alone.last_hidden_state] if not layers else list(alone.hidden_states)
                for name, value in zip(names, expected):
                    torch.testing.assert_close(tensors[name][start:stop], value, atol=TOLERANCE, rtol=0)
                checked += 1
        assert checked == len(GOOD)


def test_rerun_with_other_settings_is_refused_unless_overwrite(checkpoint, images, tmp_path, capsys):
    output = _run(checkpoint, images, tmp_path / "out", shard_size=8)
    manifest = (output / "manifest.json").read_text()
    with pytest.raises(ValueError, match=r"other settings \(processor.max_num_patches: 48 → 32\).*--overwrite"):
        embed(checkpoint, images, output, **{**RUN, "max_num_patches": 32}, shard_size=8)
    assert (output / "manifest.json").read_text() == manifest, "a refused run leaves the folder as it was"
    code = embed_main(["--model", str(checkpoint), "--input", str(images), "--output", str(output), "--workers", "0",
                       "--max_num_patches", "48", "--dtype", "float16", "--shard_size", "8", "--quiet"])
    assert code == 2 and "output.dtype: 'float32' → 'float16'" in capsys.readouterr().err
    summary = embed(checkpoint, images, output, **{**RUN, "max_num_patches": 32}, shard_size=8, overwrite=True)
    assert summary.ok == len(GOOD)
    assert json.loads((output / "manifest.json").read_text())["settings"]["processor"]["max_num_patches"] == 32
    rows, _ = read_output(output)
    assert max(row["h"] * row["w"] for row in rows) <= 32


def test_changed_input_is_refused(checkpoint, images, tmp_path):
    source = tmp_path / "few"
    source.mkdir()
    for name in GOOD[:3]:
        (source / name).write_bytes((images / name).read_bytes())
    output = _run(checkpoint, source, tmp_path / "out")
    (source / "added.jpg").write_bytes((images / "astronaut.jpg").read_bytes())
    with pytest.raises(ValueError, match=r"input.fingerprint.*input.num_inputs: 3 → 4"):
        embed(checkpoint, source, output, **RUN)


def test_video_frames_are_items_for_an_image_family(checkpoint, model, tmp_path):
    source = tmp_path / "videos"
    source.mkdir()
    decoded = _write_clip(source / "clip.mp4")
    output = _run(checkpoint, source, tmp_path / "out", num_frames=4)
    rows, embeddings = read_output(output)
    assert [row["frame"] for row in rows] == [0, 3, 5, 8], "4 frames spread over the 9 of the clip"
    assert all(row["status"] == "ok" and row["source_index"] == 0 for row in rows)
    for row, embedding in zip(rows, embeddings):
        alone, _ = embed_alone(model, checkpoint, decoded[row["frame"]])
        np.testing.assert_allclose(embedding, alone.pooler_output[0].numpy(), atol=TOLERANCE, rtol=0)
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["settings"]["processor"]["videos"] == "frames as items"


def test_video_is_one_clip_on_the_timeline_for_onevision(tmp_path):
    checkpoint = random_checkpoint(tmp_path / "checkpoint", family="llava_vit")
    source = tmp_path / "videos"
    source.mkdir()
    decoded = _write_clip(source / "clip.mp4")
    (source / "still.png").write_bytes(b"")  # a failed image beside the clip
    output = _run(checkpoint, source, tmp_path / "out", num_frames=4)
    rows, embeddings = read_output(output)
    clip = next(row for row in rows if row["image_path"].endswith("clip.mp4"))
    assert len(rows) == 2 and clip["status"] == "ok" and clip["frame"] is None
    assert (clip["t"], clip["h"], clip["w"]) == (4, 16, 16), "4 frames at 224 px, 16 x 16 patches of 14"
    model = packvit.from_pretrained(checkpoint, device="cpu")
    with torch.inference_mode():
        alone = model(packvit.load_processor(str(checkpoint))(videos=[[decoded[i] for i in (0, 3, 5, 8)]]))
    np.testing.assert_allclose(embeddings[rows.index(clip)], alone.pooler_output[0].numpy(), atol=TOLERANCE, rtol=0)
    assert json.loads((output / "manifest.json").read_text())["settings"]["processor"]["videos"] == "clips"


def test_video_without_pyav_names_the_extra(checkpoint, tmp_path, monkeypatch):
    source = tmp_path / "videos"
    source.mkdir()
    (source / "clip.mp4").write_bytes(b"\0" * 64)
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r"pip install 'packvit\[video\]'"):
        embed(checkpoint, source, tmp_path / "out", **RUN)


def test_brace_patterns_and_folder_order(tmp_path):
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for name in ("b/z.jpg", "a.jpg", "b/a.jpg", "B.jpg", ".git/x.jpg", ".DS_Store"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [Path(p).relative_to(tmp_path).as_posix() for p in list_folder(tmp_path).inputs] == ["B.jpg", "a.jpg", "b/a.jpg",
                                                                                                 "b/z.jpg"]
    plan = plan_inputs(tmp_path, shard_size=3)
    assert [len(task.paths) for task in plan.tasks] == [3, 1] and plan.num_inputs == 4


def test_input_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        plan_inputs(tmp_path / "missing")
    (tmp_path / "list.csv").write_text("caption,url\nx,y\n")
    with pytest.raises(ValueError, match=r"none of the path columns.*--path_column"):
        plan_inputs(tmp_path / "list.csv")
    with pytest.raises(ValueError, match="matches no file"):
        plan_inputs(str(tmp_path / "shards-*.tar"))
    with pytest.raises(ValueError, match="one folder or one list file"):
        plan_inputs([tmp_path, tmp_path / "list.csv"])


def test_normalize_gives_unit_rows_in_the_same_direction(folder_run, checkpoint, images, tmp_path):
    rows, embeddings = read_output(_run(checkpoint, images, tmp_path / "out", normalize=True))
    _, plain = read_output(folder_run[0])
    ok = np.array([row["status"] == "ok" for row in rows])
    np.testing.assert_allclose(np.linalg.norm(embeddings[ok], axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(embeddings[ok], plain[ok] / np.linalg.norm(plain[ok], axis=-1, keepdims=True), atol=1e-6)
    assert not embeddings[~ok].any()


def test_settings_a_run_cannot_take_are_refused_before_the_output_is_touched(checkpoint, images, tmp_path):
    with pytest.raises(ValueError, match=r"--layers 3 is out of range: .* has 3 hidden states"):
        embed(checkpoint, images, tmp_path / "out", save_tokens=True, layers=(-1, 3), **RUN)
    with pytest.raises(ValueError, match="--layers chooses which hidden states --save_tokens writes"):
        embed(checkpoint, images, tmp_path / "out", layers=(-1,), **RUN)
    with pytest.raises(ValueError, match="--token_budget must be at least 1"):
        embed(checkpoint, images, tmp_path / "out", **{**RUN, "token_budget": 0})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        embed(checkpoint, tmp_path / "empty", tmp_path / "out", **RUN)
    assert not (tmp_path / "out").exists()


def test_processor_settings_a_family_refuses_are_refused_before_the_output_is_touched(images, tmp_path):
    checkpoint = random_checkpoint(tmp_path / "checkpoint", family="dinov3")
    with pytest.raises(ValueError, match=r"the dinov3 processor of .* refuses these settings \(max_num_patches=64"):
        embed(checkpoint, images, tmp_path / "out", **{**RUN, "max_num_patches": 64}, fixed=True)
    assert not (tmp_path / "out").exists()


def test_folders_read_only_media_and_carry_captions_and_json_as_clip_retrieval_does(checkpoint, model, images, tmp_path):
    import pyarrow.parquet as parquet

    source = tmp_path / "dataset"
    (source / "part").mkdir(parents=True)
    for name in ("astronaut.jpg", "wide.png", "tall.webp"):
        (source / "part" / name).write_bytes((images / name).read_bytes())
    (source / "part" / "astronaut.txt").write_text("an astronaut, é\n")
    (source / "part" / "astronaut.json").write_text('{"url": "https://example.com/a.jpg", "width": 512}')
    (source / "part" / "wide.txt").write_text("a wide cat")
    (source / "README.md").write_text("about this folder")
    (source / "part" / "stats.parquet").write_bytes(b"PAR1")
    summary = embed(checkpoint, source, tmp_path / "out", **RUN)
    rows, embeddings = read_output(tmp_path / "out")
    by_name = {Path(row["image_path"]).name: (row, embedding) for row, embedding in zip(rows, embeddings)}
    assert sorted(by_name) == ["astronaut.jpg", "tall.webp", "wide.png"], "sidecars and other files are not inputs"
    assert all(row["status"] == "ok" for row, _ in by_name.values())
    assert by_name["astronaut.jpg"][0]["caption"] == "an astronaut, é\n"
    assert json.loads(by_name["astronaut.jpg"][0]["json"]) == {"url": "https://example.com/a.jpg", "width": 512}
    assert (by_name["wide.png"][0]["caption"], by_name["wide.png"][0]["json"]) == ("a wide cat", None)
    assert (by_name["tall.webp"][0]["caption"], by_name["tall.webp"][0]["json"]) == (None, None)
    alone, _ = embed_alone(model, checkpoint, images / "astronaut.jpg")
    np.testing.assert_allclose(by_name["astronaut.jpg"][1], alone.pooler_output[0].numpy(), atol=TOLERANCE, rtol=0)
    assert summary.skipped == {".json": 1, ".md": 1, ".parquet": 1, ".txt": 2}
    assert parquet.read_schema(tmp_path / "out" / "metadata" / "metadata_0.parquet").names[:3] == ["image_path", "caption",
                                                                                                   "json"]
    with tarfile.open(tmp_path / "shard.tar", "w") as archive:
        for member in ("astronaut.jpg", "astronaut.txt", "astronaut.json", "wide.png"):
            archive.add(source / "part" / member, arcname=f"{Path(member).stem}{Path(member).suffix}")
    embed(checkpoint, tmp_path / "shard.tar", tmp_path / "out-tar", **RUN)
    tar_rows, tar_embeddings = read_output(tmp_path / "out-tar")
    assert [(row["key"], row["caption"], row["json"] is not None) for row in tar_rows] == [
        ("astronaut", "an astronaut, é\n", True), ("wide", None, False)]
    np.testing.assert_allclose(tar_embeddings[0], by_name["astronaut.jpg"][1], atol=TOLERANCE, rtol=0)
    listed = tmp_path / "list.txt"
    listed.write_text("dataset/part/astronaut.jpg\ndataset/part/astronaut.txt\n")
    embed(checkpoint, listed, tmp_path / "out-list", **RUN)
    list_rows, _ = read_output(tmp_path / "out-list")
    assert [(Path(row["image_path"]).name, row["status"], row["caption"]) for row in list_rows] == [
        ("astronaut.jpg", "ok", "an astronaut, é\n"), ("astronaut.txt", "unsupported", None)], "a list keeps every entry"


def test_an_output_folder_inside_the_input_folder_is_never_read(checkpoint, images, tmp_path):
    source = tmp_path / "photos"
    source.mkdir()
    for name in GOOD[:3]:
        (source / name).write_bytes((images / name).read_bytes())
    output = source / "embeddings"
    first = embed(checkpoint, source, output, **RUN, save_tokens=True)
    again = embed(checkpoint, source, output, **RUN, save_tokens=True)
    rows, _ = read_output(output)
    assert [Path(row["image_path"]).name for row in rows] == sorted(GOOD[:3])
    assert first.ok == again.ok == 3 and again.skipped == {} and not again.missing_shards
