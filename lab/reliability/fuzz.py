"""Schema fuzzing: every tool called with arguments generated from the `inputSchema` the server publishes.

    python -m lab.reliability.fuzz --calls 5000 --transport stdio http --json lab/results/fuzz.json

Arguments come from `hypothesis` (with `hypothesis-jsonschema` for the valid ones) in three kinds:

- valid and cheap: the published schema with the costly knobs capped (steps, images, sizes, iterations...), image
  fields drawn from real references (files, data URIs, earlier results' asset URIs, `concept:NAME`), names from
  the concepts learned so far; these run to their end, so their results are checked against `outputSchema`;
- valid at full range: the published schema as it is, waited on for a moment, then cancelled (the queue and
  cancellation under any arguments);
- invalid: a cheap valid call with one field broken: a wrong type, a number out of range, a huge string, an
  unknown field, a null, deep nesting, a missing required field, a value outside an enum or a length limit.

Each call is checked: the server is still there (no crash), the answer is not an internal error (a JSON-RPC error,
or a tool error that only says the tool failed), a refusal of a broken field names that field, a success's (or a
job's) `structuredContent` validates against the tool's `outputSchema`, and a refused call changed nothing in the
asset store or the concept store. The tally, per transport, is what `lab/results/reliability.md` reports.
"""

from __future__ import annotations

import argparse
import base64
import copy
import io
import json
import random
import re
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import jsonschema
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import strategies as st
from hypothesis.errors import NonInteractiveExampleWarning
from hypothesis_jsonschema import from_schema
from mcp import Client, MCPError
from PIL import Image

from lab.reliability.servers import http_client, http_server, stdio_client
from pictoprompt.tools.base import IMAGE_REF_DESCRIPTION

CHEAP_CAPS = {
    "steps": 2,
    "num_images": 2,
    "num_results": 2,
    "iterations": 2,
    "max_tokens": 6,
    "width": 64,
    "height": 64,
    "wait_seconds": 30,
}
"""Upper bounds on the knobs that make a valid call slow, so that valid calls run to their end in a fuzz run."""

CALL_SECONDS = 240.0
"""A call that has not answered by then counts as hung."""

JOB_WAITS = 10
"""`get_job` waits of 120 s a job left running gets before it counts as hung."""

INTERNAL_PATTERNS = (re.compile(r"^Error executing tool \w+$"), re.compile(r"Internal error", re.IGNORECASE))
"""A tool error that only says the tool failed (the SDK's text for a crash inside a tool), or a job's crash."""

STORES = ("assets", "data")
"""The folders under the run's folder that a refused call must leave as they were."""


@dataclass
class Pools:
    """Real values for the fields whose random strings would only ever be refused: images, concepts, jobs."""

    images: list[str] = field(default_factory=list)
    concepts: list[str] = field(default_factory=lambda: ["fuzzed"])
    jobs: list[str] = field(default_factory=lambda: ["0123456789abcdef"])

    def pick(self, values: list[str], index: int) -> str:
        return values[index % len(values)]


@dataclass(frozen=True)
class Case:
    """One generated call: the tool, its arguments, its kind and, for a broken call, the field it must name."""

    tool: str
    arguments: dict[str, Any]
    kind: str
    field: str | None = None


@dataclass
class Tally:
    """What a run found, per outcome, with a few examples of each problem."""

    transport: str
    calls: int = 0
    outcomes: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    problems: dict[str, list[str]] = field(default_factory=dict)
    refusals: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    PROBLEMS = (
        "crash",
        "internal_error",
        "protocol_error",
        "schema_violation",
        "unnamed_field",
        "store_changed",
        "hang",
    )

    def problem(self, name: str, case: Case, detail: str) -> None:
        self.outcomes[name] += 1
        examples = self.problems.setdefault(name, [])
        if len(examples) < 5:
            arguments = json.dumps(case.arguments, default=str)[:300]
            examples.append(f"{case.tool} [{case.kind}] {arguments}: {detail[:500]}")

    def failures(self) -> int:
        return sum(self.outcomes[name] for name in self.PROBLEMS)

    def summary(self) -> dict[str, Any]:
        return {
            "transport": self.transport,
            "calls": self.calls,
            "seconds": round(self.seconds, 1),
            **{name: self.outcomes[name] for name in self.PROBLEMS},
            "succeeded": self.outcomes["succeeded"],
            "refused": self.outcomes["refused"],
            "pending_then_cancelled": self.outcomes["cancelled"],
            "kinds": dict(self.kinds),
            "problems": self.problems,
            "refusal_messages": dict(self.refusals.most_common(40)),
        }


