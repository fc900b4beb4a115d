"""Beyond one machine: the model work on a Ray Serve deployment (`pictoprompt serve --http --ray [ADDRESS]`).

- `ModelReplica`, the deployment: each replica holds one `Runtime` and takes up to `ray_batch_size` calls at once.
  The work runs one step at a time under the GPU lock, except the denoising of `generate_image` and `vary_image`,
  which Serve's `@serve.batch` gathers into one U-Net batch for the calls that share a step count and a size (a
  call alone samples at once). Serve routes, queues, and refuses beyond `queue_depth` waiting calls ("busy").
- `JobBoard`, a detached named actor, records every job (state, progress, result, replica), so that `get_job` and
  `cancel_job` work from any front and a job outlives the front that started it. It only records.
- `RayJobs`, a front's `JobService`: the MCP app validates input, resolves images, submits through a Serve handle,
  learns how its own jobs ended from the Serve response, and reads the board for progress and other fronts' jobs.
- `build_app`, the application a cluster deploys from a config (KubeRay's RayService, `deploy/kuberay/`).

A replica that dies mid-job fails that job with a message saying so; Serve starts a new one. Assets and concepts
are folders (`PICTOPROMPT_ASSET_DIR`, `PICTOPROMPT_DATA_DIR`) that every replica and front must see at the same
path (one shared volume on a cluster); the stores write atomically and read from disk on every call.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import anyio
import ray
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, RequestCancelledError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from pictoprompt.errors import JobCancelledError, NotFoundError, PictopromptError
from pictoprompt.methods.generation import Sample, generate, generate_batch
from pictoprompt.models.concepts import ConceptStore
from pictoprompt.models.profiles import get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.progress import Progress
from pictoprompt.server.assets import AssetStore, RecordingSink
from pictoprompt.server.images import PreResolvedImages
from pictoprompt.server.jobs import (
    ENDED,
    ImagesResolver,
    JobState,
    JobView,
    ProgressListener,
    WorkerStatus,
    forget_ended,
    run_job,
    worker_status,
)
from pictoprompt.settings import Settings
from pictoprompt.tools import TOOLS
from pictoprompt.tools.base import SavedImage, ToolContext, ToolRequest, ToolSpec

logger = logging.getLogger(__name__)

NAMESPACE = "pictoprompt"
APP_NAME = "pictoprompt"
DEPLOYMENT_NAME = "ModelReplica"
BOARD_NAME = "pictoprompt-job-board"
POLL_SECONDS = 0.25
"""How often a waiting front reads the board for progress (or for the end of another front's job)."""
REPORT_SECONDS = 0.2
"""A replica sends a job's progress to the board (and learns whether it was cancelled) at most this often, and always
its last step."""
SPECS = {spec.name: spec for spec in TOOLS if spec.uses_models}
NODE_PRIORITY = {"env_vars": {"RAY_worker_niceness": "0"}}
"""The replicas and the board run at the node's priority: Ray starts its workers 15 steps nicer, so the model work
(and every answer of the board) would get a CPU last whenever anything else on the node wants one."""


# ------------------------------------------------------------------------------------------------ the job board


class JobBoard:
    """The jobs of every front and replica: plain records, kept an hour (at most 1,000) after they end."""

    def __init__(self, keep_finished_seconds: float = 3600, keep_finished_count: int = 1000) -> None:
        self._jobs: dict[str, dict[str, Any]] = {}
        self._workers: dict[str, dict[str, Any]] = {}
        self._keep_seconds, self._keep_count = keep_finished_seconds, keep_finished_count

    async def create(self, job_id: str, tool: str) -> None:
        """Record a job the front submitted, unless its replica's `start` came first."""
        self._forget_old()
        self._jobs.setdefault(job_id, self._record(job_id, tool))

    @staticmethod
    def _record(job_id: str, tool: str) -> dict[str, Any]:
        return {
            **dict(id=job_id, tool=tool, state="queued", created=time.time(), started=None, finished=None),
            **dict(done=0.0, total=None, message=None, error=None, result=None, saved=[], replica=None),
            "cancel": False,
        }

    async def start(self, job_id: str, tool: str, replica: str) -> bool:
        """Mark the job running on `replica`; False if it must not run (cancelled while queued)."""
        job = self._jobs.setdefault(job_id, self._record(job_id, tool))
        if job["state"] != "queued":
            return False
        job.update(state="running", started=time.time(), replica=replica)
        return True

    async def report(self, job_id: str, done: float, total: float | None, message: str | None) -> bool:
        """Record progress; True if the job was asked to stop."""
        job = self._jobs.get(job_id)
        if job is None:
            return True
        job.update(done=done, total=total, message=message)
        return bool(job["cancel"])

    async def finish(
        self,
        job_id: str,
        state: JobState,
        result: dict[str, Any] | None = None,
        saved: list[dict[str, str]] | None = None,
        error: str | None = None,
    ) -> dict[str, Any] | None:
        """End the job unless it already ended (the first word stands); the job's record as it ended."""
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if job["state"] not in ENDED:
            job.update(state=state, finished=time.time(), result=result, saved=saved or [], error=error)
        return dict(job)

    async def cancel(self, job_id: str) -> tuple[dict[str, Any] | None, bool]:
        job = self._jobs.get(job_id)
        if job is None:
            return None, False
        ending = job["state"] in {"queued", "running"}
        job["cancel"] = True
        if job["state"] == "queued":
            job.update(state="cancelled", finished=time.time(), error="cancelled before it started")
        return dict(job), ending

    async def get(self, job_id: str) -> dict[str, Any] | None:
        job = self._jobs.get(job_id)
        return None if job is None else dict(job)

    async def jobs(self) -> list[dict[str, Any]]:
        self._forget_old()
        return [dict(job) for job in self._jobs.values()]

    async def register(self, worker: dict[str, Any]) -> None:
        self._workers[worker["name"]] = worker

    async def workers(self) -> list[dict[str, Any]]:
        return list(self._workers.values())

    def _forget_old(self) -> None:
        ended = {job_id: job["finished"] for job_id, job in self._jobs.items() if job["finished"]}
        forget_ended(self._jobs, ended, time.time(), self._keep_seconds, self._keep_count)


def job_board() -> ray.actor.ActorHandle:
    """The cluster's board, created by the first front or replica that asks for it."""
    board = ray.remote(JobBoard).options(
        name=BOARD_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        runtime_env=NODE_PRIORITY,
    )
    return board.remote()


def job_view(record: dict[str, Any]) -> JobView:
    started = record["started"] or record["created"]
    total = record["total"]
    return JobView(
        id=record["id"],
        tool=record["tool"],
        state=record["state"],
        fraction=min(1.0, record["done"] / total) if total else None,
        message=record["message"],
        elapsed=(record["finished"] or time.time()) - started,
        error=record["error"],
        result=record["result"],
        saved=[SavedImage(**saved) for saved in record["saved"]],
        replica=record["replica"],
    )


# ----------------------------------------------------------------------------------------------- the replicas


@dataclass(frozen=True)
class Gathered:
    """One call's denoising, waiting for a batch; calls with the same `key` share a U-Net batch."""

    sample: Sample
    steps: int
    width: int
    height: int

    @property
    def key(self) -> tuple[int, int, int, bool]:
        return self.steps, self.width, self.height, self.sample.guided


class ModelReplica:
    """One runtime for the profile, running the tools' calls and writing each job to the board."""

    def __init__(self, settings: Settings) -> None:
        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(settings.ray_replica_cpus)))
        self.name = serve.get_replica_context().replica_id.unique_id
        # A thread per call the replica takes at once (the default executor's few would cap a batch), and one for
        # the batches.
        self._tool_threads = ThreadPoolExecutor(settings.ray_batch_size + 1, thread_name_prefix="tool")
        self._batch_thread = ThreadPoolExecutor(1, thread_name_prefix="batch")
        self._batching = settings.ray_batch_size > 1
        self._sample_batch.set_max_batch_size(settings.ray_batch_size)
        self._sample_batch.set_batch_wait_timeout_s(settings.ray_batch_wait_seconds)
        self._calls = 0
        """Calls on this replica now: a call alone samples at once instead of waiting for a batch."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self.runtime = Runtime(get_profile(settings.profile, settings.profiles_file), settings.cache_dir)
        self.assets = AssetStore(settings.assets_root, settings.asset_ttl_seconds, settings.asset_max_bytes)
        self.concepts = ConceptStore(settings.data_dir / "concepts")
        self.board = job_board()
        self.runtime.preload({component for spec in SPECS.values() for component in spec.components})
        for warm_up in dict.fromkeys(spec.warm_up for spec in SPECS.values() if spec.warm_up is not None):
            warm_up(self.runtime, Progress())
        self._register()

    async def run(
        self, job_id: str, tool: str, arguments: dict[str, Any], images: PreResolvedImages
    ) -> dict[str, Any] | None:
        """Run one job to its end; its ended record goes to the board and back to the front in the response (None
        if the job must not run)."""
        self._loop = asyncio.get_running_loop()
        self._calls += 1
        try:
            if not await self.board.start.remote(job_id, tool, self.name):
                return None
            progress = self._progress(job_id)
            work = self._loop.run_in_executor(
                self._tool_threads, self._run_tool, job_id, SPECS[tool], arguments, images, progress
            )
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                # The Serve request was cancelled: stop between two steps (or leave the batch), then let it end.
                progress.cancel()
                await asyncio.wait({work})
                raise
        finally:
            self._calls -= 1

    def _run_tool(
        self, job_id: str, spec: ToolSpec, arguments: dict[str, Any], images: PreResolvedImages, progress: Progress
    ) -> dict[str, Any] | None:
        sink = RecordingSink(self.assets)
        sampler = self._sample if self._batching else None

        def work() -> dict[str, Any]:
            request = spec.request_model.model_validate(arguments)
            context = ToolContext(self.runtime, sink, images, progress, self.concepts, sampler)
            return spec.run(request, context).model_dump(mode="json")

        lock = self.runtime.gpu_lock
        state, result, error = run_job(job_id, spec.name, lock, progress, work, f" on replica {self.name}")
        saved = [image.model_dump() for image in sink.saved]
        # Waited for: once the front has the answer, every front finds the job ended on the board.
        ended = ray.get(self.board.finish.remote(job_id, state, result, saved, error))
        self._register()
        return ended

    def _sample(
        self, pipeline: StableDiffusionPipeline, sample: Sample, steps: int, width: int, height: int
    ) -> list[Image.Image]:
        """The replica's sampler, called under the GPU lock: alone when no other call is here, else batched."""
        if self._calls <= 1 or self._loop is None:
            return generate(pipeline, sample, steps, width, height)
        # Let go of the model lock while the batch gathers, so that the other calls encode their prompts and join
        # it; the batch takes the lock to sample, and this call takes it back to score and save.
        lock = self.runtime.gpu_lock
        lock.release()
        try:
            batch = asyncio.run_coroutine_threadsafe(
                self._sample_batch(Gathered(sample, steps, width, height)), self._loop
            )
            images = batch.result()
        finally:
            lock.acquire()
        if images is None:
            sample.progress.check()
            raise JobCancelledError("The job was cancelled before it finished; nothing was kept from it.")
        return images

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _sample_batch(self, gathered: list[Gathered]) -> list[list[Image.Image] | None]:
        """The batch Serve gathered (its size and wait set from the settings in `__init__`)."""
        return await asyncio.get_running_loop().run_in_executor(self._batch_thread, self._run_batches, gathered)

    def _run_batches(self, gathered: list[Gathered]) -> list[list[Image.Image] | None]:
        """One U-Net batch per step count, size and guidance among the gathered calls, one after the other."""
        groups: dict[tuple[int, int, int, bool], list[int]] = {}
        for index, call in enumerate(gathered):
            groups.setdefault(call.key, []).append(index)
        results: list[list[Image.Image] | None] = [None] * len(gathered)
        for (steps, width, height, _), members in groups.items():
            with self.runtime.gpu_lock:
                pipeline = self.runtime.pipeline()
                images = generate_batch(pipeline, [gathered[i].sample for i in members], steps, width, height)
            for index, pictures in zip(members, images, strict=True):
                results[index] = pictures
        logger.debug("replica %s sampled %d calls in %d batches", self.name, len(gathered), len(groups))
        return results

    def _progress(self, job_id: str) -> Progress:
        """Progress that reaches the board at most every `REPORT_SECONDS`, and stops when the board says so."""
        last_sent = 0.0
        answer: ray.ObjectRef | None = None

        def report(done: float, total: float | None, message: str | None) -> None:
            nonlocal last_sent, answer
            finished = total is not None and done >= total
            if time.monotonic() - last_sent < REPORT_SECONDS and not finished:
                return
            last_sent = time.monotonic()
            # The board's answer (was the job cancelled?) is read at the next report, if it has come: the work never
            # waits on a round trip (a batch reports for each of its calls). The flag stays set, so none is missed.
            if answer is not None and ray.wait([answer], timeout=0)[0] and ray.get(answer):
                progress.cancel()
            answer = self.board.report.remote(job_id, done, total, message)

        progress = Progress(report)
        return progress

    def _register(self) -> None:
        # Not waited for: `server_status` may see it a moment late, a call never waits on it.
        self.board.register.remote(worker_status(self.name, self.runtime).model_dump())


