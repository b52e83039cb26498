"""The teacher: any OpenAI-compatible chat or completions endpoint (`chatsmith serve` included),
called with the official `openai` client, and a journal that makes every paid answer happen once.

- Requests run `concurrency` at a time (the caller's thread pool; a semaphore here caps it even
  when several pools share one teacher).
- A 429, a 5xx, a timeout or a dropped connection is retried with exponential backoff (Retry-After
  honoured when the server sends one), `max_retries` times; the client's own retries are off so that
  every retry is counted here.
- Token usage is summed from each answer's `usage`, split into what this run paid for and what was
  replayed from the journal; with prices per million tokens, a cost estimate.
- The journal is a JSONL file of answers keyed by a digest of the request (endpoint kind, model,
  prompt, sampling settings and the attempt number). An interrupted run replays the answers it
  already has instead of asking again, so no paid request is ever repeated; a torn last line (a
  kill mid-write) is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError

API_KINDS = ("chat", "completions")


def request_key(body: dict[str, Any]) -> str:
    """A short digest of a request body: the journal's key and the 'prompt id' of provenance."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


class Journal:
    """Answers already paid for, keyed by request digest, appended and flushed as they arrive.
    Memory holds each key's byte offset in the file, not the answers (a translation of a million
    records keeps a journal of millions of answers)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.offsets: dict[str, int] = {}
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            with self.path.open("rb") as f:
                offset, line = 0, b""
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        row = None   # the torn last line of a killed run
                    if isinstance(row, dict) and "key" in row:
                        self.offsets[row["key"]] = offset
                    offset += len(line)
                if line and not line.endswith(b"\n"):
                    self.path.open("ab").write(b"\n")   # a torn line must not swallow the next append
        self._reader = self.path.open("a+b")

    def __len__(self) -> int:
        return len(self.offsets)

    def get(self, key: str) -> dict[str, Any] | None:
        """The journalled answer of a request, if any."""
        with self._lock:
            offset = self.offsets.get(key)
            if offset is None:
                return None
            self._reader.seek(offset)
            return json.loads(self._reader.readline())

    def put(self, row: dict[str, Any]) -> None:
        """Record an answer (the row carries its 'key') and flush it to disk at once."""
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
        with self._lock:
            self._reader.seek(0, 2)
            offset = self._reader.tell()
            self._reader.write(line)
            self._reader.flush()
            self.offsets[row["key"]] = offset


@dataclass
class TeacherSettings:
    """Where the teacher is and how it is asked."""

    url: str
    model: str
    api_key: str | None = None
    api: str = "chat"              # chat (/v1/chat/completions) or completions (/v1/completions)
    concurrency: int = 4           # requests in flight at once
    max_retries: int = 5           # transport retries (429, 5xx, timeouts, connection errors)
    timeout: float = 120.0         # seconds per request
    backoff: float = 1.0           # first wait in seconds; doubles per retry, at most backoff_max
    backoff_max: float = 30.0
    price_in: float | None = None  # price per million prompt tokens (any currency)
    price_out: float | None = None # price per million completion tokens

    def __post_init__(self) -> None:
        if self.api not in API_KINDS:
            raise ChatsmithError(f"--teacher-api {self.api}: choose one of {', '.join(API_KINDS)}")
        if self.concurrency < 1:
            raise ChatsmithError(f"--concurrency must be at least 1, got {self.concurrency}")
        if not self.url or not self.model:
            raise ChatsmithError("a teacher needs --teacher-url (an OpenAI-compatible base URL such as "
                                 "http://127.0.0.1:8000/v1) and --teacher-model")


@dataclass
class Answer:
    """One teacher answer: its text, why it stopped, its token usage, its journal key, and whether
    it was replayed from the journal instead of paid for now."""

    text: str
    finish_reason: str | None
    key: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    replayed: bool = False


@dataclass
class Usage:
    """Requests and tokens, paid in this run and replayed from the journal."""

    requests: int = 0
    replayed: int = 0
    retries: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    replayed_prompt_tokens: int = 0
    replayed_completion_tokens: int = 0
    by_status: dict[str, int] = field(default_factory=dict)   # retried errors by kind (429, 503, timeout...)

    def cost(self, settings: TeacherSettings) -> float | None:
        """What this run's requests cost at the given prices per million tokens (None without prices)."""
        if settings.price_in is None and settings.price_out is None:
            return None
        return (self.prompt_tokens * (settings.price_in or 0.0)
                + self.completion_tokens * (settings.price_out or 0.0)) / 1e6

    def as_dict(self, settings: TeacherSettings | None = None) -> dict[str, Any]:
        """Counts as a dict, with the cost estimate when prices are known."""
        d = dict(self.__dict__)
        d["by_status"] = dict(self.by_status)
        if settings is not None:
            d["cost"] = self.cost(settings)
        return d


