"""Constrained decoding: `response_format: {"type": "json_object"}` as a token filter.

`JsonObjectConstraint` tracks a JSON object being written, character by character (a small
pushdown automaton), and tells the engine whether a candidate token keeps the text a valid prefix
of one JSON object. The engine walks the candidates from most to least likely and takes the first
allowed one (greedy) or samples among the allowed ones; once the object is closed it forces a stop
token. Caps on string length, whitespace runs and nesting keep a weak model from writing forever
inside a string.
"""

from __future__ import annotations

from typing import Any

WS = " \t\n\r"
MAX_STRING = 64
CLOSE_AFTER = 160  # characters; after this only moves that close the object are allowed
MAX_WS_RUN = 2
MAX_DEPTH = 6
# number automaton: state -> list of (characters, next state); terminal states may end a number
_NUM = {
    "start": [("-", "minus"), ("0", "zero"), ("123456789", "int")],
    "minus": [("0", "zero"), ("123456789", "int")],
    "zero": [(".", "dot"), ("eE", "e")],
    "int": [("0123456789", "int"), (".", "dot"), ("eE", "e")],
    "dot": [("0123456789", "frac")],
    "frac": [("0123456789", "frac"), ("eE", "e")],
    "e": [("+-", "esign"), ("0123456789", "exp")],
    "esign": [("0123456789", "exp")],
    "exp": [("0123456789", "exp")],
}
_NUM_DONE = {"zero", "int", "frac", "exp"}
_LITERALS = {"t": "true", "f": "false", "n": "null"}

# state: (mode, stack, aux, ws_run). Modes: BEGIN (before the top-level "{"), KEY_OR_END, KEY, COLON,
# VALUE, VALUE_OR_END (just after "["), AFTER, STRING, ESC, UNI, NUMBER, LITERAL, DONE.
State = tuple[str, str, Any, int]
START: State = ("BEGIN", "", None, 0)


def _after_value(stack: str) -> State:
    return ("DONE", "", None, 0) if not stack else ("AFTER", stack, None, 0)


def step(state: State, ch: str, closing: bool = False) -> State | None:
    """The state after character `ch`, or None if `ch` cannot continue a JSON object here.

    With `closing`, only characters that finish the object as soon as possible are allowed
    (close strings and brackets, `null` for a pending value, an empty key for a pending key).
    """
    mode, stack, aux, ws = state
    if closing and not _closes(mode, ch):
        return None
    if mode == "STRING":
        is_key, length = aux
        if ch == '"':
            return ("COLON", stack, None, 0) if is_key else _after_value(stack)
        if ch == "\\":
            return None if length >= MAX_STRING else ("ESC", stack, (is_key, length + 1), 0)
        if ord(ch) < 0x20 or length >= MAX_STRING:
            return None
        return ("STRING", stack, (is_key, length + 1), 0)
    if mode == "ESC":
        if ch in '"\\/bfnrt':
            return ("STRING", stack, aux, 0)
        if ch == "u":
            return ("UNI", stack, (aux, 0), 0)
        return None
    if mode == "UNI":
        inner, n = aux
        if ch not in "0123456789abcdefABCDEF":
            return None
        return ("STRING", stack, inner, 0) if n == 3 else ("UNI", stack, (inner, n + 1), 0)
    if mode == "NUMBER":
        digits, num = aux
        for chars, nxt in _NUM[num]:
            if ch in chars:
                return None if digits >= 24 else ("NUMBER", stack, (digits + 1, nxt), 0)
        if num not in _NUM_DONE:
            return None
        return step(_after_value(stack), ch)
    if mode == "LITERAL":
        word, i = aux
        if ch != word[i]:
            return None
        return _after_value(stack) if i + 1 == len(word) else ("LITERAL", stack, (word, i + 1), 0)
    if ch in WS:
        if mode == "DONE" or ws >= MAX_WS_RUN:
            return None
        return (mode, stack, aux, ws + 1)
    if mode == "BEGIN":
        return ("KEY_OR_END", "{", None, 0) if ch == "{" else None
    if mode in ("KEY_OR_END", "KEY"):
        if ch == '"':
            return ("STRING", stack, (True, 0), 0)
        if ch == "}" and mode == "KEY_OR_END":
            return _after_value(stack[:-1])
        return None
    if mode == "COLON":
        return ("VALUE", stack, None, 0) if ch == ":" else None
    if mode in ("VALUE", "VALUE_OR_END"):
        if ch == "]" and mode == "VALUE_OR_END":
            return _after_value(stack[:-1])
        if ch == '"':
            return ("STRING", stack, (False, 0), 0)
        if ch in "{[":
            if len(stack) >= MAX_DEPTH:
                return None
            return ("KEY_OR_END", stack + "{", None, 0) if ch == "{" else ("VALUE_OR_END", stack + "[", None, 0)
        if ch in _LITERALS:
            return ("LITERAL", stack, (_LITERALS[ch], 1), 0)
        if ch in "-0123456789":
            return step(("NUMBER", stack, (0, "start"), 0), ch)
        return None
    if mode == "AFTER":
        top = stack[-1]
        if ch == ",":
            return ("KEY", stack, None, 0) if top == "{" else ("VALUE", stack, None, 0)
        if (ch == "}" and top == "{") or (ch == "]" and top == "["):
            return _after_value(stack[:-1])
        return None
    return None  # DONE: nothing may follow the object


