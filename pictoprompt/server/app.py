"""The pictoprompt MCP server: tools from the registry, jobs, assets, status, and the asset resource."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import BaseModel, Field, WithJsonSchema, create_model

from pictoprompt import __version__
from pictoprompt.errors import JobCancelledError, NotFoundError, PictopromptError
from pictoprompt.models.concepts import ConceptStore
from pictoprompt.models.profiles import available_profiles, get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.progress import Progress
from pictoprompt.server.app_view import apps_extension, tool_meta
from pictoprompt.server.assets import AssetStore, RecordingSink
from pictoprompt.server.client_logs import ClientLogs, add_set_level
from pictoprompt.server.completions import CompletionSources, add_completions
from pictoprompt.server.http_transport import CLIENT_GONE
from pictoprompt.server.icons import SERVER_ICONS, TOOL_ICONS
from pictoprompt.server.images import ImagePolicy, ImageResolver, PreResolvedImages
from pictoprompt.server.jobs import JobRunner, JobService, JobView, LocalJobs, ModelsStatus, worker_status
from pictoprompt.server.prompts import add_workflow_prompts
from pictoprompt.server.results import InlineMode, JobInfo, job_info, job_result
from pictoprompt.server.tasks import ASKED, TaskMiddleware, TasksExtension, TaskStore
from pictoprompt.server.wire import PictopromptServer, WireTool, text_result
from pictoprompt.settings import Settings
from pictoprompt.tools import TOOLS
from pictoprompt.tools.base import ToolContext, ToolHints, ToolRequest, ToolSpec

logger = logging.getLogger(__name__)

INSTRUCTIONS = """\
pictoprompt works with images through readable text prompts, on a local Stable Diffusion + CLIP + small LLM.
- generate_image: text -> images (each image reports its seed, so any result can be reproduced).
- invert_image: image -> readable prompts you can edit and reuse; focus="style" extracts a style prompt.
- vary_image: variations of one or several pictures (no prompt needed); edit_with_text: change a picture
  with words ("in the snow", "as a watercolor").
- fuse_concepts: one prompt holding the concepts of several pictures; distill_prompt: shorten a long prompt.
- customize_concept: teach a concept from 3-10 pictures, then pass concept=NAME to the generation tools.
Images are accepted as local paths, http(s) URLs, data: URIs / base64, or pictoprompt://assets/<id> URIs of
earlier results. Results come back as resource links (readable with resources/read) plus small thumbnails.
Slow calls return a job_id after wait_seconds: call get_job to wait again or cancel_job to stop it.
server_status tells which models are loaded and how busy the queue is. The server's prompts (prompts/list) walk
through the common workflows: recreate a picture's prompt, pick among variations, learn a concept, shorten a
prompt, remove or replace something in a picture.
"""

WaitSeconds = Annotated[
    float,
    Field(ge=0, le=600, description="Then a job_id for get_job."),
]
Inline = Annotated[
    InlineMode,
    Field(description="Inline images too."),
]


@dataclass
class ServerState:
    settings: Settings
    runtime: Runtime
    assets: AssetStore
    resolver: ImageResolver
    jobs: JobService
    concepts: ConceptStore
    tasks: TaskStore


StateOf = Callable[[Context], ServerState]


def annotations_for(hints: ToolHints) -> ToolAnnotations:
    """The tool's hints, each left out where it is the protocol's default (read-only and idempotent false,
    destructive and open-world true): the same meaning in fewer characters of tools/list."""
    return ToolAnnotations(
        read_only_hint=hints.read_only or None,
        destructive_hint=None if hints.destructive else False,
        idempotent_hint=hints.idempotent or None,
        open_world_hint=None if hints.open_world else False,
    )


def wire_tool(spec: ToolSpec, state_of: StateOf) -> WireTool:
    """A registry tool as the server offers it: a model-heavy one runs as a job and takes `wait_seconds` and
    `inline`; a light one (the concept store) runs at once in a worker thread."""
    if not spec.uses_models:

        async def call_directly(request: ToolRequest, ctx: Context) -> CallToolResult:
            state = state_of(ctx)
            context = ToolContext(
                state.runtime, RecordingSink(state.assets), PreResolvedImages({}), concepts=state.concepts
            )
            with refusals_as(ToolError):
                return text_result(await anyio.to_thread.run_sync(spec.run, request, context))

        return WireTool(
            spec.name,
            spec.title,
            spec.description,
            spec.request_model,
            spec.response_model,
            annotations_for(spec.hints),
            call_directly,
        )

    # The arguments are the tool's request plus the job's two options; the validated arguments object is the
    # request the tool runs on (a subclass of its request model).
    arguments = create_model(
        f"{spec.request_model.__name__}Call",
        __base__=spec.request_model,
        wait_seconds=(WaitSeconds, 50.0),
        inline=(Inline, "thumbnail"),
    )

    async def call_as_job(request: Any, ctx: Context) -> CallToolResult:
        state = state_of(ctx)

        async def resolve_images() -> PreResolvedImages:
            return await state.resolver.resolve_all(request.image_refs())

        with refusals_as(ToolError):
            job_id = await state.jobs.submit(spec, request, resolve_images)
            if (task := ASKED.get()) is not None:  # the client polls a task instead of waiting here
                return state.tasks.start(task, job_id, spec.name, request.inline)
            job = await _wait_for_job(state, job_id, request.wait_seconds, ctx)
        return job_result(job, state.assets, request.inline)

    output = create_model(
        f"{spec.response_model.__name__}Job",
        # The job's fields are in get_job's output schema; repeating them in every tool's would only cost context.
        job=(Annotated[JobInfo, WithJsonSchema({"type": "object"})], ...),
        # null while the job runs.
        result=(spec.response_model | None, None),
    )
    annotations = annotations_for(spec.hints)
    return WireTool(spec.name, spec.title, spec.description, arguments, output, annotations, call_as_job)


def _client_gone(ctx: Context) -> anyio.Event | None:
    """The event `HttpGuard` sets when this call's HTTP client disconnects; None off HTTP (stdio, in-memory)."""
    try:
        request = ctx.request_context.request
    except ValueError:  # no request context
        return None
    scope = getattr(request, "scope", None)
    gone = scope.get(CLIENT_GONE) if isinstance(scope, dict) else None
    return gone if isinstance(gone, anyio.Event) else None


