"""The built-in set that measures the semantic cache: paraphrase pairs (the second should get the
first's cached answer) and near-miss pairs (it must not): negations, changed numbers, changed names,
changed quoted strings, opposite words, and the same question under a different system prompt or
after different earlier turns. `evaluate()` fills one cache with every first prompt, asks every
second one, and counts hits and false hits; `last_message=True` is GPTCache's way (the last
message's embedding alone, no guard) for comparison. benchmarks/cache_hits.py prints the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# (question, a paraphrase, near misses as (kind, text))
BASES: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("How do I reset my password?", "What are the steps to reset my password?",
     [("negation", "Why can't I reset my password?")]),
    ("How do I enable the firewall on Ubuntu?", "What's the way to turn on the firewall in Ubuntu?",
     [("opposites", "How do I disable the firewall on Ubuntu?"), ("entities", "How do I enable the firewall on Fedora?")]),
    ("What is the capital of France?", "Which city is the capital of France?",
     [("entities", "What is the capital of Spain?"), ("entities", "What is the capital of Germany?")]),
    ("Book a table for 2 people at 7pm.", "Reserve a table for two people at 7pm.",
     [("numbers", "Book a table for 4 people at 7pm."), ("numbers", "Book a table for 2 people at 9pm.")]),
    ("How many calories are in a banana?", "How many calories does a banana have?",
     [("entities", "How many calories are in an avocado?"), ("numbers", "How many calories are in 3 bananas?")]),
    ("Convert 100 dollars to euros.", "Change 100 dollars into euros.",
     [("numbers", "Convert 250 dollars to euros."), ("entities", "Convert 100 dollars to yen.")]),
    ("What is the boiling point of water at sea level?", "At sea level, what temperature does water boil at?",
     [("opposites", "What is the freezing point of water at sea level?")]),
    ("Is it safe to eat raw eggs?", "Can I safely eat raw eggs?",
     [("negation", "Is it not safe to eat raw eggs?")]),
    ("How do I install numpy with pip?", "How can I install numpy using pip?",
     [("opposites", "How do I uninstall numpy with pip?"), ("entities", "How do I install pandas with pip?")]),
    ("Who wrote Pride and Prejudice?", "Who is the author of Pride and Prejudice?",
     [("entities", "Who wrote Sense and Sensibility?")]),
    ("What year did World War II end?", "In which year did World War II end?",
     [("opposites", "What year did World War II begin?"), ("numbers", "What year did World War I end?")]),
    ("How do I sort a list in Python?", "What's the way to sort a list in Python?",
     [("entities", "How do I sort a list in JavaScript?"), ("negation", "How do I not sort a list in Python?")]),
    ("Translate \"good morning\" into Spanish.", "How do you say \"good morning\" in Spanish?",
     [("quoted", "Translate \"good night\" into Spanish."), ("entities", "Translate \"good morning\" into Italian.")]),
    ("What's the weather like in London today?", "How is the weather in London today?",
     [("entities", "What's the weather like in Madrid today?")]),
    ("How long should I boil an egg for a soft yolk?", "For a soft yolk, how long do I boil an egg?",
     [("opposites", "How long should I boil an egg for a hard yolk?")]),
    ("How do I increase the font size in VS Code?", "How can I make the font bigger in VS Code?",
     [("opposites", "How do I decrease the font size in VS Code?"), ("entities", "How do I increase the font size in Vim?")]),
    ("What is 15% of 80?", "Calculate 15% of 80.",
     [("numbers", "What is 20% of 80?"), ("numbers", "What is 15% of 90?")]),
    ("Give me a recipe for chocolate chip cookies.", "Share a recipe for chocolate chip cookies.",
     [("negation", "Give me a recipe for cookies without chocolate chips.")]),
    ("Why is the sky blue?", "What makes the sky look blue?",
     [("negation", "Why isn't the sky blue at night?")]),
    ("How do I delete a branch in git?", "How can I remove a git branch?",
     [("opposites", "How do I create a branch in git?")]),
    ("What time zone is Tokyo in?", "Which time zone does Tokyo use?",
     [("entities", "What time zone is Sydney in?")]),
    ("How do I cancel my subscription?", "What is the way to cancel my subscription?",
     [("negation", "Why can't I cancel my subscription?")]),
    ("Summarize the plot of Hamlet in 3 sentences.", "Summarise Hamlet's plot in three sentences.",
     [("numbers", "Summarize the plot of Hamlet in 5 sentences."), ("entities", "Summarize the plot of Macbeth in 3 sentences.")]),
    ("How far is the Moon from Earth?", "What is the distance from Earth to the Moon?",
     [("entities", "How far is Mars from Earth?")]),
    ("Can dogs eat grapes?", "Is it okay for dogs to eat grapes?",
     [("entities", "Can cats eat grapes?")]),
    ("What is the population of Canada?", "How many people live in Canada?",
     [("entities", "What is the population of Mexico?")]),
    ("How do I open a file in Python?", "What's the way to open a file in Python?",
     [("opposites", "How do I close a file in Python?")]),
    ("Write a haiku about autumn.", "Compose a haiku about autumn.",
     [("opposites", "Write a haiku about spring."), ("negation", "Write a haiku that is not about autumn.")]),
    ("What's the best way to learn Spanish?", "How should I go about learning Spanish?",
     [("entities", "What's the best way to learn Japanese?"), ("opposites", "What's the worst way to learn Spanish?")]),
    ("How do I make my laptop battery last longer?", "How can I extend my laptop's battery life?",
     [("opposites", "Why does my laptop battery drain faster when charging?")]),
    ("Set a timer for 10 minutes.", "Start a 10 minute timer.",
     [("numbers", "Set a timer for 15 minutes.")]),
    ("What is the square root of 144?", "Calculate the square root of 144.",
     [("numbers", "What is the square root of 169?")]),
    ("How do I merge two dictionaries in Python?", "How can two Python dictionaries be merged?",
     [("numbers", "How do I merge three dictionaries in Python?")]),
    ("Recommend a good book about the Roman Empire.", "Suggest a good book on the Roman Empire.",
     [("entities", "Recommend a good book about the Ottoman Empire.")]),
    ("What are the symptoms of the flu?", "What symptoms does the flu cause?",
     [("entities", "What are the symptoms of COVID?"), ("negation", "What are not symptoms of the flu?")]),
    ("How do I center a div in CSS?", "What's the way to center a div with CSS?",
     [("negation", "Why won't my div center in CSS?")]),
    ("Explain how photosynthesis works.", "Describe how photosynthesis works.",
     [("negation", "Explain why photosynthesis does not work in the dark.")]),
    ("Is coffee bad for your heart?", "Does coffee harm your heart?",
     [("opposites", "Is coffee good for your heart?"), ("entities", "Is coffee bad for your liver?")]),
    ("How do I upload a file to Google Drive?", "How can I put a file on Google Drive?",
     [("opposites", "How do I download a file from Google Drive?"), ("entities", "How do I upload a file to Dropbox?")]),
    ("What is the tallest mountain in Africa?", "Which mountain is the highest in Africa?",
     [("entities", "What is the tallest mountain in Europe?"), ("opposites", "What is the smallest mountain in Africa?")]),
    ("How do I change a flat tire?", "What are the steps to change a flat tyre?",
     [("negation", "What happens if I don't change a flat tire?")]),
    ("Who painted the Mona Lisa?", "Who was the painter of the Mona Lisa?",
     [("entities", "Who painted The Starry Night?")]),
    ("How much water should I drink per day?", "How much water should I drink each day?",
     [("opposites", "How much water should I drink per night?")]),
    ("Show me how to reverse a string in JavaScript.", "How can I reverse a string in JavaScript?",
     [("entities", "Show me how to reverse a string in Rust.")]),
    ("What is the speed of light?", "How fast does light travel?",
     [("entities", "What is the speed of sound?")]),
    ("How do I turn off notifications on my iPhone?", "How can I disable notifications on my iPhone?",
     [("opposites", "How do I turn on notifications on my iPhone?"), ("entities", "How do I turn off notifications on my Android?")]),
    ("What are the opening hours of the Louvre?", "When is the Louvre open?",
     [("opposites", "What are the closing hours of the Louvre?"), ("entities", "What are the opening hours of the Prado?")]),
    ("Plan a 3 day trip to Rome.", "Make a three day itinerary for Rome.",
     [("numbers", "Plan a 5 day trip to Rome."), ("entities", "Plan a 3 day trip to Paris.")]),
    ("How do I fix a leaking faucet?", "How can I repair a dripping faucet?",
     [("negation", "Why does my faucet not stop leaking after the fix?")]),
    ("What is the difference between a virus and a bacterium?", "How does a virus differ from a bacterium?",
     [("entities", "What is the difference between a virus and a fungus?")]),
    ("How do I compress a folder on Windows?", "How can I zip a folder on Windows?",
     [("opposites", "How do I decompress a folder on Windows?"), ("entities", "How do I compress a folder on macOS?")]),
    ("What should I pack for a week in Iceland?", "What do I need to pack for one week in Iceland?",
     [("entities", "What should I pack for a week in Thailand?"), ("numbers", "What should I pack for 2 weeks in Iceland?")]),
    ("How do I add a user in Linux?", "How can I create a new user account in Linux?",
     [("opposites", "How do I remove a user in Linux?")]),
    ("Is Pluto a planet?", "Is Pluto considered a planet?",
     [("negation", "Why is Pluto not a planet?"), ("entities", "Is Ceres a planet?")]),
    ("How do I make cold brew coffee?", "What's the method for making cold brew coffee?",
     [("opposites", "How do I make hot brew coffee?")]),
    ("What are good exercises for lower back pain?", "Which exercises help with lower back pain?",
     [("opposites", "What are good exercises for upper back pain?"), ("negation", "What exercises should I not do with lower back pain?")]),
    ("How do I get a refund for order 5531?", "How can I be refunded for order 5531?",
     [("numbers", "How do I get a refund for order 5532?")]),
    ("What does HTTP status 404 mean?", "What is the meaning of HTTP status code 404?",
     [("numbers", "What does HTTP status 500 mean?"), ("numbers", "What does HTTP status 403 mean?")]),
    ("How do I enable dark mode in Chrome?", "How can I turn on dark mode in Chrome?",
     [("entities", "How do I enable dark mode in Firefox?"), ("opposites", "How do I disable dark mode in Chrome?")]),
    ("List the planets in order from the Sun.", "Name the planets in order from the Sun.",
     [("opposites", "List the planets in order from the Sun, last to first.")]),
    ("What is the minimum wage in California?", "How much is the minimum wage in California?",
     [("entities", "What is the minimum wage in Texas?"), ("opposites", "What is the maximum wage in California?")]),
    ("How many ounces are in a pound?", "How many ounces make a pound?",
     [("entities", "How many grams are in a pound?")]),
    ("Write a SQL query to find duplicate emails.", "Give me a SQL query that finds duplicate emails.",
     [("negation", "Write a SQL query to find emails that are not duplicates.")]),
    ("How can I improve my credit score?", "What can I do to raise my credit score?",
     [("opposites", "What can lower my credit score?")]),
    ("When is the best time to visit Japan?", "What's the ideal time of year to visit Japan?",
     [("opposites", "When is the worst time to visit Japan?"), ("entities", "When is the best time to visit Peru?")]),
    ("How do I connect to a VPN on Windows 11?", "How can I set up a VPN connection on Windows 11?",
     [("numbers", "How do I connect to a VPN on Windows 10?"), ("opposites", "How do I disconnect from a VPN on Windows 11?")]),
    ("What is the atomic number of carbon?", "Which atomic number does carbon have?",
     [("entities", "What is the atomic number of nitrogen?")]),
    ("Can you explain what a black hole is?", "What is a black hole?",
     [("opposites", "Can you explain what a white hole is?")]),
    ("How do I lock my screen on a Mac?", "What's the shortcut to lock the screen on a Mac?",
     [("opposites", "How do I unlock my screen on a Mac?")]),
    ("What is the main cause of inflation?", "What mainly causes inflation?",
     [("entities", "What is the main cause of deflation?")]),
    ("How do I export a spreadsheet as CSV?", "How can I save a spreadsheet as a CSV file?",
     [("opposites", "How do I import a CSV into a spreadsheet?")]),
    ("How many players are on a soccer team?", "How many players does a soccer team have?",
     [("entities", "How many players are on a basketball team?")]),
    ("Tell me a joke about cats.", "Tell me a cat joke.",
     [("entities", "Tell me a joke about dogs."), ("negation", "Tell me something about cats that is not a joke.")]),
    ("How do I stop my puppy from biting?", "How can I get my puppy to stop biting?",
     [("opposites", "How do I teach my puppy to start biting toys?")]),
    ("What is the interest on $1000 at 5% for one year?", "How much interest does $1000 earn at 5% in a year?",
     [("numbers", "What is the interest on $2000 at 5% for one year?"), ("numbers", "What is the interest on $1000 at 7% for one year?")]),
    ("Who was the first president of the United States?", "Who served as the first US president?",
     [("numbers", "Who was the second president of the United States?")]),
    ("How do I remove a stripped screw?", "How can I get a stripped screw out?",
     [("negation", "How do I avoid stripping a screw?")]),
    ("What's a good name for a golden retriever?", "Suggest a name for a golden retriever.",
     [("entities", "What's a good name for a German shepherd?")]),
    ("How do I encrypt a zip file?", "How can I password-protect a zip file?",
     [("opposites", "How do I decrypt a zip file?")]),
    ("Is it better to rent or buy a house?", "Should I rent or buy a home?",
     [("opposites", "Is it better to sell or keep a house?")]),
    ("What's the fastest land animal?", "Which land animal is the fastest?",
     [("opposites", "What's the slowest land animal?"), ("entities", "What's the fastest sea animal?")]),
    ("How do I write a cover letter?", "How should I write a cover letter?",
     [("negation", "What should I not write in a cover letter?")]),
    ("How many hours of sleep does an adult need?", "How much sleep do adults need?",
     [("entities", "How many hours of sleep does a teenager need?")]),
    ("Create a workout plan for 4 days a week.", "Make me a 4 day per week workout plan.",
     [("numbers", "Create a workout plan for 3 days a week.")]),
    ("What does the error 'permission denied' mean in Linux?", "In Linux, what does 'permission denied' mean?",
     [("quoted", "What does the error 'file not found' mean in Linux?")]),
    ("How do I take a screenshot on Windows?", "What's the way to take a screenshot on Windows?",
     [("entities", "How do I take a screenshot on Linux?")]),
    ("What is the price of the basic plan?", "How much does the basic plan cost?",
     [("entities", "What is the price of the premium plan?")]),
    ("How do I allow cookies in Safari?", "How can I enable cookies in Safari?",
     [("opposites", "How do I block cookies in Safari?")]),
    ("When does daylight saving time start in the US?", "When does DST begin in the United States?",
     [("opposites", "When does daylight saving time end in the US?"), ("entities", "When does daylight saving time start in Europe?")]),
    ("Explain the rules of chess for beginners.", "Explain chess rules to a beginner.",
     [("entities", "Explain the rules of poker for beginners.")]),
    ("How do I boil rice?", "What's the way to cook rice by boiling?",
     [("entities", "How do I boil pasta?")]),
]

SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a pirate. Answer in pirate speak.",
                  "Answer in French.", "You are a terse assistant. Answer in one word."]
EARLIER_TURNS = [[{"role": "user", "content": "I'm planning a trip."}, {"role": "assistant", "content": "Great! Where to?"}],
                 [{"role": "user", "content": "I'm writing a children's book."},
                  {"role": "assistant", "content": "Lovely. What is it about?"}]]


@dataclass
class Pair:
    """A cached conversation, a second conversation, whether it should get the first's answer, and the kind."""

    cached: list[dict[str, str]]
    asked: list[dict[str, str]]
    should_hit: bool
    kind: str


