"""Several requests in flight on one stdio session, with cancels among them: each answered once, to its own id, in
whatever order the work finishes (a quick call overtakes a slow one sent before it)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest


class RawSession:
    """A stdio server spoken to by hand, so that requests overlap and cancels name the ids."""

    def __init__(self, environment: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pictoprompt.cli", "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=environment,
        )
        self.answers: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            message = json.loads(line)
            if "id" in message:
                self.answers.put(message)

    def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps({"jsonrpc": "2.0", **message}) + "\n").encode())
        self.process.stdin.flush()

    def call(self, request_id: int, tool: str, arguments: dict[str, Any]) -> None:
        self.send({"id": request_id, "method": "tools/call", "params": {"name": tool, "arguments": arguments}})

    def cancel(self, request_id: int) -> None:
        self.send({"method": "notifications/cancelled", "params": {"requestId": request_id, "reason": "test"}})

    def collect(self, wanted: set[int], seconds: float = 240) -> list[dict[str, Any]]:
        """Answers, in arrival order, until every id in `wanted` has one."""
        received: list[dict[str, Any]] = []
        deadline = time.monotonic() + seconds
        while not wanted <= {answer["id"] for answer in received}:
            received.append(self.answers.get(timeout=max(0.1, deadline - time.monotonic())))
        return received

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture
def session(tmp_path: Path, server_environment) -> Any:
    raw = RawSession(server_environment(tmp_path))
    info = {"name": "in-flight", "version": "0"}
    raw.send(
        {
            "id": 1,
            "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": info},
        }
    )
    raw.collect({1})
    raw.send({"method": "notifications/initialized"})
    yield raw
    raw.close()


def _generate(seed: int, steps: int) -> dict[str, Any]:
    return {"prompt": f"picture {seed}", "steps": steps, "seed": seed, "inline": "none", "wait_seconds": 120}


@pytest.mark.slow
def test_overlapping_calls_are_each_answered_to_their_own_id(session: RawSession):
    session.call(10, "generate_image", _generate(100, 12))  # slow, and first in the job queue
    session.call(11, "generate_image", _generate(200, 150))  # cancelled below while it waits or runs
    session.call(12, "generate_image", _generate(300, 2))
    session.call(13, "server_status", {})  # no job: answered while the jobs run
    session.call(14, "get_job", {"job_id": "0123456789abcdef"})  # a refusal, answered at once
    session.call(15, "generate_image", {"prompt": "", "steps": 2})  # refused before it queues
    session.call(16, "generate_image", _generate(400, 150))  # cancelled below, after the others are sent
    session.cancel(11)
    session.call(17, "list_concepts", {})
    time.sleep(1.0)
    session.cancel(16)
    answers = session.collect({10, 12, 13, 14, 15, 17})
    # The queue drains: a cancelled request's job stops, whichever of its two states it was in.
    session.call(18, "server_status", {})
    deadline = time.monotonic() + 120
    while True:
        answers += session.collect({18})
        status = next(a for a in answers if a["id"] == 18)["result"]["structuredContent"]["queue"]
        if (not status["running"] and not status["queued"]) or time.monotonic() > deadline:
            break
        answers = [a for a in answers if a["id"] != 18]
        time.sleep(0.5)
        session.call(18, "server_status", {})
    assert not status["running"] and status["queued"] == 0, status

    by_id: dict[int, list[dict[str, Any]]] = {}
    for answer in answers:
        by_id.setdefault(answer["id"], []).append(answer)
    assert all(len(replies) == 1 for key, replies in by_id.items() if key != 18), "one answer per request"
    for key, seed in ((10, 100), (12, 300)):
        images = by_id[key][0]["result"]["structuredContent"]["result"]["images"]
        assert [image["seed"] for image in images] == [seed], f"request {key} got another call's images"
    assert by_id[13][0]["result"]["structuredContent"]["profile"] == "tiny"
    assert by_id[14][0]["result"]["isError"] and "no job" in by_id[14][0]["result"]["content"][0]["text"]
    assert by_id[15][0]["result"]["isError"] and "prompt" in by_id[15][0]["result"]["content"][0]["text"]
    assert by_id[17][0]["result"]["structuredContent"] == {"concepts": []}
    for cancelled in (11, 16):  # no answer, or one that is not a success
        for reply in by_id.get(cancelled, []):
            assert "error" in reply or reply["result"].get("isError"), reply
    order = [answer["id"] for answer in answers]
    assert order.index(13) < order.index(10) and order.index(17) < order.index(12), "quick calls overtook slow ones"
