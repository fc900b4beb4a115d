"""VGD's start words: a profile's word list, or the CLIP's whole vocabulary."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lab.shapes.world import caption_lexicon, language_words
from pictoprompt.errors import InvalidInputError, ModelNotFoundError
from pictoprompt.methods.vgd import clip_vocabulary, runtime_vocabulary, written_in
from pictoprompt.models.profiles import get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.models.shapes import weights_present


def test_a_profile_word_list_is_read_once_without_blanks_comments_or_repeats(tmp_path: Path) -> None:
    words = tmp_path / "words.txt"
    words.write_text("# the world's words\nred\n\ncircle\nred\n  blue  \n")
    runtime = Runtime(get_profile("tiny").model_copy(update={"vocabulary": str(words)}))
    assert runtime.vocabulary_words() == ["red", "circle", "blue"]
    words.write_text("changed\n")
    assert runtime.vocabulary_words() == ["red", "circle", "blue"], "loaded once, like the models"
    vocabulary = runtime_vocabulary(runtime)
    assert vocabulary.words == ["red", "circle", "blue"]
    clip = runtime.clip()
    with torch.no_grad():
        expected = torch.nn.functional.normalize(clip.encode_text(["red", "circle", "blue"]).float(), dim=-1)
    torch.testing.assert_close(vocabulary.embeddings, expected)
    target = clip.encode_text(["circle"])
    assert vocabulary.closest(target) == "circle"


def test_without_a_word_list_the_whole_clip_vocabulary_is_used() -> None:
    runtime = Runtime(get_profile("tiny"))
    assert runtime.vocabulary_words() is None


def test_a_missing_or_empty_word_list_is_an_error_that_says_what_to_do(tmp_path: Path) -> None:
    runtime = Runtime(get_profile("tiny").model_copy(update={"vocabulary": str(tmp_path / "absent.txt")}))
    with pytest.raises(ModelNotFoundError, match=r"absent\.txt"):
        runtime.vocabulary_words()
    with pytest.raises(InvalidInputError, match="empty"):
        clip_vocabulary(Runtime(get_profile("tiny")).clip(), words=[])


@pytest.mark.skipif(not weights_present(), reason="shapes weights absent")
def test_the_shapes_set_starts_from_its_worlds_lexicon() -> None:
    runtime = Runtime(get_profile("shapes"))
    assert runtime.vocabulary_words() == list(caption_lexicon())


def test_a_dictionary_admits_its_words_a_growing_last_word_and_plain_punctuation() -> None:
    dictionary = frozenset({"a", "red", "circle", "on", "the", "left"})
    assert written_in("A red circle, on the left.", dictionary, complete=True)
    assert written_in("a red cir", dictionary, complete=False), "the last word may still be growing"
    assert not written_in("a red cir", dictionary, complete=True), "an ended prompt has whole words only"
    assert not written_in("a red rectangle", dictionary, complete=False)
    assert not written_in("a red rect", dictionary, complete=False)
    assert not written_in("red: 2022", dictionary, complete=False)
    assert written_in("", dictionary, complete=False)


@pytest.mark.skipif(not weights_present(), reason="shapes weights absent")
def test_the_shapes_dictionary_is_its_worlds_language() -> None:
    runtime = Runtime(get_profile("shapes"))
    assert runtime.dictionary_words() == list(language_words())
    assert runtime_vocabulary(runtime).dictionary == frozenset(language_words())
    assert Runtime(get_profile("tiny")).dictionary_words() is None
