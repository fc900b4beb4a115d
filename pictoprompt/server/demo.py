"""`pictoprompt demo`: the server as an assistant sees it, through a real MCP client over stdio: every tool called
on sample inputs, a table of calls, timings and results, and the images with an `index.html` contact sheet.
"""

from __future__ import annotations

import base64
import html
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from PIL import Image

from pictoprompt.errors import PictopromptError

LONG_PROMPT = (
    "a highly detailed, beautiful, award winning, trending, masterpiece picture of a large red circle in the "
    "top left corner on a white background, very sharp, 4k, intricate, professional lighting"
)


@dataclass
class Call:
    tool: str
    arguments: dict[str, Any]
    seconds: float = 0.0
    ok: bool = False
    summary: str = ""
    images: list[Path] = field(default_factory=list)


CONCEPT_DESCRIPTION = {"shapes": "an orange heart"}
"""The words the demo's concept is taught with, per profile; the photos' concept is the cat."""


def sample_inputs(folder: Path, profile: str) -> list[Path]:
    """Pictures to work on: `shapes` scenes on the bundled set, scikit-image's sample photos otherwise (the
    `demo` extra: real models deserve real photos, and the package ships none). The last three, `concept-*`,
    show one thing three ways, the concept the demo teaches."""
    folder.mkdir(parents=True, exist_ok=True)
    images: list[tuple[str, Image.Image]] = []
    if profile == "shapes":
        from pictoprompt.models.shapes.scenes import Scene, SceneObject, render_scene

        scenes = {
            "red-circle": Scene("white", (SceneObject("circle", "red", "large", "center"),)),
            "blue-star": Scene("white", (SceneObject("star", "blue", "large", "left"),)),
            "striped-green-square": Scene("black", (SceneObject("square", "green", "large", "center", "striped"),)),
            "yellow-heart": Scene("gray", (SceneObject("heart", "yellow", "large", "top right"),)),
            "concept-1": Scene("white", (SceneObject("heart", "orange", "small", "top left", "outlined"),)),
            "concept-2": Scene("gray", (SceneObject("heart", "orange", "large", "right", "outlined"),)),
            "concept-3": Scene("pink", (SceneObject("heart", "orange", "small", "bottom", "outlined"),)),
        }
        images = [(name, render_scene(scene)) for name, scene in scenes.items()]
    else:
        try:
            from skimage import data
        except ImportError as error:
            raise PictopromptError(
                f"The demo on profile '{profile}' works on scikit-image's sample photos: install them with "
                "`pip install 'pictoprompt[demo]'`, or run the demo on the bundled set with --profile shapes."
            ) from error
        images = [(name, Image.fromarray(getattr(data, name)())) for name in ("astronaut", "chelsea", "coffee")]
        cat = Image.fromarray(data.chelsea())
        width, height = cat.size
        images += [
            ("concept-1", cat),
            ("concept-2", cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
            ("concept-3", cat.crop((width // 8, 0, width, height))),
        ]
    paths = []
    for name, image in images:
        path = folder / f"{name}.png"
        image.convert("RGB").save(path)
        paths.append(path)
    return paths


def planned_calls(inputs: list[Path], available: set[str], profile: str = "shapes") -> list[Call]:
    concept = [str(path) for path in inputs if path.stem.startswith("concept-")]
    inputs = [path for path in inputs if not path.stem.startswith("concept-")]
    first, second, third = str(inputs[0]), str(inputs[1 % len(inputs)]), str(inputs[2 % len(inputs)])
    teach = {"name": "demo-concept", "images": concept, "description": CONCEPT_DESCRIPTION.get(profile, "a cat")}
    plan = [
        Call("server_status", {}),
        Call("generate_image", {"prompt": "a red circle on a white background", "num_images": 4, "seed": 1}),
        Call("invert_image", {"images": [first], "num_results": 3}),
        # EDITOR, short: 50 of its iterations show the method without making the demo wait minutes.
        Call("invert_image", {"images": [first], "method": "editor", "iterations": 50, "num_results": 2}),
        Call("invert_image", {"images": [third], "focus": "style", "num_results": 2}),
        # Without a prompt: VGD describes the picture, then each word of its prompt gets a mask.
        Call("segment_image", {"image": first}),
        Call("vary_image", {"images": [first], "num_images": 4, "seed": 2}),
        Call("edit_with_text", {"image": first, "text": "blue", "num_images": 4, "seed": 3}),
        Call("fuse_concepts", {"images": [first, second], "num_images": 2, "seed": 4}),
        Call("distill_prompt", {"prompt": LONG_PROMPT, "generate_preview": True}),
        Call("customize_concept", {**teach, "overwrite": True}),
        Call("list_concepts", {}),
        Call(
            "generate_image",
            {"prompt": "demo-concept on a black background", "concept": "demo-concept", "num_images": 4, "seed": 5},
        ),
        Call(
            "edit_with_text",
            {
                "image": "concept:demo-concept",
                "text": "on the left",
                "concept": "demo-concept",
                "num_images": 4,
                "seed": 6,
            },
        ),
        Call("delete_concept", {"name": "demo-concept"}),
    ]
    calls = [call for call in plan if call.tool in available]
    if "customize_concept" not in available:  # no concept to generate or edit with
        calls = [call for call in calls if "concept" not in call.arguments]
    return calls


def _summarise(structured: dict[str, Any] | None, text: str) -> str:
    if not structured:
        return text[:100]
    result = structured.get("result", structured)
    if isinstance(result, dict):
        note = f" [{result['llm_note']}]" if result.get("llm_note") else ""
        if result.get("prompts"):
            # Every prompt an inversion returns, best first: these are what a person would paste.
            shown = [p.get("apply_style_as") or p["prompt"] for p in result["prompts"]]
            start = f" (start word {result['initial_condition']!r})" if result.get("initial_condition") else ""
            return "prompts: " + " | ".join(json.dumps(text) for text in shown) + start + note
        if result.get("edited_prompt"):
            edit = f"{json.dumps(result['source_prompt'])} -> {json.dumps(result['edited_prompt'])}"
            return f"prompt: {edit}, {len(result.get('images', []))} images{note}"
        if isinstance(result.get("prompt"), str):
            return f"prompt: {json.dumps(result['prompt'])}{note}"
        for key in ("distilled", "concepts", "card"):
            if key in result:
                value = result[key]
                if isinstance(value, list) and value and isinstance(value[0], dict):
                    value = value[0].get("prompt", value[0].get("name", value[0]))
                return f"{key}: {json.dumps(value)[:100]}"
        if "images" in result:
            return f"{len(result['images'])} images"
        return json.dumps(result)[:100]
    return json.dumps(structured)[:100]


async def run_calls(output: Path, profile: str | None) -> tuple[list[str], list[Call]]:
    inputs = sample_inputs(output / "inputs", profile or _default_profile())
    environment = {
        **os.environ,
        "PICTOPROMPT_ASSET_DIR": str(output / "assets"),
        "PICTOPROMPT_DATA_DIR": str(output / "data"),
        "PICTOPROMPT_ALLOW_DIRS": json.dumps([str(output.resolve())]),
    }
    arguments = ["-m", "pictoprompt.cli", "serve"] + (["--profile", profile] if profile else [])
    parameters = StdioServerParameters(command=sys.executable, args=arguments, env=environment)
    async with Client(parameters, read_timeout_seconds=900) as client:
        tools = sorted(tool.name for tool in (await client.list_tools()).tools)
        calls = planned_calls(inputs, set(tools), profile or _default_profile())
        for call in calls:
            started = time.perf_counter()
            result = await client.call_tool(call.tool, call.arguments)
            while not result.is_error and (result.structured_content or {}).get("result", True) is None:
                # The work outlasted wait_seconds: wait on its job as an assistant would.
                job_id = result.structured_content["job"]["job_id"]
                result = await client.call_tool("get_job", {"job_id": job_id, "wait_seconds": 120})
            call.seconds = time.perf_counter() - started
            call.ok = not result.is_error
            text = next((block.text for block in result.content if block.type == "text"), "")
            call.summary = _summarise(result.structured_content, text) if call.ok else text[:160]
            for block in result.content:
                if block.type == "resource_link":
                    read = await client.read_resource(block.uri)
                    path = output / f"{len(list(output.glob('*.png'))):03d}-{call.tool}.png"
                    path.write_bytes(base64.b64decode(read.contents[0].blob))
                    call.images.append(path)
    return tools, calls


def _default_profile() -> str:
    from pictoprompt.models.profiles import default_profile_name

    return default_profile_name()


def write_contact_sheet(output: Path, calls: list[Call]) -> Path:
    rows = []
    for call in calls:
        pictures = "".join(f'<img src="{html.escape(p.name)}" width="128">' for p in call.images)
        arguments = html.escape(json.dumps(call.arguments)[:300])
        rows.append(
            f"<tr><td><b>{call.tool}</b><br><small>{arguments}</small></td><td>{call.seconds:.2f} s</td>"
            f"<td>{'ok' if call.ok else 'error'}: {html.escape(call.summary)}</td><td>{pictures}</td></tr>"
        )
    inputs = "".join(f'<img src="inputs/{p.name}" width="128">' for p in sorted((output / "inputs").glob("*.png")))
    page = (
        "<!doctype html><meta charset=utf-8><title>pictoprompt demo</title>"
        "<style>body{font-family:sans-serif}td{border-top:1px solid #ccc;padding:6px;vertical-align:top}"
        "img{image-rendering:pixelated;margin:2px}</style>"
        f"<h1>pictoprompt demo</h1><p>Inputs:</p>{inputs}<table>{''.join(rows)}</table>"
    )
    path = output / "index.html"
    path.write_text(page)
    return path


def fresh_folder(requested: Path) -> Path:
    """`requested` if it is missing or empty, else the first missing `requested-2`, `-3`, ...: a demo never
    deletes or overwrites an earlier run's pictures (nor a folder that was never a demo's)."""
    candidate, run = requested, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            if candidate.is_dir() and not any(candidate.iterdir()):
                return candidate
        run += 1
        candidate = requested.with_name(f"{requested.name}-{run}")


def run_demo(output: Path, profile: str | None = None) -> int:
    output = fresh_folder(output)
    tools, calls = anyio.run(run_calls, output, profile)
    print(f"Tools offered by the server: {', '.join(tools)}\n")
    print(f"{'tool':20} {'seconds':>8}  {'ok':3} result")
    for call in calls:
        print(f"{call.tool:20} {call.seconds:8.2f}  {'ok' if call.ok else 'ERR':3} {call.summary}")
    sheet = write_contact_sheet(output, calls)
    print(f"\nImages and contact sheet: {sheet}")
    return 0 if all(call.ok for call in calls) else 1
