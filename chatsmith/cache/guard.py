"""The semantic cache's guard: two prompts whose embeddings are close may still ask different
things. "How do I enable the firewall?" and "How do I not enable the firewall?", "a table for 2"
and "a table for 4", "the capital of France" and "the capital of Spain", "increase" and "decrease"
sit close together in embedding space (GPTCache issue #694 is the negation case). So a semantic
hit also needs the same negations, numbers, named entities, quoted strings, no opposite words on
the two sides, and not one word swapped for another in the same place ("a joke about cats" /
"dogs": the names of common things are not capitalised); `refusal(a, b)` names the first
difference found, or None when there is none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NEGATIONS = frozenset("""not no never none nobody nothing nowhere neither nor without cannot cant dont doesnt didnt
isnt arent wasnt werent wont wouldnt shouldnt couldnt hasnt havent hadnt mustnt neednt aint avoid avoiding prevent
preventing except excluding unless lack lacking""".split())
_NUMBER_WORDS = {w: i for i, w in enumerate("""zero one two three four five six seven eight nine ten eleven twelve
thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty""".split())}
_NUMBER_WORDS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
                      "ninety": 90, "hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9,
                      "dozen": 12, "half": 0.5, "twice": 2, "double": 2, "triple": 3, "once": 1,
                      "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7,
                      "eighth": 8, "ninth": 9, "tenth": 10})
# Words whose swap turns a question into its opposite, as stems ("increas" covers increase, increasing).
OPPOSITES = [("increas", "decreas"), ("enabl", "disabl"), ("befor", "after"), ("maxim", "minim"),
             ("larg", "small"), ("bigg", "small"), ("high", "low"), ("more", "less"), ("more", "fewer"),
             ("add", "remov"), ("start", "stop"), ("open", "clos"), ("buy", "sell"), ("import", "export"),
             ("upload", "download"), ("encrypt", "decrypt"), ("compress", "decompress"), ("min", "max"),
             ("longest", "shortest"), ("fast", "slow"), ("hot", "cold"), ("warm", "cool"), ("best", "worst"),
             ("win", "los"), ("earli", "late"), ("first", "last"), ("north", "south"), ("east", "west"),
             ("upper", "lower"), ("above", "below"), ("insid", "outsid"), ("up", "down"), ("left", "right"),
             ("cheap", "expens"), ("strong", "weak"), ("true", "fals"), ("pro", "con"), ("advantag", "disadvantag"),
             ("includ", "exclud"), ("accept", "reject"), ("allow", "block"), ("allow", "deny"), ("lock", "unlock"),
             ("mount", "unmount"), ("install", "uninstall"), ("connect", "disconnect"), ("subscrib", "unsubscrib"),
             ("sync", "async"), ("male", "female"), ("man", "woman"), ("boy", "girl"), ("day", "night"),
             ("summer", "winter"), ("ris", "fall"), ("gain", "los"), ("push", "pull"), ("send", "receiv"),
             ("input", "output"), ("plus", "minus"), ("multipl", "divid"), ("under", "over"), ("light", "dark"),
             ("old", "new"), ("old", "young"), ("begin", "end"), ("fre", "paid"), ("legal", "illegal"),
             ("possibl", "impossibl"), ("safe", "unsafe"), ("healthy", "unhealthy"), ("lik", "dislik")]


@dataclass(frozen=True)
class Features:
    """What the guard compares: negation count, numbers (as values), names (lower case),
    quoted strings, the set of words (lower case, for names and opposites) and the sequence of
    words with numbers as values (for one-word substitutions)."""

    negations: int
    numbers: frozenset
    entities: frozenset
    quoted: frozenset
    words: frozenset
    sequence: tuple = ()


def _number(token: str) -> float | None:
    t = token.lower().replace(",", "")
    t = re.sub(r"(st|nd|rd|th|k|m|%)$", "", t) if re.match(r"^\d", t) else t
    try:
        return float(t)
    except ValueError:
        return _NUMBER_WORDS.get(t)


def features(text: str) -> Features:
    """The guard's view of one prompt."""
    quoted = frozenset(q.strip() for q in re.findall(r'"([^"]+)"|\u201c([^\u201d]+)\u201d|`([^`]+)`', text)
                       for q in q if q.strip())
    plain = text.replace("\u2019", "'")
    tokens = re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)?|\d[\d,]*(?:\.\d+)?(?:st|nd|rd|th|k|m|%)?", plain)
    words = [t.lower() for t in tokens]
    negations = 0
    for w in words:
        if w.replace("'", "") in NEGATIONS or w.endswith("n't"):
            negations += 1
    numbers = frozenset(v for v in (_number(t) for t in tokens) if v is not None)
    entities = set()
    sentence_start = True
    for m in re.finditer(r"[A-Za-z][A-Za-z0-9'.-]*[A-Za-z0-9]|[A-Za-z]|[.!?:;]", plain):
        tok = m.group(0)
        if tok in ".!?:;":
            sentence_start = True
            continue
        bare = re.sub(r"'s$", "", tok)
        upper_inside = any(c.isupper() for c in bare[1:])
        if (bare.isupper() and len(bare) >= 2) or upper_inside or any(c.isdigit() for c in bare):
            entities.add(bare.lower())      # acronyms, CamelCase, codes: names wherever they stand
        elif bare[0].isupper() and len(bare) > 1 and not sentence_start:
            entities.add(bare.lower())      # a capitalised word inside a sentence
        sentence_start = False
    sequence = tuple(str(_number(w)) if _number(w) is not None else re.sub(r"'s$", "", w) for w in words)
    return Features(negations, numbers, frozenset(entities), quoted,
                    frozenset(re.sub(r"'s$", "", w) for w in words), sequence)


