"""A clean protocol channel for stdio: the JSON-RPC stream has fd 1's original pipe to itself.

Over stdio every byte on the server's stdout is read as JSON-RPC. So the stream goes out on a private duplicate
of fd 1, and fd 1 itself is pointed at stderr for the rest of the process: whatever else writes to "stdout"
(a native library's printf, ggml's crash handler running gdb, a child process, Python's `print`) lands in the
log instead. Twice an outside client got gdb's "[New LWP ...]" on the JSON-RPC stream at the close of a
session: the MCP SDK hands fd 1 back to the pipe when its transport stops, while native threads may still run.
Here fd 1 is never handed back.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress


class _PythonStdout(io.TextIOWrapper):
    """`sys.stdout` while serving: its binary `buffer` is the protocol's pipe, which the MCP transport writes
    JSON-RPC to; text that Python code prints goes to stderr, and so does anything written to its `fileno()`."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()
        super().flush()

    def fileno(self) -> int:
        return sys.stderr.fileno()


@contextmanager
def protocol_on_private_stdout() -> Iterator[None]:
    """Serve the protocol on a private duplicate of fd 1 and point fd 1 at stderr, for good.

    The MCP transport serves `sys.stdout.buffer` as it finds it when `sys.stdout` is not fd 1, so it writes to
    the private duplicate; fd 1 is not restored on the way out, since native threads can outlive the session.
    """
    sys.stdout.flush()
    pipe = os.dup(1)  # not inheritable: a child process never gets the protocol's pipe
    os.dup2(sys.stderr.fileno(), 1)
    previous = sys.stdout
    sys.stdout = _PythonStdout(os.fdopen(pipe, "wb"), encoding="utf-8", line_buffering=False)
    try:
        yield
    finally:
        # A client that went away took the pipe with it: nothing is left to flush to.
        with suppress(BrokenPipeError):
            sys.stdout.buffer.flush()
        sys.stdout = previous
