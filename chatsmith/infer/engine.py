"""The generation engine: continuous batching over a KV cache, token ids in and token ids out.

No HTTP here (STYLE.md, principle 4). Every caller generates through it: the server, `chatsmith
chat`, quickstart and evaluation, RL rollouts and `rm compare`.

- `Engine.generate(prompts, params)`: synchronous batched generation (RL, evaluation).
- `Engine.stream(prompt, params)`: the text of one answer, piece by piece (the terminal chat).
- `Engine.submit(prompt, params, on_token=..., on_finish=...)` with `Engine.start()`: a background
  thread steps the batch; new requests join between decode steps and finished ones leave
  (continuous batching, as in Orca, Yu et al. 2022). Prompts are prefilled in chunks of
  `prefill_chunk` tokens so a long prompt does not stall the running answers for long.

Fairness: a token's choice is cheap for most requests and tens of milliseconds for a constrained
(JSON) one. After the batched forward, cheap choices are all made; costly ones are made group by
group (a group is one API request's n choices) in round-robin order, within a time budget equal to
the step's forward pass, and the rest wait with their logits for the next step. One request with
many constrained choices therefore slows its own answers, not everyone's.

Text: with a tokenizer, each request carries one `TextStream` (infer/detokenize.py), the one
detokenizer: it turns tokens into text as they arrive, holds back what may be the start of a stop
string, and ends the request at a stop string. A request can only fail itself: an error while
choosing its next token finishes it with "error" and leaves the others running.

Each step: drop cancelled requests, admit waiting ones into free slots, prefill up to
`prefill_chunk` prompt tokens, then decode one token for every running sequence in one batch.

Prompt log-probs (`params.prompt_logprobs`, what OpenAI's `echo` with `logprobs` returns and what
lm-evaluation-harness scores multiple choice with): the prefill that fills the KV cache is the
forward pass; the LM head also runs on the chunk's other positions and each row's log-softmax gives
the next prompt token's log-prob (and the top K). Same weights, adapter and chunking as generation,
in the engine's thread, within the same prefill budget per step. `max_new_tokens=0` then finishes
the request right after its prompt: it is scored, not continued.

Precision: "module" runs the model's own modules in their dtype (exact; a PEFT model's active
adapters apply; the weights are read live, so training updates show up without `sync_weights`).
"int8" runs int8 copies of the weights (the serving default, several times faster on a CPU), "int4"
(and its group-size variants, infer/precision.py) 4-bit ones; call `sync_weights()` after the
weights change. Greedy output in "module" precision equals
`transformers` `generate`, tested in tests/test_engine.py.

Prefix cache (`prefix_cache=True`, what `serve` and `chat` use): a finished sequence's slot keeps its
KV cache, and the engine remembers which token ids it holds. A new prompt is given the free slot
whose kept tokens share the longest prefix with it (or has that prefix copied from a running
sequence when one shares more), and only the rest is prefilled; the prompt's last token always
runs, as its logits choose the first new token (unless the slot's last prompt was this very one,
whose last logits are kept with it). A chat's next turn then prefills only the new
message, and requests with one system prompt prefill it once. The kept positions were computed
with other chunk lengths (or one by one, as generated tokens) than a cold prefill would use, and
attention rounds differently over other shapes: the numbers equal a cold prefill's to float
rounding, not bit for bit, so engines that promise batch-invariant, reproducible numbers
(evaluation, RL rollouts, tests) leave it off, its default. `sync_weights` forgets what is kept;
named adapters are kept apart; a request that scores its prompt (`prompt_logprobs`) prefills it
all. A prompt equal to a slot's last prompt runs nothing before its first token: that prompt's
last logits are kept with the slot (one row of the vocabulary). `Request.reused` says how many prompt tokens were not prefilled, whether from the prefix cache
or from an identical running prompt (the API's `cached_tokens`).

Threads (`adaptive_threads=True`, the default): the native int8/int4 step measures its decode steps
and runs on torch's threads or on one, whichever is faster now (infer/threads.py: on a machine other
work keeps busy, a step split over several threads waits on the descheduled one at every matmul).
Each output row is one thread's, in one order of sums, so the answers are the same bits either way.

Seeds: with `params.seed` set, the r-th sequence of a `generate` call (after expanding `n`) draws
from a generator seeded with `seed + r`, so G copies of one prompt give G different samples and
the same call gives the same samples again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from chatsmith.errors import ChatsmithError
from chatsmith.infer.detokenize import TextStream
from chatsmith.infer.sampling import SamplingParams

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "cancelled", "error")
# Fair steps: choosing a token is "costly" past this many seconds (JSON-constrained rows take tens of
# ms); costly choices in one step take at most as long as the step's forward pass (or this floor).
COSTLY_CHOICE_S = 0.002
COSTLY_BUDGET_FLOOR_S = 0.02


def _costly(req: Any) -> bool:
    """Whether a request's token choice waits for its fair turn: only a constrained one that has
    proved slow. An unconstrained choice is always made at once, so which rows a step decodes never
    depends on wall-clock time (a loaded machine once made plain sampling cross the threshold, and
    the same seeded generation then batched differently and differed in the last float bits)."""
    return req.constraint is not None and req.choice_cost >= COSTLY_CHOICE_S


# Text the int8 path measures activation ranges on (SmoothQuant calibration): prose, a dialogue
# turn, code and numbers, like what a chat model sees.
CALIBRATION_TEXT = """<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
Can you explain how a bicycle stays upright, and give me a short Python example that sorts a list?<|im_end|>
<|im_start|>assistant
A moving bicycle stays upright mostly because the rider steers: when it leans to one side, the
front wheel turns toward that side and brings the wheels back under the centre of mass. The fork's
geometry (the trail) makes the wheel turn on its own, and the spinning wheels add a little
gyroscopic effect. Here is the sorting example:

