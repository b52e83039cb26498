"""The server's promise "a request can only fail itself", tested as properties of a live
`chatsmith serve` (uvicorn in a thread, tiny-random-llama):

1. Schema-driven fuzzing: schemathesis reads GET /openapi.json and sends every route its coverage
   cases (boundary values, missing fields, wrong types, other methods and content types) and a fixed
   number of generated positive and negative cases, derandomized (in a child process with a fixed
   hash seed, so every run sends the same cases). No answer may be a 5xx (nor a stream carrying an
   error), every 4xx must be exactly OpenAI's error object, and a normal request must still succeed
   after each batch.
2. Fault isolation: while three greedy completions generate, every kind of hostile request the server
   was hardened against (benchmarks/serve_soak.py, ATTACKS) gets its own status, and the three
   answers equal the answers they get alone.
3. Soak: 12 clients send good, hostile, cancelled and abandoned requests for 20 s; afterwards
   /metrics, the engine's KV slots, the threads, file descriptors, event-loop tasks and memory
   are back to where they were (benchmarks/serve_soak.py runs the same load for minutes).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import REPO

from chatsmith.serve.app import ServerState, ServerThread, load_state
from chatsmith.serve.guard import LOOPBACK

_spec = importlib.util.spec_from_file_location("serve_soak", REPO / "benchmarks" / "serve_soak.py")
soak = sys.modules["serve_soak"] = importlib.util.module_from_spec(_spec)   # dataclasses look it up there
_spec.loader.exec_module(soak)

MODEL = soak.MODEL
AUTH = {"Authorization": f"Bearer {soak.KEY}"}


def _good_request_succeeds(url: str) -> str | None:
    """None when a normal request gets its 2 tokens; else what went wrong."""
    try:
        r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=60,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    except httpx.HTTPError as e:
        return f"a normal request failed: {type(e).__name__}: {e}"
    if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != 2:
        return f"a normal request got {r.status_code}: {r.text[:200]}"
    return None


# ---- 1. schema-driven fuzzing --------------------------------------------------------------------------

FUZZ_SLOT_TOKENS = 64     # a small context bounds what a case may generate (max_tokens absent: up to 63)
FUZZ_MAX_TOKENS = 4       # generated max_tokens between this and the context are lowered to it
FUZZ_EXAMPLES = 10        # generated cases per route and mode (positive, negative), besides the coverage cases
GENERATING = ("/v1/chat/completions", "/v1/completions")
DOCUMENTED = {"GET /health", "GET /metrics", "POST /tokenize", "POST /detokenize", "POST /apply-template",
              "GET /v1/models", "POST /v1/chat/completions", "POST /v1/completions", "POST /v1/embeddings"}


def _small_generation(case, *, bound_default: bool) -> None:
    """Keep a fuzzed generation cheap (13 sampled choices of 60 tokens take seconds here): a
    max_tokens that fits the context becomes FUZZ_MAX_TOKENS; values outside it (0, negative, past
    the context, huge, not integers) are left as generated, they are what the fuzzing is for. With
    `bound_default`, a request that leaves the length to the server (no max_tokens, or null: as
    many tokens as the context holds) gets FUZZ_MAX_TOKENS too; the coverage cases keep those few."""
    body = case.body
    if case.operation.path not in GENERATING or not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if type(value) is int and FUZZ_MAX_TOKENS < value < FUZZ_SLOT_TOKENS:
            body[key] = FUZZ_MAX_TOKENS
    # chat: no max_tokens or null means "as many as fit"; completions: null does (absent is 16)
    unbounded = body.get("max_tokens") is None and body.get("max_completion_tokens") is None and (
        "max_tokens" in body or case.operation.path == "/v1/chat/completions")
    if bound_default and unbounded:
        body["max_tokens"] = FUZZ_MAX_TOKENS


def _integer_fields(document: dict) -> dict[str, set[str]]:
    """Per generating route, the top-level body fields the document types as integers (or null)."""
    out: dict[str, set[str]] = {}
    for path in GENERATING:
        ref = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        props = document["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]
        out[path] = {name for name, p in props.items()
                     if {t.get("type") for t in p.get("anyOf", [p])} - {"null"} == {"integer"}}
    return out


def _as_the_server_accepts(case, integers: dict[str, set[str]], vocab: int, adapted: Counter) -> None:
    """Make a positive case one the server accepts where the document allows more than the server
    does (each change is counted and printed: they are gaps in the document): a role other than the
    four accepted ones, a message without content, an empty prompt, an integer written as 1.0 (an
    integer in JSON Schema; the server parses strictly) and token ids outside the vocabulary.
    Without this almost no generated chat request, and no coverage case with a boundary value of a
    sampling parameter, gets past validation to the template, the tokenizer and the engine."""
    from chatsmith.serve.app import ROLES

    body, path = case.body, case.operation.path
    if not isinstance(body, dict):
        return
    for key in integers.get(path, ()):
        if type(body.get(key)) is float and body[key].is_integer():
            body[key] = int(body[key])
            adapted[f"'{key}' written as a float"] += 1
    messages = body.get("messages")
    for m in messages if isinstance(messages, list) else []:
        if isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"] not in ROLES:
            key = "'role' not one of " + ", ".join(ROLES)
            m["role"] = list(ROLES)[adapted[key] % len(ROLES)]   # each accepted role in turn, in any place
            adapted[key] += 1
        if isinstance(m, dict) and m.get("content") is None and m.get("role") != "assistant":
            m["content"] = "hi"
            adapted["'content' missing or null"] += 1
    if path in GENERATING and body.get("prompt") in ("", []):
        body["prompt"] = "Hello"
        adapted["'prompt' empty"] += 1
    tokens = body.get("tokens")
    if path == "/detokenize" and isinstance(tokens, list) and any(type(t) is int and not 0 <= t < vocab
                                                                  for t in tokens):
        body["tokens"] = [t % vocab if type(t) is int else t for t in tokens]
        adapted["'tokens' outside the vocabulary"] += 1


def _stream_error(content: bytes) -> str | None:
    """The first error event of a server-sent event stream (a failure after the 200), or None."""
    for line in content.decode(errors="replace").splitlines():
        if line.startswith("data: {") and '"error"' in line:
            try:
                obj = json.loads(line[6:])
            except ValueError:   # an event cut short where the client stopped reading
                continue
            if "error" in obj:
                return line[:300]
    return None


def _failures(e: BaseException) -> list[str]:
    """The messages of a Hypothesis failure (one per distinct bug when it found several)."""
    if isinstance(getattr(e, "exceptions", None), (list, tuple)):   # an ExceptionGroup (3.11+ or the backport)
        return [m for sub in e.exceptions for m in _failures(sub)]
    return [str(e).strip()]


def _without_local_constants() -> None:
    """Hypothesis also draws constants found in the local modules loaded so far (sys.modules), so the
    cases would depend on which modules were imported first; without them they do not. (An internal
    of Hypothesis 6: if it moves, this does nothing.)"""
    from hypothesis.internal.conjecture import providers

    providers._get_local_constants = providers.Constants
    providers.CONSTANTS_CACHE.cache.clear()


def fuzz_the_server() -> dict:
    """Start a server, fuzz every route of its OpenAPI document and return what was sent and every
    problem found. Runs in a child process with a fixed PYTHONHASHSEED: even derandomized, the cases
    schemathesis generates depend on the iteration order of sets of strings, which Python's per-process
    hash randomisation changes (hash seeds 0 and 1 gave different cases, and found different bugs)."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    _without_local_constants()
    state = ServerState(MODEL, api_key=soak.KEY, allowed_hosts=set(LOOPBACK))
    with ServerThread(state) as url:
        load_state(state, MODEL, max_concurrency=16, kv_cache_mb=16 * FUZZ_SLOT_TOKENS * 512 / 2**20, max_queue=64)
        assert state.load_error is None
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        schema.config.output.sanitization.enabled = False   # it hides "max_tokens" (a "token") in the repros
        # .ok() raises on an operation schemathesis cannot read: the document would be malformed.
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.label for op in operations} >= DOCUMENTED
        integers = _integer_fields(httpx.get(f"{url}/openapi.json").json())

        problems: list[str] = []
        sent: Counter = Counter()
        positive_rejected: Counter = Counter()
        adapted: Counter = Counter()

        def send(case, fuzzing: bool = False) -> str | None:
            """Send one case; None when the answer is acceptable, else the problem and a curl command."""
            mode = case.meta.generation.mode if case.meta else "?"
            if mode == GenerationMode.POSITIVE:
                _as_the_server_accepts(case, integers, len(state.tokenizer), adapted)
            _small_generation(case, bound_default=fuzzing)
            curl = case.as_curl_command(headers=AUTH, base_url=url)
            try:
                r = case.call(base_url=url, headers=AUTH, timeout=60)
            except Exception as e:
                return f"no answer ({type(e).__name__}: {e}) to\n    {curl}"
            sent[(case.operation.label, r.status_code)] += 1
            if r.status_code >= 500:
                return f"status {r.status_code} {r.content[:300]!r} for\n    {curl}"
            if 400 <= r.status_code < 500:
                ctype = (r.headers.get("content-type") or [""])[0]   # schemathesis: lower-case names, lists
                bad = soak.error_shape_problem(r.content)
                if bad is None and not ctype.startswith("application/json"):
                    bad = f"Content-Type {ctype!r}"
                if bad is not None:
                    return f"status {r.status_code} not in OpenAI's error shape ({bad}) for\n    {curl}"
                if mode == GenerationMode.POSITIVE:
                    positive_rejected[(case.operation.label, json.loads(r.content)["error"]["message"][:70])] += 1
            elif (err := _stream_error(r.content)) is not None:
                return f"status {r.status_code} stream carries an error: {err} for\n    {curl}"
            return None

        # derandomize: the same cases every run (no example database, no time-dependent choices).
        fuzz_settings = settings(max_examples=FUZZ_EXAMPLES, derandomize=True, database=None, deadline=None,
                                 suppress_health_check=list(HealthCheck), print_blob=False,
                                 phases=(Phase.explicit, Phase.generate, Phase.shrink))
        try:
            for op in operations:
                coverage = schema.iter_coverage_cases(op, generation_modes=list(GenerationMode),
                                                      generation_config=schema.config.generation_for(operation=op,
                                                                                                     phase="coverage"))
                problems += [f"{op.label} [coverage]: {p}" for p in map(send, coverage) if p is not None]
                if (p := _good_request_succeeds(url)) is not None:
                    problems.append(f"after the coverage cases of {op.label}: {p}")
                for mode in GenerationMode:
                    @fuzz_settings
                    @given(case=op.as_strategy(generation_mode=mode))
                    def fuzz(case) -> None:
                        problem = send(case, fuzzing=True)
                        if problem is not None:
                            raise AssertionError(problem)   # Hypothesis shrinks it to a minimal case

                    try:
                        fuzz()
                    except Unsatisfiable:   # no such data: a GET without parameters has no negative case
                        pass
                    except Exception as e:
                        problems += [f"{op.label} [{mode.value}]: {m}" for m in _failures(e)]
                    if (p := _good_request_succeeds(url)) is not None:
                        problems.append(f"after the {mode.value} cases of {op.label}: {p}")
        finally:
            state.engine.stop()

    return {"problems": problems, "sent": [[label, status, n] for (label, status), n in sorted(sent.items())],
            "adapted": adapted.most_common(), "refused": [[label, message, n] for (label, message), n
                                                        in positive_rejected.most_common(12)]}


