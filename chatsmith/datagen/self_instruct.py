"""Self-instruct as Alpaca ran it (`chatsmith data self-instruct`).

Wang et al. 2023, "Self-Instruct" (section 2.2), with Alpaca's settings (Taori et al. 2023,
`generate_instruction.py`): each request shows the teacher a few seed tasks and a few tasks it has
already made, as a numbered list, and asks it to go on; the new instructions are filtered (too
short or too long, blacklisted words such as image/graph/file/map/draw, "Write a program", a
punctuation or non-English first character, and ROUGE-L F1 > 0.7 against every instruction in the
pool: seeds and accepted ones); then the teacher writes an input (or none) and an output for each
kept instruction, as a JSON object. Every record is an Alpaca record with its provenance.

Work proceeds in rounds: up to `concurrency` instruction requests at once, their answers filtered
in request order, then the instance requests for as many kept instructions as are still needed.
Every choice (which examples a prompt shows) is a function of the seed and of answers already
received, so a run resumed from its journal asks exactly the same requests, replays those it has,
and pays only for the rest. An answer that cannot be used (an empty list, a refusal, invalid JSON)
is counted as a rejection and asked again, at most `parse_retries` times.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chatsmith.datagen.parsing import Unusable, is_refusal, json_object, numbered_items
from chatsmith.datagen.rouge import RougePool
from chatsmith.datagen.seeds import SeedTask, read_seeds
from chatsmith.datagen.teacher import Journal, Teacher, TeacherSettings, usage_line
from chatsmith.errors import ChatsmithError

# Alpaca's list (generate_instruction.py): tasks a text-only model cannot do.
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
             "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")

INSTRUCTION_PROMPT = """You are asked to come up with a set of {k} diverse task instructions. These task instructions will be given to a language model and we will evaluate the model for completing the instructions.

Here are the requirements:
1. Try not to repeat the verb for each instruction to maximize diversity.
2. The language used for the instruction also should be diverse. For example, you should combine questions with imperative instructions.
3. The type of instructions should be diverse. The list should include diverse types of tasks like open-ended generation, classification, editing, etc.
4. A language model should be able to complete the instruction. For example, do not ask the assistant to create any visual or audio output. For another example, do not ask the assistant to wake you up at 5pm or set a reminder because it cannot perform any action.
5. The instructions should be in English.
6. The instructions should be 1 to 2 sentences long. Either an imperative sentence or a question is permitted.

Continue the numbered list with new tasks only, one per line.

List of {k} tasks:
"""

INSTANCE_PROMPT = """Write an input and an output for the task below, as one JSON object {{"input": "...", "output": "..."}}.
The input is a specific, realistic example for the task (at most 100 words), or "" when the task needs no input. The output is a good response to the task and the input (at most 100 words). Answer with the JSON object only.

{examples}Task: {instruction}
"""


@dataclass
class SelfInstructSettings:
    """What a self-instruct run makes and how it filters."""

    n: int = 100                      # Alpaca records to write
    seed: int = 0
    seed_tasks_in_prompt: int = 3     # Alpaca: 3; self-instruct: 6 human-written + 2 machine-made
    machine_tasks_in_prompt: int = 2
    tasks_per_request: int = 20       # "List of 20 tasks"
    rouge_threshold: float = 0.7      # reject when ROUGE-L F1 with any pool instruction is above this
    min_words: int = 4                # Alpaca drops instructions of <= 3 words ...
    max_words: int = 150              # ... and of > 150
    english_only: bool = True         # drop instructions whose first character is not ASCII (Alpaca)
    temperature: float = 1.0          # Alpaca: 1.0 for instructions
    instance_temperature: float = 0.7
    max_tokens: int = 1024            # per instruction request
    instance_max_tokens: int = 512
    parse_retries: int = 2            # an unusable answer is asked again this many times
    patience: int = 5                 # stop after this many rounds in a row that keep no instruction
    examples_in_instance_prompt: int = 2

    def validate(self) -> None:
        if self.n < 1:
            raise ChatsmithError(f"--n must be at least 1, got {self.n}")
        if not 0 < self.rouge_threshold <= 1:
            raise ChatsmithError(f"--rouge-threshold must be in (0, 1], got {self.rouge_threshold}")
        if self.seed_tasks_in_prompt < 1:
            raise ChatsmithError("--seed-tasks-in-prompt must be at least 1")


@dataclass
class Candidate:
    """A parsed instruction with where it came from."""

    instruction: str
    prompt_id: str
    round: int


@dataclass
class Tally:
    """What happened to the teacher's answers: kept instructions and rejections by reason."""

    proposed: int = 0
    kept: int = 0
    written: int = 0
    rejected: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"proposed": self.proposed, "kept": self.kept, "written": self.written,
                "rejected": dict(sorted(self.rejected.items()))}


