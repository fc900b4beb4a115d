"""The asset store: the images the server returns, each a PNG named by a random URL-safe id that carries what made
it (prompt, seed, method, model ids) in its text chunks, so a file copied out still says how to reproduce it.
Writes are atomic; entries expire after a TTL and the store keeps under a size cap, oldest first.
"""

from __future__ import annotations

import io
import logging
import os
import re
import secrets
import sys
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path
from stat import S_ISDIR

from PIL import Image, PngImagePlugin

from pictoprompt.errors import InvalidInputError, NotFoundError
from pictoprompt.tools.base import SavedImage

logger = logging.getLogger(__name__)

ASSET_URI_PREFIX = "pictoprompt://assets/"

# secrets.token_urlsafe(16): 128 random bits, 22 characters of [A-Za-z0-9_-]. The pattern is the whole
# defence against path tricks on lookup: no dots, no separators, nothing but the alphabet the ids are made of.
_ID_BYTES = 16
_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{22}")
_TEMP_PREFIX = ".tmp-"
# A temp file younger than this may belong to a save in progress in another server process sharing the store
# (each stdio client starts its own server), so only older ones count as left over by an interrupted write.
_TEMP_GRACE_SECONDS = 3600.0
# PNG text chunk keywords: 1-79 Latin-1 characters, no leading, trailing or double spaces (PNG spec 11.3.4.3).
_KEYWORD_PATTERN = re.compile(r"[\x21-\x7e\xa1-\xff](?:[\x21-\x7e\xa1-\xff]| (?! ))*")
_PNG_MODES = frozenset({"RGB", "RGBA", "L", "LA"})

DEFAULT_TTL_SECONDS = 7 * 24 * 3600.0
DEFAULT_MAX_BYTES = 2 * 1024**3


def asset_uri(asset_id: str) -> str:
    return ASSET_URI_PREFIX + asset_id


def asset_id_from_uri(uri: str) -> str:
    """The id in a `pictoprompt://assets/<id>` URI, checked to be a well-formed id."""
    if not uri.startswith(ASSET_URI_PREFIX):
        raise InvalidInputError(f"{uri[:100]!r} is not an asset URI; asset URIs look like {ASSET_URI_PREFIX}<id>.")
    return check_asset_id(uri.removeprefix(ASSET_URI_PREFIX))


def check_asset_id(asset_id: str) -> str:
    if not _ID_PATTERN.fullmatch(asset_id):
        raise InvalidInputError(
            f"{asset_id[:100]!r} is not a valid asset id; ids are the 22 letters, digits, '-' and '_' after "
            f"{ASSET_URI_PREFIX} in a URI returned by an earlier call."
        )
    return asset_id


