"""Image inputs: every kind of reference accepted, every refusal with its message.

URL tests talk to a real HTTP server on 127.0.0.1; "public" hosts are simulated by standing in for DNS
(`images.resolve_host`) and, where a test needs the loopback server to count as public, for the address check.
Nothing leaves the machine.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import anyio
import pytest
from PIL import Image

from pictoprompt.errors import InvalidInputError, NotFoundError
from pictoprompt.server import images
from pictoprompt.server.assets import AssetStore
from pictoprompt.server.images import ImagePolicy, ImageResolver, PreResolvedImages, address_refusal

RED = (220, 20, 20)
BLUE = (20, 20, 220)


def encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def solid(color: tuple[int, ...] = RED, size: tuple[int, int] = (24, 16), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, color)


PNG = encode(solid(), "PNG")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def header_only_png(width: int, height: int) -> bytes:
    """A PNG that declares a size and carries no pixel data: a few dozen bytes, billions of pixels claimed."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b"")


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def assert_color(image: Image.Image, color: tuple[int, int, int], tolerance: int = 12) -> None:
    assert image.mode == "RGB"
    pixel = image.getpixel((image.width // 2, image.height // 2))
    assert all(abs(a - b) <= tolerance for a, b in zip(pixel, color, strict=True)), pixel


# --- a real HTTP server on 127.0.0.1 ---------------------------------------------------------------


class ImageServer:
    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        owner: ImageServer = self.server.owner  # type: ignore[attr-defined]
        owner.hosts.append(self.headers["Host"])
        parts = urlsplit(self.path)
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        try:
            if parts.path == "/img.png":
                self._send(PNG)
            elif parts.path.startswith("/hops/"):  # /hops/N: N redirects, then the image
                left = int(parts.path.rsplit("/", 1)[1])
                if left:
                    self._redirect(f"/hops/{left - 1}")
                else:
                    self._send(PNG)
            elif parts.path == "/redirect":
                self._redirect(query["to"])
            elif parts.path == "/declared-huge":
                self.send_response(200)
                self.send_header("Content-Length", str(10**9))
                self.end_headers()
                self.wfile.write(PNG)
            elif parts.path == "/endless":  # no Content-Length: the client must stop reading by itself
                self.send_response(200)
                self.end_headers()
                while True:
                    self.wfile.write(b"\0" * 65536)
            elif parts.path == "/slow":
                time.sleep(float(query.get("seconds", "3")))
                self._send(PNG)
            elif parts.path == "/page.html":
                self._send(b"<!DOCTYPE html><html><body>not an image</body></html>", "text/html")
            else:
                self.send_error(404)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up on purpose (size limit, timeout)

    def _send(self, body: bytes, content_type: str = "image/png") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    image_server = ImageServer()
    thread = threading.Thread(target=image_server.httpd.serve_forever, daemon=True)
    thread.start()
    yield image_server
    image_server.httpd.shutdown()
    image_server.httpd.server_close()


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, list[str]]], list[str]]:
    """Stand in for DNS: names in the mapping resolve to its addresses; returns the log of looked-up names."""
    lookups: list[str] = []

    def install(mapping: dict[str, list[str]]) -> list[str]:
        real = images.resolve_host

        async def resolve(host: str, port: int) -> list[images.IPAddress]:
            lookups.append(host)
            if host in mapping:
                return [ipaddress.ip_address(address) for address in mapping[host]]
            return await real(host, port)

        monkeypatch.setattr(images, "resolve_host", resolve)
        return lookups

    return install


