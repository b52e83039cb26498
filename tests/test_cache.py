"""The response cache: the guard's refusals, exact and semantic tiers, TTL and LRU eviction,
persistence, the built-in paraphrase / near-miss set against GPTCache-style matching, and the
cache in `chatsmith serve` over real HTTP through the official openai client (hits, misses,
streamed replay, /metrics, a server restart)."""

from __future__ import annotations

import time

import httpx
import pytest

from chatsmith.cache import CacheKey, ResponseCache
from chatsmith.cache.guard import refusal
from chatsmith.serve.app import ServerState, ServerThread, load_state

MODEL = "tiny-random-llama"


@pytest.fixture(scope="module")
def embedder():
    from chatsmith.embed import shared_embedder

    return shared_embedder()


@pytest.mark.parametrize("a, b, why", [
    ("How do I enable the firewall?", "How do I not enable the firewall?", "negation"),
    ("Why doesn't my code compile?", "Why does my code compile?", "negation"),
    ("Book a table for 2 people.", "Book a table for 4 people.", "numbers"),
    ("Book a table for 2 people.", "Book a table for 2.5 people.", "numbers"),
    ("What is the capital of France?", "What is the capital of Spain?", "entities"),
    ('Translate "good morning" to French.', 'Translate "good night" to French.', "quoted"),
    ("How do I increase the volume?", "How do I decrease the volume?", "opposites"),
    ("Tell me a joke about cats.", "Tell me a joke about dogs.", "substitution"),
])
def test_guard_refuses_near_misses(a, b, why):
    assert refusal(a, b) == why and refusal(b, a) == why


@pytest.mark.parametrize("a, b", [
    ("Book a table for 2 people.", "Reserve a table for two people."),
    ("Why doesn't my code compile?", "Why does my code not compile?"),
    ("what is the capital of france", "What is France's capital?"),
    ("Write a haiku about autumn.", "Compose a haiku about autumn."),
    ("How do I change a flat tire?", "How do I change a flat tyre?"),
])
def test_guard_lets_paraphrases_through(a, b):
    assert refusal(a, b) is None


def _key(messages, settings=None):
    return CacheKey.from_messages(settings or {"model": "m", "temperature": 0}, messages, repr(messages))


def _answer(text):
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


def test_exact_and_semantic_tiers_ttl_lru_and_persistence(tmp_path, embedder):
    path = tmp_path / "c.db"
    sys_a = {"role": "system", "content": "Be brief."}
    q = [sys_a, {"role": "user", "content": "How do I reset my password?"}]
    cache = ResponseCache(path, semantic=True, embedder=embedder, max_entries=3)
    assert cache.lookup(_key(q)).hit is None
    cache.store(_key(q), _answer("Click 'forgot password'."))
    hit = cache.lookup(_key(q)).hit
    assert hit.tier == "exact" and hit.response["choices"][0]["message"]["content"] == "Click 'forgot password'."
    para = [sys_a, {"role": "user", "content": "What are the steps to reset my password?"}]
    hit = cache.lookup(_key(para)).hit
    assert hit.tier == "semantic" and hit.similarity > 0.8 and hit.cached_prompt == "How do I reset my password?"
    neg = cache.lookup(_key([sys_a, {"role": "user", "content": "Why can't I reset my password?"}]))
    assert neg.hit is None and neg.refused == "negation"
    # A different system prompt, earlier turns or settings: never the same entry.
    assert cache.lookup(_key([{"role": "system", "content": "Answer in French."}, para[1]])).hit is None
    assert cache.lookup(_key([sys_a, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                              para[1]])).hit is None
    assert cache.lookup(_key(q, {"model": "m", "temperature": 0, "max_tokens": 9})).hit is None
    assert cache.counts == {"miss": 5, "stored": 1, "exact": 1, "semantic": 1, "refused_negation": 1}

    # LRU: a fourth entry evicts the least recently used one (q was used last, so it stays).
    others = [[{"role": "user", "content": f"Question number {i} about a topic {i}?"}] for i in range(3)]
    cache.store(_key(others[0]), _answer("0"))
    cache.store(_key(others[1]), _answer("1"))
    cache.lookup(_key(q))
    assert cache.store(_key(others[2]), _answer("2")) == 1
    assert cache.lookup(_key(others[0])).hit is None and cache.lookup(_key(q)).hit is not None
    assert len(cache) == 3
    cache.close()

    # Persistence: a new process (a new ResponseCache on the same file) finds both tiers.
    again = ResponseCache(path, semantic=True, embedder=embedder, max_entries=3)
    assert again.lookup(_key(q)).hit.tier == "exact"
    assert again.lookup(_key(para)).hit.tier == "semantic"
    again.close()

    # TTL: entries older than ttl are gone, for both tiers.
    short = ResponseCache(path, semantic=True, embedder=embedder, ttl=0.3)
    short.store(_key(others[1]), _answer("fresh"))
    time.sleep(0.5)
    assert short.lookup(_key(q)).hit is None and short.lookup(_key(para)).hit is None
    assert short.lookup(_key(others[1])).hit is None and len(short) == 0


