"""A small language guesser for `chatsmith data filter --lang`: the dominant script decides most
languages (Han with kana: Japanese; Hangul: Korean; Cyrillic: Russian, or Ukrainian by its own
letters; Arabic, Devanagari, Greek, Hebrew, Thai), and among Latin-script languages the most
frequent function words decide. It needs no model and no download; it is a heuristic, right on
ordinary prose of a sentence or more, and answers "unknown" when the text gives it nothing."""

from __future__ import annotations

import re
from collections import Counter

_SCRIPTS = (
    ("ja", re.compile(r"[\u3040-\u30ff]")),
    ("zh", re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]")),
    ("ko", re.compile(r"[\uac00-\ud7af\u1100-\u11ff]")),
    ("cyrillic", re.compile(r"[\u0400-\u04ff]")),
    ("ar", re.compile(r"[\u0600-\u06ff]")),
    ("hi", re.compile(r"[\u0900-\u097f]")),
    ("el", re.compile(r"[\u0370-\u03ff]")),
    ("he", re.compile(r"[\u0590-\u05ff]")),
    ("th", re.compile(r"[\u0e00-\u0e7f]")),
    ("latin", re.compile(r"[A-Za-z\u00c0-\u024f]")),
)
_STOPWORDS = {
    "en": "the and of to is in that it for you are with this on was be as have not what how can a an into your my do",
    "fr": "le la les et des est une un du pour que qui dans pas sur au vous avec ce il elle",
    "de": "der die das und ist nicht ein eine zu den mit sich des auf für ich sie es wie auch",
    "es": "el la los las y de que en un una es por con para no se del lo como más",
    "it": "il la di che e un una per non sono con del della gli le è si come questo anche",
    "pt": "o a os as e de que em um uma não para com do da se é por mais como",
    "nl": "de het een en van is dat niet op te zijn met voor er ook als aan wat",
}
_WORDS = {lang: set(words.split()) for lang, words in _STOPWORDS.items()}
_LATIN_WORD = re.compile(r"[a-zà-ÿœ]+")
KNOWN = frozenset({*_STOPWORDS, "ja", "zh", "ko", "ru", "uk", "ar", "hi", "el", "he", "th"})


def detect_language(text: str) -> str:
    """An ISO 639-1 code from KNOWN, or "unknown"."""
    sample = text[:2000]
    counts = {name: len(rx.findall(sample)) for name, rx in _SCRIPTS}
    if counts["ja"] and counts["ja"] + counts["zh"] >= counts["latin"]:
        return "ja"
    script = max(counts, key=lambda k: counts[k])
    if counts[script] == 0:
        return "unknown"
    if script == "cyrillic":
        return "uk" if re.search(r"[іїєґІЇЄҐ]", sample) else "ru"
    if script != "latin":
        return script
    words = Counter(w for w in _LATIN_WORD.findall(sample.lower()))
    scores = {lang: sum(words[w] for w in ws) for lang, ws in _WORDS.items()}
    best = max(scores, key=lambda k: scores[k])
    return best if scores[best] > 0 else "unknown"
