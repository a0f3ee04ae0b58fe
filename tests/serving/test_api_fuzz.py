"""API fuzzing: schemathesis over the app's own OpenAPI schema, against the running app.

The app runs as it does in production: uvicorn in its own process, real Redis, real
tritonserver, the trained REES46 bundle (benchmarks/live_stack.py). Every operation of
/openapi.json gets a bounded number of generated requests, valid (positive) and invalid
(negative) by its schema, all carrying the admin key so admin routes are exercised past
the key check down to their bodies. Checks on every answer:

- never a 5xx;
- every 4xx is JSON with a message, and a 400/404/422 (a problem with the input) names the
  input at fault: one of the operation's parameters or body fields, or `body` when the
  body as a whole is wrong. 401/403/409/413/429 are about the caller or the state, not a
  field, and neither is a 4xx to an operation that takes no input but the key: those need
  a message only.

Destructive routes are neutralised, not skipped: the API serves a fixed bundle
(`serving.bundle`), so a promote or rollback the fuzzer makes moves a pointer in a private
artifacts folder that no process follows; published rule sets and deleted sessions land in
that folder and in this test's own Redis. After the run the app must still be ready on the
same model and answer a rail. The summary goes to api_fuzz.json in the run's pytest folder.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from benchmarks.live_stack import Stack, private_artifacts, start_stack
from railtower.settings import RAILS

pytestmark = pytest.mark.integration

# Generated requests per operation and generation mode (at most: hypothesis stops early on
# an operation with little to vary): 24 passes x 2 modes x 100 is about 2,800 requests, under
# a minute of fuzzing on two cores (13 s for 1,130 requests measured).
EXAMPLES = 100
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
FIELD_STATUSES = {400, 404, 422}


@pytest.fixture(scope="module")
def live_app(trained_rees46, tmp_path_factory):
    settings_, bundle = trained_rees46
    root = tmp_path_factory.mktemp("fuzz")
    artifacts, served = private_artifacts(bundle, settings_.artifacts_dir, root)
    stack = start_stack(
        artifacts, settings_.serving.triton_repository, root / "work", bundle=served
    )
    yield stack
    stack.stop()


@dataclass
class Tally:
    """What the fuzzer sent and what came back, per operation."""

    cases: Counter[str] = field(default_factory=Counter)
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    server_errors: list[dict[str, Any]] = field(default_factory=list)
    unnamed: list[dict[str, Any]] = field(default_factory=list)
    no_cases: list[str] = field(default_factory=list)  # operation and mode with none to send

    def record(self, label: str, status: int) -> None:
        self.cases[label] += 1
        self.statuses.setdefault(label, Counter())[status] += 1


# ------------------------------------------------------------------------------ the inputs


def input_names(spec: dict[str, Any], path: str, method: str) -> set[str]:
    """Every name a request to the operation can carry: parameters and body fields, nested."""
    operation = spec["paths"][path][method.lower()]
    names = {p["name"] for p in operation.get("parameters", [])}
    for content in operation.get("requestBody", {}).get("content", {}).values():
        names |= _properties(spec, content.get("schema", {}), set())
    return names | {n.lower() for n in names}  # headers arrive lower-cased


def _properties(spec: dict[str, Any], schema: dict[str, Any], seen: set[str]) -> set[str]:
    ref = schema.get("$ref")
    if ref is not None:
        if ref in seen:
            return set()
        seen.add(ref)
        return _properties(spec, spec["components"]["schemas"][ref.rsplit("/", 1)[1]], seen)
    names = set(schema.get("properties", {}))
    nested = [*schema.get("properties", {}).values()]
    nested += [schema["items"]] if isinstance(schema.get("items"), dict) else []
    nested += schema.get("anyOf", []) + schema.get("allOf", []) + schema.get("oneOf", [])
    for sub in nested:
        names |= _properties(spec, sub, seen)
    return names


def message_of(body: Any) -> str:
    """The error text an answer gives: `error`, or the rule-set route's `errors` list."""
    if not isinstance(body, dict):
        return ""
    if isinstance(body.get("error"), str):
        return str(body["error"])
    errors = body.get("errors")
    if isinstance(errors, list):
        return "; ".join(f"{e.get('field') or 'body'}: {e.get('why')}" for e in errors)
    return ""


def names_a_field(message: str, names: set[str]) -> bool:
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_-]*", message))
    return bool(words & (names | {"body"}))


# ------------------------------------------------------------------------------ the run


