"""The small schema-fuzzing run of `make test`: every tool, called with arguments generated from the inputSchema the
server publishes (valid, at full range and broken), over stdio and over HTTP on the tiny profile.

`python -m lab.reliability.fuzz` is the long run (5,000 calls per transport, each on a fresh server); this one is
its first calls, on the session's shared servers (conftest: test_transports and test_hardening talk to them after),
so a regression in what the server refuses, answers or stores shows here within seconds.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from lab.reliability.fuzz import Tally

# lab.reliability.fuzz (hypothesis) is imported in the tests: a worker that runs none of them skips its import.
SMALL_RUN = int(os.environ.get("PICTOPROMPT_FUZZ_CALLS", "100"))
"""Calls per transport in `make test`."""


@contextmanager
def connected(transport: str, request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any, Path]]:
    """(portal, client, the server's folder) of the session's server on `transport` (conftest)."""
    if transport == "stdio":
        server = request.getfixturevalue("shared_stdio_server")
        yield server.portal, server.client, server.folder
        return
    from anyio.from_thread import start_blocking_portal

    from lab.reliability.servers import http_client

    server = request.getfixturevalue("shared_http_server")
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(http_client(server)) as client:
        yield portal, client, server.folder
    assert server.process.poll() is None, f"the HTTP server exited with {server.process.returncode}"


def fuzz_shared_server(transport: str, request: pytest.FixtureRequest) -> Tally:
    from lab.reliability.fuzz import Plan, fuzz

    with connected(transport, request) as (portal, client, folder):
        return fuzz(portal, client, folder, transport, Plan(SMALL_RUN, heavy_valid=0.05))


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_generated_calls_never_crash_the_server_nor_break_its_promises(request, transport):
    from lab.reliability.fuzz import Tally

    tally = fuzz_shared_server(transport, request)
    summary = tally.summary()
    problems = {name: summary[name] for name in Tally.PROBLEMS}
    assert problems == dict.fromkeys(Tally.PROBLEMS, 0), summary["problems"]
    assert tally.calls == SMALL_RUN
    # Both sides were exercised: calls that ran to their end (their results checked against outputSchema) and
    # refusals (each checked for the field it names and for an unchanged store).
    assert summary["succeeded"] >= 5 and summary["refused"] >= SMALL_RUN // 4, summary


def test_a_broken_call_names_the_field_it_broke():
    from hypothesis import given, settings

    from lab.reliability.fuzz import Case, Pools, broken_arguments, cheap_schema

    schema = {
        "type": "object",
        "properties": {
            "steps": {"type": "integer", "minimum": 1, "maximum": 150, "description": "d"},
            "prompt": {"type": "string", "minLength": 1, "maxLength": 10, "description": "d"},
        },
        "required": ["prompt"],
        "additionalProperties": False,
    }
    seen: set[str] = set()

    @settings(max_examples=100, deadline=None, database=None, derandomize=True)
    @given(case=broken_arguments("generate_image", schema, Pools(images=["x.png"])))
    def check(case: Case) -> None:
        seen.add(case.kind)
        if case.kind == "out_of_range":
            assert case.field == "steps" and not 1 <= case.arguments["steps"] <= 150
        if case.kind == "missing_required":
            assert "prompt" not in case.arguments and case.field == "prompt"
        if case.kind == "unknown_field":
            assert case.field in case.arguments and case.field not in schema["properties"]

    check()
    assert len(seen) >= 5, seen  # hypothesis leans to its first choices; every kind is checked above when drawn
    assert cheap_schema(schema)["properties"]["steps"]["maximum"] == 2
