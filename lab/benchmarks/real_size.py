"""Every tool once on real-size architectures: seconds, peak memory, and whether the outputs are sound.

The sets are seeded random-init copies of the real models (`lab.real_size`): SD 1.5 with CLIP
ViT-L/14, or SD 2.1 (v-prediction, 768 px) with OpenCLIP ViT-H/14, each with a Llama 3.2 1B- or 3B-shaped LLM on
the transformers backend. They are built once into the cache (`$PICTOPROMPT_REAL_SIZE_DIR`, default
~/.cache/pictoprompt/real-size; sd15 + llm-1b take 5.4 GB) and loaded through the same profile and loader code as
real weights. The pictures are noise; shapes, dtypes, speed and memory are those of the real models.

Each tool runs once through the tools layer, as the server calls it. A row says:
- seconds: wall time of the call (models already loaded; the CLIP vocabulary embedded beforehand);
- peak MB: the process's resident-set high-water mark during the call (reset before each call through
  /proc/self/clear_refs), or on CUDA `torch.cuda.max_memory_allocated` (reset likewise); added MB: that peak less
  what was held when the call began (the loaded models, mostly);
- outputs: the images have the requested size, the prompts are non-empty text;
- dtypes: every output of the U-Net, VAE, text encoders and CLIP towers was in the profile's dtype;
- finite: none of those outputs held a NaN or an infinity.

On the CPU (2 cores here, one torch thread):

    pictoprompt bench real_size --set sd15 --quick          # 128 px, 2 steps, VGD of 4 tokens
    pictoprompt bench real_size --set sd15 --quick --only generate "vary, 1 reference" "edit, sd-ipc" segment

Measured with --quick on this two-core machine: a whole run takes 12 minutes on sd15 (EDITOR, 2 iterations then
its fixed 25-step selection, 7 of them; fuse 2; customize 1.5) and 13 on sd21 (fuse and customize 5 each).
customize's neutral deep-prompt fit is 50 passes with gradients through the image tower at the profile's default,
an hour or more on one core and seconds on a GPU, so --quick fits in as many steps as it tunes. --only picks rows.

On a GPU it defaults to the native resolution (512 / 768 px) in float16 with 25 steps:

    pictoprompt bench real_size --set sd15 --llm 1b         # then --set sd21, and --llm 3b

`--resolution` sets the U-Net's default size (`sample_size`) after loading as well as the tools' width and
height, so the tools that have no size argument (EDITOR, fuse, distill, segment) run at it too; the weights do not
depend on it. EDITOR is refused on SD 2.x by design (its text encoder is not the CLIP's text tower); the row says
so.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel

from lab.benchmarks.harness import print_table
from lab.real_size import build_real_size_set, real_size_dir, real_size_profile
from pictoprompt.errors import PictopromptError
from pictoprompt.methods.vgd import runtime_vocabulary
from pictoprompt.models.concepts import ConceptStore
from pictoprompt.models.runtime import Runtime
from pictoprompt.progress import Progress
from pictoprompt.server.images import PreResolvedImages
from pictoprompt.tools import TOOLS
from pictoprompt.tools.base import SavedImage, ToolContext

START_WORDS = [
    *("red", "blue", "green", "yellow", "white", "black", "circle", "square", "triangle", "star", "dog", "cat"),
    *("house", "tree", "car", "river", "mountain", "city", "portrait", "painting", "photo", "sketch", "night"),
    *("snow", "beach", "forest", "flower", "bird", "horse", "boat", "street", "lake", "sunset"),
]
"""The start words VGD picks from in --quick runs: embedding the CLIP's whole 49,408-word vocabulary once takes
hours on a CPU core (seconds on a GPU, where the whole vocabulary is used)."""

LONG_PROMPT = "a large red circle in the center of a white picture, very detailed, sharp, beautiful, award winning"


def reference_pictures(size: int) -> dict[str, Image.Image]:
    """Three seeded noise pictures of `size` px: references whose content the random models cannot tell apart
    anyway, and whose size makes the CLIP's preprocessing resample like a real photo's would."""
    generator = np.random.default_rng(0)
    return {f"ref{i}": Image.fromarray(generator.integers(0, 256, (size, size, 3), dtype=np.uint8)) for i in range(3)}


class Sink:
    """Keeps the pictures a tool saved, to check them."""

    def __init__(self) -> None:
        self.images: list[Image.Image] = []

    def save(self, image: Image.Image, metadata: dict[str, str]) -> SavedImage:
        self.images.append(image.copy())
        return SavedImage(uri=f"bench://{len(self.images)}", path=f"/nowhere/{len(self.images)}.png")


class OutputWatch:
    """Forward hooks on the runtime's networks recording their output dtypes and any non-finite value."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.dtypes: dict[str, set[torch.dtype]] = {}
        self.non_finite: set[str] = set()
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def record(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            for tensor in _tensors(output):
                if tensor.is_floating_point():
                    self.dtypes.setdefault(name, set()).add(tensor.dtype)
                    if not bool(torch.isfinite(tensor.detach()).all()):
                        self.non_finite.add(name)

        return record

    def reset(self) -> None:
        self.dtypes.clear()
        self.non_finite.clear()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _tensors(output: Any) -> Iterator[torch.Tensor]:
    """The tensors of a module's output: a tensor, a tuple or list, or a transformers/diffusers output object."""
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors(item)
    elif hasattr(output, "values") and callable(output.values):
        for item in output.values():
            yield from _tensors(item)
    elif hasattr(output, "sample"):
        yield from _tensors(output.sample)


def watched_modules(runtime: Runtime) -> dict[str, torch.nn.Module]:
    """The networks whose outputs must be in the profile's dtype: generator parts and the CLIP's towers."""
    pipeline, clip = runtime.pipeline(), runtime.clip()
    modules = {"unet": pipeline.unet, "vae decoder": pipeline.vae.decoder, "text encoder": pipeline.text_encoder}
    model = clip.model  # type: ignore[attr-defined]
    if hasattr(model, "vision_model"):
        modules.update({"clip vision": model.vision_model, "clip text": model.text_model})
    else:
        modules.update({"clip vision": model.visual, "clip text": model.transformer})
    return modules


class PeakMemory:
    """Memory of one call: CUDA's allocator, or the process's resident set on the CPU (Linux's VmRSS and VmHWM).

    `reset` marks the start of a call; `peak_mb` is the highest use since, and `added_mb` what the call needed over
    what was held before it (the loaded models, mostly)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._before_mb = 0.0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            # Writing 5 resets VmHWM to the current resident set, so each call's own peak can be read.
            with suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")
        self._before_mb = self._current_mb()

    def _current_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return self._status_mb("VmRSS:")

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return self._status_mb("VmHWM:")

    def added_mb(self) -> float:
        return self.peak_mb() - self._before_mb

    @staticmethod
    def _status_mb(field: str) -> float:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        # Not Linux: the process's lifetime peak is all there is.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_result(result: BaseModel, images: list[Image.Image], side: int | None) -> str:
    """'ok', or what is wrong with a tool's result: image sizes, empty prompts."""
    problems = []
    for image in images:
        if side is not None and image.size != (side, side):
            problems.append(f"image {image.size} not {side}x{side}")
        if image.mode != "RGB":
            problems.append(f"image mode {image.mode}")
    payload = result.model_dump()
    for entry in payload.get("prompts", []) or []:
        if not str(entry.get("prompt", "")).strip():
            problems.append("empty prompt")
    for key in ("prompt", "distilled_prompt", "fused_prompt"):
        if key in payload and isinstance(payload[key], str) and not payload[key].strip():
            problems.append(f"empty {key}")
    return "ok" if not problems else "; ".join(dict.fromkeys(problems))


def tool_calls(settings: argparse.Namespace) -> list[tuple[str, str, dict[str, Any], bool]]:
    """(row label, tool name, arguments, makes pictures at the bench's side) for every tool."""
    steps, side, tokens = settings.steps, settings.resolution, settings.max_tokens
    render = {"num_images": 1, "steps": steps, "seed": 0}
    sized = {**render, "width": side, "height": side}
    editor = {"method": "editor", "iterations": settings.editor_iterations, "max_tokens": tokens, "num_results": 1}
    distill = {"prompt": LONG_PROMPT, "max_tokens": tokens, "generate_preview": True, "steps": steps, "seed": 0}
    tuning = {"name": "thing", "images": ["ref0", "ref1", "ref2"], "iterations": settings.tuning_iterations}
    calls = [
        ("generate", "generate_image", {"prompt": "a red circle on a blue background", **sized}, True),
        ("vary, 1 reference", "vary_image", {"images": ["ref0"], **sized}, True),
        ("vary, 3 references", "vary_image", {"images": ["ref0", "ref1", "ref2"], **sized}, True),
        ("edit, sd-ipc", "edit_with_text", {"image": "ref0", "text": "in the snow", "method": "sd-ipc", **sized}, True),
        ("invert, vgd", "invert_image", {"images": ["ref0"], "max_tokens": tokens, "num_results": 1}, False),
        ("invert, editor", "invert_image", {"images": ["ref0"], **editor}, True),
        ("fuse", "fuse_concepts", {"images": ["ref0", "ref1"], "max_tokens": tokens, **render}, True),
        ("distill", "distill_prompt", distill, True),
        ("customize", "customize_concept", {**tuning, "overwrite": True}, False),
        ("segment", "segment_image", {"image": "ref0", "prompt": "a red circle", "words": ["red", "circle"]}, False),
    ]
    if not settings.quick:
        # The rewrite edit writes the picture's prompt with VGD at its full 32 tokens (no argument shortens it):
        # 10 beams x 10 candidates x 77-token CLIP passes a step, about 20 minutes on one CPU core.
        rewrite = {"image": "ref0", "text": "in the snow", "method": "rewrite", **sized}
        calls.insert(4, ("edit, rewrite", "edit_with_text", rewrite, True))
    return calls


@contextmanager
def one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """The CPU run uses one torch thread, so figures compare across machines and a shared box stays usable."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pictoprompt bench real_size", description=__doc__)
    parser.add_argument("--set", dest="set_name", choices=["sd15", "sd21"], default="sd15")
    parser.add_argument("--llm", choices=["1b", "3b"], default="1b")
    parser.add_argument("--quick", action="store_true", help="CPU sizes: 128 px, 2 steps, a short VGD")
    parser.add_argument("--resolution", type=int, help="pixels (default: native; 128 with --quick)")
    parser.add_argument("--dtype", choices=["fp16", "fp32"], help="default: fp16 on CUDA, fp32 on the CPU")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--steps", type=int, help="denoising steps (default 25; 2 with --quick)")
    parser.add_argument("--only", nargs="*", help="row labels to run (default: all)")
    parser.add_argument("--cache-dir", type=Path, help="where the sets are built (default: the user's cache)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    settings = parser.parse_args(argv)
    settings.steps = settings.steps or (2 if settings.quick else 25)
    settings.max_tokens = 4 if settings.quick else 16
    settings.editor_iterations = 2 if settings.quick else 50
    settings.tuning_iterations = 2 if settings.quick else 30

    built = {}
    for name in (settings.set_name, f"llm-{settings.llm}"):
        began = time.perf_counter()
        directory = build_real_size_set(name, settings.cache_dir)
        record = json.loads((directory / "complete.json").read_text())
        built[name] = {"set": name, "build s (once)": record["build_seconds"], "GB on disk": record["bytes"] / 1e9}
        built[name]["ready s"] = round(time.perf_counter() - began, 1)
    print_table(f"Real-size sets in {real_size_dir(settings.cache_dir)}", list(built.values()))

    dtype = {"fp16": "float16", "fp32": "float32", None: "auto"}[settings.dtype]
    profile = real_size_profile(
        settings.set_name, settings.llm, dtype=dtype, device=settings.device, base=settings.cache_dir
    )
    with tempfile.TemporaryDirectory(prefix="pictoprompt-real-size-") as scratch:
        if settings.quick:
            words = Path(scratch) / "start-words.txt"
            words.write_text("\n".join(START_WORDS) + "\n")
            # customize's neutral deep-prompt fit is 50 passes with gradients through the image tower by default:
            # hours on one CPU core with ViT-L or ViT-H, so a quick run fits the prompts in as many steps as it
            # tunes.
            tuning = profile.concept_tuning.model_copy(update={"neutral_fit_steps": settings.tuning_iterations})
            profile = profile.model_copy(update={"vocabulary": str(words), "concept_tuning": tuning})
        runtime = Runtime(profile)
        with one_thread_on_cpu(runtime.device):
            rows = run_tools(runtime, settings, ConceptStore(Path(scratch) / "concepts"))
    title = (
        f"Every tool once on {settings.set_name} + Llama {settings.llm.upper()} ({runtime.device}, {runtime.dtype}, "
        f"{settings.resolution} px, {settings.steps} steps, VGD max_tokens {settings.max_tokens})"
    )
    print_table(title, rows)
    if settings.json:
        settings.json.write_text(json.dumps({"title": title, "sets": list(built.values()), "rows": rows}, indent=2))
    failed = [row["tool"] for row in rows if row["outputs"] not in {"ok", "refused (SD 2.x)"} or row["finite"] != "yes"]
    if failed:
        print(f"Problems in: {', '.join(failed)}")
    return 1 if failed else 0


def run_tools(runtime: Runtime, settings: argparse.Namespace, store: ConceptStore) -> list[dict[str, object]]:
    specs = {spec.name: spec for spec in TOOLS}
    memory = PeakMemory(runtime.device)
    rows: list[dict[str, object]] = []

    memory.reset()
    began = time.perf_counter()
    for component in ("generator", "clip", "llm"):
        runtime.preload({component})
    pipeline = runtime.pipeline()
    native = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    settings.resolution = settings.resolution or (128 if settings.quick else native)
    # The U-Net's sample_size is only its default size; the weights are the same at any size.
    pipeline.unet.register_to_config(sample_size=settings.resolution // pipeline.vae_scale_factor)
    runtime_vocabulary(runtime)
    rows.append(_row("load + start words", time.perf_counter() - began, memory, "ok", "", "yes"))

    watch = OutputWatch(watched_modules(runtime))
    pictures = reference_pictures(settings.resolution)
    try:
        for label, name, arguments, sized in tool_calls(settings):
            if settings.only and label not in settings.only:
                continue
            spec, sink = specs[name], Sink()
            context = ToolContext(runtime, sink, PreResolvedImages(pictures), Progress(), store)
            watch.reset()
            memory.reset()
            began = time.perf_counter()
            try:
                result = spec.run(spec.request_model(**arguments), context)
                outputs = check_result(result, sink.images, settings.resolution if sized else None)
            except PictopromptError as error:
                if "SD 2.x" not in str(error):
                    raise
                outputs = "refused (SD 2.x)"
            seconds = time.perf_counter() - began
            wrong_dtypes = sorted(
                name for name, dtypes in watch.dtypes.items() if any(d != runtime.dtype for d in dtypes)
            )
            dtypes = "ok" if not wrong_dtypes else "wrong: " + ", ".join(wrong_dtypes)
            finite = "yes" if not watch.non_finite else "NO: " + ", ".join(sorted(watch.non_finite))
            rows.append(_row(label, seconds, memory, outputs, dtypes, finite))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        watch.close()
    return rows


def _row(tool: str, seconds: float, memory: PeakMemory, outputs: str, dtypes: str, finite: str) -> dict[str, object]:
    return {
        "tool": tool,
        "seconds": round(seconds, 1),
        "peak MB": round(memory.peak_mb()),
        "added MB": round(memory.added_mb()),
        "outputs": outputs,
        "dtypes": dtypes,
        "finite": finite,
    }


if __name__ == "__main__":
    sys.exit(main())
