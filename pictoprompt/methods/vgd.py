"""Visually Guided Decoding (VGD, paper 002_4f8ace6849c1227f, section 3): an LLM writes, CLIP steers every token.

The objective (Eq. 7-8) is `argmax_T P_CLIP(I | T) * P_LLM(T)^alpha`, decoded left to right with a beam search:

1. *LLM prompting* (appendix A.1): a system prompt, a task prompt (inversion, style or distillation) and the
   assistant's answer begun with "Sure, here is a prompt for stable diffusion within N tokens:".
2. *Beam initialisation*: the CLIP-vocabulary word closest to the target is given to the LLM as the task's
   condition (the authors' code appends it to the user prompt); the vocabulary's embeddings are computed once
   per CLIP (`clip_vocabulary`, cached on disk). A profile may restrict the start words to the words its CLIP was
   trained on (`Profile.vocabulary`): the `shapes` CLIP learnt a few dozen words, and the rest of its 49,408 token
   embeddings are untrained noise, so "the closest word" over all of them is noise too ("shored", "nephro").
3. *Expansion and pruning*: each step the LLM proposes the `num_beams * beam_expand_factor` (beam, token) pairs
   with the highest cumulative log-probability; each candidate text is scored
   `llm_alpha * cumulative LLM log-prob + clip_alpha * log_softmax_over_candidates(logit_scale * cos(target, text))`
   (the authors' code; llm_alpha = 1 and clip_alpha = 1.5 is the paper's alpha = 0.67), and the best
   `num_beams` are kept. With several target rows the CLIP log-softmax is taken per row and averaged.
   The first token must hold a letter or digit (our addition: SmolLM2 otherwise opens its answer with a
   code fence or a quote, and a fence followed by a newline ended the search with "```" as the prompt).
4. *Termination*: a stop token (end of turn, or any token holding a newline) ends a hypothesis; the search ends
   at `max_length` tokens, or once `num_beams` hypotheses have ended and no live beam scores better than the
   best of them (expansion no longer improves the score). The answer is the best hypothesis by
   `score / ((length_penalty_offset + len) / (length_penalty_offset + 1)) ** length_penalty_alpha`.

The LLM's and CLIP's tokenisers differ, so CLIP always sees the decoded text. A target is any set of CLIP-space
vectors: image embeddings (inversion, fusion), their normalised mean (shared style), a text embedding
(distillation) or a vector from another method (SD-IPC, EDITOR). The settings are `VgdConfig`'s; the paper's
Table 2 ablations are `clip_alpha=0` (no CLIP term) and `llm_alpha=0` (no LLM term; the LLM still proposes).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from pictoprompt.configs import VgdConfig
from pictoprompt.errors import InvalidInputError, PictopromptError
from pictoprompt.models.clip import ClipModel, shifted_views, with_text_tower
from pictoprompt.models.llm import LanguageModel, perplexity
from pictoprompt.models.runtime import Runtime
from pictoprompt.models.sources import resolve_builtin
from pictoprompt.progress import Progress
from pictoprompt.prompts import VgdTask, load_prompt, vgd_messages

logger = logging.getLogger(__name__)

Task = VgdTask
_VOCABULARY_PROBE = "a photo of a red circle on a blue background"


# ------------------------------------------------------------------------------------------------ targets


def image_targets(clip: ClipModel, images: Sequence[Image.Image]) -> Tensor:
    """One unit target row per image (N, P): the mean direction of its `shifted_views`, which reads a picture
    drawn at another size as steadily as the CLIP's own renders. Several rows: the decoder averages their per-row
    log-softmax."""
    views = [shifted_views(image, clip.image_size) for image in images]
    with torch.no_grad():
        embeddings = F.normalize(clip.encode_image([view for group in views for view in group]).float(), dim=-1)
    means = [group.mean(0) for group in embeddings.split([len(group) for group in views])]
    return F.normalize(torch.stack(means), dim=-1)


def style_target(clip: ClipModel, images: Sequence[Image.Image]) -> Tensor:
    """The images' shared direction (1, P): the mean of their unit embeddings keeps what they have in common."""
    return F.normalize(image_targets(clip, images), dim=-1).mean(0, keepdim=True)


