"""Jobs: a bounded FIFO queue in front of the GPU lock, one worker thread, progress and cancellation.

A model-heavy tool call becomes a job; the caller waits up to `wait_seconds`, then gets the job's id for
`get_job` / `cancel_job`. The server talks to a `JobService`: `LocalJobs` here on one machine,
`pictoprompt.server.ray_serve.RayJobs` on Ray Serve. A finished job is kept a while with its result only, never
its inputs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from pictoprompt.errors import BusyError, JobCancelledError, NotFoundError, PictopromptError
from pictoprompt.models.concepts import ConceptStore
from pictoprompt.models.runtime import Runtime
from pictoprompt.progress import Progress
from pictoprompt.server.assets import AssetStore, RecordingSink
from pictoprompt.server.images import PreResolvedImages
from pictoprompt.tools.base import SavedImage, ToolContext, ToolRequest, ToolSpec

logger = logging.getLogger(__name__)

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ENDED: frozenset[JobState] = frozenset({"succeeded", "failed", "cancelled"})
ProgressListener = Callable[[float, float | None, str | None], None]
ImagesResolver = Callable[[], Awaitable[PreResolvedImages]]


@dataclass(frozen=True)
class JobView:
    """A job as a caller sees it at one moment, whichever service runs it."""

    id: str
    tool: str
    state: JobState
    fraction: float | None
    message: str | None
    elapsed: float
    error: str | None = None
    result: dict[str, Any] | None = None
    """The tool's result as JSON, once the job succeeded."""
    saved: list[SavedImage] = field(default_factory=list)
    replica: str | None = None
    """The Ray Serve replica that ran it; None on one machine."""


class ModelsStatus(BaseModel):
    """The models one runtime holds, as `server_status` reports them."""

    profile: str
    device: str
    dtype: str
    loaded_models: list[str]
    model_ids: dict[str, str]
    memory: dict[str, float]


class WorkerStatus(ModelsStatus):
    """What one holder of the models (this process, or a Ray Serve replica) reports about itself."""

    name: str


def worker_status(name: str, runtime: Runtime) -> WorkerStatus:
    return WorkerStatus(
        name=name,
        profile=runtime.profile.name,
        device=str(runtime.device),
        dtype=str(runtime.dtype).removeprefix("torch."),
        loaded_models=runtime.loaded_components(),
        model_ids=runtime.model_ids(),
        memory=runtime.memory(),
    )


class JobService(Protocol):
    """Who runs the model-heavy calls, as the server's tools need it."""

    async def submit(self, spec: ToolSpec, request: ToolRequest, resolve_images: ImagesResolver) -> str:
        """Queue `spec.run(request)` and return the job's id; `BusyError` when the queue is full."""
        ...

    async def wait(self, job_id: str, seconds: float, listener: ProgressListener | None = None) -> JobView:
        """The job after waiting up to `seconds` for it to end, its progress sent to `listener` meanwhile."""
        ...

    def request_cancel(self, job_id: str) -> None:
        """Ask the job to stop without waiting for an answer."""
        ...

    async def cancel(self, job_id: str) -> tuple[JobView, bool]:
        """Cancel the job; True if it will stop (or had not started), False if it had already ended."""
        ...

    async def views(self) -> list[JobView]: ...

    async def workers(self) -> list[WorkerStatus]: ...

    async def shutdown(self) -> None: ...


def forget_ended(
    jobs: dict[str, Any], ended: dict[str, float], now: float, keep_seconds: float, keep_count: int
) -> None:
    """Drop from `jobs` the ended ones (`ended`: id -> when it ended) older than `keep_seconds`, and the oldest
    beyond the newest `keep_count`."""
    surplus = len(ended) - keep_count
    for job_id, finished in sorted(ended.items(), key=lambda item: item[1]):
        if surplus > 0 or now - finished > keep_seconds:
            del jobs[job_id]
            surplus -= 1


