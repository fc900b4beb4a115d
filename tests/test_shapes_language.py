"""The `shapes` world's language: the lexicon the beam starts from, style captions, and the LLM adapter's data."""

from __future__ import annotations

import json
import random
import re
import tempfile
from functools import cache
from pathlib import Path

import pytest
import torch

from lab.shapes.language import MAX_LENGTHS, answer_loss, chat_batch, short_caption, training_chat
from lab.shapes.train import TrainConfig, train
from lab.shapes.world import (
    LEXICON_FUNCTION_WORDS,
    caption_lexicon,
    caption_scene,
    language_words,
    random_scene,
    style_caption,
)
from lab.tiny_lm import write_tiny_causal_lm
from pictoprompt.models.llm_llama_cpp import LlamaCppModel
from pictoprompt.models.llm_loading import default_gguf_path
from pictoprompt.models.llm_transformers import TransformersModel
from pictoprompt.models.lora import read_gguf_adapter
from pictoprompt.models.shapes.scenes import COLOURS, NOVEL_SHAPE, TRAIN_SHAPES, Scene, SceneObject
from pictoprompt.prompts import vgd_messages


def test_the_lexicon_is_every_content_word_of_the_training_captions_and_nothing_else() -> None:
    lexicon = set(caption_lexicon())
    assert set(COLOURS) | set(TRAIN_SHAPES) <= lexicon
    assert NOVEL_SHAPE not in lexicon
    assert not lexicon & LEXICON_FUNCTION_WORDS
    rng = random.Random(3)
    seen = set()
    for _ in range(500):
        seen |= set(caption_scene(random_scene(rng), rng, detail=rng.random()).replace(",", "").split())
    assert seen - LEXICON_FUNCTION_WORDS == lexicon


def test_the_dictionary_holds_every_word_the_adapter_is_taught() -> None:
    rng = random.Random(5)
    seen: set[str] = set()
    for _ in range(300):
        scene = random_scene(rng)
        seen |= set(re.findall(r"[a-z]+", caption_scene(scene, rng, rng.random()) + " " + style_caption(scene, rng)))
    assert seen == set(language_words())


def test_a_style_caption_names_only_what_every_object_shares() -> None:
    rng = random.Random(0)
    shared = Scene(
        "black",
        (SceneObject("circle", "red", fill="striped"), SceneObject("square", "red", "small", "left", "striped")),
    )
    mixed = Scene(
        "white",
        (SceneObject("circle", "red", fill="outlined"), SceneObject("square", "blue", "small", "left", "striped")),
    )
    shared_texts = {style_caption(shared, rng, detail=1.0) for _ in range(20)}
    assert shared_texts == {"striped red shapes on a black background"}
    for _ in range(50):
        text = style_caption(mixed, rng, detail=rng.random())
        # Neither fill nor colour is shared, so only the background is left to name.
        assert text == "shapes on a white background"


@cache
def tiny_llm() -> TransformersModel:
    directory = write_tiny_causal_lm(Path(tempfile.mkdtemp(prefix="pictoprompt-language-lm-")))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(directory))
    return TransformersModel(model, AutoTokenizer.from_pretrained(str(directory)), str(directory))


def test_training_chats_are_vgds_chat_with_the_worlds_answer() -> None:
    llm = tiny_llm()
    lexicon = caption_lexicon()
    rng = random.Random(7)
    tasks = set()
    for _ in range(60):
        chat = training_chat(llm, rng, lexicon)
        tasks.add(chat.task)
        assert chat.answer_ids[-1] == llm.tokenizer.eos_token_id
        assert chat.answer_ids[:-1] == llm.tokenize(chat.answer)
        assert chat.prompt_ids == llm.chat_prompt(*chat.messages)
        _, user, opening = chat.messages
        promised = int(re.search(r"within (\d+) tokens", opening).group(1))
        if chat.task == "distillation":
            assert set(chat.answer.split()) <= {"a", "an", "and", *COLOURS, *TRAIN_SHAPES}
        else:
            assert promised in MAX_LENGTHS
            assert promised >= len(llm.tokenize(chat.answer)) or promised == MAX_LENGTHS[-1]
            condition = re.search(r"image: (\w+)$", user)
            assert condition is not None and condition.group(1) in lexicon
    assert tasks == {"inversion", "style", "distillation"}


