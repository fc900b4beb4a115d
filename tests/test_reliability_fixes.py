"""What the schema fuzzing and the soak found, each pinned by a test: a non-ASCII image reference, a result whose
asset was trimmed from a full store, and a store that must keep under its size cap after every save."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mcp import Client
from PIL import Image

from pictoprompt.server.app import create_server
from pictoprompt.server.assets import AssetStore, asset_id_from_uri
from pictoprompt.server.images import _is_bare_base64

pytestmark = pytest.mark.anyio


def _noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8))


def test_the_size_cap_holds_after_every_save_not_every_50th(tmp_path: Path) -> None:
    store = AssetStore(tmp_path, expire_every_saves=1000)
    one = store.save(_noise(0), {})
    store.max_bytes = 3 * Path(one.path).stat().st_size + 100
    for seed in range(1, 12):
        store.save(_noise(seed), {})
        assert sum(path.stat().st_size for path in tmp_path.iterdir()) <= store.max_bytes
    assert len(list(tmp_path.iterdir())) == 3, "the three newest stay"


def test_a_non_ascii_reference_is_not_taken_for_base64() -> None:
    assert not _is_bare_base64("\xb6\xb6\xb6\xb6")
    assert not _is_bare_base64("ü")


async def test_a_non_ascii_image_reference_is_refused_in_words(settings, tiny_runtime) -> None:
    server = create_server(settings, runtime=tiny_runtime, preload=False)
    async with Client(server) as client:
        result = await client.call_tool("vary_image", {"images": ["\xb6picture"], "steps": 1, "num_images": 1})
    text = result.content[0].text
    assert result.is_error and "Error executing tool vary_image:" in text
    assert "outside the folders this server may read" in text and "URL" in text, text


async def test_a_result_whose_asset_was_trimmed_still_answers_with_its_link(settings, tiny_runtime) -> None:
    server = create_server(settings, runtime=tiny_runtime, preload=False)
    async with Client(server) as client:
        started = await client.call_tool(
            "generate_image", {"prompt": "a red circle", "steps": 1, "seed": 3, "wait_seconds": 0}
        )
        job_id = started.structured_content["job"]["job_id"]
        done = await client.call_tool("get_job", {"job_id": job_id, "wait_seconds": 120, "inline": "none"})
        path = Path(done.structured_content["result"]["images"][0]["path"])
        path.unlink()  # what a full store's trimming does to the oldest asset
        again = await client.call_tool("get_job", {"job_id": job_id, "inline": "full"})
    assert not again.is_error, again.content
    kinds = [block.type for block in again.content]
    assert "resource_link" in kinds and "image" not in kinds
    assert asset_id_from_uri(again.structured_content["result"]["images"][0]["uri"]) == path.stem


def test_huge_weights_are_scaled_so_similarities_stay_numbers() -> None:
    from pictoprompt.tools.vary_image import _relative

    assert _relative([1.5656031652386013e308, 1e308]) == [1.0, 1e308 / 1.5656031652386013e308]
    assert _relative([4.0, 0.0]) == [1.0, 0.0] and _relative(None) is None
