"""Tool calling in the data: tool definitions, assistant tool calls and tool results, their
rendering through a chat template, and the parser that reads calls back out of a model's text.

The shapes (OpenAI's): a conversation may carry `tools`, a list of
``{"type": "function", "function": {"name", "description", "parameters"}}`` (LLaMA-Factory's bare
``{"name", "description", "parameters"}`` is accepted too); an assistant message may carry
`tool_calls`, kept here as ``[{"id", "name", "arguments"}]`` with `arguments` a dict (the OpenAI
API and most datasets send a JSON string: it is parsed on the way in, because templates such as
Qwen2.5's and Llama 3.1's expect a mapping); a tool message answers one call (`tool_call_id`).

Rendering (`template_messages`): a template that renders `tools=` and `tool_calls` itself (found by
probing it) gets them as transformers' `apply_chat_template` passes them. A template that ignores
them (SmolLM2's, the embedded model's, and every named fallback template) gets the documented
fallback format instead, Hermes/Qwen2.5 style (docs/tools.md):

- the tool list goes into the system message, inside ``<tools></tools>``, one JSON object a line,
  with the instruction to answer with ``<tool_call>{json}</tool_call>`` blocks;
- an assistant's calls become text: its content, then one block per call,
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, joined by newlines;
- tool results become a user message of ``<tool_response>\\n...\\n</tool_response>`` blocks
  (consecutive results in one message), so every template, even one that knows only user and
  assistant turns, renders them, and the loss mask never covers them.

Parsing (`parse_tool_calls`, `ToolCallStream`): the same blocks are read back from generated text;
a block that does not parse, or names a tool that is not offered, stays in the content as text.
The streaming parser gives each call whole (its arguments one complete JSON string), never a
fragment, and a call with empty arguments (`{}`) is a call like any other.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from chatsmith.errors import ChatsmithError

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")   # OpenAI's rule for function names

FALLBACK_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>"
)


class ToolError(ChatsmithError):
    """A malformed tool definition, call or result; `field` is the path of the bad value."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.reason = field, message


# ---- definitions, calls and results on the way in ----------------------------------------------

def normalize_tools(tools: Any, where: str = "tools") -> list[dict[str, Any]]:
    """A tool list (OpenAI `[{type: function, function: {...}}]`, LLaMA-Factory's bare function
    objects, or either as a JSON string) -> OpenAI's shape, each `parameters` a JSON-schema object.
    Raises ToolError naming the bad field (`tools[1].function.name`)."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else []
        except json.JSONDecodeError as e:
            raise ToolError(f"is a string but not JSON ({e.msg} at character {e.pos}); send a list of "
                            "function definitions", where) from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise ToolError(f"must be a list of function definitions, got {type(tools).__name__}", where)
    out, seen = [], set()
    for i, tool in enumerate(tools):
        at = f"{where}[{i}]"
        if not isinstance(tool, dict):
            raise ToolError(f"must be an object {{type: 'function', function: {{name, parameters}}}}, got "
                            f"{type(tool).__name__}", at)
        if "function" in tool:
            if tool.get("type", "function") != "function":
                raise ToolError(f"only 'function' tools are supported, got {tool.get('type')!r}", f"{at}.type")
            fn, at = tool["function"], f"{at}.function"
            if not isinstance(fn, dict):
                raise ToolError("must be an object {name, description, parameters}", at)
        else:
            fn = tool
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ToolError(f"must be 1 to 64 letters, digits, '_' or '-', got {name!r}", f"{at}.name")
        if name in seen:
            raise ToolError(f"'{name}' is defined twice; tool names must be unique", f"{at}.name")
        seen.add(name)
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ToolError(f"must be text, got {type(desc).__name__}", f"{at}.description")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ToolError(f"must be a JSON schema object, got {type(params).__name__}", f"{at}.parameters")
        if params.get("type", "object") != "object":
            raise ToolError(f"must describe an object (type 'object'), got type {params.get('type')!r}",
                            f"{at}.parameters.type")
        clean: dict[str, Any] = {"name": name}
        if desc is not None:
            clean["description"] = desc
        clean["parameters"] = params
        if fn.get("strict") is not None:
            clean["strict"] = bool(fn["strict"])
        out.append({"type": "function", "function": clean})
    return out


def tool_names(tools: list[dict[str, Any]] | None) -> list[str]:
    """The function names of a normalized tool list."""
    return [t["function"]["name"] for t in tools or []]


def parse_arguments(raw: Any, where: str) -> dict[str, Any]:
    """A call's arguments (a JSON string, as OpenAI sends them, or already a mapping) -> a dict."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ToolError(f"is not JSON ({e.msg} at character {e.pos}); arguments are a JSON object "
                            "encoded as a string, e.g. '{\"city\": \"Paris\"}'", where) from None
    if not isinstance(raw, dict):
        raise ToolError(f"must be a JSON object, got {type(raw).__name__}", where)
    return raw


