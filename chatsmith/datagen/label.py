"""`chatsmith label`: a local page where a person ranks K sampled answers to each prompt.

The answers are sampled through the one engine (eval/answers.py), K per prompt with a temperature,
in a background thread, so the page opens at once and items become ready in order. A person ranks
them (drag and drop, or keys 1-K then Enter), marks ties, skips, or edits the best answer; each
decision is saved before the next item shows, and a restart continues at the first undecided item.

Files (OUTPUT is e.g. rankings.jsonl):

- ``OUTPUT``: one ranked list per ranked item, ``{prompt, responses, scores, order}``; scores are
  higher for better answers and equal for ties, so `chatsmith rm` and `chatsmith dpo --loss rrhf`
  read it as it is (``order`` such as "B>A=D>C" is for people). An edited best answer is added as
  its own response, scored above all the sampled ones.
- ``OUTPUT.pairs.jsonl`` (rankings.pairs.jsonl): ``{prompt, chosen, rejected}`` for every two
  answers of different rank, for `chatsmith dpo`.
- ``OUTPUT.labels.jsonl``: every decision (ranked or skipped) in order, the source of truth on
  restart; the two files above are rewritten from it at start, so a crash between writes loses
  nothing.
- ``OUTPUT.answers.jsonl``: the sampled answers, so a restart does not sample again.
"""

from __future__ import annotations

import hashlib
import json
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError

STATIC = Path(__file__).parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}


@dataclass
class LabelSettings:
    """How answers are sampled for the page."""

    model: str
    k: int = 4
    temperature: float = 0.8
    max_new_tokens: int = 256
    seed: int = 0
    template: str | None = None
    precision: str = "auto"
    batch_prompts: int = 8      # prompts sampled together

    def validate(self) -> None:
        if not 2 <= self.k <= 9:
            raise ChatsmithError(f"--k {self.k}: rank between 2 and 9 answers per prompt (keys 1-9)")
        if self.temperature <= 0:
            raise ChatsmithError("--temperature must be above 0: greedy decoding gives K identical answers")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def sibling(output: str | Path, suffix: str) -> Path:
    """OUTPUT's companion file: rankings.jsonl -> rankings.<suffix>."""
    p = Path(output)
    return p.with_name(p.name.rsplit(".", 1)[0] + "." + suffix)


def scores_from(order: list[int], tied: list[bool]) -> dict[int, float]:
    """Answer index -> score from a ranking best..worst where tied[i] means position i ties with
    position i-1: each group of tied answers scores the number of groups below it."""
    groups: list[list[int]] = []
    for pos, idx in enumerate(order):
        if pos > 0 and tied[pos]:
            groups[-1].append(idx)
        else:
            groups.append([idx])
    return {idx: float(len(groups) - 1 - g) for g, members in enumerate(groups) for idx in members}


def order_text(order: list[int], tied: list[bool], letters: list[str]) -> str:
    """"B>A=D>C" for people."""
    out = letters[order[0]]
    for pos in range(1, len(order)):
        out += ("=" if tied[pos] else ">") + letters[order[pos]]
    return out


