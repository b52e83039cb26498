"""The one template renderer: exact assistant-only masks, multi-turn, for several templates."""

from __future__ import annotations

import copy

import pytest
from conftest import trained_segments

from chatsmith.data import Conversation, Message
from chatsmith.data.template import (
    end_of_turn,
    render_conversation,
    stop_token_ids,
    template_tokens,
)
from chatsmith.errors import ChatsmithError

CONV = Conversation([
    Message("system", "Be brief."),
    Message("user", "Hi there"),
    Message("assistant", "Hello! How can I help?"),
    Message("user", "What is 2+2?"),
    Message("assistant", "4"),
])


@pytest.fixture
def tok_with_template_tokens(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": template_tokens("llama-3")})
    return tok


@pytest.mark.parametrize("template, eot", [
    (None, "<|im_end|>"),          # the model's own Jinja template (SmolLM2, ChatML-like)
    ("chatml", "<|im_end|>"),
    ("llama-3", "<|eot_id|>"),
    ("alpaca", "<|im_end|>"),      # alpaca/vicuna/zephyr end a turn with the tokenizer's EOS
    ("vicuna", "<|im_end|>"),
    ("zephyr", "<|im_end|>"),
])
def test_exact_assistant_spans(tok_with_template_tokens, template, eot):
    tok = tok_with_template_tokens
    r = render_conversation(tok, CONV, template=template)
    assert end_of_turn(tok, template) == eot
    segs = trained_segments(tok, r)
    # vicuna puts "ASSISTANT:" then a space before the answer; the space belongs to the answer.
    lead = " " if template == "vicuna" else ""
    assert segs == [f"{lead}Hello! How can I help?{eot}", f"{lead}4{eot}"]
    # The whole sequence decodes to the rendered text: nothing is lost or duplicated.
    assert tok.decode(r.input_ids) == r.text
    # System and user text are never trained.
    for t, m in zip(r.input_ids, r.loss_mask):
        if m:
            assert tok.decode([t]) not in ("Hi", " there", "Be", " brief")


def test_exact_mask_positions_chatml(tokenizer):
    """Token-exact: the mask is 1 exactly on the answer tokens and the end-of-turn token."""
    conv = Conversation([Message("user", "Hi"), Message("assistant", "Yo"), Message("user", "Ok?"), Message("assistant", "Yes")])
    r = render_conversation(tokenizer, conv, template="chatml")
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    expected_ids, expected_mask = [], []
    for m in conv.messages:
        head = enc(f"<|im_start|>{m.role}\n")
        body = enc(m.content) + enc("<|im_end|>")
        tail = enc("\n")
        train = 1 if m.role == "assistant" else 0
        expected_ids += head + body + tail
        expected_mask += [0] * len(head) + [train] * len(body) + [0] * len(tail)
    assert r.input_ids == expected_ids
    assert r.loss_mask == expected_mask


def test_untrained_assistant_turn_is_context_only(tokenizer):
    conv = Conversation([Message("user", "a"), Message("assistant", "first", train=False),
                         Message("user", "b"), Message("assistant", "second")])
    segs = trained_segments(tokenizer, render_conversation(tokenizer, conv, template="chatml"))
    assert segs == ["second<|im_end|>"]


def test_generation_prompt_matches_training_prefix(tokenizer):
    """The prompt used at inference is exactly the training text up to the assistant's answer."""
    conv = Conversation([Message("user", "Name a colour.")])
    prompt = render_conversation(tokenizer, conv, add_generation_prompt=True)
    full = render_conversation(tokenizer, Conversation(conv.messages + [Message("assistant", "Blue.")]))
    assert full.input_ids[: len(prompt.input_ids)] == prompt.input_ids
    first_trained = full.loss_mask.index(1)
    assert first_trained == len(prompt.input_ids)


def test_model_template_injects_default_system(tokenizer):
    r = render_conversation(tokenizer, Conversation([Message("user", "hi"), Message("assistant", "yo")]))
    assert r.text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_truncation_is_reported(tokenizer):
    conv = Conversation([Message("user", "word " * 50), Message("assistant", "ok")])
    r = render_conversation(tokenizer, conv, template="chatml", max_length=16)
    assert r.truncated and len(r.input_ids) == 16 and len(r.loss_mask) == 16


def test_plain_text_trains_every_token(tokenizer):
    r = render_conversation(tokenizer, Conversation([Message("text", "Once upon a time")]))
    assert all(r.loss_mask) and r.input_ids[-1] == tokenizer.eos_token_id


def test_stop_ids_include_end_of_turn(tokenizer):
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tokenizer)


def test_unknown_template_is_a_clear_error(tokenizer):
    with pytest.raises(ChatsmithError, match="unknown template 'mistral-ish'.*chatml"):
        render_conversation(tokenizer, CONV, template="mistral-ish")


def test_non_prefix_stable_template_is_refused(tokenizer):
    # A template that drops the content of earlier assistant turns (as reasoning templates do).
    src = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
           "{{ '<|im_start|>assistant\n<|im_end|>\n' }}{% else %}"
           "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(ChatsmithError, match="renders earlier turns differently"):
        render_conversation(tokenizer, CONV, template=src)


def test_template_refusals_are_chatsmith_errors(tokenizer):
    """A template's own raise_exception, or a trained assistant turn with no prompt before it, is a
    clear ChatsmithError naming the roles, never a raw ValueError or TemplateError."""
    from chatsmith.data.template import FALLBACK_TEMPLATES

    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}" + \
        FALLBACK_TEMPLATES["chatml"][0]
    with pytest.raises(ChatsmithError, match=r"refuses this conversation \(must start with user\).*assistant, user"):
        render_conversation(tokenizer, Conversation([Message("assistant", "hi", train=False), Message("user", "x")]),
                            template=strict, add_generation_prompt=True)
    with pytest.raises(ChatsmithError, match="opens the conversation"):
        render_conversation(tokenizer, Conversation([Message("assistant", "Hello!"), Message("user", "x")]))
    # As context (train=False) it renders: that is how the server and the chat render history.
    r = render_conversation(tokenizer, Conversation([Message("assistant", "Hello!", train=False),
                                                     Message("user", "x")]), add_generation_prompt=True)
    assert "Hello!" in r.text and sum(r.loss_mask) == 0
