"""The one detokenizer (infer/detokenize.py): characters split over tokens, stop strings split over
tokens or run past inside one token, and pieces that always join to the text."""

from __future__ import annotations

import pytest

from chatsmith.infer.detokenize import TextStream


@pytest.fixture(scope="module")
def bytes_tok():
    """One token per UTF-8 byte (no merges): every non-ASCII character is split over tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


class SlowOnly:
    """The same tokenizer seen through `decode` alone (no Rust backend): the fallback path."""

    def __init__(self, tok) -> None:
        self.tok = tok

    def decode(self, ids, **kw):
        return self.tok.decode(ids, **kw)


def run(stream: TextStream, ids: list[int]) -> list[str]:
    pieces = []
    for i in ids:
        pieces.append(stream.push(i))
        if stream.stopped:
            break
    return pieces + [stream.finish()]


@pytest.mark.parametrize("wrap", [lambda t: t, SlowOnly], ids=["DecodeStream", "decode-fallback"])
def test_multibyte_characters_appear_whole(bytes_tok, wrap):
    text = "  héllo 日本 🙂  "
    ids = bytes_tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text), "the fixture must split characters over tokens"
    stream = TextStream(wrap(bytes_tok))
    pieces = run(stream, ids)
    assert "".join(pieces) == text == stream.text
    assert not any("\ufffd" in p for p in pieces)
    # 日 is 3 bytes: nothing is shown until its last byte arrives, then the whole character is.
    at = [p for p in pieces if p]
    assert "日" in at and "🙂" in at


@pytest.mark.parametrize("wrap", [lambda t: t, SlowOnly], ids=["DecodeStream", "decode-fallback"])
def test_incomplete_character_is_shown_at_the_end(bytes_tok, wrap):
    ids = bytes_tok.encode("a日", add_special_tokens=False)[:-1]   # 'a' and 2 of 日's 3 bytes
    stream = TextStream(wrap(bytes_tok))
    assert [stream.push(i) for i in ids] == ["a", "", ""]
    assert stream.finish() == "\ufffd" and stream.text == "a\ufffd"


def test_stop_string_split_over_tokens_is_held_back_and_cut(bytes_tok):
    text = "The answer is 42.###ignored"
    ids = bytes_tok.encode(text, add_special_tokens=False)
    stream = TextStream(bytes_tok, stop=["###", "STOP"])
    pieces = run(stream, ids)
    assert stream.stopped and stream.stop_string == "###"
    assert "".join(pieces) == stream.text == "The answer is 42."
    # While "#" and "##" could still become "###" they were held back, never shown.
    assert not any("#" in p for p in pieces)
    # A partial match that fails is released: "S" then "T" then "x" is plain text.
    s2 = TextStream(bytes_tok, stop=["STOP"])
    shown = [s2.push(i) for i in bytes_tok.encode("a STx", add_special_tokens=False)]
    assert shown == ["a", " ", "", "", "STx"] and s2.finish() == "" and not s2.stopped


def test_stop_string_inside_one_token_ends_where_it_begins():
    """A real BPE tokenizer: a token may carry text past the stop string; the text is cut at it."""
    from chatsmith.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    ids = tok.encode("Paris is the capital.\n\nQuestion: and Rome?", add_special_tokens=False)
    stream = TextStream(tok, stop=["\n\nQuestion"])
    pieces = run(stream, ids)
    assert "".join(pieces) == stream.text == "Paris is the capital."
    assert stream.stop_string == "\n\nQuestion"
    # Without stop strings the pieces join to exactly what the tokenizer's own decode gives.
    plain = TextStream(tok)
    assert "".join(run(plain, ids)) == tok.decode(ids, skip_special_tokens=True)
    # Special tokens (the end-of-turn marker) are not text.
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    s3 = TextStream(tok)
    assert s3.push(eot) == "" and s3.finish() == ""