@pytest.fixture
def loopback_is_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let 127.0.0.1 (and ::1) pass the address check: the test server stands in for a public one."""
    real = images.address_refusal
    stand_ins = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    monkeypatch.setattr(images, "address_refusal", lambda address: None if address in stand_ins else real(address))


def resolver(tmp_path: Path | None = None, assets: AssetStore | None = None, **policy: object) -> ImageResolver:
    roots = [tmp_path] if tmp_path else []
    return ImageResolver(ImagePolicy(allowed_roots=roots, **policy), assets)  # type: ignore[arg-type]


def refused(ref: str, match: str, resolver_: ImageResolver, error: type[Exception] = InvalidInputError) -> str:
    with pytest.raises(error, match=match) as info:
        resolver_.load(ref)
    return str(info.value)


# --- accepted -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_format", "image", "options"),
    [
        ("PNG", solid(), {}),
        ("JPEG", solid(), {"quality": 95}),
        ("WEBP", solid(), {"lossless": True}),
        ("BMP", solid(), {}),
        ("GIF", solid(), {"save_all": True, "append_images": [solid(BLUE)], "duration": 100}),  # first frame
        ("PNG", solid((*RED, 255), mode="RGBA"), {}),
        ("PNG", solid(128, mode="L"), {}),
    ],
)
def test_each_supported_format_decodes_to_rgb(
    tmp_path: Path, image_format: str, image: Image.Image, options: dict[str, object]
) -> None:
    path = tmp_path / "picture.bin"  # the extension says nothing: the decoded format is what counts
    path.write_bytes(encode(image, image_format, **options))
    decoded = resolver(tmp_path).load(str(path))
    assert decoded.size == (24, 16)
    assert_color(decoded, (128, 128, 128) if image.mode == "L" else RED)


def test_transparency_is_flattened_onto_white(tmp_path: Path) -> None:
    transparent = solid((0, 0, 0, 0), mode="RGBA")
    decoded = resolver().load(data_uri(encode(transparent, "PNG")))
    assert_color(decoded, (255, 255, 255), tolerance=0)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display", as phone cameras write
    decoded = resolver().load(data_uri(encode(solid(size=(40, 20)), "JPEG", exif=exif)))
    assert decoded.size == (20, 40)


def test_local_paths_relative_home_and_symlinks_inside_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(PNG)
    (tmp_path / "link.png").symlink_to(tmp_path / "pics" / "a.png")  # a symlink that stays inside is fine
    monkeypatch.chdir(tmp_path / "pics")
    monkeypatch.setenv("HOME", str(tmp_path))
    resolve = resolver(tmp_path).load
    for ref in [
        str(tmp_path / "pics" / "a.png"),
        "a.png",
        "~/pics/a.png",
        str(tmp_path / "link.png"),
        " a.png\n",
    ]:
        assert_color(resolve(ref), RED)


def test_data_uris_and_bare_base64() -> None:
    resolve = resolver().load
    encoded = base64.b64encode(PNG).decode()
    jpeg = base64.b64encode(encode(solid(BLUE), "JPEG", quality=95)).decode()
    accepted = [
        data_uri(PNG),
        data_uri(PNG, mime="application/octet-stream"),  # the declared type is not trusted either way
        encoded,
        encoded.rstrip("="),  # padding often goes missing when pasted
        "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76)),  # MIME line breaks
        base64.urlsafe_b64encode(PNG).decode(),
    ]
    for ref in accepted:
        assert_color(resolve(ref), RED)
    assert_color(resolve(jpeg), BLUE)


def test_asset_uri_of_an_earlier_result(tmp_path: Path) -> None:
    store = AssetStore(tmp_path / "assets")
    saved = store.save(solid(BLUE), {"prompt": "blue"})
    assert_color(resolver(assets=store).load(saved.uri), BLUE)


def test_url(server: ImageServer) -> None:
    assert_color(resolver(allow_private_urls=True).load(server.url("/img.png")), RED)


def test_up_to_three_redirects_are_followed(server: ImageServer) -> None:
    assert_color(resolver(allow_private_urls=True).load(server.url("/hops/3")), RED)


def test_connects_to_the_checked_address_keeping_the_host_name(
    server: ImageServer, fake_dns: Callable[[dict[str, list[str]]], list[str]], loopback_is_public: None
) -> None:
    # public.example exists in no DNS: the fetch can only work if it goes to the address that was checked.
    lookups = fake_dns({"public.example": ["127.0.0.1"]})
    server.hosts.clear()
    assert_color(resolver().load(server.url("/hops/1", host="public.example")), RED)
    assert server.hosts == [f"public.example:{server.port}"] * 2  # virtual hosting still sees its name
    assert lookups == ["public.example"] * 2  # checked again at every hop


def test_the_next_address_is_tried_when_one_refuses(
    server: ImageServer, fake_dns: Callable[[dict[str, list[str]]], list[str]], loopback_is_public: None
) -> None:
    fake_dns({"dual.example": ["::1", "127.0.0.1"]})  # nothing listens on ::1 at that port
    assert_color(resolver().load(server.url("/img.png", host="dual.example")), RED)


def test_resolve_all_and_pre_resolved_images(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    refs = [str(tmp_path / "a.png"), data_uri(encode(solid(BLUE), "PNG")), str(tmp_path / "a.png")]
    resolved = anyio.run(resolver(tmp_path).resolve_all, refs)
    assert isinstance(resolved, PreResolvedImages)
    first = resolved.load(refs[0])
    assert_color(first, RED)
    assert_color(resolved.load(refs[1]), BLUE)
    first.paste(BLUE, (0, 0, 24, 16))  # a tool drawing on its input does not change what the next load sees
    assert_color(resolved.load(refs[0]), RED)
    with pytest.raises(KeyError, match="was not resolved before the job started"):
        resolved.load("never-resolved.png")


# --- refused: local files -----------------------------------------------------------------------


def test_path_outside_roots_points_to_allow_dir_without_naming_the_allowed_folders(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(PNG)
    message = refused(str(outside / "secret.png"), "is outside the folders this server may read", resolver(root))
    assert "--allow-dir" in message and str(root) not in message
    dotted = str(root / ".." / "elsewhere" / "secret.png")
    message = refused(dotted, "outside the folders", resolver(root))
    assert dotted in message and str(outside) not in message  # the path as given, not where it leads


def test_symlinks_escaping_a_root_are_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(PNG)
    (root / "innocent.png").symlink_to(outside / "secret.png")
    (root / "folder").symlink_to(outside)
    for ref in [root / "innocent.png", root / "folder" / "secret.png"]:
        message = refused(str(ref), "outside the folders", resolver(root))
        assert str(outside) not in message, "the refusal must not say where the symlink leads"


def test_hard_links_are_refused_since_they_may_reach_outside_the_roots(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(PNG)
    os.link(outside / "secret.png", root / "linked.png")
    message = refused(str(root / "linked.png"), "has 2 hard links", resolver(root))
    assert "copy it into an allowed folder" in message and str(outside) not in message
    (root / "own.png").write_bytes(PNG)  # a file with one name is read as before
    assert_color(resolver(root).load(str(root / "own.png")), RED)


def test_no_roots_means_no_local_files(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    refused(str(tmp_path / "a.png"), "reads no local files.*--allow-dir DIR", resolver())


def test_missing_file_directory_and_fifo(tmp_path: Path) -> None:
    refused(str(tmp_path / "missing.png"), "There is no file", resolver(tmp_path), NotFoundError)
    refused(str(tmp_path), "is not a regular file", resolver(tmp_path))
    os.mkfifo(tmp_path / "pipe")
    refused(str(tmp_path / "pipe"), "is not a regular file", resolver(tmp_path))  # and does not hang


def test_file_too_large(tmp_path: Path) -> None:
    (tmp_path / "big.png").write_bytes(PNG + b"\0" * 1000)
    refused(str(tmp_path / "big.png"), "is larger than 0.0005 MB", resolver(tmp_path, max_bytes=500))


# --- refused: URLs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/declared-huge", "/endless"], ids=["declared-content-length", "streamed-without-length"]
)
def test_download_too_large_is_aborted(server: ImageServer, path: str) -> None:
    started = time.monotonic()
    refused(server.url(path), "is larger than 0.1 MB", resolver(allow_private_urls=True, max_bytes=100_000))
    assert time.monotonic() - started < 5  # stopped early, not after reading the endless body


def test_default_limits() -> None:
    policy = ImagePolicy()
    assert (policy.max_bytes, policy.timeout_s, policy.max_redirects, policy.max_pixels) == (
        20_000_000,
        20.0,
        3,
        40_000_000,
    )
    assert policy.allow_private_urls is False and policy.allowed_roots == []


def test_too_many_redirects(server: ImageServer) -> None:
    refused(
        server.url("/hops/4"),
        "redirects more than 3 times; give the image's final URL",
        resolver(allow_private_urls=True),
    )


def test_slow_server_times_out(server: ImageServer) -> None:
    started = time.monotonic()
    refused(
        server.url("/slow?seconds=3"),
        "took longer than 0.5 s",
        resolver(allow_private_urls=True, timeout_s=0.5),
    )
    assert time.monotonic() - started < 2.5


def test_http_error_status_and_html_page(server: ImageServer) -> None:
    private_ok = resolver(allow_private_urls=True)
    refused(server.url("/nothing-here"), "answered HTTP 404", private_ok)
    refused(
        server.url("/page.html"),
        r"not a PNG, JPEG, WebP, GIF or BMP image \(it looks like an HTML page\)",
        private_ok,
    )


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("127.0.0.1", "a loopback address"),
        ("localhost", "a loopback address"),
        ("[::1]", "a loopback address"),
    ],
)
def test_loopback_urls_are_refused(server: ImageServer, host: str, kind: str) -> None:
    message = refused(server.url("/img.png", host=host), kind, resolver())
    assert (
        "only public internet addresses are fetched unless the server is started with --allow-private-urls" in message
    )
    assert server.url("/img.png", host=host) in message


@pytest.mark.parametrize(
    ("addresses", "shown", "kind"),
    [
        (["10.0.0.7"], "10.0.0.7", "a private address"),
        (["93.184.215.14", "192.168.1.20"], "192.168.1.20", "a private address"),  # every address is checked
        (["169.254.169.254"], "169.254.169.254", "a link-local address"),  # cloud metadata endpoint
        (["::ffff:127.0.0.1"], "::ffff:7f00:1", "a loopback address"),  # IPv4-mapped IPv6
        (["0.0.0.0"], "0.0.0.0", "an unspecified address"),
    ],
)
def test_dns_names_resolving_to_non_public_addresses_are_refused(
    fake_dns: Callable[[dict[str, list[str]]], list[str]], addresses: list[str], shown: str, kind: str
) -> None:
    fake_dns({"images.example": addresses})
    refused("https://images.example/cat.png", f"points to {shown}, {kind}", resolver())


def test_redirects_to_non_public_addresses_are_refused(server: ImageServer, loopback_is_public: None) -> None:
    for target, kind in [
        (f"http://127.0.0.2:{server.port}/img.png", "points to 127.0.0.2, a loopback address"),
        ("http://169.254.169.254/latest/meta-data/", "points to 169.254.169.254, a link-local address"),
        ("file:///etc/passwd", "is not an http\\(s\\) URL"),
    ]:
        start = server.url(f"/redirect?to={quote(target, safe='')}")
        message = refused(start, kind, resolver())
        assert f"reached by a redirect from {start}" in message


def test_unresolvable_host(fake_dns: Callable[[dict[str, list[str]]], list[str]]) -> None:
    refused("http://no-such-host.invalid/x.png", "could not be resolved", resolver())


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("127.0.0.1", "a loopback address"),
        ("10.1.2.3", "a private address"),
        ("172.16.0.1", "a private address"),
        ("192.168.0.1", "a private address"),
        ("100.64.0.1", "a non-public address"),
        ("169.254.169.254", "a link-local address"),
        ("224.0.0.1", "a multicast address"),
        ("240.0.0.1", "a reserved address"),
        ("0.0.0.0", "an unspecified address"),
        ("::", "an unspecified address"),
        ("::1", "a loopback address"),
        ("fe80::1", "a link-local address"),
        ("fc00::1", "a private address"),
        ("ff02::1", "a multicast address"),
        ("::ffff:10.0.0.1", "a private address"),
        ("2002:7f00:1::", "a loopback address"),  # 6to4 wrapping 127.0.0.1
        ("64:ff9b::a00:1", "a private address"),  # NAT64 wrapping 10.0.0.1
    ],
)
def test_address_classification(address: str, expected: str | None) -> None:
    assert address_refusal(ipaddress.ip_address(address)) == expected


# --- refused: decoding ----------------------------------------------------------------------------


def test_unsupported_formats_are_named(tmp_path: Path) -> None:
    (tmp_path / "photo.png").write_bytes(encode(solid(), "TIFF"))  # the extension lies
    (tmp_path / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    resolve = resolver(tmp_path)
    accepted = "not a PNG, JPEG, WebP, GIF or BMP image"
    refused(str(tmp_path / "photo.png"), rf"{accepted} \(it looks like TIFF\); convert it", resolve)
    refused(str(tmp_path / "drawing.svg"), rf"{accepted} \(it looks like SVG\)", resolve)
    refused(base64.b64encode(encode(solid(), "TIFF")).decode(), r"\(it looks like TIFF\)", resolve)  # bare base64
    refused("data:image/svg+xml," + quote("<svg width='1' height='1'/>"), r"\(it looks like SVG\)", resolve)
    refused(data_uri(b"just some text"), f"{accepted}; convert it", resolve)


def test_too_many_pixels_from_the_header_alone() -> None:
    decompression_limit = Image.MAX_IMAGE_PIXELS
    message = refused(data_uri(header_only_png(8000, 6000)), "8000×6000 pixels", resolver())
    assert "(48.0 megapixels); at most 40 megapixels are accepted, so downscale it first" in message
    refused(data_uri(header_only_png(100_000, 100_000)), "decompression bomb.*at most 40 megapixels", resolver())
    refused(data_uri(header_only_png(300, 200)), "1 megapixels", resolver(max_pixels=50_000))
    assert decompression_limit == Image.MAX_IMAGE_PIXELS  # global PIL state untouched


def test_truncated_and_corrupt_images(tmp_path: Path) -> None:
    big = encode(Image.effect_noise((256, 256), 64).convert("RGB"), "PNG")
    refused(data_uri(big[: len(big) // 2]), "truncated or corrupt", resolver())
    jpeg = encode(Image.effect_noise((256, 256), 64).convert("RGB"), "JPEG")
    refused(data_uri(jpeg[: len(jpeg) // 3]), "truncated or corrupt", resolver())
    refused(data_uri(PNG[:30]), "truncated or corrupt|not a PNG", resolver())


def test_bad_base64() -> None:
    message = refused("data:image/png;base64,@@not-base64@@", "The data: URI is not valid base64", resolver())
    assert "data:image/png;base64,iVBORw0KGgo" in message  # shows the accepted form
    refused("iVBORw0KGgo!!!!", "The image data is not valid base64", resolver())
    refused("data:image/png;base64,iVBORw0KGgoAA", "not valid base64", resolver())  # 13 characters: impossible
    refused("data:image/png;iVBORw0KGgo", "has no ',' before its data", resolver())
    refused(data_uri(b"\0" * 1000), "The data: URI is larger than 0.0005 MB", resolver(max_bytes=500))


def test_asset_refusals(tmp_path: Path) -> None:
    store = AssetStore(tmp_path / "assets")
    refused(
        "pictoprompt://assets/AAAAAAAAAAAAAAAAAAAAAA",
        "There is no asset",
        resolver(assets=store),
        NotFoundError,
    )
    refused("pictoprompt://assets/../../etc/passwd", "is not a valid asset id", resolver(assets=store))
    refused("pictoprompt://jobs/123", "is not an asset URI", resolver(assets=store))
    refused("pictoprompt://assets/AAAAAAAAAAAAAAAAAAAAAA", "no asset store here", resolver(), NotFoundError)


def test_other_references() -> None:
    refused("", "The image reference is empty; give a local file path, an http\\(s\\) URL", resolver())
    refused("ftp://example.com/cat.png", "ftp:// URLs are not fetched", resolver())
    refused("file:///etc/passwd", "file:// URLs are not fetched.*its plain path", resolver())
    refused("http://", "not a valid URL|has no host", resolver())