def _closes(mode: str, ch: str) -> bool:
    if mode in ("STRING", "KEY"):
        return ch == '"'
    if mode == "KEY_OR_END":
        return ch == "}"
    if mode == "VALUE_OR_END":
        return ch == "]"
    if mode == "VALUE":
        return ch == "n"
    if mode == "AFTER":
        return ch in "}]"
    if mode == "NUMBER":
        return ch in "}]0123456789"
    return mode in ("COLON", "LITERAL", "ESC", "UNI") and ch not in WS


def feed(state: State, text: str, closing: bool = False) -> State | None:
    """The parser state after `text`, or None when `text` cannot continue a JSON object from `state`."""
    for ch in text:
        nxt = step(state, ch, closing)
        if nxt is None:
            return None
        state = nxt
    return state


_PIECES: dict[int, list[str | None]] = {}


def token_pieces(tokenizer: Any) -> list[str | None]:
    """The text of every token id alone (None for special tokens), cached per tokenizer."""
    key = id(tokenizer)
    if key not in _PIECES:
        special = set(tokenizer.all_special_ids)
        pieces: list[str | None] = []
        for i in range(len(tokenizer)):
            pieces.append(None if i in special else tokenizer.decode([i], skip_special_tokens=False,
                                                                      clean_up_tokenization_spaces=False))
        _PIECES[key] = pieces
    return _PIECES[key]


class JsonObjectConstraint:
    """Allow only tokens that keep the generated text a prefix of one JSON object."""

    def __init__(self, tokenizer: Any) -> None:
        self.pieces = token_pieces(tokenizer)
        self.state: State = START
        self.chars = 0

    @property
    def done(self) -> bool:
        """Whether a complete JSON object has been written."""
        return self.state[0] == "DONE"

    def allows(self, token: int) -> bool:
        """Whether `token` keeps the text a valid prefix of a JSON object."""
        piece = self.pieces[token] if 0 <= token < len(self.pieces) else None
        return bool(piece) and "\ufffd" not in piece and feed(self.state, piece, self.chars >= CLOSE_AFTER) is not None

    def advance(self, token: int) -> None:
        """Record that `token` was chosen."""
        piece = self.pieces[token] if 0 <= token < len(self.pieces) else None
        nxt = feed(self.state, piece, self.chars >= CLOSE_AFTER) if piece else None
        if nxt is not None:
            self.state = nxt
            self.chars += len(piece)


# ---- JSON schemas and tool calls: a grammar library ------------------------------------------------
#
# `response_format: json_schema` and forced tool calls (`tool_choice` required or named) are
# constrained by llguidance (Microsoft's grammar engine, also used by llama.cpp and vLLM): it
# compiles a JSON schema or a Lark grammar and gives the set of allowed tokens for a state as a
# bitmask of the vocabulary in tens of microseconds (benchmarks/tool_constraint_overhead.py),
# against milliseconds for the character automaton above walking token texts. The JSON is written
# as Python's json.dumps writes it (", " and ": " separators, no other whitespace): the format
# the tool-call training data is rendered in (chatsmith/data/tools.py), and no whitespace run for
# a weak model to get lost in.

JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
_LL_TOKENIZERS: dict[int, Any] = {}


class GrammarError(ValueError):
    """A schema or grammar the grammar library cannot compile; the message says why."""


def ll_tokenizer(tokenizer: Any) -> Any:
    """llguidance's view of a transformers tokenizer, built once per tokenizer."""
    key = id(tokenizer)
    if key not in _LL_TOKENIZERS:
        import llguidance.hf

        _LL_TOKENIZERS[key] = llguidance.hf.from_tokenizer(tokenizer)
    return _LL_TOKENIZERS[key]