# ------------------------------------------------------------------------------------------------- the arguments


def _image_fields(schema: dict[str, Any]) -> dict[str, bool]:
    """The properties that take image references: name -> whether it is a list of them."""
    fields = {}
    for name, prop in schema.get("properties", {}).items():
        if prop.get("description") == IMAGE_REF_DESCRIPTION:
            fields[name] = False
        elif prop.get("type") == "array" and prop.get("items", {}).get("description") == IMAGE_REF_DESCRIPTION:
            fields[name] = True
    return fields


def cheap_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with `CHEAP_CAPS` applied to its integer and number properties, which become required: left out,
    they would take their defaults (25 steps, 4 images...)."""
    capped = copy.deepcopy(schema)
    for name, prop in capped.get("properties", {}).items():
        cap = CHEAP_CAPS.get(name)
        if cap is not None and prop.get("type") in {"integer", "number"}:
            prop["maximum"] = min(prop.get("maximum", cap), cap)
            capped["required"] = sorted({*capped.get("required", []), name})
    return capped


def _with_real_values(tool: str, schema: dict[str, Any], pools: Pools) -> Callable[[tuple], dict[str, Any]]:
    """Replaces, most of the time, image, concept and job fields with values the server can act on."""
    images = _image_fields(schema)

    def fill(drawn: tuple[dict[str, Any], list[int]]) -> dict[str, Any]:
        arguments, choices = drawn
        arguments = dict(arguments)
        choice = iter(choices)
        for name, value in list(arguments.items()):
            pick = next(choice, 0)
            if pick % 5 == 0:  # one in five keeps the schema's random value, which the server must refuse cleanly
                continue
            if name in images and images[name] and isinstance(value, list):
                arguments[name] = [pools.pick(pools.images, pick + i) for i in range(len(value))]
            elif name in images:
                arguments[name] = pools.pick(pools.images, pick)
            elif name == "concept" or (name == "name" and tool.endswith("concept")):
                arguments[name] = pools.pick(pools.concepts, pick)
            elif name == "job_id":
                arguments[name] = pools.pick(pools.jobs, pick)
        return arguments

    return fill


def valid_arguments(tool: str, schema: dict[str, Any], pools: Pools) -> st.SearchStrategy[dict[str, Any]]:
    filled = _with_real_values(tool, schema, pools)
    return st.tuples(from_schema(schema), st.lists(st.integers(1, 10**6), min_size=12, max_size=12)).map(filled)


def broken_arguments(
    tool: str, schema: dict[str, Any], pools: Pools, cheap: st.SearchStrategy[dict[str, Any]] | None = None
) -> st.SearchStrategy[Case]:
    """A cheap valid call with one field broken, and the field the refusal must name. `cheap` is the tool's cheap
    valid strategy when the caller holds it already: a strategy from a schema is resolved on its first draw, which
    costs many times a draw (built anew for each broken call, it was most of a small fuzz run's time)."""
    return _broken(tool, schema, valid_arguments(tool, cheap_schema(schema), pools) if cheap is None else cheap)


JSON_TYPES: dict[str, st.SearchStrategy[Any]] = {
    "string": st.text(max_size=20),
    "integer": st.integers(-(2**70), 2**70),
    "number": st.floats(allow_nan=False, allow_infinity=False),
    "boolean": st.booleans(),
    "array": st.lists(st.integers(), max_size=3),
    "object": st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
}


def _types_of(prop: dict[str, Any]) -> set[str]:
    declared = prop.get("type")
    if isinstance(declared, list):
        return set(declared)
    if declared:
        return {declared} | ({"number"} if declared == "integer" else set())
    if "enum" in prop or "const" in prop:
        return {type(v).__name__.replace("str", "string").replace("int", "integer") for v in prop.get("enum", [])}
    kinds = set()
    for option in prop.get("anyOf", []) + prop.get("oneOf", []):
        kinds |= _types_of(option)
    return kinds


def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"a": value}
    return value


