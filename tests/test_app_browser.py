"""The app view in a real browser: headless Chromium, a small MCP Apps host page, the real server on `shapes`.

The host (`tests/app_host.html`) speaks the spec's postMessage protocol and renders the view in a sandboxed frame
under the spec's default content security policy (no network). The view's `tools/call` and `resources/read` go
through a Playwright binding to an MCP client of the real server. The test looks at what a person sees: the
thumbnails and prompts, a word's mask when the pointer is on the word, new pictures after a click on "Vary", and
a console without errors. Screenshots go to `test-artifacts/app-view/` (gitignored; the paths are printed).

Run with `make test-browser` (installs the `browser` extra; needs Debian's `chromium`).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mcp import Client
from PIL import Image

from pictoprompt.models.profiles import get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.models.shapes import weights_present
from pictoprompt.models.shapes.scenes import Scene, SceneObject, render_scene
from pictoprompt.server.app import create_server
from pictoprompt.server.app_view import VIEW_URI
from pictoprompt.settings import Settings

pytestmark = [pytest.mark.anyio, pytest.mark.browser]

CHROMIUM = os.environ.get("PICTOPROMPT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOST_PAGE = Path(__file__).parent / "app_host.html"
ARTIFACTS = Path(os.environ.get("PICTOPROMPT_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts")) / "app-view"
TIMEOUT_MS = 240_000
"""A click runs the model on a shared CPU: generous, the pictures come far sooner on a quiet machine."""

SCENE = Scene("white", (SceneObject("circle", "red", "large", "left"), SceneObject("square", "blue", "large", "right")))
PROMPT = "a large solid red circle on the left and a large solid blue square on the right on a white background"
"""The scene's caption in the shapes world's words."""


def browser_or_skip() -> Any:
    """Playwright's async API, or a skip (a failure under `make test-browser`, which must run the test)."""
    required = os.environ.get("PICTOPROMPT_REQUIRE_BROWSER") == "1"
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("playwright is not installed (pip install -e '.[browser]')")
    if not Path(CHROMIUM).exists():
        if required:
            pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium")
        pytest.skip("Debian's chromium is not installed")
    return async_playwright


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wire(result: Any) -> dict[str, Any]:
    return result.model_dump(mode="json", by_alias=True, exclude_none=True)


def thumbnails(result: dict[str, Any]) -> dict[str, str]:
    """Each inline thumbnail as a data URI, by the URI of the resource link it stands beside."""
    links = [block["uri"] for block in result["content"] if block["type"] == "resource_link"]
    images = [block for block in result["content"] if block["type"] == "image"]
    return {uri: f"data:{block['mimeType']};base64,{block['data']}" for uri, block in zip(links, images, strict=False)}


async def shown_cards(view: Any) -> list[dict[str, Any]]:
    return await view.locator("article.card").evaluate_all(
        """cards => cards.map(card => {
            const img = card.querySelector('.frame img');
            return {
                uri: card.dataset.uri,
                src: img ? img.getAttribute('src') : null,
                loaded: Boolean(img && img.complete && img.naturalWidth > 0),
                text: card.innerText,
            };
        })"""
    )


async def wait_for_pictures(view: Any, count: int) -> list[dict[str, Any]]:
    await view.locator("article.card .frame img[src^='data:image/']").nth(count - 1).wait_for(timeout=TIMEOUT_MS)
    await view.locator("article.card .frame img").evaluate_all(
        "imgs => Promise.all(imgs.map(img => img.decode().catch(() => null)))"
    )
    return await shown_cards(view)


async def start(page: Any, html: str, name: str, arguments: dict[str, Any], result: dict[str, Any]) -> None:
    await page.evaluate(
        "([html, call]) => startView(html, call)", [html, {"name": name, "arguments": arguments, "result": result}]
    )
    await page.wait_for_function("() => window.viewInitialized === true", timeout=30_000)


async def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


