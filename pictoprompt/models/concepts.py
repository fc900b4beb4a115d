"""The concept store: learned concepts (SD-IPC-CT) and domain adapters (SD-IPC-FT) on disk, one folder per name.

    <root>/<name>/card.json             what was learned, from what, on which base model (`ConceptCard`)
    <root>/<name>/weights.safetensors   the learned tensors (K/V deltas and deep prompts), float32
    <root>/<name>/thumbnails/NN.png     small copies of the reference images

A concept is written into a hidden staging folder and renamed into place, so a reader sees the old version or
the new one, never half of one. Replacing an existing concept takes two renames (old one aside, new one in);
a crash between them is repaired when the store is next opened. The store only keeps tensors and cards: what
the tensors mean is the business of `methods/concept_weights.py`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from pydantic import BaseModel, Field, ValidationError
from safetensors.torch import load_file, save_file

from pictoprompt.errors import InvalidInputError, NotFoundError

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
NAME_RULE = "1-64 characters: lowercase letters, digits, '-' and '_', starting with a letter or digit"
CARD_FILE = "card.json"
WEIGHTS_FILE = "weights.safetensors"
THUMBNAIL_DIR = "thumbnails"
THUMBNAIL_SIDE = 128
STAGING_PREFIX = ".staging-"
RETIRED_PREFIX = ".retired-"
DELETED_PREFIX = ".deleted-"
STALE_STAGING_SECONDS = 3600.0
"""A staging folder this old belongs to a save that died; younger ones may be another process's save."""
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
"""Cards and thumbnails show the user's own pictures: only the user running pictoprompt may read the store."""


