"""Built-in demo data for `chatsmith quickstart`, `chatsmith rm` and `chatsmith dpo`: identity
conversations made from templates, hand-written general Q&A, and held-out questions. The words live
in the packaged file data/demo/identity.json; no network; deterministic for a seed.

The identity set teaches a new name and maker; the held-out questions are paraphrases whose
wording never appears in training, so passing them shows the identity generalised rather than
being memorised (the checks are in eval/identity.py). The general set is mixed in so the model
keeps answering other questions.
"""

from __future__ import annotations

import json
import random
import re
from functools import cache
from importlib import resources
from typing import Any

from chatsmith.data.conversation import Conversation, Message
from chatsmith.errors import ConfigError

DEFAULT_NAME = "Smithy"
DEFAULT_MAKER = "the chatsmith project"


@cache
def demo_words() -> dict[str, Any]:
    """The packaged identity/general demo texts (data/demo/identity.json), read once."""
    return json.loads(resources.files("chatsmith.data").joinpath("demo/identity.json").read_text(encoding="utf-8"))


def normalise_question(text: str) -> str:
    """Lower-case `text`, drop punctuation and collapse spaces: "What's up?" -> "whats up"."""
    text = re.sub(r"[^\w\s]", "", text.lower())
    return " ".join(text.split())


def clean_flag(value: str, flag: str) -> str:
    """`value` with its spaces collapsed, or a ConfigError naming the empty `flag`."""
    value = " ".join(value.split())
    if not value:
        raise ConfigError(f"{flag} is empty: pass a non-empty value, e.g. {flag} "
                          f"\"{DEFAULT_NAME if flag == '--name' else DEFAULT_MAKER}\"")
    return value


def _maker_forms(maker: str) -> tuple[str, str]:
    """(mid-sentence form, sentence-start form): "the X" stays lower-case mid-sentence."""
    if maker[:4].lower() == "the ":
        rest = maker[4:]
        return "the " + rest, "The " + rest
    return maker, maker


_GENERIC_MAKER_WORDS = {
    "the", "a", "an", "of", "for", "and", "at", "project", "team", "lab", "labs", "inc", "company",
    "corp", "corporation", "ltd", "llc", "group", "foundation", "institute", "organisation",
    "organization", "research", "ai", "co", "university",
}


def maker_keyword(maker: str) -> str:
    """The maker's distinctive word, used to check answers: "the chatsmith project" -> "chatsmith"."""
    maker = clean_flag(maker, "--maker")
    words = [w.strip(".,'\"()") for w in maker.split()]
    for word in words:
        if word and word.lower() not in _GENERIC_MAKER_WORDS:
            return word
    # Only generic words (e.g. "AI Labs"): match the whole phrase without a leading "the".
    return _maker_forms(maker)[0].removeprefix("the ")


def _fill(template: str, name: str, maker: str) -> str:
    mid, start = _maker_forms(maker)
    text = template.format(name=name, maker=mid, Maker=start)
    # A name or maker ending in "." (e.g. "Acme Inc.") must not give "Inc.." at a sentence end.
    return re.sub(r"(?<!\.)\.\.(?!\.)", ".", text)


def _vary(core: str, rng: random.Random) -> str:
    """One surface variant of a question core: opener, casing and end punctuation."""
    body, end = (core[:-1], core[-1]) if core[-1] in "?." else (core, "")
    if end == "?":
        end = rng.choice(["?", "?", "?", "", "??", " ?"])
    else:
        end = rng.choice([".", ".", "", "!"])
    prefix = rng.choice(demo_words()["prefixes"])
    if prefix.rstrip().endswith((",", ":")) and not body.startswith(("I ", "I'")):
        body = body[0].lower() + body[1:]
    text = prefix + body + end
    if rng.random() < 0.3:  # casual all-lower-case typing
        text = text.lower()
    return text



