"""Sampling several calls in one U-Net batch (`generate_batch`, what a Ray Serve replica's batching runs): each call's
pictures equal what it gets alone for the same seeds, its progress is its own, and a cancelled call leaves the batch
while the others go on. On the tiny profile, no Ray needed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pictoprompt.methods.generation import Sample, encode_text_prompt, generate, generate_batch
from pictoprompt.models.runtime import Runtime
from pictoprompt.progress import Progress

STEPS, SIDE = 6, 32
PIXEL_TOLERANCE = 2
"""Largest difference of one 8-bit channel between a batched and a lone picture: a batch sums the same products in
another order, a rounding difference that can move a value across an 8-bit step."""


def sample(runtime: Runtime, prompt: str, seeds: list[int], guidance: float = 7.5, progress: Progress | None = None):
    positive, negative = encode_text_prompt(runtime.pipeline(), prompt)
    return Sample(positive, negative, seeds, guidance, progress or Progress())


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def assert_same_pictures(batched: list[Image.Image], alone: list[Image.Image]) -> None:
    assert len(batched) == len(alone)
    difference = np.abs(pixels(batched) - pixels(alone))
    assert difference.max() <= PIXEL_TOLERANCE, difference.max()
    assert difference.mean() < 0.05


def test_each_call_in_a_batch_gets_the_pictures_it_gets_alone(tiny_runtime: Runtime):
    pipeline = tiny_runtime.pipeline()
    calls = [
        sample(tiny_runtime, "a red circle", [3, 4]),
        sample(tiny_runtime, "a blue square on the left", [11]),
        sample(tiny_runtime, "a green star", [3], guidance=4.0),
    ]
    batched = generate_batch(pipeline, calls, STEPS, SIDE, SIDE)
    for call, pictures in zip(calls, batched, strict=True):
        assert pictures is not None
        assert_same_pictures(pictures, generate(pipeline, call, STEPS, SIDE, SIDE))
    # The same seed under two prompts gives two pictures: the rows did not mix.
    assert np.abs(pixels(batched[0][:1]) - pixels(batched[2])).max() > 10


def test_unguided_calls_batch_too_but_never_with_guided_ones(tiny_runtime: Runtime):
    pipeline = tiny_runtime.pipeline()
    calls = [sample(tiny_runtime, "a red circle", [5], guidance=1.0), sample(tiny_runtime, "a star", [6], guidance=0.5)]
    batched = generate_batch(pipeline, calls, STEPS, SIDE, SIDE)
    for call, pictures in zip(calls, batched, strict=True):
        assert_same_pictures(pictures, generate(pipeline, call, STEPS, SIDE, SIDE))
    with pytest.raises(ValueError, match="guided and unguided"):
        generate_batch(pipeline, [calls[0], sample(tiny_runtime, "x", [1])], STEPS, SIDE, SIDE)


def test_progress_is_per_call_and_a_cancelled_call_leaves_the_batch(tiny_runtime: Runtime):
    pipeline = tiny_runtime.pipeline()
    heard: dict[str, list[tuple[float, str]]] = {"stays": [], "leaves": []}

    def listener(name: str):
        def report(done: float, total: float | None, message: str | None) -> None:
            assert total == STEPS
            heard[name].append((done, message or ""))
            if name == "leaves" and done == 2:
                leaving.cancel()

        return report

    leaving = Progress(listener("leaves"))
    stays = sample(tiny_runtime, "a red circle", [7, 8], progress=Progress(listener("stays")))
    leaves = sample(tiny_runtime, "a blue square", [9], progress=leaving)
    batched = generate_batch(pipeline, [stays, leaves], STEPS, SIDE, SIDE)

    assert batched[1] is None
    assert [done for done, _ in heard["leaves"]] == [1, 2]
    assert [done for done, _ in heard["stays"]] == list(range(1, STEPS + 1))
    # While both ran the messages said so; after the other left, this call ran alone.
    assert "in a batch of 2 calls" in heard["stays"][1][1] and "batch" not in heard["stays"][-1][1]
    assert_same_pictures(batched[0], generate(pipeline, stays, STEPS, SIDE, SIDE))


def test_a_call_cancelled_before_the_batch_starts_takes_no_part(tiny_runtime: Runtime):
    pipeline = tiny_runtime.pipeline()
    cancelled = Progress()
    cancelled.cancel()
    calls = [sample(tiny_runtime, "a star", [1], progress=cancelled), sample(tiny_runtime, "a circle", [2])]
    batched = generate_batch(pipeline, calls, STEPS, SIDE, SIDE)
    assert batched[0] is None
    assert_same_pictures(batched[1], generate(pipeline, calls[1], STEPS, SIDE, SIDE))


def test_every_call_cancelled_ends_the_batch_with_no_pictures(tiny_runtime: Runtime):
    heard: list[tuple] = []
    progress = Progress(lambda *report: heard.append(report))
    progress.cancel()
    call = sample(tiny_runtime, "a", [1], progress=progress)
    assert generate_batch(tiny_runtime.pipeline(), [call], 3, 32, 32) == [None]
    assert heard == []
