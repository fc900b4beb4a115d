"""The Ray front's own hops, without a Ray cluster: the front (`RayJobs`) against the board's real logic (`JobBoard`)
behind a stand-in for Ray's `.remote`, and a stand-in Serve handle whose response the test gives.

What a call costs through Ray beyond the model work is these hops (`lab/results/ray-front.md`): the front hands the job
to Serve without waiting for the board to record it, and answers from the replica's response without asking the board
again."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("ray", reason="the `ray` extra is not installed: pip install -e '.[ray]'")
from pictoprompt.server.images import PreResolvedImages
from pictoprompt.server.ray_serve import SPECS, JobBoard, RayJobs

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Actor:
    """A plain object behind Ray's `.remote` face: each call is counted, runs as a task, and waits first while its
    method is held."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.calls: list[str] = []
        self.held: dict[str, asyncio.Event] = {}

    def __getattr__(self, name: str) -> Any:
        actor = self

        class Method:
            def remote(self, *args: Any, **kwargs: Any) -> asyncio.Future:
                actor.calls.append(name)

                async def run() -> Any:
                    if name in actor.held:
                        await actor.held[name].wait()
                    return await getattr(actor.target, name)(*args, **kwargs)

                return asyncio.ensure_future(run())

        return Method()


class Handle:
    """A Serve handle whose one response the test gives."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []
        self.response: asyncio.Future = asyncio.get_running_loop().create_future()
        self.run = self

    def remote(self, *args: Any) -> asyncio.Future:
        self.sent.append(args)
        return self.response


async def submitted(jobs: RayJobs) -> str:
    spec = SPECS["generate_image"]

    async def no_images() -> PreResolvedImages:
        return PreResolvedImages({})

    return await jobs.submit(spec, spec.request_model(prompt="a red circle"), no_images)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_the_front_hands_the_job_to_serve_before_the_board_has_recorded_it():
    board, handle = Actor(JobBoard()), Handle()
    board.held["create"] = asyncio.Event()
    submitting = asyncio.create_task(submitted(RayJobs(handle, board, owns_ray=False)))
    await settle()
    assert len(handle.sent) == 1 and not submitting.done()
    job_id, tool = handle.sent[0][:2]

    # The replica starts the job before the front's record has reached the board: it records the job itself, and the
    # front's late record does not undo that.
    assert await board.target.start(job_id, tool, "replica-a") is True
    board.held["create"].set()
    assert await submitting == job_id
    record = await board.target.get(job_id)
    assert (record["state"], record["tool"], record["replica"]) == ("running", "generate_image", "replica-a")


async def test_the_front_answers_from_the_replicas_response_without_asking_the_board_again():
    board, handle = Actor(JobBoard()), Handle()
    jobs = RayJobs(handle, board, owns_ray=False)
    job_id = await submitted(jobs)
    await board.target.start(job_id, "generate_image", "replica-a")
    waiting = asyncio.create_task(jobs.wait(job_id, 30))
    await settle()
    assert board.calls == ["create", "get"] and not waiting.done()

    result = {"images": [{"path": "/tmp/a.png", "seed": 1}]}
    handle.response.set_result(await board.target.finish(job_id, "succeeded", result, [], None))
    view = await asyncio.wait_for(waiting, 10)
    assert (view.state, view.result, view.replica) == ("succeeded", result, "replica-a")
    assert board.calls == ["create", "get"]


async def test_a_job_the_replica_could_not_end_is_read_from_the_board():
    """A replica that died answers nothing: the front records the failure on the board and reads it from there."""
    from ray.exceptions import RayActorError

    board, handle = Actor(JobBoard()), Handle()
    jobs = RayJobs(handle, board, owns_ray=False)
    job_id = await submitted(jobs)
    await board.target.start(job_id, "generate_image", "replica-a")
    waiting = asyncio.create_task(jobs.wait(job_id, 30))
    await settle()
    handle.response.set_exception(RayActorError())
    view = await asyncio.wait_for(waiting, 10)
    assert view.state == "failed" and "replica running this job stopped" in (view.error or "")


async def test_the_board_keeps_the_first_word_and_answers_the_ended_record():
    board = JobBoard()
    await board.create("a", "generate_image")
    assert await board.start("a", "generate_image", "replica-a") is True
    first = await board.finish("a", "succeeded", {"images": []}, [], None)
    again = await board.finish("a", "failed", error="the front's late word")
    assert first is not None and again == first and first["state"] == "succeeded" and first["error"] is None

    await board.create("b", "generate_image")
    await board.cancel("b")
    assert await board.start("b", "generate_image", "replica-a") is False
    assert await board.finish("unknown", "succeeded") is None
