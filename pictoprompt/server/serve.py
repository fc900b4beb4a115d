"""Running the server: stdio by default, streamable HTTP with a bearer token when asked."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
from typing import TYPE_CHECKING, Any

from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from starlette.types import ASGIApp

from pictoprompt.errors import InvalidInputError
from pictoprompt.server.app import check_ray_installed, create_server
from pictoprompt.server.http_transport import (
    HttpGuard,
    http_transport_security,
    keep_query_strings_out_of_the_access_log,
    max_images_per_call,
    request_body_limit,
)
from pictoprompt.server.images import ImagePolicy
from pictoprompt.server.stdio import protocol_on_private_stdout
from pictoprompt.settings import Settings
from pictoprompt.tools import TOOLS

if TYPE_CHECKING:
    import uvicorn

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


class StaticTokenVerifier:
    """Accepts exactly one bearer token (PICTOPROMPT_TOKEN), compared in constant time."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def verify_token(self, token: str) -> AccessToken | None:
        if hmac.compare_digest(token.encode(), self._token.encode()):
            return AccessToken(token=token, client_id="pictoprompt-client", scopes=[])
        return None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


def http_auth_options(settings: Settings, host: str, port: int) -> dict:
    """MCPServer options for HTTP: a token verifier when a token is set; none allowed off loopback."""
    if not settings.token:
        if not is_loopback(host):
            raise InvalidInputError(
                f"Refusing to serve on {host}, which is reachable from other machines, without a bearer token: "
                "set PICTOPROMPT_TOKEN to a long random secret (e.g. `openssl rand -hex 32`), or bind 127.0.0.1."
            )
        return {}
    url = f"http://{host}:{port}"
    return {
        "token_verifier": StaticTokenVerifier(settings.token),
        "auth": AuthSettings(issuer_url=url, resource_server_url=f"{url}/mcp", validate_token_resource=False),
    }


def http_app(settings: Settings, host: str, port: int) -> ASGIApp:
    """The streamable-HTTP app `serve --http` runs: auth, Host/Origin checks and the body limit set up."""
    server = create_server(settings, transport="http", **http_auth_options(settings, host, port))
    images, image_bytes = max_images_per_call(TOOLS), ImagePolicy.max_bytes
    limit = request_body_limit(images, image_bytes)
    app = server.streamable_http_app(
        host=host,
        max_request_body_size=limit,
        transport_security=http_transport_security(settings, host),
    )
    return HttpGuard(app, limit, images, image_bytes)


def uvicorn_config(app: ASGIApp, host: str, port: int, **options: Any) -> uvicorn.Config:
    """uvicorn's settings for `app`, its access log kept free of query strings (which may carry tokens)."""
    import uvicorn

    options.setdefault("log_level", "info")
    config = uvicorn.Config(app, host=host, port=port, **options)
    keep_query_strings_out_of_the_access_log()  # after Config, which (re)configures uvicorn's loggers
    return config


def serve(settings: Settings, http: bool = False, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    if settings.ray:
        check_ray_installed()
    if not http:
        with protocol_on_private_stdout():
            create_server(settings, transport="stdio").run("stdio")
        return
    import uvicorn

    app = http_app(settings, host, port)
    logger.info("serving streamable HTTP on http://%s:%d/mcp", host, port)
    uvicorn.Server(uvicorn_config(app, host, port)).run()
