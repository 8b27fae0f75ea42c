import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from packvit import cli
from packvit.attention import BACKENDS

ROOT = Path(__file__).resolve().parents[1]


def test_info_lists_every_backend_with_a_reason(capsys):
    assert cli.main(["info", "--head_dim", "72"]) == 0
    text = capsys.readouterr().out
    assert "torch " in text and "transformers" in text
    for name in BACKENDS:
        assert re.search(rf"^  {name}\s+(usable|no: .+)$", text, re.M), name
    assert re.search(r"^  reference\s+usable$", text, re.M)
    assert re.search(r"^compiled layers by default.*: (yes|no \(.+\))$", text, re.M)


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    test_command = next(block for block in blocks if block.endswith("python -m pytest -q"))
    assert test_command in ci_lines, "the README's test command and .ci/run differ"
    assert any(block.endswith("packvit align") and "[align]" in block for block in blocks), "the README's main job is `packvit align`"


@pytest.mark.parametrize("argv, message", [
    (["align", "--batch_size", "0"], "--batch_size: must be at least 1, got 0"),
    (["align", "--image_size", "0"], "--image_size: must be at least 1, got 0"),
    (["bench", "--smoke", "--repeats", "0"], "--repeats: must be at least 1, got 0"),
    (["bench", "--smoke", "--items", "0"], "--items: must be at least 1, got 0"),
    (["info", "--head_dim", "-8"], "--head_dim: must be at least 1, got -8"),
    (["bench", "--smoke", "--token_budget", "0"], "--token_budget: must be at least 1, got 0"),
])
def test_bad_numbers_are_refused_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_missing_checkpoint_is_an_error_line(tmp_path, capsys):
    assert cli.main(["align", "llava_vit", "--ckpt", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("packvit align: error: checkpoint") and "does not exist" in err and "Traceback" not in err


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "packvit", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.startswith("packvit ")


def test_bench_refuses_cpu_without_smoke(capsys, no_work):
    if __import__("torch").cuda.is_available():
        pytest.skip("has a GPU")
    assert re.search("needs a CUDA GPU.*--smoke", _refused(["bench", "--models", "siglip2"], capsys))


def test_image_size_smaller_than_a_patch(capsys):
    assert cli.main(["align", "llava_vit", "--image_size", "10"]) == 2
    assert "--image_size 10 is smaller than one 14-pixel patch of llava_vit" in capsys.readouterr().err


def test_align_without_transformers_names_the_install():
    code = "import sys; sys.modules['transformers'] = None; from packvit import cli; sys.exit(cli.main(['align', 'siglip2']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "transformers is not installed; pip install 'packvit[align]'" in result.stderr and "Traceback" not in result.stderr


# --- every bad argument of align, bench and convert: one error line, exit 2, before any work ----------


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if a command writes or loads a checkpoint: its arguments must be refused first."""
    from packvit.harness import FAMILIES, get_adapter

    def started(*args, **kwargs):
        raise AssertionError("the command started working before refusing its arguments")

    for family in FAMILIES:
        adapter = get_adapter(family)
        for method in ("write_random_checkpoint", "cached_random_checkpoint", "load_reference", "load_packed"):
            monkeypatch.setattr(adapter, method, started)


def _refused(argv, capsys) -> str:
    """The error line of a command line refused with exit status 2 and no traceback."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_info:  # refused by the argument parser
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith(f"packvit {argv[0]}")]
    assert re.match(rf"packvit {argv[0]}( [\w-]+)?: error: ", line), line  # `packvit convert llava-vit: error: ...`
    return line


@pytest.fixture
def siglip2_config_dir(tmp_path):
    """A folder whose config.json says SigLIP2 (all the family check reads)."""
    folder = tmp_path / "siglip2-ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "siglip2_vision_model"}')
    return folder


def test_missing_checkpoint_of_a_transformers_family_is_an_error_line(tmp_path, capsys, no_work):
    line = _refused(["align", "siglip2", "--ckpt", str(tmp_path / "nowhere")], capsys)
    assert line.startswith("packvit align: error: checkpoint") and "does not exist" in line


def test_one_checkpoint_names_one_family(siglip2_config_dir, capsys, no_work):
    line = _refused(["align", "siglip2", "dinov3", "--ckpt", str(siglip2_config_dir)], capsys)
    assert "is one siglip2 checkpoint; name siglip2 alone with it" in line
    line = _refused(["align", "dinov3", "--ckpt", str(siglip2_config_dir)], capsys)
    assert "is one siglip2 checkpoint" in line and "not dinov3" in line
    line = _refused(["align", "--ckpt", str(siglip2_config_dir), "--size", "full"], capsys)
    assert "--size chooses the random checkpoint" in line


def test_a_checkpoint_alone_names_its_family(siglip2_config_dir):
    import argparse

    from packvit.align import AlignSettings, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = AlignSettings.from_args(parser.parse_args(["--ckpt", str(siglip2_config_dir), "--no-use_real_images"]))
    assert settings.families == ("siglip2",) and settings.checkpoint == siglip2_config_dir
    assert settings.float32_threshold == 1e-4  # a real checkpoint's bound


def test_image_dir_is_checked_before_any_work(tmp_path, capsys, no_work):
    line = _refused(["align", "siglip2", "--image_dir", str(tmp_path / "missing")], capsys)
    assert line.endswith(f"argument --image_dir: {tmp_path / 'missing'} does not exist")
    (tmp_path / "notes.txt").write_text("not a folder")
    assert "is a file; name the folder" in _refused(["align", "siglip2", "--image_dir", str(tmp_path / "notes.txt")], capsys)
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "caption.txt").write_text("a cat")
    assert "holds no image files" in _refused(["align", "siglip2", "--image_dir", str(texts)], capsys)
    (texts / "broken.jpg").write_bytes(b"not a jpeg at all")
    line = _refused(["align", "siglip2", "--image_dir", str(texts)], capsys)
    assert f"{texts / 'broken.jpg'} is not an image Pillow can read" in line
    line = _refused(["align", "siglip2", "--image_dir", str(texts), "--no-use_real_images"], capsys)
    assert "drop one of the two" in line


