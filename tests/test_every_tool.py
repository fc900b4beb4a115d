"""One tester over every registered tool: its schemas, reproducibility, cancellation and a refused bad input.

A new tool joins the registry and must join `EXAMPLES` and `REFUSALS` here too (the first test says so). The
tools run on the tiny set with the tiny transformers LM and a small start-word list, so all of this stays fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from PIL import Image
from pydantic import BaseModel, ValidationError

from pictoprompt.errors import JobCancelledError
from pictoprompt.models.concepts import ConceptStore
from pictoprompt.models.profiles import LlmSpec, get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.progress import Progress
from pictoprompt.server.images import PreResolvedImages
from pictoprompt.server.wire import input_schema, output_schema
from pictoprompt.tools import TOOLS
from pictoprompt.tools.base import SavedImage, ToolContext, ToolSpec

SPECS = {spec.name: spec for spec in TOOLS}

LONG_PROMPT = "a large red circle in the center of a white picture, very detailed, sharp, beautiful, award winning"

EXAMPLES: dict[str, dict[str, Any]] = {
    "generate_image": {"prompt": "a red circle", "num_images": 2, "steps": 2, "seed": 5},
    "vary_image": {"images": ["red", "blue"], "weights": [1, 2], "num_images": 2, "steps": 2, "seed": 5},
    "edit_with_text": {"image": "red", "text": "in the snow", "num_images": 1, "steps": 2, "seed": 5},
    "invert_image": {"images": ["red"], "max_tokens": 5, "num_results": 2},
    "fuse_concepts": {"images": ["red", "blue"], "max_tokens": 6, "num_images": 1, "steps": 2, "seed": 5},
    "distill_prompt": {"prompt": LONG_PROMPT, "max_tokens": 4, "generate_preview": True, "steps": 2, "seed": 5},
    "segment_image": {"image": "red", "prompt": "a red circle", "words": ["red", "circle"]},
    "customize_concept": {"name": "thing", "images": ["red", "blue", "star"], "iterations": 2, "overwrite": True},
    "list_concepts": {},
    "delete_concept": {"name": "thing"},
}
"""Small valid arguments for each tool."""

REFUSALS: dict[str, tuple[dict[str, Any], str]] = {
    "generate_image": ({"prompt": "x", "num_images": 9}, "num_images"),
    "vary_image": ({"images": ["red", "blue"], "weights": [1.0]}, "one per image"),
    "edit_with_text": ({"image": "red", "text": "x", "alpha": 5}, "alpha"),
    "invert_image": ({"images": []}, "images"),
    "fuse_concepts": ({"images": ["red"]}, "images"),
    "distill_prompt": ({"prompt": ""}, "prompt"),
    "segment_image": ({"image": "red", "prompt": ""}, "prompt"),
    "customize_concept": ({"name": "thing", "images": ["red", "blue"]}, "images"),
    "list_concepts": ({"all": True}, "all"),
    "delete_concept": ({"name": "Not A Name"}, "name"),
}
"""For each tool, arguments it must refuse and a word the refusal names."""

NOT_REPEATABLE = {"delete_concept"}
"""Tools whose second call cannot do the same thing (the concept is gone)."""


class Sink:
    """Keeps what a tool saved, pictures included."""

    def __init__(self) -> None:
        self.saved: list[tuple[np.ndarray, dict[str, str]]] = []

    def save(self, image: Image.Image, metadata: dict[str, str]) -> SavedImage:
        self.saved.append((np.asarray(image).copy(), metadata))
        return SavedImage(uri=f"test://{len(self.saved)}", path=f"/nowhere/{len(self.saved)}.png")


PICTURES = {
    "red": Image.new("RGB", (32, 32), (220, 30, 30)),
    "blue": Image.new("RGB", (40, 32), (30, 60, 220)),
    "star": Image.new("RGB", (32, 32), (240, 220, 20)),
}


@pytest.fixture(scope="module")
def runtime(tiny_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    words = tmp_path_factory.mktemp("words") / "words.txt"
    words.write_text("red\nblue\nyellow\ncircle\nstar\nsquare\n")
    llm = LlmSpec(backend="transformers", source=str(tiny_lm_dir))
    return Runtime(get_profile("tiny").model_copy(update={"llm": llm, "vocabulary": str(words)}))


@pytest.fixture
def store(tmp_path: Path) -> ConceptStore:
    return ConceptStore(tmp_path / "concepts")


def run(
    spec: ToolSpec, arguments: dict[str, Any], runtime: Runtime, store: ConceptStore, progress: Progress | None = None
) -> tuple[BaseModel, Sink]:
    sink = Sink()
    context = ToolContext(runtime, sink, PreResolvedImages(PICTURES), progress or Progress(), store)
    return spec.run(spec.request_model(**arguments), context), sink


@pytest.fixture
def with_concept(runtime: Runtime, store: ConceptStore) -> Iterator[ConceptStore]:
    """A store holding the concept `thing`, for the tools that need one."""
    run(SPECS["customize_concept"], EXAMPLES["customize_concept"], runtime, store)
    yield store


def test_every_registered_tool_is_tested_here():
    assert set(EXAMPLES) == set(REFUSALS) == set(SPECS)


@pytest.mark.parametrize("name", list(SPECS))
def test_schemas_describe_the_arguments_and_the_result(name: str, runtime: Runtime, with_concept: ConceptStore):
    spec = SPECS[name]
    schema = input_schema(spec.request_model)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert all(prop.get("description") for prop in schema["properties"].values()), "every argument is described"
    jsonschema.validate(EXAMPLES[name], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**EXAMPLES[name], "no_such_argument": 1}, schema)
    result, _ = run(spec, EXAMPLES[name], runtime, with_concept)
    assert isinstance(result, spec.response_model)
    jsonschema.validate(result.model_dump(mode="json"), output_schema(spec.response_model))


def _outcome(result: BaseModel, sink: Sink) -> tuple[Any, list[Any]]:
    """A result without where it was stored, and the pictures with their metadata."""
    payload = result.model_dump(mode="json", exclude={"created_at", "training_seconds"})
    text = repr(payload)
    for number in range(1, len(sink.saved) + 1):
        text = text.replace(f"test://{number}", "uri").replace(f"/nowhere/{number}.png", "path")
    return text, [(pixels.tolist(), metadata) for pixels, metadata in sink.saved]


@pytest.mark.parametrize("name", sorted(set(SPECS) - NOT_REPEATABLE))
def test_the_same_arguments_give_the_same_result(name: str, runtime: Runtime, with_concept: ConceptStore):
    first = _outcome(*run(SPECS[name], EXAMPLES[name], runtime, with_concept))
    second = _outcome(*run(SPECS[name], EXAMPLES[name], runtime, with_concept))
    assert first == second


@pytest.mark.parametrize("name", [spec.name for spec in TOOLS if spec.uses_models])
def test_cancelling_stops_the_tool_and_keeps_nothing(name: str, runtime: Runtime, store: ConceptStore):
    progress = Progress(lambda done, total, message: progress.cancel())
    sink = Sink()
    context = ToolContext(runtime, sink, PreResolvedImages(PICTURES), progress, store)
    with pytest.raises(JobCancelledError):
        SPECS[name].run(SPECS[name].request_model(**EXAMPLES[name]), context)
    assert sink.saved == [] and store.list() == []


@pytest.mark.parametrize("name", list(SPECS))
def test_a_bad_argument_is_refused_by_name(name: str):
    arguments, named = REFUSALS[name]
    with pytest.raises(ValidationError, match=named):
        SPECS[name].request_model(**arguments)
    with pytest.raises(ValidationError, match="bogus"):
        SPECS[name].request_model(**{**EXAMPLES[name], "bogus": 1})