def identity_train_set(name: str = DEFAULT_NAME, maker: str = DEFAULT_MAKER, seed: int = 0,
                       n: int = 160) -> list[Conversation]:
    """`n` identity conversations that teach the assistant its `name` and `maker`.

    Question cores are used round-robin (every core before any repeats) with random surface
    variants; about 20% carry a neutral system prompt, 15% start with a general exchange and 5%
    follow the identity exchange with a general one, so the model keeps its assistant voice.
    """
    name, maker = clean_flag(name, "--name"), clean_flag(maker, "--maker")
    if n < 1:
        raise ConfigError(f"identity conversation count n={n}: pass n >= 1")
    rng = random.Random(seed)
    cores = [(cat, q) for cat, qs in demo_words()["identity_cores"].items() for q in qs]
    out: list[Conversation] = []
    order: list[tuple[str, str]] = []
    for i in range(n):
        if not order:
            order = cores[:]
            rng.shuffle(order)
        category, core = order.pop()
        question = _vary(core, rng)
        answer = _fill(rng.choice(demo_words()["identity_answers"][category]), name, maker)
        identity = [Message("user", question), Message("assistant", answer)]
        roll = rng.random()
        if roll < 0.20:
            layout = "system"
            messages = [Message("system", rng.choice(demo_words()["system_prompts"])), *identity]
        elif roll < 0.35:
            layout = "general_first"
            q, a = rng.choice(demo_words()["general_qa"])
            messages = [Message("user", q), Message("assistant", a), *identity]
        elif roll < 0.40:
            layout = "identity_first"
            q, a = rng.choice(demo_words()["general_qa"])
            messages = [*identity, Message("user", q), Message("assistant", a)]
        else:
            layout = "single"
            messages = identity
        out.append(Conversation(messages, source=f"builtin identity #{i}",
                                meta={"kind": "identity", "category": category, "layout": layout}))
    return out


def identity_heldout_questions() -> list[str]:
    """Paraphrased identity questions (name and maker) whose wording never appears in training."""
    return [q for q, _ in demo_words()["heldout_identity"]]

def general_train_set(seed: int = 0) -> list[Conversation]:
    """Hand-written general conversations (facts, arithmetic, definitions, how-tos, two-turn
    exchanges, system prompts), shuffled deterministically by `seed`."""
    out: list[Conversation] = []
    for q, a in demo_words()["general_qa"]:
        out.append(Conversation([Message("user", q), Message("assistant", a)],
                                meta={"kind": "general", "layout": "single"}))
    for turns in demo_words()["general_multi_turn"]:
        messages = [m for q, a in turns for m in (Message("user", q), Message("assistant", a))]
        out.append(Conversation(messages, meta={"kind": "general", "layout": "multi_turn"}))
    for system, q, a in demo_words()["general_with_system"]:
        out.append(Conversation([Message("system", system), Message("user", q), Message("assistant", a)],
                                meta={"kind": "general", "layout": "system"}))
    for i, conv in enumerate(out):
        conv.source = f"builtin general #{i}"
    random.Random(seed).shuffle(out)
    return out

def quickstart_data(name: str = DEFAULT_NAME, maker: str = DEFAULT_MAKER,
                    seed: int = 0) -> list[Conversation]:
    """Identity and general training conversations for `chatsmith quickstart`, shuffled by `seed`."""
    data = identity_train_set(name, maker, seed=seed) + general_train_set(seed)
    random.Random(seed).shuffle(data)
    return data


# ---------------------------------------------------------------------------------------------
# Preference demo set (for `chatsmith rm` and `chatsmith dpo`): the same question, an answer in the
# assistant's new voice (chosen) and a generic one as the base model would give (rejected); and
# general questions where the correct short answer is preferred over a wrong one (the answer to
# another question). Records are {prompt, chosen, rejected} dicts, the format users write.
# ---------------------------------------------------------------------------------------------
def preference_demo_records(name: str = DEFAULT_NAME, maker: str = DEFAULT_MAKER, seed: int = 0,
                            n: int = 240, general_fraction: float = 0.3) -> list[dict[str, str]]:
    """`n` preference pairs {prompt, chosen, rejected}: identity questions whose chosen answer names
    `name` and `maker` and whose rejected answer is a generic base-model reply, and (about
    `general_fraction` of them) general questions whose chosen answer is right and rejected wrong."""
    convs = identity_train_set(name, maker, seed=seed, n=n)
    rng = random.Random(seed + 1)
    out: list[dict[str, str]] = []
    for conv in convs:
        if rng.random() < general_fraction:
            qa = demo_words()["general_qa"]
            i = rng.randrange(len(qa))
            q, a = qa[i]
            j = (i + rng.randrange(1, len(qa))) % len(qa)
            out.append({"prompt": q, "chosen": a, "rejected": qa[j][1]})
            continue
        # The identity exchange: the user question right before the answer that names the assistant.
        k = max(i for i, m in enumerate(conv.messages) if m.role == "assistant" and name in m.content)
        out.append({"prompt": conv.messages[k - 1].content, "chosen": conv.messages[k].content,
                    "rejected": rng.choice(demo_words()["generic_identity_answers"])})
    return out


def preference_demo_prompts() -> list[str]:
    """Held-out questions (never in the demo pairs) for comparing models under a reward model."""
    return identity_heldout_questions() + [q for q, _ in demo_words()["heldout_general"]]