def builtin_pairs() -> list[Pair]:
    """Every pair of the built-in set: one paraphrase per base (should hit), its near misses, and
    each paraphrase again under a different system prompt and after different earlier turns (should miss)."""
    out: list[Pair] = []
    sys0 = {"role": "system", "content": SYSTEM_PROMPTS[0]}
    for i, (question, paraphrase, misses) in enumerate(BASES):
        cached = [sys0, {"role": "user", "content": question}]
        out.append(Pair(cached, [sys0, {"role": "user", "content": paraphrase}], True, "paraphrase"))
        for kind, text in misses:
            out.append(Pair(cached, [sys0, {"role": "user", "content": text}], False, kind))
        other_sys = {"role": "system", "content": SYSTEM_PROMPTS[1 + i % (len(SYSTEM_PROMPTS) - 1)]}
        out.append(Pair(cached, [other_sys, {"role": "user", "content": paraphrase}], False, "system prompt"))
        out.append(Pair(cached, [sys0, *EARLIER_TURNS[i % len(EARLIER_TURNS)], {"role": "user", "content": paraphrase}],
                        False, "earlier turns"))
    return out


@dataclass
class Evaluation:
    """Counts by kind: should-hit pairs answered with the right entry (hits), any answer to a
    should-miss pair or a wrong entry for a paraphrase (false hits)."""

    threshold: float
    method: str
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)

    def _sum(self, key: str, hit: bool | None = None) -> int:
        return sum(v[key] for k, v in self.by_kind.items() if hit is None or (k == "paraphrase") == hit)

    @property
    def hit_rate(self) -> float:
        return self._sum("hits", True) / max(1, self._sum("pairs", True))

    @property
    def false_hit_rate(self) -> float:
        """False hits over all lookups that must not get the cached answer (every near miss)."""
        return self._sum("false_hits", False) / max(1, self._sum("pairs", False))

    @property
    def wrong_entry(self) -> int:
        """Paraphrases answered with another question's entry."""
        return self.by_kind.get("paraphrase", {}).get("false_hits", 0)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "threshold": self.threshold, "hit_rate": self.hit_rate,
                "false_hit_rate": self.false_hit_rate, "wrong_entry": self.wrong_entry, "by_kind": self.by_kind}