@pytest.mark.skipif(not weights_present(), reason="shapes weights absent")
async def test_the_view_shows_results_masks_and_calls_tools_in_chromium(tmp_path: Path) -> None:
    async_playwright = browser_or_skip()
    settings = Settings(
        profile="shapes",
        asset_dir=tmp_path / "assets",
        cache_dir=tmp_path / "cache",
        data_dir=tmp_path / "data",
        allow_dirs=[tmp_path],
        allow_home=False,
    )
    server = create_server(settings, runtime=Runtime(get_profile("shapes")), preload=False)
    errors: list[str] = []
    reached: list[str] = []
    async with Client(server) as client, async_playwright() as playwright:
        html = (await client.read_resource(VIEW_URI)).contents[0].text

        async def forward(method: str, params: dict[str, Any]) -> dict[str, Any]:
            if method == "tools/call":
                return wire(await client.call_tool(params["name"], params.get("arguments") or {}))
            return wire(await client.read_resource(params["uri"]))

        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, chromium_sandbox=False)
        page = await browser.new_page(viewport={"width": 940, "height": 700})
        page.on("console", lambda message: message.type == "error" and errors.append(message.text))
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("request", lambda request: request.url.startswith(("data:", "about:")) or reached.append(request.url))
        await page.expose_function("forwardToServer", forward)
        await page.set_content(HOST_PAGE.read_text())
        view = page.frame_locator("#view")

        # A generate_image result: every picture with its thumbnail, prompt and seed.
        prompt = PROMPT
        arguments = {"prompt": prompt, "num_images": 2, "seed": 3, "steps": 10}
        generated = wire(await client.call_tool("generate_image", arguments))
        await start(page, html, "generate_image", arguments, generated)
        cards = await wait_for_pictures(view, 2)
        inline = thumbnails(generated)
        images = generated["structuredContent"]["result"]["images"]
        assert [card["uri"] for card in cards] == [image["uri"] for image in images]
        for card, image in zip(cards, images, strict=True):
            assert card["loaded"] and card["src"] == inline[image["uri"]], "the card shows the result's thumbnail"
            assert prompt in card["text"] and f"seed {image['seed']}" in card["text"]
        await screenshot(page, "1-generate")

        # A call that came back before its job ended (wait_seconds 0): the view follows it with get_job.
        arguments = {"prompt": prompt, "num_images": 1, "seed": 9, "steps": 10, "wait_seconds": 0}
        pending = wire(await client.call_tool("generate_image", arguments))
        assert pending["structuredContent"]["result"] is None, "the job was still running"
        await start(page, html, "generate_image", arguments, pending)
        (card,) = await wait_for_pictures(view, 1)
        waits = [entry for entry in await page.evaluate("hostLog") if entry["params"]["name"] == "get_job"]
        job_id = pending["structuredContent"]["job"]["job_id"]
        assert waits and all(entry["params"]["arguments"]["job_id"] == job_id for entry in waits)
        (image,) = waits[-1]["result"]["structuredContent"]["result"]["images"]
        assert card["uri"] == image["uri"] and card["loaded"] and "seed 9" in card["text"]

        # A vary_image result: thumbnails, seeds and similarities; then "Vary" on a card, through the host.
        arguments = {"images": [images[0]["uri"]], "num_images": 3, "seed": 11, "steps": 10}
        varied = wire(await client.call_tool("vary_image", arguments))
        await start(page, html, "vary_image", arguments, varied)
        cards = await wait_for_pictures(view, 3)
        inline = thumbnails(varied)
        images = varied["structuredContent"]["result"]["images"]
        for card, image in zip(cards, images, strict=True):
            assert card["uri"] == image["uri"] and card["loaded"] and card["src"] == inline[image["uri"]]
            assert f"seed {image['seed']}" in card["text"]
            assert f"similarity {image['image_similarity']:.3f}" in card["text"]
        await screenshot(page, "2-vary")
        await view.locator("article.card").nth(1).get_by_role("button", name="Vary").click()
        await page.wait_for_function(
            "() => hostLog.some(entry => entry.params.name === 'vary_image' && (entry.result || entry.error))",
            timeout=TIMEOUT_MS,
        )
        call = next(entry for entry in await page.evaluate("hostLog") if entry["params"].get("name") == "vary_image")
        assert call["method"] == "tools/call" and call["params"]["arguments"] == {"images": [images[1]["uri"]]}
        new_images = call["result"]["structuredContent"]["result"]["images"]
        assert len(new_images) == 4 and not {image["uri"] for image in new_images} & {image["uri"] for image in images}
        await view.locator(f"article.card[data-uri='{new_images[-1]['uri']}']").wait_for(timeout=30_000)
        cards = await wait_for_pictures(view, 4)
        assert [card["uri"] for card in cards] == [image["uri"] for image in new_images], "shown in place"
        assert all(card["loaded"] for card in cards)
        assert await view.get_by_role("button", name="Back").is_visible()
        # The assistant hears what the person did: the call and the new pictures' URIs.
        await page.wait_for_function("() => window.modelContext !== null", timeout=10_000)
        (told,) = (await page.evaluate("modelContext"))["content"]
        assert "vary_image" in told["text"] and all(image["uri"] in told["text"] for image in new_images)
        await screenshot(page, "3-vary-clicked")

        # A segment_image result: the prompt's words as chips; pointing at one lays its mask over the picture.
        picture = render_scene(SCENE)
        arguments = {"image": data_uri(picture), "prompt": prompt}
        segmented = wire(await client.call_tool("segment_image", arguments))
        said = segmented["structuredContent"]["result"]["words"]
        words = {word["word"]: word for word in said}
        assert words["circle"]["mask"] and words["square"]["mask"], "the shapes model places both shapes"
        await start(page, html, "segment_image", arguments, segmented)
        chips = view.locator("button.chip")
        await chips.first.wait_for(timeout=30_000)
        assert await chips.evaluate_all("chips => chips.map(chip => chip.dataset.word)") == [
            word["word"] for word in said
        ]
        assert prompt in await view.locator("main").inner_text()
        for name in ("circle", "square"):
            await view.locator(f"button.chip[data-word='{name}']").hover()
            await view.locator(f"figure[data-shown-word='{name}']").wait_for(timeout=30_000)
            shown = await view.locator("figure canvas").evaluate(
                """canvas => {
                    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
                    const inside = [], colours = new Set();
                    for (let i = 0; i < data.length; i += 4) {
                        inside.push(data[i + 3] === 120);
                        if (data[i + 3] === 120) colours.add([data[i], data[i + 1], data[i + 2]].join(','));
                    }
                    return {width: canvas.width, height: canvas.height, inside, colours: [...colours],
                            visible: !canvas.hidden};
                }"""
            )
            read = await client.read_resource(words[name]["mask"]["uri"])
            truth = np.asarray(Image.open(io.BytesIO(base64.b64decode(read.contents[0].blob)))) > 127
            painted = np.array(shown["inside"]).reshape(shown["height"], shown["width"])
            assert shown["visible"] and painted.shape == truth.shape
            assert (painted & truth).sum() / (painted | truth).sum() >= 0.9, f"the {name} mask is what is shown"
            # The canvas keeps its pixels premultiplied by their alpha: a channel reads back within 2 of what was put.
            expected = np.array([int(words[name]["colour"][i : i + 2], 16) for i in (1, 3, 5)])
            tints = np.array([[int(part) for part in tint.split(",")] for tint in shown["colours"]])
            assert np.abs(tints - expected).max() <= 2, "the mask is in its word's colour"
            if name == "circle":
                await screenshot(page, "4-segment-pointing")
        await view.locator("main .prompt").first.hover()  # off the words: the mask goes
        await view.locator("figure[data-shown-word='']").wait_for(timeout=10_000)
        assert await view.locator("figure canvas").is_hidden()
        await browser.close()
    assert errors == [], "the browser's console has errors"
    assert reached == [], "the view reached the network"
