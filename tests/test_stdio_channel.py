"""Over stdio the protocol has fd 1's pipe to itself: native writes to fd 1 land in the log, never in JSON-RPC.

The server runs as a subprocess whose model loading, a background thread and an exit handler all write to fd 1
the way a native library does (the write system call, C's printf) and print from Python, before, during and
after the session; the client reads the raw stream and every line of it must be JSON-RPC.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

NOISY_SERVER = """
import atexit, ctypes, os, sys, threading, time
from pictoprompt.models.runtime import Runtime

libc = ctypes.CDLL(None)

def native_noise():
    os.write(1, b"[New LWP 11881]\\n")
    libc.printf(b"%s", b"[native printf]\\n")
    libc.fflush(None)
    print("[python print]", flush=True)

def noisy_thread():
    while True:
        native_noise()
        time.sleep(0.05)

real_preload = Runtime.preload

def preload(self, components):
    native_noise()
    threading.Thread(target=noisy_thread, daemon=True).start()
    real_preload(self, components)

Runtime.preload = preload
atexit.register(native_noise)
from pictoprompt.cli import main
sys.exit(main(["serve"]))
"""


def message(id_: int | None, method: str, params: dict) -> bytes:
    payload = {"jsonrpc": "2.0", "method": method, "params": params}
    if id_ is not None:
        payload["id"] = id_
    return (json.dumps(payload) + "\n").encode()


def test_native_writes_to_fd_1_cannot_corrupt_the_protocol(tmp_path: Path, server_environment):
    environment = server_environment(tmp_path)
    server = subprocess.Popen(
        [sys.executable, "-c", NOISY_SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment,
    )
    assert server.stdin is not None and server.stdout is not None
    client_info = {"name": "raw", "version": "0"}
    server.stdin.write(
        message(1, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": client_info})
    )
    server.stdin.write(message(None, "notifications/initialized", {}))
    server.stdin.write(message(2, "tools/list", {}))
    call = {"name": "generate_image", "arguments": {"prompt": "a red circle", "steps": 1, "inline": "none"}}
    server.stdin.write(message(3, "tools/call", call))
    server.stdin.flush()
    lines = []
    while not any(json.loads(line).get("id") == 3 for line in lines):
        line = server.stdout.readline()
        assert line, "the server closed its stdout before answering"
        lines.append(line)
    server.stdin.close()  # the session ends while the noisy thread still writes
    lines += server.stdout.readlines()
    server.wait(timeout=120)
    stderr = server.stderr.read().decode() if server.stderr else ""
    messages = [json.loads(line) for line in lines]  # raises on any line that is not JSON
    assert all(m.get("jsonrpc") == "2.0" for m in messages)
    answered = {m["id"]: m for m in messages if "id" in m}
    assert set(answered) == {1, 2, 3}
    assert not answered[3]["result"].get("isError"), answered[3]
    assert server.returncode == 0, stderr[-2000:]
    assert stderr.count("[New LWP 11881]") >= 3, "the noise was written, to the log"
    assert "[native printf]" in stderr and "[python print]" in stderr
