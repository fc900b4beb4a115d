"""A profile's LLM from the Hugging Face hub: found in the local cache, downloaded once, or replaced by SmolLM2.

The bundled SmolLM2 GGUF stands in for a hub file, linked into a hub-cache layout under tmp_path
(`models--owner--repo/refs/main` naming `snapshots/<commit>/`, whose files link to `blobs/`), so nothing is
downloaded; the online path is checked against a fake hub client.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants

from pictoprompt.errors import InvalidInputError, ModelNotFoundError
from pictoprompt.models.check import check_profiles, component_status, list_profiles
from pictoprompt.models.llm_llama_cpp import LlamaCppModel
from pictoprompt.models.llm_loading import default_gguf_path, find_cached_gguf, gguf_path, load_language_model
from pictoprompt.models.profiles import ClipSpec, LlmSpec, Profile, get_profile

CPU = torch.device("cpu")
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "acme/Smol-Instruct-GGUF"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline; huggingface_hub read HF_HUB_CACHE at import, so its constant moves too."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_repo(cache: Path, repo_id: str, names: Sequence[str]) -> Path:
    """Put the bundled GGUF into `cache` as the files `names` of `repo_id`, as hf_hub_download lays them out."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    (storage / "blobs").mkdir()
    snapshot = storage / "snapshots" / COMMIT
    for i, name in enumerate(names):
        blob = storage / "blobs" / f"{i:064x}"
        blob.symlink_to(default_gguf_path())
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (name.count("/") + 2)) / "blobs" / blob.name)
    return snapshot


def test_a_hub_source_loads_from_the_local_cache(hub_cache: Path) -> None:
    snapshot = cache_repo(hub_cache, REPO, ["Smol-Instruct-Q4_K_M.gguf", "README.md"])
    model = load_language_model(LlmSpec(source=REPO, filename="Smol-Instruct-Q4_K_M.gguf"), CPU)
    assert isinstance(model, LlamaCppModel)
    assert model.model_id == str(snapshot / "Smol-Instruct-Q4_K_M.gguf")
    assert model.fallback_note is None
    ids = model.tokenize("a red circle on a blue background")
    assert ids and model.detokenize(ids) == "a red circle on a blue background"


def test_a_glob_pattern_picks_the_one_matching_file(hub_cache: Path) -> None:
    snapshot = cache_repo(
        hub_cache, REPO, ["Smol-Instruct-Q4_K_M.gguf", "Smol-Instruct-Q8_0.gguf", "quants/Smol-Instruct-Q2_K.gguf"]
    )
    assert gguf_path(LlmSpec(source=REPO, filename="*Q4_K_M.gguf")) == snapshot / "Smol-Instruct-Q4_K_M.gguf"
    assert find_cached_gguf(REPO, "*Q2_K.gguf") == snapshot / "quants" / "Smol-Instruct-Q2_K.gguf"
    assert find_cached_gguf(REPO, "*Q5_K_M.gguf") is None


def test_a_file_whose_blob_is_gone_is_not_on_this_machine(hub_cache: Path) -> None:
    snapshot = cache_repo(hub_cache, REPO, ["Smol-Instruct-Q4_K_M.gguf"])
    next((snapshot.parent.parent / "blobs").iterdir()).unlink()
    assert find_cached_gguf(REPO, "*Q4_K_M.gguf") is None


def test_an_ambiguous_pattern_names_the_files_it_matches(hub_cache: Path) -> None:
    cache_repo(hub_cache, REPO, ["Smol-Instruct-Q4_K_M.gguf", "Smol-Instruct-Q8_0.gguf"])
    # A profile mistake, not a missing model: the fallback does not hide it.
    with pytest.raises(InvalidInputError) as raised:
        load_language_model(LlmSpec(source=REPO, filename="*.gguf", fallback=True), CPU)
    message = str(raised.value)
    assert "Smol-Instruct-Q4_K_M.gguf" in message and "Smol-Instruct-Q8_0.gguf" in message
    assert "`llm.filename`" in message