def style_reader(
    clip: ClipModel, vocabulary: ClipVocabulary | None, config: VgdConfig
) -> tuple[ClipModel, ClipVocabulary | None]:
    """The CLIP the style decode scores with, and its start words: with `config.style_text_encoder` (ours) the CLIP
    with that text tower (`with_text_tower`; same image embeddings), else the CLIP and `vocabulary` as they are."""
    if config.style_text_encoder is None:
        return clip, vocabulary
    reader = with_text_tower(clip, resolve_builtin(config.style_text_encoder))
    if vocabulary is None:
        return reader, None
    return reader, replace(clip_vocabulary(reader, words=vocabulary.words), dictionary=vocabulary.dictionary)


def text_target(clip: ClipModel, prompt: str) -> Tensor:
    """A prompt's CLIP text embedding (1, P): the target of prompt distillation."""
    with torch.no_grad():
        return clip.encode_text([prompt]).float()


def clip_token_count(clip: ClipModel, texts: Sequence[str]) -> list[int]:
    """Tokens of each text under the CLIP tokenizer, start and end markers excluded (at most context - 2)."""
    return (clip.eos_positions(clip.tokenize(texts)) - 1).tolist()


# ------------------------------------------------------------------------------------------------ vocabulary


@dataclass(frozen=True)
class ClipVocabulary:
    """The start words (the CLIP tokenizer's vocabulary, or a profile's list) with their unit text embeddings
    (W, P), and the profile's dictionary when it has one (see `written_in`)."""

    words: list[str]
    embeddings: Tensor
    dictionary: frozenset[str] | None = None

    def closest(self, targets: Tensor) -> str:
        """The word with the highest cosine similarity to the targets (averaged over rows)."""
        similarity = F.normalize(targets.float(), dim=-1).to(self.embeddings.device) @ self.embeddings.T
        return self.words[int(similarity.mean(0).argmax())]


_vocabularies: weakref.WeakKeyDictionary[ClipModel, ClipVocabulary] = weakref.WeakKeyDictionary()
_word_lists: weakref.WeakKeyDictionary[ClipModel, dict[tuple[str, ...], ClipVocabulary]] = weakref.WeakKeyDictionary()
_vocabulary_lock = threading.Lock()


def clip_fingerprint(clip: ClipModel) -> str:
    """A key that changes with the CLIP's text tower or tokenizer: its projection and a probe sentence's embedding."""
    with torch.no_grad():
        probe = clip.encode_text([_VOCABULARY_PROBE]).float().cpu().numpy()
    digest = hashlib.sha256()
    digest.update(f"{type(clip).__name__}:{clip.vocab_size}:{clip.embed_dim}:{clip.logit_scale:.4f}".encode())
    digest.update(clip.text_projection.float().cpu().numpy().tobytes())
    # Rounded, so the same weights on another device or batch layout still find the file.
    digest.update(np.round(probe, 3).tobytes())
    return digest.hexdigest()[:24]


def clip_vocabulary(
    clip: ClipModel,
    cache_dir: Path | None = None,
    batch_size: int = 1024,
    progress: Progress | None = None,
    words: Sequence[str] | None = None,
) -> ClipVocabulary:
    """The words a beam may start from, with their text embeddings: `words` when given (the words a small CLIP was
    trained on), else every distinct word of the CLIP tokenizer's vocabulary.

    Either is computed once per CLIP and kept in memory per model; the whole vocabulary also, with `cache_dir`, in a
    file keyed by `clip_fingerprint`, so a restart does not pay for the 49,408 text encodings again.
    """
    if words is not None:
        key = tuple(words)
        if not key:
            raise InvalidInputError("The profile's start-word list is empty; list at least one word, or drop it.")
        with _vocabulary_lock:
            known = _word_lists.setdefault(clip, {})
            if key not in known:
                with torch.no_grad():
                    known[key] = ClipVocabulary(list(key), F.normalize(clip.encode_text(list(key)).float(), dim=-1))
            return known[key]
    with _vocabulary_lock:
        if clip in _vocabularies:
            return _vocabularies[clip]
        path = cache_dir / f"clip-vocabulary-{clip_fingerprint(clip)}.pt" if cache_dir is not None else None
        if path is not None and path.is_file():
            stored = torch.load(path, map_location=clip.device, weights_only=True)
            vocabulary = ClipVocabulary(stored["words"], stored["embeddings"])
        else:
            vocabulary = _embed_vocabulary(clip, batch_size, progress or Progress())
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_suffix(".partial")
                torch.save({"words": vocabulary.words, "embeddings": vocabulary.embeddings.cpu()}, partial)
                partial.replace(path)
        _vocabularies[clip] = vocabulary
        return vocabulary


