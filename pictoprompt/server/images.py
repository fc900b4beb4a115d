"""Image inputs: a local path (inside the allowed roots), an http(s) URL, a data: URI or bare base64, or an earlier
result's pictoprompt://assets/<id> URI, resolved under the input limits.

The server resolves every reference of a request before the job starts, so a bad input is refused at once and
no job holds the GPU lock while waiting on the network.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import os
import re
import socket
import stat
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote_to_bytes

import anyio
import anyio.to_thread
import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from pictoprompt import __version__
from pictoprompt.errors import InvalidInputError, NotFoundError
from pictoprompt.server.assets import AssetStore, asset_id_from_uri, flatten_to_rgb

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ACCEPTED_REFERENCES = "a local file path, an http(s) URL, a data: URI, bare base64 or a pictoprompt://assets/<id> URI"
ACCEPTED_FORMATS = "PNG, JPEG, WebP, GIF or BMP"
# The only PIL plugins that ever see untrusted bytes: `Image.open(formats=...)` tries no others, so the
# decoded format is checked by construction whatever the file name or Content-Type claims.
_PIL_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# Formats people often try, named in the refusal so they know what to convert.
_OTHER_SIGNATURES = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"<svg", "SVG"),
    (b"<?xml", "SVG or other XML"),
    (b"<!doctype html", "an HTML page"),
    (b"<html", "an HTML page"),
)
# What the first four base64 characters of an image file decode to: enough to tell pasted image data from a
# file name. Unsupported formats are listed too, so pasted TIFF gets the format refusal, not "no such file".
_BASE64_IMAGE_SIGNATURES = (b"\x89PN", b"\xff\xd8\xff", b"GIF", b"RIF", b"BM", b"II*", b"MM\x00")
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/_-]*")
_WHITESPACE = re.compile(r"\s+")
# Longer than any path an OS accepts (Linux PATH_MAX), so it can only be data.
_MAX_PATH_CHARS = 4096
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Checked in this order because the categories overlap (127.0.0.1 is also "private" to `ipaddress`): the first
# match is the most telling name for the refusal.
_REFUSED_ADDRESS_KINDS = (
    ("is_unspecified", "an unspecified address"),
    ("is_loopback", "a loopback address"),
    ("is_link_local", "a link-local address"),
    ("is_multicast", "a multicast address"),
    ("is_reserved", "a reserved address"),
    ("is_private", "a private address"),
)
# Asking for the formats we decode keeps content-negotiating servers from answering with AVIF or HEIC.
_ACCEPT = "image/png,image/jpeg,image/webp,image/gif,image/bmp;q=0.9,*/*;q=0.5"


@dataclass
class ImagePolicy:
    """Limits on image inputs."""

    allowed_roots: list[Path] = field(default_factory=list)
    """Local paths must resolve (symlinks followed) inside one of these directories."""
    allow_private_urls: bool = False
    """Fetch from loopback, private, link-local and other non-public addresses too."""
    max_bytes: int = 20_000_000
    timeout_s: float = 20.0
    max_redirects: int = 3
    max_pixels: int = 40_000_000
    decode_budget_pixels: int = 80_000_000
    """Pixels decoded at the same time across all requests; an image that does not fit waits for others.
    About 3 bytes of memory per pixel: the default bounds decoding at roughly 250 MB however many calls arrive."""


class PixelBudget:
    """A count of pixels shared by every decode: what `hold` takes, others wait for (a weighted semaphore).

    Threads, not async: decoding runs in worker threads, and the CLI resolves each image in its own event loop.
    """

    def __init__(self, pixels: int) -> None:
        if pixels <= 0:
            raise ValueError("the pixel budget must be positive")
        self.pixels = pixels
        self._free = pixels
        self._condition = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        # An image larger than the whole budget (only when the budget is set below max_pixels) waits for all.
        pixels = min(pixels, self.pixels)
        with self._condition:
            self._condition.wait_for(lambda: self._free >= pixels)
            self._free -= pixels
        try:
            yield
        finally:
            with self._condition:
                self._free += pixels
                self._condition.notify_all()

    @property
    def in_use(self) -> int:
        with self._condition:
            return self.pixels - self._free


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (a module function so tests can stand in for DNS)."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


def address_refusal(address: IPAddress) -> str | None:
    """Why an address may not be fetched from, or None for a public internet address."""
    # Embedded IPv4 first: ::ffff:127.0.0.1 is best described as loopback, which is where it leads.
    for candidate in (*_embedded_ipv4(address), address):
        for attribute, reason in _REFUSED_ADDRESS_KINDS:
            if getattr(candidate, attribute):
                return reason
        if not candidate.is_global:  # e.g. 100.64.0.0/10, shared carrier-grade NAT space
            return "a non-public address"
    return None


def _embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address leads to (mapped, 6to4, Teredo, NAT64): each must pass the check too."""
    if isinstance(address, ipaddress.IPv4Address):
        return []
    embedded = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
    if address in _NAT64:
        embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return [candidate for candidate in embedded if candidate is not None]