def strict_schema(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object schema that does not say
    otherwise: strict mode's rule (OpenAI's structured outputs require it), so no key outside
    `properties` is generated."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) if k not in ("enum", "const", "default", "examples") else v for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """An llguidance grammar for one JSON value matching `schema`; GrammarError when it cannot be compiled."""
    from llguidance import LLMatcher

    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema is an object, got {type(schema).__name__}")
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
        problem = LLMatcher.validate_grammar(grammar)
    except Exception as e:   # llguidance raises ValueError with its reason
        raise GrammarError(str(e)) from None
    if problem:
        raise GrammarError(problem)
    return grammar


def tool_call_grammar(tools: list[dict[str, Any]], name: str | None = None, parallel: bool = True) -> str:
    """An llguidance grammar for tool calls in chatsmith's fallback format: one or more (with
    `parallel`) `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks joined by a
    newline, the arguments valid for the named function's parameter schema (any offered function
    when `name` is None)."""
    import json

    from llguidance import LLMatcher

    from chatsmith.data.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

    options, defs = [], {}
    for t in tools:
        fn = t["function"]
        if name is not None and fn["name"] != name:
            continue
        params = strict_schema(fn.get("parameters") or {"type": "object", "properties": {}})
        # "#/$defs/X" references point at the root of the schema, which is now the union below:
        # the definitions move there (pydantic-made schemas use them).
        for key in ("$defs", "definitions"):
            for k, v in (params.pop(key, None) or {}).items():
                if defs.setdefault(key, {}).setdefault(k, v) != v:
                    raise GrammarError(f"two tools define {key}/{k} differently; rename one")
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    if not options:
        raise GrammarError(f"no tool named '{name}' among the tools")
    schema = {"anyOf": options, "x-guidance": JSON_STYLE, **defs}
    more = ' ("\\n" call)*' if parallel else ""
    lark = "\n".join([f"start: call{more}",
                      f"call: {json.dumps(TOOL_CALL_OPEN + chr(10))} body {json.dumps(chr(10) + TOOL_CALL_CLOSE)}",
                      f"body: %json {json.dumps(schema)}", ""])
    try:
        grammar = LLMatcher.grammar_from_lark(lark)
        problem = LLMatcher.validate_grammar(grammar)
    except Exception as e:   # llguidance's own errors (ValueError) and anything a hostile schema provokes
        raise GrammarError(_schema_problem(str(e))) from None
    if problem:
        raise GrammarError(_schema_problem(problem))
    return grammar


def _schema_problem(message: str) -> str:
    """llguidance's error about a schema inside a Lark grammar, without the grammar's text."""
    import re

    inner = re.split(r"\n\s*1 \| ", message.split("failed to compile JSON schema: ")[-1])[0]
    return " ".join(inner.split())


class GrammarConstraint:
    """Allow only tokens that keep the generated text a prefix of a sentence of `grammar` (from
    `json_schema_grammar` or `tool_call_grammar`). The engine's stop tokens are allowed once the
    text is complete, and `done` says when nothing but a stop can follow."""

    def __init__(self, tokenizer: Any, grammar: str, stop_ids: set[int] | frozenset[int] = frozenset()) -> None:
        from llguidance import LLMatcher

        self.ll = ll_tokenizer(tokenizer)
        self.matcher = LLMatcher(self.ll, grammar)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        self.stop_ids = frozenset(stop_ids) | {self.ll.eos_token}
        self._mask: Any = None

    def mask(self) -> Any:
        """The allowed tokens of the current state, a numpy bool array over the vocabulary."""
        if self._mask is None:
            import numpy as np

            bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
            self._mask = np.unpackbits(bits, bitorder="little")[: self.ll.vocab_size].astype(bool)
            self._mask[self.ll.eos_token] = False   # stops are judged by is_accepting (any stop id, not only this)
        return self._mask

    def allowed(self, size: int) -> Any:
        """The allowed tokens as a bool tensor [size] (the model's vocabulary, which may be padded past
        the tokenizer's): the grammar's mask, and the stop tokens once the text is complete. The
        engine masks the logits with it in one operation instead of asking token by token."""
        import torch

        out = torch.zeros(size, dtype=torch.bool)
        mask = torch.from_numpy(self.mask()[:size])
        out[: mask.numel()] = mask
        if self.matcher.is_accepting():
            for t in self.stop_ids:
                if 0 <= t < size:
                    out[t] = True
        return out

    @property
    def done(self) -> bool:
        """Whether the text is complete and nothing but a stop token may follow."""
        m = self.matcher
        return m.is_stopped() or m.is_error() or (m.is_accepting() and not self.mask().any())

    def allows(self, token: int) -> bool:
        """Whether `token` keeps the text a valid prefix (a stop token: whether the text is complete)."""
        if token in self.stop_ids:
            return self.matcher.is_accepting()
        mask = self.mask()
        return 0 <= token < len(mask) and bool(mask[token])

    def advance(self, token: int) -> None:
        """Record that `token` was chosen."""
        if token in self.stop_ids:
            return
        self.matcher.consume_token(token)
        self._mask = None
