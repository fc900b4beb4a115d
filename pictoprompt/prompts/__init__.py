"""Text templates, kept as data files beside this module and loaded by name: VGD's LLM prompts (`vgd_*.txt`) and
the workflows the server offers its clients as MCP prompts (`workflow_*.md`).

Templates use `string.Template` placeholders (`${max_length}`), the notation of the VGD paper's appendix A.1.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from string import Template
from typing import Literal

from pictoprompt.errors import NotFoundError


@cache
def load_prompt(name: str, suffix: str = ".txt") -> str:
    """The template `name` (file `<name><suffix>` in this package), without its trailing newline."""
    resource = files(__package__).joinpath(f"{name}{suffix}")
    if not resource.is_file():
        raise NotFoundError(f"There is no prompt template '{name}' in pictoprompt/prompts.")
    return resource.read_text(encoding="utf-8").rstrip("\n")


VgdTask = Literal["inversion", "style", "distillation"]


def vgd_messages(task: VgdTask, max_length: int, condition: str = "", target_prompt: str = "") -> tuple[str, str, str]:
    """VGD's chat (paper appendix A.1) as (system, user, answer opening), for decoding and for adapter training alike.

    The answer opening ends with a newline (as in the authors' code), so a newline ends the prompt rather than
    starting it.
    """
    values = {"condition": condition, "max_length": max_length, "target_prompt": target_prompt}
    user = Template(load_prompt(f"vgd_{task}")).substitute(values).strip()
    answer = Template(load_prompt("vgd_answer")).substitute(values) + "\n"
    return load_prompt("vgd_system"), user, answer


def workflow(name: str, /, **values: str) -> str:
    """The workflow `name` (file `workflow_<name>.md`) with its placeholders filled in: a short text that tells an
    assistant which tools to call, in which order."""
    return Template(load_prompt(f"workflow_{name}", ".md")).substitute(values)
