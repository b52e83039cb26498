"""A deterministic fake teacher: an OpenAI-compatible HTTP server on 127.0.0.1 whose answers are a
function of the request alone, with the faults a real teacher has.

- Its first `rate_limit_first` requests get 429 (Retry-After: 0).
- Instruction requests ("List of N tasks") get a numbered list continuing the prompt's numbering,
  made from the prompt's digest, with one instruction of each kind the filters must drop: a
  blacklisted word, too short, a punctuation start, and a near copy of the first example shown.
- Instance requests ("Task: ...") get {"input", "output"} JSON.
- Self-chat requests get a user turn or an assistant turn; a user turn says [END] after 3 exchanges.
- Translation requests get the text in upper case (code blocks kept), quality requests a score.
- Unusable answers, on a request's first occurrence only: a refusal for one instruction request in
  three, invalid JSON for one instance request in four, an empty assistant turn for one in five.

It counts every request body it answered, so a test can compare two runs request for request.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

VERBS = ["Explain", "Describe", "Compare", "Summarize", "Classify", "Rewrite", "Suggest", "List", "Translate",
         "Evaluate", "Outline", "Estimate", "Recommend", "Identify", "Justify", "Argue", "Predict", "Define"]
TOPICS = ["volcanoes", "tax policy", "sourdough bread", "quantum tunnelling", "medieval castles", "jazz history",
          "urban gardening", "password managers", "chess openings", "coral reefs", "compound interest",
          "marathon training", "solar panels", "Roman roads", "honeybees", "the French revolution", "glaciers",
          "wine tasting", "bird migration", "supply chains", "origami", "black holes", "vaccines", "tea ceremonies"]
ANGLES = ["for a ten year old", "in three bullet points", "with one concrete example", "for a busy manager",
          "as a short dialogue", "in a formal tone", "using an analogy", "in under fifty words", "with pros and cons",
          "from a historian's point of view", "for a job interview", "as a haiku"]


def _digest(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


class FakeTeacher:
    """`with FakeTeacher() as url:` serves on a free port; `.answered` counts answered bodies."""

    def __init__(self, rate_limit_first: int = 1, delay: float = 0.0, model: str = "fake-teacher") -> None:
        self.rate_limit_first = rate_limit_first
        self.delay = delay
        self.model = model
        self.requests = 0
        self.answered: Counter = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- answers -----------------------------------------------------------------------------------

    def answer(self, body: dict[str, Any], occurrence: int) -> str:
        if "messages" in body:
            msgs = body["messages"]
            prompt = msgs[-1]["content"]
            system = msgs[0]["content"] if msgs[0]["role"] == "system" else ""
        else:
            msgs, prompt, system = [], body["prompt"], ""
        if "List of" in prompt and "tasks" in prompt:
            return self.instructions(prompt, occurrence)
        if "Task: " in prompt and "JSON object" in prompt:
            return self.instance(prompt, occurrence)
        if "play the human" in system.lower():
            return self.user_turn(msgs)
        if system.startswith("You are a helpful assistant") and msgs:
            if occurrence == 0 and _digest(json.dumps(msgs)) % 5 == 0:
                return ""
            return f"Here is my answer about '{msgs[-1]['content'][:40]}': it depends, but mostly yes."
        if prompt.startswith("Translate"):
            text = prompt.rsplit("<<<", 1)[1].rsplit(">>>", 1)[0]
            return re.sub(r"```.*?```|([^`]+)", lambda m: m.group(0) if m.group(1) is None else m.group(1).upper(),
                          text, flags=re.S)
        if prompt.startswith("Rate the quality"):
            return f"Score: [[{1 + _digest(prompt) % 10}]]"
        return "I do not know this kind of request."

    def instructions(self, prompt: str, occurrence: int) -> str:
        d = _digest(prompt)
        if occurrence == 0 and d % 3 == 0:
            return "I'm sorry, but I can't come up with tasks right now."
        first = int(re.search(r"(\d+)\.\s*$", prompt).group(1))
        shown = re.findall(r"^\d+\. (.*)$", prompt, flags=re.M)
        items = []
        for i in range(5):
            v = VERBS[(d >> (i * 3)) % len(VERBS)]
            t = TOPICS[(d >> (i * 5 + 1)) % len(TOPICS)]
            a = ANGLES[(d >> (i * 4 + 2)) % len(ANGLES)]
            items.append(f"{v} {t} {a}.")
        items.insert(2, "Draw an image of a cat sitting on a map.")   # blacklisted words
        items.insert(3, "Sing it.")                                 # too short
        items.insert(4, "...and then describe the weather in Paris today.")  # punctuation start
        if shown:
            items.append(shown[0].rstrip(".?!") + " please.")       # a near copy of an example
        # A completions endpoint continues after "N."; a chat model restarts the number.
        text = f" {items[0]}\n" + "".join(f"{first + k}. {it}\n" for k, it in enumerate(items[1:], start=1))
        return text

    def instance(self, prompt: str, occurrence: int) -> str:
        task = prompt.rsplit("Task: ", 1)[1].strip()
        d = _digest(task)
        if occurrence == 0 and d % 4 == 0:
            return "Sure! Input: something, output: something else"
        inp = "" if d % 2 else f"A sample input for: {task[:30]}"
        return json.dumps({"input": inp, "output": f"An answer to '{task}'."})

    def user_turn(self, msgs: list[dict[str, str]]) -> str:
        # Roles are flipped for the simulated human: its own earlier turns are 'assistant'.
        exchanges = sum(m["role"] == "assistant" for m in msgs)
        if exchanges >= 3:
            return "[END]"
        topic = msgs[2]["content"][:30]
        follow = ["why does that happen with", "can you give me one concrete everyday example of",
                  "what would an expert recommend reading next about"][exchanges - 1]
        return f"Follow-up {exchanges}: {follow} '{topic}'?"

    # -- HTTP --------------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, obj: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": teacher.model, "object": "model",
                                                                 "created": 0, "owned_by": "test"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with teacher.lock:
                    teacher.requests += 1
                    limited = teacher.requests <= teacher.rate_limit_first
                    teacher.in_flight += 1
                    teacher.max_in_flight = max(teacher.max_in_flight, teacher.in_flight)
                try:
                    if teacher.delay:
                        time.sleep(teacher.delay)
                    if limited:
                        self._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                                   {"Retry-After": "0"})
                        return
                    if "TOO LONG" in json.dumps(body):
                        self._send(400, {"error": {"message": "prompt longer than the context", "type": "invalid"}})
                        return
                    key = json.dumps(body, sort_keys=True)
                    with teacher.lock:
                        occurrence = teacher.answered[key]
                        teacher.answered[key] += 1
                    text = teacher.answer(body, occurrence)
                    usage = {"prompt_tokens": len(json.dumps(body)) // 4, "completion_tokens": len(text) // 4,
                             "total_tokens": 0}
                    if self.path.endswith("/chat/completions"):
                        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop"}
                        obj = "chat.completion"
                    else:
                        choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
                        obj = "text_completion"
                    self._send(200, {"id": "x", "object": obj, "created": 0, "model": teacher.model,
                                     "choices": [choice], "usage": usage})
                finally:
                    with teacher.lock:
                        teacher.in_flight -= 1

        return Handler
