"""The README's tool reference is the tools' own schemas, so it cannot drift."""

from __future__ import annotations

from pathlib import Path

from pictoprompt.server.docs import tools_markdown

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_tool_section_matches_the_schemas():
    text = README.read_text()
    section = text.split("<!-- tools:start -->\n", 1)[1].split("<!-- tools:end -->", 1)[0]
    assert section.strip() == tools_markdown().strip(), "run `pictoprompt tools --write-readme README.md` to refresh it"