def runtime_vocabulary(runtime: Runtime, progress: Progress | None = None) -> ClipVocabulary:
    """The start words of the runtime's profile: its word list when it names one, else the CLIP's whole vocabulary
    (cached under the runtime's cache folder)."""
    vocabulary = clip_vocabulary(runtime.clip(), runtime.cache_dir, progress=progress, words=runtime.vocabulary_words())
    dictionary = runtime.dictionary_words()
    return replace(vocabulary, dictionary=frozenset(dictionary)) if dictionary is not None else vocabulary


_WORD_PIECE = re.compile(r"[a-z]+")
_PROMPT_CHARACTERS = re.compile(r"[a-z ,.'-]*")


def written_in(text: str, dictionary: frozenset[str], complete: bool) -> bool:
    """Whether `text` uses only the dictionary's words (and plain punctuation); unless `complete`, its last word may
    still be growing and need only begin a dictionary word.

    Our addition to VGD, for a CLIP that learnt few words: it cannot judge a word it never learnt (its embedding
    is untrained, so it scores at random, and the generator's text encoder ignores it too), so a candidate with
    such a word is dropped rather than left to chance ("a large solid red rectangle" on the `shapes` set).
    """
    lowered = text.lower()
    if not _PROMPT_CHARACTERS.fullmatch(lowered):
        return False
    words = _WORD_PIECE.findall(lowered)
    growing = not complete and bool(words) and lowered[-1].isalpha()
    finished = words[:-1] if growing else words
    if any(word not in dictionary for word in finished):
        return False
    return not growing or any(known.startswith(words[-1]) for known in dictionary)


def uses_any(text: str, words: frozenset[str], complete: bool) -> bool:
    """Whether `text` has one of `words` (lower-cased); unless `complete`, its last word may still be growing and
    counts only once it is finished.

    Our addition to VGD, for the style of several pictures (`methods.shared_style`): a style prompt must not use
    a word that only some of the pictures' own prompts have.
    """
    found = _WORD_PIECE.findall(text.lower())
    if not complete and found and text[-1:].isalpha():
        found = found[:-1]
    return any(word in words for word in found)


def copied_from(text: str, source: Sequence[str], complete: bool) -> bool:
    """Whether `text`'s words are `source`'s words (lower-cased) in their order, some left out; unless `complete`,
    its last word may still be growing and need only begin the next source word it could be.

    Our extension to VGD's distillation (`distill(copy=True)`): the short prompt may only leave words out of the long
    one, so it cannot invent an object, a colour or a place the long prompt does not have.
    """
    lowered = text.lower()
    if not _PROMPT_CHARACTERS.fullmatch(lowered):
        return False
    words = _WORD_PIECE.findall(lowered)
    growing = not complete and bool(words) and lowered[-1].isalpha()
    position = 0
    for word in words[:-1] if growing else words:
        try:
            position = source.index(word, position) + 1
        except ValueError:
            return False
    return not growing or any(known.startswith(words[-1]) for known in source[position:])


def _embed_vocabulary(clip: ClipModel, batch_size: int, progress: Progress) -> ClipVocabulary:
    # Word pieces and whole words that decode alike ("dog", "dog</w>") are one word; byte fragments and
    # punctuation carry no meaning to start a prompt from.
    words = list(dict.fromkeys(clip.decode([token]) for token in range(clip.vocab_size)))
    words = [word for word in words if any(c.isalpha() for c in word)]
    logger.info("embedding %d CLIP vocabulary words (once per CLIP)", len(words))
    batches = []
    with torch.no_grad():
        for begin in range(0, len(words), batch_size):
            progress.step(begin, len(words), "Embedding the CLIP vocabulary (once per model)")
            batches.append(F.normalize(clip.encode_text(words[begin : begin + batch_size]).float(), dim=-1))
    return ClipVocabulary(words, torch.cat(batches))


