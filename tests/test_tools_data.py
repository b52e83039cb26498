"""Tool-calling data: OpenAI and LLaMA-Factory records read unchanged (with located errors), rendered
through a template's own `tools=` support or the fallback format with an exact loss mask, and the
parser that reads calls back out of generated text, piece by piece as streamed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import trained_segments

from chatsmith.data.conversation import Conversation, Message
from chatsmith.data.formats import read_conversations
from chatsmith.data.template import render_conversation
from chatsmith.data.tools import ToolCallStream, normalize_tools, parse_tool_calls, validate_call
from chatsmith.data.writers import write_conversations
from chatsmith.errors import DataError

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
OPENAI_RECORD = {"tools": [WEATHER], "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "18C, sunny"},
    {"role": "assistant", "content": "It is 18C and sunny in Paris."}]}
# LLaMA-Factory's ShareGPT tool format: function_call/observation turns and `tools` as a JSON string
LF_RECORD = {"system": "You are a weather bot.", "tools": json.dumps([WEATHER["function"]]), "conversations": [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"},
    {"from": "observation", "value": "18C, sunny"},
    {"from": "gpt", "value": "It is 18C and sunny in Paris."}]}


def write(path: Path, records: list) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("record", [OPENAI_RECORD, LF_RECORD], ids=["openai", "llama-factory"])
def test_records_read_and_render_in_the_fallback_format_with_an_exact_mask(tmp_path, tokenizer, record):
    (conv,) = read_conversations(write(tmp_path / "t.jsonl", [record])).conversations
    assert conv.tools == normalize_tools([WEATHER]) and "tools" not in conv.meta
    call = conv.messages[-3]
    assert call.tool_calls == [{"id": "c1" if "messages" in record else None, "name": "get_weather",
                                "arguments": {"city": "Paris"}}] and call.content == ""
    r = render_conversation(tokenizer, conv)
    system = "You are a weather bot.\n\n" if "system" in record else ""
    tools_line = json.dumps(normalize_tools([WEATHER])[0])
    assert r.text == (
        f"<|im_start|>system\n{system}# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools_line}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
        "XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        f"<|im_start|>assistant\n{CALL}<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18C, sunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nIt is 18C and sunny in Paris.<|im_end|>\n")
    # the mask: the call and the answer, each with its end of turn; never the tool's result
    assert trained_segments(tokenizer, r) == [f"{CALL}<|im_end|>", "It is 18C and sunny in Paris.<|im_end|>"]


def test_parallel_calls_and_consecutive_results(tokenizer):
    calls = [{"id": "a", "name": "get_weather", "arguments": {"city": "Paris"}},
             {"id": "b", "name": "get_weather", "arguments": {"city": "Oslo"}}]
    conv = Conversation([Message("user", "Paris and Oslo?"), Message("assistant", "Checking.", tool_calls=calls),
                         Message("tool", "18C", tool_call_id="a"), Message("tool", "3C", tool_call_id="b"),
                         Message("assistant", "18C and 3C.")], tools=normalize_tools([WEATHER]))
    r = render_conversation(tokenizer, conv)
    oslo = CALL.replace("Paris", "Oslo")
    assert trained_segments(tokenizer, r) == [f"Checking.\n{CALL}\n{oslo}<|im_end|>", "18C and 3C.<|im_end|>"]
    assert "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n3C\n</tool_response><|im_end|>" \
        in r.text


# A template with tool support of its own, as Qwen2.5's and Hermes' (shortened): tools in the system
# turn, calls as <tool_call> JSON of a *mapping* of arguments, results in a user turn.
NATIVE = (
    "{%- if tools %}{{ '<|im_start|>system\\nTOOLS:' }}{%- for t in tools %}{{ ' ' + t.function.name }}{%- endfor %}"
    "{{ '<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{%- if m.role == 'tool' %}{{ '<|im_start|>user\\n[result] ' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.tool_calls %}{{ '<|im_start|>assistant\\n' }}{%- for c in m.tool_calls %}"
    "{{ 'CALL ' + c.function.name + ' ' + (c.function.arguments | tojson) }}{%- endfor %}{{ '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")


def test_a_template_with_tool_support_renders_them_itself(tmp_path, tokenizer):
    (conv,) = read_conversations(write(tmp_path / "t.jsonl", [OPENAI_RECORD])).conversations
    r = render_conversation(tokenizer, conv, template=NATIVE)
    assert r.text.startswith("<|im_start|>system\nTOOLS: get_weather<|im_end|>\n")
    assert trained_segments(tokenizer, r) == ['CALL get_weather {"city": "Paris"}<|im_end|>',
                                              "It is 18C and sunny in Paris.<|im_end|>"]   # arguments: a dict
    assert "[result] 18C, sunny" in r.text


@pytest.mark.parametrize("record, where", [
    ({**OPENAI_RECORD, "messages": [OPENAI_RECORD["messages"][0], {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris}"}}]}]},
     "line 1, field 'messages[1].tool_calls[0].function.arguments': is not JSON"),
    ({**OPENAI_RECORD, "messages": [OPENAI_RECORD["messages"][0], {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "search", "arguments": "{}"}}]}]},
     "line 1, field 'messages[1].tool_calls[0].function.name': calls 'search', which is not in tools"),
    ({**LF_RECORD, "conversations": [LF_RECORD["conversations"][0], {"from": "function_call", "value": "get_weather(Paris)"}]},
     "line 1, field 'conversations[1].value': a function_call turn holds JSON"),
    ({**LF_RECORD, "conversations": [LF_RECORD["conversations"][0],
                                     {"from": "function_call", "value": "{\"name\": \"search\", \"arguments\": {}}"}]},
     "line 1, field 'conversations[1].value.name': calls 'search', which is not in tools"),
    ({**LF_RECORD, "tools": "[{\"name\": \"get weather\"}]"}, "line 1, field 'tools[0].name': must be 1 to 64"),
    ({**LF_RECORD, "tools": "[{name: x}]"}, "line 1, field 'tools': is a string but not JSON"),
])
def test_malformed_calls_and_tools_are_located(tmp_path, record, where):
    with pytest.raises(DataError) as e:
        read_conversations(write(tmp_path / "bad.jsonl", [record]))
    assert where in str(e.value), str(e.value)


PIECES = ("Let me check.\n" + CALL + "\n" + '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')


@pytest.mark.parametrize("text, content, calls", [
    (CALL, None, [("get_weather", {"city": "Paris"})]),
    (PIECES, "Let me check.", [("get_weather", {"city": "Paris"}), ("now", {})]),   # an empty-argument call is kept
    # and a call after an empty-argument one keeps its arguments (vllm #47901)
    ('<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\n' + CALL, None,
     [("now", {}), ("get_weather", {"city": "Paris"})]),
    # braces and tags inside argument strings (vllm #9693): the arguments stay whole
    ('<tool_call>\n{"name": "now", "arguments": {"q": "} </tool_call"}}\n</tool_call>', None, [("now", {"q": "} </tool_call"})]),
    ('<tool_call>{"name": "now", "arguments": "{\\"a\\": [1, {}]}"}</tool_call>', None, [("now", {"a": [1, {}]})]),
    ('Hello <tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}', "Hello",   # unclosed at the end
     [("get_weather", {"city": "Lima"})]),
    ('<tool_call>{"name": "search", "arguments": {}}</tool_call>', '<tool_call>{"name": "search", "arguments": {}}</tool_call>',
     []),   # not an offered tool: it stays text
    ("<tool_call>{not json}</tool_call> ok", "<tool_call>{not json}</tool_call> ok", []),
    ("Plain answer with a < sign and <tool_ in it.\n", "Plain answer with a < sign and <tool_ in it.\n", []),
])
def test_parser_whole_and_streamed_at_every_split(text, content, calls):
    names = ["get_weather", "now"]
    parsed = parse_tool_calls(text, names)
    assert parsed.content == content and [(c["name"], c["arguments"]) for c in parsed.calls] == calls
    for cut in range(len(text) + 1):   # two pieces, split anywhere, and one character at a time
        for pieces in ([text[:cut], text[cut:]], list(text) if cut == 0 else []):
            if not pieces:
                continue
            s = ToolCallStream(names)
            events = [e for p in pieces for e in s.push(p)] + s.finish()
            got = "".join(v for k, v in events if k == "content") or None
            assert got == content and [(v["name"], v["arguments"]) for k, v in events if k == "call"] == calls


def test_parallel_false_keeps_the_first_call_and_validation_names_the_problem():
    assert [c["name"] for c in parse_tool_calls(PIECES, ["get_weather", "now"], parallel=False).calls] == ["get_weather"]
    tools = normalize_tools([WEATHER])
    assert validate_call({"name": "get_weather", "arguments": {"city": "Paris"}}, tools) is None
    assert "missing required 'city'" in validate_call({"name": "get_weather", "arguments": {}}, tools)
    assert "not of type string" in validate_call({"name": "get_weather", "arguments": {"city": 3}}, tools)
    assert "no tool named" in validate_call({"name": "x", "arguments": {}}, tools)


@pytest.mark.parametrize("to", ["messages", "sharegpt"])
def test_tool_conversations_survive_conversion(tmp_path, tokenizer, to):
    (conv,) = read_conversations(write(tmp_path / "t.jsonl", [OPENAI_RECORD])).conversations
    write_conversations([conv], str(tmp_path / "out.jsonl"), to)
    (back,) = read_conversations(str(tmp_path / "out.jsonl")).conversations
    assert back.tools == conv.tools
    assert render_conversation(tokenizer, back).text == render_conversation(tokenizer, conv).text