def refusal(a: Features | str, b: Features | str) -> str | None:
    """Why `b` must not get the answer cached for `a` ("negation", "numbers", "entities",
    "quoted", "opposites", "substitution"), or None when the guard finds no difference."""
    fa = features(a) if isinstance(a, str) else a
    fb = features(b) if isinstance(b, str) else b
    if fa.negations != fb.negations:
        return "negation"
    if fa.numbers != fb.numbers:
        return "numbers"
    if fa.quoted != fb.quoted:
        return "quoted"
    # A name on one side must appear (in any case) on the other: "france" and "France" match.
    if not fa.entities <= fb.words | fb.entities or not fb.entities <= fa.words | fa.entities:
        return "entities"
    only_a, only_b = fa.words - fb.words, fb.words - fa.words
    for x, y in OPPOSITES:
        if (_has(only_a, x) and _has(only_b, y)) or (_has(only_a, y) and _has(only_b, x)):
            return "opposites"
    if _one_slot_changed(fa.sequence, fb.sequence):
        return "substitution"
    return None


def _one_slot_changed(a: tuple, b: tuple) -> bool:
    """Whether `b` is `a` with one slot (one or two words) swapped for other words, past the first
    word: "a joke about cats" / "a joke about dogs", "the basic plan" / "the premium plan". Such a
    pair is a different question however close its embedding; a paraphrase rewords more, or only
    the opening verb ("Write a haiku" / "Compose a haiku"). Spelling variants (tire/tyre) pass."""
    import difflib

    ops = [op for op in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes() if op[0] != "equal"]
    if len(ops) != 1 or ops[0][0] != "replace":
        return False
    _, i1, i2, j1, j2 = ops[0]
    if i1 == 0 or j1 == 0 or i2 - i1 > 2 or j2 - j1 > 2:
        return False
    old, new = " ".join(a[i1:i2]), " ".join(b[j1:j2])
    return difflib.SequenceMatcher(a=old, b=new).ratio() < 0.75


def _has(words: frozenset, stem: str) -> bool:
    return any(w == stem or (len(stem) >= 4 and w.startswith(stem)) for w in words)