# ------------------------------------------------------------------------------------------------ LLM prompts


def vgd_prompt(
    llm: LanguageModel, task: Task, max_length: int, condition: str = "", target_prompt: str = ""
) -> list[int]:
    """The chat of appendix A.1 as LLM token ids: system prompt, task prompt, the answer's opening words."""
    return llm.chat_prompt(*vgd_messages(task, max_length, condition=condition, target_prompt=target_prompt))


def text_perplexities(llm: LanguageModel, texts: Sequence[str]) -> list[float]:
    """Perplexity of each text as the LLM's answer to a neutral request for an image prompt.

    The same context for every text, whichever method wrote it, so perplexities compare across methods.
    """
    prompt = llm.chat_prompt(load_prompt("vgd_system"), load_prompt("vgd_perplexity"))
    tokens = [llm.tokenize(text) for text in texts]
    return [perplexity(ll, len(t)) for ll, t in zip(llm.log_likelihoods(prompt, tokens), tokens, strict=True)]


# ------------------------------------------------------------------------------------------------ scoring


def clip_log_probs(text_embeddings: Tensor, targets: Tensor, logit_scale: float) -> Tensor:
    """log P_CLIP(target | text) over the candidates (C,): per target row a log-softmax of the CLIP logits
    `logit_scale * cos(target, text)` across the C candidates, averaged over rows."""
    logits = logit_scale * F.normalize(targets.float(), dim=-1) @ F.normalize(text_embeddings.float(), dim=-1).T
    return logits.log_softmax(dim=-1).mean(0)


def step_scores(llm_log_probs: Tensor, clip_scores: Tensor, llm_alpha: float = 1.0, clip_alpha: float = 1.5) -> Tensor:
    """A step's candidate scores: `llm_alpha * cumulative LLM log-prob + clip_alpha * clip_log_probs`."""
    return llm_alpha * llm_log_probs + clip_alpha * clip_scores


def length_penalty(length: int, alpha: float = 1.2, offset: int = 5) -> float:
    """((offset + length) / (offset + 1)) ** alpha: the final choice divides the score by this."""
    return ((offset + length) / (offset + 1)) ** alpha


# ------------------------------------------------------------------------------------------------ decoder


@dataclass(frozen=True)
class Hypothesis:
    """One decoded prompt."""

    text: str
    token_ids: list[int]
    score: float
    """The step score when it ended (or when the search stopped)."""
    final_score: float
    """`score / length_penalty(len(token_ids))`: what ranks the hypotheses."""
    llm_log_prob: float
    """Cumulative LLM log-probability of its tokens, given the VGD prompt."""
    finished: bool
    """Ended by a stop token; otherwise cut by the length limit or the end of the search."""


@dataclass
class VgdResult:
    hypotheses: list[Hypothesis]
    """Distinct texts, best first."""
    initial_condition: str | None
    steps: int
    beams: list[list[list[int]]] = field(default_factory=list)
    """The LLM token ids of the kept beams after each step."""

    @property
    def best(self) -> Hypothesis:
        if not self.hypotheses:
            raise PictopromptError(
                "Guided decoding produced no text (every candidate was empty or over its budget); allow more tokens."
            )
        return self.hypotheses[0]


class _TextEmbeddings:
    """CLIP embeddings of candidate texts for one decode, each distinct text encoded once."""

    def __init__(self, clip: ClipModel) -> None:
        self.clip = clip
        self.known: dict[str, Tensor] = {}

    def __call__(self, texts: Sequence[str]) -> Tensor:
        new = [text for text in dict.fromkeys(texts) if text not in self.known]
        if new:
            # All of a step's new candidates in one forward pass.
            with torch.no_grad():
                embeddings = self.clip.encode_text(new).float()
            self.known.update(zip(new, embeddings, strict=True))
        return torch.stack([self.known[text] for text in texts])