def test_the_chat_prompt_is_the_decoders_own() -> None:
    """Training must see exactly what `vgd_prompt` sends at inference, or the adapter learns another format."""
    from pictoprompt.methods.vgd import vgd_prompt

    llm = tiny_llm()
    assert vgd_prompt(llm, "inversion", 32, condition="red") == llm.chat_prompt(
        *vgd_messages("inversion", 32, condition="red")
    )


def test_batches_are_fixed_by_seed_and_step() -> None:
    llm = tiny_llm()
    first = [c.answer for c in chat_batch(llm, 0, 5, 6)]
    assert first == [c.answer for c in chat_batch(llm, 0, 5, 6)]
    assert first != [c.answer for c in chat_batch(llm, 0, 6, 6)]


def test_short_caption_names_each_objects_colour_and_shape() -> None:
    scene = Scene("white", (SceneObject("circle", "red"), SceneObject("star", "orange", position="left")))
    assert short_caption(scene) == "a red circle and an orange star"


def test_the_loss_is_the_cross_entropy_of_the_answer_alone() -> None:
    llm = tiny_llm()
    chats = chat_batch(llm, 1, 0, 3)
    ids = chats[0].prompt_ids + chats[0].answer_ids
    with torch.no_grad():
        log_probs = llm.model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        start = len(chats[0].prompt_ids)
        targets = torch.tensor(chats[0].answer_ids)
        expected = -log_probs[start - 1 : len(ids) - 1].gather(1, targets[:, None]).mean()
        # Padding the other rows of a batch changes nothing for this one.
        alone = answer_loss(llm.model, chats[:1], pad_id=0)
    torch.testing.assert_close(alone, expected)


@pytest.mark.slow
def test_the_llm_stage_runs_alone_resumes_and_exports_an_adapter_llama_cpp_loads(tmp_path: Path) -> None:
    config = TrainConfig(llm_steps=2, llm_batch=2, llm_rank=2, llm_warmup=1)
    weights = tmp_path / "weights"
    train(tmp_path / "run", config, export_to=weights, only=["llm"])
    adapter = weights / "llm" / "adapter.gguf"
    alpha, pairs = read_gguf_adapter(adapter)
    assert alpha == config.llm_alpha and len(pairs) == 30 * 7
    assert (weights / "lexicon.txt").read_text().split() == list(caption_lexicon())
    record = json.loads((weights / "training.json").read_text())
    assert record["stages"]["llm"]["steps"] == 2
    assert record["config"]["llm_rank"] == 2
    # Two steps at a high learning rate moved B away from zero.
    assert any(abs(b).max() > 0 for _, b in pairs.values())
    llm = LlamaCppModel(default_gguf_path(), n_threads=1, adapter=adapter)
    assert llm.adapter_id == str(adapter)
    before = adapter.read_bytes()
    train(tmp_path / "run", config, export_to=weights, only=["llm"])
    assert adapter.read_bytes() == before  # resumed a finished stage: no step taken, same adapter

    with pytest.raises(ValueError, match="can run alone"):
        train(tmp_path / "run", config, export_to=weights, only=["unet"])


@pytest.mark.slow
def test_the_shapes_llm_answers_in_captions_through_both_backends() -> None:
    """The shipped adapter through llama.cpp (the default) and merged into transformers: both open the answer to
    VGD's inversion chat with the same word, and continue it greedily into a sentence of the world."""
    from lab.shapes.world import language_words
    from pictoprompt.methods.vgd import vgd_prompt
    from pictoprompt.models.llm_loading import load_language_model
    from pictoprompt.models.profiles import get_profile

    spec = get_profile("shapes").llm
    answers = []
    for backend in ("llama_cpp", "transformers"):
        llm = load_language_model(spec.model_copy(update={"backend": backend}), torch.device("cpu"))
        assert llm.adapter_id is not None and llm.adapter_id.endswith("adapter.gguf")
        prompt = vgd_prompt(llm, "inversion", 32, condition="circle")
        tokens: list[int] = []
        with llm.start(prompt, max_beams=1, max_new_tokens=24) as beams:
            for _ in range(24):
                token = int(beams.log_probs[0].argmax())
                if llm.stop_tokens[token]:
                    break
                tokens.append(token)
                beams.extend([0], [token])
        answers.append(llm.detokenize(tokens).strip())
    for answer in answers:
        assert "circle" in answer.split(), answers
        assert set(re.findall(r"[a-z]+", answer.lower())) <= set(language_words()), answers
    assert answers[0].split()[0] == answers[1].split()[0], answers
