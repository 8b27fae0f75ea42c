"""Every code snippet of README.md and docs/*.md runs as written.

Python blocks of one page run in order in one namespace (a later block may use what an earlier
one defined); bash blocks run line by line (continuation lines joined). They run offline in a
scratch folder that holds what the pages name: small random checkpoints under the hub ids the
pages use, in a Hugging Face cache with ``HF_HUB_OFFLINE=1`` (so a hub id takes packvit's real
resolving path), photos from scikit-image as ``photos/*.jpg``, ``cat.jpg``, ``receipt.png`` and
``panorama.jpg``. A block fenced as ```` ```python gpu ```` or ```` ```bash gpu ```` runs only where
CUDA is; one fenced with ``needs=module.name`` only where that name imports (a class that a
transformers release lacks). The README's two set-up commands are the ones CI runs (``.ci/run``).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from family_helpers import require_references

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)?([^\n]*)\n(.*?)^```", re.M | re.S)
#: the hub ids the pages use, and the family and random-checkpoint options each stands for
HUB_CHECKPOINTS = {
    "google/siglip2-so400m-patch16-naflex": ("siglip2", {}),
    "facebook/dinov3-vitl16-pretrain-lvd1689m": ("dinov3", {}),
    "apple/aimv2-large-patch14-native": ("aimv2", {"is_native": True}),
    "lmms-lab-encoder/onevision-encoder-large": ("llava_vit", {}),
}
#: first words of the bash lines that run; set-up lines (venv, pip) are checked against CI instead
COMMANDS = ("packvit", "python -m packvit", "torchrun")


def importable(dotted: str) -> bool:
    module, _, name = dotted.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def runs_here(info: str) -> bool:
    """Whether a block with this fence info runs on this machine (``gpu``, ``needs=module.name``)."""
    words = info.split()
    needs = [word.removeprefix("needs=") for word in words if word.startswith("needs=")]
    return ("gpu" not in words or torch.cuda.is_available()) and all(importable(name) for name in needs)


def snippets(page: Path) -> list[tuple[str, bool, str, int]]:
    """``(language, runs here, code, first line)`` of every python and bash block of a page."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        language, info, code = match.group(1) or "", match.group(2), match.group(3)
        if language in ("python", "bash"):
            found.append((language, runs_here(info), code, text[: match.start()].count("\n") + 1))
    return found


def command_lines(code: str) -> list[str]:
    """The bash block's commands, continuation lines joined, comments dropped."""
    joined = code.replace("\\\n", " ")
    lines = [line.split(" #")[0].strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder with the pages' inputs, and the environment that finds their checkpoints offline."""
    pytest.importorskip("huggingface_hub")
    require_references(*{family for family, _ in HUB_CHECKPOINTS.values()})  # their random checkpoints
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    from packvit.harness import get_adapter

    root = tmp_path_factory.mktemp("docs")
    cache = root / "hf-cache"
    for repo_id, (family, options) in HUB_CHECKPOINTS.items():
        snapshot = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
        written = get_adapter(family).write_random_checkpoint(root / family, "tiny", seed=0, **options)
        shutil.copytree(written, snapshot)
        (snapshot.parents[1] / "refs").mkdir(parents=True, exist_ok=True)
        (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    if importable("transformers.Lfm2VlForConditionalGeneration"):
        from packvit.benchmarks.vlm import build_lfm2_vl

        snapshot = cache / "models--LiquidAI--LFM2-VL-450M" / "snapshots" / ("0" * 40)
        build_lfm2_vl("smoke", torch.device("cpu"), torch.float32).save_pretrained(snapshot)
        (snapshot.parents[1] / "refs").mkdir(parents=True, exist_ok=True)
        (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    work = root / "work"
    (work / "photos").mkdir(parents=True)
    photos = {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea(), "rocket": data.rocket()}
    for name, pixels in photos.items():
        Image.fromarray(pixels).save(work / "photos" / f"{name}.jpg", quality=90)
    Image.fromarray(data.chelsea()).save(work / "cat.jpg", quality=90)
    Image.fromarray(data.text()).save(work / "receipt.png")
    Image.fromarray(data.coffee()[:120]).save(work / "panorama.jpg", quality=90)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(root / "hf-home"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    return work, env


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


#: runs a page's python blocks in order in one namespace, each compiled under its page and line
RUN_BLOCKS = """
import json, sys
namespace = {"__name__": "__main__"}
for where, code in json.load(open(sys.argv[1])):
    exec(compile(code, where, "exec"), namespace)
"""


def run(program: list[str], where: str, work: Path, env: dict) -> None:
    result = subprocess.run(program, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{where}: {' '.join(program)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_snippet_of_the_page_runs(page, scratch, tmp_path):
    """Each page's python blocks in one fresh process (as a user runs them), then its commands."""
    blocks = [block for block in snippets(page) if block[1]]
    python = [(f"{page_id(page)}:{line}", code) for language, _, code, line in blocks if language == "python"]
    commands = [(f"{page_id(page)}:{line}", command) for language, _, code, line in blocks if language == "bash"
                for command in command_lines(code) if command.startswith(COMMANDS)]
    if not python and not commands:
        pytest.skip(f"{page_id(page)} has no snippet to run here")
    work, env = scratch
    if python:
        (tmp_path / "blocks.json").write_text(json.dumps(python))
        (tmp_path / "run_blocks.py").write_text(RUN_BLOCKS)
        run([sys.executable, str(tmp_path / "run_blocks.py"), str(tmp_path / "blocks.json")], page_id(page), work, env)
    for where, command in commands:
        program = shlex.split(command)
        if program[0] == "python":
            program[0] = sys.executable
        elif program[0] == "packvit":
            program = [sys.executable, "-m", "packvit", *program[1:]]
        elif program[0] == "torchrun":
            program = [sys.executable, "-m", "torch.distributed.run", *program[1:]]
        run(program, where, work, env)


def test_the_readme_set_up_commands_are_what_ci_runs():
    readme = snippets(ROOT / "README.md")
    setup = [command_lines(code) for language, _, code, _ in readme if language == "bash"][:2]
    ci = (ROOT / ".ci" / "run").read_text()
    main_job, tests = setup[0][0], setup[1][0]
    assert main_job.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0")
    assert tests in ci, "the README's test command is not the one .ci/run runs"
