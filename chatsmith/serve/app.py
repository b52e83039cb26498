"""`chatsmith serve`: an OpenAI-compatible HTTP server and a web chat page over the engine.

The server knows HTTP, not tensors (STYLE.md, principle 4): it validates a request, renders the
conversation with the one template function, submits token ids to `chatsmith.infer.engine.Engine`
(which runs in its own thread), and turns the ids it gets back into text and JSON.

Routes (llama.cpp's server is the model for the native ones):
- OpenAI: POST /v1/chat/completions (tools, tool_choice and json_schema: serve/tools.py),
  POST /v1/completions (suffix: serve/infill.py), GET /v1/models, POST /v1/embeddings,
  POST /v1/moderations (serve --moderation: serve/moderation.py)
- native: GET /health (503 while loading), GET /metrics (Prometheus), POST /infill (llama.cpp's code
  infill, FIM models; serve/infill.py), POST /tokenize,
  POST /detokenize, POST /apply-template, GET /tokenizer_info (vLLM's; lm-evaluation-harness's
  remote tokenizer uses it with /tokenize and /detokenize)
- GET /: the web chat page (static files in chatsmith/serve/static, no CDN)
- GET /openapi.json: the API's schema (request bodies and the OpenAI error shape of every 4xx)

/v1/completions takes a batch of prompts (OpenAI's choice order) and, with `echo` and `logprobs`,
returns the prompt tokens' log-probs from the engine's prefill (multiple-choice scoring in
lm-evaluation-harness; docs/serve.md).

A request can only fail itself: serve/guard.py checks host, content type, key and body size before
any route runs; tokenizing and template rendering run in a worker thread, never on the event loop;
a request is validated and admitted to the engine before its response (or stream) starts; a
client that leaves cancels its generation, streamed or not; and the engine isolates errors per
request (infer/engine.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatsmith.cache.serving import cacheable, replay_json, replay_stream, request_key, stream_and_store
from chatsmith.embed import DEFAULT_MODEL as EMBEDDING_MODEL
from chatsmith.embed import Embedder, shared_embedder
from chatsmith.embed import available as embeddings_available
from chatsmith.errors import ChatsmithError
from chatsmith.serve import http
from chatsmith.serve.guard import LOOPBACK, RequestGuard
from chatsmith.serve.jobs import GenerationJob
from chatsmith.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from chatsmith.serve.metrics import Metrics
from chatsmith.serve.schemas import (
    MAX_PROMPTS,
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    InfillRequest,
    ModerationRequest,
    TokenizeRequest,
    openapi_body,
    openapi_components,
    parse_body,
)
from chatsmith.serve.tools import tool_plan

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_STOP_STRINGS, MAX_STOP_CHARS = 8, 256   # a stop string holds its length of text back while streaming
# Echoed prompt log-probs (and their alternatives) in one answer: each is a JSON entry and Python
# objects while the answer is built, so a 4 MB body of token ids must not become gigabytes.
MAX_PROMPT_LOGPROBS = 2**19


@dataclass
class ServerState:
    """What the routes share. `engine` is None until the model has loaded (then /health says 200)."""

    model_name: str
    api_key: str | None = None
    # Host header values served (None: any). Loopback-only servers answer to loopback names only.
    allowed_hosts: set[str] | None = None
    max_body_bytes: int = 4 * 2**20
    body_timeout: float = 30.0
    engine: Any = None
    tokenizer: Any = None
    template: str | None = None
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(default_factory=Metrics)
    embedder: Embedder = field(default_factory=shared_embedder)
    # What the OpenAI API calls the backend configuration: chatsmith's version, the model and precision.
    fingerprint: str = "fp_chatsmith"
    cache: Any = None   # a chatsmith.cache.ResponseCache (serve --cache)
    kb: Any = None      # a chatsmith.kb.prompt.Retriever (serve --kb)
    moderator: Any = None   # serve --moderation: a chatsmith.serve.moderation rules or classifier gate

    @property
    def ready(self) -> bool:
        """Whether the model has loaded and the engine runs."""
        return self.engine is not None


def load_state(state: ServerState, model: str, *, precision: str = "auto", max_concurrency: int = 16,
               kv_cache_mb: float | None = 2048, max_queue: int = 64, loras: dict[str, str] | None = None,
               template: str | None = None, trust_remote_code: bool = False, engine: str = "builtin",
               max_memory: str | None = None, quantization: str | None = None, prefix_cache: bool = True,
               threads: int | None = None) -> None:
    """Load the model and start the engine; sets `state.engine` last, so /health turns 200 only when ready.
    prefix_cache: the builtin engine reuses the KV cache of earlier requests' shared starts (infer/engine.py).
    threads: torch's thread count, fixed (None: torch's own, and the builtin engine's governor may use 1
    under load, infer/threads.py).
    engine: "builtin" (chatsmith's) or "vllm" (infer/vllm_engine.py: a CUDA GPU and the vllm extra;
    precision and kv_cache_mb are then vLLM's own choices). max_memory (--max-memory: disk offload) and
    quantization ("8bit"/"4bit": bitsandbytes) are the builtin engine's, which then decodes in "module"."""
    try:
        from chatsmith.infer.engine import Engine, resolve_precision
        from chatsmith.models import load_model
        from chatsmith.models.loading import check_load_options, offload_fast_path

        offload_flag = check_load_options(precision, max_memory, quantization)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        m, tok = load_model(model, trust_remote_code=trust_remote_code, max_memory=max_memory,
                            quantization=quantization)
        if engine == "vllm":
            from chatsmith.infer.vllm_engine import VllmEngine

            precision = "vllm"
            engine = VllmEngine(m, tok, max_batch_size=max_concurrency, max_queue=max_queue, adapters=loras or None)
        else:
            precision = "module" if offload_flag else resolve_precision(m, precision)
            engine = Engine(m, tok, max_batch_size=max_concurrency, precision=precision, kv_cache_mb=kv_cache_mb,
                            max_queue=max_queue, adapters=loras or None, prefix_cache=prefix_cache,
                            fast_path=offload_fast_path(m) if offload_flag else True,
                            adaptive_threads=threads is None)
        from chatsmith.infer.sampling import SamplingParams

        engine.generate([[tok.eos_token_id or 0]], SamplingParams(temperature=0, max_new_tokens=2))  # warm-up
        engine.start()
        state.tokenizer, state.template = tok, template
        state.fingerprint = _fingerprint(model, precision, engine)
        state.engine = engine
        log.info("serving %s (%s precision, %d slots of %d tokens)", model, precision, max_concurrency,
                 engine.slot_tokens)
    except Exception as e:  # /health says "error"; the log has the reason, the process stays up
        log.exception("loading %s failed", model)
        state.load_error = f"{type(e).__name__}: {e}"


def _fingerprint(model: str, precision: str, engine: Any) -> str:
    """A short hash of what shapes the answers: chatsmith's and torch's versions, the model
    argument, its weights' shapes and dtypes, the precision and the served adapters."""
    import hashlib

    import torch

    from chatsmith import __version__

    shapes = ",".join(f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in engine.model.named_parameters())
    key = "|".join([__version__, torch.__version__, model, precision, shapes, ",".join(engine.adapter_names)])
    return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app of `chatsmith serve` over `state` (routes listed in the module docstring)."""
    from chatsmith import __version__

    app = FastAPI(title="chatsmith", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json",
                  description="An OpenAI-compatible API (chat completions, completions, models, embeddings) and "
                              "native routes (health, metrics, tokenize, detokenize, apply-template).")
    app.state.cs = state

    @app.exception_handler(APIError)
    async def _api_error(_req: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, e: StarletteHTTPException) -> JSONResponse:
        # 404 (no such route) and 405 (wrong method) in OpenAI's shape, like every other error.
        message = {404: "no such route; see GET /openapi.json for the routes",
                   405: "this route does not take this method; see GET /openapi.json"}.get(e.status_code, str(e.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, message, code=code).body(), status_code=e.status_code,
                            headers=dict(e.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, e: Exception) -> JSONResponse:
        # Never a stack trace on the wire; the log has it.
        log.exception("unexpected error")
        return JSONResponse(APIError(500, f"internal error ({type(e).__name__}); see the server log",
                                     type="server_error").body(), status_code=500)

    # ---- native routes -------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        """Native: {"status": "loading"} (503) while loading, "error" (503) when loading failed (the
        reason is in the server's log), then "ok" (200). No key needed, so nothing else is said."""
        if state.load_error:
            return JSONResponse({"status": "error"}, status_code=503)
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "2"})
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        """Native: Prometheus text format."""
        e = state.engine
        gov = getattr(e, "governor", None)
        return Response(state.metrics.render(running=e.running if e else 0, waiting=e.waiting if e else 0,
                                             threads=getattr(e, "threads", None),
                                             switches=gov.switches if gov is not None else 0),
                        media_type=METRICS_CONTENT_TYPE)

    @app.post("/tokenize", openapi_extra=openapi_body(TokenizeRequest))
    async def tokenize(request: Request) -> JSONResponse:
        """Native: {"content": text} (or vLLM's {"prompt": text}) or {"messages": [...]} -> token ids
        (no inference)."""
        body = await read_body(request, TokenizeRequest)
        _require_ready(state)
        texts = [t for t in (body.content, body.prompt) if t is not None]
        if len(texts) + (body.messages is not None) != 1:
            raise APIError(400, "send exactly one of 'content' (text; 'prompt' is taken as its other name) or "
                           "'messages' (a conversation)")
        if texts:
            ids = await asyncio.to_thread(_tokenize, state, texts[0], body.add_special_tokens)
        else:
            ids = (await asyncio.to_thread(_render, state, body.messages, body.add_generation_prompt))[0]
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": state.engine.slot_tokens})

    @app.post("/detokenize", openapi_extra=openapi_body(DetokenizeRequest))
    async def detokenize(request: Request) -> JSONResponse:
        """Native: {"tokens": [...]} -> {"content": text, "prompt": text} ("prompt": vLLM's name)."""
        body = await read_body(request, DetokenizeRequest)
        _require_ready(state)
        _check_ids(state, body.tokens, "tokens")
        text = await asyncio.to_thread(state.tokenizer.decode, body.tokens)
        return JSONResponse({"content": text, "prompt": text})

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> JSONResponse:
        """Native, as vLLM's: the tokenizer's special tokens, its chat template and the context a
        request may use. lm-evaluation-harness looks for this route to tokenize through the server
        (`tokenizer_backend=remote`, its default when the route answers) instead of loading a tokenizer."""
        _require_ready(state)
        tok = state.tokenizer
        template = getattr(tok, "chat_template", None)
        return JSONResponse({
            "tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
            "pad_token": tok.pad_token, "unk_token": getattr(tok, "unk_token", None),
            # The served template, when it is the tokenizer's own (a named --template is not Jinja).
            "chat_template": template if state.template is None and isinstance(template, str) else None,
            "model_max_length": state.engine.slot_tokens, "vocab_size": len(tok)})

    @app.post("/apply-template", openapi_extra=openapi_body(TokenizeRequest))
    async def apply_template(request: Request) -> JSONResponse:
        """Native: the prompt text the model would see for these messages (no inference)."""
        body = await read_body(request, TokenizeRequest)
        _require_ready(state)
        if body.messages is None:
            raise APIError(400, "field 'messages': required (a list of {role, content})", param="messages")
        ids, text = await asyncio.to_thread(_render, state, body.messages, body.add_generation_prompt)
        return JSONResponse({"prompt": text, "tokens": len(ids)})

    # ---- OpenAI routes -------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        """OpenAI: the served model, its LoRA adapters by name and the embedding model."""
        _require_ready(state)
        names = [state.model_name] + list(state.engine.adapter_names)
        if embeddings_available():
            names.append(EMBEDDING_MODEL)
        data = [{"id": n, "object": "model", "created": state.created, "owned_by": "chatsmith"} for n in names]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/chat/completions", openapi_extra=openapi_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        """OpenAI: a chat completion, streamed (server-sent events) or not."""
        body = await read_body(request, ChatCompletionRequest)
        _require_ready(state)
        adapter = _adapter_for(state, body.model)
        max_tokens = body.max_completion_tokens or body.max_tokens
        # tools, tool_choice, response_format: grammars compile in a worker thread; a plain request needs none
        compiles = bool(body.tools) or (body.response_format is not None and body.response_format.type == "json_schema")
        plan = await asyncio.to_thread(tool_plan, state, body) if compiles else tool_plan(state, body)
        if state.moderator is not None:   # the gate: a flagged request is refused (serve/moderation.py)
            from chatsmith.serve.moderation import moderate, refusal

            asked = "\n".join(_text(m.content) for m in body.messages if ROLES.get(m.role) == "user")
            if asked.strip() and (await moderate(state, [asked], "request"))[0].flagged:
                import uuid

                answer = refusal("chatcmpl-" + uuid.uuid4().hex[:24], body.model or state.model_name, state.fingerprint,
                                 body.stream, bool(body.stream_options and body.stream_options.include_usage))
                if body.stream:
                    return StreamingResponse(answer, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
                return JSONResponse(answer)
        sources, kb_extra = [], None
        top_k = _kb_top_k(state, body)
        if top_k:
            question = next((_text(m.content) for m in reversed(body.messages) if m.role == "user"), "")
            sources = await asyncio.to_thread(state.kb.retrieve, question, top_k) if question else []
            kb_extra = {"kb": state.kb.generation, "kb_top_k": top_k}
        if sources:   # the lowest-ranked sources are dropped whole until the prompt and the answer fit
            from chatsmith.kb.prompt import fit_sources

            room = max_tokens or min(256, state.engine.slot_tokens // 4)
            ids, sources = await asyncio.to_thread(
                fit_sources, lambda s: _render(state, body.messages, True, s, plan.prompt_tools)[0], sources,
                state.engine.slot_tokens - room)
        else:
            ids, _ = await asyncio.to_thread(_render, state, body.messages, True, None, plan.prompt_tools)
        extra = {"sources": [s.to_dict() for s in sources]} if top_k else None
        top = (body.top_logprobs or 0) if body.logprobs else 0
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "field 'top_logprobs': needs 'logprobs': true", param="top_logprobs")
        params = _sampling(state, body, ids, max_tokens, top)
        cache_key = None
        # The cache's key knows neither tools nor schemas: such answers are never cached.
        if state.cache is not None and cacheable(body) and not plan.uncacheable:
            cache_key = await asyncio.to_thread(request_key, state, body, _plain(body.messages), ids, adapter,
                                                kb_extra)
            found = await asyncio.to_thread(state.cache.lookup, cache_key)
            state.metrics.cache_lookup(found.hit.tier if found.hit else "miss", found.refused)
            if found.hit is not None:
                return _replay(found.hit, body, len(ids))
        job = GenerationJob(state, "chat.completion", [ids], [params], body.n, adapter,
                            body.model or state.model_name, logprobs=body.logprobs, constraint=plan.constraint,
                            tools=plan.parser)
        return await _answer(job, request, body, cache_key, extra)

    @app.post("/v1/completions", openapi_extra=openapi_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        """OpenAI: text completions of one prompt or a batch (texts or token-id lists), streamed or not.
        With echo the prompt comes back first, and with logprobs too the log-prob of each of its
        tokens (the first null), then the generated ones; max_tokens 0 scores the prompt only."""
        body = await read_body(request, CompletionRequest)
        _require_ready(state)
        adapter = _adapter_for(state, body.model)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "field 'max_tokens': 0 generates nothing; it needs 'echo': true (with 'logprobs', "
                           "to score the prompt)", param="max_tokens")
        prompts, named = _prompt_list(body.prompt)
        if body.suffix is not None:   # fill in the middle: each prompt is a prefix (serve/infill.py)
            from chatsmith.serve.infill import infill_ids

            if body.echo or any(not isinstance(p, str) for p in prompts):
                raise APIError(400, "field 'suffix': needs text prompts and no echo", param="suffix")
            prompts = [infill_ids(state, p, body.suffix) for p in prompts]
        if len(prompts) * body.n > MAX_PROMPTS:
            raise APIError(400, f"field 'prompt': {len(prompts)} prompts x n={body.n} is more than the {MAX_PROMPTS} "
                           "choices one request may ask for; send smaller batches", param="prompt")
        ids = await asyncio.to_thread(_prompt_ids, state, prompts, named)
        scored = body.echo and body.logprobs is not None
        if scored and sum(map(len, ids)) * (1 + body.logprobs) > MAX_PROMPT_LOGPROBS:
            raise APIError(400, f"field 'prompt': echoing {sum(map(len, ids))} prompt tokens with logprobs="
                           f"{body.logprobs} makes more than {MAX_PROMPT_LOGPROBS} log-probs in one answer; send "
                           "smaller batches or fewer logprobs", param="prompt")
        # max_tokens 0 with echo but no logprobs: the prompt is still run (and scored, unseen).
        prompt_logprobs = body.logprobs if scored else (0 if body.max_tokens == 0 else None)
        params = [_sampling(state, body, p, body.max_tokens, body.logprobs or 0, prompt_logprobs=prompt_logprobs,
                            name=name) for p, name in zip(ids, named)]
        echo = await asyncio.to_thread(_echo_texts, state, prompts) if body.echo else None
        job = GenerationJob(state, "text_completion", ids, params, body.n, adapter, body.model or state.model_name,
                            logprobs=body.logprobs is not None, echo=echo, prompt_logprobs=scored)
        return await _answer(job, request, body)

    @app.post("/infill", openapi_extra=openapi_body(InfillRequest))
    async def infill(request: Request) -> JSONResponse:
        """Native, as llama.cpp's: code between `input_prefix` and `input_suffix` (a FIM model; 400 otherwise)."""
        from chatsmith.serve.infill import infill_ids, llama_cpp_answer

        body = await read_body(request, InfillRequest)
        _require_ready(state)
        if body.stream:
            raise APIError(400, "field 'stream': /infill answers whole; stream with /v1/completions and 'suffix'",
                           param="stream")
        if body.input_extra:
            raise APIError(400, "field 'input_extra': other files as context are not supported; send the code "
                           "around the cursor as input_prefix and input_suffix", param="input_extra")
        ids = await asyncio.to_thread(infill_ids, state, body.input_prefix, body.input_suffix, body.prompt,
                                      "input_prefix")
        if body.n_predict == 0:
            raise APIError(400, "field 'n_predict': 0 generates nothing; ask for at least 1 token (-1: no limit)",
                           param="n_predict")
        max_tokens = body.n_predict if body.n_predict not in (None, -1) else body.max_tokens
        params = _sampling(state, body, ids, max_tokens, 0, name="input_prefix")
        job = GenerationJob(state, "text_completion", [ids], [params], 1, _adapter_for(state, body.model),
                            body.model or state.model_name)
        answer = await job.run(request)
        return JSONResponse(llama_cpp_answer(answer, len(ids), job.requests[0].stop_string))

    @app.post("/v1/moderations", openapi_extra=openapi_body(ModerationRequest))
    async def moderations(request: Request) -> JSONResponse:
        """OpenAI: the moderation gate's verdicts on texts (serve --moderation)."""
        from chatsmith.serve.moderation import moderate

        body = await read_body(request, ModerationRequest)
        if state.moderator is None:
            raise APIError(404, "this server has no moderation gate; start it with `chatsmith serve MODEL --moderation "
                           "SPEC` (a rules file or a classifier)", code="not_found")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > 256:
            raise APIError(400, "field 'input': send a string or a list of 1 to 256 strings", param="input")
        verdicts = await moderate(state, texts, "api")
        import uuid

        return JSONResponse({"id": "modr-" + uuid.uuid4().hex[:24], "model": state.moderator.name,
                             "results": [v.to_openai() for v in verdicts]})

    @app.post("/v1/embeddings", openapi_extra=openapi_body(EmbeddingRequest))
    async def embeddings(request: Request) -> JSONResponse:
        """OpenAI: sentence embeddings (all-MiniLM-L6-v2), float or base64."""
        body = await read_body(request, EmbeddingRequest)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or any(not t for t in texts):
            raise APIError(400, "field 'input': send a non-empty string or a list of non-empty strings", param="input")
        if len(texts) > 256:
            raise APIError(400, f"field 'input': at most 256 texts per request, got {len(texts)}", param="input")
        try:
            vectors, n_tokens = await asyncio.to_thread(state.embedder.encode, texts)
        except ChatsmithError as e:
            raise APIError(503, str(e), type="server_error") from None
        if body.encoding_format == "base64":
            import base64
            import struct

            # float32 little-endian bytes, base64-encoded: what the openai client decodes.
            vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data, "model": EMBEDDING_MODEL,
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    # ---- knowledge base (serve --kb) ------------------------------------------------------------------

    @app.get("/v1/kb")
    async def kb_info() -> JSONResponse:
        """The served knowledge base: documents, chunks, embedding model; {"available": false} when
        the server has none (a 200 either way: the web page asks on every load)."""
        if state.kb is None:
            return JSONResponse({"object": "knowledge_base", "available": False})
        s = await asyncio.to_thread(state.kb.kb.stats)
        return JSONResponse({"object": "knowledge_base", "available": True, "name": Path(s["path"]).name,
                             "documents": s["documents"], "chunks": s["chunks"], "embedding_model": s["embedding_model"],
                             "top_k": state.kb.top_k})

    @app.get("/v1/kb/chunks/{chunk_id}")
    async def kb_chunk(chunk_id: str, request: Request) -> Response:
        """One chunk of the knowledge base, the target of a source's link: JSON, or a small page
        for a browser."""
        if state.kb is None:
            raise APIError(404, "this server has no knowledge base; start it with --kb KB", code="not_found")
        if not chunk_id.isdigit() or len(chunk_id) > 18:
            raise APIError(404, f"no chunk '{chunk_id[:40]}' in the knowledge base (chunk ids are numbers)",
                           code="not_found")
        c = await asyncio.to_thread(state.kb.kb.chunk, int(chunk_id))
        if c is None:
            raise APIError(404, f"no chunk {chunk_id} in the knowledge base (re-ingested since?)", code="not_found")
        from chatsmith.kb.prompt import _shown

        c["source"] = _shown(c["source"])
        if "text/html" in request.headers.get("accept", ""):
            import html

            title = html.escape(c["source"] + (f" > {c['heading']}" if c["heading"] else ""))
            page = (f"<!doctype html><meta charset=utf-8><title>{title}</title><h1>{title}</h1>"
                    f"<p>{html.escape(c['location'])}</p><pre style='white-space:pre-wrap'>{html.escape(c['text'])}</pre>")
            return Response(page, media_type="text/html")
        return JSONResponse(c)

    # ---- web page ------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    state.metrics.routes = {getattr(r, "path", "") for r in app.routes}
    app.add_middleware(RequestGuard, state=state)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {})
            components.setdefault("schemas", {}).update(openapi_components())
            # The key is optional (--api-key); when set it is required on /v1/* and the native routes.
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{}, {"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


async def read_body(request: Request, schema: Any) -> Any:
    """The request body parsed into `schema` (RequestGuard limits its size and time); parsing a
    large body runs in a worker thread, off the event loop."""
    raw = await request.body()
    if len(raw) > 65536:
        return await asyncio.to_thread(parse_body, raw, schema)
    return parse_body(raw, schema)


async def _answer(job: GenerationJob, request: Request, body: Any, cache_key: Any = None,
                  extra: dict[str, Any] | None = None) -> Response:
    """Admit the job to the engine (a full queue or a bad parameter is a 4xx before any byte is
    sent), then answer with one JSON response or a stream of server-sent events. With a cache key,
    a finished answer is stored in the response cache. `extra` fields (the knowledge base's
    `sources`) join the response, or a stream's first chunk."""
    state = job.state
    if body.stream:
        queue = job.submit()
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = job.stream(queue, include_usage)
        if extra:
            events = _first_chunk_with(events, extra)
        if cache_key is not None:
            events = stream_and_store(events, job, state.cache, cache_key, state.metrics.cache_stored, extra)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    answer = await job.run(request)
    if extra:
        answer.update(extra)
    if cache_key is not None and all(r.finish_reason in ("stop", "length") for r in job.requests):
        state.metrics.cache_stored(await asyncio.to_thread(state.cache.store, cache_key, answer))
    if job.want_logprobs:   # an answer with log-probs may be megabytes of JSON: serialized off the event loop
        return await asyncio.to_thread(JSONResponse, answer)
    return JSONResponse(answer)


# ---- helpers -------------------------------------------------------------------------------------------


async def _first_chunk_with(events: Any, extra: dict[str, Any]) -> Any:
    """A stream whose first chunk also carries `extra` (the sources arrive before the answer)."""
    import json

    first = True
    async for ev in events:
        if first and ev.startswith("data: {"):
            first = False
            ev = f"data: {json.dumps({**json.loads(ev[6:]), **extra})}\n\n"
        yield ev


def _kb_top_k(state: ServerState, body: Any) -> int:
    """How many sources a chat request retrieves (0: none): the request's `kb`, on by default
    when the server has a knowledge base."""
    if body.kb is False or (body.kb is None and state.kb is None):
        return 0
    if state.kb is None:
        raise APIError(400, "field 'kb': this server has no knowledge base; start it with `chatsmith serve MODEL "
                       "--kb KB`", param="kb")
    return state.kb.top_k if body.kb is True or body.kb is None else body.kb.top_k


def _plain(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """A request's messages as [{role, content}] (roles as the template sees them)."""
    return [{"role": ROLES.get(m.role, m.role), "content": _text(m.content)} for m in messages]


def _replay(hit: Any, body: Any, prompt_tokens: int) -> Response:
    """A cached answer, as JSON or as a stream, marked with the header X-Chatsmith-Cache: TIER."""
    model = body.model or hit.response.get("model") or ""
    headers = {"X-Chatsmith-Cache": hit.tier}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(replay_stream(hit, prompt_tokens, model, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
    return JSONResponse(replay_json(hit, prompt_tokens, model), headers=headers)


def _require_ready(state: ServerState) -> None:
    if state.load_error:
        raise APIError(503, "the model failed to load; the server's log says why", type="server_error")
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


def _tokenize(state: ServerState, text: str, add_special_tokens: bool = False) -> list[int]:
    return state.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def _prompt_list(prompt: Any) -> tuple[list[str | list[int]], list[str]]:
    """The prompts of a completion request (one, or a batch) and the field name of each, for errors."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompts, named = [prompt], ["prompt"]
    else:
        prompts, named = list(prompt), [f"prompt[{i}]" for i in range(len(prompt))]
    if not prompts:
        raise APIError(400, "field 'prompt': must not be empty", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"field 'prompt': at most {MAX_PROMPTS} prompts per request, got {len(prompts)}",
                       param="prompt")
    for p, name in zip(prompts, named):
        if not p:
            raise APIError(400, f"field '{name}': must not be empty", param=name)
    return prompts, named


def _prompt_ids(state: ServerState, prompts: list[str | list[int]], named: list[str]) -> list[list[int]]:
    """Token ids of each prompt (run it in a worker thread: a batch may be megabytes): texts
    tokenized, with the BOS when the tokenizer adds one itself; id lists checked against the vocabulary."""
    tok = state.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False) else []
    out = []
    for p, name in zip(prompts, named):
        if isinstance(p, str):
            out.append(bos + _tokenize(state, p))
        else:
            _check_ids(state, p, name)
            out.append(list(p))
    return out


def _echo_texts(state: ServerState, prompts: list[str | list[int]]) -> list[str]:
    """What echo returns before each choice's text: a text prompt as sent, token ids decoded."""
    return [p if isinstance(p, str) else state.tokenizer.decode(p) for p in prompts]


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content)


def _render(state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool,
            sources: list[Any] | None = None, tools: list[dict[str, Any]] | None = None) -> tuple[list[int], str]:
    """Token ids and text of a request's conversation, with the knowledge base's `sources` in its
    system message and the `tools` offered (normalized, chatsmith/data/tools.py) when given."""
    from chatsmith.data.conversation import Conversation, Message
    from chatsmith.data.template import render_conversation
    from chatsmith.serve.tools import history_message

    msgs = []
    call_ids: set[str] = set()
    for i, m in enumerate(messages):
        role = ROLES.get(m.role)
        if role is None:
            raise APIError(400, f"field 'messages[{i}].role': unknown role '{m.role}'; use one of "
                           f"{', '.join(ROLES)}", param=f"messages[{i}].role")
        if m.content is None and role != "assistant":
            raise APIError(400, f"field 'messages[{i}].content': required for role '{m.role}'",
                           param=f"messages[{i}].content")
        if m.tool_calls or m.tool_call_id is not None or role == "tool":
            msgs.append(history_message(m, i, role, _text(m.content), call_ids))
            continue
        # train=False: a request's messages are all context; no loss mask is needed to serve them.
        msgs.append(Message(role, _text(m.content), train=False))
    if sources:
        from chatsmith.kb.prompt import with_sources

        msgs = with_sources(msgs, sources)
    try:
        r = render_conversation(state.tokenizer, Conversation(msgs, tools=tools or None), state.template,
                                add_generation_prompt=add_generation_prompt)
    except ChatsmithError as e:
        raise APIError(400, f"field 'messages': {e}", param="messages") from None
    return r.input_ids, r.text or ""


def _sampling(state: ServerState, body: Any, ids: list[int], max_tokens: int | None, top_logprobs: int, *,
              prompt_logprobs: int | None = None, name: str = "messages") -> Any:
    from chatsmith.infer.sampling import SamplingParams

    engine = state.engine
    room = engine.slot_tokens - len(ids)
    what = "the prompt" if name in ("messages", "prompt") else name
    if room < 1:
        raise APIError(400, f"{what} has {len(ids)} tokens but the context holds {engine.slot_tokens} "
                       f"(model context {engine.context}); shorten the prompt or the conversation",
                       param=name, code="context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"{what} has {len(ids)} tokens and max_tokens asks for {max_tokens} more, but the "
                       f"context holds {engine.slot_tokens}; ask for at most {room} tokens",
                       param="max_tokens", code="context_length_exceeded")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
        raise APIError(400, f"field 'stop': up to {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} "
                       "characters each", param="stop")
    return SamplingParams(
        temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0), min_p=body.min_p,
        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, max_new_tokens=room if max_tokens is None else max_tokens,
        seed=body.seed, stop=stop, top_logprobs=top_logprobs, n=body.n, prompt_logprobs=prompt_logprobs)


def run_server(model: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               max_concurrency: int = 16, loras: dict[str, str] | None = None, precision: str = "auto",
               kv_cache_mb: float | None = 2048, max_queue: int = 64, served_name: str | None = None,
               template: str | None = None, trust_remote_code: bool = False, allowed_hosts: list[str] | None = None,
               max_body_mb: float = 4.0, body_timeout: float = 30.0, header_timeout: float = 10.0,
               max_connections: int = 256, cache: dict[str, Any] | None = None, kb: str | None = None,
               kb_top_k: int = 5, moderation: str | None = None, engine: str = "builtin",
               max_memory: str | None = None, quantization: str | None = None, prefix_cache: bool = True,
               threads: int | None = None) -> int:
    """Start loading the model in a thread and serve HTTP at once (/health answers 503 until ready).
    `cache`: ResponseCache's arguments (path, semantic, threshold, ttl, max_entries), or None.
    `engine`: "builtin" or "vllm" (a missing vllm or GPU fails now, before anything loads).
    `max_memory`/`quantization`: see load_state; a budget too small even with disk offload fails now."""
    if engine == "vllm":
        from chatsmith.infer.vllm_engine import import_vllm

        if max_memory is not None or quantization is not None:
            raise ChatsmithError("--max-memory and --load-in-8bit/--load-in-4bit are the builtin engine's; "
                                 "with --engine vllm use vLLM's own options")
        import_vllm()
    if max_memory is not None or quantization is not None:
        from chatsmith.models.loading import check_load_options, plan_offload

        check_load_options(precision, max_memory, quantization)
        if max_memory is not None:
            print(plan_offload(model, max_memory, trust_remote_code=trust_remote_code).summary(), flush=True)
    import uvicorn

    hosts = None
    if host in LOOPBACK or allowed_hosts:   # loopback: only loopback names, so DNS rebinding cannot reach it
        hosts = {h.lower() for h in (allowed_hosts or [])} | (set(LOOPBACK) if host in LOOPBACK else set())
    state = ServerState(model_name=served_name or model, api_key=api_key, allowed_hosts=hosts,
                        max_body_bytes=int(max_body_mb * 2**20), body_timeout=body_timeout)
    if kb is not None:   # a missing knowledge base fails now, with the command to create it
        from chatsmith.kb.prompt import Retriever

        state.kb = Retriever(kb, top_k=kb_top_k)
        print(f"knowledge base: {kb} ({state.kb.kb.stats()['chunks']} chunks)", flush=True)
    if moderation is not None:   # a bad rules file or classifier fails now, with what is wrong
        from chatsmith.serve.moderation import load_moderator

        state.moderator = load_moderator(moderation)
        print(f"moderation: {state.moderator.kind} {state.moderator.name}", flush=True)
    if cache is not None:
        from chatsmith.cache import ResponseCache

        state.cache = ResponseCache(**cache)
        print(f"response cache: {cache['path']} ({len(state.cache)} entries"
              + (", semantic" if cache.get("semantic") else "") + ")", flush=True)
    app = create_app(state)
    threading.Thread(target=load_state, args=(state, model), daemon=True, name="chatsmith-load",
                     kwargs={"precision": precision, "max_concurrency": max_concurrency, "kv_cache_mb": kv_cache_mb,
                             "max_queue": max_queue, "loras": loras, "template": template,
                             "trust_remote_code": trust_remote_code, "engine": engine, "max_memory": max_memory,
                             "quantization": quantization, "prefix_cache": prefix_cache,
                             "threads": threads}).start()
    print(f"chatsmith serve: http://{host}:{port}/ (web chat), OpenAI API at http://{host}:{port}/v1", flush=True)
    uvicorn.Server(http.uvicorn_config(app, host, port, header_timeout=header_timeout,
                                       max_connections=max_connections)).run()
    return 0


class ServerThread(http.ServerThread):
    """Serve a ServerState's app in a background thread (tests, notebooks):
    `with ServerThread(state) as url:` yields "http://127.0.0.1:PORT" once the socket listens."""

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int = 0, **limits: Any) -> None:
        super().__init__(create_app(state), host, port, **limits)