def run_job(
    job_id: str, tool: str, lock: threading.Lock, progress: Progress, work: Callable[[], Any], where: str = ""
) -> tuple[JobState, Any, str | None]:
    """Run `work` under `lock` unless the job is cancelled: how the job ended, its result and its error."""
    try:
        with lock:
            progress.check()
            return "succeeded", work(), None
    except JobCancelledError as error:
        return "cancelled", None, str(error)
    except PictopromptError as error:
        return "failed", None, str(error)
    except Exception as error:
        logger.exception("job %s (%s) crashed%s", job_id, tool, where)
        return "failed", None, f"Internal error in {tool}: {type(error).__name__}: {error}"


@dataclass
class Job:
    id: str
    tool: str
    work: Callable[[Progress], Any] | None
    """The work to run; dropped once the job ends, since it holds the inputs (decoded images, request data)."""
    progress: Progress
    future: Future = field(default_factory=Future)
    state: JobState = "queued"
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    done: float = 0.0
    total: float | None = None
    message: str | None = None
    error: str | None = None
    keep: RecordingSink | None = None
    """What the job saved, for get_job to list; kept besides the result when the work is dropped."""
    listeners: list[tuple[asyncio.AbstractEventLoop, ProgressListener]] = field(default_factory=list)

    @property
    def fraction(self) -> float | None:
        return min(1.0, self.done / self.total) if self.total else None

    def elapsed(self) -> float:
        start = self.started or self.created
        return (self.finished or time.monotonic()) - start


