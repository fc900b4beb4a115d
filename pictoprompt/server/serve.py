"""Running the server: stdio by default, streamable HTTP with a bearer token when asked."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket

from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings

from pictoprompt.errors import InvalidInputError
from pictoprompt.server.app import create_server
from pictoprompt.settings import Settings

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


def serve(settings: Settings, http: bool = False, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    if not http:
        create_server(settings, transport="stdio").run("stdio")
        return
    options = http_auth_options(settings, host, port)
    server = create_server(settings, transport="http", **options)
    logger.info("serving streamable HTTP on http://%s:%d/mcp", host, port)
    server.run("streamable-http", host=host, port=port)
