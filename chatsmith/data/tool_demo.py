"""A small built-in tool-use set: a calculator and a weather lookup, with held-out prompts, and
the scores of a model's answers to them (valid call, correct call).

Training conversations run the whole loop: the user asks, the assistant calls a tool, the tool
answers, the assistant answers in words; a few ask for nothing a tool does and get a plain answer.
Held-out prompts use phrasings and values (cities, numbers) that never appear in training, so a
model that passes them learned when and how to call, not the training strings. Deterministic for a seed.

- valid call: the answer holds a <tool_call> block that parses, names an offered tool, and whose
  arguments match the tool's parameter schema (chatsmith.data.tools.validate_call);
- correct call: valid, the expected tool, and the expected arguments (the calculator's expression
  is judged by its value, so "17*23" and "17 * 23" are both right).
"""

from __future__ import annotations

import ast
import json
import operator
import random
from dataclasses import dataclass
from typing import Any

from chatsmith.data.conversation import Conversation, Message
from chatsmith.data.tools import normalize_tools, parse_tool_calls, validate_call

TOOLS = normalize_tools([
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression (+, -, *, /, parentheses)",
        "parameters": {"type": "object", "properties": {
            "expression": {"type": "string", "description": "e.g. (12 + 3) * 4"}}, "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}},
])
TRAIN_CITIES = ["Paris", "Oslo", "Tokyo", "Lima", "Cairo", "Madrid", "Berlin", "Toronto", "Sydney", "Nairobi",
                "Rome", "Seoul", "Dublin", "Mumbai", "Chicago", "Lisbon"]
HELDOUT_CITIES = ["Vienna", "Denver", "Hanoi", "Quito", "Prague", "Helsinki", "Athens", "Boston"]
OPS = {"+": ("plus", "add", "+"), "-": ("minus", "subtract", "-"), "*": ("times", "multiply", "*"),
       "/": ("divided by", "divide", "/")}
TRAIN_MATH = ["What is {a} {word} {b}?", "Calculate {a} {sym} {b}.", "Can you compute {a} {sym} {b} for me?",
              "How much is {a} {word} {b}?", "Please work out {a} {sym} {b}."]
HELDOUT_MATH = ["I need the result of {a} {sym} {b}.", "Quick: {a} {word} {b} equals what?",
                "Use the calculator on {a} {sym} {b}."]
TRAIN_WEATHER = ["What's the weather in {city}?", "How warm is it in {city} right now?", "Weather in {city} please.",
                 "Is it cold in {city} today?", "Tell me the current weather for {city}."]
HELDOUT_WEATHER = ["I'm flying to {city} tomorrow; what's it like there now?", "Check the weather in {city} for me."]
FAHRENHEIT = [" in Fahrenheit", " (in °F)"]
CHAT = [("Hi!", "Hello! How can I help you today?"), ("Thank you!", "You're welcome!"),
        ("Who are you?", "I am a helpful assistant that can use a calculator and look up the weather."),
        ("Tell me a fun fact.", "Octopuses have three hearts."), ("Good morning!", "Good morning! What can I do for you?")]


@dataclass
class HeldOut:
    """A held-out prompt and the call it should get."""
    prompt: str
    tool: str
    arguments: dict[str, Any]


def _weather(city: str, unit: str) -> dict[str, Any]:
    c = sum(map(ord, city)) % 30 - 5   # a made-up but fixed temperature per city
    sky = ["sunny", "cloudy", "rainy", "windy"][len(city) % 4]
    return {"city": city, "temperature": c if unit == "celsius" else round(c * 9 / 5 + 32), "unit": unit, "sky": sky}


def _math(rng: random.Random, templates: list[str]) -> tuple[str, str, float]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(list(OPS))
    word, _verb, sym = OPS[op]
    prompt = rng.choice(templates).format(a=a, b=b, word=word, sym=sym)
    expression = f"{a} {op} {b}"
    return prompt, expression, safe_eval(expression)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.4g}"


