"""The concept benchmark's description rows (`lab/benchmarks/concepts.py`): what the words give away, and what not."""

from __future__ import annotations

from lab.benchmarks.concepts import EVALUATION_CONCEPTS, TUNING_CONCEPTS, Learned, described
from lab.benchmarks.grammar import parse_caption
from lab.shapes.oracle import ObjectReading, SceneReading


def test_the_description_names_colour_and_kind_but_never_the_fill() -> None:
    for concept in EVALUATION_CONCEPTS + TUNING_CONCEPTS:
        colour, shape, fill = concept
        parsed = parse_caption(described(concept))
        assert parsed is not None, described(concept)
        (named,) = parsed.objects
        assert (named.colour, named.shape, named.fill) == (colour, shape, None)
        assert fill not in described(concept)


def test_words_alone_are_judged_as_the_concept_they_describe() -> None:
    concept = ("green", "heart", "striped")
    words = Learned("", described(concept), concept, 0.0, stored=False)

    def reading(fill: str) -> SceneReading:
        return SceneReading("white", [ObjectReading("heart", "green", "small", "left", fill)])

    assert words.identity(reading("striped")) and not words.identity(reading("solid"))