async def _wait_for_job(state: ServerState, job_id: str, wait_seconds: float, ctx: Context) -> JobView:
    pending: set[asyncio.Task] = set()

    def forward(done: float, total: float | None, message: str | None) -> None:
        task = asyncio.ensure_future(ctx.report_progress(done, total, message))
        pending.add(task)
        task.add_done_callback(pending.discard)

    gone = _client_gone(ctx)
    try:
        if gone is None:
            return await state.jobs.wait(job_id, wait_seconds, forward)
        async with anyio.create_task_group() as group:

            async def stop_when_the_client_is_gone() -> None:
                # On the pre-2026 wire a client that dies does not cancel its call: the session outlives the
                # connection, so without this the job would run to its end for nobody.
                await gone.wait()
                logger.info("the client of job %s disconnected; cancelling the job", job_id)
                state.jobs.request_cancel(job_id)
                group.cancel_scope.cancel()

            group.start_soon(stop_when_the_client_is_gone)
            job = await state.jobs.wait(job_id, wait_seconds, forward)
            group.cancel_scope.cancel()
        if gone.is_set():
            return await state.jobs.wait(job_id, 0)  # nobody reads it: the job as the cancel left it
        return job
    except asyncio.CancelledError:
        # The client cancelled its request: stop the work it asked for, between two steps.
        state.jobs.request_cancel(job_id)
        raise


class JobLookup(BaseModel):
    job: JobInfo
    result: dict[str, Any] | None = Field(None, description="The tool's result once the job succeeded.")


class CancelOutcome(BaseModel):
    job: Annotated[JobInfo, WithJsonSchema({"type": "object"})]
    cancelled: bool = Field(description="True if the job will stop (or had not started); False if it had ended.")


class QueueStatus(BaseModel):
    running: list[JobInfo]
    queued: int
    depth: int


class ServerStatus(ModelsStatus):
    version: str
    queue: QueueStatus
    asset_dir: str
    replicas: list[str] = Field(
        default_factory=list, description="The Ray Serve replicas holding the models (served with --ray)."
    )


def _warm_up(runtime: Runtime, warm_ups: list[Callable[[Runtime, Progress], object]], progress: Progress) -> None:
    """Do the tools' one-time work while the server already answers; a call that needs it waits for it. Stops at
    its next step once `progress` is cancelled (the session ended)."""
    for warm_up in warm_ups:
        try:
            warm_up(runtime, progress)
        except JobCancelledError:
            return
        except Exception:  # a failure here shows again, with its message, in the call that needs the work
            logger.exception("warm-up %s failed", getattr(warm_up, "__name__", warm_up))