def repeating_tokens(tokens: Sequence[int], ngram_size: int) -> list[int]:
    """The next tokens that would repeat a run of `ngram_size` tokens already in `tokens`."""
    if ngram_size <= 0 or len(tokens) < ngram_size - 1:
        return []
    context = tuple(tokens[len(tokens) - ngram_size + 1 :])
    return [
        tokens[i + ngram_size - 1]
        for i in range(len(tokens) - ngram_size + 1)
        if tuple(tokens[i : i + ngram_size - 1]) == context
    ]


@dataclass
class _Step:
    """One expansion: the candidate (beam, token) pairs with their texts and scores."""

    parents: list[int]
    tokens: list[int]
    stops: Tensor
    """Whether each candidate's token ends its hypothesis (bool, C)."""
    llm_log_probs: Tensor
    """Cumulative LLM log-probability of each candidate (C,)."""
    texts: list[str]
    scores: Tensor = field(default_factory=lambda: torch.zeros(0))
    """Step scores (C,); -inf for a candidate a constraint drops."""


@dataclass
class _Search:
    """A guided beam search in progress: the live beams, the hypotheses that have ended, and the history."""

    length_penalty_alpha: float
    length_penalty_offset: int
    texts: list[str] = field(default_factory=lambda: [""])
    tokens: list[list[int]] = field(default_factory=lambda: [[]])
    scores: Tensor = field(default_factory=lambda: torch.zeros(1))
    cumulative: Tensor = field(default_factory=lambda: torch.zeros(1))
    """Cumulative LLM log-probability of each live beam."""
    kept: tuple[list[int], list[int]] = ([], [])
    """The (parent, token) pairs kept at the last step, which the LLM has yet to run on."""
    finished: dict[str, tuple[list[int], float, float]] = field(default_factory=dict)
    """Ended hypotheses by text (several stop tokens can end the same beam): (token ids, score, LLM log-prob)."""
    history: list[list[list[int]]] = field(default_factory=list)
    steps: int = 0

    def penalised(self, score: float, length: int) -> float:
        return score / length_penalty(length, self.length_penalty_alpha, self.length_penalty_offset)

    def end_hypotheses(self, step: _Step) -> None:
        """Every candidate whose token stops it (and that no constraint dropped) becomes a finished hypothesis."""
        for i in torch.nonzero(step.stops & torch.isfinite(step.scores)).flatten().tolist():
            text, score = step.texts[i], float(step.scores[i])
            if text not in self.finished or score > self.finished[text][1]:
                self.finished[text] = (self.tokens[step.parents[i]], score, float(step.llm_log_probs[i]))

    def keep_best(self, step: _Step, num_beams: int) -> bool:
        """Keep the `num_beams` best candidates that go on; False when none is left to keep."""
        scores = step.scores.clone()
        scores[step.stops] = -math.inf
        alive = int(torch.isfinite(scores).sum())
        if alive == 0:
            return False
        keep = scores.topk(min(num_beams, alive)).indices.tolist()
        parents, tokens = [step.parents[i] for i in keep], [step.tokens[i] for i in keep]
        self.kept = (parents, tokens)
        self.tokens = [[*self.tokens[p], t] for p, t in zip(parents, tokens, strict=True)]
        self.texts = [step.texts[i] for i in keep]
        self.scores = scores[keep]
        self.cumulative = step.llm_log_probs[keep]
        self.history.append(self.tokens)
        return True

    def converged(self, num_beams: int) -> bool:
        """Expansion no longer improves the score once as many hypotheses as beams have ended and the best live beam
        does not beat the best of them."""
        if len(self.finished) < num_beams:
            return False
        best_ended = max(self.penalised(score, len(ids)) for ids, score, _ in self.finished.values())
        return self.penalised(float(self.scores[0]), self.steps) <= best_ended

    def hypotheses(self) -> list[Hypothesis]:
        """Ended and live hypotheses, one per distinct non-empty text (its best), best first by penalised score."""
        candidates = [(text, ids, score, llm_lp, True) for text, (ids, score, llm_lp) in self.finished.items()]
        candidates += [
            (text, ids, float(score), float(llm_lp), False)
            for text, ids, score, llm_lp in zip(self.texts, self.tokens, self.scores, self.cumulative, strict=True)
        ]
        best: dict[str, Hypothesis] = {}
        for text, ids, score, llm_lp, done in candidates:
            final = self.penalised(score, len(ids))
            if text and (text not in best or final > best[text].final_score):
                best[text] = Hypothesis(text, ids, score, final, llm_lp, done)
        return sorted(best.values(), key=lambda h: h.final_score, reverse=True)