# ------------------------------------------------------------------------------------------------- the front


class RayJobs:
    """A front's `JobService`: submits through a Serve handle and answers from the board."""

    def __init__(self, handle: DeploymentHandle, board: ray.actor.ActorHandle, owns_ray: bool) -> None:
        self._handle, self._board, self._owns_ray = handle, board, owns_ray
        self._requests: dict[str, DeploymentResponse] = {}
        self._watchers: dict[str, asyncio.Task[dict[str, Any] | None]] = {}
        """This front's unended jobs, each with the task that awaits its Serve response (see `_watch`)."""

    async def submit(self, spec: ToolSpec, request: ToolRequest, resolve_images: ImagesResolver) -> str:
        images = await resolve_images()
        job_id = secrets.token_hex(8)
        # The record and the request go out together: Serve routes the job while the board records it (a replica
        # that starts the job first creates the record itself).
        created = self._board.create.remote(job_id, spec.name)
        # The tool's own arguments: the call's `wait_seconds` and `inline` concern this front only.
        arguments = request.model_dump(mode="json", include=set(spec.request_model.model_fields))
        response = self._handle.run.remote(job_id, spec.name, arguments, images)
        await created
        self._requests[job_id] = response
        watcher = asyncio.create_task(self._watch(job_id, response))
        self._watchers[job_id] = watcher
        watcher.add_done_callback(lambda _: self._watchers.pop(job_id, None))
        return job_id

    async def _watch(self, job_id: str, response: DeploymentResponse) -> dict[str, Any] | None:
        """The job's ended record from the replica, or None after recording on the board how it ended otherwise."""
        try:
            return await response
        except BackPressureError:
            await self._fail(
                job_id,
                "The server is busy: every replica is working and the queue is full. Try again in a little while, "
                "or cancel a job you no longer need with cancel_job.",
            )
        except RequestCancelledError:
            await self._board.finish.remote(job_id, "cancelled", error="cancelled")
        except (RayActorError, ActorUnavailableError) as error:
            logger.warning("the replica running job %s stopped: %s", job_id, error)
            await self._fail(
                job_id,
                "The replica running this job stopped before it finished (it crashed or its machine went away); "
                "nothing was kept from it. Call the tool again: another replica takes the work.",
            )
        except Exception as error:
            logger.exception("job %s failed in Ray Serve", job_id)
            await self._fail(job_id, f"Ray Serve could not run the job: {type(error).__name__}: {error}")
        finally:
            self._requests.pop(job_id, None)
        return None

    async def _fail(self, job_id: str, message: str) -> None:
        await self._board.finish.remote(job_id, "failed", error=message)

    async def wait(self, job_id: str, seconds: float, listener: ProgressListener | None = None) -> JobView:
        deadline = time.monotonic() + seconds
        heard = None
        while True:
            watcher = self._watchers.get(job_id)
            record = await self._board.get.remote(job_id)
            if record is None:
                raise NotFoundError(
                    f"There is no job '{job_id}'; it may have finished over an hour ago. Start the work again."
                )
            progress = (record["done"], record["total"], record["message"])
            if listener is not None and record["state"] == "running" and progress != heard:
                heard = progress
                listener(*progress)
            left = deadline - time.monotonic()
            if record["state"] in ENDED or left <= 0:
                return job_view(record)
            if watcher is None:
                await asyncio.sleep(min(POLL_SECONDS, left))
                continue
            # The job's own response says when it ended, with its record: no polling delay, no second question.
            await asyncio.wait({watcher}, timeout=min(POLL_SECONDS, left) if listener is not None else left)
            if watcher.done() and not watcher.cancelled() and (ended := watcher.result()) is not None:
                return job_view(ended)

    def request_cancel(self, job_id: str) -> None:
        self._board.cancel.remote(job_id)
        self._cancel_request(job_id)

    async def cancel(self, job_id: str) -> tuple[JobView, bool]:
        record, ending = await self._board.cancel.remote(job_id)
        if record is None:
            raise NotFoundError(f"There is no job '{job_id}'; it may have finished over an hour ago.")
        self._cancel_request(job_id)
        return job_view(record), ending

    def _cancel_request(self, job_id: str) -> None:
        if (request := self._requests.get(job_id)) is not None:
            request.cancel()

    async def views(self) -> list[JobView]:
        return [job_view(record) for record in await self._board.jobs.remote()]

    async def workers(self) -> list[WorkerStatus]:
        """The live replicas (the board remembers every replica that registered, a killed one too)."""
        live = await anyio.to_thread.run_sync(live_replica_ids)
        return [WorkerStatus(**worker) for worker in await self._board.workers.remote() if worker["name"] in live]

    async def shutdown(self) -> None:
        for watcher in list(self._watchers.values()):
            watcher.cancel()
        if self._owns_ray:
            # A local Ray this front started ends with it; a cluster's deployment stays for the other fronts.
            await anyio.to_thread.run_sync(_shut_down_ray)