def create_server(
    settings: Settings | None = None,
    *,
    transport: str = "stdio",
    runtime: Runtime | None = None,
    preload: bool = True,
    **mcp_options: Any,
) -> MCPServer:
    """Build the MCP server. Models load in the lifespan (once), not per call."""
    settings = settings or Settings()
    runtime = runtime or Runtime(get_profile(settings.profile, settings.profiles_file), settings.cache_dir)
    holder: dict[str, ServerState] = {}

    roots = list(settings.allow_dirs)
    if transport == "stdio" and settings.allow_home:
        roots.append(Path.home())
    assets = AssetStore(settings.assets_root, settings.asset_ttl_seconds, settings.asset_max_bytes)
    concepts = ConceptStore(settings.data_dir / "concepts")
    policy = ImagePolicy(allowed_roots=roots, allow_private_urls=settings.allow_private_urls)
    client_logs = ClientLogs()

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[ServerState]:
        jobs: JobService
        if settings.ray:
            # The replicas hold the models; this process only validates, resolves images and waits.
            jobs = await ray_jobs(settings)
        else:
            jobs = LocalJobs(JobRunner(runtime.gpu_lock, depth=settings.queue_depth), runtime, assets, concepts)
        tasks = TaskStore(jobs, assets)
        state = ServerState(settings, runtime, assets, ImageResolver(policy, assets), jobs, concepts, tasks)
        holder["state"] = state
        await anyio.to_thread.run_sync(assets.expire)
        warming = Progress()
        warm_up = None
        if preload and not settings.ray:
            needed = {component for spec in TOOLS for component in spec.components}
            await anyio.to_thread.run_sync(runtime.preload, needed)
            warm_ups = list(dict.fromkeys(spec.warm_up for spec in TOOLS if spec.warm_up is not None))
            warm_up = threading.Thread(target=_warm_up, args=(runtime, warm_ups, warming), name="warm-up")
            warm_up.start()
        logging.getLogger("pictoprompt").addHandler(client_logs)
        try:
            yield state
        finally:
            logging.getLogger("pictoprompt").removeHandler(client_logs)
            await tasks.shutdown()
            await jobs.shutdown()
            if warm_up is not None:
                # A session can end while the warm-up still runs native code; the process must not exit under it.
                warming.cancel()
                await anyio.to_thread.run_sync(warm_up.join)

    def state_of(_: Context | None = None) -> ServerState:
        return holder["state"]

    def tasks_of() -> TaskStore:
        return holder["state"].tasks

    task_tools = frozenset(spec.name for spec in TOOLS if spec.uses_models)
    tools = [*(wire_tool(spec, state_of) for spec in TOOLS), *job_tools(state_of)]
    server = PictopromptServer(
        "pictoprompt",
        title="pictoprompt",
        instructions=INSTRUCTIONS,
        version=__version__,
        lifespan=lifespan,
        # The image tools name the app view (MCP Apps); hosts without Apps ignore it and get the same results.
        wire_tools=[replace(tool, meta=tool_meta(tool.name)) for tool in tools],
        icons=SERVER_ICONS,
        tool_icons=TOOL_ICONS,
        task_tools=task_tools,
        extensions=[apps_extension(), TasksExtension(tasks_of)],
        middleware=[TaskMiddleware(tasks_of, task_tools)],
        **mcp_options,
    )
    add_workflow_prompts(server)
    profiles = list(available_profiles(settings.profiles_file))
    add_completions(server, CompletionSources(concepts, assets, lambda: profiles, offer_assets=transport == "stdio"))
    add_set_level(server, client_logs)

    @server.resource(
        "pictoprompt://assets/{asset_id}",
        name="asset",
        description="An image made by a pictoprompt tool: a PNG with its prompt, seed and model in text chunks.",
        mime_type="image/png",
    )
    def read_asset(asset_id: str) -> bytes:
        with refusals_as(ResourceError):
            return assets.read_bytes(asset_id)

    @server.resource(
        "pictoprompt://concepts/{name}",
        name="concept",
        description="A learned concept's card (JSON): base model, hyperparameters, iterations, losses, creation "
        "time and reference thumbnails (its embedding vectors are left out). Use it as concept=NAME or concept:NAME.",
        mime_type="application/json",
    )
    def read_concept(name: str) -> str:
        with refusals_as(ResourceError):
            card = concepts.get(name)
            return card.model_dump_json(indent=2, exclude={"mean_image_embedding", "mean_converted_embedding"})

    @server.resource(
        "pictoprompt://profiles/{name}",
        name="profile",
        description="A model profile this server knows (JSON): its models and method settings. server_status names "
        "the profile it serves.",
        mime_type="application/json",
    )
    def read_profile(name: str) -> str:
        with refusals_as(ResourceError):
            return get_profile(name, settings.profiles_file).model_dump_json(indent=1)

    return server