@st.composite
def _broken(draw: st.DrawFn, tool: str, schema: dict[str, Any], cheap: st.SearchStrategy[dict[str, Any]]) -> Case:
    arguments = dict(draw(cheap))
    properties: dict[str, dict[str, Any]] = schema.get("properties", {})
    names = sorted(properties)
    ways = ["unknown_field"]
    if names:
        ways += ["wrong_type", "null", "deep_nesting", "huge_string"]
    if schema.get("required"):
        ways.append("missing_required")
    ranged = [n for n in names if {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & set(properties[n])]
    if ranged:
        ways.append("out_of_range")
    limited = [n for n in names if {"minLength", "maxLength", "minItems", "maxItems", "enum"} & set(properties[n])]
    if limited:
        ways.append("bad_length_or_enum")
    way = draw(st.sampled_from(ways))
    if way == "unknown_field":
        name = draw(st.from_regex(r"[a-z][a-z_]{0,15}", fullmatch=True).filter(lambda n: n not in properties))
        arguments[name] = draw(st.sampled_from(list(JSON_TYPES.values())).flatmap(lambda s: s))
        return Case(tool, arguments, way, name)
    if way == "missing_required":
        name = draw(st.sampled_from(sorted(schema["required"])))
        arguments.pop(name, None)
        return Case(tool, arguments, way, name)
    if way == "out_of_range":
        name = draw(st.sampled_from(ranged))
        arguments[name] = draw(_out_of_range(properties[name]))
        return Case(tool, arguments, way, name)
    if way == "bad_length_or_enum":
        name = draw(st.sampled_from(limited))
        arguments[name] = draw(_bad_length_or_enum(properties[name]))
        return Case(tool, arguments, way, name)
    # A null in an optional field is taken as "left out" (its default, which may be slow), so nulls go where no
    # cost cap holds.
    name = draw(st.sampled_from([n for n in names if way != "null" or n not in CHEAP_CAPS] or names))
    prop = properties[name]
    if way == "wrong_type":
        others = [kind for kind in JSON_TYPES if kind not in _types_of(prop)]
        arguments[name] = draw(st.sampled_from(others).flatmap(lambda kind: JSON_TYPES[kind]))
        # "number" stands in for "integer" only with a fraction; a whole float is a fine integer.
        if isinstance(arguments[name], float) and "integer" in _types_of(prop) and arguments[name].is_integer():
            arguments[name] += 0.5
    elif way == "null":
        arguments[name] = None
        if name not in schema.get("required", []):
            return Case(tool, arguments, way, None)  # the server takes a null as "left out": a valid call
    elif way == "deep_nesting":
        arguments[name] = _nested(draw(st.sampled_from([20, 100, 150])), draw(st.integers()))
    else:  # huge_string: past any declared maxLength, or huge where none is declared
        size = draw(st.sampled_from([100_000, 1_000_000, 5_000_000]))
        text = draw(st.characters(codec="utf-8", exclude_categories=["Cs"])) * size
        arguments[name] = [text] if prop.get("type") == "array" else text
        if prop.get("type") not in {"string", "array"} or "maxLength" not in prop:
            # A huge value that is not a string is a wrong type; a string field without a limit may take it.
            return Case(tool, arguments, way, None)
    return Case(tool, arguments, way, name)


def _out_of_range(prop: dict[str, Any]) -> st.SearchStrategy[Any]:
    integer = prop.get("type") == "integer"
    beyond: list[st.SearchStrategy[Any]] = []
    for key, below in (("minimum", True), ("exclusiveMinimum", True), ("maximum", False), ("exclusiveMaximum", False)):
        if key not in prop:
            continue
        bound = prop[key]
        inclusive = key in {"minimum", "maximum"}
        if integer:
            edge = bound - 1 if below else bound + 1
            edge = edge if inclusive else bound
            beyond.append(st.integers(max_value=edge) if below else st.integers(min_value=edge))
        else:
            beyond.append(
                st.floats(max_value=bound, exclude_max=inclusive, allow_nan=False, allow_infinity=False)
                if below
                else st.floats(min_value=bound, exclude_min=inclusive, allow_nan=False, allow_infinity=False)
            )
    return st.one_of(beyond)


def _bad_length_or_enum(prop: dict[str, Any]) -> st.SearchStrategy[Any]:
    if "enum" in prop:
        return st.text(min_size=1, max_size=12).filter(lambda v: v not in prop["enum"])
    options: list[st.SearchStrategy[Any]] = []
    if prop.get("minLength", 0) > 0:
        options.append(st.text(max_size=prop["minLength"] - 1))
    if "maxLength" in prop:
        options.append(st.integers(1, 50).map(lambda extra: "y" * (prop["maxLength"] + extra)))
    if prop.get("minItems", 0) > 0:
        options.append(st.just([]) if prop["minItems"] == 1 else st.lists(st.text(), max_size=prop["minItems"] - 1))
    if "maxItems" in prop:
        options.append(st.integers(1, 5).map(lambda extra: ["z"] * (prop["maxItems"] + extra)))
    return st.one_of(options)


def _briefly(arguments: dict[str, Any]) -> dict[str, Any]:
    """A full-range call waits a moment at most (then it is cancelled): its work may take minutes."""
    return {**arguments, "wait_seconds": min(arguments.get("wait_seconds", 1.0), 1.0)}


class Cases:
    """The next call: the tool and the kind of call drawn by a seeded `random.Random` (so that every tool and kind
    gets its share: hypothesis's own search starts from its simplest choices and stays near them for hundreds of
    examples), the arguments drawn by hypothesis from the tool's schema.

    A model-heavy tool (one that runs as a job) gets a valid call with probability `heavy_valid` (a third of them
    at full range), the others half the time: a valid model call takes seconds on a CPU, a broken one milliseconds.
    """

    def __init__(self, tools: dict[str, dict[str, Any]], pools: Pools, heavy_valid: float, seed_value: int) -> None:
        self.rng = random.Random(seed_value)
        self.names = sorted(tools)
        self.strategies: dict[tuple[str, str], st.SearchStrategy[Case]] = {}
        self.valid: dict[str, float] = {}
        for name in self.names:
            schema = tools[name]["inputSchema"]
            cheap = valid_arguments(name, cheap_schema(schema), pools)
            self.strategies[name, "valid_cheap"] = cheap.map(partial(Case, name, kind="valid_cheap"))
            briefly = _briefly if "wait_seconds" in schema.get("properties", {}) else dict
            self.strategies[name, "valid_full"] = valid_arguments(name, schema, pools).map(
                lambda arguments, name=name, briefly=briefly: Case(name, briefly(arguments), "valid_full")
            )
            self.strategies[name, "broken"] = broken_arguments(name, schema, pools, cheap)
            heavy = "inline" in schema.get("properties", {}) and name != "get_job"
            self.valid[name] = heavy_valid if heavy else 0.5

    def next(self) -> Case:
        name = self.rng.choice(self.names)
        x = self.rng.random()
        kind = "valid_cheap" if x < self.valid[name] * 2 / 3 else "valid_full" if x < self.valid[name] else "broken"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonInteractiveExampleWarning)  # a generator is what we want here
            return self.strategies[name, kind].example()


