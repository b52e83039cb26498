"""Tool calling and strict structured output served over real HTTP (uvicorn in a thread) on
tiny-random-llama, through the official openai client: a full tool loop, streamed calls (whole,
valid arguments; empty-argument calls kept: vllm #10395, #9693, #28806), tool_choice forcing,
json_schema strict, and the 400s of bad tool definitions and histories."""

from __future__ import annotations

import json

import httpx
import jsonschema_rs
import pytest

from chatsmith.serve.app import ServerState, ServerThread, load_state

MODEL = "tiny-random-llama"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit"]}}}
NOW = {"type": "function", "function": {"name": "now", "description": "The current time"}}   # no parameters
TOOLS = [WEATHER, NOW]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server():
    state = ServerState(MODEL)
    with ServerThread(state) as url:
        load_state(state, MODEL, precision="module", max_concurrency=4, kv_cache_mb=4 * 1024 * 512 / 2**20,
                   max_queue=16)
        assert state.load_error is None
        yield url, state
        state.engine.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


def _valid_arguments(call, tool):
    args = json.loads(call.function.arguments)
    jsonschema_rs.validate(tool["function"].get("parameters", {"type": "object"}), args)
    return args


def _prompt_tokens(state, messages, tools):
    from chatsmith.data.conversation import Conversation, Message
    from chatsmith.data.template import render_conversation
    from chatsmith.data.tools import normalize_tools, parse_arguments

    msgs = []
    for m in messages:
        calls = [{"id": c["id"], "name": c["function"]["name"], "arguments": parse_arguments(
            c["function"]["arguments"], "x")} for c in m.get("tool_calls", [])]
        msgs.append(Message(m["role"], m.get("content") or "", tool_calls=calls or None,
                            tool_call_id=m.get("tool_call_id")))
    conv = Conversation(msgs, tools=normalize_tools(tools) if tools else None)
    return len(render_conversation(state.tokenizer, conv, add_generation_prompt=True).input_ids)


def test_tool_loop_forced_call_result_and_answer(server, client):
    _, state = server
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=80,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = _valid_arguments(call, WEATHER)
    # the prompt offered the tools in the fallback format (the tiny model's template ignores tools=)
    assert r.usage.prompt_tokens == _prompt_tokens(state, ASK, TOOLS) > _prompt_tokens(state, ASK, None) + 50

    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, **args})}]
    final = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0, max_tokens=6,
                                           tool_choice="none")
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.tool_calls is None
    # "none" offers no tools; the call and its result are in the prompt as the fallback renders them
    assert final.usage.prompt_tokens == _prompt_tokens(state, history, None)


def test_streamed_calls_arrive_whole_and_equal_the_answer(client):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=120, tool_choice="required",
              parallel_tool_calls=False)
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    # each call arrives in one delta: id, type, name and its complete arguments (valid JSON on its own)
    assert len(deltas) == len(whole.message.tool_calls) == 1
    d = deltas[0]
    assert d.index == 0 and d.id and d.type == "function" and d.function.name == whole.message.tool_calls[0].function.name
    assert json.loads(d.function.arguments) == json.loads(whole.message.tool_calls[0].function.arguments)
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason == "tool_calls"
    assert chunks[0].choices[0].delta.role == "assistant"


def test_empty_argument_call_is_kept_streamed_and_not(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "What time is it?"}], tools=TOOLS, temperature=0,
              max_tokens=40, tool_choice={"type": "function", "function": {"name": "now"}})
    r = client.chat.completions.create(**kw)
    [call] = r.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments, r.choices[0].finish_reason) == ("now", "{}", "tool_calls")
    deltas = [tc for c in client.chat.completions.create(**kw, stream=True) if c.choices
              for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [("now", "{}")]


def test_required_with_parallel_calls_all_valid(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0.9, seed=3,
                                       max_tokens=100, tool_choice="required", n=2)
    for choice in r.choices:
        calls = choice.message.tool_calls
        assert calls, choice
        for c in calls:
            _valid_arguments(c, {t["function"]["name"]: t for t in TOOLS}[c.function.name])
        assert len({c.id for c in calls}) == len(calls)


def test_json_schema_strict(client):
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"type": "string", "enum": ["cat", "dog"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "owner": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Oslo", "Lima"]},
                                                   "verified": {"type": "boolean"}},
                  "required": ["city", "verified"]},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3}},
        "required": ["name", "kind", "age", "owner", "tags"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, "strict": True}}
    for stream in (False, True):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": "A pet, as JSON."}], max_tokens=150,
                  temperature=1.0, seed=7, response_format=fmt)
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                           if c.choices)
        else:
            r = client.chat.completions.create(**kw)
            assert r.choices[0].finish_reason == "stop"
            text = r.choices[0].message.content
        value = json.loads(text)
        jsonschema_rs.validate({**schema, "additionalProperties": False}, value)
        assert set(value["owner"]) == {"city", "verified"}   # strict: nothing beyond the properties


@pytest.mark.parametrize("change, param, words", [
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools[0].function.name", "pattern"),
    ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools[0].function.name", "required"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "function"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}]}, "tools[1].function.parameters", "strin"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters.type", "object"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "twice"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "search"}}},
     "tool_choice.function.name", "no tool named 'search'"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "auto"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{city: Paris}"}}]}]},
     "messages[1].tool_calls[0].function.arguments", "not JSON"),
    ({"messages": ASK + [{"role": "tool", "tool_call_id": "c9", "content": "18C"}]}, "messages[1].tool_call_id",
     "answers no earlier tool call"),
    ({"messages": ASK + [{"role": "tool", "content": "18C"}]}, "messages[1].tool_call_id", "required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"d": {"type": "string", "format": "weird"}}}}}},
     "response_format.json_schema.schema", "weird"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
])
def test_bad_tools_and_histories_get_400_naming_the_field(server, change, param, words):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, **change}
    r = httpx.post(f"{server[0]}/v1/chat/completions", json=body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and words in err["message"], err
