"""The server's side of the response cache: which chat requests may be cached, the key of one,
and a cached answer replayed as one JSON response or as a stream of server-sent events.

Only deterministic requests are cached (temperature 0, or a fixed seed), and not those asking for
log-probs. A streamed generation is stored once its stream has finished normally (a client that
left mid-answer stores nothing), so a later identical request, streamed or not, replays it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from chatsmith.cache.store import CacheHit, CacheKey, ResponseCache

# Fields of a chat request that change its answer (besides the messages, model and adapter).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed", "stop", "n")


def cacheable(body: Any) -> bool:
    """Whether a chat request's answer may come from (and go to) the cache."""
    deterministic = body.temperature == 0 or body.seed is not None
    return deterministic and not body.logprobs


def request_key(state: Any, body: Any, messages: list[dict[str, str]], prompt_ids: list[int],
                adapter: str | None, extra: dict[str, Any] | None = None) -> CacheKey:
    """The cache key of a chat request: the served model's fingerprint, the adapter, the template,
    every sampling setting, the answer's length limit and format, `extra` (the knowledge base's
    settings and generation, when one is used) and the whole rendered prompt."""
    settings = {"model": state.model_name, "fingerprint": state.fingerprint, "adapter": adapter,
                "template": state.template, "max_tokens": body.max_completion_tokens or body.max_tokens,
                "response_format": body.response_format.type if body.response_format else None,
                **{f: getattr(body, f) for f in SAMPLING_FIELDS}, **(extra or {})}
    return CacheKey.from_messages(settings, messages, prompt_ids)


def _marked(response: dict[str, Any], hit: CacheHit, prompt_tokens: int, model: str) -> dict[str, Any]:
    out = dict(response)
    out["id"] = "chatcmpl-" + uuid.uuid4().hex[:24]
    out["created"] = int(time.time())
    out["model"] = model
    usage = dict(out.get("usage") or {})
    completion = int(usage.get("completion_tokens", 0))
    out["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion}
    out["cache"] = {"tier": hit.tier, "similarity": round(hit.similarity, 4), "age_s": round(hit.age, 1)}
    if hit.cached_prompt is not None:
        out["cache"]["cached_prompt"] = hit.cached_prompt
    return out


def replay_json(hit: CacheHit, prompt_tokens: int, model: str) -> dict[str, Any]:
    """A cached chat completion as a fresh response (new id and time, this request's prompt
    tokens), marked with `"cache": {"tier", "similarity", "age_s"}`."""
    return _marked(hit.response, hit, prompt_tokens, model)


async def replay_stream(hit: CacheHit, prompt_tokens: int, model: str, include_usage: bool) -> AsyncIterator[str]:
    """A cached chat completion as server-sent events shaped like a live stream: a role chunk per
    choice, the text in word-sized pieces, a finish chunk, the usage (when asked), [DONE]."""
    r = _marked(hit.response, hit, prompt_tokens, model)
    head = {"id": r["id"], "object": "chat.completion.chunk", "created": r["created"], "model": model,
            "system_fingerprint": r.get("system_fingerprint"), "cache": r["cache"]}
    extra = {k: r[k] for k in ("sources",) if k in r}

    def event(choice: dict[str, Any], **more: Any) -> str:
        return f"data: {json.dumps({**head, **more, 'choices': [choice]})}\n\n"

    for c in r["choices"]:
        yield event({"index": c["index"], "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                     "logprobs": None}, **extra)
    for c in r["choices"]:
        for piece in re.findall(r"\s*\S+|\s+$", c["message"]["content"] or ""):
            yield event({"index": c["index"], "delta": {"content": piece}, "finish_reason": None, "logprobs": None})
            await asyncio.sleep(0)
        yield event({"index": c["index"], "delta": {}, "finish_reason": c["finish_reason"], "logprobs": None})
    if include_usage:
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': r['usage']})}\n\n"
    yield "data: [DONE]\n\n"


async def stream_and_store(events: AsyncIterator[str], job: Any, cache: ResponseCache, key: CacheKey,
                           on_store: Any = None, extra: dict[str, Any] | None = None) -> AsyncIterator[str]:
    """Pass a live stream through; once it has ended normally (every choice finished, no error),
    store the whole response under `key`, before the closing `data: [DONE]`: a client that asks
    again as soon as its stream has ended must find the entry. `on_store(evicted)` is told about
    each store."""
    failed = False
    held: list[str] = []
    async for ev in events:
        if ev.startswith('data: {"error"'):
            failed = True
        if ev.startswith("data: [DONE]"):
            held.append(ev)
            continue
        yield ev
    if not failed and all(r.finished and r.finish_reason in ("stop", "length") for r in job.requests):
        response = {**job._response(), **(extra or {})}
        evicted = await asyncio.to_thread(cache.store, key, response)
        if on_store is not None:
            on_store(evicted)
    for ev in held:
        yield ev