class Slot:
    """A place in the queue taken before a call prepares its job; `release` gives it back if no job follows."""

    def __init__(self, runner: JobRunner) -> None:
        self._runner: JobRunner | None = runner

    def release(self) -> None:
        """Give the place back (idempotent; a slot turned into a job by `submit` has nothing left to give)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner._release(self)

    def _take(self) -> None:
        if self._runner is None:
            raise RuntimeError("this queue slot was already used or released")
        self._runner = None


class JobRunner:
    """Runs jobs one at a time under `gpu_lock`, first come first served, at most `depth` waiting."""

    def __init__(
        self,
        gpu_lock: threading.Lock,
        depth: int = 8,
        keep_finished_seconds: float = 3600,
        keep_finished_count: int = 1000,
    ) -> None:
        self._gpu_lock = gpu_lock
        self._depth = depth
        self._keep_finished = keep_finished_seconds
        self._keep_finished_count = keep_finished_count
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._jobs: dict[str, Job] = {}
        self._reserved = 0
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="pictoprompt-jobs", daemon=True)
        self._worker.start()

    def reserve(self) -> Slot:
        """Take a place in the queue, or raise `BusyError` at once if there is none: a call takes it before it
        fetches or decodes any image, so under load a refused call costs its request and nothing more."""
        with self._lock:
            self._forget_old()
            waiting = sum(1 for job in self._jobs.values() if job.state == "queued") + self._reserved
            if waiting >= self._depth:
                raise BusyError(
                    f"The server is busy: {waiting} jobs are already waiting (queue depth {self._depth}). "
                    "Try again in a little while, or cancel a job you no longer need with cancel_job."
                )
            self._reserved += 1
        return Slot(self)

    def submit(
        self, tool: str, work: Callable[[Progress], Any], slot: Slot | None = None, keep: RecordingSink | None = None
    ) -> Job:
        """Queue `work` in `slot` (taken now if not given; `BusyError` when the queue is full)."""
        (slot or self.reserve())._take()
        with self._lock:
            self._reserved -= 1
            job = Job(id=secrets.token_hex(8), tool=tool, work=work, progress=Progress(), keep=keep)
            job.progress = Progress(lambda done, total, message: self._on_progress(job, done, total, message))
            self._jobs[job.id] = job
        self._queue.put(job)
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(
                f"There is no job '{job_id}'; it may have finished over an hour ago. Start the work again."
            )
        return job

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        job.progress.cancel()
        with self._lock:
            if job.state == "queued":
                self._finish(job, "cancelled", error="cancelled before it started")
        return job

    async def wait(self, job: Job, seconds: float, listener: ProgressListener | None = None) -> bool:
        """Wait up to `seconds` for `job`; True if it finished. Progress goes to `listener` meanwhile."""
        entry = None
        if listener is not None:
            entry = (asyncio.get_running_loop(), listener)
            job.listeners.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job.future)), timeout=seconds)
        except TimeoutError:
            return False
        except Exception:  # the job's own failure is read from the job, not raised here
            return True
        finally:
            if entry is not None:
                job.listeners.remove(entry)
        return True

    def shutdown(self) -> None:
        for job in self.jobs():
            job.progress.cancel()
        self._queue.put(None)

    def _release(self, slot: Slot) -> None:
        with self._lock:
            self._reserved -= 1

    def _on_progress(self, job: Job, done: float, total: float | None, message: str | None) -> None:
        job.done, job.total, job.message = done, total, message
        for loop, listener in list(job.listeners):
            loop.call_soon_threadsafe(listener, done, total, message)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._run(job)
            # Not kept while the worker waits for the next job: a finished job may be forgotten meanwhile.
            del job

    def _run(self, job: Job) -> None:
        with self._lock:
            if job.state != "queued":
                return
            job.state = "running"
            job.started = time.monotonic()
        work = job.work
        assert work is not None  # only a queued job is taken, and only an ended job has dropped its work
        self._finish(job, *run_job(job.id, job.tool, self._gpu_lock, job.progress, lambda: work(job.progress)))

    def _finish(self, job: Job, state: JobState, result: Any = None, error: str | None = None) -> None:
        job.state, job.error, job.finished = state, error, time.monotonic()
        job.work = None  # it holds the inputs (decoded images), which must not stay as long as the job is kept
        if not job.future.done():
            job.future.set_result(result)

    def _forget_old(self) -> None:
        ended = {job_id: job.finished for job_id, job in self._jobs.items() if job.finished is not None}
        forget_ended(self._jobs, ended, time.monotonic(), self._keep_finished, self._keep_finished_count)


class LocalJobs:
    """The one-machine service: `JobRunner`'s queue and worker thread, running the tools on this process's runtime."""

    def __init__(self, runner: JobRunner, runtime: Runtime, assets: AssetStore, concepts: ConceptStore) -> None:
        self.runner, self.runtime, self.assets, self.concepts = runner, runtime, assets, concepts

    async def submit(self, spec: ToolSpec, request: ToolRequest, resolve_images: ImagesResolver) -> str:
        slot = self.runner.reserve()
        try:
            images = await resolve_images()
        except BaseException:
            slot.release()
            raise
        sink = RecordingSink(self.assets)

        def work(progress: Progress) -> BaseModel:
            return spec.run(request, ToolContext(self.runtime, sink, images, progress, self.concepts))

        return self.runner.submit(spec.name, work, slot, keep=sink).id

    async def wait(self, job_id: str, seconds: float, listener: ProgressListener | None = None) -> JobView:
        job = self.runner.get(job_id)
        await self.runner.wait(job, seconds, listener)
        return local_view(job)

    def request_cancel(self, job_id: str) -> None:
        self.runner.cancel(job_id)

    async def cancel(self, job_id: str) -> tuple[JobView, bool]:
        job = self.runner.get(job_id)
        ending = job.state in {"queued", "running"}
        self.runner.cancel(job_id)
        return local_view(job), ending

    async def views(self) -> list[JobView]:
        return [local_view(job) for job in self.runner.jobs()]

    async def workers(self) -> list[WorkerStatus]:
        return [worker_status("local", self.runtime)]

    async def shutdown(self) -> None:
        self.runner.shutdown()


def local_view(job: Job) -> JobView:
    result = job.future.result() if job.state == "succeeded" else None
    return JobView(
        id=job.id,
        tool=job.tool,
        state=job.state,
        fraction=job.fraction,
        message=job.message,
        elapsed=job.elapsed(),
        error=job.error,
        result=result.model_dump(mode="json") if isinstance(result, BaseModel) else None,
        saved=list(job.keep.saved) if job.keep is not None else [],
    )