# --------------------------------------------------------------------------------------------------- the checks


def store_snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file of the asset and concept stores: relative path -> (size, modification time)."""
    snapshot = {}
    for store in STORES:
        for path in (folder / store).rglob("*"):
            try:
                if path.is_file():
                    info = path.stat()
                    snapshot[str(path.relative_to(folder))] = (info.st_size, info.st_mtime_ns)
            except OSError:
                continue
    return snapshot


def _text(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in result.content if getattr(block, "type", "") == "text")


class Fuzzer:
    """Runs cases against one connected client and tallies what it finds."""

    def __init__(self, portal: BlockingPortal, client: Client, folder: Path, tally: Tally, pools: Pools) -> None:
        self.portal, self.client, self.folder, self.tally, self.pools = portal, client, folder, tally, pools
        self.verbose = False
        self.trace: Any = None
        listed = portal.call(client.list_tools).tools
        self.tools = {tool.name: tool.model_dump(by_alias=True) for tool in listed}

    async def _call(self, name: str, arguments: dict[str, Any]) -> Any:
        with anyio.fail_after(CALL_SECONDS):
            return await self.client.call_tool(name, arguments)

    def call(self, name: str, arguments: dict[str, Any]) -> Any:
        return self.portal.call(self._call, name, arguments)

    def run(self, case: Case) -> None:
        self.tally.calls += 1
        self.tally.kinds[case.kind] += 1
        self.tally.kinds[f"{case.tool}/{case.kind}"] += 1
        before = store_snapshot(self.folder)
        started = time.monotonic()
        if self.trace is not None:
            self.trace.write(f"{self.tally.calls} {case.tool} {case.kind} {json.dumps(case.arguments)[:2000]}\n")
            self.trace.flush()
        try:
            self._run(case, before)
        finally:
            seconds = time.monotonic() - started
            if self.verbose and (seconds > 5 or self.tally.calls % 100 == 0):
                arguments = json.dumps(case.arguments, default=str)[:200]
                print(
                    f"[{self.tally.transport} {self.tally.calls}] {seconds:.1f} s {case.tool} {case.kind} {arguments}"
                )

    def _run(self, case: Case, before: dict[str, tuple[int, int]]) -> None:
        try:
            result = self.call(case.tool, case.arguments)
        except MCPError as error:
            self.tally.problem("protocol_error", case, f"JSON-RPC {error.error.code}: {error.error.message}")
            return
        except TimeoutError:
            self.tally.problem("hang", case, f"no answer in {CALL_SECONDS:.0f} s")
            raise
        except RuntimeError as error:
            if "Invalid structured content" not in str(error):
                raise
            # The SDK's client checks structured content against outputSchema itself and raises.
            self.tally.problem("schema_violation", case, str(error))
            return
        except Exception as error:
            self.tally.problem("crash", case, f"{type(error).__name__}: {error}")
            raise
        if result.is_error:
            self._refused(case, _text(result), before)
        else:
            self._answered(case, result)

    def _refused(self, case: Case, text: str, before: dict[str, tuple[int, int]]) -> None:
        if any(pattern.search(text) for pattern in INTERNAL_PATTERNS):
            self.tally.problem("internal_error", case, text)
            return
        self.tally.outcomes["refused"] += 1
        self.tally.refusals[re.sub(r"'[^']*'|\d+(\.\d+)?|\"[^\"]*\"", "_", text)[:160]] += 1
        # The base of a broken call is valid, so a refusal of its arguments is the broken field's and must name it.
        # A refusal naming another field means the server took the value (pydantic's lax mode reads true as 1)
        # and refused a base value the published schema allows but the server does not (a concept's pattern).
        named = [name for name in self.tools[case.tool]["inputSchema"].get("properties", {}) if name in text]
        if case.field is not None and "Invalid arguments (" in text and case.field not in text and not named:
            self.tally.problem("unnamed_field", case, text)
        after = store_snapshot(self.folder)
        if after != before:
            changed = sorted(set(after.items()) ^ set(before.items()))[:4]
            self.tally.problem("store_changed", case, f"{text[:200]} changed {changed}")

    def _answered(self, case: Case, result: Any) -> None:
        structured = result.structured_content
        schema = self.tools[case.tool].get("outputSchema")
        try:
            jsonschema.validate(structured, schema)
        except jsonschema.ValidationError as error:
            self.tally.problem("schema_violation", case, f"{error.message} at {list(error.absolute_path)}")
            return
        job = (structured or {}).get("job")
        if isinstance(job, dict) and structured.get("result") is None and job.get("state") in {"queued", "running"}:
            self._settle(case, job["job_id"])
            return
        self.tally.outcomes["succeeded"] += 1
        self._learn(case, structured or {})

    def _settle(self, case: Case, job_id: str) -> None:
        """A job still running: a cheap one is waited for, a full-range one cancelled; its end is checked too."""
        self.pools.jobs.append(job_id)
        if case.kind != "valid_cheap":
            self.call("cancel_job", {"job_id": job_id})
        # Until the job has ended: one still running would save its pictures during a later call, whose refusal
        # would then seem to have changed the store (it did once, on a loaded machine, after a 120 s wait).
        for _ in range(JOB_WAITS):
            ended = self.call("get_job", {"job_id": job_id, "wait_seconds": 120})
            job = (ended.structured_content or {}).get("job") or {}
            if ended.is_error or job.get("state") not in {"queued", "running"}:
                break
        else:
            self.tally.problem("hang", case, f"job {job_id} still running after {JOB_WAITS * 2} minutes")
            return
        text = _text(ended)
        if ended.is_error and "cancel" in text.lower():
            self.tally.outcomes["cancelled"] += 1
        elif ended.is_error:
            self._refused(Case(case.tool, case.arguments, case.kind + "/job"), text, store_snapshot(self.folder))
        else:
            lookup = {"job": ended.structured_content["job"], "result": ended.structured_content["result"]}
            try:
                jsonschema.validate(lookup, self.tools[case.tool]["outputSchema"])
            except jsonschema.ValidationError as error:
                self.tally.problem("schema_violation", case, f"get_job: {error.message}")
                return
            self.tally.outcomes["succeeded"] += 1
            self._learn(case, lookup)

    def _learn(self, case: Case, structured: dict[str, Any]) -> None:
        """Keep what a success made (asset URIs, concept names) for later calls to use."""
        text = json.dumps(structured)
        for uri in re.findall(r"pictoprompt://assets/[A-Za-z0-9_-]{22}", text)[:4]:
            if uri not in self.pools.images:
                self.pools.images.append(uri)
        if case.tool == "customize_concept" and case.arguments.get("name"):
            self.pools.concepts.append(case.arguments["name"])
            self.pools.images.append(f"concept:{case.arguments['name']}")


# --------------------------------------------------------------------------------------------------- the run


def sample_images(folder: Path) -> list[str]:
    """Small pictures as the server may receive them: files in its allowed folder and data URIs."""
    refs = []
    for index, colour in enumerate([(220, 30, 30), (30, 60, 220), (240, 220, 20)]):
        picture = Image.new("RGB", (24 + 8 * index, 32), colour)
        path = folder / f"picture-{index}.png"
        picture.save(path)
        refs.append(str(path))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        refs.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return refs


@dataclass(frozen=True)
class Plan:
    calls: int
    seed: int = 39
    heavy_valid: float = 0.1
    verbose: bool = False
    trace: Path | None = None
    """Each call's arguments are written here before it is made (to find the call a hang or crash follows)."""
    minutes: float | None = None
    """Stop after this long even if fewer calls were made (the tally says how many)."""
    checkpoint: Callable[[Tally], None] | None = None
    """Called with the tally every 100 calls, so that a long run stopped from outside still leaves its figures."""


