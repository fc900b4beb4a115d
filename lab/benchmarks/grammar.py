"""The `shapes` world's caption grammar, parsed: is a prompt a sentence of the world, and what does it name?

A prompt counts as readable only if it is a sentence of the grammar that wrote the training captions
(`pictoprompt.models.shapes.scenes`: `caption_scene`, `describe_object`, `_relation`, `full_caption`,
`plain_caption`, `OPENERS`, `POSITION_PHRASES`), and it names an attribute only if the parsed object carries it.
Grepping for shape words counted "The heart is a symbol of dedication" as naming a heart; parsing does not.

    caption := [opener] objects [" on " article colour " background"]
    opener  := "a picture of " | "an image of " | "a drawing of "
    objects := object " " relation " " object                  (two objects, neither with a position)
             | object ("," object)* " and " object | object
    object  := [article] [size] [fill] colour shape [position phrase]
    relation := "to the left of" | "to the right of" | "above" | "below"

Deliberate leniencies, each something a person would still paste into a generator unchanged: case, one trailing
full stop, and an object's article may be left out ("red circle", as prompts are often written). An article that
is there must agree with the next word ("an orange circle", not "a orange circle"). Nothing else is accepted: no
extra, repeated or unknown words, and no more objects than a scene holds (three) or two in one place.

The style prompts of `invert_image(focus="style")` have their own form (`parse_style`):

    style := [fill] [colour] "shapes" [" on " article colour " background"]     (at least one of the three)
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from lab.shapes.world import OPENERS, POSITION_PHRASES
from pictoprompt.models.shapes.scenes import COLOURS, FILLS, SHAPES, SIZES

MAX_OBJECTS = 3
"""A scene has one to three objects (`random_scene`), which never overlap, so no two share a position."""
RELATIONS = ("to the left of", "to the right of", "above", "below")
"""What `_relation` writes between two objects."""

_OPENERS = tuple(tuple(opener.split()) for opener in OPENERS if opener)
_POSITIONS = tuple(
    (tuple(phrase.split()), position) for position, phrases in POSITION_PHRASES.items() for phrase in phrases
)
_RELATIONS = tuple(tuple(relation.split()) for relation in RELATIONS)
_TEXT = re.compile(r"[a-z]+(?:,? [a-z]+)*")

WORLD_WORDS = frozenset(
    {
        *COLOURS,
        *SHAPES,
        *SIZES,
        *FILLS,
        *(word for opener in _OPENERS for word in opener),
        *(word for words, _ in _POSITIONS for word in words),
        *(word for relation in _RELATIONS for word in relation),
        "a",
        "an",
        "and",
        "on",
        "background",
        "shapes",
    }
)
"""Every word the grammar (captions and style prompts) can write."""


@dataclass(frozen=True)
class ParsedObject:
    """One object as a caption names it; None = not named."""

    shape: str
    colour: str
    size: str | None = None
    fill: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class ParsedCaption:
    objects: tuple[ParsedObject, ...]
    background: str | None = None
    relation: str | None = None
    """The relation of the first object to the second in the two-object form ("above"), else None."""


@dataclass(frozen=True)
class ParsedStyle:
    fill: str | None
    colour: str | None
    background: str | None


def article_for(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _tokens(text: str) -> list[str] | None:
    """Lower-cased words with each comma as a token of its own, or None if the text has anything but words,
    single spaces, commas that end a word, and one final full stop."""
    text = text.strip().lower().removesuffix(".")
    if not _TEXT.fullmatch(text):
        return None
    return text.replace(",", " ,").split()


# A tiny backtracking parser: each rule takes (tokens, index) and yields every (value, next index) it can read,
# so "on the left" and "on a white background" need no look-ahead to tell apart.


def _phrase(tokens: Sequence[str], i: int, words: tuple[str, ...]) -> bool:
    return tuple(tokens[i : i + len(words)]) == words


def _word(tokens: Sequence[str], i: int, choices: Sequence[str]) -> Iterator[tuple[str, int]]:
    if i < len(tokens) and tokens[i] in choices:
        yield tokens[i], i + 1


def _optional(tokens: Sequence[str], i: int, choices: Sequence[str]) -> Iterator[tuple[str | None, int]]:
    yield None, i
    yield from _word(tokens, i, choices)


def _object(tokens: Sequence[str], i: int, position: bool) -> Iterator[tuple[ParsedObject, int]]:
    for article, j in _optional(tokens, i, ("a", "an")):
        if article is not None and (j == len(tokens) or article != article_for(tokens[j])):
            continue
        for size, k in _optional(tokens, j, SIZES):
            for fill, m in _optional(tokens, k, FILLS):
                for colour, n in _word(tokens, m, COLOURS):
                    for shape, end in _word(tokens, n, SHAPES):
                        yield ParsedObject(shape, colour, size, fill), end
                        if position:
                            for words, name in _POSITIONS:
                                if _phrase(tokens, end, words):
                                    yield ParsedObject(shape, colour, size, fill, name), end + len(words)


def _object_list(tokens: Sequence[str], i: int) -> Iterator[tuple[tuple[ParsedObject, ...], int]]:
    """One object, "a and b", or "a, b, ... and z"."""
    for first, j in _object(tokens, i, position=True):
        yield (first,), j
        if _phrase(tokens, j, ("and",)):
            for last, end in _object(tokens, j + 1, position=True):
                yield (first, last), end
        if _phrase(tokens, j, (",",)):
            for rest, end in _object_list(tokens, j + 1):
                if len(rest) >= 2:
                    yield (first, *rest), end


def _relation_pair(tokens: Sequence[str], i: int) -> Iterator[tuple[tuple[ParsedObject, ...], str, int]]:
    for first, j in _object(tokens, i, position=False):
        for words, relation in zip(_RELATIONS, RELATIONS, strict=True):
            if _phrase(tokens, j, words):
                for second, end in _object(tokens, j + len(words), position=False):
                    yield (first, second), relation, end


def _background(tokens: Sequence[str], i: int) -> Iterator[tuple[str | None, int]]:
    yield None, i
    if len(tokens) == i + 4 and tokens[i] == "on" and tokens[i + 3] == "background":
        colour, article = tokens[i + 2], tokens[i + 1]
        if colour in COLOURS and article == article_for(colour):
            yield colour, i + 4


def _possible(objects: tuple[ParsedObject, ...]) -> bool:
    """Whether a scene of the world could hold these: at most `MAX_OBJECTS`, never two in one place. A decoder stuck
    in a loop ("a red circle, a red circle, ... and a red circle") writes grammatical words but no caption."""
    positions = [obj.position for obj in objects if obj.position is not None]
    return len(objects) <= MAX_OBJECTS and len(set(positions)) == len(positions)


def parse_caption(text: str) -> ParsedCaption | None:
    """The objects and background a sentence of the caption grammar names, or None if it is not one."""
    tokens = _tokens(text)
    if tokens is None:
        return None
    starts = [0] + [len(words) for words in _OPENERS if _phrase(tokens, 0, words)]
    for start in starts:
        readings = [(objects, None, end) for objects, end in _object_list(tokens, start)]
        readings += list(_relation_pair(tokens, start))
        for objects, relation, end in readings:
            if not _possible(objects):
                continue
            for background, stop in _background(tokens, end):
                if stop == len(tokens):
                    return ParsedCaption(objects, background, relation)
    return None


def parse_style(text: str) -> ParsedStyle | None:
    """The fill, colour and background a style prompt ("striped shapes on a black background") names, or None."""
    tokens = _tokens(text)
    if tokens is None:
        return None
    for fill, i in _optional(tokens, 0, FILLS):
        for colour, j in _optional(tokens, i, COLOURS):
            if not _phrase(tokens, j, ("shapes",)):
                continue
            for background, end in _background(tokens, j + 1):
                if end == len(tokens) and (fill, colour, background) != (None, None, None):
                    return ParsedStyle(fill, colour, background)
    return None


# ---------------------------------------------------------------------------------------------- scoring


def match_parsed(truth: Sequence[object], parsed: Sequence[ParsedObject], attributes: Sequence[str]) -> list:
    """For each true object, the parsed object paired with it (or None), pairing for the most agreeing attributes.

    Exhaustive over the pairings (a picture has at most a few objects), so the pairing is the best one, not a
    greedy guess; ties keep the prompt's order.
    """
    padded: list[ParsedObject | None] = [*parsed, *[None] * len(truth)]

    def agreeing(pairing: tuple[int, ...]) -> int:
        return sum(
            padded[j] is not None and getattr(padded[j], a) == getattr(t, a)
            for t, j in zip(truth, pairing, strict=True)
            for a in attributes
        )

    best = max(itertools.permutations(range(len(padded)), len(truth)), key=agreeing)
    return [padded[j] for j in best]


def named_attributes(
    parsed: ParsedCaption | None, truth: Sequence[object], background: str | None, attributes: Sequence[str]
) -> dict[str, float]:
    """Per attribute, the share of the true objects whose parsed partner names its value; `background` 0/1.

    A prompt that does not parse names nothing; a value left out counts as wrong (recall of the truth).
    """
    if parsed is None:
        scores = dict.fromkeys(attributes, 0.0)
        if background is not None:
            scores["background"] = 0.0
        return scores
    pairs = match_parsed(truth, parsed.objects, attributes)
    scores = {
        a: sum(p is not None and getattr(p, a) == getattr(t, a) for t, p in zip(truth, pairs, strict=True)) / len(truth)
        for a in attributes
    }
    if background is not None:
        scores["background"] = float(parsed.background == background)
    return scores