RAY_MISSING = (
    "Serving with --ray needs Ray Serve, which is not installed: install the extra with "
    "`pip install 'pictoprompt[ray]'`, or serve without --ray on one machine."
)


def check_ray_installed() -> None:
    """Refuse at once, before a server starts, when `--ray` is asked for without the extra."""
    if importlib.util.find_spec("ray") is None:
        raise PictopromptError(RAY_MISSING)


async def ray_jobs(settings: Settings) -> JobService:
    """The Ray Serve service (`pictoprompt.server.ray_serve`), or an error saying how to install it."""
    try:
        from pictoprompt.server.ray_serve import connect
    except ImportError as error:
        raise PictopromptError(f"{RAY_MISSING} ({error})") from error
    return await connect(settings)


@contextmanager
def refusals_as(kind: type[ToolError] | type[ResourceError]) -> Iterator[None]:
    """A `PictopromptError` raised inside, as the SDK's error of that kind with the same message. A missing asset
    or concept read as a resource is the client's `-32602` (not found); any other refusal is a `-32603`."""
    try:
        yield
    except PictopromptError as error:
        if kind is ResourceError and isinstance(error, NotFoundError):
            kind = ResourceNotFoundError
        raise kind(str(error)) from error


JobId = Annotated[str, Field(min_length=1, max_length=64, description="From a slow call.")]


class GetJobRequest(ToolRequest):
    job_id: JobId
    wait_seconds: WaitSeconds = 50.0
    inline: Inline = "thumbnail"


class CancelJobRequest(ToolRequest):
    job_id: JobId


class ServerStatusRequest(ToolRequest):
    pass


def job_tools(state_of: StateOf) -> list[WireTool]:
    """The server's own tools: wait for a job, cancel it, and the server's status."""

    async def get_job(request: GetJobRequest, ctx: Context) -> CallToolResult:
        state = state_of(ctx)
        with refusals_as(ToolError):
            job = await state.jobs.wait(request.job_id, request.wait_seconds)
        return job_result(job, state.assets, request.inline)

    async def cancel_job(request: CancelJobRequest, ctx: Context) -> CallToolResult:
        state = state_of(ctx)
        with refusals_as(ToolError):
            job, ending = await state.jobs.cancel(request.job_id)
        return text_result(CancelOutcome(job=job_info(job), cancelled=ending))

    async def server_status(request: ServerStatusRequest, ctx: Context) -> CallToolResult:
        state = state_of(ctx)
        jobs = await state.jobs.views()
        workers = await state.jobs.workers()
        # Every replica holds the same profile; the first one to report speaks for the models.
        models = workers[0] if workers else worker_status("none reported yet", state.runtime)
        status = ServerStatus(
            version=__version__,
            **models.model_dump(include=set(ModelsStatus.model_fields)),
            queue=QueueStatus(
                running=[job_info(job) for job in jobs if job.state == "running"],
                queued=sum(job.state == "queued" for job in jobs),
                depth=state.settings.queue_depth,
            ),
            asset_dir=str(state.assets.root),
            replicas=[worker.name for worker in workers if state.settings.ray],
        )
        return text_result(status)

    read_only = annotations_for(ToolHints(read_only=True, destructive=False, idempotent=True, open_world=False))
    stops = annotations_for(ToolHints(read_only=False, destructive=True, idempotent=True, open_world=False))
    return [
        WireTool(
            "get_job",
            "Wait for a job",
            "Wait up to wait_seconds for a slow call's job; returns its result when done.",
            GetJobRequest,
            JobLookup,
            read_only,
            get_job,
        ),
        WireTool(
            "cancel_job",
            "Cancel a job",
            "Stop a queued or running job; partial work is discarded.",
            CancelJobRequest,
            CancelOutcome,
            stops,
            cancel_job,
        ),
        WireTool(
            "server_status",
            "Server status",
            "Profile, device, loaded models, memory and job queue.",
            ServerStatusRequest,
            ServerStatus,
            read_only,
            server_status,
        ),
    ]