def fuzz(portal: BlockingPortal, client: Client, folder: Path, transport: str, plan: Plan) -> Tally:
    """`calls` generated calls over one connected client (stopped early by a crash or a hang)."""
    tally = Tally(transport)
    pools = Pools(images=sample_images(folder))
    fuzzer = Fuzzer(portal, client, folder, tally, pools)
    fuzzer.verbose = plan.verbose
    if plan.trace is not None:
        fuzzer.trace = plan.trace.open("a")

    cases = Cases(fuzzer.tools, pools, plan.heavy_valid, plan.seed)

    started = time.monotonic()
    try:
        for _ in range(plan.calls):
            if plan.minutes is not None and time.monotonic() - started > plan.minutes * 60:
                break
            fuzzer.run(cases.next())
            if plan.checkpoint is not None and tally.calls % 100 == 0:
                tally.seconds = time.monotonic() - started
                plan.checkpoint(tally)
    except (TimeoutError, OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as error:
        # counted as a crash or a hang; the run stops, since the session is gone
        tally.problems.setdefault("stopped", []).append(f"{type(error).__name__}: {str(error)[:300]}")
    tally.seconds = time.monotonic() - started
    return tally


def fuzz_transport(transport: str, plan: Plan, folder: Path, profile: str = "tiny") -> Tally:
    """A fresh server on `transport` in `folder`, fuzzed with `plan.calls` calls."""
    folder.mkdir(parents=True, exist_ok=True)
    with start_blocking_portal() as portal:
        if transport == "stdio":
            with portal.wrap_async_context_manager(stdio_client(folder, profile)) as client:
                return fuzz(portal, client, folder, transport, plan)
        with (
            http_server(folder, profile) as server,
            portal.wrap_async_context_manager(http_client(server)) as client,
        ):
            tally = fuzz(portal, client, folder, transport, plan)
            if server.process.poll() is not None:
                tally.problems.setdefault("crash", []).append(f"the server exited with {server.process.returncode}")
                tally.outcomes["crash"] += 1
            return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.reliability.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000, help="Calls per transport.")
    parser.add_argument("--transport", nargs="+", choices=["stdio", "http"], default=["stdio", "http"])
    parser.add_argument("--seed", type=int, default=39)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--json", type=Path, help="Also write the tallies here.")
    parser.add_argument(
        "--heavy-valid", type=float, default=0.1, help="Share of valid calls among a model tool's calls."
    )
    parser.add_argument("--minutes", type=float, help="Stop after this long, with the calls made by then.")
    parser.add_argument("--trace", type=Path, help="Write each call's arguments here before making it.")
    parser.add_argument("--verbose", action="store_true", help="Print slow calls and every 100th call.")
    args = parser.parse_args(argv)
    summaries: list[dict[str, Any]] = []

    def write(extra: list[dict[str, Any]]) -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps([*summaries, *extra], indent=1))

    def checkpoint(tally: Tally) -> None:  # the transport under way, marked unfinished
        write([{**tally.summary(), "partial": True}])

    for transport in args.transport:
        with tempfile.TemporaryDirectory(prefix=f"fuzz-{transport}-") as folder:
            plan = Plan(args.calls, args.seed, args.heavy_valid, args.verbose, args.trace, args.minutes, checkpoint)
            tally = fuzz_transport(transport, plan, Path(folder), args.profile)
        summary = tally.summary()
        summaries.append(summary)
        figures = {key: summary[key] for key in ("calls", "seconds", *Tally.PROBLEMS, "succeeded", "refused")}
        print(json.dumps({"transport": transport, **figures}), flush=True)
        for name, examples in tally.problems.items():
            for example in examples:
                print(f"  {name}: {example}", flush=True)
        write([])
    return 0 if all(s["calls"] >= args.calls and not any(s[p] for p in Tally.PROBLEMS) for s in summaries) else 1


if __name__ == "__main__":
    raise SystemExit(main())
