"""`pictoprompt`: serve the MCP server, run any tool from the shell, manage models, run the demo and benchmarks."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from PIL import Image, PngImagePlugin
from pydantic import BaseModel

from pictoprompt.errors import PictopromptError

if TYPE_CHECKING:
    from pictoprompt.models.concepts import ConceptStore
    from pictoprompt.models.runtime import Runtime
    from pictoprompt.progress import Progress

# The shell names of the tools; every tool in the registry gets a command generated from its request model.
CLI_NAMES = {
    "generate_image": "generate",
    "vary_image": "vary",
    "edit_with_text": "edit",
    "invert_image": "invert",
    "fuse_concepts": "fuse",
    "distill_prompt": "distill",
    "segment_image": "segment",
    "customize_concept": "customize",
    "list_concepts": "concepts",
    "delete_concept": "delete-concept",
}


class DirectorySink:
    """Saves a tool's output images as numbered PNGs (with their metadata text chunks) in a folder, never over an
    earlier result: a run whose names are taken gets its own `-runN` suffix, the same for all of its images."""

    def __init__(self, directory: Path, stem: str) -> None:
        self.directory = directory
        self.stem = stem
        self.count = 0
        self.run = 1

    def save(self, image: Image.Image, metadata: dict[str, str]) -> Any:
        from pictoprompt.tools.base import SavedImage

        self.directory.mkdir(parents=True, exist_ok=True)
        info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_text(key, value)
        self.count += 1
        # A random temporary name (made with the user's umask, unlike mkstemp's 0600): two runs at once never
        # write into each other's file.
        temporary = self.directory / f".{self.stem}-{secrets.token_hex(8)}.png.part"
        try:
            with temporary.open("xb") as file:
                image.save(file, format="PNG", pnginfo=info)
            path = self._claim(temporary, metadata.get("seed", "x"))
        finally:
            temporary.unlink(missing_ok=True)
        return SavedImage(uri=path.resolve().as_uri(), path=str(path))

    def _claim(self, temporary: Path, seed: str) -> Path:
        """Link the written file under the first free name of this run's; a hard link fails rather than replace
        a file, so two runs at once cannot take the same name either."""
        while True:
            suffix = "" if self.run == 1 else f"-run{self.run}"
            path = self.directory / f"{self.stem}-{self.count:02d}-seed{seed}{suffix}.png"
            try:
                os.link(temporary, path)
                return path
            except FileExistsError:
                self.run += 1


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of `X | None`."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [arg for arg in get_args(annotation) if arg is not type(None)]
        return inner[0], len(inner) < len(get_args(annotation))
    return annotation, False


def add_tool_arguments(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """Options from a request model's fields: required fields positional, the rest `--flags`."""
    for name, field in model.model_fields.items():
        annotation, _ = _unwrap(field.annotation)
        # argparse formats help with %: a description's "30%" must reach it as "30%%".
        option: dict[str, Any] = {"help": (field.description or "").replace("%", "%%")}
        is_list = get_origin(annotation) is list
        if is_list:
            annotation = get_args(annotation)[0]
            option["nargs"] = "+"
        if get_origin(annotation) is Literal:
            option["choices"] = list(get_args(annotation))
        elif annotation is bool:
            option["action"] = argparse.BooleanOptionalAction
        elif annotation in (int, float):
            option["type"] = annotation
        if field.is_required():
            parser.add_argument(name, **option)
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=field.default, **option)


def run_locally(args: argparse.Namespace, work: Callable[[Runtime, ConceptStore, Progress], BaseModel]) -> int:
    """Run `work` on this process's runtime for `--profile`, its progress as a bar on stderr; print its result."""
    from pictoprompt.models.concepts import ConceptStore
    from pictoprompt.models.profiles import get_profile
    from pictoprompt.models.runtime import Runtime
    from pictoprompt.progress import Progress
    from pictoprompt.settings import Settings

    settings = Settings()
    runtime = Runtime(get_profile(args.profile, args.profiles_file), settings.cache_dir)
    bar = _ProgressBar()
    with runtime.gpu_lock:
        result = work(runtime, ConceptStore(settings.data_dir / "concepts"), Progress(bar.update))
    bar.close()
    print(json.dumps(result.model_dump(mode="json"), indent=2))
    return 0


