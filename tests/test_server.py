"""`chatsmith serve` over real HTTP (uvicorn in a thread) on tiny-random-llama: the official openai
client, malformed and hostile requests, auth, queue limits, disconnects and 16 concurrent streams."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from chatsmith.serve.app import ServerState, ServerThread, load_state

MODEL = "tiny-random-llama"
SLOT_TOKENS = 256


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A PEFT LoRA adapter for tiny-random-llama with non-zero weights (so it changes the answers)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from chatsmith.models import load_model

    base, _ = load_model(MODEL)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("lora") / "mine"
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def server(adapter_dir):
    state = ServerState(MODEL)
    with ServerThread(state) as url:
        # /health answers 503 while the model loads, then 200.
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
                          ).status_code == 503
        load_state(state, MODEL, max_concurrency=16, kv_cache_mb=16 * SLOT_TOKENS * 512 / 2**20, max_queue=64,
                   loras={"mine": adapter_dir})
        assert state.load_error is None
        assert httpx.get(f"{url}/health").status_code == 200
        yield url, state
        state.engine.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


def _prompt_ids(state, messages):
    from chatsmith.data.conversation import Conversation, Message
    from chatsmith.data.template import render_conversation

    conv = Conversation([Message(m["role"], m["content"]) for m in messages])
    return render_conversation(state.tokenizer, conv, add_generation_prompt=True).input_ids


def test_openai_client_chat_stream_completions_models(server, client):
    url, state = server
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0, logprobs=True,
                                       top_logprobs=2)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    # usage counts are exact: the prompt as the template renders it, one completion token per log-prob
    assert r.usage.prompt_tokens == len(_prompt_ids(state, msgs))
    assert r.usage.completion_tokens == len(choice.logprobs.content) == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in choice.logprobs.content)

    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # streamed in pieces
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason

    c = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=7, temperature=0, logprobs=1)
    ids = state.tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    assert c.usage.prompt_tokens == len(ids) and c.usage.completion_tokens == 7
    assert len(c.choices[0].logprobs.token_logprobs) == 7
    assert c.choices[0].text == "".join(c.choices[0].logprobs.tokens)
    same = client.completions.create(model=MODEL, prompt=ids, max_tokens=7, temperature=0)
    assert same.choices[0].text == c.choices[0].text

    assert [m.id for m in client.models.list().data][:2] == [MODEL, "mine"]


def test_lora_adapter_served_by_name(client):
    kw = dict(prompt="Once upon a time", max_tokens=8, temperature=0)
    base = client.completions.create(model=MODEL, **kw).choices[0].text
    mine = client.completions.create(model="mine", **kw)
    assert mine.model == "mine" and mine.choices[0].text != base
    assert client.completions.create(model="mine", **kw).choices[0].text == mine.choices[0].text


def test_sampling_options_n_seed_stop_and_json(server, client):
    _, state = server
    msgs = [{"role": "user", "content": "Tell me something."}]
    kw = dict(model=MODEL, messages=msgs, max_tokens=10, temperature=1.0, seed=42, n=3)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices] and len(set(texts)) == 3
    assert a.usage.completion_tokens == 30
    # (greedy answers of this random model are blank lines, so these use a seeded sample)
    sample = dict(model=MODEL, messages=msgs, max_tokens=20, temperature=1.0, seed=5)
    full = client.chat.completions.create(**sample).choices[0].message.content
    words = [w for w in full.split() if len(w) >= 3]
    assert words, full
    stop = words[len(words) // 2]
    cut = client.chat.completions.create(**sample, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == full[: full.find(stop)]
    streamed = client.chat.completions.create(**sample, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[: full.find(stop)]
    js = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=150, temperature=0.8, seed=1,
                                        response_format={"type": "json_object"})
    assert isinstance(json.loads(js.choices[0].message.content), dict)
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_embeddings(server, client):
    e = client.embeddings.create(model="all-minilm-l6-v2", input=["The cat sat on the mat.", "A cat was sitting on a rug.",
                                                                   "Quarterly tax filing deadlines"])
    import numpy as np

    v = np.array([d.embedding for d in e.data])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2  # similar sentences are closer
    assert e.usage.prompt_tokens > 10
    f = httpx.post(f"{server[0]}/v1/embeddings", json={"input": "hello", "encoding_format": "float"}).json()
    assert len(f["data"][0]["embedding"]) == 384


def test_native_routes(server):
    url, state = server
    msgs = [{"role": "user", "content": "hi"}]
    t = httpx.post(f"{url}/apply-template", json={"messages": msgs}).json()
    assert t["prompt"].endswith("<|im_start|>assistant\n") and t["tokens"] == len(_prompt_ids(state, msgs))
    tok = httpx.post(f"{url}/tokenize", json={"content": "hello world"}).json()
    assert tok["tokens"] == state.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert httpx.post(f"{url}/detokenize", json={"tokens": tok["tokens"]}).json()["content"] == "hello world"
    httpx.get(f"{url}/no/such/'path\"")   # a made-up path with quotes: counted as "other", never as a label
    assert httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": msgs, "max_tokens": 2}
                      ).status_code == 200   # tokens to count, when this test runs alone too
    m = httpx.get(f"{url}/metrics").text
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(x.name, tuple(sorted(x.labels.items()))): x.value
               for fam in text_string_to_metric_families(m) for x in fam.samples}   # parses: the format is valid
    names = {name for name, _ in samples}
    for name in ("chatsmith_http_requests_total", "chatsmith_generation_tokens_total", "chatsmith_queue_waiting",
                 "chatsmith_time_to_first_token_seconds_bucket", "chatsmith_request_seconds_count",
                 "chatsmith_http_request_duration_seconds_count"):
        assert name in names, name
    assert samples[("chatsmith_generation_tokens_total", ())] > 0
    assert samples[("chatsmith_engine_threads", ())] == state.engine.threads >= 1   # the governor's choice
    routes = {dict(labels)["route"] for name, labels in samples if name == "chatsmith_http_requests_total"}
    assert "other" in routes and "/tokenize" in routes and not any("no/such" in r for r in routes)
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "<title>chatsmith</title>" in page.text


GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
LONG = "word " * (SLOT_TOKENS + 20)

# (request body: dict or raw bytes, status, words the error message must contain)
BAD_REQUESTS = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b"", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    ({"model": MODEL}, 400, "'messages'"),
    ({**GOOD, "messages": []}, 400, "'messages'"),
    ({**GOOD, "messages": "hi"}, 400, "'messages'"),
    ({**GOOD, "messages": [{"role": "wizard", "content": "x"}]}, 400, "unknown role 'wizard'"),
    ({**GOOD, "messages": [{"content": "x"}]}, 400, "messages[0].role"),
    ({**GOOD, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({**GOOD, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({**GOOD, "temperature": "hot"}, 400, "'temperature'"),
    ({**GOOD, "temperature": 5}, 400, "'temperature'"),
    ({**GOOD, "temperature": -1}, 400, "'temperature'"),
    ({**GOOD, "top_p": 0}, 400, "'top_p'"),
    ({**GOOD, "top_p": 1.5}, 400, "'top_p'"),
    ({**GOOD, "max_tokens": 0}, 400, "'max_tokens'"),
    ({**GOOD, "max_tokens": "many"}, 400, "'max_tokens'"),
    ({**GOOD, "n": 0}, 400, "'n'"),
    ({**GOOD, "n": 1000}, 400, "'n'"),
    ({**GOOD, "presence_penalty": 3}, 400, "'presence_penalty'"),
    ({**GOOD, "seed": -1}, 400, "'seed'"),
    ({**GOOD, "seed": 1.5}, 400, "'seed'"),
    ({**GOOD, "stream": "yes"}, 400, "'stream'"),
    ({**GOOD, "stop": 7}, 400, "'stop'"),
    ({**GOOD, "stop": [""]}, 400, "'stop'"),
    ({**GOOD, "top_logprobs": 3}, 400, "'top_logprobs'"),
    ({**GOOD, "response_format": {"type": "xml"}}, 400, "'response_format.type'"),
    ({**GOOD, "messages": [{"role": "user", "content": LONG}]}, 400, f"holds {SLOT_TOKENS}"),
    ({**GOOD, "max_tokens": 10**6}, 400, "ask for at most"),
    ({**GOOD, "model": "gpt-17"}, 404, "model 'gpt-17' not found"),
    # found by hostile testing (issue 11): these were 500s
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}", 400,
     "JSON parser refuses"),
    (b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}', 400, "lone UTF-16 surrogate"),
    ({**GOOD, "stop": ["x" * 257]}, 400, "at most 256 characters"),
]


@pytest.mark.parametrize("body,status,words", BAD_REQUESTS, ids=[f"{i}-{w[:24]}" for i, (_, _, w) in
                                                                  enumerate(BAD_REQUESTS)])
def test_bad_requests_get_clear_errors(server, body, status, words):
    url, _ = server
    if isinstance(body, bytes):
        r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    else:
        r = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"] and "Traceback" not in r.text
    if "holds" in words:  # the context error gives the token counts
        assert "the prompt has" in err["message"] and "tokens" in err["message"]
    ok = httpx.post(f"{url}/v1/chat/completions", json=GOOD)  # the server answers the next good request
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


# Found by fuzzing the schema (issue 11): each was a 500. Answering them is right: a tiny repetition
# penalty is extreme but valid, and a conversation may start with (or be only) an assistant turn.
ANSWERED = [
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 2, "repetition_penalty": 5e-324}),
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 2, "repetition_penalty": 1e-45, "stream": True}),
    # 5e-324 rounds to 0.0 in float32; the chat prompt has logits of exactly 0: 0 / 0 was NaN
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 5e-324,
                              "max_tokens": 4}),
    ("/v1/chat/completions", {"messages": [{"role": "assistant"}], "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}],
                              "max_tokens": 2}),
    ("/tokenize", {"messages": [{"role": "assistant", "content": []}]}),
    ("/apply-template", {"messages": [{"role": "assistant"}]}),
]


@pytest.mark.parametrize("path,body", ANSWERED, ids=[f"{i}-{p}" for i, (p, _) in enumerate(ANSWERED)])
def test_extreme_but_valid_requests_are_answered(server, path, body):
    url, _ = server
    r = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert r.status_code == 200, r.text[:300]
    assert "error" not in r.text[:200]


def test_hostile_requests_do_not_hurt_the_server(server):
    url, _ = server
    deep = b"[" * 100000 + b"]" * 100000
    cases = [
        ("/v1/chat/completions", deep),
        ("/v1/completions", json.dumps({"prompt": [10**9], "max_tokens": 2}).encode()),
        ("/v1/completions", json.dumps({"prompt": [], "max_tokens": 2}).encode()),
        ("/v1/completions", json.dumps({"prompt": ["a", "b"], "max_tokens": 2}).encode()),
        ("/v1/embeddings", json.dumps({"input": []}).encode()),
        ("/v1/embeddings", json.dumps({"input": [1, 2]}).encode()),
        ("/tokenize", json.dumps({}).encode()),
        ("/detokenize", json.dumps({"tokens": [-5]}).encode()),
        ("/v1/chat/completions", json.dumps({**GOOD, "messages": [{"role": "user", "content": "\x00\ud7ff" * 50}]}
                                            ).encode()),
    ]
    for path, body in cases:
        r = httpx.post(f"{url}{path}", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code in (200, 400), (path, r.status_code, r.text[:200])
        assert "Traceback" not in r.text
        if r.status_code == 400:
            assert r.json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.post(f"{url}/v1/chat/completions", json=GOOD).status_code == 200


def test_api_key(server):
    url, state = server
    state.api_key = "s3cret"
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Bearer s3cre"}, {"Authorization": "Basic s3cret"}):
            r = httpx.post(f"{url}/v1/chat/completions", json=GOOD, headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # health, the page and the schema stay open
        assert httpx.get(f"{url}/").status_code == 200 and httpx.get(f"{url}/openapi.json").status_code == 200
        for scheme in ("Bearer", "bearer", "BEARER"):   # RFC 7235: the scheme is case-insensitive
            ok = httpx.post(f"{url}/v1/chat/completions", json=GOOD, headers={"Authorization": f"{scheme} s3cret"})
            assert ok.status_code == 200, scheme
    finally:
        state.api_key = None


def test_api_key_from_environment_or_file(tmp_path, monkeypatch):
    """The key need not be on the command line, where `ps` shows it."""
    from chatsmith.cli import _api_key, _parser
    from chatsmith.errors import ChatsmithError

    monkeypatch.setenv("CHATSMITH_API_KEY", "from-env")
    assert _api_key(_parser().parse_args(["serve", "m"])) == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    assert _api_key(_parser().parse_args(["serve", "m", "--api-key-file", str(tmp_path / "key")])) == "from-file"
    assert _api_key(_parser().parse_args(["serve", "m", "--api-key", "flag"])) == "flag"
    (tmp_path / "empty").write_text("")
    with pytest.raises(ChatsmithError, match="no key in it"):
        _api_key(_parser().parse_args(["serve", "m", "--api-key-file", str(tmp_path / "empty")]))


def test_health_says_status_only(tmp_path):
    """/health needs no key: it must not show the model's path or the loader's error text."""
    state = ServerState(MODEL)
    load_state(state, str(tmp_path / "secret-place" / "no-model"))
    assert state.load_error and "secret-place" in state.load_error   # the log and the state know why
    with ServerThread(state) as url:
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and r.json() == {"status": "error"}
        r = httpx.post(f"{url}/v1/chat/completions", json=GOOD)
        assert r.status_code == 503 and "secret-place" not in r.text and "log" in r.json()["error"]["message"]


def test_unknown_routes_and_methods_answer_in_openai_shape(server):
    url, _ = server
    for r, status in ((httpx.get(f"{url}/v1/nothing"), 404), (httpx.get(f"{url}/v1/chat/completions"), 405),
                      (httpx.delete(f"{url}/tokenize"), 405)):
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_post_needs_json_content_type(server):
    """A cross-site form or text/plain fetch (sent by browsers without asking) never reaches a route."""
    url, state = server
    before = state.engine.stats["requests"]
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": ctype} if ctype else {}
        r = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(GOOD).encode(), headers=headers)
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], ctype
    r = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(GOOD).encode(),
                   headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200
    assert state.engine.stats["requests"] == before + 1   # only the JSON one reached the engine


def test_body_limit_with_and_without_content_length(server):
    url, state = server
    limit = state.max_body_bytes
    big = json.dumps({**GOOD, "junk": "x" * (limit + 10)}).encode()
    r = httpx.post(f"{url}/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]

    def chunks():   # no Content-Length: the body arrives in pieces
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    r = httpx.post(f"{url}/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert httpx.post(f"{url}/v1/chat/completions", json=GOOD).status_code == 200


def test_tokenizing_and_rendering_run_off_the_event_loop(server, monkeypatch):
    """A huge message must not stall other requests: the tokenizer is never called on the event loop."""
    import asyncio

    url, state = server
    calls = []
    real = state.tokenizer.__class__.__call__

    def spy(self, *a, **kw):
        try:
            asyncio.get_running_loop()
            calls.append("event loop")
        except RuntimeError:
            calls.append("worker thread")
        return real(self, *a, **kw)

    monkeypatch.setattr(state.tokenizer.__class__, "__call__", spy)
    big = "word " * 100_000
    assert httpx.post(f"{url}/tokenize", json={"content": big}, timeout=60).status_code == 200
    r = httpx.post(f"{url}/v1/chat/completions", json={**GOOD, "messages": [{"role": "user", "content": big}]},
                   timeout=60)
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    assert calls and set(calls) == {"worker thread"}, calls


def test_loopback_server_refuses_other_host_names():
    """DNS rebinding: a page on evil.example resolves its name to 127.0.0.1; the Host header still
    says evil.example, and a loopback-only server answers only to loopback names."""
    from chatsmith.serve.guard import LOOPBACK

    state = ServerState(MODEL, allowed_hosts=set(LOOPBACK))
    load_state(state, MODEL, max_concurrency=1, kv_cache_mb=1)
    with ServerThread(state) as url:
        port = url.rsplit(":", 1)[1]
        r = httpx.post(f"{url}/v1/chat/completions", json=GOOD, headers={"Host": f"evil.example:{port}"})
        assert r.status_code == 403 and "evil.example" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/", headers={"Host": "evil.example"}).status_code == 403
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
            assert httpx.get(f"{url}/health", headers={"Host": host}).status_code == 200, host
    state.engine.stop()


def test_slow_or_silent_connections_are_closed():
    """A connection must send each request head within the header timeout, and only so many may
    be open at once (50 silent sockets used to stay open forever)."""
    import socket

    state = ServerState(MODEL)
    with ServerThread(state, header_timeout=1.0, max_connections=8) as url:
        host, port = url.removeprefix("http://").split(":")
        socks = [socket.create_connection((host, int(port))) for _ in range(12)]
        for s in socks:
            s.settimeout(5)
        socks[0].sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")   # a head that never ends
        closed = 0
        for s in socks:
            try:
                closed += s.recv(1024) == b""
            except (ConnectionResetError, TimeoutError):
                closed += 1
            s.close()
        assert closed == 12   # the 4 over the cap at once, the 8 others after the head timeout
        assert httpx.get(f"{url}/health").status_code == 503   # the server still answers (loading)


def test_streamed_request_is_refused_before_the_stream_starts_when_the_queue_is_full():
    """A full queue was a 200 with an empty stream; the openai client saw no chunk and no error."""
    from openai import OpenAI, RateLimitError

    from chatsmith.infer.sampling import SamplingParams

    state = ServerState(MODEL)
    load_state(state, MODEL, max_concurrency=1, kv_cache_mb=1, max_queue=1)
    engine = state.engine
    engine.stop()
    with ServerThread(state) as url:
        blocker = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=5))
        r = httpx.post(f"{url}/v1/chat/completions", json={**GOOD, "stream": True})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(RateLimitError):
            client.chat.completions.create(model=MODEL, messages=GOOD["messages"], stream=True)
        blocker.cancel()
        engine.start()
        assert httpx.post(f"{url}/v1/chat/completions", json={**GOOD, "stream": True}).status_code == 200
    engine.stop()


def test_abandoned_non_streamed_request_is_cancelled(server):
    """The client leaves while a non-streamed answer is generated: generation stops (it used to
    run to the end, holding a slot)."""
    import socket

    url, state = server
    engine = state.engine
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({**GOOD, "max_tokens": SLOT_TOKENS - 40, "temperature": 1.0}).encode()
    before = engine.stats["requests"]
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    deadline = time.monotonic() + 10
    while engine.stats["requests"] == before and time.monotonic() < deadline:
        time.sleep(0.01)
    s.close()
    deadline = time.monotonic() + 20
    while (not engine.recent or engine.recent[-1].id <= before or engine.running) and time.monotonic() < deadline:
        time.sleep(0.02)
    last = engine.recent[-1]
    assert last.finish_reason == "cancelled" and len(last.output) < SLOT_TOKENS - 40, (last.finish_reason,
                                                                                        len(last.output))


def test_tiny_temperature_is_greedy_and_fails_no_other_request(server):
    """temperature 1e-40 overflowed float32 and failed every running request with a 500."""
    url, _ = server
    body = {"model": MODEL, "prompt": "Tell me", "max_tokens": 12}
    greedy = httpx.post(f"{url}/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(httpx.post, f"{url}/v1/completions", json={**body, "temperature": 0}, timeout=60)
                  for _ in range(3)]
        tiny = pool.submit(httpx.post, f"{url}/v1/completions", json={**body, "temperature": 1e-40}, timeout=60)
        assert tiny.result().status_code == 200 and tiny.result().json()["choices"][0]["text"] == greedy
        assert [f.result().json()["choices"][0]["text"] for f in others] == [greedy] * 3


def test_json_mode_with_many_choices_does_not_stall_a_normal_request(server):
    """Constrained (JSON) choices are costly; they take turns within a budget per step, so a normal
    request beside 16 of them still gets a step every forward pass."""
    url, state = server
    engine = state.engine
    deferred = engine.stats.get("deferred_choices", 0)
    body = {**GOOD, "max_tokens": 60, "n": 16, "temperature": 1.0, "seed": 3,
            "response_format": {"type": "json_object"}}
    with ThreadPoolExecutor(2) as pool:
        heavy = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=120)
        time.sleep(0.2)
        normal = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 8,
                                                            "temperature": 0}, timeout=120)
        assert normal.status_code == 200 and not heavy.done()   # the normal one finished first
        answers = heavy.result().json()["choices"]
    assert len(answers) == 16 and all(isinstance(json.loads(a["message"]["content"]), dict) for a in answers
                                      if a["finish_reason"] == "stop")
    assert engine.stats.get("deferred_choices", 0) > deferred   # the costly choices did take turns


def test_client_disconnect_cancels_generation(server):
    url, state = server
    engine = state.engine
    body = {**GOOD, "max_tokens": SLOT_TOKENS - 40, "stream": True, "temperature": 1.0}
    before = engine.stats["finished"]
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (engine.stats["finished"] == before or engine.running):
        time.sleep(0.02)
    last = engine.recent[-1]
    assert last.finish_reason == "cancelled" and len(last.output) < SLOT_TOKENS - 40
    assert engine.running == 0


def test_queue_full_gets_429_with_retry_after():
    from chatsmith.infer.sampling import SamplingParams

    state = ServerState(MODEL)
    load_state(state, MODEL, max_concurrency=1, kv_cache_mb=1, max_queue=1)
    engine = state.engine
    engine.stop()  # hold the scheduler so the queue stays full
    with ServerThread(state) as url:
        blocker = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=5))
        r = httpx.post(f"{url}/v1/chat/completions", json=GOOD)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert "busy" in r.json()["error"]["message"]
        blocker.cancel()
        engine.start()
        assert httpx.post(f"{url}/v1/chat/completions", json=GOOD).status_code == 200
    engine.stop()


def test_16_concurrent_streams_equal_their_answers_alone(server):
    url, _ = server
    # Half chat, half plain completions (the random model's greedy chat answers are all blank lines).
    questions = [f"Question number {i}: " + "tell me more " * (i % 5) for i in range(16)]

    def ask(q: str, stream: bool) -> str:
        chat = len(q) % 2 == 0
        route = "chat/completions" if chat else "completions"
        body = {"model": MODEL, "max_tokens": 24, "temperature": 0, "stream": stream}
        body.update({"messages": [{"role": "user", "content": q}]} if chat else {"prompt": q})
        if not stream:
            r = httpx.post(f"{url}/v1/{route}", json=body, timeout=60)
            c = r.json()["choices"][0]
            return c["message"]["content"] if chat else c["text"]
        text = ""
        with httpx.stream("POST", f"{url}/v1/{route}", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for c in json.loads(line[6:])["choices"]:
                        text += (c["delta"].get("content") or "") if chat else c["text"]
        return text

    alone = [ask(q, stream=False) for q in questions]
    barrier = threading.Barrier(16)

    def together(q: str) -> str:
        barrier.wait()
        return ask(q, stream=True)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(together, questions))
    assert results == alone
    assert len(set(alone)) > 1


def test_cli_serve_subprocess(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    bad = subprocess.run([sys.executable, "-m", "chatsmith", "serve", MODEL, "--lora", "nopath"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--lora expects NAME=PATH, got 'nopath'" in bad.stderr
    proc = subprocess.Popen([sys.executable, "-m", "chatsmith", "serve", MODEL, "--port", str(port), "--api-key", "k",
                             "--max-concurrency", "2", "--served-name", "tiny"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        status = None
        while time.monotonic() < deadline:
            try:
                status = httpx.get(f"{url}/health", timeout=2).status_code
                if status == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert status == 200
        r = httpx.post(f"{url}/v1/chat/completions", json={**GOOD, "model": "tiny"},
                       headers={"Authorization": "Bearer k"}, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == "tiny"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---- issue 12: batched prompts, echo, the remote tokenizer (lm-evaluation-harness) ---------------------


def test_batched_prompts_get_one_choice_each_in_openai_order(server, client):
    """A list of token-id lists or of strings is a batch: choice p*n + j answers prompt p (its j-th
    sample), each exactly as the prompt alone gets it (int8 rows are batch invariant, and the j-th
    sample of a prompt draws with seed + j whatever its batch)."""
    url, state = server
    texts = ["Once upon a time", "The cat sat", "Hello"]
    ids = [state.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    kw = dict(model=MODEL, max_tokens=5, temperature=0)
    solo = [client.completions.create(prompt=p, **kw).choices[0].text for p in ids]
    for prompt in (ids, texts):
        r = client.completions.create(prompt=prompt, **kw)
        assert [c.index for c in r.choices] == [0, 1, 2] and [c.text for c in r.choices] == solo
        assert r.usage.prompt_tokens == sum(map(len, ids)) and r.usage.completion_tokens == 15
    sampled = {"model": MODEL, "max_tokens": 4, "temperature": 1.0, "seed": 7, "n": 2}
    alone = [httpx.post(f"{url}/v1/completions", json={**sampled, "prompt": p}, timeout=60).json() for p in ids[:2]]
    batch = httpx.post(f"{url}/v1/completions", json={**sampled, "prompt": ids[:2]}, timeout=60).json()
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in batch["choices"]] == [c["text"] for a in alone for c in a["choices"]]
    # echo of a batch: each choice starts with its own prompt
    echoed = client.completions.create(prompt=ids, echo=True, **kw)
    assert [c.text for c in echoed.choices] == [t + s for t, s in zip(texts, solo)]
    streamed = httpx.post(f"{url}/v1/completions", json={**kw, "prompt": texts, "stream": True}, timeout=60)
    got = ["", "", ""]
    for line in streamed.text.splitlines():
        if line.startswith("data: {"):
            for c in json.loads(line[6:])["choices"]:
                got[c["index"]] += c["text"]
    assert got == solo


BATCH_ERRORS = [
    ({"prompt": [[1, 2], [10**9]]}, "prompt[1]", "outside the vocabulary"),
    ({"prompt": [[1, 2], [-3]]}, "prompt[1]", "outside the vocabulary"),
    ({"prompt": [[1, 2], []]}, "prompt[1]", "must not be empty"),
    ({"prompt": ["a", ""]}, "prompt[1]", "must not be empty"),
    ({"prompt": [[1, 2], "a"]}, "prompt", "a list of strings or a list of token-id lists"),
    ({"prompt": [1, 2.0]}, "prompt", "a list of token ids (integers)"),
    ({"prompt": [[1]] * 129}, "prompt", "at most 128 prompts"),
    ({"prompt": [[1]] * 20, "n": 8}, "prompt", "128 choices"),
    ({"prompt": [[1], [5] * (SLOT_TOKENS + 20)]}, "prompt[1]", f"context holds {SLOT_TOKENS}"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "needs 'echo': true"),
    ({"prompt": [[5] * (SLOT_TOKENS - 1)] * 128, "echo": True, "logprobs": 20, "max_tokens": 0}, "prompt",
     "more than 524288 log-probs"),
]


@pytest.mark.parametrize("body,param,words", BATCH_ERRORS, ids=[w[:20] for _, _, w in BATCH_ERRORS])
def test_bad_batched_prompts_get_clear_errors(server, body, param, words):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and words in err["message"]


def test_remote_tokenizer_routes_as_lm_eval_calls_them(server):
    """lm-evaluation-harness's `tokenizer_backend=remote` (vLLM's routes): GET /tokenizer_info, POST
    /tokenize with {"prompt"} and /detokenize answering {"prompt"}; /tokenizer_info needs the key
    like the other native routes."""
    url, state = server
    tok = state.tokenizer
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert (info["eos_token"], info["bos_token"]) == (tok.eos_token, tok.bos_token)
    assert info["chat_template"] == tok.chat_template and info["model_max_length"] == SLOT_TOKENS
    r = httpx.post(f"{url}/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
    assert r["tokens"] == tok("hello world", add_special_tokens=False)["input_ids"]
    assert httpx.post(f"{url}/tokenize", json={"prompt": tok.eos_token}).json()["tokens"] == [tok.eos_token_id]
    assert httpx.post(f"{url}/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "hello world"
    assert httpx.post(f"{url}/tokenize", json={"prompt": "a", "content": "b"}).status_code == 400
    state.api_key = "s3cret"
    try:
        assert httpx.get(f"{url}/tokenizer_info").status_code == 401
        assert httpx.get(f"{url}/tokenizer_info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    finally:
        state.api_key = None


def test_scoring_a_large_batch_changes_no_other_answer(server):
    """Prompt log-probs are computed in the engine's prefill, within its chunk budget: a batch of
    16 long prompts scored with echo beside three greedy completions leaves their answers as they
    are alone, and every scored prompt gets all its log-probs."""
    url, _ = server
    body = {"model": MODEL, "max_tokens": 12, "temperature": 0}
    prompts = ["Once upon a time there was", "The quick brown fox", "In a galaxy far away"]
    alone = [httpx.post(f"{url}/v1/completions", json={**body, "prompt": p}, timeout=60).json()["choices"][0]["text"]
             for p in prompts]
    batch = [[(7 * i + j) % 5000 + 100 for j in range(150)] for i in range(16)]
    with ThreadPoolExecutor(4) as pool:
        scored = pool.submit(httpx.post, f"{url}/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": batch, "max_tokens": 0, "echo": True, "logprobs": 5})
        time.sleep(0.05)
        answers = [pool.submit(httpx.post, f"{url}/v1/completions", json={**body, "prompt": p}, timeout=120)
                   for p in prompts]
        assert [a.result().json()["choices"][0]["text"] for a in answers] == alone
        choices = scored.result().json()["choices"]
    assert [c["index"] for c in choices] == list(range(16))
    for c in choices:
        lp = c["logprobs"]
        assert len(lp["token_logprobs"]) == 150 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        # 5 alternatives, fewer where several tokens have the same text (the dict keeps the likelier)
        assert all(1 <= len(t) <= 5 for t in lp["top_logprobs"][1:]), [len(t) for t in lp["top_logprobs"]]
        assert all(x <= max(t.values()) + 1e-6 for x, t in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]))


def test_log_prob_answers_are_built_and_serialized_off_the_event_loop(server, monkeypatch):
    """An echoed batch may hold 2**19 log-probs (15 MB of JSON: 3 s of work here); building and
    serializing it on the event loop stalled every other request meanwhile."""
    import asyncio

    from fastapi.responses import JSONResponse

    from chatsmith.serve import jobs

    url, _ = server
    calls = []

    def where(real):
        def spy(self, *args):
            try:
                asyncio.get_running_loop()
                calls.append(f"{real.__name__} on the event loop")
            except RuntimeError:
                calls.append("worker thread")
            return real(self, *args)
        return spy

    monkeypatch.setattr(jobs._PieceText, "__call__", where(jobs._PieceText.__call__))   # building
    monkeypatch.setattr(JSONResponse, "render", where(JSONResponse.render))             # serializing
    for body in ({"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 0, "echo": True, "logprobs": 2},
                 {"prompt": "Hello", "max_tokens": 2, "logprobs": 1}):
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, **body}, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert calls and set(calls) == {"worker thread"}, calls
