"""The one chat-template renderer: Conversation -> (input_ids, loss_mask).

Training, `chat`, serving and export all call `render_conversation`, so the prompt a model is
trained on is the prompt it is served with (STYLE.md, principle 3).

How the mask is exact for any Jinja template: we render growing prefixes of the conversation.
For each trained assistant turn i, `render(messages[:i], add_generation_prompt=True)` ends where
the assistant header ends, and `render(messages[:i+1])` ends after the turn; the characters
between them, cut just after the end-of-turn token, are that turn's trained span. The whole text
is tokenised once, and a token is trained when its first character lies in a trained span (so
BPE merges are the same as at inference time, where the whole prompt is tokenised at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chatsmith.data.conversation import Conversation, Message
from chatsmith.data.tools import template_messages
from chatsmith.errors import ChatsmithError

# Named fallback templates for base models without a chat template of their own.
# Each is (jinja source, end-of-turn string). `eos_token` is the tokenizer's EOS.
FALLBACK_TEMPLATES: dict[str, tuple[str, str | None]] = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        "<|im_end|>",
    ),
    "llama-3": (
        "{{ '<|begin_of_text|>' }}{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        "<|eot_id|>",
    ),
    "alpaca": (
        "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
        "{% set loop_messages = messages[1:] %}{% else %}"
        "{{ 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n' }}"
        "{% set loop_messages = messages %}{% endif %}{% for m in loop_messages %}"
        "{% if m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ '### Response:\n' + m['content'] + eos_token + '\n\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}",
        None,  # EOS
    ),
    "vicuna": (
        "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
        "{% set loop_messages = messages[1:] %}{% else %}"
        "{{ \"A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. \" }}"
        "{% set loop_messages = messages %}{% endif %}{% for m in loop_messages %}"
        "{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
        "{% elif m['role'] == 'assistant' %}{{ 'ASSISTANT: ' + m['content'] + eos_token }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}",
        None,
    ),
    "zephyr": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
        None,
    ),
}


@dataclass
class Rendered:
    """Token ids and their loss mask: what the renderer returns and what every stage trains on."""

    input_ids: list[int]
    loss_mask: list[int]      # 1 where the token is a training target (its prediction is learned)
    truncated: bool = False
    text: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        """Tokens whose prediction is trained. The first token is never one: nothing precedes it."""
        return sum(self.loss_mask[1:])


def template_source(tokenizer: Any, template: str | None) -> str:
    """The Jinja source used for this tokenizer: a named fallback, else the model's own."""
    if template:
        if template in FALLBACK_TEMPLATES:
            return FALLBACK_TEMPLATES[template][0]
        if "{%" in template or "{{" in template:
            return template  # a Jinja template given inline
        raise ChatsmithError(f"unknown template '{template}'; use one of {', '.join(FALLBACK_TEMPLATES)} "
                             "or leave it unset to use the model's own chat template")
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):
        source = source.get("default") or next(iter(source.values()))
    if not source:
        raise ChatsmithError(
            "this model has no chat template of its own (a base model?). Pass --template with one of "
            f"{', '.join(FALLBACK_TEMPLATES)}, e.g. --template chatml")
    return source


def template_tokens(template: str | None) -> list[str]:
    """Special tokens a fallback template needs in the vocabulary (added before training)."""
    if template == "chatml":
        return ["<|im_start|>", "<|im_end|>"]
    if template == "llama-3":
        return ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return []


def _render_text(tokenizer: Any, source: str, messages: list[dict], add_generation_prompt: bool,
                 tools: list[dict] | None = None) -> str:
    if not messages and not add_generation_prompt:
        return ""
    if not messages:
        raise ChatsmithError("a trained assistant turn opens the conversation, so no prompt precedes it; "
                             "start with a user (or system) message, or mark that turn as context (train: false)")
    try:
        return tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False, tools=tools,
                                             add_generation_prompt=add_generation_prompt)
    except ChatsmithError:
        raise
    except Exception as e:   # the template's own raise_exception (a TemplateError), or a ValueError
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ChatsmithError(f"the chat template refuses this conversation ({first}); the roles in order were "
                             f"{', '.join(m['role'] for m in messages)}") from None


def _special_strings(tokenizer: Any) -> list[str]:
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            specials.add(str(tok))
    return sorted((s for s in specials if s), key=len, reverse=True)