@pytest.mark.parametrize("command", [["align", "siglip2"], ["bench", "--smoke"]])
def test_devices_are_checked_before_any_work(command, capsys, no_work):
    line = _refused([*command, "--device", "tpu"], capsys)
    assert "argument --device: 'tpu' is not a device torch knows; use cpu, cuda or cuda:N" in line
    if not __import__("torch").cuda.is_available():
        line = _refused([*command, "--device", "cuda"], capsys)
        assert "argument --device: cuda: this torch" in line and line.endswith("; use cpu")


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys, no_work):
    a_file = tmp_path / "taken"
    a_file.write_text("")
    line = _refused(["align", "siglip2", "--json", str(tmp_path / "missing" / "align.json")], capsys)
    assert f"argument --json: {tmp_path / 'missing' / 'align.json'}: its folder {tmp_path / 'missing'} does not exist" in line
    assert f"its folder {a_file} is a file" in _refused(["align", "siglip2", "--json", str(a_file / "align.json")], capsys)
    assert "is a folder; name a file" in _refused(["align", "siglip2", "--json", str(tmp_path)], capsys)
    line = _refused(["bench", "--smoke", "--out", str(a_file)], capsys)
    assert line.endswith(f"argument --out: {a_file} is a file; name a folder to write into")
    assert "its parent folder" in _refused(["bench", "--smoke", "--ckpt_dir", str(tmp_path / "a" / "b")], capsys)
    line = _refused(["convert", "llava-vit", "--src", str(tmp_path), "--dst", str(a_file / "converted")], capsys)
    assert line.endswith(f"--dst {a_file / 'converted'}: its parent folder {a_file} is a file, not a folder")


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="permissions do not bind root")
def test_a_folder_without_write_permission_is_refused(tmp_path, capsys, no_work):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    line = _refused(["align", "siglip2", "--json", str(locked / "align.json")], capsys)
    assert "is not writable by this user" in line


def test_an_unknown_attention_backend_is_refused_before_any_work(capsys, no_work):
    assert "argument --backend: invalid choice: 'nope'" in _refused(["bench", "--smoke", "--backend", "nope"], capsys)


def test_align_compares_the_fp8_model_too(tmp_path):
    """``packvit align --fp8``: the FP8 model against the reference (float32 on the CPU), with its own
    cosine bound, beside the float32 rows."""
    out = tmp_path / "align.json"
    assert cli.main(["align", "llava_vit", "--fp8", "--no-use_real_images", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    fp8 = [r for r in rows if r["precision"] == "fp8"]
    assert fp8 and len(fp8) == len([r for r in rows if r["precision"] == "float32"])
    for row in fp8:
        assert row["passed"] and row["criterion"] == "mean and pooled cosine >= 0.997"
        assert 0.997 <= row["mean_cosine"] < 1.0 and row["max_diff"] > 1e-4  # quantised, not the float32 result


def test_fp8_threshold_without_fp8_is_refused(capsys, no_work):
    assert cli.main(["align", "llava_vit", "--fp8_threshold", "0.99"]) == 2
    assert "--fp8_threshold bounds the FP8 comparison, which runs with --fp8" in capsys.readouterr().err
