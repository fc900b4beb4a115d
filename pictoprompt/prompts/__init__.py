"""Text templates, kept as data files beside this module and loaded by name.

Templates use `string.Template` placeholders (`${max_length}`), the notation of the VGD paper's appendix A.1.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from pictoprompt.errors import NotFoundError


@cache
def load_prompt(name: str) -> str:
    """The template `name` (file `<name>.txt` in this package), without its trailing newline."""
    resource = files(__package__).joinpath(f"{name}.txt")
    if not resource.is_file():
        raise NotFoundError(f"There is no prompt template '{name}' in pictoprompt/prompts.")
    return resource.read_text(encoding="utf-8").rstrip("\n")
