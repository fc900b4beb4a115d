"""Tasks: a model-heavy call answered at once with a task the client polls, on both wires clients speak.

- 2025-11-25: the client puts `task` in a `tools/call`'s params and gets a `CreateTaskResult`; the server serves
  `tasks/get`, `tasks/result`, `tasks/list` and `tasks/cancel`, and sends `notifications/tasks/status` at the end.
- 2026-07-28 (the `io.modelcontextprotocol/tasks` extension): every model-heavy call from a client that declares
  the extension becomes a task (`resultType: "task"`), polled with `tasks/get`, which carries the result.

One job is one task (same id), run through the same `JobService`, so a task is created only after its images are
resolved and its queue place taken. Tasks live in the process: any connection reaches one by its id for its TTL;
only `tasks/list` is scoped to the connection that made them, so that no client learns another's task ids.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from mcp import MCPError
from mcp.server.connection import Connection
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    CallToolResult,
    CancelTaskRequestParams,
    GetTaskPayloadRequestParams,
    GetTaskRequestParams,
    PaginatedRequestParams,
    RequestParams,
    TextContent,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import Field

from pictoprompt.errors import NotFoundError, PictopromptError
from pictoprompt.server.assets import AssetStore
from pictoprompt.server.jobs import ENDED, JobService, JobView
from pictoprompt.server.results import InlineMode, job_result

logger = logging.getLogger(__name__)

TASKS_EXTENSION = "io.modelcontextprotocol/tasks"
RELATED_TASK = "io.modelcontextprotocol/related-task"
IMMEDIATE_RESPONSE = "io.modelcontextprotocol/model-immediate-response"
TASK_MARK = "pictoprompt/task"
"""The `_meta` key by which a job tool's result tells the middleware "this call became task X" (the SDK checks a
`tools/call` result against `CallToolResult` before any middleware sees it)."""
MAX_TTL_MS = 3_600_000
"""A finished job is kept an hour (`JobRunner`), so no task can promise more."""
POLL_INTERVAL_MS = 1000
WATCH_SECONDS = 60.0

TaskStatus = Literal["working", "input_required", "completed", "failed", "cancelled"]


@dataclass(frozen=True)
class TaskAsk:
    """A client's request for a task, as the middleware found it; the job tool reads it from `ASKED`."""

    modern: bool
    ttl_ms: int | None
    progress_token: str | int | None
    connection: Connection | None


ASKED: ContextVar[TaskAsk | None] = ContextVar("pictoprompt_task_ask", default=None)
"""The task this `tools/call` is to become, or None for a call that waits as usual."""


@dataclass
class TaskRecord:
    task_id: str
    tool: str
    inline: InlineMode
    ttl_ms: int
    owner: weakref.ref[Connection] | None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    cancelled: bool = False
    """Sticky: a task cancelled by request stays cancelled even if its job ends otherwise (2025-11-25)."""
    seen: tuple[str, str | None] | None = None

    def expired(self) -> bool:
        return time.time() > self.created + self.ttl_ms / 1000


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def status_of(job: JobView, modern: bool) -> tuple[TaskStatus, str | None]:
    """A job's state as a task's status and status message (the job's progress while it runs)."""
    if job.state == "queued":
        return "working", "queued: waiting for the model"
    if job.state == "running":
        percent = f" ({job.fraction:.0%})" if job.fraction is not None else ""
        return "working", f"{job.message or 'running'}{percent}"
    if job.state == "succeeded":
        return "completed", "done"
    if job.state == "cancelled":
        return "cancelled", job.error
    # A tool's failure is an `isError` result: 2026 calls that a completed task, 2025 a failed one.
    return ("completed" if modern else "failed"), job.error


