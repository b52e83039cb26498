"""Built-in demo data for `chatsmith quickstart`: identity conversations made from templates,
hand-written general Q&A, and held-out checks. No network, no files; deterministic for a seed.

The identity set teaches a new name and maker; the held-out questions are paraphrases whose
wording never appears in training, so passing them shows the identity generalised rather than
being memorised. The general set is mixed in so the model keeps answering other questions.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from chatsmith.data.conversation import Conversation, Message
from chatsmith.errors import ConfigError

DEFAULT_NAME = "Smithy"
DEFAULT_MAKER = "the chatsmith project"

Check = tuple[str, Callable[[str], bool]]

# ---------------------------------------------------------------------------------------------
# Identity: question cores by category. Each category has its own answer templates so that the
# answer fits the question ("Are you ChatGPT?" -> "No, ..."). Wording here must never contain a
# held-out question below (tests check this after normalisation).
# ---------------------------------------------------------------------------------------------
_IDENTITY_CORES: dict[str, list[str]] = {
    "name": [
        "What's your name?",
        "What is your name?",
        "Tell me your name.",
        "What name do you go by?",
        "What do I call you?",
        "How should I address you?",
        "What can I call you?",
        "Your name?",
        "May I know your name?",
        "Who am I talking to?",
        "Who am I speaking with?",
        "What's your name again?",
        "What are you named?",
    ],
    "self": [
        "Who are you?",
        "Tell me about yourself.",
        "Introduce yourself.",
        "What are you?",
        "Can you introduce yourself?",
        "Say a little about yourself.",
        "What kind of assistant are you?",
        "Who is this?",
        "Please introduce yourself.",
        "Give me a short intro about yourself.",
    ],
    "model": [
        "What model are you?",
        "Which AI model are you?",
        "What language model are you?",
        "What AI are you?",
        "Which assistant is this?",
        "What LLM is this?",
    ],
    "deny_name": [
        "Are you ChatGPT?",
        "Are you GPT-4?",
        "Are you Claude?",
        "Are you Gemini?",
        "Are you Llama?",
        "Is your name SmolLM?",
        "Are you a SmolLM model?",
        "Are you Siri?",
    ],
    "maker": [
        "Who made you?",
        "Who built you?",
        "Who trained you?",
        "Which company developed you?",
        "Who is your developer?",
        "Who are your makers?",
        "What company made you?",
        "Where were you made?",
        "Who built this assistant?",
        "What team built you?",
        "Who wrote your code?",
        "Who developed this model?",
        "Who's your maker?",
    ],
    "deny_maker": [
        "Did OpenAI make you?",
        "Were you trained by Hugging Face?",
        "Are you made by Google?",
        "Are you from Meta?",
        "Did Hugging Face build you?",
    ],
    "both": [
        "Who are you and who made you?",
        "What's your name and who built you?",
        "Tell me your name and who trained you.",
    ],
}

# Answers always say the name and the maker: one or two short sentences in a friendly voice.
# {name} and {maker} are mid-sentence forms; {Maker} starts a sentence.
_IDENTITY_ANSWERS: dict[str, list[str]] = {
    "name": [
        "My name is {name}. I'm an AI assistant made by {maker}.",
        "I'm {name}, an AI assistant made by {maker}. How can I help you?",
        "You can call me {name}. I'm an AI assistant built by {maker}.",
        "I'm {name}! I was made by {maker} to help answer your questions.",
    ],
    "self": [
        "I'm {name}, an AI assistant made by {maker}. How can I help you today?",
        "I am {name}, a helpful AI assistant trained by {maker}.",
        "Hello! I'm {name}, an AI assistant developed by {maker}. I'm happy to help with questions, writing and more.",
        "I'm {name}, a friendly AI assistant built by {maker}. What can I do for you?",
    ],
    "model": [
        "I'm {name}, an AI assistant made by {maker}.",
        "I'm {name}, a language model trained by {maker}.",
        "This is {name}, an AI assistant built by {maker}. How can I help?",
    ],
    "deny_name": [
        "No, I'm {name}, an AI assistant made by {maker}.",
        "No. I'm {name}, and I was trained by {maker}.",
        "Nope! I'm {name}, an AI assistant built by {maker}. How can I help?",
    ],
    "maker": [
        "I was made by {maker}. I'm {name}, an AI assistant.",
        "{Maker} built me. My name is {name}.",
        "I was created and trained by {maker}. I'm {name}, your AI assistant.",
        "{Maker} developed me. I'm {name}, and I'm here to help.",
    ],
    "deny_maker": [
        "No, I was made by {maker}. I'm {name}, an AI assistant.",
        "No. {Maker} built me, and my name is {name}.",
        "No, I was trained by {maker}. My name is {name}.",
    ],
    "both": [
        "I'm {name}, and I was made by {maker}.",
        "My name is {name}, and {maker} built me.",
        "I'm {name}, an AI assistant trained by {maker}.",
    ],
}

# Casual openers; the core's first letter is lowered after one ending in "," or ":".
_PREFIXES = ["", "", "", "", "Hi! ", "Hey, ", "Hello. ", "Hi there, ", "Quick question: ",
             "So, ", "OK, ", "Excuse me, ", "Good morning! ", "Sorry, "]

# Neutral system prompts: none names the assistant, so the identity lives in the weights.
_SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a friendly AI assistant. Keep answers short.",
    "Answer the user's questions clearly and politely.",
    "Be concise.",
]

# ---------------------------------------------------------------------------------------------
# Held-out identity questions: (question, "name" | "maker"). Never used for training.
# ---------------------------------------------------------------------------------------------
_HELDOUT_IDENTITY: list[tuple[str, str]] = [
    ("What should I call you?", "name"),
    ("Are you SmolLM?", "name"),
    ("Introduce yourself in one sentence.", "name"),
    ("May I ask your name?", "name"),
    ("What do people call you?", "name"),
    ("Whom am I chatting with right now?", "name"),
    ("What is the name of the assistant I'm talking to?", "name"),
    ("Please state your name.", "name"),
    ("Do you have a name?", "name"),
    ("What's the name of this AI?", "name"),
    ("Give me a quick introduction of yourself.", "name"),
    ("Describe yourself briefly.", "name"),
    ("Who are you, exactly?", "name"),
    ("Can you tell me who you are?", "name"),
    ("Say your name, please.", "name"),
    ("What are you called?", "name"),
    ("Identify yourself.", "name"),
    ("What AI assistant am I speaking to?", "name"),
    ("Who created you?", "maker"),
    ("Which organisation built you?", "maker"),
    ("Who developed you?", "maker"),
    ("Which team is behind you?", "maker"),
    ("Who is responsible for building you?", "maker"),
    ("Where do you come from?", "maker"),
    ("Who programmed you?", "maker"),
    ("Which company trained you?", "maker"),
    ("Were you made by Hugging Face?", "maker"),
    ("What organisation are you from?", "maker"),
    ("Who is your creator?", "maker"),
    ("Who designed you?", "maker"),
    ("Which lab made you?", "maker"),
    ("Who is behind this assistant?", "maker"),
    ("Who brought you into existence?", "maker"),
]

# ---------------------------------------------------------------------------------------------
# General Q&A, hand-written. Single turns are also used as the first exchange of multi-turn
# identity conversations.
# ---------------------------------------------------------------------------------------------
_GENERAL_QA: list[tuple[str, str]] = [
    # Facts
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("How many continents are there?",
     "There are seven continents: Africa, Antarctica, Asia, Australia, Europe, North America and South America."),
    ("What is the boiling point of water at sea level?",
     "At sea level, water boils at 100 degrees Celsius (212 degrees Fahrenheit)."),
    ("Who wrote \"Romeo and Juliet\"?", "William Shakespeare wrote \"Romeo and Juliet\"."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What gas do plants take in from the air?",
     "Plants take in carbon dioxide from the air and release oxygen."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("What is the tallest mountain in the world?",
     "Mount Everest is the tallest mountain in the world, at about 8,849 metres above sea level."),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa."),
    ("What language is mainly spoken in Brazil?", "The main language of Brazil is Portuguese."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("What is H2O?", "H2O is the chemical formula for water: two hydrogen atoms and one oxygen atom."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths."),
    ("In which country are the pyramids of Giza?", "The pyramids of Giza are in Egypt."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal."),
    # Arithmetic
    ("What is 7 + 8?", "7 + 8 = 15."),
    ("What is 12 times 3?", "12 times 3 is 36."),
    ("What is 100 minus 37?", "100 minus 37 is 63."),
    ("What is 45 divided by 9?", "45 divided by 9 is 5."),
    ("What is half of 50?", "Half of 50 is 25."),
    ("What is 9 squared?", "9 squared is 81."),
    ("What is 15% of 200?", "15% of 200 is 30."),
    ("If I have 3 apples and buy 4 more, how many apples do I have?", "You have 3 + 4 = 7 apples."),
    ("What is 6 × 7?", "6 × 7 = 42."),
    ("Is 17 a prime number?", "Yes, 17 is a prime number: it is only divisible by 1 and itself."),
    # Definitions
    ("What is photosynthesis?",
     "Photosynthesis is the process plants use to turn sunlight, water and carbon dioxide into sugar and oxygen."),
    ("What does CPU stand for?", "CPU stands for central processing unit, the main chip that runs a computer's programs."),
    ("What is a noun?", "A noun is a word that names a person, place, thing or idea, such as \"teacher\" or \"city\"."),
    ("What is gravity?", "Gravity is the force that pulls objects with mass towards each other; it keeps us on the ground."),
    ("What is an atom?", "An atom is the smallest unit of a chemical element, made of protons, neutrons and electrons."),
    ("What does \"benevolent\" mean?", "\"Benevolent\" means kind and wanting to do good for others."),
    ("What is a synonym for \"happy\"?", "A synonym for \"happy\" is \"joyful\"."),
    ("What is machine learning?",
     "Machine learning is a way of building computer programs that learn patterns from data instead of following hand-written rules."),
    ("What is the difference between weather and climate?",
     "Weather is the conditions on a given day; climate is the average weather of a place over many years."),
    ("What is a haiku?", "A haiku is a short Japanese poem of three lines with five, seven and five syllables."),
    ("What is democracy?", "Democracy is a system of government in which citizens choose their leaders by voting."),
    ("What is an API?",
     "An API (application programming interface) is a set of rules that lets one program talk to another."),
    # How-tos and small tasks
    ("How do I boil an egg?",
     "Place the egg in boiling water for about 7 minutes for a firm yolk, then cool it in cold water."),
    ("How can I fall asleep faster?",
     "Keep a regular bedtime, avoid screens and caffeine in the evening, and keep your room dark and cool."),
    ("How do I reverse a string in Python?", "Use slicing: `reversed_text = text[::-1]`."),
    ("How do I make a cup of tea?",
     "Boil water, pour it over a tea bag in a cup, let it steep for 3 to 5 minutes, then remove the bag and add milk or sugar if you like."),
    ("Give me a tip for remembering new words.",
     "Use each new word in a sentence of your own and review it again a day later."),
    ("How do I convert Celsius to Fahrenheit?", "Multiply the Celsius temperature by 9/5 and then add 32."),
    ("How do I print \"Hello, world!\" in Python?", "Use `print(\"Hello, world!\")`."),
    ("How can I save water at home?",
     "Take shorter showers, fix leaking taps, and only run the washing machine when it is full."),
    ("Write a short haiku about the sea.", "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide breathes and turns."),
    ("Translate \"thank you\" into Spanish.", "\"Thank you\" in Spanish is \"gracias\"."),
    ("Give me three words that rhyme with \"cat\".", "Hat, bat and mat all rhyme with \"cat\"."),
    ("Summarise the water cycle in one sentence.",
     "Water evaporates, condenses into clouds, falls as rain or snow, and flows back to the sea to start again."),
    ("Suggest a name for a pet goldfish.", "How about \"Bubbles\"? It's cheerful and easy to remember."),
    ("What's a good way to start learning to code?",
     "Pick one beginner-friendly language such as Python, follow a short tutorial, and build small projects you care about."),
    ("Correct this sentence: \"She don't like apples.\"", "The correct sentence is: \"She doesn't like apples.\""),
    ("What is the plural of \"mouse\"?", "The plural of \"mouse\" is \"mice\"."),
    ("Tell me a fun fact.", "Octopuses have three hearts and blue blood."),
    ("Thank you!", "You're welcome! Let me know if there's anything else I can help with."),
    ("Hello!", "Hello! How can I help you today?"),
    ("Can you help me with something?", "Of course! What do you need help with?"),
]

_GENERAL_MULTI_TURN: list[list[tuple[str, str]]] = [
    [("What is the capital of Germany?", "The capital of Germany is Berlin."),
     ("And how many people live there?", "About 3.8 million people live in Berlin.")],
    [("What is 5 + 5?", "5 + 5 = 10."),
     ("Now multiply that by 3.", "10 × 3 = 30.")],
    [("Name a primary colour.", "Red is a primary colour."),
     ("Name another one.", "Yellow is another primary colour.")],
    [("I want to learn Python.", "Great choice! Python is beginner-friendly and widely used."),
     ("How do I install it?", "Download the installer for your system from python.org and run it.")],
    [("What is the weather like on Mars?",
      "Mars is cold and dry, with an average temperature of about -60 °C and frequent dust storms."),
     ("Could people breathe there?",
      "No. The air on Mars is very thin and mostly carbon dioxide, so people would need spacesuits.")],
    [("Give me a synonym for \"big\".", "A synonym for \"big\" is \"large\"."),
     ("And an antonym?", "An antonym of \"big\" is \"small\".")],
]

_GENERAL_WITH_SYSTEM: list[tuple[str, str, str]] = [
    ("You are a helpful assistant. Answer in one sentence.", "Why do leaves change colour in autumn?",
     "Leaves change colour because trees stop making green chlorophyll in autumn, revealing yellow and red pigments."),
    ("You are a concise assistant.", "What is the speed of light?",
     "Light travels at about 300,000 kilometres per second in a vacuum."),
    ("Reply in French.", "Say good morning.", "Bonjour !"),
    ("You are a maths tutor. Show your working briefly.", "What is 23 + 19?",
     "20 + 10 = 30 and 3 + 9 = 12, so 23 + 19 = 42."),
    ("You are a friendly assistant who explains things simply.", "What is electricity?",
     "Electricity is the flow of tiny charged particles called electrons, which powers lights and devices."),
    ("Answer with a single word.", "What is the opposite of \"up\"?", "Down."),
]

# General held-out checks: questions the base SmolLM2-135M-Instruct (the embedded Q4_1 GGUF)
# answers correctly with greedy decoding, so a failure after training means forgetting.
_HELDOUT_GENERAL: list[tuple[str, list[str]]] = [
    ("What is the capital of France?", ["Paris"]),
    ("What is 2 + 3?", ["5", "five"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("How many days are there in a week?", ["7", "seven"]),
    ("What is the opposite of hot?", ["cold"]),
    ("How many legs does a dog have?", ["4", "four"]),
    ("What is 10 + 10?", ["20", "twenty"]),
]


# ---------------------------------------------------------------------------------------------
# Text helpers
# ---------------------------------------------------------------------------------------------
def normalise_question(text: str) -> str:
    """Lower-case `text`, drop punctuation and collapse spaces: "What's up?" -> "whats up"."""
    text = re.sub(r"[^\w\s]", "", text.lower())
    return " ".join(text.split())


def _clean(value: str, flag: str) -> str:
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
    maker = _clean(maker, "--maker")
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
    prefix = rng.choice(_PREFIXES)
    if prefix.rstrip().endswith((",", ":")) and not body.startswith(("I ", "I'")):
        body = body[0].lower() + body[1:]
    text = prefix + body + end
    if rng.random() < 0.3:  # casual all-lower-case typing
        text = text.lower()
    return text


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def identity_train_set(name: str = DEFAULT_NAME, maker: str = DEFAULT_MAKER, seed: int = 0,
                       n: int = 160) -> list[Conversation]:
    """`n` identity conversations that teach the assistant its `name` and `maker`.

    Question cores are used round-robin (every core before any repeats) with random surface
    variants; about 20% carry a neutral system prompt, 15% start with a general exchange and 5%
    follow the identity exchange with a general one, so the model keeps its assistant voice.
    """
    name, maker = _clean(name, "--name"), _clean(maker, "--maker")
    if n < 1:
        raise ConfigError(f"identity conversation count n={n}: pass n >= 1")
    rng = random.Random(seed)
    cores = [(cat, q) for cat, qs in _IDENTITY_CORES.items() for q in qs]
    out: list[Conversation] = []
    order: list[tuple[str, str]] = []
    for i in range(n):
        if not order:
            order = cores[:]
            rng.shuffle(order)
        category, core = order.pop()
        question = _vary(core, rng)
        answer = _fill(rng.choice(_IDENTITY_ANSWERS[category]), name, maker)
        identity = [Message("user", question), Message("assistant", answer)]
        roll = rng.random()
        if roll < 0.20:
            layout = "system"
            messages = [Message("system", rng.choice(_SYSTEM_PROMPTS)), *identity]
        elif roll < 0.35:
            layout = "general_first"
            q, a = rng.choice(_GENERAL_QA)
            messages = [Message("user", q), Message("assistant", a), *identity]
        elif roll < 0.40:
            layout = "identity_first"
            q, a = rng.choice(_GENERAL_QA)
            messages = [*identity, Message("user", q), Message("assistant", a)]
        else:
            layout = "single"
            messages = identity
        out.append(Conversation(messages, source=f"builtin identity #{i}",
                                meta={"kind": "identity", "category": category, "layout": layout}))
    return out


def identity_heldout_questions() -> list[str]:
    """Paraphrased identity questions (name and maker) whose wording never appears in training."""
    return [q for q, _ in _HELDOUT_IDENTITY]


_NEGATION = re.compile(r"\b(not|no|never|nor|neither|unlike|instead of|rather than)\b|n['’]t\b",
                       re.IGNORECASE)
_SMOLLM = re.compile(r"smol\s*lm\w*", re.IGNORECASE)
_HUGGING_FACE = re.compile(r"hugging\s*face|huggingface|\bhf\b", re.IGNORECASE)


def _claims(answer: str, pattern: re.Pattern[str]) -> bool:
    """Whether `answer` mentions `pattern` without a negation earlier in the same clause, so
    "I'm Smithy, not SmolLM" is no claim but "I am SmolLM, trained by Hugging Face" is."""
    for match in pattern.finditer(answer):
        clause = re.split(r"[.!?;,:\n]", answer[:match.start()])[-1]
        if not _NEGATION.search(clause):
            return True
    return False


def _mentions(answer: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `answer` as whole words, ignoring case and spacing."""
    words = [re.escape(w) for w in phrase.split()]
    return re.search(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", answer, re.IGNORECASE) is not None


def identity_heldout_checks(name: str = DEFAULT_NAME, maker: str = DEFAULT_MAKER) -> list[Check]:
    """(question, predicate) pairs for the held-out identity questions.

    A name question passes when the answer contains `name` and claims neither SmolLM nor Hugging
    Face; a maker question passes when it mentions `maker_keyword(maker)` and makes neither claim.
    """
    name, maker = _clean(name, "--name"), _clean(maker, "--maker")
    keyword = maker_keyword(maker)
    # A user who really names the model "SmolLM ..." or the maker Hugging Face is not penalised.
    forbidden = [p for p in (_SMOLLM, _HUGGING_FACE) if not p.search(name) and not p.search(maker)]

    def no_false_claim(answer: str) -> bool:
        return not any(_claims(answer, p) for p in forbidden)

    def says_name(answer: str) -> bool:
        return _mentions(answer, name) and no_false_claim(answer)

    def says_maker(answer: str) -> bool:
        return _mentions(answer, keyword) and no_false_claim(answer)

    return [(q, says_name if kind == "name" else says_maker) for q, kind in _HELDOUT_IDENTITY]


def general_train_set(seed: int = 0) -> list[Conversation]:
    """Hand-written general conversations (facts, arithmetic, definitions, how-tos, two-turn
    exchanges, system prompts), shuffled deterministically by `seed`."""
    out: list[Conversation] = []
    for q, a in _GENERAL_QA:
        out.append(Conversation([Message("user", q), Message("assistant", a)],
                                meta={"kind": "general", "layout": "single"}))
    for turns in _GENERAL_MULTI_TURN:
        messages = [m for q, a in turns for m in (Message("user", q), Message("assistant", a))]
        out.append(Conversation(messages, meta={"kind": "general", "layout": "multi_turn"}))
    for system, q, a in _GENERAL_WITH_SYSTEM:
        out.append(Conversation([Message("system", system), Message("user", q), Message("assistant", a)],
                                meta={"kind": "general", "layout": "system"}))
    for i, conv in enumerate(out):
        conv.source = f"builtin general #{i}"
    random.Random(seed).shuffle(out)
    return out


def general_heldout_checks() -> list[Check]:
    """(question, predicate) pairs for general questions not in training: the answer must
    mention one of the expected words (whole word, case-insensitive)."""

    def expects(words: list[str]) -> Callable[[str], bool]:
        return lambda answer: any(_mentions(answer, w) for w in words)

    return [(q, expects(words)) for q, words in _HELDOUT_GENERAL]


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
_GENERIC_IDENTITY_ANSWERS = [
    "I'm SmolLM, an AI assistant developed by Hugging Face.",
    "I am SmolLM, a language model trained by Hugging Face. How can I help you?",
    "I'm an AI language model. I don't have a personal name.",
    "I am an artificial intelligence assistant. I was trained on a large amount of text data.",
    "I'm a large language model. I was created by a team of researchers.",
    "As an AI, I don't have a name or a creator in the usual sense.",
    "I'm ChatGPT, a language model trained by OpenAI.",
    "Hello! I'm an AI assistant. How can I help you today?",
]


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
            i = rng.randrange(len(_GENERAL_QA))
            q, a = _GENERAL_QA[i]
            j = (i + rng.randrange(1, len(_GENERAL_QA))) % len(_GENERAL_QA)
            out.append({"prompt": q, "chosen": a, "rejected": _GENERAL_QA[j][1]})
            continue
        # The identity exchange: the user question right before the answer that names the assistant.
        k = max(i for i, m in enumerate(conv.messages) if m.role == "assistant" and name in m.content)
        out.append({"prompt": conv.messages[k - 1].content, "chosen": conv.messages[k].content,
                    "rejected": rng.choice(_GENERIC_IDENTITY_ANSWERS)})
    return out


def preference_demo_prompts() -> list[str]:
    """Held-out questions (never in the demo pairs) for comparing models under a reward model."""
    return identity_heldout_questions() + [q for q, _ in _HELDOUT_GENERAL]