def run_tool_command(args: argparse.Namespace) -> int:
    from pictoprompt.server.images import ImagePolicy, ImageResolver
    from pictoprompt.tools.base import ToolContext

    spec = args.spec
    fields = {name: getattr(args, name) for name in spec.request_model.model_fields}
    request = spec.request_model(**{k: v for k, v in fields.items() if v is not None})
    resolver = ImageResolver(ImagePolicy(allowed_roots=[Path("/")], allow_private_urls=True), None)
    sink = DirectorySink(Path(args.output), spec.name)

    def run(runtime: Runtime, concepts: ConceptStore, progress: Progress) -> BaseModel:
        return spec.run(request, ToolContext(runtime, sink, resolver, progress, concepts))

    return run_locally(args, run)


class _ProgressBar:
    """A tqdm bar on stderr, created on the first report."""

    def __init__(self) -> None:
        self.bar: Any = None

    def update(self, done: float, total: float | None, message: str | None) -> None:
        from tqdm import tqdm

        if self.bar is None or (total is not None and self.bar.total != total):
            self.close()
            self.bar = tqdm(total=total, file=sys.stderr, leave=False)
        self.bar.n = done
        if message:
            self.bar.set_description(message[:60])
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_serve(args: argparse.Namespace) -> int:
    from pictoprompt.server.serve import serve

    serve(_settings(args), http=args.http, host=args.host, port=args.port)
    return 0