```python
numbers = [42, 7, 19, 3, 88, 1]
numbers.sort()
print(numbers)  # [1, 3, 7, 19, 42, 88]
```

In 1885, John Kemp Starley built the Rover, which had two wheels of equal size and a chain drive.
Prices fell from about $100 to $20 within a decade, and by 1899 more than 1,000,000 bicycles were
sold each year in the United States alone.<|im_end|>
"""


class EngineBusy(ChatsmithError):
    """The waiting queue is full; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTooLarge(ChatsmithError):
    """The prompt does not fit the context or the per-sequence KV cache budget."""


def context_length(model: Any) -> int | None:
    """The model's maximum sequence length in tokens, or None when its config does not say."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def default_stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """The token ids that end an answer when a request names none: the template's stop tokens, or
    the model's end-of-sequence id(s) when there is no tokenizer."""
    if tokenizer is not None:
        from chatsmith.data.template import stop_token_ids

        return stop_token_ids(tokenizer)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}


def common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common start of two token lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n   # a[:lo] == b[:lo], a[:hi] != b[:hi]: bisect on slice equality (C speed)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def check_prompt_ids(prompt: list[int], vocab_size: int | None) -> None:
    """Raise ChatsmithError for an empty prompt or a token id outside the vocabulary."""
    if not prompt:
        raise ChatsmithError("the prompt is empty; pass at least one token id")
    if vocab_size is not None and (min(prompt) < 0 or max(prompt) >= vocab_size):
        bad = next(t for t in prompt if t < 0 or t >= vocab_size)
        raise ChatsmithError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def submit_all(engine: Any, prompts: list[list[int]], params: Any, stop_ids: Iterable[int] | None,
               seed_offset: int) -> list[Request]:
    """Submit every prompt's n sequences to `engine` (built-in or vLLM), consecutively; with a seed, the
    r-th sequence samples with seed + seed_offset + r. On an error, the ones already submitted are cancelled."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    if len(plist) != len(prompts):
        raise ChatsmithError(f"got {len(prompts)} prompts but {len(plist)} sampling parameter sets")
    stops = None if stop_ids is None else list(stop_ids)
    reqs: list[Request] = []
    try:
        r = 0
        for prompt, p in zip(prompts, plist):
            for _ in range(p.n):
                seed = None if p.seed is None else (p.seed + seed_offset + r) % 2**64
                reqs.append(engine.submit(prompt, p, stops, seed=seed, check_queue=False))
                r += 1
    except Exception:
        for q in reqs:
            q.cancel()
        raise
    return reqs


def resolve_precision(model: Any, precision: str = "auto") -> str:
    """The engine precision for `precision`: "auto" is, for a Llama-family model on a CPU, int4 when its
    weights already sit on int4's grid (a 4-bit GGUF such as the embedded model: nothing lost, the
    fastest step, and closer to fp32 than int8's per-row activations) and chatsmith's int4 kernel runs
    here, else int8 (several times faster than the model's modules); elsewhere "module" (the model's
    own weights and dtype). int8 and int4 fall back to "module" (with a log line) for a model the
    fast path does not cover."""
    from chatsmith.infer.precision import PRECISIONS
    from chatsmith.infer.runners import on_q4_1_grid, supports_fast_path

    if precision != "auto" and precision not in PRECISIONS:
        raise ChatsmithError(f"precision must be auto or one of {', '.join(PRECISIONS)}, got '{precision}'")
    if precision != "module" and precision != "auto" and not supports_fast_path(model):
        return _int8_fallback(model)
    if precision.startswith("int4") and not on_q4_1_grid(model):
        log.warning("precision %s rounds this model's weights to a 4-bit grid. Weights fine-tuned from a "
                    "4-bit model move by far less than one step of that grid and are mostly rounded back: "
                    "int4 can undo a fine-tuning (docs/serve.md, int4). int8 keeps more of it", precision)
    if precision != "auto":
        return precision
    on_cpu = next(model.parameters()).device.type == "cpu"
    if not (on_cpu and supports_fast_path(model)):
        return "module"
    from chatsmith.infer.int4 import own_kernel

    cfg = getattr(model, "config", None)
    sizes = (getattr(cfg, "hidden_size", 1), getattr(cfg, "intermediate_size", 1))
    if all(s % 64 == 0 for s in sizes) and own_kernel() is not None and on_q4_1_grid(model):
        return "int4"
    return "int8"


def _int8_fallback(model: Any) -> str:
    """'module', with a log line saying why: the int8/int4 decode step is the Llama-family runner's."""
    log.warning("precision int8/int4: the native quantized decode step covers Llama-family models (llama, mistral "
                "without a sliding window, qwen2); this '%s' model decodes through its own modules "
                "(precision 'module') instead", getattr(getattr(model, "config", None), "model_type", "?"))
    return "module"


@dataclass
class Completion:
    """One finished sequence."""

    token_ids: list[int]          # generated ids; ends with the stop token id when finish_reason is "stop" by token
    logprobs: list[float]         # log p(chosen) under the raw model distribution (log_softmax of the logits)
    finish_reason: str            # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per step, when params.top_logprobs
    stop_string: str | None = None  # the stop string that ended generation, if one did
    error: str | None = None
    text: str = ""                # the answer's text (up to a stop string); "" when the engine has no tokenizer
    # With params.prompt_logprobs: log p(prompt[i] | prompt[:i]) per prompt token, None for the first
    # (nothing predicts it), and the K most likely tokens at each of those positions ([] for the first).
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None


