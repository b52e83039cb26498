"""`--to ollama`: the GGUF plus a Modelfile whose TEMPLATE (Go template syntax) and stop lines come
from the chat template the model was trained with.

A Jinja template cannot be translated to Go in general, so we read its pieces off renders of marker
conversations (what comes before and after each role's content, the generation prompt, a default
system block the template inserts by itself), write the Go template from those pieces, and then render
several conversations both ways (Jinja, and a Python twin of the Go template) and refuse to write a
Modelfile whose prompts would differ from training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatsmith.errors import ChatsmithError

U1, U2, A1, S1 = "CSUSERONE", "CSUSERTWO", "CSASSISTANTONE", "CSSYSTEMONE"


@dataclass
class TemplatePieces:
    """The strings around each role's content in a linear chat template."""

    default_system: str      # what the template writes before the first turn when no system message is given
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str


def _render(tok: Any, template: str, messages: list[dict[str, str]], gen: bool) -> str:
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen)


def _between(text: str, start: str, end: str | None) -> str:
    i = text.index(start) + len(start)
    return text[i:] if end is None else text[i:text.index(end, i)]


def template_pieces(tok: Any, template: str) -> TemplatePieces:
    """Read the pieces of `template` off renders of marker conversations."""
    u, a, s = {"role": "user", "content": U1}, {"role": "assistant", "content": A1}, {"role": "system", "content": S1}
    try:
        one = _render(tok, template, [u, a], False)
        gen = _render(tok, template, [u], True)
        two = _render(tok, template, [u, a, {"role": "user", "content": U2}], False)
    except Exception as e:   # noqa: BLE001 - a template that refuses the probes cannot be translated
        raise ChatsmithError(f"the chat template cannot be read for a Modelfile ({e}); pass --template chatml") from None
    asst_suffix = one[one.index(A1) + len(A1):]
    user_prefix = _between(two, A1 + asst_suffix, U2) if (A1 + asst_suffix) in two else ""
    user_suffix = two[two.index(U2) + len(U2):]
    head = one[:one.index(U1)]
    if not head.endswith(user_prefix):
        raise ChatsmithError("the chat template writes the first user turn differently from later ones; "
                             "no Ollama TEMPLATE can follow it. Pass --template chatml")
    default_system = head[:len(head) - len(user_prefix)]
    mid = _between(one, U1, A1)
    if not mid.startswith(user_suffix):
        raise ChatsmithError("the chat template's user turn ends differently before an answer; pass --template chatml")
    assistant_prefix = mid[len(user_suffix):]
    generation_prompt = gen[gen.index(U1) + len(U1) + len(user_suffix):]
    try:
        sys_text = _render(tok, template, [s, u], False)
        system_prefix = sys_text[:sys_text.index(S1)]
        system_suffix = _between(sys_text, S1, U1)
        system_suffix = system_suffix[:len(system_suffix) - len(user_prefix)]
    except Exception:   # noqa: BLE001 - a template without system turns
        system_prefix, system_suffix = "", ""
    return TemplatePieces(default_system, system_prefix, system_suffix, user_prefix, user_suffix,
                          assistant_prefix, asst_suffix, generation_prompt)


def _go_literal(text: str) -> str:
    # Text outside {{ }} is copied verbatim by Go templates; only a literal "{{" needs escaping.
    return text.replace("{{", '{{ "{{" }}')


def go_template(p: TemplatePieces) -> str:
    """An Ollama TEMPLATE (Go text/template over .Messages) that renders what the pieces say."""
    L = _go_literal
    # No "{{-" trim markers: they would also eat the newlines that end the pieces ("<|im_end|>\n").
    return (
        '{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}' + L(p.default_system) + "{{ end }}"
        + "{{ range $i, $_ := .Messages }}"
        + "{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        + '{{ if eq .Role "system" }}' + L(p.system_prefix) + "{{ .Content }}" + L(p.system_suffix)
        + '{{ else if eq .Role "user" }}' + L(p.user_prefix) + "{{ .Content }}" + L(p.user_suffix)
        + '{{ else if eq .Role "assistant" }}' + L(p.assistant_prefix) + "{{ .Content }}"
        + "{{ if not $last }}" + L(p.assistant_suffix) + "{{ end }}"
        + "{{ end }}"
        + '{{ if and $last (ne .Role "assistant") }}' + L(p.generation_prompt) + "{{ end }}"
        + "{{ end }}"
    )


def render_like_go(p: TemplatePieces, messages: list[dict[str, str]]) -> str:
    """What the Go template renders for `messages` (its twin in Python, for the check)."""
    out = [] if messages and messages[0]["role"] == "system" else [p.default_system]
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        if m["role"] == "system":
            out += [p.system_prefix, m["content"], p.system_suffix]
        elif m["role"] == "user":
            out += [p.user_prefix, m["content"], p.user_suffix]
        elif m["role"] == "assistant":
            out += [p.assistant_prefix, m["content"], "" if last else p.assistant_suffix]
        if last and m["role"] != "assistant":
            out.append(p.generation_prompt)
    return "".join(out)


CHECK_CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "system", "content": "You answer in German."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Hallo"}, {"role": "user", "content": "Thanks"}],
]


def check_go_template(tok: Any, template: str, p: TemplatePieces) -> None:
    """Raise unless the Go template renders every check conversation exactly as the Jinja one
    (each ends with a user turn: Ollama renders the prompt up to the generation prompt)."""
    for conv in CHECK_CONVERSATIONS:
        want = _render(tok, template, conv, True)
        got = render_like_go(p, conv)
        if want != got:
            raise ChatsmithError(
                "the chat template is not a plain sequence of role blocks (it changes turns by position or content), "
                f"so a Go TEMPLATE cannot reproduce it: for {[m['role'] for m in conv]} Jinja renders {want!r} but "
                f"the Go template would render {got!r}. Train and export with --template chatml for Ollama")


def stop_strings(tok: Any, end_of_turn: str | None, p: TemplatePieces) -> list[str]:
    """PARAMETER stop lines: the end-of-turn string, EOS, and the special token that opens a user turn."""
    stops = [s for s in (end_of_turn, tok.eos_token) if s]
    specials = set(getattr(tok, "all_special_tokens", []) or [])
    opener = next((s for s in sorted(specials, key=len, reverse=True) if s and p.user_prefix.startswith(s)), None)
    if opener:
        stops.append(opener)
    return list(dict.fromkeys(stops))


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise ChatsmithError(f'the {what} contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(gguf_name: str, tok: Any, template: str, end_of_turn: str | None, system_prompt: str | None,
              source: str = "") -> str:
    """The Modelfile text for a GGUF that sits beside it."""
    p = template_pieces(tok, template)
    check_go_template(tok, template, p)
    lines = [f"# Written by `chatsmith export {source} --to ollama`: the TEMPLATE and stop lines come from the",
             "# chat template the model was trained with (checked against it on several conversations).",
             f"FROM ./{gguf_name}", "", "TEMPLATE " + _quoted(go_template(p), "chat template")]
    if system_prompt:
        lines += ["", "SYSTEM " + _quoted(system_prompt, "system prompt")]
    lines.append("")
    lines += [f'PARAMETER stop "{s}"' for s in stop_strings(tok, end_of_turn, p)]
    return "\n".join(lines) + "\n"


def write_modelfile(directory: Path, gguf_path: Path, src: Any) -> Path:
    path = directory / "Modelfile"
    path.write_text(modelfile(gguf_path.name, src.tokenizer, src.template, src.end_of_turn, src.system_prompt,
                              source=src.spec))
    return path
