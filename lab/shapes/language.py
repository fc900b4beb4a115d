"""The `shapes` world's language model: SmolLM2-135M-Instruct taught to answer VGD's chat with the world's captions.

The bundled CLIP knows a few dozen words, and the base SmolLM2 answers VGD's instruction by writing about the task
("To determine the style of the image ..."): CLIP's guidance cannot pull it onto words it never proposes. A small
LoRA adapter (`pictoprompt.models.lora`), trained on chats in exactly the layout the decoder sends
(`pictoprompt.prompts.vgd_messages`, rendered by the model's own chat template), makes the LLM answer with sentences
of the caption grammar. The training answers are captions of freshly drawn training scenes (`random_scene`, which
never draws a held-out combination or the crescent); no evaluation scene is ever seen.

Each chat is one of VGD's three tasks:
- inversion (70%): the condition is a lexicon word, mostly one of the caption's own (as the closest CLIP word to a
  picture of that scene would be), sometimes any lexicon word (the closest word can be wrong); the answer is a
  caption of the scene at a random level of detail;
- style (20%): the answer is the scene's style in the world's words (`style_caption`);
- distillation (10%): the long prompt is the scene's full caption; the answer is its short form.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lab.shapes.lora import LoraAdapter
from lab.shapes.world import (
    caption_lexicon,
    caption_scene,
    full_caption,
    language_words,
    plain_caption,
    random_scene,
    style_caption,
)
from pictoprompt.models.llm_loading import default_gguf_path
from pictoprompt.models.llm_transformers import TransformersModel
from pictoprompt.models.shapes.scenes import Scene
from pictoprompt.prompts import VgdTask, vgd_messages

TASK_WEIGHTS: dict[VgdTask, float] = {"inversion": 0.7, "style": 0.2, "distillation": 0.1}
MAX_LENGTHS = (16, 32, 64)
"""The prompt lengths of the VGD paper's tables, named in the answer's opening."""
OWN_WORD_SHARE = 0.8
"""How often the condition is a word of the answer itself; otherwise any lexicon word."""
ADAPTER_FILE = "adapter.gguf"
LEXICON_FILE = "lexicon.txt"
DICTIONARY_FILE = "words.txt"


def load_base_llm() -> TransformersModel:
    """The bundled SmolLM2-135M-Instruct GGUF through transformers (dequantised to float32), for training."""
    return TransformersModel.from_gguf(default_gguf_path(), torch.device("cpu"))


@dataclass(frozen=True)
class Chat:
    task: VgdTask
    messages: tuple[str, str, str]
    """(system, user, answer opening), as `vgd_messages` writes them."""
    prompt_ids: list[int]
    answer_ids: list[int]
    """The answer's tokens after the opening, ending with the end-of-turn token."""
    answer: str


def _condition(rng: random.Random, answer: str, lexicon: tuple[str, ...]) -> str:
    own = [word for word in answer.split() if word in lexicon]
    return rng.choice(own) if own and rng.random() < OWN_WORD_SHARE else rng.choice(lexicon)


def short_caption(scene: Scene) -> str:
    """'a red circle and a blue star': colour and shape of each object, the least a prompt must say."""
    return " and ".join(plain_caption(obj, position=False) for obj in scene.objects)


def training_chat(llm: TransformersModel, rng: random.Random, lexicon: tuple[str, ...]) -> Chat:
    """One VGD chat about a freshly drawn training scene, with the world's answer."""
    task: VgdTask = rng.choices(list(TASK_WEIGHTS), weights=list(TASK_WEIGHTS.values()))[0]
    scene = random_scene(rng)
    if task in ("inversion", "style"):
        if task == "inversion":
            answer = caption_scene(scene, rng, detail=rng.uniform(0.2, 1.0))
        else:
            answer = style_caption(scene, rng, detail=rng.uniform(0.3, 1.0))
        # The opening promises a length; the answer keeps that promise.
        fitting = [n for n in MAX_LENGTHS if n >= len(llm.tokenize(answer))] or [MAX_LENGTHS[-1]]
        messages = vgd_messages(task, rng.choice(fitting), condition=_condition(rng, answer, lexicon))
    else:
        target = full_caption(scene)
        answer = short_caption(scene)
        messages = vgd_messages(task, max(1, round(0.3 * len(llm.tokenize(target)))), target_prompt=target)
    end_of_turn = llm.tokenizer.eos_token_id  # type: ignore[attr-defined]
    return Chat(task, messages, llm.chat_prompt(*messages), [*llm.tokenize(answer), end_of_turn], answer)


def chat_batch(llm: TransformersModel, seed: int, step: int, size: int) -> list[Chat]:
    """The chats of one training step, fixed by (seed, step)."""
    rng = random.Random(f"{seed}-llm-{step}")
    lexicon = caption_lexicon()
    return [training_chat(llm, rng, lexicon) for _ in range(size)]


def answer_loss(model: nn.Module, chats: list[Chat], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy of the answers' tokens given their chats (the chat itself is not learned)."""
    sequences = [chat.prompt_ids + chat.answer_ids for chat in chats]
    width = max(map(len, sequences))
    input_ids = torch.full((len(chats), width), pad_id)
    attention = torch.zeros((len(chats), width), dtype=torch.long)
    labels = torch.full((len(chats), width), -100)
    for row, (chat, sequence) in enumerate(zip(chats, sequences, strict=True)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention[row, : len(sequence)] = 1
        labels[row, len(chat.prompt_ids) : len(sequence)] = torch.tensor(chat.answer_ids)
    return model(input_ids=input_ids, attention_mask=attention, labels=labels).loss


def export_language(directory: Path, adapter: LoraAdapter, llm: TransformersModel) -> None:
    """Write `llm/adapter.gguf`, and the word lists `lexicon.txt` and `words.txt`, into the weights directory."""
    config = llm.model.config
    adapter.save_gguf(directory / "llm" / ADAPTER_FILE, config.num_attention_heads, config.num_key_value_heads)
    write_word_lists(directory)


def write_word_lists(directory: Path) -> None:
    """The start words (`caption_lexicon`) and the dictionary (`language_words`), one word per line."""
    (directory / LEXICON_FILE).write_text("\n".join(caption_lexicon()) + "\n")
    (directory / DICTIONARY_FILE).write_text("\n".join(language_words()) + "\n")