def live_replica_ids() -> set[str]:
    """The ids of the deployment's live replicas (Serve names each replica's actor after its id)."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#"
    actors = ray.util.list_named_actors(all_namespaces=True)
    return {actor["name"].removeprefix(prefix) for actor in actors if actor["name"].startswith(prefix)}


def _shut_down_ray() -> None:
    serve.shutdown()
    ray.shutdown()


async def connect(settings: Settings) -> RayJobs:
    """Join the Ray cluster at `settings.ray_address` (or start a local one) and deploy the replicas if needed."""
    return await anyio.to_thread.run_sync(_connect, settings)


def _connect(settings: Settings) -> RayJobs:
    owns_ray = False
    if not ray.is_initialized():
        owns_ray = settings.ray_address is None
        try:
            ray.init(address=settings.ray_address, namespace=NAMESPACE, log_to_driver=False)
        except ConnectionError as error:
            raise PictopromptError(
                f"Could not reach the Ray cluster at {settings.ray_address} ({error}). Check the address (the head's "
                "`ray start --head` prints it, e.g. 10.0.0.5:6379), or leave it out to start a local Ray."
            ) from error
    board = job_board()
    return RayJobs(deploy(settings), board, owns_ray)


def deploy(settings: Settings) -> DeploymentHandle:
    """The deployment's handle: the running application, or a new one."""
    applications = serve.status().applications
    if APP_NAME in applications and applications[APP_NAME].status in {"RUNNING", "DEPLOYING", "UNHEALTHY"}:
        return serve.get_app_handle(APP_NAME)
    serve.start(proxy_location="Disabled")
    return serve.run(build_app(settings), name=APP_NAME, route_prefix=None)