class Request:
    """One sequence in the engine. Created by `Engine.submit`; `cancel()` is safe from any thread.

    `on_token(request, token_id, logprob, text)` receives each token with the text it made safe to
    show (possibly ""); when the request finishes, `tail` holds the text still held back then.
    """

    def __init__(self, rid: int, prompt: list[int], params: SamplingParams, stop_ids: frozenset[int],
                 adapter: str | None, seed: int | None, on_token: Callable[..., None] | None,
                 on_finish: Callable[[Request], None] | None, constraint: Any = None,
                 tokenizer: Any = None) -> None:
        import torch

        self.id, self.prompt, self.params, self.stop_ids, self.adapter = rid, prompt, params, stop_ids, adapter
        self.on_token, self.on_finish = on_token, on_finish
        self.constraint = constraint       # e.g. JsonObjectConstraint: allows(token), advance(token), done
        self.output: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.finish_reason: str | None = None
        self.stop_string: str | None = None
        self.error: str | None = None
        self.slot: int | None = None
        self.cached = 0                    # tokens already in the KV cache
        self.reused = 0                    # prompt tokens not prefilled (prefix cache, or an identical prompt)
        self.prompt_logits: Any = None     # logits after the whole prompt (prefix sharing), while running
        self.pending: int | None = None    # sampled token not yet fed to the model
        self.counts: dict[int, int] = {}   # generated token -> count (presence/frequency penalties)
        self.detok = TextStream(tokenizer, params.stop) if tokenizer is not None else None
        self.tail = ""                     # text held back until the end, set when the request finishes
        self.cancelled = False
        self.done = threading.Event()
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None
        self.group: Any = rid                # requests of one group share a fair turn (an API request's n)
        self.ready: Any = None               # (logits, logp) computed but not yet chosen from
        self.choice_cost = COSTLY_CHOICE_S * 10 if constraint is not None else 0.0   # seconds, running mean
        self.finished_at: float | None = None
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.history = torch.tensor(prompt, dtype=torch.long)
        # Filled chunk by chunk during prefill when params.prompt_logprobs is set (see Completion).
        scored = params.prompt_logprobs is not None
        self.prompt_logprobs: list[float | None] | None = [None] if scored else None
        self.prompt_top_logprobs: list[list[tuple[int, float]]] | None = [[]] if scored else None

    def cancel(self) -> None:
        """Ask the engine to stop this request at its next step (safe from any thread)."""
        self.cancelled = True

    @property
    def finished(self) -> bool:
        """Whether the request has a finish reason."""
        return self.finish_reason is not None

    def completion(self) -> Completion:
        """What the request produced so far (all of it once finished)."""
        return Completion(list(self.output), list(self.logprobs), self.finish_reason or "cancelled", len(self.prompt),
                          list(self.top_logprobs), self.stop_string, self.error,
                          self.detok.text if self.detok is not None else "",
                          None if self.prompt_logprobs is None else list(self.prompt_logprobs),
                          None if self.prompt_top_logprobs is None else list(self.prompt_top_logprobs))

    def wait(self, timeout: float | None = None) -> Completion:
        """Block until the request finishes; its Completion."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return self.completion()


class _EvalMode:
    """Put every submodule in eval mode (no dropout) and restore each one's own flag afterwards."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.saved: list[tuple[Any, bool]] = []

    def __enter__(self) -> None:
        self.saved = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.saved:
            m.training = flag