def validate_name(name: str) -> str:
    """`name` if it is a safe folder name; the pattern rules out path tricks ('..', '/', hidden files)."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidInputError(f"'{name}' is not a valid concept name; use {NAME_RULE} (e.g. 'my-cat').")
    return name


def weights_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, shapes and float16-rounded values of `tensors`, in name order.

    Rounding to float16 first makes the same checkpoint hash alike whether it was loaded in float32 on a CPU
    or in float16 on a GPU (both round to nearest even); a bfloat16 load hashes differently.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.to(torch.float16).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ConceptSummary(BaseModel):
    """What a client sees of a concept (the card without the long vectors)."""

    name: str
    kind: Literal["concept", "domain"] = Field(
        description="'concept': tuned on a few references (SD-IPC-CT); 'domain': adapter trained on a set "
        "of captioned images (SD-IPC-FT)."
    )
    method: str = Field(description="SD-IPC-CT or SD-IPC-FT.")
    base_models: dict[str, str] = Field(description="The profile and the model ids it was trained on.")
    base_hash: str = Field(description="SHA-256 of the base weights the concept attaches to.")
    hyperparameters: dict[str, float | int | bool | str]
    iterations: int
    final_loss: float | None = Field(
        description="Denoising loss of the last iteration; none for a concept of 0 iterations (untuned SD-IPC)."
    )
    created_at: str = Field(description="ISO 8601, UTC.")
    training_seconds: float
    reference_count: int
    thumbnails: list[str] = Field(description="Thumbnail files of the references, relative to the folder.")
    description: str | None = Field(
        None,
        description="The words it was taught with ('a green heart'), completed; they follow its name in a prompt.",
    )
    completed_with: str | None = Field(None, description="What the generator added to the words given.")


class ConceptCard(ConceptSummary):
    """The full card stored as `card.json`."""

    losses: list[float] = Field(description="Loss of every iteration.")
    mean_image_embedding: list[float] = Field(
        description="Mean of the references' normalised CLIP image embeddings (P) through the tuned image "
        "encoder: the concept's stand-in for an image."
    )
    mean_converted_embedding: list[float] = Field(
        description="`f_cnvrt` (D) of that mean: the prompt-space embedding SD-IPC makes of the concept."
    )

    def summary(self) -> ConceptSummary:
        return ConceptSummary.model_validate(self.model_dump(include=set(ConceptSummary.model_fields)))


@dataclass
class StoredConcept:
    card: ConceptCard
    tensors: dict[str, torch.Tensor]
    path: Path


class ConceptStore:
    """Concepts under `root` (the lead passes `<data_dir>/concepts`)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        self._repair()
        # Also what earlier versions wrote with the default 0644/0755, and a folder the user made beforehand.
        _make_private(self.root)

    # ----------------------------------------------------------------------------------------------- reading

    def exists(self, name: str) -> bool:
        return (self.root / validate_name(name) / CARD_FILE).is_file()

    def get(self, name: str) -> ConceptCard:
        folder = self._folder(name)
        try:
            return ConceptCard.model_validate_json((folder / CARD_FILE).read_text())
        except (OSError, ValidationError) as error:
            raise InvalidInputError(
                f"The card of concept '{name}' in {folder} is unreadable ({error}); delete the concept and tune it "
                "again."
            ) from error

    def list(self) -> list[ConceptCard]:
        """Every readable concept, by name. An unreadable one is logged and left out so the others still list."""
        cards = []
        for folder in sorted(self.root.iterdir()):
            if NAME_PATTERN.fullmatch(folder.name) and (folder / CARD_FILE).is_file():
                try:
                    cards.append(self.get(folder.name))
                except InvalidInputError as error:
                    logger.warning("%s", error)
        return cards

    def names(self) -> list[str]:
        """The stored concepts' names, sorted, without reading their cards (what a completion offers)."""
        return sorted(
            folder.name
            for folder in self.root.iterdir()
            if NAME_PATTERN.fullmatch(folder.name) and (folder / CARD_FILE).is_file()
        )

    def load(self, name: str, base_hash: str, current_base: Mapping[str, str]) -> StoredConcept:
        """The card and tensors of `name`, refused unless it was trained on the base model with `base_hash`."""
        card = self.get(name)
        self._check_base(card, base_hash, current_base)
        path = self._folder(name)
        return StoredConcept(card, load_file(str(path / WEIGHTS_FILE), device="cpu"), path)

    def mean_embedding(self, name: str, base_hash: str, current_base: Mapping[str, str]) -> torch.Tensor:
        """The concept's (1, P) mean CLIP image embedding: what `concept:NAME` stands for as an image."""
        card = self.get(name)
        self._check_base(card, base_hash, current_base)
        return torch.tensor(card.mean_image_embedding, dtype=torch.float32).unsqueeze(0)

    def thumbnail_paths(self, name: str) -> list[Path]:
        folder = self._folder(name)
        return [folder / relative for relative in self.get(name).thumbnails]

    # ----------------------------------------------------------------------------------------------- writing

    def save(
        self,
        card: ConceptCard,
        tensors: Mapping[str, torch.Tensor],
        references: Sequence[Image.Image],
        overwrite: bool = False,
    ) -> ConceptCard:
        """Write the concept atomically; the card's `thumbnails` are filled in from `references`."""
        name = validate_name(card.name)
        self.check_free(name, overwrite)
        token = uuid.uuid4().hex
        staging = self.root / f"{STAGING_PREFIX}{name}-{token}"
        retired = self.root / f"{RETIRED_PREFIX}{name}-{token}"
        target = self.root / name
        thumbnails = [f"{THUMBNAIL_DIR}/{index:02d}.png" for index in range(len(references))]
        card = card.model_copy(update={"thumbnails": thumbnails, "reference_count": len(references)})
        try:
            # The staging folder is private from its creation, so no file is readable by others even before the
            # modes of the files inside are narrowed below.
            staging.mkdir(mode=PRIVATE_DIR_MODE)
            (staging / THUMBNAIL_DIR).mkdir(mode=PRIVATE_DIR_MODE)
            for image, relative in zip(references, thumbnails, strict=True):
                thumbnail = image.convert("RGB")
                thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
                thumbnail.save(staging / relative, format="PNG")
            save_file(
                {key: value.detach().float().cpu().contiguous() for key, value in tensors.items()},
                str(staging / WEIGHTS_FILE),
            )
            # The card goes last: a folder with a card is a complete concept.
            (staging / CARD_FILE).write_text(card.model_dump_json(indent=2))
            _make_private(staging)
            _fsync_tree(staging)
            if target.exists():
                os.replace(target, retired)
            try:
                os.replace(staging, target)
            except BaseException:
                if retired.exists():
                    os.replace(retired, target)
                raise
            _fsync_dir(self.root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
        return card

    def check_free(self, name: str, overwrite: bool) -> None:
        """Refuse early (before any training) to replace an existing concept unless `overwrite`."""
        if not overwrite and self.exists(name):
            raise InvalidInputError(
                f"A concept named '{name}' already exists; pass overwrite=true to replace it, or pick another name."
            )

    def delete(self, name: str) -> None:
        target = self._folder(name)
        deleted = self.root / f"{DELETED_PREFIX}{name}-{uuid.uuid4().hex}"
        # One rename makes the concept disappear at once; removing the files can then take its time.
        os.replace(target, deleted)
        shutil.rmtree(deleted, ignore_errors=True)

    # ----------------------------------------------------------------------------------------------- internals

    def _folder(self, name: str) -> Path:
        folder = self.root / validate_name(name)
        if not (folder / CARD_FILE).is_file():
            known = ", ".join(card.name for card in self.list()) or "none yet"
            raise NotFoundError(
                f"There is no concept named '{name}' (known: {known}); tune one with customize_concept."
            )
        return folder

    @staticmethod
    def _check_base(card: ConceptCard, base_hash: str, current_base: Mapping[str, str]) -> None:
        if card.base_hash == base_hash:
            return
        needed = ", ".join(f"{key} '{value}'" for key, value in card.base_models.items())
        current = ", ".join(f"{key} '{value}'" for key, value in current_base.items())
        raise InvalidInputError(
            f"Concept '{card.name}' was trained on another base model: it needs {needed}, but the server runs "
            f"{current}. Start the server with profile '{card.base_models.get('profile', '?')}' to use it, or tune "
            "the concept again on this model."
        )

    def _repair(self) -> None:
        """Finish or undo what a crashed save or delete left behind."""
        now = time.time()
        for entry in self.root.iterdir():
            if entry.name.startswith(RETIRED_PREFIX):
                name = entry.name.removeprefix(RETIRED_PREFIX).rpartition("-")[0]
                target = self.root / name
                if NAME_PATTERN.fullmatch(name) and not target.exists() and (entry / CARD_FILE).is_file():
                    # The crash fell between moving the old version aside and moving the new one in.
                    os.replace(entry, target)
                    logger.warning("restored concept '%s' after an interrupted save", name)
                else:
                    shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.startswith(DELETED_PREFIX) or (
                entry.name.startswith(STAGING_PREFIX) and now - entry.stat().st_mtime > STALE_STAGING_SECONDS
            ):
                shutil.rmtree(entry, ignore_errors=True)


def _make_private(folder: Path) -> None:
    """Modes 0700 for `folder` and every folder under it, 0600 for every file (symlinks are left alone)."""
    if os.name == "nt":  # Windows has no POSIX modes; the store lives in the user's own profile there.
        return
    for path in [folder, *folder.rglob("*")]:
        try:
            if path.is_symlink():
                continue
            mode = PRIVATE_DIR_MODE if path.is_dir() else PRIVATE_FILE_MODE
            if path.stat().st_mode & 0o777 != mode:
                path.chmod(mode)
        except FileNotFoundError:  # removed meanwhile by another process sharing the store
            continue


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # Windows cannot open a directory for fsync; NTFS journals the rename itself.
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder`, so the rename never publishes data still in the page cache."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "r+b") as handle:
                os.fsync(handle.fileno())
        else:
            _fsync_dir(path)
    _fsync_dir(folder)


# ------------------------------------------------------------------------------------------ a concept by name


def name_pattern(name: str) -> re.Pattern[str]:
    """The concept's name as a whole word of a prompt, in any case ('my-star' but not 'my-stars')."""
    return re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])", re.IGNORECASE)


def mentions(prompt: str, name: str) -> bool:
    return name_pattern(name).search(prompt) is not None
