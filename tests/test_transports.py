"""Real transports: a stdio subprocess session and a streamable-HTTP session with its bearer token."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from pictoprompt.errors import InvalidInputError
from pictoprompt.server.serve import http_auth_options
from pictoprompt.settings import Settings

TOKEN = "test-token-0123456789abcdef"


def test_stdio_subprocess_session(shared_stdio_server):
    # The session's `pictoprompt serve` over stdio (conftest), which the fuzz run's stdio half shares.
    folder = shared_stdio_server.folder

    async def session(client: Client) -> None:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert "generate_image" in names
        workflows = {prompt.name for prompt in (await client.list_prompts()).prompts}
        assert {"recreate_prompt", "remove_or_replace"} <= workflows
        rendered = await client.get_prompt("recreate_prompt", {"image": "cat.png"})
        assert "`invert_image`" in rendered.messages[0].content.text
        result = await client.call_tool("generate_image", {"prompt": "a red circle", "steps": 2, "seed": 3})
        assert not result.is_error
        image = result.structured_content["result"]["images"][0]
        assert image["seed"] == 3 and Path(image["path"]).is_file()
        assert Path(image["path"]).is_relative_to(folder / "assets")

    shared_stdio_server.portal.call(session, shared_stdio_server.client)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def http_server(tmp_path, server_environment) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pictoprompt.cli", "serve", "--http", "--port", str(port)],
        env=server_environment(tmp_path, PICTOPROMPT_TOKEN=TOKEN),
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/mcp"
    deadline = time.monotonic() + 600  # a server's start on a loaded machine (two test workers and more)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.3)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.anyio
async def test_http_session_requires_the_token(http_server):
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    headers = {"Accept": "application/json, text/event-stream"}
    async with httpx.AsyncClient() as raw:
        missing = await raw.post(http_server, json=initialize, headers=headers)
        wrong = await raw.post(http_server, json=initialize, headers={**headers, "Authorization": "Bearer nope"})
    assert missing.status_code == 401 and wrong.status_code == 401

    http_client = create_mcp_http_client(headers={"Authorization": f"Bearer {TOKEN}"})
    async with http_client, Client(streamable_http_client(http_server, http_client=http_client)) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert "server_status" in names
        result = await client.call_tool("generate_image", {"prompt": "a blue square", "steps": 2, "seed": 9})
        assert not result.is_error and result.structured_content["result"]["images"][0]["seed"] == 9


def test_non_loopback_bind_without_token_is_refused():
    with pytest.raises(InvalidInputError, match="PICTOPROMPT_TOKEN"):
        http_auth_options(Settings(token=None), "0.0.0.0", 8765)
    assert http_auth_options(Settings(token=None), "127.0.0.1", 8765) == {}
    assert "token_verifier" in http_auth_options(Settings(token="s3cret-token"), "0.0.0.0", 8765)


def test_cli_refuses_public_bind_without_token(tmp_path, server_environment, monkeypatch, capsys):
    # `pictoprompt serve` in this process (a subprocess would spend seconds importing the models' libraries first);
    # a server that started anyway fails the test instead of serving.
    import uvicorn

    from pictoprompt.cli import main

    for name, value in server_environment(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("PICTOPROMPT_TOKEN", raising=False)
    monkeypatch.setattr(uvicorn.Server, "run", lambda *_: pytest.fail("served on 0.0.0.0 without a token"))
    assert main(["serve", "--http", "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    assert "PICTOPROMPT_TOKEN" in capsys.readouterr().err