def test_fuzzed_requests_get_no_5xx_and_every_4xx_in_openai_shape():
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_server_properties as t; "
            "print('FUZZ-REPORT ' + json.dumps(t.fuzz_the_server()))")
    child = subprocess.run([sys.executable, "-c", code, str(REPO / "tests")], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": "0"}, timeout=900)
    line = next((x for x in child.stdout.splitlines() if x.startswith("FUZZ-REPORT ")), None)
    assert line is not None, f"the fuzzing process failed (exit {child.returncode}):\n{child.stderr[-3000:]}"
    report = json.loads(line.removeprefix("FUZZ-REPORT "))
    summary = "\n".join(f"  {label}: {n} answered {status}" for label, status, n in report["sent"])
    adapted = "\n".join(f"  {n:4d} x {what}" for what, n in report["adapted"])
    refused = "\n".join(f"  {n:4d} x {label}: {message}" for label, message, n in report["refused"])
    print(f"fuzzed requests by route and status:\n{summary}\npositive cases adapted so that they reach the engine "
          f"(the document allows them, the server refuses them):\n{adapted}\nother positive cases refused:\n{refused}")
    assert {label for label, _, _ in report["sent"]} >= DOCUMENTED, report["sent"]
    if report["problems"]:   # the cases say everything; the test's source would only bury them
        pytest.fail(f"{len(report['problems'])} problem(s):\n" + "\n".join(report["problems"][:20]), pytrace=False)


# ---- 2 and 3: a hardened server (an API key, loopback hosts, a 64 KiB body limit) ------------------------


@pytest.fixture(scope="module")
def hardened():
    state = soak.start_state()
    http = ServerThread(state)
    with http as url:
        soak.load_model(state)
        yield state, http, soak.Target(url, engine=state.engine)
        state.engine.stop()


STEP_DELAY = 0.1          # seconds added to each decode step while the attack runs
ISOLATION_PROMPTS = ("Once upon a time there was", "The quick brown fox", "In a galaxy far away")


def _engine_idle(engine, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not engine.running and not engine.waiting and sorted(engine._free_slots) == list(
                range(engine.max_batch_size)):
            return True
        time.sleep(0.05)
    return False


def test_hostile_requests_fail_only_themselves(hardened):
    state, _, target = hardened
    engine = state.engine
    bodies = [{"model": MODEL, "prompt": p, "max_tokens": 60, "temperature": 0} for p in ISOLATION_PROMPTS]

    def complete(body: dict) -> tuple[str, int, str]:
        r = httpx.post(f"{target.url}/v1/completions", json=body, headers=AUTH, timeout=120)
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]
        return c["text"], r.json()["usage"]["completion_tokens"], c["finish_reason"]

    alone = [complete(b) for b in bodies]
    assert all(tokens == 60 for _, tokens, _ in alone) and len({t for t, _, _ in alone}) == 3, alone
    greedy = complete(soak.good_body("completions", soak.GOOD_PROMPTS[0], stream=False))[0]

    # The tiny model decodes 60 tokens in ~60 ms, less than the attack takes to send. A pause in each
    # decode step keeps the three answers generating (>= 6 s) while every hostile request arrives;
    # it changes when tokens are made, never which.
    real_decode = engine.runner.decode
    slow = threading.Event()

    def slow_decode(*args, **kwargs):
        if slow.is_set():
            time.sleep(STEP_DELAY)
        return real_decode(*args, **kwargs)

    heavy = [a for a in soak.ATTACKS if a.engine]
    light = [a for a in soak.ATTACKS if not a.engine]
    outcomes: dict[str, soak.Outcome] = {}
    answered_during: dict[str, bool] = {}

    def send_alone(attack):
        with target.client() as client:
            return attack.send(target, client)

    engine.runner.decode = slow_decode
    slow.set()
    try:
        with ThreadPoolExecutor(3) as pool:
            good = [pool.submit(complete, b) for b in bodies]
            deadline = time.monotonic() + 60
            while len(generating := [r for r in list(engine._running) if r.output]) < 3:
                assert time.monotonic() < deadline and not any(f.done() for f in good), "the good requests did not start"
                time.sleep(0.01)
            with ThreadPoolExecutor(len(heavy)) as attackers, target.client() as client:
                pending = {a.name: attackers.submit(send_alone, a) for a in heavy}
                for attack in light:
                    outcomes[attack.name] = attack.send(target, client)
                    answered_during[attack.name] = not any(f.done() for f in good)
                results = [f.result(timeout=120) for f in good]
                for name, f in pending.items():
                    outcomes[name] = f.result(timeout=120)
    finally:
        slow.clear()
        del engine.runner.decode

    # The three answers are exactly what they were alone.
    assert results == alone
    # Every hostile request got its own status, and every error is in OpenAI's shape.
    for attack in soak.ATTACKS:
        out = outcomes[attack.name]
        assert out.status == attack.expected, (attack.name, out.status, out.body[:300])
        if out.status is not None and 400 <= out.status < 500:
            assert soak.error_shape_problem(out.body) is None, (attack.name, out.body[:300])
    assert outcomes["temperature 1e-40"].text == greedy
    # ...while the three generated: the quick ones were answered before any of them finished, and the
    # engine took the others in beside them.
    assert all(answered_during.values()), answered_during
    first_done = min(r.finished_at for r in generating[:3])
    recent = list(engine.recent)
    json_choices = [r for r in recent if r.constraint is not None]
    tiny = [r for r in recent if r.params.temperature == 1e-40]
    assert len(json_choices) == 16 and len(tiny) == 1
    assert all(r.arrival < first_done for r in json_choices + tiny)
    for name in ("abandoned request", "cancelled stream"):   # the client left: its generation stopped
        ids = outcomes[name].prompt
        deadline = time.monotonic() + 30
        while not (mine := [r for r in list(engine.recent) if r.prompt == ids]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mine and mine[0].finish_reason == "cancelled" and len(mine[0].output) < soak.LONG_TOKENS, name
        assert mine[0].arrival < first_done, name
    # Afterwards: every slot free, nothing running or waiting, and a normal request is answered.
    assert _engine_idle(engine)
    assert soak.metrics_gauges(target) == {"chatsmith_requests_running": 0, "chatsmith_queue_waiting": 0}
    assert _good_request_succeeds(target.url) is None


# ---- 3. soak ---------------------------------------------------------------------------------------------

SOAK_CLIENTS, SOAK_SECONDS, WARMUP_SECONDS = 12, 12, 3


def test_soak_of_mixed_load_leaks_nothing(hardened):
    state, http, target = hardened
    answers = soak.answers_alone(target)
    # Warm-up with the same load: the executor's threads, allocator arenas and caches reach their
    # working size, so the baseline is what an idle server that has served this load looks like.
    soak.run_load(target, WARMUP_SECONDS, SOAK_CLIENTS, answers, seed=1)
    soak.settle(state, http, soak.resources(state, http), timeout=15)
    before = soak.resources(state, http)
    report = soak.run_load(target, SOAK_SECONDS, SOAK_CLIENTS, answers, seed=0)
    after, settle_s = soak.settle(state, http, before)
    deltas = {k: round(after[k] - before[k], 1) for k in soak.RESOURCE_MARGINS}
    print(f"soak: {report['good']['ok']} good requests ({report['good']['tokens_per_s']:.0f} tokens/s), "
          f"{after['engine_requests'] - before['engine_requests']} engine requests, probe p50 "
          f"{report['probe']['p50_s']:.3f} s p95 {report['probe']['p95_s']:.3f} s; before {before['rss_mb']:.0f} MB "
          f"{before['python_threads']} threads {before['fds']} fds; deltas {deltas}; settled in {settle_s:.1f} s")

    assert not report["problems"], "\n".join(report["problems"][:20])
    assert report["good"]["ok"] > 0 and all(sum(a["got"].values()) > 0 for a in report["attacks"].values())
    assert not soak.leaks(before, after), soak.leaks(before, after)
    assert soak.metrics_gauges(target) == {"chatsmith_requests_running": 0, "chatsmith_queue_waiting": 0}
    assert _good_request_succeeds(target.url) is None