class EngineFront:
    """What the built-in engine and the vLLM engine (infer/vllm_engine.py) share: the waiting queue,
    `submit`, `generate`, `stream`, the background loop with `start`/`stop`, how a generated token is
    delivered (the callback with its text, then the stop token, stop strings and the length limit)
    and how a request finishes. A subclass sets model, tokenizer, adapter_names, stop_default and
    vocab_size, calls `_init_front`, and provides `_step()`, `_active()` (the requests it is
    generating), `check_prompt` and `_release(req, reason)` (what finishing frees: a KV slot, or
    vLLM's request); `_inline()` and `_loop_context()` wrap the steps run by a caller and by the
    background thread."""

    constraint_error: str | None = None   # why token constraints cannot run here, where they cannot
    thread_name = "chatsmith-engine"

    def _init_front(self, max_batch_size: int, max_queue: int) -> None:
        if max_batch_size < 1:
            raise ChatsmithError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self._waiting: deque[Request] = deque()
        self._lock = threading.Lock()          # guards _waiting and counters
        self._step_lock = threading.RLock()    # one step at a time
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._next_id = 0
        self.recent: deque[Request] = deque(maxlen=64)  # the last finished requests, newest last
        self.stats = {"requests": 0, "finished": 0, "prompt_tokens": 0, "generated_tokens": 0, "steps": 0}

    # ---- what a subclass provides ---------------------------------------------------------------------

    def _step(self) -> None:
        raise NotImplementedError

    def _active(self) -> list[Request]:
        raise NotImplementedError

    def _release(self, req: Request, reason: str) -> None:
        raise NotImplementedError

    def check_prompt(self, prompt: list[int]) -> None:
        raise NotImplementedError

    def _inline(self) -> Any:
        """The context of steps run in the caller's thread (`generate`, `step_once`)."""
        return contextlib.nullcontext()

    def _loop_context(self) -> Any:
        """The context of each step of the background thread."""
        return contextlib.nullcontext()

    def _started(self) -> None:
        """Called by `start` before the thread starts."""

    def _stopped(self) -> None:
        """Called by `stop` after the thread has ended and the requests are cancelled."""

    # ---- public API -------------------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams, stop_ids: Iterable[int] | None = None, *,
               adapter: str | None = None, seed: int | None = None,
               on_token: Callable[..., None] | None = None, on_finish: Callable[[Request], None] | None = None,
               check_queue: bool = True, constraint: Any = None, group: Any = None) -> Request:
        """Queue one sequence and return its Request (thread-safe). `seed` overrides `params.seed`.

        `on_token(request, token_id, logprob, text)` and `on_finish(request)` are called from the
        engine's thread. Requests with the same `group` take turns as one (see the module docstring).
        Raises RequestTooLarge, EngineBusy, or ChatsmithError for bad parameters.
        """
        params.validate()
        prompt = [int(t) for t in prompt]
        self.check_prompt(prompt)
        if constraint is not None and self.constraint_error:
            raise ChatsmithError(self.constraint_error)
        if params.stop and self.tokenizer is None:
            raise ChatsmithError(f"stop strings need the engine to have a tokenizer: {type(self).__name__}(model, "
                                 "tokenizer)")
        if adapter is not None and adapter not in self.adapter_names:
            raise ChatsmithError(f"unknown LoRA adapter '{adapter}'; this engine serves "
                                 f"{', '.join(self.adapter_names) or 'no adapters'}")
        stops = frozenset(self.stop_default if stop_ids is None else (int(t) for t in stop_ids)) | frozenset(
            params.stop_token_ids)
        with self._lock:
            if check_queue and self.waiting >= self.max_queue:
                raise EngineBusy(f"the queue is full ({self.waiting} requests waiting); retry shortly",
                                 retry_after=max(1, self.waiting // max(self.max_batch_size, 1)))
            self._next_id += 1
            req = Request(self._next_id, prompt, params, stops, adapter, params.seed if seed is None else seed,
                          on_token, on_finish, constraint, self.tokenizer)
            if group is not None:
                req.group = group
            self._waiting.append(req)
            self.stats["requests"] += 1
            self._wake.notify()
        return req

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 stop_ids: Iterable[int] | None = None, *, seed_offset: int = 0) -> list[Completion]:
        """Generate for every prompt (n completions each, consecutive, when params.n > 1). With a seed,
        the r-th sequence of the call samples with seed + seed_offset + r (see the module docstring)."""
        reqs = submit_all(self, prompts, params, stop_ids, seed_offset)
        if self._thread is not None and self._thread.is_alive():
            return [q.wait() for q in reqs]
        with self._step_lock, self._inline():
            try:
                while not all(q.finished for q in reqs):
                    self._step()
            except BaseException:
                # Leave the engine clean for the next call: finish this call's requests.
                for q in reqs:
                    q.cancel()
                self._drop_cancelled()
                raise
        return [q.completion() for q in reqs]

    def stream(self, prompt: list[int], params: SamplingParams, stop_ids: Iterable[int] | None = None, *,
               adapter: str | None = None) -> Stream:
        """Generate one answer and iterate over its text as it is produced (`for piece in engine.stream(...)`).

        Without the background thread, iterating steps the engine itself, one step per loop, and no
        grad or inference mode is held across a `yield`. `Stream.cancel()` (e.g. on Ctrl-C) ends
        the answer after the current step; closing the iterator early cancels it too.
        """
        return Stream(self, self.submit(prompt, params, stop_ids, adapter=adapter, check_queue=False))

    def step_once(self) -> None:
        """Run one scheduler step in the calling thread (when no background thread is running)."""
        with self._step_lock, self._inline():
            self._step()

    def start(self) -> None:
        """Run the scheduler in a background thread (for servers); `submit` then returns at once."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._started()
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread; running requests finish as cancelled."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._step_lock:
            for req in self._active() + list(self._waiting):
                req.cancel()
            self._drop_cancelled()
        self._stopped()

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests holding a slot (prefilling or decoding)."""
        return len(self._active())

    # ---- the loop and the requests' ends ------------------------------------------------------------

    def _default_stop_ids(self) -> set[int]:
        return default_stop_ids(self.model, self.tokenizer)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._active():
                    self._wake.wait(timeout=0.5)
                if self._stopping:
                    return
            try:
                with self._step_lock, self._loop_context():
                    self._step()
            except Exception as e:  # keep serving: fail the running requests, not the process
                log.exception("engine step failed")
                with self._step_lock:
                    for req in self._active():
                        self._finish(req, "error", error=f"{type(e).__name__}: {e}")

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in self._waiting if r.cancelled]
            for r in gone:
                self._waiting.remove(r)
        for r in gone:
            self._finish(r, "cancelled")
        for r in [r for r in self._active() if r.cancelled]:
            self._finish(r, "cancelled")

    def _deliver(self, req: Request, token: int, lp: float, full: bool = False) -> bool:
        """A generated token, already in `req.output`: its time, its callback with the text it made
        safe to show, then the stop token, stop strings and the length limit (`full`: no room for
        another). True when the request finished."""
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        self.stats["generated_tokens"] += 1
        stop_token = token in req.stop_ids
        text = req.detok.push(token) if req.detok is not None and not stop_token else ""
        if req.on_token is not None:
            try:
                req.on_token(req, token, lp, text)
            except Exception:
                log.exception("on_token callback failed; cancelling request %s", req.id)
                req.cancel()
        if stop_token:
            self._finish(req, "stop")
        elif req.detok is not None and req.detok.stopped:
            req.stop_string = req.detok.stop_string
            self._finish(req, "stop")
        elif len(req.output) >= req.params.max_new_tokens or full:
            self._finish(req, "length")
        else:
            return False
        return True

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        if req.finished and req.done.is_set():
            return
        req.finish_reason, req.error = reason, error
        if req.detok is not None:
            req.tail = req.detok.finish()
        req.finished_at = time.monotonic()
        self._release(req, reason)
        self.stats["finished"] += 1
        self.stats["prompt_tokens"] += len(req.prompt)
        self.recent.append(req)
        if req.on_finish is not None:
            try:
                req.on_finish(req)
            except Exception:
                log.exception("on_finish callback failed for request %s", req.id)
        req.done.set()


