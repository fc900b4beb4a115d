"""The command line never overwrites a result: the same command twice, or the same tool on another picture, leaves
every earlier file on disk, and a demo run never deletes a folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from PIL import Image

from pictoprompt.cli import main
from pictoprompt.server.demo import fresh_folder


def _run(capsys, *arguments: str) -> list[Path]:
    assert main([*arguments, "--profile", "tiny"]) == 0
    result = json.loads(capsys.readouterr().out)
    return [Path(image["path"]) for image in result["images"]]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_same_vary_command_on_two_pictures_keeps_both_results(tmp_path, capsys):
    square, triangle = tmp_path / "square.png", tmp_path / "triangle.png"
    Image.new("RGB", (32, 32), (220, 30, 30)).save(square)
    Image.new("RGB", (32, 32), (30, 60, 220)).save(triangle)
    output = tmp_path / "out"
    common = ["--num-images", "2", "--steps", "2", "--seed", "21", "-o", str(output)]
    first = _run(capsys, "vary", str(square), *common)
    kept = {path: _digest(path) for path in first}
    second = _run(capsys, "vary", str(triangle), *common)

    assert [path.name for path in first] == ["vary_image-01-seed21.png", "vary_image-02-seed22.png"]
    assert [path.name for path in second] == ["vary_image-01-seed21-run2.png", "vary_image-02-seed22-run2.png"]
    assert {path: _digest(path) for path in first} == kept, "the first run's files are untouched"
    assert all(Image.open(path).text["seed"] for path in second)
    assert sorted(p.name for p in output.iterdir()) == sorted(p.name for p in first + second), "no temporary left"


def test_two_identical_generate_runs_leave_both_results(tmp_path, capsys):
    output = tmp_path / "out"
    command = ["generate", "a red circle", "--num-images", "2", "--steps", "2", "--seed", "5", "-o", str(output)]
    first, second, third = _run(capsys, *command), _run(capsys, *command), _run(capsys, *command)
    paths = first + second + third
    assert len(set(paths)) == 6 and all(path.is_file() for path in paths)
    assert [path.name for path in third] == ["generate_image-01-seed5-run3.png", "generate_image-02-seed6-run3.png"]
    # The same seeds make the same pictures: both copies are there, byte for byte.
    assert [_digest(path) for path in first] == [_digest(path) for path in second]


def test_a_demo_run_takes_a_new_folder_instead_of_deleting_one(tmp_path):
    requested = tmp_path / "demo-output"
    assert fresh_folder(requested) == requested and requested.is_dir()
    assert fresh_folder(requested) == requested, "an empty folder is used as it is"
    (requested / "index.html").write_text("an earlier run")
    (tmp_path / "demo-output-2").mkdir()
    (tmp_path / "demo-output-2" / "mine.txt").write_text("not a demo's")
    assert fresh_folder(requested) == tmp_path / "demo-output-3"
    assert (requested / "index.html").read_text() == "an earlier run"
    assert (tmp_path / "demo-output-2" / "mine.txt").read_text() == "not a demo's"
