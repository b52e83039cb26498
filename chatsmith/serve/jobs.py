"""One OpenAI generation request: its engine requests (n per prompt; a completion request may
carry a batch of prompts), their events bridged from the engine's thread into asyncio, and the
OpenAI response (or stream of chunks) made from them. Choice i answers prompt i // n, as OpenAI orders them.

The engine gives each token with the text it made safe to show (its one detokenizer holds back
partial characters and what may start a stop string); this module only formats.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import Request

from chatsmith.errors import ChatsmithError
from chatsmith.serve.schemas import APIError

# The engine's finish reasons -> OpenAI's. A cancelled request has no client left to tell.
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop"}


class GenerationJob:
    """A chat or text completion: `run()` for one JSON answer, `stream()` for server-sent events."""

    def __init__(self, state: Any, kind: str, prompts: list[list[int]], params: list[Any], n: int,
                 adapter: str | None, model_name: str, *, logprobs: bool = False, json_mode: bool = False,
                 echo: list[str] | None = None, prompt_logprobs: bool = False, constraint: Any = None,
                 tools: Any = None) -> None:
        self.state, self.kind, self.prompts, self.params, self.n = state, kind, prompts, params, n
        self.adapter, self.model_name, self.want_logprobs, self.echo = adapter, model_name, logprobs, echo
        if json_mode and constraint is None:
            from chatsmith.infer.constraints import JsonObjectConstraint

            constraint = lambda: JsonObjectConstraint(state.tokenizer)   # noqa: E731
        self.make_constraint = constraint   # a factory: each choice is generated under its own constraint
        self.tools = tools                  # serve/tools.py ToolParsing: answers are read for tool calls
        # serve/moderation.py: a chat answer the gate flags ends with finish_reason "content_filter"
        self.moderator = getattr(state, "moderator", None) if kind == "chat.completion" else None
        self.filtered: set[int] = set()
        self.prompt_logprobs = prompt_logprobs   # echo the prompt tokens' log-probs before the generated ones
        self.choices = len(prompts) * n
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.requests: list[Any] = []
        self.start = time.monotonic()

    def submit(self) -> asyncio.Queue:
        """Queue the n requests in the engine; their events arrive on the returned asyncio queue as
        ("token", choice, token count so far, text, request) and ("done", choice, 0, "", request)."""
        from chatsmith.infer.engine import EngineBusy, RequestTooLarge

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        engine = self.state.engine
        constraint = None
        try:
            for i in range(self.choices):
                def on_token(req: Any, tok: int, lp: float, text: str, i: int = i) -> None:
                    loop.call_soon_threadsafe(queue.put_nowait, ("token", i, len(req.output), text, req))

                def on_finish(req: Any, i: int = i) -> None:
                    loop.call_soon_threadsafe(queue.put_nowait, ("done", i, 0, "", req))

                if self.make_constraint is not None:
                    constraint = self.make_constraint()
                prompt, params = self.prompts[i // self.n], self.params[i // self.n]
                # seed + j for the j-th choice of a prompt: a prompt's answers do not depend on its batch.
                seed = None if params.seed is None else params.seed + i % self.n
                # The queue limit admits or refuses the whole request at its first choice, never a part.
                self.requests.append(engine.submit(prompt, params, adapter=self.adapter, seed=seed,
                                                   on_token=on_token, on_finish=on_finish, constraint=constraint,
                                                   group=self.id, check_queue=i == 0))
        except EngineBusy as e:
            self.cancel()
            raise APIError(429, f"the server is busy: {e}", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except RequestTooLarge as e:
            self.cancel()
            raise APIError(400, str(e), code="context_length_exceeded") from None
        except ChatsmithError as e:
            self.cancel()
            raise APIError(400, str(e)) from None
        self.state.metrics.submitted(sum(map(len, self.prompts)) * self.n)
        return queue

    def cancel(self) -> None:
        """Cancel every engine request of this job that is still running."""
        for r in self.requests:
            if not r.finished:
                r.cancel()

    # ---- formatting ------------------------------------------------------------------------------

    def _usage(self) -> dict[str, int]:
        prompt = sum(map(len, self.prompts))   # each prompt once, whatever n (as OpenAI counts)
        completion = sum(len(r.output) for r in self.requests)
        # OpenAI's prompt_tokens_details.cached_tokens: the prompt tokens the prefix cache held.
        cached = min(prompt, sum(getattr(r, "reused", 0) for r in self.requests))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _logprob_entries(self, req: Any, start: int, end: int) -> list[dict[str, Any]]:
        tok = self.state.tokenizer
        out = []
        for j in range(start, end):
            t = req.output[j]
            piece = tok.decode([t])
            entry: dict[str, Any] = {"token": piece, "logprob": req.logprobs[j], "bytes": list(piece.encode())}
            if req.top_logprobs:
                entry["top_logprobs"] = [{"token": tok.decode([a]), "logprob": lp, "bytes": list(tok.decode([a]).encode())}
                                         for a, lp in req.top_logprobs[j]]
            else:
                entry["top_logprobs"] = []
            out.append(entry)
        return out

    def _completion_logprobs(self, r: Any, echo: str | None) -> dict[str, Any]:
        """OpenAI's legacy logprobs object. With echo and prompt log-probs: the prompt's tokens first
        (the first one's log-prob and alternatives null, as OpenAI gives them), then the generated ones."""
        text = _PieceText(self.state.tokenizer)
        alternatives = r.params.top_logprobs > 0
        tokens, logprobs, top, offsets, pos = [], [], [], [], 0
        if self.prompt_logprobs and r.prompt_logprobs is not None:
            alternatives = alternatives or r.params.prompt_logprobs > 0
            for j, (t, lp) in enumerate(zip(r.prompt, r.prompt_logprobs)):
                piece = text(t)
                tokens.append(piece)
                logprobs.append(lp)
                top.append(None if j == 0 else _top_dict(text, r.prompt_top_logprobs[j]))
                offsets.append(pos)
                pos += len(piece)
        if echo is not None:
            pos = len(echo)   # the generated text starts after the echoed prompt
        for j, t in enumerate(r.output):
            piece = text(t)
            tokens.append(piece)
            logprobs.append(r.logprobs[j])
            top.append(_top_dict(text, r.top_logprobs[j]) if r.top_logprobs else {})
            offsets.append(pos)
            pos += len(piece)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top if alternatives else None,
                "text_offset": offsets}

    def _record(self) -> None:
        m = self.state.metrics
        for r in self.requests:
            ttft = (r.first_token_at - r.arrival) if r.first_token_at else None
            m.finished(len(r.output), time.monotonic() - self.start, ttft, getattr(r, "reused", 0))

    def _response(self) -> dict[str, Any]:
        choices = []
        for i, r in enumerate(self.requests):
            text = r.detok.text
            finish = FINISH_REASONS[r.finish_reason]
            echo = self.echo[i // self.n] if self.echo is not None else None
            if self.kind == "chat.completion":
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if i in self.filtered:   # the moderation gate flagged this answer: none of it is given
                    message, finish = {"role": "assistant", "content": None}, "content_filter"
                elif self.tools is not None:
                    from chatsmith.data.tools import openai_call, parse_tool_calls

                    parsed = parse_tool_calls(text, self.tools.names, self.tools.parallel)
                    if parsed.calls:
                        message = {"role": "assistant", "content": parsed.content,
                                   "tool_calls": [openai_call(c) for c in parsed.calls]}
                        finish = "tool_calls" if finish == "stop" else finish
                choice: dict[str, Any] = {"index": i, "message": message, "finish_reason": finish,
                                          "logprobs": {"content": self._logprob_entries(r, 0, len(r.output))}
                                          if self.want_logprobs else None}
            else:
                choice = {"index": i, "text": (echo or "") + text, "finish_reason": finish,
                          "logprobs": self._completion_logprobs(r, echo) if self.want_logprobs else None}
            choices.append(choice)
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model_name,
                "choices": choices, "usage": self._usage(), "system_fingerprint": self.state.fingerprint}

    def _chunk(self, i: int, text: str | None, finish: str | None, req: Any = None,
               lp_range: tuple[int, int] | None = None, first: bool = False,
               calls: list[dict[str, Any]] | None = None) -> str:
        if self.kind == "chat.completion":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = calls
            choice: dict[str, Any] = {"index": i, "delta": delta, "finish_reason": finish}
            if self.want_logprobs:
                choice["logprobs"] = ({"content": self._logprob_entries(req, *lp_range)}
                                      if req is not None and lp_range and lp_range[1] > lp_range[0] else None)
            obj = "chat.completion.chunk"
        else:
            choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        data = {"id": self.id, "object": obj, "created": self.created, "model": self.model_name,
                "system_fingerprint": self.state.fingerprint, "choices": [choice]}
        return f"data: {json.dumps(data)}\n\n"

    async def _flagged(self, i: int, text: str) -> bool:
        """Whether the gate flags choice i's answer so far; a flagged choice's generation is cancelled."""
        from chatsmith.serve.moderation import moderate

        if not (await moderate(self.state, [text], "answer"))[0].flagged:
            return False
        self.filtered.add(i)
        self.requests[i].cancel()
        return True

    def _tool_chunks(self, i: int, events: list[tuple[str, Any]], called: list[int], req: Any,
                     lp_range: tuple[int, int]) -> list[str]:
        """Chunks of a tools request's events: content deltas, and each call whole in one delta
        (id, type, name and the complete arguments string) at its index, as OpenAI's stream shapes them."""
        from chatsmith.data.tools import openai_call

        out = []
        for kind, value in events:
            if kind == "content":
                out.append(self._chunk(i, value, None, req, lp_range))
            else:
                call = openai_call(value)
                out.append(self._chunk(i, None, None, req, lp_range, calls=[{"index": called[i], **call}]))
                called[i] += 1
            lp_range = (lp_range[1], lp_range[1])   # the log-probs go with the first chunk only
        if not events and self.want_logprobs and lp_range[1] > lp_range[0]:
            out.append(self._chunk(i, None, None, req, lp_range))
        return out

    # ---- the two ways to answer ------------------------------------------------------------------

    async def run(self, request: Request) -> dict[str, Any]:
        """Wait for every choice and return the whole response. The client leaving cancels the
        generation at once (the body was read whole, so the next message is the disconnect)."""
        queue = self.submit()
        left = asyncio.ensure_future(_disconnected(request))
        try:
            remaining = self.choices
            while remaining:
                event = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({event, left}, return_when=asyncio.FIRST_COMPLETED)
                if event not in done:
                    event.cancel()
                    raise APIError(499, "the client disconnected; generation was cancelled", code="client_closed")
                if event.result()[0] == "done":
                    remaining -= 1
        finally:
            left.cancel()
            self.cancel()
        self._record()
        errors = [r.error for r in self.requests if r.finish_reason == "error"]
        if errors:
            raise APIError(500, f"generation failed: {errors[0]}", type="server_error")
        if self.moderator is not None:
            from chatsmith.serve.moderation import moderate

            verdicts = await moderate(self.state, [r.detok.text for r in self.requests], "answer")
            self.filtered = {i for i, v in enumerate(verdicts) if v.flagged}
        if self.want_logprobs:   # up to 2**19 log-prob entries (echoed batches): built off the event loop
            return await asyncio.to_thread(self._response)
        return self._response()

    async def stream(self, queue: asyncio.Queue, include_usage: bool) -> Any:
        """Server-sent events from an admitted job (`submit()` gave `queue`): a role chunk, text
        chunks as the engine makes them safe to show, one chunk with each choice's finish reason,
        the usage (when asked), then [DONE]. A client that leaves cancels the generation."""
        logged = [0] * self.choices      # log-prob entries already sent per choice
        remaining = self.choices
        parsers, called = None, [0] * self.choices   # tool calls: one parser per choice, calls sent per choice
        said, held = [""] * self.choices, [""] * self.choices   # moderation: text sent, text held for the next check
        if self.tools is not None and self.kind == "chat.completion":
            from chatsmith.data.tools import ToolCallStream

            parsers = [ToolCallStream(self.tools.names, self.tools.parallel) for _ in range(self.choices)]
        try:
            if self.kind == "chat.completion":
                for i in range(self.choices):
                    yield self._chunk(i, "", None, first=True)
            elif self.echo:
                for i in range(self.choices):
                    yield self._chunk(i, self.echo[i // self.n], None)
            while remaining:
                kind, i, count, text, req = await queue.get()
                if i in self.filtered:   # cut by the moderation gate: its slot is freed, its events ignored
                    remaining -= kind == "done"
                    continue
                if kind == "token" and text and self.moderator is not None:
                    # Text is held until the gate has seen it (every piece for rules, every
                    # check_every characters for a classifier); a flagged piece is never sent.
                    held[i] += text
                    if len(held[i]) < self.moderator.check_every:
                        continue
                    if await self._flagged(i, said[i] + held[i]):
                        yield self._chunk(i, None, "content_filter", req, (logged[i], logged[i]))
                        continue
                    text, said[i], held[i] = held[i], said[i] + held[i], ""
                if kind == "token":
                    if text and parsers is not None:
                        for chunk in self._tool_chunks(i, parsers[i].push(text), called, req, (logged[i], count)):
                            yield chunk
                        logged[i] = count
                    elif text:
                        yield self._chunk(i, text, None, req, (logged[i], count))
                        logged[i] = count
                    continue
                remaining -= 1
                if req.finish_reason == "error":
                    err = APIError(500, f"generation failed: {req.error}", type="server_error").body()
                    yield f"data: {json.dumps(err)}\n\n"
                    continue
                end = len(req.output)
                finish = FINISH_REASONS[req.finish_reason]
                tail = req.tail
                if self.moderator is not None:
                    tail = held[i] + (tail or "")
                    if tail and await self._flagged(i, said[i] + tail):
                        yield self._chunk(i, None, "content_filter", req, (logged[i], logged[i]))
                        continue
                if parsers is not None:
                    events = parsers[i].push(tail) + parsers[i].finish() if tail else parsers[i].finish()
                    for chunk in self._tool_chunks(i, events, called, req, (logged[i], end)):
                        yield chunk
                    logged[i] = end
                    yield self._chunk(i, None, "tool_calls" if called[i] and finish == "stop" else finish, req,
                                      (end, end))
                else:
                    yield self._chunk(i, tail, finish, req, (logged[i], end))
                logged[i] = end
            self._record()
            if include_usage:
                data = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat.completion"
                        else "text_completion", "created": self.created, "model": self.model_name,
                        "system_fingerprint": self.state.fingerprint, "choices": [], "usage": self._usage()}
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            # A client that goes away mid-stream lands here (the task is cancelled): free its slots.
            self.cancel()


class _PieceText:
    """The text of one token id, decoded once per answer (an echoed batch repeats ids a lot)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.known = tokenizer, {}

    def __call__(self, token: int) -> str:
        piece = self.known.get(token)
        if piece is None:
            piece = self.known[token] = self.tokenizer.decode([token])
        return piece


def _top_dict(text: _PieceText, alternatives: list[tuple[int, float]]) -> dict[str, float]:
    """{token text: log-prob} of the most likely tokens, most likely first. Tokens with the same
    text (e.g. partial UTF-8 bytes) keep the higher log-prob, so the top value stays the top value."""
    out: dict[str, float] = {}
    for a, lp in alternatives:
        out.setdefault(text(a), lp)
    return out


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the request's body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