class TaskStore:
    """Every task of this process, by id."""

    def __init__(self, jobs: JobService, assets: AssetStore) -> None:
        self.jobs, self.assets = jobs, assets
        self._tasks: dict[str, TaskRecord] = {}
        self._watchers: set[asyncio.Task[None]] = set()

    def start(self, ask: TaskAsk, job_id: str, tool: str, inline: InlineMode) -> CallToolResult:
        """Make the task of a job just queued; the result marks the call for the middleware to reshape."""
        self._forget_expired()
        ttl = MAX_TTL_MS if ask.ttl_ms is None else max(1, min(ask.ttl_ms, MAX_TTL_MS))
        owner = weakref.ref(ask.connection) if ask.connection is not None else None
        record = TaskRecord(job_id, tool, inline, ttl, owner)
        self._tasks[job_id] = record
        logger.info("%s runs as task %s (%s wire)", tool, job_id, "2026-07-28" if ask.modern else "2025-11-25")
        if not ask.modern and ask.connection is not None:
            watcher = asyncio.create_task(self._watch(record, ask.connection, ask.progress_token))
            self._watchers.add(watcher)
            watcher.add_done_callback(self._watchers.discard)
        return CallToolResult(content=[], _meta={TASK_MARK: job_id})

    async def get(self, task_id: str) -> TaskRecord:
        """The task `task_id`; a job this process did not start as a task (another front's, or one started with
        `wait_seconds`) is found through the job service and answered as one."""
        record = self._tasks.get(task_id)
        if record is not None and record.expired():
            del self._tasks[task_id]
            raise MCPError(code=INVALID_PARAMS, message="Failed to retrieve task: Task has expired")
        if record is not None:
            return record
        try:
            job = await self.jobs.wait(task_id, 0)
        except NotFoundError:
            raise MCPError(code=INVALID_PARAMS, message="Failed to retrieve task: Task not found") from None
        record = TaskRecord(task_id, job.tool, "thumbnail", MAX_TTL_MS, owner=None)
        record.created = record.updated = time.time() - job.elapsed
        self._tasks[task_id] = record
        return record

    def record(self, task_id: str) -> TaskRecord:
        """A task this process just made."""
        return self._tasks[task_id]

    async def view(
        self, record: TaskRecord, modern: bool, wait_seconds: float = 0
    ) -> tuple[TaskStatus, str | None, JobView]:
        """The task's status and message after waiting up to `wait_seconds` for its end."""
        try:
            job = await self.jobs.wait(record.task_id, wait_seconds)
        except NotFoundError as error:
            raise MCPError(code=INVALID_PARAMS, message=f"Failed to retrieve task: {error}") from error
        status, message = status_of(job, modern)
        if record.cancelled:
            status, message = "cancelled", "cancelled by request"
        if record.seen != (status, message):
            record.seen, record.updated = (status, message), time.time()
        return status, message, job

    def fields(self, record: TaskRecord, status: TaskStatus, message: str | None, modern: bool) -> dict[str, Any]:
        """The task as the wire names it: `ttl`/`pollInterval` (2025-11-25), `ttlMs`/`pollIntervalMs` (2026)."""
        task: dict[str, Any] = {
            "taskId": record.task_id,
            "status": status,
            "createdAt": iso(record.created),
            "lastUpdatedAt": iso(record.updated),
            "ttlMs" if modern else "ttl": record.ttl_ms,
        }
        if message:
            task["statusMessage"] = message
        if status not in {"completed", "failed", "cancelled"}:
            task["pollIntervalMs" if modern else "pollInterval"] = POLL_INTERVAL_MS
        return task

    def tool_result(self, record: TaskRecord, job: JobView) -> dict[str, Any]:
        """What the `tools/call` would have returned: the tool's result, or its error as an `isError` result."""
        if record.cancelled:
            result = _error_result(record.tool, "the task was cancelled by request")
        else:
            try:
                result = job_result(job, self.assets, record.inline)
            except (ToolError, PictopromptError) as error:  # a failed or cancelled job; an expired asset
                result = _error_result(record.tool, str(error))
        return result.model_dump(by_alias=True, mode="json", exclude_none=True)

    async def cancel(self, record: TaskRecord) -> None:
        try:
            await self.jobs.cancel(record.task_id)
        except NotFoundError as error:
            raise MCPError(code=INVALID_PARAMS, message=f"Failed to cancel task: {error}") from error

    def owned_by(self, connection: Connection) -> list[TaskRecord]:
        self._forget_expired()
        return [r for r in self._tasks.values() if r.owner is not None and r.owner() is connection]

    async def shutdown(self) -> None:
        for watcher in list(self._watchers):
            watcher.cancel()

    async def _watch(self, record: TaskRecord, connection: Connection, progress_token: str | int | None) -> None:
        """2025-11-25: forward the job's progress to the call's token, and say when the task ended."""
        pending: set[asyncio.Task[None]] = set()

        def forward(done: float, total: float | None, message: str | None) -> None:
            params: dict[str, Any] = {"progressToken": progress_token, "progress": done, "total": total}
            params = {key: value for key, value in params.items() if value is not None}
            if message:
                params["message"] = message
            params["_meta"] = {RELATED_TASK: {"taskId": record.task_id}}
            sending = asyncio.ensure_future(connection.notify("notifications/progress", params))
            pending.add(sending)
            sending.add_done_callback(pending.discard)

        listener = forward if progress_token is not None else None
        try:
            # The task may be expired before its job ends (a short TTL); then nobody can ask for it any more.
            while (await self.jobs.wait(record.task_id, WATCH_SECONDS, listener)).state not in ENDED:
                if record.expired():
                    return
            status, message, _ = await self.view(record, modern=False)
        except (NotFoundError, MCPError):  # the job or the task was forgotten meanwhile
            return
        await connection.notify("notifications/tasks/status", self.fields(record, status, message, modern=False))

    def _forget_expired(self) -> None:
        for task_id in [task_id for task_id, record in self._tasks.items() if record.expired()]:
            del self._tasks[task_id]