def test_builtin_set_hit_and_false_hit_rates_vs_last_message_matching(embedder):
    from chatsmith.cache import DEFAULT_THRESHOLD
    from chatsmith.cache.pairs import builtin_pairs, evaluate

    pairs = builtin_pairs()
    assert len(pairs) > 350 and sum(p.should_hit for p in pairs) > 90
    vectors: dict = {}   # each text embedded once, in one batch, for both methods
    ours = evaluate(pairs, DEFAULT_THRESHOLD, embedder=embedder, vectors=vectors)
    gptcache = evaluate(pairs, DEFAULT_THRESHOLD, embedder=embedder, last_message=True, vectors=vectors)
    assert ours.hit_rate > 0.85 and ours.false_hit_rate < 0.02 and ours.wrong_entry == 0, ours.to_dict()
    for kind in ("system prompt", "earlier turns", "negation", "numbers", "entities", "quoted"):
        assert ours.by_kind[kind]["false_hits"] == 0, (kind, ours.by_kind[kind])
    # Last-message matching answers paraphrases too, but also most near misses and every
    # paraphrase asked under another system prompt or after other turns.
    assert gptcache.false_hit_rate > 0.5 and gptcache.by_kind["system prompt"]["false_hits"] > 80


# ---- in the server, over HTTP ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory):
    return tmp_path_factory.mktemp("cache") / "responses.db"


@pytest.fixture(scope="module")
def server(cache_path, embedder):
    state = ServerState(MODEL, cache=ResponseCache(cache_path, semantic=True, embedder=embedder))
    with ServerThread(state) as url:
        load_state(state, MODEL, max_concurrency=4, kv_cache_mb=8)
        yield url, state
        state.engine.stop()
        state.cache.close()


def _client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def _metrics(url):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text)
            for s in f.samples}


SYS = {"role": "system", "content": "You are helpful."}
KW = dict(model=MODEL, max_tokens=12, temperature=1.0, seed=7)


def test_server_cache_hits_misses_streams_and_metrics(server):
    url, state = server
    client = _client(url)
    msgs = [SYS, {"role": "user", "content": "How do I reset my password?"}]
    first = client.chat.completions.create(messages=msgs, **KW)
    assert first.model_extra.get("cache") is None and first.choices[0].message.content
    generated = state.engine.stats["generated_tokens"]
    raw = client.chat.completions.with_raw_response.create(messages=msgs, **KW)
    second = raw.parse()
    assert raw.headers["x-chatsmith-cache"] == "exact" and second.cache["tier"] == "exact"
    assert second.choices[0].message.content == first.choices[0].message.content and second.id != first.id
    assert second.usage.completion_tokens == first.usage.completion_tokens
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    assert state.engine.stats["generated_tokens"] == generated   # a hit generates nothing (latency: benchmarks/)

    # The same request streamed: replayed as a stream of the same text, with the usage.
    chunks = list(client.chat.completions.create(messages=msgs, stream=True, stream_options={"include_usage": True},
                                                 **KW))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == first.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2
    assert chunks[0].cache["tier"] == "exact" and chunks[-1].usage.completion_tokens == first.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == first.choices[0].finish_reason

    # A paraphrase in a new conversation with the same system prompt: the semantic tier.
    para = client.chat.completions.create(messages=[SYS, {"role": "user", "content":
                                                          "What are the steps to reset my password?"}], **KW)
    assert para.cache["tier"] == "semantic" and para.choices[0].message.content == first.choices[0].message.content
    # Near misses and other contexts are generated, not served from the cache.
    for other in ([SYS, {"role": "user", "content": "Why can't I reset my password?"}],
                  [{"role": "system", "content": "You are a pirate."}, msgs[1]],
                  [SYS, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, msgs[1]]):
        assert client.chat.completions.create(messages=other, **KW).model_extra.get("cache") is None
    # Other settings, or an unseeded sample, miss too (and the sample is never stored).
    assert client.chat.completions.create(messages=msgs, **{**KW, "max_tokens": 11}).model_extra.get("cache") is None
    unseeded = {**KW, "seed": None}
    client.chat.completions.create(messages=msgs, **unseeded)
    assert client.chat.completions.create(messages=msgs, **unseeded).model_extra.get("cache") is None

    m = _metrics(url)
    lookups = {dict(k)["result"]: v for (n, k), v in m.items() if n == "chatsmith_cache_lookups_total"}
    assert lookups == {"exact": 2, "semantic": 1, "miss": 5}
    assert m[("chatsmith_cache_guard_refusals_total", (("reason", "negation"),))] == 1
    assert m[("chatsmith_cache_stores_total", ())] == 5


def test_streamed_generation_is_stored_and_replayed(server):
    url, _ = server
    client = _client(url)
    msgs = [SYS, {"role": "user", "content": "Name three rivers."}]
    live = "".join(c.choices[0].delta.content or "" for c in
                   client.chat.completions.create(messages=msgs, stream=True, **KW) if c.choices)
    again = client.chat.completions.create(messages=msgs, **KW)
    assert again.cache["tier"] == "exact" and again.choices[0].message.content == live


def test_cache_survives_a_server_restart(server, cache_path, embedder):
    url, state = server
    msgs = [SYS, {"role": "user", "content": "Tell me about the ocean."}]
    before = _client(url).chat.completions.create(messages=msgs, **KW)
    state2 = ServerState(MODEL, cache=ResponseCache(cache_path, semantic=True, embedder=embedder))
    with ServerThread(state2) as url2:
        load_state(state2, MODEL, max_concurrency=2, kv_cache_mb=4)
        try:
            after = _client(url2).chat.completions.create(messages=msgs, **KW)
        finally:
            state2.engine.stop()
            state2.cache.close()
    assert after.cache["tier"] == "exact" and after.choices[0].message.content == before.choices[0].message.content
