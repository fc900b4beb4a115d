"""The asset store: PNG round trip with metadata, atomic writes, expiry, size cap, id checks."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pictoprompt.errors import InvalidInputError, NotFoundError
from pictoprompt.server import assets as assets_module
from pictoprompt.server.assets import AssetStore, asset_id_from_uri

METADATA = {
    "prompt": "a red circle on a blue square",
    "negative_prompt": "blurry",
    "seed": "41",
    "steps": "3",
    "guidance": "7.5",
    "method": "vgd",
    "profile": "tiny",
    "model_generator": "tiny/unet",
    "caption": "ein Bild von 東京",  # not Latin-1: stored as an iTXt chunk
}


def noise(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    """Seeded RGB noise: distinct per seed, and PNG cannot shrink it, so file sizes are predictable."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def store_files(store: AssetStore) -> list[str]:
    return sorted(path.name for path in store.root.iterdir())


def png_text(store: AssetStore, asset_id: str) -> dict[str, str]:
    """The text chunks `save` wrote, read back from the file."""
    with Image.open(io.BytesIO(store.read_bytes(asset_id))) as image:
        return {key: str(value) for key, value in image.text.items()}


def set_age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_save_round_trips_pixels_and_metadata(tmp_path: Path) -> None:
    store = AssetStore(tmp_path / "assets")
    image = noise()
    saved = store.save(image, METADATA)

    asset_id = asset_id_from_uri(saved.uri)
    assert saved.uri == f"pictoprompt://assets/{asset_id}"
    assert Path(saved.path) == store.get(asset_id) == store.root / f"{asset_id}.png"
    assert png_text(store, asset_id) == METADATA
    with Image.open(io.BytesIO(store.read_bytes(asset_id))) as reread:
        assert reread.format == "PNG"
        assert reread.convert("RGB").tobytes() == image.tobytes()
    assert store_files(store) == [f"{asset_id}.png"]  # nothing but the asset: no temp file left behind


def test_ids_are_random_and_url_safe(tmp_path: Path) -> None:
    store = AssetStore(tmp_path)
    ids = {asset_id_from_uri(store.save(noise((8, 8)), {}).uri) for _ in range(20)}
    assert len(ids) == 20
    assert all(len(asset_id) == 22 and asset_id.replace("-", "").replace("_", "").isalnum() for asset_id in ids)


def test_thumbnail_is_small_and_never_upscaled(tmp_path: Path) -> None:
    store = AssetStore(tmp_path)
    asset_id = asset_id_from_uri(store.save(noise((1024, 600)), {}).uri)

    with Image.open(io.BytesIO(store.thumbnail(asset_id))) as thumb:
        assert thumb.format == "JPEG" and thumb.size == (512, 300)
    with Image.open(io.BytesIO(store.thumbnail(asset_id, max_side=128))) as thumb:
        assert thumb.size == (128, 75)
    transparent = asset_id_from_uri(store.save(Image.new("RGBA", (40, 20), (255, 0, 0, 0)), {}).uri)
    with Image.open(io.BytesIO(store.thumbnail(transparent))) as thumb:
        assert thumb.size == (40, 20)  # smaller than max_side: kept as is
        assert thumb.getpixel((5, 5))[0] > 240  # transparency flattened onto white for JPEG


