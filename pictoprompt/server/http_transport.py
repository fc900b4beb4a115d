"""What streamable HTTP needs beyond the SDK's defaults: a body limit that says why, Host/Origin checks, an access
log without query strings (a token may ride in one), and an event set when a request's client disconnects.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
from collections.abc import Iterable
from typing import Any

import anyio
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pictoprompt.server.images import ImagePolicy
from pictoprompt.settings import Settings
from pictoprompt.tools.base import IMAGE_REF_DESCRIPTION, ToolSpec

logger = logging.getLogger(__name__)

CLIENT_GONE = "pictoprompt.client_gone"
"""ASGI scope key of the `anyio.Event` set when the request's client disconnects."""

# What a request carries besides its images (prompt, options, JSON-RPC framing), and how much base64 can grow
# beyond 4/3 when a client wraps its lines (MIME wraps at 76 characters with CRLF: 2 bytes per 76).
_REQUEST_OVERHEAD_BYTES = 1024 * 1024
_BASE64_LINE_BREAKS = 78 / 76
_CANONICAL_LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
_INVALID_REQUEST = -32600


def max_images_per_call(specs: Iterable[ToolSpec]) -> int:
    """The most image references one call of any of `specs` may carry (read from the request schemas)."""
    most = 0
    for spec in specs:
        count = 0
        for name, prop in spec.request_model.model_json_schema().get("properties", {}).items():
            if prop.get("description") == IMAGE_REF_DESCRIPTION:
                count += 1
            elif prop.get("type") == "array" and prop.get("items", {}).get("description") == IMAGE_REF_DESCRIPTION:
                if "maxItems" not in prop:
                    raise ValueError(f"{spec.name}.{name} takes any number of images; give the list a max_length")
                count += prop["maxItems"]
        most = max(most, count)
    return most


def request_body_limit(images: int, image_bytes: int = ImagePolicy.max_bytes) -> int:
    """Bytes of one HTTP request: `images` images of `image_bytes` each as (line-wrapped) base64, plus the rest."""
    per_image = math.ceil(math.ceil(image_bytes / 3) * 4 * _BASE64_LINE_BREAKS)
    return images * per_image + _REQUEST_OVERHEAD_BYTES


def body_limit_message(limit: int, images: int, image_bytes: int, declared: int | None = None) -> str:
    size = f"The request is {declared / 1e6:.0f} MB, more" if declared else "The request is more"
    return (
        f"{size} than this server accepts over HTTP ({limit / 1e6:.0f} MB: up to {images} images of at most "
        f"{image_bytes / 1e6:g} MB each, sent as base64). Send large images by reference instead of inline: "
        "a local path in a folder the server may read (--allow-dir), an http(s) URL, or the "
        "pictoprompt://assets/<id> URI of an earlier result; or send fewer or smaller images."
    )


def _host_names(host: str) -> list[str]:
    """`host` as it appears in a Host header (IPv6 in brackets), then the canonical loopback names."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        named = host.lower()
    else:
        named = f"[{address.compressed}]" if address.version == 6 else address.compressed
    return list(dict.fromkeys([named, *_CANONICAL_LOOPBACK]))


def http_transport_security(settings: Settings, host: str) -> TransportSecuritySettings | None:
    """Host/Origin checks for a token-less server; None (the SDK's own defaults) when a token guards it.

    The SDK checks Host and Origin only when bound to 127.0.0.1, localhost or ::1; on another loopback address a
    page that rebinds its domain to it (DNS rebinding) could drive every tool. So the allowed names are the bound
    address and the canonical loopback names, on any port (the MCP Inspector runs on its own).
    """
    if settings.token:
        return None  # a browser never attaches the bearer token by itself, so a rebound page gets a 401 anyway
    names = _host_names(host)
    hosts = [f"{name}:*" for name in names] + names  # a client on port 80 may send the name alone
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=hosts,
        allowed_origins=[f"http://{allowed}" for allowed in hosts],
    )


class HttpGuard:
    """ASGI middleware around the MCP app: a body-limit refusal as a JSON-RPC error that says the limit and the
    alternatives (clients show a bare 413 as "Server returned an error response"), and the client-gone event
    (the pre-2026 wire does not cancel a call whose client went away)."""

    def __init__(self, app: ASGIApp, limit: int, images: int, image_bytes: int = ImagePolicy.max_bytes) -> None:
        self.app = app
        self.limit = limit
        self.images = images
        self.image_bytes = image_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gone = anyio.Event()
        scope[CLIENT_GONE] = gone

        async def watched_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            return message

        replaced = False

        async def explained_send(message: Message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] == 413:
                replaced = True
                await self._send_limit_error(scope, send)
                return
            if replaced and message["type"] == "http.response.body":
                return  # the SDK's own "Request body too large" text, replaced above
            await send(message)

        await self.app(scope, watched_receive, explained_send)

    async def _send_limit_error(self, scope: Scope, send: Send) -> None:
        declared = _content_length(scope)
        message = body_limit_message(self.limit, self.images, self.image_bytes, declared)
        logger.info("refused a %s-byte request over the %d-byte limit", declared or "streamed", self.limit)
        # A JSON-RPC error in a JSON body: the MCP client reports its message instead of a generic HTTP failure.
        body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": _INVALID_REQUEST, "message": message}})
        encoded = body.encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(encoded)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": encoded, "more_body": False})


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length" and value.isdigit():
            return int(value)
    return None


class _NoQueryStrings(logging.Filter):
    """Cuts the query string off the request path in uvicorn's access log lines (they may carry tokens)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_without_query(arg) for arg in record.args)
        return True


def _without_query(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("/") and "?" in value:
        return value.partition("?")[0] + "?[redacted]"
    return value


def keep_query_strings_out_of_the_access_log() -> None:
    """Install the filter on uvicorn's access logger (after uvicorn has configured its logging)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(existing, _NoQueryStrings) for existing in access.filters):
        access.addFilter(_NoQueryStrings())
