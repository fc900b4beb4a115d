"""The concept store: atomic saves, surviving a restart and a crash, names, and the base-model check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from pictoprompt.errors import InvalidInputError, NotFoundError
from pictoprompt.models import concepts
from pictoprompt.models.concepts import ConceptCard, ConceptStore, validate_name, weights_fingerprint

BASE = {"profile": "tiny", "generator": "builtin:tiny/generator", "clip": "builtin:tiny/clip"}
OTHER_BASE = {"profile": "shapes", "generator": "builtin:shapes/generator", "clip": "builtin:shapes/clip"}


def make_card(name: str, final_loss: float = 0.5, base_hash: str = "abc") -> ConceptCard:
    return ConceptCard(
        name=name,
        kind="concept",
        method="SD-IPC-CT",
        base_models=BASE,
        base_hash=base_hash,
        hyperparameters={"learning_rate": 5e-6, "iterations": 30},
        iterations=30,
        final_loss=final_loss,
        created_at="2026-01-01T00:00:00+00:00",
        training_seconds=1.0,
        reference_count=0,
        thumbnails=[],
        losses=[1.0, final_loss],
        mean_image_embedding=[0.6, 0.8],
        mean_converted_embedding=[1.0, 2.0, 3.0],
    )


def references(count: int = 3) -> list[Image.Image]:
    return [Image.new("RGB", (300, 200), (40 * i, 100, 200)) for i in range(count)]


def tensors(value: float) -> dict[str, torch.Tensor]:
    return {"unet.a.to_k.weight": torch.full((4, 3), value), "vision.deep_prompts": torch.full((2, 5, 3), value)}


def test_save_get_load_list_delete(tmp_path: Path) -> None:
    store = ConceptStore(tmp_path)
    card = store.save(make_card("my-cat"), tensors(0.25), references())
    assert card.reference_count == 3
    assert [path.is_file() for path in store.thumbnail_paths("my-cat")] == [True] * 3
    assert max(Image.open(store.thumbnail_paths("my-cat")[0]).size) == concepts.THUMBNAIL_SIDE
    loaded = store.load("my-cat", "abc", BASE)
    assert loaded.card == card
    assert torch.equal(loaded.tensors["unet.a.to_k.weight"], torch.full((4, 3), 0.25))
    assert torch.equal(store.mean_embedding("my-cat", "abc", BASE), torch.tensor([[0.6, 0.8]]))
    assert [c.name for c in store.list()] == ["my-cat"]
    assert "mean_image_embedding" not in card.summary().model_dump()
    store.delete("my-cat")
    assert store.list() == []
    with pytest.raises(NotFoundError, match="no concept named 'my-cat'"):
        store.get("my-cat")
    assert os.listdir(tmp_path) == []


def test_concept_survives_reopening_the_store(tmp_path: Path) -> None:
    ConceptStore(tmp_path).save(make_card("dog"), tensors(1.5), references())
    reopened = ConceptStore(tmp_path)
    assert reopened.get("dog").final_loss == 0.5
    assert torch.equal(reopened.load("dog", "abc", BASE).tensors["vision.deep_prompts"], torch.full((2, 5, 3), 1.5))


def test_existing_name_needs_overwrite(tmp_path: Path) -> None:
    store = ConceptStore(tmp_path)
    store.save(make_card("dog", 0.5), tensors(1.0), references())
    with pytest.raises(InvalidInputError, match="already exists; pass overwrite=true"):
        store.save(make_card("dog", 0.1), tensors(2.0), references())
    store.save(make_card("dog", 0.1), tensors(2.0), references(4), overwrite=True)
    assert store.get("dog").final_loss == 0.1
    assert store.get("dog").reference_count == 4
    assert sorted(os.listdir(tmp_path)) == ["dog"]


def test_interrupted_save_keeps_the_previous_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ConceptStore(tmp_path)
    store.save(make_card("dog", 0.5), tensors(1.0), references())

    def failing_save_file(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # the process is stopped while the weights are being written

    monkeypatch.setattr(concepts, "save_file", failing_save_file)
    with pytest.raises(KeyboardInterrupt):
        store.save(make_card("dog", 0.1), tensors(2.0), references(), overwrite=True)
    assert os.listdir(tmp_path) == ["dog"]
    assert store.get("dog").final_loss == 0.5
    assert torch.equal(store.load("dog", "abc", BASE).tensors["unet.a.to_k.weight"], torch.full((4, 3), 1.0))


def test_failed_swap_puts_the_previous_version_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ConceptStore(tmp_path)
    store.save(make_card("dog", 0.5), tensors(1.0), references())
    real_replace = os.replace
    calls = []

    def replace_failing_second(source: object, destination: object) -> None:
        calls.append(destination)
        if len(calls) == 2:  # old version moved aside, now moving the new one in fails
            raise OSError("disk gone")
        real_replace(source, destination)

    monkeypatch.setattr(concepts.os, "replace", replace_failing_second)
    with pytest.raises(OSError, match="disk gone"):
        store.save(make_card("dog", 0.1), tensors(2.0), references(), overwrite=True)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["dog"]
    assert store.get("dog").final_loss == 0.5


def test_crash_between_the_two_renames_is_repaired_on_reopen(tmp_path: Path) -> None:
    store = ConceptStore(tmp_path)
    store.save(make_card("dog", 0.5), tensors(1.0), references())
    # What a crash leaves: the old version moved aside, the new one still in staging.
    os.replace(tmp_path / "dog", tmp_path / f"{concepts.RETIRED_PREFIX}dog-{'0' * 32}")
    (tmp_path / f"{concepts.STAGING_PREFIX}dog-{'1' * 32}").mkdir()
    os.utime(tmp_path / f"{concepts.STAGING_PREFIX}dog-{'1' * 32}", (0, 0))
    reopened = ConceptStore(tmp_path)
    assert os.listdir(tmp_path) == ["dog"]
    assert reopened.get("dog").final_loss == 0.5


def test_interrupted_delete_is_finished_on_reopen(tmp_path: Path) -> None:
    store = ConceptStore(tmp_path)
    store.save(make_card("dog"), tensors(1.0), references())
    os.replace(tmp_path / "dog", tmp_path / f"{concepts.DELETED_PREFIX}dog-{'0' * 32}")
    assert ConceptStore(tmp_path).list() == []
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden", "-dash", "UPPER", "with space", "x" * 65, "é"])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    store = ConceptStore(tmp_path)
    with pytest.raises(InvalidInputError, match="not a valid concept name"):
        store.save(make_card(name), tensors(1.0), references())
    with pytest.raises(InvalidInputError, match="not a valid concept name"):
        store.get(name)
    with pytest.raises(InvalidInputError, match="not a valid concept name"):
        store.delete(name)
    assert os.listdir(tmp_path) == []


def test_good_names_pass() -> None:
    for name in ["a", "my-cat", "cat_2", "0", "x" * 64]:
        assert validate_name(name) == name


def test_mismatched_base_is_refused_naming_the_needed_one(tmp_path: Path) -> None:
    store = ConceptStore(tmp_path)
    store.save(make_card("dog", base_hash="abc"), tensors(1.0), references())
    with pytest.raises(InvalidInputError, match=r"needs profile 'tiny'.*runs profile 'shapes'") as error:
        store.load("dog", "def", OTHER_BASE)
    assert "builtin:tiny/generator" in str(error.value)
    with pytest.raises(InvalidInputError, match="trained on another base model"):
        store.mean_embedding("dog", "def", OTHER_BASE)


def test_fingerprint_is_the_same_in_float32_and_float16_but_not_for_other_weights() -> None:
    weights = {"w": torch.randn(8, 8, generator=torch.Generator().manual_seed(0))}
    half = {"w": weights["w"].half()}
    changed = {"w": weights["w"] + 0.01}
    assert weights_fingerprint(weights) == weights_fingerprint(half)
    assert weights_fingerprint(weights) != weights_fingerprint(changed)
    assert weights_fingerprint(weights) != weights_fingerprint({"v": weights["w"]})


def modes(root: Path) -> dict[str, int]:
    """Permission bits of `root` and everything under it, by path relative to `root`."""
    return {str(path.relative_to(root)): path.stat().st_mode & 0o777 for path in [root, *root.rglob("*")]}


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_every_file_and_folder_of_the_store_is_private_to_the_user(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)  # the usual umask, which on its own gives 0644 files and 0755 folders
    try:
        store = ConceptStore(tmp_path / "concepts")
        store.save(make_card("cat"), tensors(1.0), references())
    finally:
        os.umask(old_umask)
    found = modes(tmp_path / "concepts")
    assert {"cat/card.json", "cat/weights.safetensors", "cat/thumbnails/00.png"} <= set(found)
    for relative, mode in found.items():
        is_dir = (tmp_path / "concepts" / relative).is_dir()
        assert mode == (0o700 if is_dir else 0o600), f"{relative} has mode {mode:o}"


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_opening_a_store_narrows_what_an_older_version_left_readable(tmp_path: Path) -> None:
    root = tmp_path / "concepts"
    ConceptStore(root).save(make_card("cat"), tensors(1.0), references())
    for path in [root, *root.rglob("*")]:  # as written before the store made its files private
        path.chmod(0o755 if path.is_dir() else 0o644)
    ConceptStore(root)
    assert set(modes(root).values()) == {0o700, 0o600}