class Engine(EngineFront):
    """Continuous-batching generation over one model; see the module docstring."""

    def __init__(self, model: Any, tokenizer: Any = None, *, max_batch_size: int = 16, precision: str = "module",
                 kv_cache_mb: float | None = None, prefill_chunk: int = 256, max_queue: int = 1024,
                 adapters: dict[str, str] | None = None, fast_path: bool = True,
                 max_sequence_tokens: int | None = None, prefix_cache: bool = False,
                 adaptive_threads: bool = True) -> None:
        """max_sequence_tokens: the longest a sequence (prompt + generated) will get, when the caller knows
        it (RL rollouts: --max-length); each slot's KV cache is sized to it instead of the model's whole
        context, which on a GPU is allocated up front. prefix_cache: reuse finished and running
        sequences' KV caches for the prompts that start like them (see the module docstring).
        adaptive_threads: the native int8/int4 step runs on torch's threads or on one, whichever its
        measured decode steps say is faster now (infer/threads.py; the same bits either way)."""
        from chatsmith.infer.lora import load_lora_adapter
        from chatsmith.infer.runners import LlamaRunner, ModuleRunner, supports_fast_path

        self._init_front(max_batch_size, max_queue)
        self.stats["cached_prompt_tokens"] = 0
        from chatsmith.infer.precision import PRECISIONS

        if precision not in PRECISIONS:
            raise ChatsmithError(f"precision must be 'module' (the model's own weights, exact) or one of "
                                 f"{', '.join(PRECISIONS[1:])}, got '{precision}'")
        self.model, self.tokenizer = model, tokenizer
        self.prefill_chunk = max(1, prefill_chunk)
        self.context = context_length(model) or 2048
        fast = fast_path and supports_fast_path(model)
        if not fast and precision != "module" and not adapters:
            precision = _int8_fallback(model)
        if not fast and (precision != "module" or adapters):
            raise ChatsmithError(f"precision '{precision}' and named LoRA adapters need a Llama-family model "
                                 f"(llama, mistral, qwen2); this one is "
                                 f"'{getattr(getattr(model, 'config', None), 'model_type', '?')}'. Use precision 'module'")
        seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        if seq2seq:
            from chatsmith.infer.seq2seq import Seq2SeqRunner
        runner_cls = LlamaRunner if fast else Seq2SeqRunner if seq2seq else ModuleRunner
        self.bytes_per_token = runner_cls.bytes_per_token(model)
        if kv_cache_mb is None:
            self.slot_tokens = self.context
        else:
            per_slot = int(kv_cache_mb * 2**20 // (max_batch_size * self.bytes_per_token))
            if per_slot < 16:
                raise ChatsmithError(
                    f"a KV cache budget of {kv_cache_mb} MB holds only {per_slot} tokens per sequence over "
                    f"{max_batch_size} slots ({self.bytes_per_token} bytes per token); raise the budget or lower "
                    "the max batch size (--max-concurrency)")
            self.slot_tokens = min(self.context, per_slot)
        if max_sequence_tokens is not None:
            self.slot_tokens = min(self.slot_tokens, max(16, max_sequence_tokens))
        self.kv_cache_mb = kv_cache_mb
        self.precision = precision
        self.stop_default = self._default_stop_ids()
        self.adapter_names: list[str] = []
        loaded = {}
        if adapters:
            for name, path in adapters.items():
                loaded[name] = load_lora_adapter(name, path)
            self.adapter_names = list(loaded)
        import torch

        with torch.no_grad(), _EvalMode(model):
            if fast:
                calibration = tokenizer(CALIBRATION_TEXT)["input_ids"] if tokenizer is not None else None
                self.runner: Any = LlamaRunner(model, max_batch_size=max_batch_size, slot_tokens=self.slot_tokens,
                                               precision=precision, adapters=loaded, calibration_ids=calibration)
            else:
                self.runner = runner_cls(model, max_batch_size=max_batch_size, slot_tokens=self.slot_tokens)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0]) if hasattr(
            model, "get_output_embeddings") and model.get_output_embeddings() is not None else None

        self._served: dict[Any, int] = {}      # group -> the last step one of its costly choices was made
        self._running: list[Request] = []
        self._free_slots = list(range(max_batch_size))
        self.prefix_cache = bool(prefix_cache) and getattr(self.runner, "keeps_released_cache", False)
        # Prefix cache: free slot -> (adapter, the token ids whose keys and values it still holds, the
        # length of the prompt whose last logits are kept with them, those logits).
        self._kept: dict[int, tuple[str | None, list[int], int, Any]] = {}
        self._eval: _EvalMode | None = None
        from chatsmith.infer.threads import ThreadGovernor

        native = getattr(self.runner, "native", None) is not None and precision != "module" and not loaded
        self._threads = torch.get_num_threads()
        self.governor = ThreadGovernor(self._threads) if adaptive_threads and native else None

    # ---- public API -------------------------------------------------------------------------------

    def sync_weights(self) -> None:
        """Refresh the int8 copies from the module's current weights (no-op in 'module' precision)."""
        import torch

        with self._step_lock, torch.no_grad(), _EvalMode(self.model):
            self.runner.sync_weights()
            self._kept.clear()   # computed with the old weights

    @property
    def threads(self) -> int:
        """The threads the engine's steps use now: the governor's choice, else torch's count when the
        engine was built."""
        return self.governor.current if self.governor is not None else self._threads

    def check_prompt(self, prompt: list[int]) -> None:
        """Raise RequestTooLarge/ChatsmithError when a prompt cannot be served."""
        check_prompt_ids(prompt, self.vocab_size)
        if len(prompt) >= self.slot_tokens:
            budget = (f" (KV cache budget {self.kv_cache_mb} MB over {self.max_batch_size} slots)"
                      if self.slot_tokens < self.context else "")
            raise RequestTooLarge(
                f"the prompt has {len(prompt)} tokens but a sequence can hold at most {self.slot_tokens} tokens"
                f"{budget}, with room for at least one new token; the model's context length is {self.context}. "
                "Shorten the prompt" + (", raise the KV cache budget or lower the max concurrency" if budget else ""))

    def _inline(self) -> Any:
        import torch

        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(_EvalMode(self.model))
        return stack

    def _loop_context(self) -> Any:
        import torch

        return torch.inference_mode()

    def _started(self) -> None:
        self._eval = _EvalMode(self.model)
        self._eval.__enter__()

    def _stopped(self) -> None:
        if self._eval is not None:
            self._eval.__exit__()
            self._eval = None

    def _active(self) -> list[Request]:
        return list(self._running)

    # ---- scheduler ----------------------------------------------------------------------------------

    def _step(self) -> None:
        self.stats["steps"] += 1
        self._drop_cancelled()
        self._admit()
        with self.governor.applied() if self.governor is not None else contextlib.nullcontext():
            self._prefill()
            self._decode()

    def _admit(self) -> None:
        admitted: list[Request] = []
        with self._lock:
            while self._waiting and self._free_slots:
                req = self._waiting.popleft()
                # Lowest free slot first keeps the used slots packed at the front of the cache; with
                # the prefix cache, the free slot that holds the longest start of this prompt.
                self._free_slots.sort()
                best = max(self._free_slots, key=lambda s: (self._kept_prefix(req, s), -s)) \
                    if self.prefix_cache and self._kept else self._free_slots[0]
                self._free_slots.remove(best)
                req.slot = best
                self._running.append(req)
                if self.prefix_cache:
                    admitted.append(req)
        for req in admitted:
            self._reuse_prefix(req)

    def _kept_prefix(self, req: Request, slot: int) -> int:
        """How many of `req`'s prompt tokens free slot `slot` holds (the prefix cache)."""
        adapter, ids, _, _ = self._kept.get(slot, (None, None, 0, None))
        if ids is None or adapter != req.adapter or req.params.prompt_logprobs is not None:
            return 0
        return common_prefix(ids, req.prompt)

    def _reuse_prefix(self, req: Request) -> None:
        """Start a newly admitted request past the longest start of its prompt that the cache holds:
        in its own slot (kept from a finished sequence) or in a running sequence's (copied). Identical
        prompts of running sequences are left to `_share_prefix`, which also shares the last logits."""
        own = self._kept_prefix(req, req.slot)
        _, _, kept_prompt, kept_logits = self._kept.pop(req.slot, (None, None, 0, None))   # the slot is req's now
        if own == len(req.prompt) == kept_prompt and kept_logits is not None:
            # The same prompt as the slot's last one: its logits are kept too, nothing to prefill.
            req.cached = req.reused = own
            req.prompt_logits = kept_logits
            self.stats["cached_prompt_tokens"] += own
            self._prompt_done(req, kept_logits)
            return
        best, donor = own, None
        if req.params.prompt_logprobs is None:
            for other in self._running:
                if other is req or other.slot is None or other.adapter != req.adapter or other.cached == 0:
                    continue
                if other.prompt == req.prompt and other.cached >= len(other.prompt):
                    return
                n = common_prefix(other.prompt[:other.cached], req.prompt)
                if n == min(len(other.prompt), other.cached) and other.cached > len(other.prompt):
                    n += common_prefix(other.output[:other.cached - len(other.prompt)], req.prompt[n:])
                if n > best:
                    best, donor = n, other
        n = min(best, len(req.prompt) - 1)   # the last prompt token always runs: its logits choose the next
        if n <= 0 or (donor is not None and not self.runner.copy_prefix(donor.slot, req.slot, n)):
            return
        req.cached = req.reused = n
        self.stats["cached_prompt_tokens"] += n

    def _prefill(self) -> None:
        # Up to `prefill_chunk` prompt tokens per step. A prompt is always cut at multiples of
        # `prefill_chunk` from its own start, so its numbers never depend on the other requests.
        # Chunks of several requests go through the model in one pass when the runner can batch them
        # (the native int8/int4 step, whose rows do not depend on each other); a request that scores
        # its prompt or uses an adapter runs on its own.
        budget = self.prefill_chunk
        batch: list[tuple[Request, list[int]]] = []
        deferred: list[Request] = []
        for req in list(self._running):
            if req.cached >= len(req.prompt) or req.finished:
                continue
            if req.cached == 0 and self._share_prefix(req):
                continue
            if req.cached == 0 and any(o.prompt == req.prompt and o.adapter == req.adapter and o.cached == 0
                                       and len(c) == len(o.prompt) for o, c in batch):
                deferred.append(req)   # its twin is prefilled in this pass: share its cache after it
                continue
            if budget <= 0:
                break
            n = min(self.prefill_chunk, len(req.prompt) - req.cached)
            chunk = req.prompt[req.cached: req.cached + n]
            budget -= n
            if req.prompt_logprobs is None and req.adapter is None:
                batch.append((req, chunk))
                continue
            # Positions of this chunk whose next token is still in the prompt (the last one's is generated).
            rows = min(n, len(req.prompt) - 1 - req.cached)
            if req.prompt_logprobs is not None and rows > 0:
                logits, scored = self.runner.prefill_scored(req.slot, chunk, req.cached, req.adapter, rows)
                self._score_prompt(req, scored, req.prompt[req.cached + 1: req.cached + 1 + rows])
            else:
                logits = self.runner.prefill(req.slot, chunk, req.cached, req.adapter)
            self._prefilled(req, len(chunk), logits)
        if batch:
            together = None
            if len(batch) > 1 and hasattr(self.runner, "prefill_batch"):
                together = self.runner.prefill_batch([(r.slot, c, r.cached) for r, c in batch])
            for i, (req, chunk) in enumerate(batch):
                logits = together[i] if together is not None else self.runner.prefill(req.slot, chunk, req.cached, None)
                self._prefilled(req, len(chunk), logits)
        for req in deferred:
            self._share_prefix(req)

    def _prefilled(self, req: Request, n: int, logits: Any) -> None:
        """`n` more prompt tokens of `req` are cached; `logits` are its last position's."""
        req.cached += n
        if req.cached == len(req.prompt) and not req.finished:
            req.prompt_logits = logits
            self._prompt_done(req, logits)

    def _score_prompt(self, req: Request, logits: Any, targets: list[int]) -> None:
        """Append the log-probs of `targets` under `logits` [T, V] (row i predicts targets[i]) to the
        request's prompt log-probs. An error here fails this request only."""
        import torch

        try:
            logp = torch.log_softmax(logits.float(), dim=-1)
            chosen = logp.gather(1, torch.tensor(targets, dtype=torch.long, device=logp.device)[:, None])[:, 0]
            req.prompt_logprobs.extend(chosen.tolist())
            k = req.params.prompt_logprobs
            if k:
                # From the same tensor as `chosen`: a token that is the most likely has exactly the top value.
                v, ix = torch.topk(logp, k, dim=-1)
                req.prompt_top_logprobs.extend([list(zip(a, b)) for a, b in zip(ix.tolist(), v.tolist())])
            else:
                req.prompt_top_logprobs.extend([] for _ in targets)
        except Exception as e:
            log.exception("scoring the prompt of request %s failed", req.id)
            self._finish(req, "error", error=f"{type(e).__name__}: {e}")

    def _prompt_done(self, req: Request, logits: Any) -> None:
        """The whole prompt is cached: choose the first new token, or finish a request that only
        scores its prompt (max_new_tokens 0)."""
        if req.params.max_new_tokens == 0:
            self._finish(req, "length")
        else:
            self._logits_ready(req, logits)

    def _share_prefix(self, req: Request) -> bool:
        """Prefix sharing for identical prompts (the G answers of a GRPO group, `n` choices): copy
        the KV cache and the last logits of a running request that has the same prompt and adapter
        fully cached. Its cached prompt positions are exactly what this request's own prefill would
        compute (same ids, same chunking), so the outputs do not change; only the work does."""
        wanted = req.params.prompt_logprobs
        for donor in self._running:
            # A request that scores its prompt shares only with a donor that scored it as deeply.
            if (donor is not req and donor.prompt_logits is not None and donor.slot is not None
                    and donor.adapter == req.adapter and donor.prompt == req.prompt
                    and (wanted is None or (donor.prompt_logprobs is not None and donor.params.prompt_logprobs >= wanted))
                    and self.runner.copy_prefix(donor.slot, req.slot, len(req.prompt))):
                req.cached = req.reused = len(req.prompt)
                req.prompt_logits = donor.prompt_logits
                if wanted is not None:
                    req.prompt_logprobs = list(donor.prompt_logprobs)
                    req.prompt_top_logprobs = [top[:wanted] for top in donor.prompt_top_logprobs]
                self.stats["shared_prompt_tokens"] = self.stats.get("shared_prompt_tokens", 0) + len(req.prompt)
                self._prompt_done(req, donor.prompt_logits)
                return True
        return False

    def _decode(self) -> None:
        rows = [r for r in self._running if r.pending is not None and not r.finished]
        forward_s = 0.0
        if rows:
            import torch

            t0 = time.perf_counter()
            logits = self.runner.decode([r.slot for r in rows], [r.pending for r in rows],
                                        [r.cached for r in rows], [r.adapter for r in rows])
            forward_s = time.perf_counter() - t0
            if self.governor is not None:
                self.governor.record(forward_s, len(rows))
            logp = torch.log_softmax(logits, dim=-1)
            for i, r in enumerate(rows):
                r.cached += 1
                r.pending = None
                r.ready = (logits[i], logp[i])
        self._choose_ready(forward_s)

    def _logits_ready(self, req: Request, logits: Any) -> None:
        """A prompt's last logits: a cheap choice is made at once (the answer's next token then joins
        this step's decode), a costly one waits for its fair turn."""
        req.ready = (logits, None)
        if not _costly(req):
            self._choose_now(req)

    def _choose_ready(self, forward_s: float) -> None:
        """Choose the next token of every request whose logits are ready: the cheap ones all, the
        costly ones group by group in round-robin order within the step's budget (at least one)."""
        ready = [r for r in self._running if r.ready is not None and not r.finished]
        costly: dict[Any, list[Request]] = {}
        for r in ready:
            if not _costly(r):
                self._choose_now(r)
            else:
                costly.setdefault(r.group, []).append(r)
        if not costly:
            return
        # Groups served longest ago go first, then one row per group per round.
        order = sorted(costly, key=lambda g: self._served.get(g, -1))
        turns = [r for rnd in range(max(len(v) for v in costly.values()))
                 for g in order if rnd < len(costly[g]) for r in costly[g][rnd:rnd + 1]]
        budget, spent = max(COSTLY_BUDGET_FLOOR_S, forward_s), 0.0
        for r in turns:
            if spent >= budget:
                self.stats["deferred_choices"] = self.stats.get("deferred_choices", 0) + 1
                continue
            spent += self._choose_now(r)
            self._served[r.group] = self.stats["steps"]

    def _choose_now(self, req: Request) -> float:
        """Choose `req`'s next token from its ready logits; the seconds it took (kept as a running mean)."""
        logits, logp = req.ready
        req.ready = None
        t0 = time.perf_counter()
        self._accept(req, logits, logp)
        took = time.perf_counter() - t0
        req.choice_cost = 0.5 * req.choice_cost + 0.5 * took
        return took

    def _accept(self, req: Request, logits: Any, logp: Any = None) -> None:
        """Sample the next token of `req` from its logits [V] and check the stop conditions. An
        error here (a bad parameter that slipped through, a callback) fails this request only."""
        try:
            self._accept_token(req, logits, logp)
        except Exception as e:
            log.exception("choosing the next token of request %s failed", req.id)
            self._finish(req, "error", error=f"{type(e).__name__}: {e}")

    def _accept_token(self, req: Request, logits: Any, logp: Any) -> None:
        import torch

        if logp is None:
            logp = torch.log_softmax(logits, dim=-1)
        token = self._choose(req, logits)
        lp = float(logp[token])
        req.output.append(token)
        req.logprobs.append(lp)
        if req.constraint is not None:
            req.constraint.advance(token)
        req.counts[token] = req.counts.get(token, 0) + 1
        if req.params.repetition_penalty != 1.0:
            req.history = torch.cat([req.history, torch.tensor([token])])
        if req.params.top_logprobs:
            v, ix = torch.topk(logp, req.params.top_logprobs)
            req.top_logprobs.append(list(zip(ix.tolist(), v.tolist())))
        if not self._deliver(req, token, lp, full=req.cached + 1 >= self.slot_tokens):
            req.pending = token

    def _choose(self, req: Request, logits: Any) -> int:
        from chatsmith.infer.sampling import apply_penalties, next_token

        history = req.history if req.params.repetition_penalty != 1.0 else req.history[:0]
        if req.constraint is not None:
            return self._choose_constrained(req, apply_penalties(logits, req.params, history, req.counts))
        return next_token(logits, req.params, history, req.generator, req.counts)

    def _choose_constrained(self, req: Request, scores: Any) -> int:
        """The most likely allowed token (greedy), or a draw among the allowed ones."""
        import torch

        from chatsmith.infer.sampling import warped_probs

        c = req.constraint
        if c.done:
            return min(req.stop_ids) if req.stop_ids else int(scores.argmax())
        if hasattr(c, "allowed"):   # a grammar constraint gives its whole allowed set at once, as a mask
            allowed = c.allowed(scores.numel())
            if not bool(allowed.any()):
                return min(req.stop_ids) if req.stop_ids else int(scores.argmax())
            scores = scores.masked_fill(~allowed, float("-inf"))
            if req.params.greedy:
                return int(scores.argmax())
            return int(torch.multinomial(warped_probs(scores, req.params), 1, generator=req.generator))
        probs = None if req.params.greedy else warped_probs(scores, req.params)
        ranked = scores if probs is None else probs
        k = min(2048, ranked.numel())
        values, order = ranked.topk(k)   # sorted; far cheaper than sorting the whole vocabulary
        allowed: list[int] = []
        for v, t in zip(values.tolist(), order.tolist()):
            # Sampling: draw among the allowed tokens of the top 2048 that have probability left.
            if probs is not None and allowed and v <= 0:
                break
            if c.allows(t):
                allowed.append(t)
                if probs is None or len(allowed) >= 64:
                    break
        if not allowed and k < ranked.numel():   # nothing allowed in the top 2048: the most likely allowed one
            for t in ranked.sort(descending=True).indices[k:].tolist():
                if c.allows(t):
                    allowed.append(t)
                    break
        if not allowed:  # nothing can continue the object: end here rather than write invalid JSON
            return min(req.stop_ids) if req.stop_ids else int(scores.argmax())
        if probs is None or len(allowed) == 1:
            return allowed[0]
        ids = torch.tensor(allowed)
        p = probs[ids]
        p = p / p.sum() if p.sum() > 0 else torch.full_like(p, 1 / len(allowed))
        return allowed[int(torch.multinomial(p, 1, generator=req.generator))]

    def _release(self, req: Request, reason: str) -> None:
        """A finishing request leaves the batch and frees its slot (kept for the prefix cache)."""
        req.ready = None
        logits, req.prompt_logits = req.prompt_logits, None
        if req in self._running:
            self._running.remove(req)
        if req.slot is not None:
            if self.prefix_cache and reason != "error" and req.cached > 0:
                self._kept[req.slot] = (req.adapter, (req.prompt + req.output)[:req.cached], len(req.prompt), logits)
            self.runner.release(req.slot)
            with self._lock:
                self._free_slots.append(req.slot)
            req.slot = None