def end_of_turn(tokenizer: Any, template: str | None = None) -> str | None:
    """The string that ends an assistant turn in this template (found by probing it)."""
    if template in FALLBACK_TEMPLATES:
        return FALLBACK_TEMPLATES[template][1] or tokenizer.eos_token
    source = template_source(tokenizer, template)
    return _probe_end_of_turn(tokenizer, source)


def _probe_end_of_turn(tokenizer: Any, source: str) -> str | None:
    marker = "CHATSMITH_PROBE_ANSWER"
    text = _render_text(tokenizer, source, [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": marker}], False)
    after = text[text.index(marker) + len(marker):] if marker in text else ""
    best: tuple[int, str] | None = None
    for s in _special_strings(tokenizer):
        i = after.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best[1] if best else tokenizer.eos_token


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template of its own."""
    return bool(getattr(tokenizer, "chat_template", None))


def stop_token_ids(tokenizer: Any, template: str | None = None) -> set[int]:
    """Token ids that end generation: the template's end-of-turn token and EOS.

    A model without a chat template (and no `template`) is a plain text model: EOS alone ends its
    text. A `template` that cannot be used (an unknown name) raises, rather than silently leaving
    generation to run past the end of the turn.
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if template is None and not has_chat_template(tokenizer):
        return ids
    eot = end_of_turn(tokenizer, template)
    if eot:
        tid = tokenizer.convert_tokens_to_ids(eot)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return ids


def _messages_with_system(conv: Conversation, system_prompt: str | None) -> list[Message]:
    msgs = list(conv.messages)
    if system_prompt and not (msgs and msgs[0].role == "system"):
        msgs.insert(0, Message("system", system_prompt))
    return msgs


def _tokenize_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def render_text_document(tokenizer: Any, text: str, max_length: int | None = None) -> Rendered:
    """Plain text for continued pre-training: every token trained, EOS appended."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    ids = ids + [tokenizer.eos_token_id]
    return _truncate(Rendered(ids, [1] * len(ids), text=text), max_length)


def _truncate(r: Rendered, max_length: int | None) -> Rendered:
    if max_length is not None and len(r.input_ids) > max_length:
        return Rendered(r.input_ids[:max_length], r.loss_mask[:max_length], True, r.text)
    return r


def render_conversation(
    tokenizer: Any,
    conversation: Conversation,
    template: str | None = None,
    max_length: int | None = None,
    add_generation_prompt: bool = False,
    system_prompt: str | None = None,
) -> Rendered:
    """Render a conversation to token ids and the assistant-only loss mask.

    With add_generation_prompt=True the text ends with the assistant header, ready for generation
    (used by `chat` and the server). Training examples are truncated on the right to max_length.
    """
    if conversation.is_text:
        return render_text_document(tokenizer, conversation.messages[0].content, max_length)
    source = template_source(tokenizer, template)
    # Tools, calls and results: natively when the template renders them, else in the fallback format.
    given = template_messages(tokenizer, source, _messages_with_system(conversation, system_prompt),
                              conversation.tools)
    messages, dicts, tools = given.messages, given.dicts, given.tools
    full = _render_text(tokenizer, source, dicts, add_generation_prompt, tools)
    eot = end_of_turn(tokenizer, template)

    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m.role != "assistant" or not m.trains():
            continue
        head = _render_text(tokenizer, source, dicts[:i], True, tools)
        upto = _render_text(tokenizer, source, dicts[: i + 1], False, tools)
        if not (upto.startswith(head) and full.startswith(upto)):
            raise ChatsmithError(
                "this chat template renders earlier turns differently once later turns are added "
                "(for example it strips reasoning from past answers), so an exact loss mask cannot be "
                f"derived from it{' (' + conversation.source + ')' if conversation.source else ''}. "
                f"Pass --template with one of {', '.join(FALLBACK_TEMPLATES)}")
        start, end = len(head), len(upto)
        if eot:
            cut = upto.rfind(eot, start)
            if cut >= 0:
                end = cut + len(eot)
        spans.append((start, end))

    ids, offsets = _tokenize_with_offsets(tokenizer, full)
    mask = [0] * len(ids)
    si = 0
    for t, (a, _b) in enumerate(offsets):
        while si < len(spans) and a >= spans[si][1]:
            si += 1
        if si < len(spans) and spans[si][0] <= a < spans[si][1]:
            mask[t] = 1
    return _truncate(Rendered(ids, mask, text=full), max_length)