@dataclass(frozen=True)
class Limits:
    """What one decode may write: at most `max_length` LLM tokens (and `max_clip_tokens` CLIP tokens, distillation's
    budget), no stop before `min_length` tokens, only words of `dictionary` (`written_in`), only `copy_from`'s
    words in its order, some left out (`copied_from`), and none of `excluded_words` (`uses_any`)."""

    max_length: int = 32
    min_length: int = 1
    max_clip_tokens: int | None = None
    dictionary: frozenset[str] | None = None
    copy_from: str | None = None
    excluded_words: frozenset[str] = frozenset()


def _allowed(llm: LanguageModel, log_probs: Tensor, step: int, search: _Search, limits: Limits, ngram: int) -> Tensor:
    """The next-token log-probabilities with what the rules forbid set to -inf: banned tokens, a wordless first
    token, a repeated `ngram`, and a stop before `min_length` tokens."""
    allowed = log_probs.clone()
    allowed[:, llm.banned_tokens] = -math.inf
    if step == 1:
        allowed[:, llm.wordless_tokens] = -math.inf
    for row, tokens_so_far in enumerate(search.tokens):
        allowed[row, repeating_tokens(tokens_so_far, ngram)] = -math.inf
    if step <= limits.min_length:
        allowed[:, llm.stop_tokens] = -math.inf
    return allowed