def decode_image(data: bytes, max_pixels: int = 40_000_000, budget: PixelBudget | None = None) -> Image.Image:
    """Decode untrusted bytes into an RGB image: supported formats only, at most `max_pixels`, complete data.

    The pixel count is checked from the header before any pixel is decoded, and decoding waits until `budget`
    has room for that many pixels. PIL's own decompression-bomb check (global `Image.MAX_IMAGE_PIXELS`) is left
    as it is for other code; its error, and its warning where warnings are errors, are refused here like any
    image over the limit.
    """
    limit = f"at most {max_pixels / 1e6:g} megapixels are accepted, so downscale it first"
    try:
        image = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except UnidentifiedImageError:
        raise InvalidInputError(
            f"The data is not a {ACCEPTED_FORMATS} image{_describe_other_format(data)}; "
            "convert it to one of those formats."
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInputError(f"The image declares a huge size (a decompression bomb?); {limit}.") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise _corrupt(error) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise InvalidInputError(
                f"The image is {width}×{height} pixels ({width * height / 1e6:.1f} megapixels); {limit}."
            )
        try:
            with budget.hold(width * height) if budget is not None else nullcontext():
                # The current frame is the first one: GIF and animated WebP give their first frame. Phones store
                # photos sideways with an EXIF orientation, which the pixels must follow to match what people
                # see. In place: a copy of an upright 40-megapixel photo would double the memory it takes.
                image.load()
                ImageOps.exif_transpose(image, in_place=True)
                return flatten_to_rgb(image)
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise _corrupt(error) from None


def _corrupt(error: Exception) -> InvalidInputError:
    return InvalidInputError(
        f"The image data is truncated or corrupt ({error}); give a complete {ACCEPTED_FORMATS} file."
    )


def _describe_other_format(data: bytes) -> str:
    text = data[:256].lstrip().lower()  # markup may start with blanks and any letter case
    for signature, name in _OTHER_SIGNATURES:
        if data.startswith(signature) or text.startswith(signature):
            return f" (it looks like {name})"
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return " (it looks like HEIC or AVIF)"
    return ""


def _shorten(text: str, limit: int = 120) -> str:
    """References echoed in messages are cut: a data URI can be megabytes long."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_bare_base64(ref: str) -> bool:
    if "." in ref:  # file names have extensions; base64 has no dots
        return False
    if len(ref) > _MAX_PATH_CHARS:
        return True
    try:
        head = base64.b64decode(ref[:4].replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):  # ValueError: a non-ASCII character, which base64 never holds
        return False
    return head.startswith(_BASE64_IMAGE_SIGNATURES)


class PreResolvedImages:
    """Images the server resolved before a job started; satisfies `pictoprompt.tools.base.ImageSource`."""

    def __init__(self, images: Mapping[str, Image.Image]) -> None:
        self._images = dict(images)

    def load(self, ref: str) -> Image.Image:
        try:
            image = self._images[ref]
        except KeyError:
            raise KeyError(
                f"{_shorten(ref)!r} was not resolved before the job started: the tool's image_refs() must"
                " list every image reference of its request"
            ) from None
        return image.copy()  # a tool may draw on what it loads; the next load must still see the original


class ImageResolver:
    """Turns image references into RGB images under an `ImagePolicy`."""

    def __init__(self, policy: ImagePolicy, assets: AssetStore | None = None) -> None:
        self.policy = policy
        self.assets = assets
        # One budget for every request this resolver serves: concurrent calls share it.
        self.budget = PixelBudget(policy.decode_budget_pixels)
        # Resolved once, so that a root reached through a symlink still contains its files' resolved paths.
        self._roots = [Path(root).expanduser().resolve() for root in policy.allowed_roots]

    async def resolve(self, ref: str) -> Image.Image:
        data = await self._read(ref.strip())
        return await anyio.to_thread.run_sync(decode_image, data, self.policy.max_pixels, self.budget)

    async def resolve_all(self, refs: Iterable[str]) -> PreResolvedImages:
        """Resolve each distinct reference once, in order, stopping at the first refusal."""
        return PreResolvedImages({ref: await self.resolve(ref) for ref in dict.fromkeys(refs)})

    def load(self, ref: str) -> Image.Image:
        """`resolve` for callers without an event loop: the CLI hands the resolver itself to a tool as its
        `ImageSource`."""
        return anyio.run(self.resolve, ref)

    async def _read(self, ref: str) -> bytes:
        if not ref:
            raise InvalidInputError(f"The image reference is empty; give {ACCEPTED_REFERENCES}.")
        lowered = ref[:16].lower()
        if lowered.startswith("pictoprompt://"):
            return await self._read_asset(ref)
        if lowered.startswith(("http://", "https://")):
            return await self._fetch(ref)
        # Decoding tens of megabytes of base64 takes a while: off the event loop, like file reads.
        if lowered.startswith("data:"):
            return await anyio.to_thread.run_sync(self._read_data_uri, ref)
        if _is_bare_base64(ref):
            return await anyio.to_thread.run_sync(self._decode_base64, ref, "image data")
        if scheme := _URL_SCHEME.match(ref):
            raise InvalidInputError(
                f"{scheme.group(1)}:// URLs are not fetched; give {ACCEPTED_REFERENCES} "
                "(for a local file, its plain path)."
            )
        return await anyio.to_thread.run_sync(self._read_file, ref)

    async def _read_asset(self, ref: str) -> bytes:
        asset_id = asset_id_from_uri(ref)
        if self.assets is None:
            raise NotFoundError(
                f"There is no asset store here to look up {_shorten(ref)}; give the image as a path, URL or data: URI."
            )
        return await anyio.to_thread.run_sync(self.assets.read_bytes, asset_id)

    def _read_data_uri(self, ref: str) -> bytes:
        header, comma, payload = ref.partition(",")
        if not comma:
            raise InvalidInputError(
                "The data: URI has no ',' before its data; the accepted form is data:image/png;base64,<data>."
            )
        if header.lower().endswith(";base64"):
            return self._decode_base64(payload, "data: URI")
        # Percent-encoded data (how SVG is usually inlined); the decoder then says whether it is an image.
        data = unquote_to_bytes(payload)
        self._check_size(len(data), "The data: URI")
        return data

    def _decode_base64(self, text: str, what: str) -> bytes:
        compact = _WHITESPACE.sub("", text).rstrip("=")
        self._check_size(len(compact) * 3 // 4, f"The {what}")
        if not _BASE64_TEXT.fullmatch(compact) or len(compact) % 4 == 1:
            raise InvalidInputError(
                f"The {what} is not valid base64; give the image file's bytes base64-encoded "
                "(standard or URL-safe alphabet), e.g. data:image/png;base64,iVBORw0KGgo..."
            )
        # Accept the URL-safe alphabet and missing padding: both are common in pasted data.
        standard = compact.replace("-", "+").replace("_", "/")
        return base64.b64decode(standard + "=" * (-len(standard) % 4))

    def _check_size(self, size: int, what: str) -> None:
        if size > self.policy.max_bytes:
            raise InvalidInputError(
                f"{what} is larger than {self.policy.max_bytes / 1e6:g} MB; give a smaller or more compressed image."
            )

    def _read_file(self, ref: str) -> bytes:
        # Messages name the path as the caller gave it, never where it resolves nor which folders are allowed:
        # a refusal must not tell a client where a symlink leads or how the machine is laid out.
        shown = _shorten(ref)
        try:
            path = Path(ref).expanduser().resolve()
        except (OSError, RuntimeError, ValueError) as error:  # symlink loop, NUL byte
            raise InvalidInputError(
                f"The path {shown!r} cannot be used ({error}); give {ACCEPTED_REFERENCES}."
            ) from None
        if not any(path.is_relative_to(root) for root in self._roots):
            raise InvalidInputError(self._outside_roots_message(shown))
        # O_NOFOLLOW: the path was checked with its symlinks resolved, so a symlink there now is a swap.
        # O_NONBLOCK: opening a FIFO would otherwise block until a writer shows up; it is refused below.
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        flags |= getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise NotFoundError(f"There is no file {shown}; give the path of an existing image file.") from None
        except OSError as error:
            raise InvalidInputError(
                f"The file {shown} cannot be read ({error.strerror}); give a readable image file."
            ) from None
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise InvalidInputError(f"{shown} is not a regular file; give the path of an image file.")
            if status.st_nlink > 1:
                # A hard link is the same file under a second name: one made inside an allowed folder can reach a
                # file outside it, and unlike a symlink nothing says where the other names are.
                raise InvalidInputError(
                    f"The file {shown} has {status.st_nlink} hard links, so it may be a file from outside the "
                    "folders this server may read; copy it into an allowed folder (a copy, not a link), or pass "
                    "the image as a URL, data: URI or base64."
                )
            with open(fd, "rb", closefd=False) as file:
                data = file.read(self.policy.max_bytes + 1)  # never more than the limit, even if it grows
        finally:
            os.close(fd)
        self._check_size(len(data), f"The file {shown}")
        return data

    def _outside_roots_message(self, shown: str) -> str:
        if not self._roots:
            return (
                f"This server reads no local files, so {shown} is refused; pass the image as a URL, data: URI"
                " or base64, or start the server with --allow-dir DIR to let it read a directory."
            )
        return (
            f"The file {shown} is outside the folders this server may read; pass the image as a URL, data: URI"
            " or base64, or start the server with --allow-dir naming a folder that holds it."
        )

    async def _fetch(self, url: str) -> bytes:
        try:
            with anyio.fail_after(self.policy.timeout_s):
                return await self._fetch_following_redirects(httpx.URL(url))
        except (TimeoutError, httpx.TimeoutException):
            raise InvalidInputError(
                f"Fetching {_shorten(url)} took longer than {self.policy.timeout_s:g} s; give a faster URL or"
                " pass the image as a file or data: URI."
            ) from None
        except httpx.InvalidURL as error:
            raise InvalidInputError(f"{_shorten(url)} is not a valid URL ({error}); give an http(s) URL.") from None
        except httpx.HTTPError as error:
            raise InvalidInputError(
                f"Fetching {_shorten(url)} failed ({error or type(error).__name__}); check the URL, or pass"
                " the image as a file or data: URI."
            ) from None

    async def _fetch_following_redirects(self, url: httpx.URL) -> bytes:
        original = url
        # A fresh client per reference and no keep-alive: a connection opened for one checked address and TLS
        # name is never reused for another host. trust_env=False: an environment proxy would do its own DNS
        # lookup, and the address check would no longer say where the request goes.
        async with httpx.AsyncClient(
            follow_redirects=False,  # followed below, so that every hop is checked
            trust_env=False,
            timeout=self.policy.timeout_s,
            limits=httpx.Limits(max_keepalive_connections=0),
            # identity: a compressed body could expand far past the size limit within a single chunk.
            headers={
                "User-Agent": f"pictoprompt/{__version__}",
                "Accept": _ACCEPT,
                "Accept-Encoding": "identity",
            },
        ) as client:
            for _ in range(self.policy.max_redirects + 1):
                response = await self._send(client, url, original)
                try:
                    if not response.is_redirect:
                        return await self._read_body(response, url)
                    url = url.join(response.headers["location"])
                finally:
                    await response.aclose()
        raise InvalidInputError(
            f"{_shorten(str(original))} redirects more than {self.policy.max_redirects} times; give the"
            " image's final URL."
        )

    async def _send(self, client: httpx.AsyncClient, url: httpx.URL, original: httpx.URL) -> httpx.Response:
        via = "" if url == original else f" (reached by a redirect from {_shorten(str(original))})"
        if url.scheme not in ("http", "https"):
            raise InvalidInputError(f"{_shorten(str(url))}{via} is not an http(s) URL; only http(s) URLs are fetched.")
        if not url.raw_host:
            raise InvalidInputError(f"{_shorten(str(url))}{via} has no host; give a complete http(s) URL.")
        if self.policy.allow_private_urls:
            return await client.send(client.build_request("GET", url), stream=True)

        host = url.raw_host.decode("ascii")
        try:
            addresses = await resolve_host(host, url.port or (443 if url.scheme == "https" else 80))
        except OSError as error:
            raise InvalidInputError(
                f"The host {host} of {_shorten(str(url))}{via} could not be resolved"
                f" ({error.strerror or error}); check the URL."
            ) from None
        for address in addresses:  # every address: the connection may go to any of them
            if reason := address_refusal(address):
                raise InvalidInputError(
                    f"{_shorten(str(url))}{via} points to {address}, {reason}; only public internet addresses"
                    " are fetched unless the server is started with --allow-private-urls."
                )
        # Connect to an address just checked, not to the name, so a second DNS answer (rebinding) cannot send
        # the request elsewhere. Host header and TLS name (SNI, certificate check) stay the server's name.
        headers = {"Host": url.netloc.decode("ascii")}
        extensions = {"sni_hostname": host} if url.scheme == "https" else {}
        requests = [
            client.build_request("GET", url.copy_with(host=str(address)), headers=headers, extensions=extensions)
            for address in addresses
        ]
        for request in requests[:-1]:
            try:
                return await client.send(request, stream=True)
            except httpx.ConnectError:
                continue  # e.g. an IPv6 address on a machine without IPv6: try the next, as browsers do
        return await client.send(requests[-1], stream=True)

    async def _read_body(self, response: httpx.Response, url: httpx.URL) -> bytes:
        if not response.is_success:
            raise InvalidInputError(
                f"{_shorten(str(url))} answered HTTP {response.status_code}; give a URL that serves the image itself."
            )
        what = f"The image at {_shorten(str(url))}"
        declared = response.headers.get("content-length", "")
        if declared.isdigit():
            self._check_size(int(declared), what)  # refuse before reading anything
        chunks: list[bytes] = []
        received = 0
        async for chunk in response.aiter_bytes():
            received += len(chunk)
            self._check_size(received, what)  # the declared length may be missing or false
            chunks.append(chunk)
        return b"".join(chunks)
