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


def test_bench_refuses_cpu_without_smoke():
    if __import__("torch").cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(SystemExit, match="needs a CUDA GPU.*--smoke"):
        cli.main(["bench", "--models", "siglip2"])


def test_image_size_smaller_than_a_patch(capsys):
    assert cli.main(["align", "llava_vit", "--image_size", "10"]) == 2
    assert "--image_size 10 is smaller than one 14-pixel patch of llava_vit" in capsys.readouterr().err


def test_align_without_transformers_names_the_install():
    code = "import sys; sys.modules['transformers'] = None; from packvit import cli; sys.exit(cli.main(['align', 'siglip2']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "transformers is not installed; pip install 'packvit[align]'" in result.stderr and "Traceback" not in result.stderr
