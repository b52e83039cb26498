"""Self-chat as Baize made its dialogues (`chatsmith data self-chat`).

Xu et al. 2023, "Baize" (section 2.1): one model plays both sides of a conversation that opens with
a seed question, and the simulated human ends it when it has nothing more to ask. Here each side is
its own request: the assistant answers the conversation so far; the human, with the roles flipped
and a system prompt that tells it to play the human, asks a follow-up or says [END]. A dialogue
stops at [END] (Baize's stop rule), when the human repeats an earlier question (ROUGE-L above
0.9), when an answer stays unusable after its retries, or at `turns` assistant answers.

Dialogues run `concurrency` at a time, each one's requests in sequence; every request is a
function of the seed and of earlier answers, so a run resumed from its journal replays what it has
and pays only for the rest. Output: ShareGPT records with provenance.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from chatsmith.datagen.parsing import is_refusal
from chatsmith.datagen.rouge import rouge_l
from chatsmith.datagen.seeds import SeedTask, read_seeds
from chatsmith.datagen.self_instruct import journal_path, summary_path
from chatsmith.datagen.teacher import Journal, Teacher, TeacherSettings, usage_line
from chatsmith.errors import ChatsmithError

END = "[END]"
ASSISTANT_SYSTEM = ("You are a helpful assistant. Answer the user's last message helpfully, accurately and "
                    "concisely. Do not ask the user questions.")
HUMAN_SYSTEM = ("Play the human in a conversation with an AI assistant. You asked the first question; the "
                "assistant's replies are given to you as the user's messages. Write the human's next message: "
                "a related follow-up question or request, one or two sentences, in the first person. Never "
                f"answer for the assistant. When you have no more questions, reply with {END} only.")
_PREFIX = re.compile(r"^\s*(\[\|(human|ai)\|\]|human:|user:|assistant:|ai:)\s*", re.I)


@dataclass
class SelfChatSettings:
    """What a self-chat run makes."""

    n: int | None = None        # dialogues (default: one per seed); seeds are reused in order beyond that
    turns: int = 4              # assistant answers per dialogue at most
    min_turns: int = 1          # dialogues with fewer complete exchanges are rejected
    temperature: float = 0.7
    max_tokens: int = 512
    parse_retries: int = 2
    repeat_threshold: float = 0.9
    seed: int = 0

    def validate(self) -> None:
        if self.turns < 1:
            raise ChatsmithError(f"--turns must be at least 1, got {self.turns}")
        if self.n is not None and self.n < 1:
            raise ChatsmithError(f"--n must be at least 1, got {self.n}")


def seed_question(seed: SeedTask) -> str:
    """The opening message: the seed's instruction, with its first instance's input when it has one."""
    inp = seed.instances[0]["input"] if seed.instances else ""
    return f"{seed.instruction}\n\n{inp}" if inp else seed.instruction


def _clean(text: str) -> str:
    return _PREFIX.sub("", text.strip()).strip()


class SelfChat:
    """One self-chat run; `run()` writes the dialogues and returns the summary."""

    def __init__(self, seeds: list[SeedTask], teacher: Teacher, settings: SelfChatSettings, output: str,
                 progress: Callable[[str], None] = print) -> None:
        settings.validate()
        self.seeds, self.teacher, self.settings = seeds, teacher, settings
        self.output = Path(output)
        self.progress = progress
        self.rejected: Counter = Counter()
        self.stops: Counter = Counter()

    def _ask(self, messages: list[dict[str, str]], index: int, tag: str, human: bool) -> tuple[str | None, str, list[str]]:
        """(usable text or None, journal key, reasons of unusable answers)."""
        s = self.settings
        reasons = []
        for attempt in range(1 + s.parse_retries):
            ans = self.teacher.complete(messages, temperature=s.temperature, max_tokens=s.max_tokens,
                                        seed=s.seed + index, attempt=attempt, tag=tag)
            text = _clean(ans.text)
            if human and END.lower() in text.lower():
                return END, ans.key, reasons
            if not text:
                reasons.append("empty")
            elif is_refusal(text):
                reasons.append("refusal")
            else:
                return text, ans.key, reasons
        return None, "", reasons

    def dialogue(self, index: int) -> tuple[dict[str, Any] | None, list[str], str]:
        """Dialogue `index` as a ShareGPT record (None when rejected), reasons of unusable answers, and
        why it stopped."""
        s = self.settings
        seed = self.seeds[index % len(self.seeds)]
        turns = [{"from": "human", "value": seed_question(seed)}]
        keys: list[str] = []
        reasons: list[str] = []
        stop = "turn_limit"
        while True:
            history = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]
            answer, key, why = self._ask([{"role": "system", "content": ASSISTANT_SYSTEM}, *history], index,
                                         f"assistant d{index}", human=False)
            reasons += [f"assistant_{r}" for r in why]
            if answer is None:
                turns.pop()   # the question stays unanswered: end at the last complete exchange
                stop = "assistant_unusable"
                break
            turns.append({"from": "gpt", "value": answer})
            keys.append(key)
            if len(turns) // 2 >= s.turns:
                break
            flipped = [{"role": "user", "content": "Begin the conversation."}] + [
                {"role": "assistant" if t["from"] == "human" else "user", "content": t["value"]} for t in turns]
            question, key, why = self._ask([{"role": "system", "content": HUMAN_SYSTEM}, *flipped], index,
                                           f"human d{index}", human=True)
            reasons += [f"human_{r}" for r in why]
            if question is None:
                stop = "human_unusable"
                break
            if question == END:
                keys.append(key)
                stop = "end"
                break
            if any(rouge_l(t["value"], question) > s.repeat_threshold for t in turns if t["from"] == "human"):
                stop = "repeat"
                break
            turns.append({"from": "human", "value": question})
            keys.append(key)
        if len(turns) // 2 < s.min_turns:
            return None, reasons, stop
        t = self.teacher.settings
        return ({"id": f"self-chat-{index}", "conversations": turns,
                 "provenance": {"method": "self-chat", "teacher": t.model, "teacher_url": t.url, "seed": seed.source,
                                "prompt_ids": keys, "stop": stop}}, reasons, stop)

    def run(self) -> dict[str, Any]:
        s = self.settings
        t = self.teacher.settings
        n = s.n or len(self.seeds)
        written = 0
        self.output.parent.mkdir(parents=True, exist_ok=True)
        chunk = max(1, 2 * t.concurrency)
        with self.output.open("w", encoding="utf-8") as out, ThreadPoolExecutor(max_workers=t.concurrency) as pool:
            for start in range(0, n, chunk):
                for record, reasons, stop in pool.map(self.dialogue, range(start, min(n, start + chunk))):
                    self.rejected.update(reasons)
                    self.stops[stop] += 1
                    if record is None:
                        self.rejected["dialogue_too_short"] += 1
                        continue
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    out.flush()
                    written += 1
                self.progress(f"self-chat: {min(n, start + chunk)}/{n} dialogues, {written} written, "
                              f"{self.teacher.usage.requests} paid + {self.teacher.usage.replayed} replayed requests")
        return {"kind": "self-chat", "output": str(self.output), "n": n, "written": written,
                "rejected": dict(sorted(self.rejected.items())), "stops": dict(sorted(self.stops.items())),
                "usage": self.teacher.usage.as_dict(t), "settings": asdict(s),
                "teacher": {"url": t.url, "model": t.model, "api": t.api}}


def run_self_chat(seeds_path: str, output: str, teacher_settings: TeacherSettings, settings: SelfChatSettings,
                  journal: str | None = None, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Read the seeds, check the teacher, make the dialogues, write OUTPUT (JSONL) and its summary."""
    if not output.endswith(".jsonl"):
        raise ChatsmithError(f"--output {output}: self-chat writes JSON lines, name it .jsonl")
    if teacher_settings.api != "chat":
        raise ChatsmithError("self-chat needs a chat endpoint (--teacher-api chat): both sides are chat turns")
    seeds = read_seeds(seeds_path)
    teacher = Teacher(teacher_settings, Journal(journal_path(output, journal)))
    teacher.check_reachable()
    progress(f"self-chat: {len(seeds)} seeds from {seeds_path}, up to {settings.turns} turns each, teacher "
             f"{teacher_settings.model} at {teacher_settings.url}; journal {teacher.journal.path} "
             f"({len(teacher.journal)} answers)")
    summary = SelfChat(seeds, teacher, settings, output, progress).run()
    summary_path(output).write_text(json.dumps(summary, indent=2) + "\n")
    progress(usage_line(teacher.usage, teacher_settings))
    return summary