def _expand(llm: LanguageModel, search: _Search, log_probs: Tensor, proposals: int) -> _Step:
    """The `proposals` (beam, token) pairs with the highest cumulative LLM log-probability, and their texts."""
    totals = (search.cumulative[:, None] + log_probs).flatten()
    top = totals.topk(min(proposals, int(torch.isfinite(totals).sum())))
    vocabulary_size = log_probs.shape[1]
    parents, tokens = (top.indices // vocabulary_size).tolist(), (top.indices % vocabulary_size).tolist()
    stops = llm.stop_tokens[top.indices % vocabulary_size]
    texts = [
        search.texts[p] if stop else llm.detokenize([*search.tokens[p], t]).strip()
        for p, t, stop in zip(parents, tokens, stops.tolist(), strict=True)
    ]
    return _Step(parents, tokens, stops, top.values, texts)


class _Scorer:
    """The step score of each candidate (`step_scores`), -inf where a limit (CLIP token budget, dictionary, copied
    or excluded words) drops it."""

    def __init__(self, clip: ClipModel, targets: Tensor, limits: Limits, config: VgdConfig) -> None:
        self.clip, self.targets, self.limits, self.config = clip, targets, limits, config
        self.embed = _TextEmbeddings(clip)
        self.source_words = _WORD_PIECE.findall(limits.copy_from.lower()) if limits.copy_from is not None else None

    def __call__(self, step: _Step) -> Tensor:
        clip, limits, config = self.clip, self.limits, self.config
        if config.clip_alpha:
            clip_scores = clip_log_probs(self.embed(step.texts), self.targets, clip.logit_scale).cpu()
        else:
            clip_scores = torch.zeros(len(step.texts))
        scores = step_scores(step.llm_log_probs, clip_scores, config.llm_alpha, config.clip_alpha)
        if limits.max_clip_tokens is not None:
            scores[torch.tensor(clip_token_count(clip, step.texts)) > limits.max_clip_tokens] = -math.inf
        stops = step.stops.tolist()
        if limits.dictionary is not None:
            unknown = [not written_in(t, limits.dictionary, bool(s)) for t, s in zip(step.texts, stops, strict=True)]
            scores[torch.tensor(unknown)] = -math.inf
        if limits.excluded_words:
            excluded = [uses_any(t, limits.excluded_words, bool(s)) for t, s in zip(step.texts, stops, strict=True)]
            scores[torch.tensor(excluded)] = -math.inf
        if self.source_words is not None:
            source = self.source_words
            invented = [not copied_from(t, source, bool(s)) for t, s in zip(step.texts, stops, strict=True)]
            scores[torch.tensor(invented)] = -math.inf
        return scores


def guided_decode(
    llm: LanguageModel,
    clip: ClipModel,
    targets: Tensor,
    prompt_ids: Sequence[int],
    limits: Limits = Limits(),
    config: VgdConfig = VgdConfig(),
    progress: Progress | None = None,
) -> VgdResult:
    """Beam-search the LLM's answer to `prompt_ids`, each step rescored by CLIP against `targets` (N, P).

    Each step (section 3, steps 3-4): the LLM proposes `num_beams * beam_expand_factor` candidates (`_expand`,
    within the rules of `_allowed`), CLIP scores them (`_Scorer`, within the `limits`), candidates that end become
    hypotheses, and the best `num_beams` that go on are kept; the search stops at `max_length`, when nothing goes on,
    or once it has `converged`. `no_repeat_ngram_size` (ours; 0 turns it off) keeps a beam from repeating any run of
    that many tokens: a small LLM otherwise loops ("Shored: Shored: Shored: ..."), and CLIP does not penalise the
    loop. Each beam's LLM cache is reused (the authors' code recomputes every beam each step: same beams, slower).
    """
    if targets.ndim != 2 or targets.shape[0] == 0:
        raise InvalidInputError("The decoder needs at least one target vector, as a (N, P) tensor.")
    progress = progress or Progress()
    score = _Scorer(clip, targets.float().to(clip.device), limits, config)
    search = _Search(config.length_penalty_alpha, config.length_penalty_offset)
    num_beams, max_length = config.num_beams, limits.max_length
    with llm.start(prompt_ids, max_beams=num_beams, max_new_tokens=max_length) as beams:
        for number in range(1, max_length + 1):
            if search.steps:
                # The LLM runs on the tokens kept last step only now that the search goes on.
                beams.extend(*search.kept)
            log_probs = _allowed(llm, beams.log_probs, number, search, limits, config.no_repeat_ngram_size)
            step = _expand(llm, search, log_probs, num_beams * config.beam_expand_factor)
            step.scores = score(step)
            search.end_hypotheses(step)
            if not search.keep_best(step, num_beams):
                break
            search.steps = number
            progress.step(number, max_length, f"Guided decoding: token {number} of {max_length}")
            if search.converged(num_beams):
                break
    return VgdResult(search.hypotheses(), None, search.steps, search.history)


# ------------------------------------------------------------------------------------------------ tasks


def invert(
    llm: LanguageModel,
    clip: ClipModel,
    targets: Tensor,
    *,
    task: Task = "inversion",
    vocabulary: ClipVocabulary | None = None,
    max_length: int = 32,
    config: VgdConfig = VgdConfig(),
    progress: Progress | None = None,
) -> VgdResult:
    """A prompt for a CLIP-space target (images, a style, any vector), started from its closest CLIP word and
    written in the vocabulary's dictionary when it has one.

    Without `vocabulary` the LLM gets no initial condition (the paper's ablation of beam initialisation).
    """
    condition = vocabulary.closest(targets) if vocabulary is not None else ""
    prompt_ids = vgd_prompt(llm, task, max_length, condition=condition)
    limits = Limits(max_length, dictionary=vocabulary.dictionary if vocabulary is not None else None)
    result = guided_decode(llm, clip, targets, prompt_ids, limits, config, progress)
    result.initial_condition = condition or None
    return result


def joined_prompts(parts: Sequence[str]) -> str:
    """Per-image prompts as one sentence, the way a caption lists things: "A", "A and B", "A, B and C"."""
    parts = [part.strip().rstrip(".,;") for part in parts if part.strip()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


FuseStrategy = Literal["merge", "joint", "concat"]


@dataclass(frozen=True)
class Fusion:
    prompt: str
    parts: list[str]
    """The per-image prompts (`merge`, `concat`); empty for `joint`."""
    initial_conditions: list[str]
    """The start word of each inversion it ran (beam initialisation)."""


def fuse(
    llm: LanguageModel,
    clip: ClipModel,
    targets: Tensor,
    *,
    strategy: FuseStrategy = "merge",
    vocabulary: ClipVocabulary | None = None,
    max_length: int = 32,
    config: VgdConfig = VgdConfig(),
    progress: Progress | None = None,
) -> Fusion:
    """One prompt holding the concepts of several image targets (N, P), N >= 2.

    - `joint` decodes one prompt against all targets at once (each step's CLIP score averaged over the images).
      A mean of pictures is not a picture of both things: on the `shapes` CLIP the text nearest to two
      one-object pictures is usually one of their own captions, not "A and B", so joint seldom names both.
    - `concat` is the paper's multi-concept recipe (section 4.2): one prompt per image in a share of the budget,
      joined as a list. Each part describes a whole picture (its own background, say), so the list reads as
      several pictures, not one.
    - `merge` (the default) decodes one prompt per image, joins them, and then writes one sentence of at most
      `max_length` CLIP tokens against the joined text's CLIP embedding with VGD's distillation task (the
      LLM sees the joined text in its instruction). Text space composes where the mean of images does not:
      on `shapes` pictures it names both objects far more often than joint or concat (`pictoprompt bench vgd`,
      fuse table; lab/RESULTS.md, "VGD: readable prompts").
    """
    if targets.shape[0] < 2:
        raise InvalidInputError("Fusing needs at least two images; to describe one image, invert it.")
    progress = progress or Progress()

    def inverted(rows: Tensor, length: int, share: Progress) -> VgdResult:
        return invert(llm, clip, rows, vocabulary=vocabulary, max_length=length, config=config, progress=share)

    if strategy == "joint":
        result = inverted(targets, max_length, progress)
        return Fusion(result.best.text, [], [result.initial_condition] if result.initial_condition else [])
    count = len(targets)
    steps = count + (strategy == "merge")
    share = max(4, max_length // count)
    part_length = max(config.merge_part_tokens, share) if strategy == "merge" else share
    parts, conditions = [], []
    for i in range(count):
        result = inverted(targets[i : i + 1], part_length, progress.scaled(i / steps, 1 / steps, 1.0))
        parts.append(result.best.text)
        conditions += [result.initial_condition] if result.initial_condition else []
    joined = joined_prompts(parts)
    if strategy == "concat":
        return Fusion(joined, parts, conditions)
    dictionary = vocabulary.dictionary if vocabulary is not None else None
    merging = progress.scaled(count / steps, 1 / steps, 1.0)
    merged = distill(llm, clip, joined, max_length=max_length, dictionary=dictionary, config=config, progress=merging)
    return Fusion(merged.best.text, parts, conditions)


def distillation_length(clip: ClipModel, prompt: str, ratio: float) -> int:
    """The default budget: `ratio` of the prompt's CLIP tokens, at least one."""
    return max(1, math.floor(ratio * clip_token_count(clip, [prompt])[0]))


def distill(
    llm: LanguageModel,
    clip: ClipModel,
    prompt: str,
    *,
    max_length: int | None = None,
    keep_words: bool = False,
    dictionary: frozenset[str] | None = None,
    config: VgdConfig = VgdConfig(),
    progress: Progress | None = None,
) -> VgdResult:
    """A prompt of at most `max_length` CLIP tokens (default `distillation_ratio` of the original) matching
    `prompt`'s embedding, in the words of `dictionary` when given.

    As in the authors' code there is no initial condition: the long prompt itself is in the instruction.
    `keep_words` (ours, `distillation_keeps_words` on a profile) lets the short prompt only leave words out of the
    long one (`copied_from`).
    """
    budget = max_length or distillation_length(clip, prompt, config.distillation_ratio)
    prompt_ids = vgd_prompt(llm, "distillation", budget, target_prompt=prompt)
    limits = Limits(budget, max_clip_tokens=budget, dictionary=dictionary, copy_from=prompt if keep_words else None)
    return guided_decode(llm, clip, text_target(clip, prompt), prompt_ids, limits, config, progress)