def normalize_calls(calls: Any, where: str, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Tool calls (OpenAI `[{id, type, function: {name, arguments}}]`, or LLaMA-Factory's
    `{name, arguments}` objects, one or a list) -> `[{id, name, arguments: dict}]`. With `names`,
    a call to a tool that is not among them is an error."""
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise ToolError("must be a non-empty list of tool calls", where)
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]" if len(calls) > 1 or where.endswith("tool_calls") else where
        if not isinstance(call, dict):
            raise ToolError(f"must be an object {{name, arguments}}, got {type(call).__name__}", at)
        fn, fat = (call["function"], f"{at}.function") if "function" in call else (call, at)
        if not isinstance(fn, dict):
            raise ToolError("must be an object {name, arguments}", fat)
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ToolError(f"missing the tool's name, got {name!r}", f"{fat}.name")
        if names is not None and name not in names:
            offered = ", ".join(names) if names else "none (the record has no 'tools')"
            raise ToolError(f"calls '{name}', which is not in tools (offered: {offered})", f"{fat}.name")
        key = "arguments" if "arguments" in fn else "parameters" if "parameters" in fn else "arguments"
        cid = call.get("id")
        out.append({"id": cid if isinstance(cid, str) and cid else None, "name": name,
                    "arguments": parse_arguments(fn.get(key), f"{fat}.{key}")})
    return out


def new_call_id() -> str:
    """A fresh tool-call id in OpenAI's style."""
    return "call_" + uuid.uuid4().hex[:24]


def call_json(call: dict[str, Any]) -> str:
    """One call as the fallback format writes it: {"name": ..., "arguments": {...}}."""
    return json.dumps({"name": call["name"], "arguments": call["arguments"]}, ensure_ascii=False)


def call_block(call: dict[str, Any]) -> str:
    """One call as a <tool_call> block of the fallback format."""
    return f"{TOOL_CALL_OPEN}\n{call_json(call)}\n{TOOL_CALL_CLOSE}"


def openai_call(call: dict[str, Any]) -> dict[str, Any]:
    """An internal call as the OpenAI API returns it (arguments a JSON string)."""
    return {"id": call.get("id") or new_call_id(), "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


# ---- rendering ---------------------------------------------------------------------------------

_PROBE_TOOL = {"type": "function", "function": {"name": "chatsmith_probe_tool", "description": "probe",
                                                 "parameters": {"type": "object", "properties": {}}}}
_NATIVE: dict[tuple[int, str], bool] = {}


def template_renders_tools(tokenizer: Any, source: str) -> bool:
    """Whether a Jinja chat template renders `tools=` and assistant `tool_calls` itself (probed once
    per tokenizer and template): the tool's name must appear in both renderings."""
    key = (id(tokenizer), source)
    if key not in _NATIVE:
        name = _PROBE_TOOL["function"]["name"]
        user = [{"role": "user", "content": "hi"}]
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_probe", "type": "function", "function": {"name": name, "arguments": {}}}]}
        try:
            with_tools = tokenizer.apply_chat_template(user, tools=[_PROBE_TOOL], chat_template=source,
                                                       tokenize=False, add_generation_prompt=True)
            calls = tokenizer.apply_chat_template(user + [call], chat_template=source, tokenize=False)
            _NATIVE[key] = name in with_tools and name in calls
        except Exception:   # a template that refuses tools or tool_calls has no tool support
            _NATIVE[key] = False
    return _NATIVE[key]


@dataclass
class TemplateInput:
    """What the renderer passes to the template: messages as Message objects (roles and training
    flags, after the fallback's rewriting), their dicts, and `tools` for `apply_chat_template`."""
    messages: list[Any]
    dicts: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = field(default=None)


def fallback_system(tools: list[dict[str, Any]]) -> str:
    """The system-prompt block that lists the tools in the fallback format."""
    return FALLBACK_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def template_messages(tokenizer: Any, source: str, messages: list[Any],
                      tools: list[dict[str, Any]] | None) -> TemplateInput:
    """The messages (chatsmith.data.conversation.Message) as the template gets them: natively when
    the template renders tools, else rewritten into the fallback format (module docstring)."""
    from chatsmith.data.conversation import Message

    uses_tools = bool(tools) or any(m.tool_calls or m.role == "tool" for m in messages)
    if not uses_tools:
        return TemplateInput(messages, [{"role": m.role, "content": m.content} for m in messages])
    if template_renders_tools(tokenizer, source):
        names = {c["id"]: c["name"] for m in messages for c in (m.tool_calls or []) if c.get("id")}
        dicts = []
        for m in messages:
            d: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.tool_calls:
                d["tool_calls"] = [{"id": c.get("id") or f"call_{k}", "type": "function",
                                    "function": {"name": c["name"], "arguments": c["arguments"]}}
                                   for k, c in enumerate(m.tool_calls)]
            if m.role == "tool":
                d["tool_call_id"] = m.tool_call_id
                if m.tool_call_id in names:
                    d["name"] = names[m.tool_call_id]
            dicts.append(d)
        return TemplateInput(messages, dicts, tools or None)
    out: list[Any] = []
    if tools:
        block = fallback_system(tools)
        if messages and messages[0].role == "system":
            first = messages[0]
            out.append(Message("system", f"{first.content}\n\n{block}" if first.content else block, first.train))
            messages = messages[1:]
        else:
            out.append(Message("system", block))
    results: Any = None   # the user message that holds the tool results just before, if any
    for m in messages:
        if m.role == "tool":
            response = f"{TOOL_RESPONSE_OPEN}\n{m.content}\n{TOOL_RESPONSE_CLOSE}"
            if results is not None:
                results.content += "\n" + response
            else:
                results = Message("user", response, False)
                out.append(results)
            continue
        results = None
        if m.tool_calls:
            text = "\n".join(call_block(c) for c in m.tool_calls)
            out.append(Message(m.role, f"{m.content}\n{text}" if m.content else text, m.train))
        else:
            out.append(m)
    return TemplateInput(out, [{"role": m.role, "content": m.content} for m in out])


# ---- parsing a model's output ------------------------------------------------------------------

def _as_call(block: str, names: list[str] | None) -> dict[str, Any] | None:
    """A <tool_call> block's inside -> {id, name, arguments}, or None when it is not a call to an offered tool."""
    try:
        obj = json.loads(block)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if names is not None and obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": new_call_id(), "name": obj["name"], "arguments": args}


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `tag` (it may still become the tag)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class ToolCallStream:
    """Split generated text into content and tool calls as it arrives.

    `push(text)` and `finish()` return events: ("content", text) and ("call", {id, name, arguments}).
    Text that may be the start of a <tool_call> tag is held back; a call is given whole once its
    block closes (or at the end, when the model stopped before closing a block that parses).
    Whitespace right before a call or right after one is dropped, so an answer of calls only has
    no content. With `parallel` False, calls after the first are dropped.
    """

    def __init__(self, names: list[str] | None = None, parallel: bool = True) -> None:
        self.names, self.parallel = names, parallel
        self.pending = ""          # text not yet given out
        self.inside = False        # within a <tool_call> block
        self.after_call = False    # the last thing given out was a call (drop the whitespace after it)
        self.calls = 0

    def _content(self, text: str, events: list[tuple[str, Any]]) -> None:
        if self.after_call:
            text = text.lstrip()
            if not text:
                return
            self.after_call = False
        if text:
            events.append(("content", text))

    def push(self, text: str) -> list[tuple[str, Any]]:
        """Feed generated text; the events it completes."""
        self.pending += text
        events: list[tuple[str, Any]] = []
        while self.pending:
            if not self.inside:
                i = self.pending.find(TOOL_CALL_OPEN)
                if i < 0:
                    # Hold back what may begin the tag, and trailing whitespace (it may precede a call).
                    keep = _partial_suffix(self.pending, TOOL_CALL_OPEN)
                    body = self.pending[:len(self.pending) - keep]
                    stripped = body.rstrip()
                    if self.after_call and not stripped:
                        self.pending = self.pending[len(body):]
                        break
                    self._content(stripped, events)
                    self.pending = self.pending[len(stripped):]
                    break
                self._content(self.pending[:i].rstrip(), events)
                self.pending = self.pending[i + len(TOOL_CALL_OPEN):]
                self.inside = True
            else:
                j = self.pending.find(TOOL_CALL_CLOSE)
                if j < 0:
                    break
                block, self.pending = self.pending[:j], self.pending[j + len(TOOL_CALL_CLOSE):]
                self.inside = False
                self._block(block, True, events)
        return events

    def _block(self, block: str, closed: bool, events: list[tuple[str, Any]]) -> None:
        call = _as_call(block.strip(), self.names)
        if call is None:   # not a call: it stays in the content, as written
            self._content(TOOL_CALL_OPEN + block + (TOOL_CALL_CLOSE if closed else ""), events)
            return
        if self.parallel or self.calls == 0:
            events.append(("call", call))
        self.calls += 1
        self.after_call = True

    def finish(self) -> list[tuple[str, Any]]:
        """The events left at the end of the text (an unclosed block that parses is a call)."""
        events: list[tuple[str, Any]] = []
        if self.inside:
            self._block(self.pending, False, events)
        elif self.pending.strip() or not self.after_call:
            self._content(self.pending, events)
        self.pending, self.inside = "", False
        return events


@dataclass
class ParsedOutput:
    """A model's answer split into its text (None when it holds only calls) and its tool calls."""
    content: str | None
    calls: list[dict[str, Any]]


def parse_tool_calls(text: str, names: list[str] | None = None, parallel: bool = True) -> ParsedOutput:
    """Generated text -> content and calls; the same split as `ToolCallStream` gives piece by piece."""
    stream = ToolCallStream(names, parallel)
    events = stream.push(text) + stream.finish()
    content = "".join(e[1] for e in events if e[0] == "content")
    return ParsedOutput(content or None, [e[1] for e in events if e[0] == "call"])


def validate_call(call: dict[str, Any], tools: list[dict[str, Any]]) -> str | None:
    """Why a parsed call does not fit its tool's parameter schema (None when it does): an unknown
    tool, a missing required argument, an argument the schema does not list, or a value of the
    wrong type or outside its enum. Checks the schema features tool definitions use."""
    fn = next((t["function"] for t in tools if t["function"]["name"] == call["name"]), None)
    if fn is None:
        return f"no tool named '{call['name']}'"
    return _schema_error(call["arguments"], fn.get("parameters") or {"type": "object"}, "arguments")


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _schema_error(value: Any, schema: dict[str, Any], at: str) -> str | None:
    if "enum" in schema and value not in schema["enum"]:
        return f"{at}: {value!r} is not one of {schema['enum']}"
    if "const" in schema and value != schema["const"]:
        return f"{at}: {value!r} is not {schema['const']!r}"
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)

        def fits(k: str) -> bool:
            if k == "integer":
                return isinstance(value, int) and not isinstance(value, bool)
            if k == "number":
                return isinstance(value, (int, float)) and not isinstance(value, bool)
            return isinstance(value, _TYPES.get(k, object)) and not (k != "boolean" and isinstance(value, bool))
        if not any(fits(k) for k in kinds):
            return f"{at}: {value!r} is not of type {'/'.join(kinds)}"
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for r in schema.get("required", []):
            if r not in value:
                return f"{at}: missing required '{r}'"
        for k, v in value.items():
            if k in props:
                err = _schema_error(v, props[k], f"{at}.{k}")
                if err:
                    return err
            elif schema.get("additionalProperties") is False or (props and "additionalProperties" not in schema):
                return f"{at}: '{k}' is not a parameter of this tool"
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            err = _schema_error(v, schema["items"], f"{at}[{i}]")
            if err:
                return err
    return None


def sharegpt_calls(calls: list[dict[str, Any]]) -> str:
    """Calls as a LLaMA-Factory `function_call` turn's value: one {"name", "arguments"} object, or a list."""
    objs = [{"name": c["name"], "arguments": c["arguments"]} for c in calls]
    return json.dumps(objs[0] if len(objs) == 1 else objs, ensure_ascii=False)
