"""`logging/setLevel` (up to 2025-11-25): the `pictoprompt` loggers' records at the level a client set, sent to it
as `notifications/message`. Nothing goes to a client that never asked: a client pays for the context it wants.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from typing import Any

from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp_types import EmptyResult, LoggingLevel, SetLevelRequestParams

from pictoprompt.server.wire import PictopromptServer

# RFC 5424's eight levels on Python's scale; notice, alert and emergency sit between Python's own.
PYTHON_LEVELS: dict[LoggingLevel, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "notice": logging.INFO + 5,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "alert": logging.CRITICAL + 5,
    "emergency": logging.CRITICAL + 10,
}


def mcp_level(levelno: int) -> LoggingLevel:
    """The highest MCP level at or below a Python record's level."""
    return max(
        (level for level, number in PYTHON_LEVELS.items() if number <= levelno),
        key=PYTHON_LEVELS.__getitem__,
        default="debug",
    )


class ClientLogs(logging.Handler):
    """A handler on the `pictoprompt` logger that hands each record, from any thread, to the loop of each connection
    whose level it meets; a connection that ends is forgotten with it (weak keys)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._levels: weakref.WeakKeyDictionary[Connection, tuple[int, asyncio.AbstractEventLoop]] = (
            weakref.WeakKeyDictionary()
        )
        self._guard = threading.Lock()
        self._sending: set[asyncio.Task[None]] = set()

    def set_level(self, connection: Connection, level: LoggingLevel) -> None:
        with self._guard:
            self._levels[connection] = (PYTHON_LEVELS[level], asyncio.get_running_loop())

    def emit(self, record: logging.LogRecord) -> None:
        with self._guard:
            wanted = [(c, loop) for c, (least, loop) in self._levels.items() if record.levelno >= least]
        if not wanted:
            return
        params: dict[str, Any] = {
            "level": mcp_level(record.levelno),
            "logger": record.name,
            "data": self.format(record),
        }
        for connection, loop in wanted:
            try:
                loop.call_soon_threadsafe(self._send, connection, params)
            except RuntimeError:  # that connection's loop has closed
                continue

    def _send(self, connection: Connection, params: dict[str, Any]) -> None:
        # Connection.notify never raises: a closed stream drops the record, as a log must never break a call.
        task = asyncio.ensure_future(connection.notify("notifications/message", params))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)


def add_set_level(server: PictopromptServer, logs: ClientLogs) -> None:
    """Serve `logging/setLevel` (which also advertises the `logging` capability before 2026-07-28)."""

    async def set_level(ctx: ServerRequestContext[Any, Any], params: SetLevelRequestParams) -> EmptyResult:
        # The session object is per request; the connection it wraps is what lives as long as the client.
        connection: Connection = ctx.session._connection  # the SDK has no public accessor
        logs.set_level(connection, params.level)
        return EmptyResult()

    server.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)