class Stream:
    """The text of one request as it is generated; see `Engine.stream`. `request` is the engine's
    Request (its output ids, finish reason and stop string once finished)."""

    def __init__(self, engine: Engine, request: Request) -> None:
        self.engine, self.request = engine, request
        self._pieces: deque[str] = deque()
        self._ready = threading.Condition()
        self._ended = False   # set (under the lock) once the last piece, the held-back tail, is queued
        previous_on_token, previous_on_finish = request.on_token, request.on_finish

        def on_token(req: Request, token: int, logprob: float, text: str) -> None:
            if previous_on_token is not None:
                previous_on_token(req, token, logprob, text)
            if text:
                with self._ready:
                    self._pieces.append(text)
                    self._ready.notify_all()

        def on_finish(req: Request) -> None:
            if previous_on_finish is not None:
                previous_on_finish(req)
            with self._ready:
                if req.tail:
                    self._pieces.append(req.tail)
                self._ended = True
                self._ready.notify_all()

        request.on_token, request.on_finish = on_token, on_finish

    def cancel(self) -> None:
        """End the answer after the current step (safe from a signal handler or another thread)."""
        self.request.cancel()

    def __iter__(self) -> Iterator[str]:
        engine, req = self.engine, self.request
        try:
            while True:
                with self._ready:
                    while self._pieces:
                        piece = self._pieces.popleft()
                        self._ready.release()
                        try:
                            yield piece
                        finally:
                            self._ready.acquire()
                    if self._ended and not self._pieces:
                        return
                    threaded = engine._thread is not None and engine._thread.is_alive()
                    if threaded:
                        self._ready.wait(timeout=0.5)
                        continue
                engine.step_once()
        finally:
            if not req.done.is_set():   # the caller stopped iterating early: free the slot
                req.cancel()
                if not (engine._thread is not None and engine._thread.is_alive()):
                    while not req.done.is_set():
                        engine.step_once()

    def completion(self) -> Completion:
        """The finished request's Completion (iterate first)."""
        return self.request.completion()
