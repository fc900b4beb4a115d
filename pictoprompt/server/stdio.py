"""A clean protocol channel for stdio: the JSON-RPC stream has fd 1's original pipe to itself.

Every byte on stdout is read as JSON-RPC, so the stream goes out on a private duplicate of fd 1, and fd 1 points
at stderr for the rest of the process: a native library's printf, a crash handler's gdb, a child process or
`print` land in the log. fd 1 is never handed back, since native threads may outlive the session.
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
    """Serve the protocol on a private duplicate of fd 1 (the MCP transport writes to `sys.stdout.buffer` as it
    finds it) and point fd 1 at stderr, for good."""
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
