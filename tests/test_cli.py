"""The command line: tool commands write PNGs with metadata, models list/check, the generated tool reference."""

from __future__ import annotations

import json
import sys

import pytest
from PIL import Image

from lab.docs import tools_markdown
from pictoprompt.cli import main
from pictoprompt.errors import InvalidInputError
from pictoprompt.models.profiles import get_profile, load_profiles_file


def test_generate_writes_pngs_with_metadata(tmp_path, capsys):
    code = main(
        [
            "generate",
            "a red circle",
            "--profile",
            "tiny",
            "--num-images",
            "2",
            "--steps",
            "2",
            "--seed",
            "5",
            "-o",
            str(tmp_path),
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert [image["seed"] for image in result["images"]] == [5, 6]
    files = sorted(tmp_path.glob("*.png"))
    assert len(files) == 2
    assert Image.open(files[0]).text["prompt"] == "a red circle"


def test_bad_argument_exits_with_a_message(tmp_path, capsys):
    code = main(["generate", "x", "--profile", "nonexistent", "-o", str(tmp_path)])
    assert code == 2
    assert "no profile 'nonexistent'" in capsys.readouterr().err


def test_models_list_and_check(capsys):
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert "sd15" in listing and "sd21" in listing and "ViT-H-14" in listing
    assert main(["models", "check", "--profile", "tiny"]) == 0
    assert main(["models", "check", "--profile", "sd15"]) == 1
    report = capsys.readouterr().out
    assert "MISSING" in report and "HF_HUB_OFFLINE" in report


def test_profiles_from_toml(tmp_path):
    path = tmp_path / "profiles.toml"
    path.write_text('[profiles.mine]\ngenerator = "/nowhere/sd"\nclip = { source = "/nowhere/clip" }\n')
    assert load_profiles_file(path)["mine"].clip.source == "/nowhere/clip"
    assert get_profile("mine", path).generator == "/nowhere/sd"
    path.write_text('[profiles.broken]\nclip = { source = "x" }\n')
    with pytest.raises(InvalidInputError, match="generator"):
        load_profiles_file(path)


def test_missing_weights_error_names_profile_component_and_fix(tmp_path):
    from pictoprompt.errors import ModelNotFoundError
    from pictoprompt.models.runtime import Runtime

    path = tmp_path / "profiles.toml"
    path.write_text(f'[profiles.gone]\ngenerator = "{tmp_path}/no-sd"\nclip = {{ source = "{tmp_path}/no-clip" }}\n')
    with pytest.raises(ModelNotFoundError) as raised:
        Runtime(get_profile("gone", path)).pipeline()
    message = str(raised.value)
    assert "'gone'" in message and "generator" in message and "no-sd" in message and "TOML" in message


def test_tools_markdown_documents_every_argument():
    text = tools_markdown()
    assert "### `generate_image`" in text and "| `num_images` |" in text and "<= 8" in text
    assert "### `server_status`" in text


def test_tool_commands_keep_the_clip_vocabulary_under_the_cache_dir(tmp_path, monkeypatch, capsys):
    import pictoprompt.methods.vgd as vgd_module

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    seen = {}

    def record(clip, cache_dir, progress=None, words=None):
        seen["cache_dir"] = cache_dir
        raise InvalidInputError("recorded")

    monkeypatch.setattr(vgd_module, "clip_vocabulary", record)
    picture = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (220, 30, 30)).save(picture)
    assert main(["invert", str(picture), "--profile", "tiny"]) != 0
    assert "recorded" in capsys.readouterr().err
    assert seen["cache_dir"] == tmp_path / "xdg" / "pictoprompt"


def test_bench_finds_the_checkouts_benchmarks_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "no-such-benchmark"]) == 2
    error = capsys.readouterr().err
    assert "No benchmark 'no-such-benchmark'" in error and "server_overhead" in error and "vgd" in error


def test_lab_commands_without_the_lab_say_how_to_get_it(monkeypatch, capsys):
    # An installed wheel has no `lab` package: importing it fails as here.
    monkeypatch.setitem(sys.modules, "lab", None)
    monkeypatch.setitem(sys.modules, "lab.benchmarks", None)
    monkeypatch.setitem(sys.modules, "lab.shapes.train", None)
    assert main(["bench", "vgd"]) == 2
    assert "pip install -e ./lab" in capsys.readouterr().err
    assert main(["models", "train-shapes"]) == 2
    error = capsys.readouterr().err
    assert "`models train-shapes` needs the laboratory" in error and "pip install -e ./lab" in error


def test_train_domain_passes_its_options_and_falls_back_to_the_profiles(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    lines = []
    for i, colour in enumerate(["red", "blue", "green", "white"]):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a {colour} picture"}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    common = ["train-domain", "--profile", "tiny", "--images", str(tmp_path), "--captions"]
    common += [str(tmp_path / "metadata.jsonl"), "--iterations", "1"]
    assert main([*common, "--name", "plain"]) == 0
    plain = json.loads(capsys.readouterr().out)["hyperparameters"]
    assert plain["caption_alignment"] == 0.0 and plain["learning_rate"] == plain["prompt_learning_rate"] == 1e-5
    options = ["--caption-alignment", "2", "--prompt-learning-rate", "0.01", "--learning-rate", "0.001"]
    assert main([*common, "--name", "aligned", *options]) == 0
    aligned = json.loads(capsys.readouterr().out)["hyperparameters"]
    assert aligned["caption_alignment"] == 2.0 and aligned["prompt_learning_rate"] == 0.01
    assert aligned["learning_rate"] == 0.001 and aligned["iterations"] == 1