def test_an_absent_hub_llm_falls_back_to_smollm2_with_a_note(hub_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = LlmSpec(source="acme/Absent-3B-Instruct-GGUF", filename="*Q4_K_M.gguf")
    with caplog.at_level(logging.WARNING, logger="pictoprompt.models.llm_loading"):
        model = load_language_model(spec, CPU)
    assert model.model_id == str(default_gguf_path())
    note = model.fallback_note
    assert note is not None and "\n" not in note
    assert "Absent-3B-Instruct (acme/Absent-3B-Instruct-GGUF)" in note and "SmolLM2-135M-Instruct" in note
    assert "hf download acme/Absent-3B-Instruct-GGUF --include '*Q4_K_M.gguf'" in note
    assert note in caplog.text and "HF_HUB_OFFLINE" in caplog.text


def test_without_fallback_an_absent_hub_llm_is_an_error_that_says_how_to_get_it(hub_cache: Path) -> None:
    spec = LlmSpec(source="acme/Absent-3B-Instruct-GGUF", filename="*Q4_K_M.gguf", fallback=False)
    with pytest.raises(ModelNotFoundError) as raised:
        load_language_model(spec, CPU)
    message = str(raised.value)
    assert "acme/Absent-3B-Instruct-GGUF" in message and "HF_HUB_OFFLINE" in message
    assert "hf download acme/Absent-3B-Instruct-GGUF --include '*Q4_K_M.gguf'" in message


def test_a_malformed_repo_id_is_reported_as_such(hub_cache: Path) -> None:
    with pytest.raises(InvalidInputError, match="repo id"):
        load_language_model(LlmSpec(source="not//a repo", filename="*.gguf"), CPU)


class FakeHub:
    """The hub client's two calls, over a fixed file list; `download` puts the bundled GGUF into the cache."""

    def __init__(self, cache: Path, files: list[str], reachable: bool = True) -> None:
        self.cache, self.files, self.reachable = cache, files, reachable
        self.downloads: list[tuple[str, str]] = []

    def list_repo_files(self, repo_id: str, **_: object) -> list[str]:
        if not self.reachable:
            raise OSError("connection refused")
        return self.files

    def hf_hub_download(self, repo_id: str, filename: str, cache_dir: object = None, **_: object) -> str:
        if not self.reachable:
            raise OSError("connection refused")
        self.downloads.append((repo_id, filename))
        return str(cache_repo(self.cache, repo_id, [filename]) / filename)


@pytest.fixture
def online(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    hub = FakeHub(hub_cache, ["README.md", "Big-Q4_K_M.gguf", "Big-Q8_0.gguf"])
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", hub.list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    return hub


def test_online_the_pattern_is_matched_against_the_repo_and_that_file_downloaded_once(online: FakeHub) -> None:
    spec = LlmSpec(source="acme/Big-GGUF", filename="*Q4_K_M.gguf")
    first = gguf_path(spec)
    assert online.downloads == [("acme/Big-GGUF", "Big-Q4_K_M.gguf")] and first.name == "Big-Q4_K_M.gguf"
    with pytest.raises(InvalidInputError, match=r"Big-Q4_K_M\.gguf, Big-Q8_0\.gguf"):
        gguf_path(LlmSpec(source="acme/Other-GGUF", filename="*.gguf"))
    # Once cached, it loads with no call to the hub at all.
    online.reachable = False
    assert gguf_path(spec) == first and len(online.downloads) == 1


def test_online_a_failed_download_falls_back_or_says_why(online: FakeHub) -> None:
    online.reachable = False
    spec = LlmSpec(source="acme/Big-GGUF", filename="*Q4_K_M.gguf", fallback=False)
    with pytest.raises(ModelNotFoundError, match=r"could not be downloaded .*connection refused"):
        load_language_model(spec, CPU)
    model = load_language_model(spec.model_copy(update={"fallback": True}), CPU)
    assert model.model_id == str(default_gguf_path())
    assert model.fallback_note and model.fallback_note.startswith("LLM: Big (acme/Big-GGUF) is not on this machine")
    # A pattern that matches nothing in a reachable repo is the profile's mistake: it lists what there is.
    online.reachable = True
    with pytest.raises(InvalidInputError, match=r"Big-Q4_K_M\.gguf, Big-Q8_0\.gguf"):
        gguf_path(LlmSpec(source="acme/Big-GGUF", filename="*Q3_K_S.gguf"))


def test_the_real_profiles_default_to_an_instruction_tuned_hub_llm() -> None:
    for name in ("sd15", "sd21"):
        llm = get_profile(name).llm
        assert llm.backend == "llama_cpp" and llm.source == "bartowski/Llama-3.2-3B-Instruct-GGUF"
        assert llm.filename == "*Q4_K_M.gguf" and llm.fallback


def shapes_profile_with(llm: LlmSpec) -> Profile:
    return Profile(
        name="hubbed",
        generator="builtin:shapes/generator",
        clip=ClipSpec(source="builtin:shapes/clip"),
        llm=llm,
    )


def test_check_reports_where_the_hub_llm_is_cached(hub_cache: Path) -> None:
    snapshot = cache_repo(hub_cache, REPO, ["Smol-Instruct-Q4_K_M.gguf"])
    rows = component_status(shapes_profile_with(LlmSpec(source=REPO, filename="*Q4_K_M.gguf")))
    assert ("llm", f"{REPO} *Q4_K_M.gguf", str(snapshot / "Smol-Instruct-Q4_K_M.gguf")) in rows


def test_check_calls_a_missing_hub_llm_with_fallback_no_failure(hub_cache: Path, tmp_path: Path) -> None:
    profiles = tmp_path / "profiles.toml"
    table = 'generator = "builtin:shapes/generator"\nclip = { source = "builtin:shapes/clip" }\n'
    llm = 'llm = { source = "acme/Absent-GGUF", filename = "*Q4_K_M.gguf"'
    profiles.write_text(f"[profiles.soft]\n{table}{llm} }}\n[profiles.hard]\n{table}{llm}, fallback = false }}\n")
    report, ok = check_profiles("soft", profiles)
    assert ok and "MISSING llm" in report and "SmolLM2-135M-Instruct stands in" in report
    assert "hf download acme/Absent-GGUF --include '*Q4_K_M.gguf'" in report
    report, ok = check_profiles("hard", profiles)
    assert not ok and "MISSING llm" in report and "stands in" not in report
    listing = list_profiles(profiles)
    assert "llama_cpp acme/Absent-GGUF *Q4_K_M.gguf" in listing and "MISSING: not a failure" in listing