class AssetStore:
    """PNG files under `root`, one per output image; satisfies `pictoprompt.tools.base.AssetSink`."""

    def __init__(
        self,
        root: Path,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        expire_every_saves: int = 50,
        expire_every_seconds: float = 3600.0,
    ) -> None:
        if ttl_seconds <= 0 or max_bytes <= 0:
            raise ValueError("ttl_seconds and max_bytes must be positive")
        self.root = Path(root).expanduser().resolve()
        self.ttl_seconds = ttl_seconds
        self.max_bytes = max_bytes
        self._expire_every_saves = expire_every_saves
        self._expire_every_seconds = expire_every_seconds
        self._lock = threading.Lock()
        self._saves_since_expire = 0
        self._last_expire = 0.0
        self._stored_bytes = 0
        """The store's bytes as the last expire() left them, plus what this process saved since."""
        # Outputs can be private pictures: only the user running the server may list or read them. mkdir's
        # mode only applies to a folder it creates, so an existing one (made by hand, or by an older version)
        # is narrowed too; expire() does the same for the files.
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if os.name != "nt" and self.root.stat().st_mode & 0o777 != 0o700:
            self.root.chmod(0o700)
        self.expire()

    def save(self, image: Image.Image, metadata: dict[str, str]) -> SavedImage:
        """Write `image` as a PNG whose text chunks hold `metadata`; returns its URI and path."""
        info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            if not _KEYWORD_PATTERN.fullmatch(key) or len(key) > 79:
                raise ValueError(f"{key!r} cannot be a PNG text keyword (1-79 Latin-1 characters, no double spaces)")
            # add_text falls back to an iTXt (UTF-8) chunk by itself when the value is not Latin-1.
            info.add_text(key, str(value))
        if image.mode not in _PNG_MODES:
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")

        asset_id = secrets.token_urlsafe(_ID_BYTES)
        path = self._path(asset_id)
        fd, temp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=".png", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as file:
                image.save(file, format="PNG", pnginfo=info)
                size = file.tell()
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp_name, path)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(temp_name)
            raise
        self._fsync_root()
        self._maybe_expire(size)
        return SavedImage(uri=asset_uri(asset_id), path=str(path))

    def get(self, asset_id: str) -> Path:
        """The PNG file of an asset."""
        path = self._path(check_asset_id(asset_id))
        if not path.is_file():
            raise self._not_found(asset_id)
        return path

    def read_bytes(self, asset_id: str) -> bytes:
        try:
            return self.get(asset_id).read_bytes()
        except FileNotFoundError:  # expired between the check and the read
            raise self._not_found(asset_id) from None

    def ids_newest_first(self) -> list[str]:
        """Every asset's id, the newest first (what a completion offers)."""
        entries = []
        for path in self.root.iterdir():
            if path.suffix == ".png" and _ID_PATTERN.fullmatch(path.stem):
                with suppress(FileNotFoundError):  # expired meanwhile
                    entries.append((path.stat().st_mtime, path.stem))
        return [asset_id for _, asset_id in sorted(entries, reverse=True)]

    def thumbnail(self, asset_id: str, max_side: int = 512) -> bytes:
        """An asset as a JPEG (inline thumbnails must keep a whole tool result small), at most `max_side` px on its
        longer side, never upscaled."""
        with Image.open(io.BytesIO(self.read_bytes(asset_id)), formats=["PNG"]) as opened:
            image = opened.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        flatten_to_rgb(image).save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()

    def expire(self) -> int:
        """Remove entries older than the TTL, then the oldest until the store fits its size cap, and temp
        files left by interrupted writes. Returns how many files were removed."""
        with self._lock:
            self._saves_since_expire = 0
            self._last_expire = time.monotonic()
        now = time.time()
        removed = 0
        entries: list[tuple[float, int, Path]] = []
        for path in self.root.iterdir():
            try:
                stat = path.stat()
                if os.name != "nt" and stat.st_mode & 0o077 and not path.is_symlink():
                    path.chmod(0o700 if S_ISDIR(stat.st_mode) else 0o600)  # written by hand or an older version
            except FileNotFoundError:  # removed meanwhile by another process sharing the store
                continue
            age = now - stat.st_mtime
            if path.name.startswith(_TEMP_PREFIX):
                if age > _TEMP_GRACE_SECONDS:
                    removed += _remove(path)
            elif path.suffix == ".png" and _ID_PATTERN.fullmatch(path.stem):
                if age > self.ttl_seconds:
                    removed += _remove(path)
                else:
                    entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            removed += _remove(path)
            total -= size
        with self._lock:
            self._stored_bytes = total
        if removed:
            logger.info("asset store %s: removed %d expired or surplus files", self.root, removed)
        return removed

    def _maybe_expire(self, saved_bytes: int) -> None:
        with self._lock:
            self._saves_since_expire += 1
            self._stored_bytes += saved_bytes
            # Over the size cap, the oldest go at once: the cap holds after every save, not every 50th.
            due = (
                self._saves_since_expire >= self._expire_every_saves
                or time.monotonic() - self._last_expire >= self._expire_every_seconds
                or self._stored_bytes > self.max_bytes
            )
        if due:
            self.expire()

    def _path(self, asset_id: str) -> Path:
        return self.root / f"{asset_id}.png"

    def _fsync_root(self) -> None:
        # The rename is only durable once the directory entry is on disk. Windows cannot open directories.
        if sys.platform == "win32":
            return
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _not_found(self, asset_id: str) -> NotFoundError:
        days = self.ttl_seconds / 86400
        return NotFoundError(
            f"There is no asset {asset_uri(asset_id)}; assets expire after {days:g} days or when the store is"
            " full, so pass the image again (as a path, URL or data: URI) or re-run the call that made it."
        )


class RecordingSink:
    """An `AssetSink` that stores through the asset store and remembers what one job saved."""

    def __init__(self, store: AssetStore) -> None:
        self.store = store
        self.saved: list[SavedImage] = []

    def save(self, image: Image.Image, metadata: dict[str, str]) -> SavedImage:
        saved = self.store.save(image, metadata)
        self.saved.append(saved)
        return saved


def _remove(path: Path) -> int:
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    return 1


def flatten_to_rgb(image: Image.Image) -> Image.Image:
    """RGB on white: JPEG has no alpha, and white is what a transparent image usually sits on."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, "white")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