@pytest.mark.parametrize("failing", ["png_write", "replace"])
def test_interrupted_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    store = AssetStore(tmp_path)
    earlier = store.save(noise(seed=1), {"prompt": "kept"})
    before = store_files(store)

    if failing == "png_write":
        real_save = Image.Image.save

        def save_half_then_fail(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
            real_save(self, fp, *args, **kwargs)
            fp.truncate(40)  # type: ignore[attr-defined]  # half a PNG on disk, then the crash
            raise OSError("disk full")

        monkeypatch.setattr(Image.Image, "save", save_half_then_fail)
    else:

        def fail_replace(src: str, dst: str) -> None:
            raise OSError("rename failed")

        monkeypatch.setattr(assets_module.os, "replace", fail_replace)

    with pytest.raises(OSError):
        store.save(noise(seed=2), {"prompt": "lost"})

    assert store_files(store) == before  # no partial PNG, no temp file
    assert png_text(store, asset_id_from_uri(earlier.uri)) == {"prompt": "kept"}


def test_expire_removes_old_assets_and_stray_temp_files(tmp_path: Path) -> None:
    store = AssetStore(tmp_path, ttl_seconds=3600)
    old = asset_id_from_uri(store.save(noise(seed=1), {}).uri)
    fresh = asset_id_from_uri(store.save(noise(seed=2), {}).uri)
    set_age(store.get(old), 2 * 3600)
    stray = store.root / ".tmp-interrupted.png"
    stray.write_bytes(b"\x89PNG half")
    set_age(stray, 2 * 3600)
    in_progress = store.root / ".tmp-writing-now.png"  # another process may be writing it: left alone
    in_progress.write_bytes(b"\x89PNG")
    unrelated = store.root / "notes.txt"
    unrelated.write_text("not an asset")

    assert store.expire() == 2
    assert store_files(store) == sorted([f"{fresh}.png", in_progress.name, unrelated.name])
    with pytest.raises(NotFoundError, match="assets expire after"):
        store.get(old)


def test_expire_runs_on_startup_and_every_few_saves(tmp_path: Path) -> None:
    first = AssetStore(tmp_path, ttl_seconds=60)
    old = asset_id_from_uri(first.save(noise(), {}).uri)
    set_age(first.get(old), 120)
    AssetStore(tmp_path, ttl_seconds=60)  # a restarted server
    assert store_files(first) == []

    store = AssetStore(tmp_path, ttl_seconds=60, expire_every_saves=3)
    stale = asset_id_from_uri(store.save(noise(seed=1), {}).uri)
    set_age(store.get(stale), 120)
    store.save(noise(seed=2), {})
    assert (store.root / f"{stale}.png").exists()
    store.save(noise(seed=3), {})  # the third save since the last expiry
    assert not (store.root / f"{stale}.png").exists()


def test_size_cap_removes_oldest_first(tmp_path: Path) -> None:
    store = AssetStore(tmp_path)
    ids = [asset_id_from_uri(store.save(noise(seed=seed), {}).uri) for seed in range(4)]
    for age, asset_id in zip([400, 300, 200, 100], ids, strict=True):
        set_age(store.get(asset_id), age)
    sizes = [store.get(asset_id).stat().st_size for asset_id in ids]

    store.max_bytes = sum(sizes[2:]) + 1
    assert store.expire() == 2
    assert store_files(store) == sorted(f"{asset_id}.png" for asset_id in ids[2:])


@pytest.mark.parametrize(
    "bad_id",
    [
        "../../etc/passwd",
        "..",
        "",
        "abc",
        "AAAAAAAAAAAAAAAAAAAA/A",
        "AAAAAAAAAAAAAAAAAAAAA.",
        "A" * 23,
        "%2e%2e",
    ],
)
def test_invalid_ids_are_refused(tmp_path: Path, bad_id: str) -> None:
    store = AssetStore(tmp_path)
    for lookup in (store.get, store.read_bytes, store.thumbnail):
        with pytest.raises(InvalidInputError, match="is not a valid asset id"):
            lookup(bad_id)
    with pytest.raises(InvalidInputError, match="is not a valid asset id"):
        asset_id_from_uri(f"pictoprompt://assets/{bad_id}")


def test_unknown_id_and_foreign_uri(tmp_path: Path) -> None:
    store = AssetStore(tmp_path)
    with pytest.raises(NotFoundError, match=r"no asset pictoprompt://assets/A{22}; assets expire after 7 days"):
        store.read_bytes("A" * 22)
    with pytest.raises(InvalidInputError, match="is not an asset URI"):
        asset_id_from_uri("file:///etc/passwd")


def test_metadata_keys_must_fit_png_text_chunks(tmp_path: Path) -> None:
    store = AssetStore(tmp_path)
    for key in ["", " leading", "k" * 80, "tab\tkey"]:
        with pytest.raises(ValueError, match="PNG text keyword"):
            store.save(noise((4, 4)), {key: "x"})
    assert store_files(store) == []


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_an_existing_store_folder_and_its_files_become_private(tmp_path: Path) -> None:
    root = tmp_path / "assets"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    saved = AssetStore(root).save(noise(), METADATA)
    Path(saved.path).chmod(0o644)  # as a copy made by hand, or an older version, might have left it
    AssetStore(root)
    assert root.stat().st_mode & 0o777 == 0o700
    assert Path(saved.path).stat().st_mode & 0o777 == 0o600