def build_app(settings: Settings | dict[str, Any] | None = None) -> Application:
    """The replicas as a Serve application. A RayService deploys it by import path
    (`pictoprompt.server.ray_serve:build_app`); its `args`, if any, override the `PICTOPROMPT_*` variables."""
    if not isinstance(settings, Settings):
        settings = Settings(**(settings or {}))
    gpus = settings.ray_replica_gpus
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    replicas: dict[str, Any]
    if settings.ray_min_replicas == settings.ray_max_replicas:
        replicas = {"num_replicas": settings.ray_max_replicas}
    else:
        replicas = {
            "autoscaling_config": {
                "min_replicas": settings.ray_min_replicas,
                "max_replicas": settings.ray_max_replicas,
                "target_ongoing_requests": settings.ray_target_ongoing_requests,
            }
        }
    deployment = serve.deployment(
        ModelReplica,
        name=DEPLOYMENT_NAME,
        max_ongoing_requests=settings.ray_batch_size,
        max_queued_requests=settings.queue_depth,
        ray_actor_options={"num_cpus": settings.ray_replica_cpus, "num_gpus": gpus, "runtime_env": NODE_PRIORITY},
        **replicas,
    )
    logger.info(
        "deploying %s: %s, %s CPUs and %s GPUs each, batches of up to %d calls",
        *(APP_NAME, replicas, settings.ray_replica_cpus, gpus, settings.ray_batch_size),
    )
    return deployment.bind(settings)
