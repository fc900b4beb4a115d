"""A tiny seeded language model for tests and the `tiny` set, and the word-level tokenizer the real-size builders use.

A random-init Llama whose words are ones a CLIP tokenizer knows, so guided decoding with it produces text CLIP can
score; it loads through the product's own `TransformersModel` like any local model directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


TINY_WORDS = (
    "a an the of on in with and at to is by for from this that very , . "
    "red orange yellow green blue purple pink white black gray grey brown gold silver colorful bright dark "
    "circle square triangle star heart cross crescent moon shape shapes ring dot line stripe stripes "
    "small large big tiny huge round flat solid outlined striped filled "
    "top bottom left right center middle corner side background foreground "
    "picture image photo painting drawing illustration art style digital simple minimal abstract modern "
    "cartoon icon logo pattern poster oil watercolor sketch vector flat-design"
)


def write_word_level_tokenizer(directory: Path, words: Sequence[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` with a chat template, saved in `directory` (made if missing).

    Its words are split on whitespace, so any word a CLIP tokenizer knows stays one token the CLIP can score.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "\n"]
    vocab = {token: i for i, token in enumerate([*specials, *dict.fromkeys(words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        additional_special_tokens=specials[3:6],
    )
    # The newline is an ordinary token (the decoder's stop rule looks for it), added so splitting keeps it.
    tokenizer.add_tokens(["\n"])
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} \n {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def write_tiny_causal_lm(directory: Path, seed: int = 0) -> Path:
    """A seeded random-init Llama with a word-level tokenizer and a chat template, in the transformers layout.

    Its words are ones a CLIP tokenizer knows, so guided decoding with it produces text CLIP can score. Meant for
    tests and the `tiny` model set: the choices it makes are arbitrary but deterministic.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = write_word_level_tokenizer(directory, TINY_WORDS.split())
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["</s>"],
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    # Random logits are nearly flat; a larger output scale gives the LM preferences, so its log-probs matter.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(directory, safe_serialization=True)
    return directory
