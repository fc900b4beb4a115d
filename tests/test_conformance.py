"""The official MCP conformance suite (`@modelcontextprotocol/conformance`, npm) against `serve --http --profile tiny`.

`make conformance` installs the suite and the Node 22 it needs (the npm package `node@22`) into `.conformance/`,
then runs this test. The suite itself compares the outcome with `tests/conformance/expected-failures.yml`: it fails
on any unexpected failure, and on a listed scenario that passes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / ".conformance" / "node_modules" / ".bin"
EXPECTED_FAILURES = Path(__file__).parent / "conformance" / "expected-failures.yml"

pytestmark = pytest.mark.conformance


def listed_failures() -> set[str]:
    lines = EXPECTED_FAILURES.read_text().splitlines()
    return {line.split("#")[0].strip().removeprefix("- ").strip() for line in lines if line.lstrip().startswith("- ")}


def serve_on_a_free_port(folder: Path, environment: dict[str, str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "pictoprompt.cli", "serve", "--http", "--profile", "tiny", "--port", str(port)]
    process = subprocess.Popen(command, env=environment, stderr=open(folder / "server.log", "wb"))  # noqa: SIM115
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited: {(folder / 'server.log').read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process, f"http://127.0.0.1:{port}/mcp"
        except OSError:
            time.sleep(0.3)
    process.terminate()
    pytest.fail("the server did not open its port within 300 s")


def test_every_scenario_that_needs_no_fixture_passes(tmp_path, server_environment):
    if not (SUITE / "conformance").exists():
        pytest.skip("the suite is not installed: `make conformance` installs it (Node 22 and the npm package)")
    server, url = serve_on_a_free_port(tmp_path, server_environment(tmp_path))
    try:
        command = ["conformance", "server", "--url", url, "--expected-failures", str(EXPECTED_FAILURES)]
        run = subprocess.run(
            [*command, "-o", str(tmp_path / "results")],
            env={**os.environ, "PATH": f"{SUITE}{os.pathsep}{os.environ['PATH']}"},
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    failed = set()
    ran = set()
    for checks in (tmp_path / "results").glob("server-*/checks.json"):
        scenario = checks.parent.name.removeprefix("server-").rsplit("-", 6)[0]  # drops the timestamp
        ran.add(scenario)
        if any(check["status"] == "FAILURE" for check in json.loads(checks.read_text())):
            failed.add(scenario)
    assert failed == listed_failures(), f"unexpected: {failed ^ listed_failures()}"
    assert {"completion-complete", "logging-set-level", "server-initialize", "tools-list"} <= ran - failed
    print(f"conformance: {len(ran - failed)} of {len(ran)} scenarios pass; {len(failed)} need the suite's fixtures")