def fuzz_operation(  # type: ignore[no-untyped-def]
    operation, mode: GenerationMode, stack: Stack, spec, session, tally, path=None
) -> None:
    """`EXAMPLES` generated requests to one operation, each checked and tallied.

    `path`: fixed path parameters (the rest of the request is still generated)."""
    names = input_names(spec, operation.path, operation.method)
    label = f"{operation.method.upper()} {operation.path}"
    if path:
        label += " " + ",".join(f"{k}={v}" for k, v in path.items())
    strategy = operation.as_strategy(
        generation_mode=mode, headers={"x-api-key": stack.admin_key}, path_parameters=path
    )

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases on every CI run
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def send(case) -> None:  # type: ignore[no-untyped-def]
        response = case.call(base_url=stack.base, session=session, timeout=60)
        status = response.status_code
        tally.record(label, status)
        seen = {"operation": label, "mode": mode.value, "status": status}
        if status >= 500:
            tally.server_errors.append({**seen, "body": response.text[:300], "sent": _sent(case)})
        elif 400 <= status < 500:
            message = message_of(_json(response))
            # a request that carries no field (only the key) cannot have one at fault
            fields = names - {"x-api-key"}
            if not message or (
                status in FIELD_STATUSES and fields and not names_a_field(message, fields)
            ):
                tally.unnamed.append({**seen, "message": message[:300], "sent": _sent(case)})

    try:
        send()
    except Unsatisfiable:
        # nothing to make invalid: an operation without parameters or body (GET /healthz)
        tally.no_cases.append(f"{label} ({mode.value})")


def _json(response) -> Any:  # type: ignore[no-untyped-def]
    try:
        return response.json()
    except ValueError:
        return None


def _sent(case) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    body = case.body if isinstance(case.body, dict | list | str | int | float) else None
    return {"path": case.formatted_path, "query": case.query, "body": repr(body)[:200]}


@dataclass
class FuzzRun:
    tally: Tally
    operations: int
    ready_before: dict[str, Any]
    ready_after: httpx.Response
    rail_after: httpx.Response


@pytest.fixture(scope="module")
def fuzzed(live_app, tmp_path_factory) -> FuzzRun:
    """Every operation fuzzed once for the module; the summary is written either way, into
    this run's pytest folder (tests never write into the repository)."""
    stack = live_app
    spec = httpx.get(f"{stack.base}/openapi.json", timeout=30).json()
    ready_before = httpx.get(f"{stack.base}/readyz", timeout=30).json()
    schema = schemathesis.openapi.from_url(f"{stack.base}/openapi.json")
    tally = Tally()
    operations = [result.ok() for result in schema.get_all_operations()]
    started = time.perf_counter()
    with requests.Session() as session:
        for operation in operations:
            for mode in MODES:
                fuzz_operation(operation, mode, stack, spec, session, tally)
                # a generated rail name is never a real one: fuzz each real rail's body too
                for rail in RAILS if operation.path == "/v1/rails/{rail}" else ():
                    fuzz_operation(operation, mode, stack, spec, session, tally, {"rail": rail})
    seconds = time.perf_counter() - started
    ready_after = httpx.get(f"{stack.base}/readyz", timeout=30)
    rail_after = httpx.post(
        f"{stack.base}/v1/rails/homepage_hero", json={"session_id": "after-fuzz"}, timeout=60
    )
    _write_summary(tally, len(operations), seconds, tmp_path_factory.mktemp("fuzz"))
    return FuzzRun(tally, len(operations), ready_before, ready_after, rail_after)


def test_every_operation_is_fuzzed_and_none_answers_a_5xx(fuzzed):
    tally = fuzzed.tally
    assert fuzzed.operations >= 15
    assert len(tally.cases) == fuzzed.operations + len(RAILS)  # every operation was exercised
    assert sum(tally.cases.values()) >= 10 * fuzzed.operations
    assert tally.server_errors == []


def test_every_4xx_says_which_input_is_wrong(fuzzed):
    assert fuzzed.tally.unnamed == []


def test_the_fuzzer_neither_broke_the_app_nor_changed_its_model(fuzzed):
    assert fuzzed.ready_after.status_code == 200
    assert fuzzed.ready_after.json()["model_version"] == fuzzed.ready_before["model_version"]
    assert fuzzed.rail_after.status_code == 200
    assert len(fuzzed.rail_after.json()["items"]) == 12


def _write_summary(tally: Tally, operations: int, seconds: float, folder: Path) -> None:
    statuses: Counter[int] = Counter()
    for counts in tally.statuses.values():
        statuses.update(counts)
    summary = {
        "tool": f"schemathesis {schemathesis.__version__}",
        "operations": operations,
        "operation_passes": len(tally.cases),  # + one per real rail on /v1/rails/{rail}
        "cases": sum(tally.cases.values()),
        "seconds": round(seconds, 1),
        "examples_per_operation_and_mode": EXAMPLES,
        "modes": [m.value for m in MODES],
        "server_errors": len(tally.server_errors),
        "unnamed_4xx": len(tally.unnamed),
        "failures": len(tally.server_errors) + len(tally.unnamed),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "per_operation": {
            label: {"cases": n, "statuses": {str(k): v for k, v in tally.statuses[label].items()}}
            for label, n in sorted(tally.cases.items())
        },
        "neutralised": "promote/rollback: the API serves a fixed bundle, so a pointer the "
        "fuzzer moves in its private artifacts folder is followed by no process",
        "excluded": [],
        "nothing_to_generate": tally.no_cases,
        "failure_examples": (tally.server_errors + tally.unnamed)[:20],
    }
    (folder / "api_fuzz.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