def _error_result(tool: str, error: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(text=f"Error executing tool {tool}: {error}")], is_error=True)


# ---------------------------------------------------------------------------------------------- the tools/call side


def _client_declares_tasks(params: Mapping[str, Any]) -> bool:
    meta = params.get("_meta") or {}
    capabilities = meta.get(CLIENT_CAPABILITIES_META_KEY) if isinstance(meta, Mapping) else None
    extensions = capabilities.get("extensions") if isinstance(capabilities, Mapping) else None
    return isinstance(extensions, Mapping) and TASKS_EXTENSION in extensions


def task_ask(ctx: ServerRequestContext[Any, Any], connection: Connection | None) -> TaskAsk | None:
    """The task a `tools/call` asks for, on either wire; None for an ordinary call."""
    params = ctx.params or {}
    meta = params.get("_meta") or {}
    token = meta.get("progressToken") if isinstance(meta, Mapping) else None
    if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        return TaskAsk(True, None, None, connection) if _client_declares_tasks(params) else None
    task = params.get("task")
    if not isinstance(task, Mapping):
        return None
    ttl = task.get("ttl")
    return TaskAsk(False, ttl if isinstance(ttl, int) else None, token, connection)


def connection_of(ctx: ServerRequestContext[Any, Any]) -> Connection | None:
    # The session object is per request; the connection it wraps lives as long as the client. The SDK has no
    # public accessor for it.
    return getattr(ctx.session, "_connection", None)


class TaskMiddleware:
    """Marks a `tools/call` that asks for a task, and reshapes its marked result into a `CreateTaskResult`."""

    def __init__(self, store_of: Any, task_tools: frozenset[str]) -> None:
        self._store_of, self._task_tools = store_of, task_tools

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method != "tools/call":
            return await call_next(ctx)
        ask = task_ask(ctx, connection_of(ctx))
        name = (ctx.params or {}).get("name")
        if ask is None or not isinstance(name, str):  # a malformed call is the SDK's to refuse
            return await call_next(ctx)
        if name not in self._task_tools:
            if ask.modern:  # the server decides; a light tool just answers
                return await call_next(ctx)
            raise MCPError(code=METHOD_NOT_FOUND, message="This tool does not run as a task; call it without `task`.")
        token = ASKED.set(ask)
        try:
            result = await call_next(ctx)
        finally:
            ASKED.reset(token)
        return self._reshape(result, ask)

    def _reshape(self, result: HandlerResult, ask: TaskAsk) -> HandlerResult:
        meta = result.get("_meta") if isinstance(result, dict) else None
        task_id = meta.get(TASK_MARK) if isinstance(meta, dict) else None
        if task_id is None:  # refused before a task existed (bad arguments, busy): the call's own answer
            return result
        store: TaskStore = self._store_of()
        record = store.record(task_id)
        status: TaskStatus = "working"
        task = store.fields(record, status, "queued: waiting for the model", ask.modern)
        other_meta = {key: value for key, value in meta.items() if key != TASK_MARK}
        if ask.modern:
            return {"resultType": "task", **task, **({"_meta": other_meta} if other_meta else {})}
        immediate = f"Started task {task_id} ({record.tool}); its result comes when it is done."
        return {"task": task, "_meta": {**other_meta, IMMEDIATE_RESPONSE: immediate}}