def cmd_tools(args: argparse.Namespace) -> int:
    from pictoprompt.tools import TOOLS

    if args.write_readme:
        docs = import_lab("lab.docs", "`pictoprompt tools --write-readme`")
        print(f"refreshed {args.write_readme} and {docs.write_readme_section(args.write_readme)}")
    elif args.markdown:
        print(import_lab("lab.docs", "`pictoprompt tools --markdown`").tools_document(), end="")
    else:
        for spec in TOOLS:
            print(f"{spec.name:20} {CLI_NAMES.get(spec.name, ''):16} {spec.title}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from pictoprompt.models.check import check_profiles, list_profiles

    if args.action == "list":
        print(list_profiles(args.profiles_file))
        return 0
    if args.action == "check":
        report, ok = check_profiles(args.profile, args.profiles_file)
        print(report)
        return 0 if ok else 1
    return import_lab("lab.shapes.train", "`models train-shapes`").main(args.rest) or 0


def cmd_train_domain(args: argparse.Namespace) -> int:
    from pictoprompt.tools.customize_concept import domain_tuning_config, train_domain_adapter

    def train(runtime: Runtime, store: ConceptStore, progress: Progress) -> BaseModel:
        config = domain_tuning_config(
            runtime.profile.domain_tuning,
            iterations=args.iterations,
            learning_rate=args.learning_rate,
            caption_alignment=args.caption_alignment,
            prompt_learning_rate=args.prompt_learning_rate,
        )
        training_set = (args.images, args.captions)
        return train_domain_adapter(runtime, store, args.name, training_set, config, args.overwrite, progress)

    return run_locally(args, train)


def cmd_demo(args: argparse.Namespace) -> int:
    from pictoprompt.server.demo import run_demo

    return run_demo(Path(args.output), profile=args.profile)


LAB_HINT = (
    "the laboratory (`lab/`: the shapes set's training, its oracle and the benchmarks) ships with a source "
    "checkout, not with the installed package: in a checkout, `pip install -e ./lab` (`make install` does it)."
)


def import_lab(module: str, command: str) -> Any:
    """`module` of the laboratory, which only a checkout's development install provides."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or not (error.name == "lab" or error.name.startswith("lab.")):
            raise PictopromptError(
                f"{command} needs the module '{error.name}', which is not installed: install the lab's "
                "dependencies with `pip install -e ./lab` in the checkout."
            ) from error
        raise PictopromptError(f"{command} needs {LAB_HINT}") from error


def cmd_bench(args: argparse.Namespace) -> int:
    directory = Path(import_lab("lab.benchmarks", "`pictoprompt bench`").__file__).parent
    if not (directory / f"{args.name}.py").is_file() or args.name.startswith("_"):
        available = sorted(p.stem for p in directory.glob("*.py") if not p.stem.startswith("_"))
        raise PictopromptError(f"No benchmark '{args.name}' in {directory}; available: {', '.join(available)}.")
    return import_lab(f"lab.benchmarks.{args.name}", f"Benchmark '{args.name}'").main(args.rest) or 0


def _settings(args: argparse.Namespace) -> Any:
    from pictoprompt.settings import Settings

    overrides: dict[str, Any] = {}
    for key in ("profile", "profiles_file", "asset_dir"):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    if getattr(args, "allow_dir", None):
        overrides["allow_dirs"] = [Path(p).expanduser().resolve() for p in args.allow_dir]
    if getattr(args, "allow_private_urls", False):
        overrides["allow_private_urls"] = True
    if getattr(args, "ray", None) is not None:
        overrides["ray"] = True
        if args.ray:
            overrides["ray_address"] = args.ray
    return Settings(**overrides)


def build_parser() -> argparse.ArgumentParser:
    from pictoprompt.tools import TOOLS

    parser = argparse.ArgumentParser(prog="pictoprompt", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="Log debug details to stderr.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--profile", help="Model profile (default: shapes, the bundled set).")
    common.add_argument("--profiles-file", type=Path, help="TOML file with extra [profiles.NAME] tables.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", parents=[common], help="Run the MCP server (stdio by default).")
    serve.add_argument("--http", action="store_true", help="Serve streamable HTTP instead of stdio.")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP bind address (non-loopback needs a token).")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--allow-dir", action="append", help="Let tools read local images under this folder.")
    serve.add_argument("--allow-private-urls", action="store_true", help="Allow URLs on private networks.")
    serve.add_argument("--asset-dir", type=Path, help="Where output images are stored.")
    serve.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="Run the models on Ray Serve replicas: on the Ray cluster at ADDRESS, or a local Ray without it "
        "(needs `pip install 'pictoprompt[ray]'`; PICTOPROMPT_RAY_* settings set the replicas).",
    )
    serve.set_defaults(handler=cmd_serve)

    for spec in TOOLS:
        name = CLI_NAMES.get(spec.name, spec.name.replace("_", "-"))
        sub = commands.add_parser(name, parents=[common], help=spec.title, description=spec.description)
        add_tool_arguments(sub, spec.request_model)
        sub.add_argument(
            "-o",
            "--output",
            default="pictoprompt-output",
            help="Folder for output images; a run never replaces an earlier one's (taken names get -runN).",
        )
        sub.set_defaults(handler=run_tool_command, spec=spec)

    tools = commands.add_parser("tools", help="List the MCP tools (--markdown: the full reference, docs/TOOLS.md).")
    tools.add_argument("--markdown", action="store_true", help="Print the full tool reference (docs/TOOLS.md).")
    tools.add_argument(
        "--write-readme",
        type=Path,
        metavar="README",
        help="Refresh that README's tool table and the full reference in docs/TOOLS.md beside it.",
    )
    tools.set_defaults(handler=cmd_tools)

    models = commands.add_parser("models", help="Profiles and weights: list, check, train-shapes.")
    model_actions = models.add_subparsers(dest="action", required=True)
    model_actions.add_parser("list", parents=[common], help="What each profile is made of.")
    model_actions.add_parser("check", parents=[common], help="Whether each profile's weights are present.")
    train = model_actions.add_parser("train-shapes", help="Retrain the bundled shapes set (see its -h).")
    train.add_argument("rest", nargs=argparse.REMAINDER, help="Options passed to the trainer.")
    models.set_defaults(handler=cmd_models)

    domain = commands.add_parser(
        "train-domain", parents=[common], help="SD-IPC-FT: adapt the image encoder and K/V to a captioned domain."
    )
    domain.add_argument("--images", type=Path, required=True, help="Folder of ~100 training images.")
    domain.add_argument("--captions", type=Path, required=True, help="Captions file (see README).")
    domain.add_argument("--name", required=True, help="Name to store the adapter under (use as concept=NAME).")
    domain.add_argument("--iterations", type=int, default=None, help="Steps of batch 4; default: the profile's.")
    domain.add_argument(
        "--learning-rate", type=float, default=None, help="K/V deltas' rate; default: the profile's (paper: 1e-5)."
    )
    domain.add_argument(
        "--caption-alignment",
        type=float,
        default=None,
        help="Weight of the loss pulling each image's converted prompt towards its own caption (not in the paper; "
        "0 = the paper's loss; default: the profile's). Captions should name what the adapter must keep.",
    )
    domain.add_argument(
        "--prompt-learning-rate",
        type=float,
        default=None,
        help="The image encoder's deep prompts' rate; default: the profile's (paper: --learning-rate).",
    )
    domain.add_argument("--overwrite", action="store_true")
    domain.set_defaults(handler=cmd_train_domain)

    demo = commands.add_parser("demo", parents=[common], help="Run every tool through a real MCP client.")
    demo.add_argument(
        "-o", "--output", default="demo-output", help="Folder for the run; a new DIR-2, DIR-3... if it is not empty."
    )
    demo.set_defaults(handler=cmd_demo)

    bench = commands.add_parser("bench", help="Run a benchmark of the lab (lab/benchmarks/) and print its tables.")
    bench.add_argument("name")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(handler=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except PictopromptError as error:
        print(f"pictoprompt: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
