"""The README stays a short user README whose tool table and commands are the real ones."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from lab.docs import tools_document, tools_table, write_readme_section
from pictoprompt.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
REFRESH = "run `pictoprompt tools --write-readme README.md` to refresh it"


def _tools_block(text: str) -> str:
    return text.split("<!-- tools:start -->\n", 1)[1].split("<!-- tools:end -->", 1)[0]


def test_readme_tool_table_matches_the_schemas():
    assert _tools_block(README.read_text()).strip() == tools_table().strip(), REFRESH


def test_the_full_tool_reference_matches_the_schemas():
    assert (ROOT / "docs" / "TOOLS.md").read_text() == tools_document(), REFRESH


def test_the_tool_table_has_one_row_per_tool_with_its_required_arguments():
    rows = [line for line in tools_table().splitlines() if line.startswith("| `")]
    names = [row.split("`")[1] for row in rows]
    assert len(names) == len(set(names)) and {"generate_image", "segment_image", "server_status"} <= set(names)
    generate = next(row for row in rows if row.startswith("| `generate_image`"))
    assert "`prompt`*" in generate and "`negative_prompt`," in generate and "`negative_prompt`*" not in generate


def test_write_readme_refreshes_the_table_and_writes_the_reference_beside_it(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- tools:start -->\nstale\n<!-- tools:end -->\nafter\n")
    reference = write_readme_section(readme)
    text = readme.read_text()
    assert reference == tmp_path / "docs" / "TOOLS.md" and reference.read_text() == tools_document()
    assert "stale" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("<!-- tools:end -->\nafter\n")
    assert _tools_block(text).strip() == tools_table().strip()


def test_readme_is_at_most_350_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= 350, f"README.md has {lines} lines; narrative and figures belong in lab/RESULTS.md"


def _shown_commands() -> list[str]:
    """Every command the README shows: code spans and the lines of shell blocks."""
    text = README.read_text()
    blocks = re.findall(r"```(?:sh|bash|shell)?\n(.*?)```", text, flags=re.S)
    commands = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    commands += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [command for command in commands if command]


def test_every_make_target_the_readme_shows_exists():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    shown = {target for command in _shown_commands() for target in re.findall(r"(?:^|\s)make ([a-z][\w-]*)", command)}
    assert shown, "the README shows no make target"
    assert shown <= targets, f"README shows make targets the Makefile lacks: {sorted(shown - targets)}"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def _check_cli_command(words: list[str]) -> list[str]:
    """The flags and subcommands of one `pictoprompt ...` command that the parser does not know."""
    parser, unknown = build_parser(), []
    options = _options(parser)
    for word in words:
        if word == "--" or any(action.nargs == argparse.REMAINDER for action in parser._actions):
            break  # the rest is another program's (`claude mcp add pictoprompt -- ...`, a benchmark's options)
        if word.startswith("-"):
            if word.split("=")[0] not in options:
                unknown.append(word)
        elif word in _subparsers(parser):
            parser = _subparsers(parser)[word]
            options |= _options(parser)
    return unknown


def test_every_pictoprompt_command_the_readme_shows_exists():
    shown = []
    for command in _shown_commands():
        for match in re.finditer(r"(?:^|[\s`(])pictoprompt((?: +[-\w.=|]+)+)", command):
            words = [word.strip("[]") for word in match.group(1).split()]
            shown.append(words)
    assert len(shown) >= 5, "the README shows too few pictoprompt commands for this check to mean anything"
    unknown = {word for words in shown for word in _check_cli_command(words)}
    assert not unknown, f"README shows pictoprompt flags the CLI lacks: {sorted(unknown)}"


@pytest.mark.parametrize("words", [["serve", "--no-such-flag"], ["tools", "--compact-nothing"]])
def test_the_command_check_catches_a_flag_that_does_not_exist(words):
    assert _check_cli_command(words) == [words[1]]


def test_the_command_check_takes_the_flags_that_exist():
    assert _check_cli_command(["serve", "--http", "--ray", "--profile", "sd15", "--allow-dir", "DIR"]) == []
    assert _check_cli_command(["models", "check", "--profile", "sd15"]) == []


def _setting(profile: object, path: str) -> object:
    for part in path.split("."):
        profile = getattr(profile, part) if profile is not None else None
    return profile


def _same(shown: str, value: object) -> bool:
    if shown == "None" or value is None:
        return shown == "None" and value is None
    if isinstance(value, bool | str):
        return shown == str(value)
    if isinstance(value, list):
        return False
    return float(shown) == float(value)  # type: ignore[arg-type]


def test_the_method_defaults_table_is_the_profiles():
    from pictoprompt.models.profiles import BUILTIN_PROFILES

    rows = [
        line
        for line in README.read_text().splitlines()
        if re.match(r"\| `(distillation`|(vgd|sd_ipc|concept_\w+|domain_\w+)\.)", line)
    ]
    assert len(rows) >= 8, "the README lost its table of each profile's method defaults"
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        path = cells[0].split("`")[1]
        shapes, others = cells[2], cells[3]
        assert _same(shapes, _setting(BUILTIN_PROFILES["shapes"], path)), f"{path}: shapes is not {shapes}"
        for name in ("tiny", "sd15", "sd21"):
            assert _same(others, _setting(BUILTIN_PROFILES[name], path)), f"{path}: {name} is not {others}"


def test_the_bundled_set_table_links_to_sections_of_the_lab_results():
    text = README.read_text()
    section = text.split("## How well each tool does on the bundled set", 1)[1].split("\n## ", 1)[0]
    anchors = re.findall(r"\]\(lab/RESULTS\.md#([\w-]+)\)", section)
    assert len(anchors) >= 8, "each row of the bundled-set table links into lab/RESULTS.md"
    headings = re.findall(r"^#+ (.+)$", (ROOT / "lab" / "RESULTS.md").read_text(), flags=re.M)
    slugs = {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}
    assert set(anchors) <= slugs, f"links to sections lab/RESULTS.md lacks: {sorted(set(anchors) - slugs)}"


def test_the_lab_results_link_only_files_that_exist():
    lab = ROOT / "lab"
    links = re.findall(r"\]\((results/[\w.-]+\.md)\)", (lab / "RESULTS.md").read_text())
    assert links, "lab/RESULTS.md links each helper's results file"
    missing = [link for link in links if not (lab / link).is_file()]
    assert not missing, f"lab/RESULTS.md links files that do not exist: {missing}"


def test_every_setting_the_readme_names_is_read_by_the_server():
    from pictoprompt.settings import Settings

    named = set(re.findall(r"PICTOPROMPT_([A-Z_]+)", README.read_text())) - {"UPDATE_SNAPSHOTS"}  # a test switch
    assert len(named) >= 10
    unknown = {name for name in named if name.lower() not in Settings.model_fields}
    assert not unknown, f"README names settings the server does not read: {sorted(unknown)}"
