"""The response cache of `chatsmith serve --cache`: an exact tier keyed on the whole rendered
prompt and every setting that changes the answer, and an opt-in semantic tier guarded against
near misses (negations, numbers, names, quoted strings, opposites). docs/kb.md describes both.

guard.py    what two close prompts must share for one to get the other's answer
store.py    ResponseCache: SQLite persistence, TTL, LRU eviction, exact and semantic lookups
serving.py  the server's side: which requests are cached, their keys, replay as JSON or a stream
pairs.py    the built-in paraphrase / near-miss set and its evaluation
"""

from chatsmith.cache.store import DEFAULT_THRESHOLD, CacheHit, CacheKey, Lookup, ResponseCache

__all__ = ["DEFAULT_THRESHOLD", "CacheHit", "CacheKey", "Lookup", "ResponseCache"]