class LabelStore:
    """The prompts, their sampled answers and the decisions, with the files described above."""

    def __init__(self, prompts: list[list[dict[str, str]]], output: str, settings: LabelSettings) -> None:
        if not str(output).endswith(".jsonl"):
            raise ChatsmithError(f"--output {output}: the rankings are JSON lines, name it .jsonl")
        self.prompts = prompts
        self.settings = settings
        self.output = Path(output)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.pairs_path = sibling(output, "pairs.jsonl")
        self.labels_path = sibling(output, "labels.jsonl")
        self.answers_path = sibling(output, "answers.jsonl")
        self.lock = threading.Lock()
        self.sampling_error: str | None = None
        self.answer_key = _digest({"model": settings.model, "k": settings.k, "temperature": settings.temperature,
                                   "max_new_tokens": settings.max_new_tokens, "seed": settings.seed,
                                   "template": settings.template})
        self.keys = [_digest(p) for p in prompts]
        self.answers: dict[int, list[str]] = {}
        for row in _read_jsonl(self.answers_path):
            i = row.get("index")
            if row.get("settings") == self.answer_key and isinstance(i, int) and i < len(prompts) \
                    and row.get("prompt_key") == self.keys[i]:
                self.answers[i] = row["answers"]
        self.decisions: dict[int, dict[str, Any]] = {}
        for row in _read_jsonl(self.labels_path):
            i = row.get("index")
            if isinstance(i, int) and i < len(prompts) and row.get("prompt_key") == self.keys[i]:
                self.decisions[i] = row
        self._rewrite_outputs()

    # -- answers -----------------------------------------------------------------------------------

    def missing_answers(self) -> list[int]:
        """Items without sampled answers that still need a decision, in order."""
        return [i for i in range(len(self.prompts)) if i not in self.answers and i not in self.decisions]

    def put_answers(self, index: int, answers: list[str]) -> None:
        with self.lock:
            self.answers[index] = answers
            _append(self.answers_path, {"index": index, "prompt_key": self.keys[index], "settings": self.answer_key,
                                        "answers": answers})

    def skip_unusable(self, index: int) -> None:
        """Record a skip for an item whose answers cannot be ranked (fewer than two distinct ones)."""
        row = {"index": index, "prompt_key": self.keys[index], "action": "skip", "time": round(time.time(), 3),
               "reason": "fewer than two distinct answers"}
        with self.lock:
            if index not in self.decisions:
                self.decisions[index] = row
                _append(self.labels_path, row)

    # -- the page's view ---------------------------------------------------------------------------

    def progress(self) -> dict[str, int]:
        ranked = sum(d["action"] == "rank" for d in self.decisions.values())
        return {"total": len(self.prompts), "ranked": ranked, "skipped": len(self.decisions) - ranked,
                "sampled": len(self.answers)}

    def next_item(self) -> dict[str, Any]:
        """The first undecided item: ready (with answers), waiting (still sampling), or finished."""
        with self.lock:
            progress = self.progress()
            pending = [i for i in range(len(self.prompts)) if i not in self.decisions]
            if not pending:
                return {"state": "finished", "progress": progress}
            i = pending[0]
            if i not in self.answers:
                return {"state": "error" if self.sampling_error else "waiting", "error": self.sampling_error,
                        "progress": progress, "index": i}
            letters = list(string.ascii_uppercase[: len(self.answers[i])])
            return {"state": "ready", "index": i, "prompt": self.prompts[i], "progress": progress,
                    "answers": [{"letter": ltr, "text": t} for ltr, t in zip(letters, self.answers[i])]}

    # -- decisions ---------------------------------------------------------------------------------

    def decide(self, payload: dict[str, Any]) -> None:
        """Validate and save one decision: {index, action: rank|skip, order, tied, edited}."""
        i = payload.get("index")
        if not isinstance(i, int) or not 0 <= i < len(self.prompts) or i not in self.answers:
            raise ValueError(f"no item {i!r} with answers")
        action = payload.get("action")
        row: dict[str, Any] = {"index": i, "prompt_key": self.keys[i], "action": action, "time": round(time.time(), 3)}
        if action == "rank":
            k = len(self.answers[i])
            order, tied = payload.get("order"), payload.get("tied") or [False] * k
            if not isinstance(order, list) or sorted(order) != list(range(k)):
                raise ValueError(f"'order' must list each of the {k} answers once, got {order!r}")
            if not isinstance(tied, list) or len(tied) != k or not all(isinstance(t, bool) for t in tied):
                raise ValueError(f"'tied' must be {k} booleans")
            edited = payload.get("edited")
            if edited is not None and not isinstance(edited, str):
                raise ValueError("'edited' must be a string")
            tied = [False, *tied[1:]]
            row.update({"order": order, "tied": tied})
            if edited and edited.strip() and edited.strip() != self.answers[i][order[0]].strip():
                row["edited"] = edited.strip()
        elif action != "skip":
            raise ValueError(f"'action' must be rank or skip, got {action!r}")
        with self.lock:
            if i in self.decisions:
                raise ValueError(f"item {i} is decided already")
            self.decisions[i] = row
            _append(self.labels_path, row)
            for path, records in ((self.output, self._ranked(row)), (self.pairs_path, self._pairs(row))):
                for r in records:
                    _append(path, r)

    def _prompt_field(self, i: int) -> Any:
        p = self.prompts[i]
        return p[0]["content"] if len(p) == 1 and p[0]["role"] == "user" else p

    def _scored(self, row: dict[str, Any]) -> list[tuple[str, float]]:
        """(answer text, score) for a ranked decision, the edited best answer first when there is one."""
        answers = self.answers[row["index"]]
        scores = scores_from(row["order"], row["tied"])
        out = [(answers[j], scores[j]) for j in range(len(answers))]
        if row.get("edited"):
            out.insert(0, (row["edited"], max(scores.values()) + 1.0))
        return out

    def _ranked(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        if row["action"] != "rank":
            return []
        scored = self._scored(row)
        if len({s for _, s in scored}) < 2:
            return []   # everything tied: no preference to learn from
        letters = list(string.ascii_uppercase[: len(self.answers[row["index"]])])
        order = order_text(row["order"], row["tied"], letters)
        if row.get("edited"):
            order = "edited>" + order
        return [{"prompt": self._prompt_field(row["index"]), "responses": [t for t, _ in scored],
                 "scores": [s for _, s in scored], "order": order, "labelled_by": "chatsmith label",
                 "model": self.settings.model}]

    def _pairs(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        if row["action"] != "rank":
            return []
        scored = self._scored(row)
        return [{"prompt": self._prompt_field(row["index"]), "chosen": a, "rejected": b}
                for a, sa in scored for b, sb in scored if sa > sb]

    def _rewrite_outputs(self) -> None:
        rows = [self.decisions[i] for i in sorted(self.decisions, key=lambda i: self.decisions[i]["time"])
                if self.decisions[i]["action"] != "rank" or self.decisions[i]["index"] in self.answers]
        for path, make in ((self.output, self._ranked), (self.pairs_path, self._pairs)):
            with path.open("w", encoding="utf-8") as f:
                for row in rows:
                    for r in make(row):
                        f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue   # a torn last line
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()


# ---- sampling --------------------------------------------------------------------------------------

def sample_answers(store: LabelStore, engine_factory: Callable[[], Any],
                   progress: Callable[[str], None] = print) -> None:
    """Sample K distinct answers for every item that needs them, `batch_prompts` prompts at a time,
    through the engine, seeded by the item and the attempt (a duplicate answer is sampled again,
    twice at most); an item with fewer than two distinct answers is skipped and says so."""
    from chatsmith.data.conversation import Message
    from chatsmith.eval.answers import answer_conversations

    s = store.settings
    todo = store.missing_answers()
    if not todo:
        return
    try:
        engine = engine_factory()
        for start in range(0, len(todo), s.batch_prompts):
            batch = todo[start:start + s.batch_prompts]
            found: dict[int, list[str]] = {i: [] for i in batch}
            for attempt in range(3):
                want = [(i, k) for i in batch for k in range(s.k - len(found[i]))]
                if not want:
                    break
                convs = [[Message(m["role"], m["content"]) for m in store.prompts[i]] for i, _ in want]
                # Conversation j samples with seed + j: a function of the batch, the attempt and the seed.
                comps = answer_conversations(engine, convs, template=s.template, max_new_tokens=s.max_new_tokens,
                                             temperature=s.temperature,
                                             seed=s.seed + batch[0] * s.k + attempt * 1_000_003)
                for (i, _), comp in zip(want, comps):
                    text = comp.text.strip()
                    if text and text not in found[i]:
                        found[i].append(text)
            for i in batch:
                store.put_answers(i, found[i])
                if len(found[i]) < 2:
                    progress(f"label: prompt {i + 1} got fewer than two distinct answers; it is skipped")
                    store.skip_unusable(i)
            progress(f"label: answers sampled for {len(store.answers)}/{len(store.prompts)} prompts")
    except Exception as e:  # shown on the page; the decisions made so far are saved
        store.sampling_error = f"{type(e).__name__}: {e}"
        progress(f"label: sampling failed: {store.sampling_error}")


# ---- the HTTP server -------------------------------------------------------------------------------

class LabelServer:
    """The page and its JSON API on a local port: `with LabelServer(store) as url:` (tests) or
    `serve_forever()`."""

    def __init__(self, store: LabelStore, host: str = "127.0.0.1", port: int = 0) -> None:
        self.store = store
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread: threading.Thread | None = None

    def __enter__(self) -> str:
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="chatsmith-label")
        self.thread.start()
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        store = self.store

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, data: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def _json(self, status: int, obj: Any) -> None:
                self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json")

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/api/item":
                    self._json(200, {**store.next_item(), "model": store.settings.model})
                    return
                if path == "/favicon.ico":
                    self._send(204, b"", "image/x-icon")
                    return
                name = "label.html" if path == "/" else path.removeprefix("/static/")
                f = STATIC / name
                if "/" in name or not f.is_file() or f.suffix not in _TYPES:
                    self._json(404, {"error": f"not found: {path}"})
                    return
                self._send(200, f.read_bytes(), _TYPES[f.suffix])

            def do_POST(self) -> None:
                if self.path != "/api/label":
                    self._json(404, {"error": f"not found: {self.path}"})
                    return
                try:
                    payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                    if not isinstance(payload, dict):
                        raise ValueError("expected a JSON object")
                    store.decide(payload)
                except (ValueError, json.JSONDecodeError) as e:
                    self._json(400, {"error": str(e)})
                    return
                self._json(200, {**store.next_item(), "model": store.settings.model})

        return Handler


def start_sampling(store: LabelStore, progress: Callable[[str], None] = print) -> threading.Thread:
    """Sample the missing answers in a background thread through the engine of store.settings.model."""
    from chatsmith.eval.answers import load_engine

    s = store.settings
    thread = threading.Thread(target=sample_answers, daemon=True, name="chatsmith-label-sampling",
                              args=(store, lambda: load_engine(s.model, s.precision, max_batch_size=16), progress))
    thread.start()
    return thread


def run_label(prompts_spec: str, output: str, settings: LabelSettings, host: str = "127.0.0.1", port: int = 8010,
              limit: int | None = None, open_browser: bool = False) -> int:
    """`chatsmith label`: sample (in the background), serve the page until Ctrl-C."""
    from chatsmith.eval.rm_compare import read_compare_prompts

    settings.validate()
    store = LabelStore(read_compare_prompts(prompts_spec, limit), output, settings)
    p = store.progress()
    server = LabelServer(store, host, port)
    print(f"label: {p['total']} prompts, {p['ranked']} ranked and {p['skipped']} skipped already; "
          f"{len(store.missing_answers())} to sample with {settings.model} (K={settings.k})")
    print(f"label: open {server.url}/  (keys: 1-{settings.k} rank, = tie, e edit, s skip, Enter save); "
          f"saving to {output}, {store.pairs_path.name}")
    start_sampling(store)
    if open_browser:
        import webbrowser

        webbrowser.open(server.url + "/")
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    p = store.progress()
    print(f"label: {p['ranked']} ranked, {p['skipped']} skipped of {p['total']}; rankings in {output}")
    return 0