# ------------------------------------------------------------------------------------------------ the tasks/* side


class UpdateTaskParams(RequestParams):
    task_id: str = Field(alias="taskId")
    input_responses: dict[str, Any] = Field(default_factory=dict, alias="inputResponses")


def _modern(ctx: ServerRequestContext[Any, Any]) -> bool:
    return ctx.protocol_version in MODERN_PROTOCOL_VERSIONS


class TasksExtension(Extension):
    """`tasks/*` for both wires (the SDK keeps these methods out of its spec tables, so they are served here)."""

    identifier = TASKS_EXTENSION

    def __init__(self, store_of: Any) -> None:
        self._store_of = store_of

    def methods(self) -> list[MethodBinding]:
        legacy = frozenset({"2025-11-25"})
        return [
            MethodBinding("tasks/get", GetTaskRequestParams, self.get),
            MethodBinding("tasks/cancel", CancelTaskRequestParams, self.cancel),
            MethodBinding("tasks/result", GetTaskPayloadRequestParams, self.result, protocol_versions=legacy),
            MethodBinding("tasks/list", PaginatedRequestParams, self.list, protocol_versions=legacy),
            MethodBinding(
                "tasks/update", UpdateTaskParams, self.update, protocol_versions=frozenset(MODERN_PROTOCOL_VERSIONS)
            ),
        ]

    @property
    def store(self) -> TaskStore:
        return self._store_of()

    async def get(self, ctx: ServerRequestContext[Any, Any], params: GetTaskRequestParams) -> dict[str, Any]:
        record = await self.store.get(params.task_id)
        status, message, job = await self.store.view(record, _modern(ctx))
        task = self.store.fields(record, status, message, _modern(ctx))
        if _modern(ctx) and status == "completed":
            task["result"] = self.store.tool_result(record, job)
        return task

    async def result(self, ctx: ServerRequestContext[Any, Any], params: GetTaskPayloadRequestParams) -> dict[str, Any]:
        record = await self.store.get(params.task_id)
        while True:  # blocks until the task ends, as the spec asks; a client that gives up cancels this request
            status, _, job = await self.store.view(record, modern=False, wait_seconds=30)
            if status in {"completed", "failed", "cancelled"}:
                break
        result = self.store.tool_result(record, job)
        result["_meta"] = {**result.get("_meta", {}), RELATED_TASK: {"taskId": record.task_id}}
        return result

    async def list(self, ctx: ServerRequestContext[Any, Any], params: PaginatedRequestParams) -> dict[str, Any]:
        if params.cursor is not None:
            raise MCPError(code=INVALID_PARAMS, message="Invalid cursor: this server lists every task in one page.")
        connection = connection_of(ctx)
        tasks = []
        for record in self.store.owned_by(connection) if connection is not None else []:
            try:
                status, message, _ = await self.store.view(record, modern=False)
            except MCPError:  # its job was forgotten meanwhile
                continue
            tasks.append(self.store.fields(record, status, message, modern=False))
        return {"tasks": tasks}

    async def cancel(self, ctx: ServerRequestContext[Any, Any], params: CancelTaskRequestParams) -> dict[str, Any]:
        record = await self.store.get(params.task_id)
        status, _, _ = await self.store.view(record, _modern(ctx))
        if _modern(ctx):
            if status not in {"completed", "failed", "cancelled"}:
                await self.store.cancel(record)
            return {}
        if status in {"completed", "failed", "cancelled"}:
            raise MCPError(code=INVALID_PARAMS, message=f"Cannot cancel task {record.task_id}: it is already {status}.")
        await self.store.cancel(record)
        record.cancelled = True
        status, message, _ = await self.store.view(record, modern=False)
        return self.store.fields(record, status, message, modern=False)

    async def update(self, ctx: ServerRequestContext[Any, Any], params: UpdateTaskParams) -> dict[str, Any]:
        await self.store.get(params.task_id)  # these tasks never ask for input: any response is for no request
        return {}
