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


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in blocks, "the README's test command and .ci/run differ"
    assert any(block.endswith("packvit align") for block in blocks), "the README's main job is `packvit align`"


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "packvit", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.startswith("packvit ")


def test_bench_refuses_cpu_without_smoke():
    if __import__("torch").cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(SystemExit, match="needs a CUDA GPU.*--smoke"):
        cli.main(["bench", "--models", "siglip2"])