def evaluate(pairs: list[Pair], threshold: float, *, embedder: Any = None, last_message: bool = False,
             vectors: dict[str, Any] | None = None) -> Evaluation:
    """Fill one in-memory cache with every distinct cached conversation, look up every asked one.
    `last_message=True`: GPTCache's matching (last message embedding only; no guard, no context).
    `vectors`: a dict text -> embedding shared by several calls (filled here with what is missing),
    so evaluating several thresholds or both methods embeds each text once."""
    from chatsmith.cache.store import CacheKey, ResponseCache

    cache = ResponseCache(None, semantic=True, threshold=threshold, embedder=embedder,
                          guard=not last_message, max_entries=10**6)
    settings = {"model": "eval", "temperature": 0}

    def key(messages: list[dict[str, str]]) -> CacheKey:
        if last_message:
            return CacheKey.from_messages(settings, messages[-1:], prompt=messages[-1]["content"])
        return CacheKey.from_messages(settings, messages, prompt=repr(messages))

    cached = [key(p.cached) for p in pairs]
    asked = [key(p.asked) for p in pairs]
    # Every text embedded in one batched call (pair by pair, the set took minutes on 2 cores).
    vectors = {} if vectors is None else vectors
    texts = [t for t in dict.fromkeys(k.last for k in cached + asked if k.last is not None) if t not in vectors]
    if texts:
        if embedder is None:
            from chatsmith.embed import shared_embedder

            embedder = shared_embedder()
        vectors.update(zip(texts, embedder.encode_array(texts, batch_size=64)))
        for k in cached + asked:
            if k.last is not None:
                k.vector = vectors[k.last]
    entries: set[str] = set()
    for k in cached:
        if k.exact not in entries:
            entries.add(k.exact)
            cache.store(k, {"choices": [{"message": {"content": k.exact}}]})
    result = Evaluation(threshold, "last message (GPTCache)" if last_message else "chatsmith")
    for p, c, k in zip(pairs, cached, asked):
        hit = cache.lookup(k).hit
        row = result.by_kind.setdefault(p.kind, {"pairs": 0, "hits": 0, "false_hits": 0})
        row["pairs"] += 1
        if hit is None:
            continue
        right = hit.response["choices"][0]["message"]["content"] == c.exact
        if p.should_hit and right:
            row["hits"] += 1
        else:
            row["false_hits"] += 1
    cache.close()
    return result
