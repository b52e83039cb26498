"""What a chat request's `tools`, `tool_choice`, `parallel_tool_calls` and `response_format` mean
for its generation: the tools its prompt offers, the constraint each choice is generated under,
and how its text is read back (content and `tool_calls`). Every problem is a 400 naming the field.

- no `tools`: plain generation (`tool_choice` is then an error, as in OpenAI's API);
- `tool_choice` "none": the tools are not offered and the answer is text;
- "auto" (the default with tools): the tools are offered and the answer is parsed for calls;
- "required" or a named function: the answer is constrained to tool calls (of that function) whose
  arguments are valid JSON for its parameter schema (chatsmith/infer/constraints.py);
- `response_format` json_object (the character automaton) or json_schema (a grammar; `strict`
  adds `additionalProperties: false` where a schema leaves it open).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chatsmith.serve.schemas import APIError


@dataclass
class ToolParsing:
    """How a chat answer is read back: the names of the offered tools and whether several calls are kept."""
    names: list[str]
    parallel: bool = True


@dataclass
class ToolPlan:
    """A request's tools as the prompt offers them, a factory of one constraint per choice (or None),
    the parser of its answers (or None), and whether its answer may be cached."""
    prompt_tools: list[dict[str, Any]] | None = None
    constraint: Any = None
    parser: ToolParsing | None = None
    uncacheable: bool = False


def tool_plan(state: Any, body: Any) -> ToolPlan:
    """The ToolPlan of a chat completion request (compiling grammars: run it in a worker thread)."""
    try:
        return _plan(state, body)
    except RecursionError:
        raise APIError(400, "a schema in 'tools' or 'response_format' is nested too deeply") from None


def _plan(state: Any, body: Any) -> ToolPlan:
    from chatsmith.data.tools import ToolError, normalize_tools
    from chatsmith.infer.constraints import (
        GrammarConstraint,
        GrammarError,
        JsonObjectConstraint,
        ll_tokenizer,
    )

    plan = ToolPlan()
    tok, stops = state.tokenizer, frozenset(state.engine.stop_default)
    choice = body.tool_choice
    if body.tools is None and choice is not None and choice != "none":
        raise APIError(400, "field 'tool_choice': needs 'tools' (the functions the model may call)", param="tool_choice")
    grammar = None
    if body.tools:
        plan.uncacheable = True
        raw = [t.model_dump(exclude_none=True) for t in body.tools]
        try:
            tools = normalize_tools(raw)
        except ToolError as e:
            raise APIError(400, f"field '{e.field}': {e.reason}", param=e.field) from None
        for i in range(len(tools)):   # each parameter schema must compile (a 400 now, not a failure later)
            try:
                _tool_grammar(tools[i:i + 1], None, False)
            except GrammarError as e:
                at = f"tools[{i}].function.parameters"
                raise APIError(400, f"field '{at}': not a JSON schema chatsmith can constrain to ({e})",
                               param=at) from None
        if choice != "none":
            plan.prompt_tools = tools
            plan.parser = ToolParsing([t["function"]["name"] for t in tools], body.parallel_tool_calls)
            if choice == "required":
                grammar = _tool_grammar(tools, None, body.parallel_tool_calls)
            elif choice not in (None, "auto"):
                name = choice.function.name
                if name not in plan.parser.names:
                    raise APIError(400, f"field 'tool_choice.function.name': no tool named '{name}' in 'tools' "
                                   f"(offered: {', '.join(plan.parser.names)})", param="tool_choice.function.name")
                grammar = _tool_grammar(tools, name, False)
    fmt = body.response_format
    if fmt is not None and fmt.type != "text":
        plan.uncacheable = plan.uncacheable or fmt.type == "json_schema"
        if grammar is not None:
            raise APIError(400, "field 'response_format': a JSON response format cannot be combined with "
                           "'tool_choice' required or named (the answer is then tool calls)", param="response_format")
        if fmt.type == "json_object":
            plan.constraint = lambda: JsonObjectConstraint(tok)
            return plan
        if fmt.json_schema is None:
            raise APIError(400, "field 'response_format.json_schema': required with type 'json_schema' "
                           "({name, schema, strict})", param="response_format.json_schema")
        schema = fmt.json_schema.schema_
        if fmt.json_schema.strict:
            from chatsmith.infer.constraints import strict_schema

            schema = strict_schema(schema)
        try:
            grammar = _schema_grammar(schema)
        except GrammarError as e:
            at = "response_format.json_schema.schema"
            raise APIError(400, f"field '{at}': not a JSON schema chatsmith can constrain to ({e})", param=at) from None
    if grammar is not None:
        ll_tokenizer(tok)   # built once per tokenizer (half a second), here in a worker thread, not on the event loop
        plan.constraint = lambda: GrammarConstraint(tok, grammar, stops)
    return plan


def _tool_grammar(tools: list[dict[str, Any]], name: str | None, parallel: bool) -> str:
    from chatsmith.infer.constraints import tool_call_grammar

    return tool_call_grammar(tools, name, parallel)


def _schema_grammar(schema: Any) -> str:
    from chatsmith.infer.constraints import json_schema_grammar

    return json_schema_grammar(schema)


def history_message(m: Any, i: int, role: str, content: str, call_ids: set[str]) -> Any:
    """A request's assistant message with `tool_calls`, or tool message, as a Message (arguments
    parsed into a dict); `call_ids` collects the calls' ids so a tool message must answer one."""
    from chatsmith.data.conversation import Message
    from chatsmith.data.tools import ToolError, parse_arguments

    at = f"messages[{i}]"
    if m.tool_calls:
        if role != "assistant":
            raise APIError(400, f"field '{at}.tool_calls': only an assistant message makes tool calls",
                           param=f"{at}.tool_calls")
        calls = []
        for j, c in enumerate(m.tool_calls):
            where = f"{at}.tool_calls[{j}].function.arguments"
            try:
                args = parse_arguments(c.function.arguments, where)
            except ToolError as e:
                raise APIError(400, f"field '{e.field}': {e.reason}", param=e.field) from None
            calls.append({"id": c.id, "name": c.function.name, "arguments": args})
            call_ids.add(c.id)
        return Message(role, content, train=False, tool_calls=calls)
    if role != "tool":
        raise APIError(400, f"field '{at}.tool_call_id': only a tool message answers a tool call",
                       param=f"{at}.tool_call_id")
    if m.tool_call_id is None:
        raise APIError(400, f"field '{at}.tool_call_id': required for role 'tool' (the id of the call it answers)",
                       param=f"{at}.tool_call_id")
    if m.tool_call_id not in call_ids:
        known = ", ".join(sorted(call_ids)) or "none"
        raise APIError(400, f"field '{at}.tool_call_id': '{m.tool_call_id}' answers no earlier tool call "
                       f"(the calls' ids: {known})", param=f"{at}.tool_call_id")
    return Message(role, content, train=False, tool_call_id=m.tool_call_id)