def tool_train_set(n: int = 240, seed: int = 0) -> list[Conversation]:
    """`n` training conversations (about 45% calculator, 45% weather, 10% plain chat), with TOOLS."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.1:
            q, a = rng.choice(CHAT)
            msgs = [Message("user", q), Message("assistant", a)]
        elif kind < 0.55:
            prompt, expression, value = _math(rng, TRAIN_MATH)
            msgs = [Message("user", prompt),
                    Message("assistant", "", tool_calls=[{"id": f"call_{i}", "name": "calculator",
                                                          "arguments": {"expression": expression}}]),
                    Message("tool", json.dumps({"result": value}), tool_call_id=f"call_{i}"),
                    Message("assistant", f"{expression} = {_number(value)}.")]
        else:
            city = rng.choice(TRAIN_CITIES)
            f = rng.random() < 0.3
            prompt = rng.choice(TRAIN_WEATHER).format(city=city)
            if f:
                prompt = prompt[:-1] + rng.choice(FAHRENHEIT) + prompt[-1]
            unit = "fahrenheit" if f else "celsius"
            w = _weather(city, unit)
            msgs = [Message("user", prompt),
                    Message("assistant", "", tool_calls=[{"id": f"call_{i}", "name": "get_weather",
                                                          "arguments": {"city": city, "unit": unit}}]),
                    Message("tool", json.dumps(w), tool_call_id=f"call_{i}"),
                    Message("assistant", f"It is {w['temperature']}°{'F' if f else 'C'} and {w['sky']} in {city}.")]
        out.append(Conversation(msgs, source=f"builtin tool set, example {i}", tools=TOOLS))
    return out


def tool_heldout_set(n: int = 40, seed: int = 1) -> list[HeldOut]:
    """`n` held-out prompts (half calculator, half weather) in phrasings and values not used in training."""
    rng = random.Random(10_000 + seed)
    out = []
    for i in range(n):
        if i % 2 == 0:
            prompt, expression, _ = _math(rng, HELDOUT_MATH)
            out.append(HeldOut(prompt, "calculator", {"expression": expression}))
        else:
            city = HELDOUT_CITIES[(i // 2) % len(HELDOUT_CITIES)]
            f = rng.random() < 0.3
            prompt = rng.choice(HELDOUT_WEATHER).format(city=city)
            if f:
                prompt = prompt[:-1] + rng.choice(FAHRENHEIT) + prompt[-1]
            out.append(HeldOut(prompt, "get_weather", {"city": city, "unit": "fahrenheit" if f else "celsius"}))
    return out


_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def safe_eval(expression: str) -> float:
    """The value of an arithmetic expression (numbers, + - * /, parentheses, unary minus); ValueError otherwise."""
    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
            return _BIN[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")
    try:
        return ev(ast.parse(expression, mode="eval"))
    except (SyntaxError, ZeroDivisionError, RecursionError) as e:
        raise ValueError(str(e)) from None


def score_answer(text: str, expected: HeldOut) -> tuple[bool, bool]:
    """(valid call, correct call) of a generated answer to a held-out prompt (module docstring)."""
    from chatsmith.data.tools import tool_names

    parsed = parse_tool_calls(text, tool_names(TOOLS), parallel=False)
    if not parsed.calls:
        return False, False
    call = parsed.calls[0]
    if validate_call(call, TOOLS) is not None:
        return False, False
    if call["name"] != expected.tool:
        return True, False
    if expected.tool == "calculator":
        try:
            right = abs(safe_eval(call["arguments"]["expression"]) - safe_eval(expected.arguments["expression"])) < 1e-9
        except ValueError:
            right = False
        return True, right
    args = call["arguments"]
    return True, (args.get("city", "").strip().lower() == expected.arguments["city"].lower()
                  and args.get("unit") == expected.arguments["unit"])