class Teacher:
    """Asks the teacher, through the journal: `complete(prompt, ...)` returns an Answer, from the
    journal when this exact request was answered before, else from the endpoint (with retries)."""

    def __init__(self, settings: TeacherSettings, journal: Journal | None = None) -> None:
        try:
            import openai
        except ImportError:  # pragma: no cover - a core dependency
            raise ChatsmithError("the teacher needs the openai client (a dependency of chatsmith): "
                                 "pip install openai") from None
        self.settings = settings
        self.journal = journal
        self.usage = Usage()
        key = settings.api_key or os.environ.get("CHATSMITH_TEACHER_API_KEY") or os.environ.get("OPENAI_API_KEY") \
            or "none"
        # max_retries=0: the retries happen in `_call`, where they are counted.
        self.client = openai.OpenAI(base_url=settings.url, api_key=key, max_retries=0, timeout=settings.timeout)
        self._openai = openai
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(settings.concurrency)
        self._rng = random.Random(0)   # jitter only; never affects what is asked

    # -- reachability ------------------------------------------------------------------------------

    def check_reachable(self) -> None:
        """Fail at once, naming the URL and what to check, when the endpoint is down or refuses the key."""
        s = self.settings
        try:
            self.client.with_options(timeout=min(10.0, s.timeout)).models.list()
        except self._openai.APIConnectionError as e:
            raise ChatsmithError(
                f"the teacher at {s.url} cannot be reached ({e.__cause__ or e}). Check that the server is running "
                f"(e.g. `chatsmith serve smollm2-135m --port 8000`) and that --teacher-url is its OpenAI-compatible "
                "base URL, usually ending in /v1") from None
        except self._openai.AuthenticationError:
            raise ChatsmithError(f"the teacher at {s.url} refused the API key: pass --teacher-api-key or set "
                                 "CHATSMITH_TEACHER_API_KEY (or OPENAI_API_KEY)") from None
        except self._openai.APIStatusError:
            pass   # a server without /models; the first request will tell

    # -- asking ------------------------------------------------------------------------------------

    def body(self, prompt: str | list[dict[str, str]], *, temperature: float, max_tokens: int,
             top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None) -> dict[str, Any]:
        """The request body for `prompt` (a string, or chat messages) on this teacher's endpoint kind."""
        s = self.settings
        b: dict[str, Any] = {"model": s.model, "temperature": temperature, "max_tokens": max_tokens, "top_p": top_p}
        if s.api == "chat":
            b["messages"] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        else:
            b["prompt"] = prompt if isinstance(prompt, str) else _flatten(prompt)
        if stop:
            b["stop"] = list(stop)
        if seed is not None:
            b["seed"] = seed
        return b

    def complete(self, prompt: str | list[dict[str, str]], *, temperature: float = 0.7, max_tokens: int = 512,
                 top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None, attempt: int = 0,
                 tag: str = "") -> Answer:
        """The teacher's answer to `prompt`. `attempt` > 0 asks the same prompt again (a retry after an
        unusable answer) as a separate journal entry; `tag` names the request's purpose in the journal."""
        body = self.body(prompt, temperature=temperature, max_tokens=max_tokens, top_p=top_p, stop=stop, seed=seed)
        key = request_key({"api": self.settings.api, "body": body, "attempt": attempt})
        row = self.journal.get(key) if self.journal is not None else None
        if row is not None:
            with self._lock:
                self.usage.replayed += 1
                self.usage.replayed_prompt_tokens += row.get("prompt_tokens", 0)
                self.usage.replayed_completion_tokens += row.get("completion_tokens", 0)
            return Answer(row["text"], row.get("finish_reason"), key, row.get("prompt_tokens", 0),
                          row.get("completion_tokens", 0), replayed=True)
        with self._slots:
            text, finish, pt, ct = self._call(body)
        if finish == "refused":
            # The endpoint refused this one request (400/413/422, e.g. a prompt longer than the
            # model's context): an unusable answer for the caller to count, not journalled (unpaid).
            return Answer("", finish, key)
        with self._lock:
            self.usage.requests += 1
            self.usage.prompt_tokens += pt
            self.usage.completion_tokens += ct
        if self.journal is not None:
            self.journal.put({"key": key, "tag": tag, "attempt": attempt, "request": body, "text": text,
                              "finish_reason": finish, "prompt_tokens": pt, "completion_tokens": ct,
                              "time": round(time.time(), 3)})
        return Answer(text, finish, key, pt, ct)

    def _call(self, body: dict[str, Any]) -> tuple[str, str | None, int, int]:
        """One request with retries: (text, finish_reason, prompt tokens, completion tokens)."""
        o = self._openai
        s = self.settings
        attempt = 0
        while True:
            try:
                if s.api == "chat":
                    resp = self.client.chat.completions.create(**body)
                    choice = resp.choices[0] if resp.choices else None
                    text = (choice.message.content or "") if choice is not None and choice.message else ""
                else:
                    resp = self.client.completions.create(**body)
                    choice = resp.choices[0] if resp.choices else None
                    text = (choice.text or "") if choice is not None else ""
                usage = getattr(resp, "usage", None)
                return (text, getattr(choice, "finish_reason", None),
                        int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0))
            except (o.RateLimitError, o.InternalServerError, o.APITimeoutError, o.APIConnectionError,
                    o.APIStatusError) as e:
                status = getattr(e, "status_code", None)
                retryable = not isinstance(e, o.APIStatusError) or status == 429 or (status or 0) >= 500 \
                    or status in (408, 409)
                kind = str(status) if status else ("timeout" if isinstance(e, o.APITimeoutError) else "connection")
                if status in (400, 413, 422):
                    with self._lock:
                        self.usage.by_status[f"{status} (not retried)"] = self.usage.by_status.get(
                            f"{status} (not retried)", 0) + 1
                    return "", "refused", 0, 0
                if not retryable or attempt >= s.max_retries:
                    with self._lock:
                        self.usage.failed += 1
                    if isinstance(e, o.APIConnectionError) and not isinstance(e, o.APITimeoutError):
                        raise ChatsmithError(f"the teacher at {s.url} stopped answering ({e.__cause__ or e}) after "
                                             f"{attempt + 1} tries; check the server, then run the same command "
                                             "again: answers already received are in the journal") from None
                    raise ChatsmithError(f"the teacher at {s.url} answered {kind} ({_message(e)}) after {attempt + 1} "
                                         "tries; fix the cause and run the same command again (answers already "
                                         "received are in the journal)") from None
                with self._lock:
                    self.usage.retries += 1
                    self.usage.by_status[kind] = self.usage.by_status.get(kind, 0) + 1
                    jitter = 0.5 + self._rng.random()
                wait = min(s.backoff_max, s.backoff * 2 ** attempt) * jitter
                retry_after = _retry_after(e)
                if retry_after is not None:
                    wait = min(s.backoff_max, max(wait, retry_after))
                time.sleep(wait)
                attempt += 1


def _retry_after(e: Exception) -> float | None:
    """Seconds from a Retry-After header (seconds form only), if the error carries a response."""
    resp = getattr(e, "response", None)
    value = resp.headers.get("retry-after") if resp is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _message(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:200]
    return str(e)[:200]


def _flatten(messages: list[dict[str, str]]) -> str:
    """Chat messages as one plain prompt for a completions endpoint."""
    return "\n\n".join(m["content"] for m in messages)


def usage_line(usage: Usage, settings: TeacherSettings) -> str:
    """One line for the terminal: requests, retries, tokens and cost."""
    line = (f"teacher {settings.model}: {usage.requests} requests paid, {usage.replayed} replayed from the journal, "
            f"{usage.retries} retries, {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens")
    cost = usage.cost(settings)
    if cost is not None:
        line += f", about {cost:.4f} at the given prices"
    return line