def instruction_filter(text: str, settings: SelfInstructSettings) -> str | None:
    """The reason an instruction is dropped before the ROUGE-L check, or None to keep it (Alpaca's
    post_process_gpt3_response)."""
    words = text.split()
    if len(words) < settings.min_words:
        return "too_short"
    if len(words) > settings.max_words:
        return "too_long"
    low = text.lower()
    if any(re.search(rf"\b{re.escape(w)}\b", low) for w in BLACKLIST):
        return "blacklisted_word"
    if text.startswith("Write a program"):
        return "write_a_program"
    if text[0] in string.punctuation:
        return "starts_with_punctuation"
    if settings.english_only and not text[0].isascii():
        return "not_english"
    if not any(c.isalpha() for c in text):
        return "not_text"
    return None


def instruction_prompt(seeds: list[str], machine: list[str], k: int) -> tuple[str, int]:
    """The instruction request (Alpaca's prompt, instructions only) and the number the teacher's
    first new item should have."""
    prompt = INSTRUCTION_PROMPT.format(k=k)
    shown = seeds + machine
    for i, text in enumerate(shown, start=1):
        one_line = re.sub(r"\s+", " ", text).strip().rstrip(":")
        prompt += f"{i}. {one_line}\n"
    prompt += f"{len(shown) + 1}."
    return prompt, len(shown) + 1


def instance_prompt(instruction: str, examples: list[SeedTask]) -> str:
    """The request for one instruction's input and output, with seed examples."""
    shots = ""
    for ex in examples:
        inst = ex.instances[0]
        example = json.dumps({"input": inst["input"], "output": inst["output"]}, ensure_ascii=False)
        shots += f"Task: {ex.instruction}\n{example}\n\n"
    return INSTANCE_PROMPT.format(examples=shots, instruction=instruction)


def parse_instance(text: str) -> tuple[str, str]:
    """(input, output) from the teacher's JSON answer; Unusable when it has no usable output."""
    obj = json_object(text)
    out, inp = obj.get("output"), obj.get("input", "")
    if not isinstance(out, str) or not out.strip():
        raise Unusable("empty_output", text.strip()[:80])
    if not isinstance(inp, str):
        inp = json.dumps(inp, ensure_ascii=False) if inp is not None else ""
    if is_refusal(out):
        raise Unusable("refusal", out.strip()[:80])
    inp = inp.strip()
    if inp.lower() in ("<noinput>", "none", "n/a", "no input", "null"):
        inp = ""
    return inp, out.strip()


