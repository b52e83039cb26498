"""vLLM as an optional engine: `chatsmith serve --engine vllm` and `rollout_engine: vllm` for PPO/GRPO.

`VllmEngine` has the interface of `chatsmith.infer.engine.Engine` that the server and RL use
(`submit`, `start`/`stop`, `generate`, `stream`, `sync_weights`, `check_prompt`, `waiting`/`running`,
`stats`, `slot_tokens`, `recent`), and its requests are the engine's own `Request` objects, so a
request's callbacks, its text (the one detokenizer, `TextStream`), its Completion and its finish
reasons are the same whichever engine generated the tokens. vLLM only chooses the tokens.

Target: vLLM >= 0.11 (the V1 engine), public API only: `vllm.LLM` run in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, as TRL's colocate mode runs it), its `llm_engine.add_request`
/ `step` / `abort_request` step loop (what `LLM.generate` runs inside), `vllm.SamplingParams`,
`vllm.inputs.TokensPrompt`, `vllm.lora.request.LoRARequest`, `LLM.apply_model` and
`LLM.reset_prefix_cache`. vLLM is imported only when an engine is built (STYLE.md, principle 6).

Translation (chatsmith -> vLLM): temperature, top_p, top_k (0: off), min_p, repetition/presence/
frequency penalties, seed, max_new_tokens -> max_tokens, stop strings -> stop, prompt_logprobs,
top_logprobs -> logprobs (0 still returns the chosen token's log-prob, which RL needs). The stop
token ids are exactly chatsmith's (the template's, or the caller's): `ignore_eos=True` and
`stop_token_ids=` them. `n` is expanded here, one vLLM request per answer with seed + r, as the
built-in engine does, so G answers of a GRPO group draw what they would draw there. vLLM's
log-probs are its default "raw_logprobs" (log-softmax of the model's logits before any sampling
processing), what the built-in engine reports. `max_new_tokens=0` (score the prompt only) asks
vLLM for one token and drops it. JSON/tool constraints are the built-in engine's (a token mask per
step); a request with one is refused with a message that names --engine builtin.

Weights: the vLLM model is built from the in-memory model's config with `load_format="dummy"` (no
second read of the checkpoint) and its weights pushed from the module (`model.load_weights` through
`LLM.apply_model`, in this process, so no tensor is copied through IPC). `sync_weights()` (called
by the RL loop after every optimizer step) only marks them stale, and so does an in-place change of a
trainable parameter (its autograd version counter moves); they are pushed once, before the next
generation (a rollout or an evaluation), then vLLM's prefix cache is reset. A PEFT policy's
LoRA/DoRA is merged for the push and unmerged after, as TRL and OpenRLHF do. Named serving adapters
go to vLLM as `LoRARequest(name, id, path)`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError
from chatsmith.infer.engine import EngineFront, Request, RequestTooLarge, check_prompt_ids, context_length

log = logging.getLogger(__name__)

INSTALL_HINT = "install the vllm extra (pip install 'chatsmith[vllm]') on a CUDA machine"
NO_CONSTRAINTS = ("--engine vllm does not run chatsmith's token constraints (tools, tool_choice, response_format "
                  "json_object/json_schema); serve this model with --engine builtin for those requests")


def import_vllm() -> Any:
    """The vllm package, or ChatsmithError saying how to install it / that it needs a CUDA GPU."""
    try:
        import vllm
    except ImportError as e:
        raise ChatsmithError(f"the vLLM engine needs the vllm package, which is not installed ({e}); "
                             f"{INSTALL_HINT}, or use the built-in engine (--engine builtin)") from None
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike():
        kind = getattr(current_platform, "device_type", "") or "none"
        raise ChatsmithError(f"the vLLM engine runs on a CUDA (or ROCm) GPU and vLLM found none (its platform: {kind}); "
                             "check `nvidia-smi` and that torch sees the GPU (torch.cuda.is_available()), "
                             "or use the built-in engine (--engine builtin), which runs on a CPU too")
    return vllm


def vllm_weight_name(name: str) -> str | None:
    """The checkpoint name vLLM's `load_weights` expects for a parameter of the (maybe PEFT-wrapped)
    module, or None for a parameter that is not the model's own (LoRA A/B, PEFT's saved originals)."""
    if ".lora_" in name or "original_module" in name or "lora_magnitude_vector" in name:
        return None
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return name.replace(".modules_to_save.default.", ".")


class VllmEngine(EngineFront):
    """Generation through vLLM with `chatsmith.infer.engine.Engine`'s interface; see the module docstring.

    model/tokenizer: the model in memory (HF or PEFT-wrapped) whose weights vLLM serves, and its
    tokenizer (None: token ids only, as for the built-in engine). adapters: NAME -> PEFT LoRA
    directory, served by name. max_sequence_tokens: the longest sequence (vLLM's max_model_len).
    gpu_memory_utilization: the fraction of GPU memory vLLM may take for weights and KV cache (lower
    it when the trainer shares the GPU). **llm_kwargs go to `vllm.LLM` unchanged.
    """

    constraint_error = NO_CONSTRAINTS
    thread_name = "chatsmith-vllm"

    def __init__(self, model: Any, tokenizer: Any = None, *, max_batch_size: int = 16, max_queue: int = 1024,
                 adapters: dict[str, str] | None = None, max_sequence_tokens: int | None = None,
                 gpu_memory_utilization: float = 0.9, dtype: str = "auto", seed: int = 0,
                 **llm_kwargs: Any) -> None:
        self._init_front(max_batch_size, max_queue)
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise ChatsmithError("the vLLM engine serves decoder-only models here; this one is encoder-decoder "
                                 "(T5): use --engine builtin")
        vllm = import_vllm()
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        self._vllm, self._tokens_prompt = vllm, TokensPrompt
        self.model, self.tokenizer = model, tokenizer
        self.context = context_length(model) or 2048
        self.slot_tokens = min(self.context, max(16, max_sequence_tokens)) if max_sequence_tokens else self.context
        self.kv_cache_mb = None
        self.precision = "vllm"
        self.adapter_names = list(adapters or {})
        self._lora = {name: LoRARequest(name, i + 1, str(Path(path).resolve()))
                      for i, (name, path) in enumerate((adapters or {}).items())}
        for name, path in (adapters or {}).items():
            if not (Path(path) / "adapter_config.json").is_file():
                raise ChatsmithError(f"--lora {name}={path}: expected a PEFT adapter directory with adapter_config.json")
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.vocab_size = int(out.weight.shape[0]) if out is not None else None
        self.stop_default = self._default_stop_ids()

        # vLLM reads the architecture, the tokenizer and the generation config from a directory: the
        # in-memory model's, written without weights (they are pushed below, from the module).
        self._dir = tempfile.TemporaryDirectory(prefix="chatsmith-vllm-")
        _write_model_dir(model, tokenizer, Path(self._dir.name))
        # One process: the engine core runs here, so apply_model reaches the model without IPC.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs: dict[str, Any] = dict(
            model=self._dir.name, load_format="dummy", dtype=dtype, seed=seed, max_model_len=self.slot_tokens,
            max_num_seqs=max_batch_size, gpu_memory_utilization=gpu_memory_utilization,
            skip_tokenizer_init=tokenizer is None)
        if self._lora:
            kwargs.update(enable_lora=True, max_loras=len(self._lora), max_lora_rank=_max_lora_rank(adapters or {}))
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(**kwargs)
        self._stale = True                     # the module's weights are not in vLLM yet
        self._pushed_version = -1
        self.weight_pushes = 0

        self._live: dict[str, Request] = {}       # vLLM request id -> Request (_waiting: not yet handed to it)

    # ---- public API (as Engine's) -------------------------------------------------------------------

    def sync_weights(self) -> None:
        """Mark vLLM's weights stale: the module's current weights are pushed before the next generation."""
        self._stale = True

    def push_weights(self) -> None:
        """Load the module's current weights into vLLM now and reset its prefix cache (whose KV entries
        were computed with the old weights)."""
        import torch

        with self._step_lock, torch.no_grad():
            model = self.model
            merged = hasattr(model, "merge_adapter") and hasattr(model, "peft_config")
            if merged:
                model.merge_adapter()
            try:
                weights = [(n, p.detach()) for n, p in ((vllm_weight_name(k), v) for k, v in model.named_parameters())
                           if n is not None]
                self.llm.apply_model(lambda m: m.load_weights(weights))
            finally:
                if merged:
                    model.unmerge_adapter()
            self.llm.reset_prefix_cache()
            self._stale = False
            self._pushed_version = self._weights_version()
            self.weight_pushes += 1

    def _weights_version(self) -> int:
        """A number that changes whenever a trainable parameter is changed in place (an optimizer step
        bumps each tensor's autograd version counter): an evaluation between optimizer steps then
        sees the current weights even before the loop calls sync_weights."""
        return sum(p._version for p in self.model.parameters() if p.requires_grad)

    def check_prompt(self, prompt: list[int]) -> None:
        """Raise RequestTooLarge/ChatsmithError when a prompt cannot be served."""
        check_prompt_ids(prompt, self.vocab_size)
        if len(prompt) >= self.slot_tokens:
            raise RequestTooLarge(f"the prompt has {len(prompt)} tokens but a sequence can hold at most "
                                  f"{self.slot_tokens} tokens (vLLM's max_model_len), with room for at least one "
                                  f"new token; the model's context length is {self.context}. Shorten the prompt")

    @property
    def waiting(self) -> int:
        """Requests queued for a slot: not yet handed to vLLM, or beyond its max_num_seqs."""
        return len(self._waiting) + max(0, len(self._live) - self.max_batch_size)

    @property
    def running(self) -> int:
        """Requests vLLM is generating (at most max_batch_size at a time)."""
        return min(len(self._live), self.max_batch_size)

    # ---- the step loop --------------------------------------------------------------------------------

    def _step(self) -> None:
        self.stats["steps"] += 1
        self._drop_cancelled()
        with self._lock:
            admitted = list(self._waiting)
            self._waiting.clear()
        if admitted and (self._stale or self._weights_version() != self._pushed_version):
            self.push_weights()
        for req in admitted:
            self._add(req)
        if not self._live:
            return
        for out in self.llm.llm_engine.step():
            req = self._request_for(out.request_id)
            if req is not None and not req.finished:
                self._take(req, out)

    def _add(self, req: Request) -> None:
        rid = f"cs{req.id}"
        try:
            self.llm.llm_engine.add_request(rid, self._tokens_prompt(prompt_token_ids=req.prompt),
                                            self.vllm_params(req), lora_request=self._lora.get(req.adapter))
        except Exception as e:   # vLLM refused this request (a bad parameter): fail it alone
            log.exception("vLLM refused request %s", req.id)
            self._finish(req, "error", error=f"{type(e).__name__}: {e}")
            return
        self._live[rid] = req

    def vllm_params(self, req: Request) -> Any:
        """The `vllm.SamplingParams` of a chatsmith request (see the module docstring)."""
        p = req.params
        kw: dict[str, Any] = dict(
            n=1, temperature=0.0 if p.greedy else p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
            repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty, seed=req.generator.initial_seed() if req.generator else None,
            max_tokens=max(1, p.max_new_tokens), ignore_eos=True, stop_token_ids=sorted(req.stop_ids),
            logprobs=p.top_logprobs, prompt_logprobs=p.prompt_logprobs,
            # The text is chatsmith's (TextStream); vLLM detokenizes only to find stop strings.
            stop=list(p.stop), detokenize=bool(p.stop), include_stop_str_in_output=False)
        return self._vllm.SamplingParams(**kw)

    def _request_for(self, request_id: str) -> Request | None:
        # vLLM may append a suffix to a request id to keep it unique; ours have no "-".
        return self._live.get(request_id) or self._live.get(request_id.split("-")[0])

    def _take(self, req: Request, out: Any) -> None:
        """Apply one RequestOutput (cumulative: every token so far) to `req`: new tokens through the
        built-in engine's bookkeeping (log-probs, text, callbacks, stop checks), then vLLM's finish."""
        try:
            if req.prompt_logprobs is not None and len(req.prompt_logprobs) == 1 and out.prompt_logprobs:
                _read_prompt_logprobs(req, out.prompt_logprobs)
            o = out.outputs[0]
            if o.finish_reason is not None:   # vLLM is done with it: nothing to abort when chatsmith finishes it
                self._live.pop(f"cs{req.id}", None)
            if req.params.max_new_tokens == 0:   # only the prompt was scored; drop vLLM's one token
                self._finish(req, "length")
                return
            for j in range(len(req.output), len(o.token_ids)):
                self._accept(req, int(o.token_ids[j]), o.logprobs[j] if o.logprobs else None)
                if req.finished:
                    return
            if o.finish_reason is not None:
                if isinstance(o.stop_reason, str):
                    req.stop_string = o.stop_reason
                self._finish(req, {"stop": "stop", "length": "length", "abort": "cancelled"}.get(
                    o.finish_reason, "stop"))
        except Exception as e:
            log.exception("reading vLLM's output for request %s failed", req.id)
            self._finish(req, "error", error=f"{type(e).__name__}: {e}")

    def _accept(self, req: Request, token: int, logprobs: dict[int, Any] | None) -> None:
        """One generated token, as `Engine._accept_token` books it."""
        lp = float(logprobs[token].logprob) if logprobs and token in logprobs else float("nan")
        req.output.append(token)
        req.logprobs.append(lp)
        k = req.params.top_logprobs
        if k:
            ranked = sorted(((t, x) for t, x in (logprobs or {}).items() if x.rank is not None and x.rank <= k),
                            key=lambda tx: tx[1].rank)
            req.top_logprobs.append([(int(t), float(x.logprob)) for t, x in ranked])
        self._deliver(req, token, lp)

    def _active(self) -> list[Request]:
        return list(self._live.values())

    def _abort(self, rid: str) -> None:
        try:
            self.llm.llm_engine.abort_request([rid])
        except Exception:
            log.exception("vLLM could not abort request %s", rid)

    def _release(self, req: Request, reason: str) -> None:
        """A finishing request is aborted in vLLM if vLLM is still generating it."""
        rid = f"cs{req.id}"
        if self._live.pop(rid, None) is not None:
            self._abort(rid)


def _read_prompt_logprobs(req: Request, scored: list[Any]) -> None:
    """vLLM's prompt log-probs (None for the first token, then {token: Logprob} holding the prompt
    token and the top K) into the request's lists, as the built-in engine fills them."""
    k = req.params.prompt_logprobs or 0
    for pos in range(1, len(req.prompt)):
        d = scored[pos] or {}
        target = req.prompt[pos]
        req.prompt_logprobs.append(float(d[target].logprob) if target in d else float("nan"))
        ranked = sorted(((t, x) for t, x in d.items() if x.rank is not None and x.rank <= k), key=lambda tx: tx[1].rank)
        req.prompt_top_logprobs.append([(int(t), float(x.logprob)) for t, x in ranked])


def _write_model_dir(model: Any, tokenizer: Any, path: Path) -> None:
    """config.json, generation_config.json and the tokenizer's files of an in-memory model (no weights)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.save_pretrained(path)
    generation = getattr(base, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def _max_lora_rank(adapters: dict[str, str]) -> int:
    """The largest rank among the adapters (vLLM sizes its LoRA buffers by it; it allows 8..512)."""
    import json

    ranks = [8]
    for path in adapters.values():
        cfg = json.loads((Path(path) / "adapter_config.json").read_text())
        ranks += [int(cfg.get("r", 8))] + [int(r) for r in (cfg.get("rank_pattern") or {}).values()]
    top = max(ranks)
    return next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= top) if top <= 512 else top