class SelfInstruct:
    """One self-instruct run; `run()` writes the records and returns the summary."""

    def __init__(self, seeds: list[SeedTask], teacher: Teacher, settings: SelfInstructSettings, output: str,
                 progress: Callable[[str], None] = print) -> None:
        settings.validate()
        self.seeds = seeds
        self.with_instances = [s for s in seeds if s.instances and s.instances[0]["output"]]
        self.teacher = teacher
        self.settings = settings
        self.output = Path(output)
        self.progress = progress
        self.pool = RougePool(settings.rouge_threshold, (s.instruction for s in seeds))
        self.machine: list[str] = []
        self.tally = Tally()

    # -- one instruction request, with retries on unusable answers --------------------------------

    def _ask_instructions(self, round_: int, slot: int) -> tuple[str, list[str], list[str]]:
        s = self.settings
        rng = random.Random(f"{s.seed}/{round_}/{slot}")
        seeds = [t.instruction for t in rng.sample(self.seeds, min(s.seed_tasks_in_prompt, len(self.seeds)))]
        machine = rng.sample(self.machine, min(s.machine_tasks_in_prompt, len(self.machine)))
        prompt, first = instruction_prompt(seeds, machine, s.tasks_per_request)
        reasons = []
        for attempt in range(1 + s.parse_retries):
            ans = self.teacher.complete(prompt, temperature=s.temperature, max_tokens=s.max_tokens,
                                        attempt=attempt, tag=f"instructions r{round_} s{slot}")
            try:
                items = numbered_items(ans.text, first, truncated=ans.finish_reason == "length")
                return ans.key, [i for i in items if i not in seeds and i not in machine], reasons
            except Unusable as e:
                reasons.append(e.reason)
        return "", [], reasons

    def _ask_instance(self, cand: Candidate) -> tuple[Candidate, str, tuple[str, str] | None, list[str]]:
        s = self.settings
        rng = random.Random(f"{s.seed}/instance/{cand.instruction}")
        examples = rng.sample(self.with_instances, min(s.examples_in_instance_prompt, len(self.with_instances)))
        prompt = instance_prompt(cand.instruction, examples)
        reasons = []
        for attempt in range(1 + s.parse_retries):
            ans = self.teacher.complete(prompt, temperature=s.instance_temperature, max_tokens=s.instance_max_tokens,
                                        attempt=attempt, tag="instance")
            try:
                return cand, ans.key, parse_instance(ans.text), reasons
            except Unusable as e:
                reasons.append(e.reason)
        return cand, "", None, reasons

    # -- the run -----------------------------------------------------------------------------------

    def _instruction_round(self, round_: int, requests: int, pool: ThreadPoolExecutor) -> list[Candidate]:
        answers = list(pool.map(lambda j: self._ask_instructions(round_, j), range(requests)))
        kept = []
        for key, items, reasons in answers:       # filtered in request order: the same on every replay
            self.tally.rejected.update(f"answer_{r}" for r in reasons)
            for text in items:
                self.tally.proposed += 1
                text = re.sub(r"\s+", " ", text).strip()
                reason = instruction_filter(text, self.settings) if text else "empty"
                if reason is None and self.pool.too_similar(text):
                    reason = "rouge_l"
                if reason:
                    self.tally.rejected[reason] += 1
                    continue
                self.pool.add(text)
                self.machine.append(text)
                self.tally.kept += 1
                kept.append(Candidate(text, key, round_))
        return kept

    def run(self) -> dict[str, Any]:
        s = self.settings
        t = self.teacher.settings
        self.output.parent.mkdir(parents=True, exist_ok=True)
        queue: list[Candidate] = []
        round_ = barren = no_instances = 0
        stopped = None
        with self.output.open("w", encoding="utf-8") as out, \
                ThreadPoolExecutor(max_workers=t.concurrency) as pool:
            while self.tally.written < s.n:
                need = s.n - self.tally.written
                if len(queue) < need:
                    requests = max(1, min(t.concurrency, -(-(need - len(queue)) // s.tasks_per_request)))
                    kept = self._instruction_round(round_, requests, pool)
                    round_ += 1
                    queue += kept
                    barren = 0 if kept else barren + 1
                    if barren >= s.patience:
                        stopped = (f"{barren} rounds in a row kept no instruction; see the rejections (is the teacher "
                                   "answering with a numbered list?)")
                        break
                    if not queue:
                        continue
                batch, queue = queue[:need], queue[need:]
                written_before = self.tally.written
                for cand, key, inst, reasons in pool.map(self._ask_instance, batch):
                    self.tally.rejected.update(f"instance_{r}" for r in reasons)
                    if inst is None:
                        self.tally.rejected["instance_unusable"] += 1
                        continue
                    record = {"instruction": cand.instruction, "input": inst[0], "output": inst[1],
                              "provenance": {"method": "self-instruct", "teacher": t.model, "teacher_url": t.url,
                                             "prompt_id": cand.prompt_id, "instance_prompt_id": key,
                                             "round": cand.round}}
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    out.flush()
                    self.tally.written += 1
                no_instances = 0 if self.tally.written > written_before else no_instances + 1
                if no_instances >= s.patience:
                    stopped = (f"{no_instances} batches in a row got no usable input/output; see the rejections (is "
                               "the teacher answering with a JSON object?)")
                    break
                self.progress(f"round {round_}: {self.tally.written}/{s.n} records, pool {len(self.pool)}, "
                              f"{self.teacher.usage.requests} paid + {self.teacher.usage.replayed} replayed requests")
        summary = {"kind": "self-instruct", "output": str(self.output), "n": s.n, "rounds": round_,
                   **self.tally.as_dict(), "pool": len(self.pool), "stopped": stopped,
                   "usage": self.teacher.usage.as_dict(t), "settings": asdict(s),
                   "teacher": {"url": t.url, "model": t.model, "api": t.api}}
        return summary


def summary_path(output: str) -> Path:
    """Where a generation run writes its summary: OUTPUT's name with .summary.json."""
    p = Path(output)
    return p.with_name(p.name.rsplit(".", 1)[0] + ".summary.json")


def journal_path(output: str, journal: str | None) -> str:
    """The journal file: `journal`, else OUTPUT's name with .journal.jsonl."""
    if journal:
        return journal
    p = Path(output)
    return str(p.with_name(p.name.rsplit(".", 1)[0] + ".journal.jsonl"))


def run_self_instruct(seeds_path: str, output: str, teacher_settings: TeacherSettings,
                      settings: SelfInstructSettings, journal: str | None = None,
                      progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Read the seeds, check the teacher, generate, write OUTPUT (JSONL) and its summary; returns the summary."""
    if not output.endswith(".jsonl"):
        raise ChatsmithError(f"--output {output}: self-instruct writes JSON lines, name it .jsonl")
    seeds = read_seeds(seeds_path)
    teacher = Teacher(teacher_settings, Journal(journal_path(output, journal)))
    teacher.check_reachable()
    progress(f"self-instruct: {len(seeds)} seed tasks from {seeds_path}, {settings.n} records wanted, teacher "
             f"{teacher_settings.model} at {teacher_settings.url} ({teacher_settings.concurrency} at a time); "
             f"journal {teacher.journal.path} ({len(teacher.journal)} answers)")
    summary = SelfInstruct(seeds, teacher, settings, output, progress).run()
    summary_path(output).write_text(json.dumps(summary, indent=2) + "\n")
    progress(usage_line(teacher.usage, teacher_settings))
    return summary
