"""Request schemas of the OpenAI-compatible routes, and the error that every bad request becomes.

Bodies are parsed here, not by FastAPI's automatic validation, so that every problem is answered
with OpenAI's error shape and status 400 (FastAPI would answer 422 in its own shape) and the message
names the field: `messages[1].role: unknown role 'wizard'; use one of system, user, assistant`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The OpenAI error object {"error": {message, type, param, code}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # strict: "0.5" is not a number and 1.0 is not a bool; extra fields (clients send many) are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    """A typed text part of a message's content."""
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    """The function of an assistant's tool call: its name and its arguments, a JSON object as a string."""
    name: str
    arguments: str


class ToolCall(_Strict):
    """One tool call of an assistant message in the history."""
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    """One message of a chat request."""
    # Checked by the server (with a message naming the allowed roles); the enum documents them.
    role: str = Field(json_schema_extra={"enum": ["system", "developer", "user", "assistant", "tool"]})
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, description="an assistant's calls (role assistant)")
    tool_call_id: str | None = Field(default=None, description="the call a tool result answers (role tool)")


class FunctionDefinition(_Strict):
    """A function the model may call: its name, what it does, and a JSON schema of its arguments."""
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    """One entry of `tools`."""
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    """The function a named `tool_choice` forces."""
    name: str


class NamedToolChoice(_Strict):
    """`tool_choice` naming one function: {"type": "function", "function": {"name": ...}}."""
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    """`response_format.json_schema`: the schema the answer must match."""
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """`response_format`: plain text, a JSON object, or JSON matching a schema."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Strict):
    """`stream_options`: whether the last chunk carries the usage."""
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    # Checked by the server (8 strings of at most 256 characters); the schema documents it.
    stop: str | list[str] | None = Field(default=None, json_schema_extra={
        "anyOf": [{"type": "string", "minLength": 1, "maxLength": 256},
                  {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 256}, "maxItems": 8},
                  {"type": "null"}]})
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class KBOptions(_Strict):
    """`kb` as an object: how many sources to retrieve."""
    top_k: int = Field(default=5, ge=1, le=20)


class ChatCompletionRequest(_Sampling):
    """The body of POST /v1/chat/completions."""
    messages: list[ChatMessage] = Field(min_length=1)
    kb: bool | KBOptions | None = Field(default=None, description=(
        "answer from the server's knowledge base (serve --kb) with numbered sources: true, false, or "
        "{top_k}; on by default when the server has one. The answer's `sources` list them"))
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


MAX_PROMPTS = 128   # prompts in one batched completion request (each of its choices is an engine request)


class CompletionRequest(_Sampling):
    """The body of POST /v1/completions."""
    # One prompt (text or token ids) or a batch (texts or token-id lists: one choice per prompt and
    # per n, OpenAI's order). Emptiness, the batch size and the vocabulary are checked by the server
    # (with a message naming the prompt); the schema documents them.
    prompt: str | list[int] | list[str] | list[list[int]] = Field(description=(
        "a text, token ids, or a batch of texts or of token-id lists (choice p*n+j answers prompt p); "
        "at most 128 prompts x n, token ids below the vocabulary size"), json_schema_extra={"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_PROMPTS},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
         "minItems": 1, "maxItems": MAX_PROMPTS}]})
    logprobs: int | None = Field(default=None, ge=0, le=20, description=(
        "log-probs of the tokens and of the N most likely at each; with echo the prompt's tokens come "
        "first (the first one's null)"))
    echo: bool = Field(default=False, description="return the prompt before the completion")
    suffix: str | None = Field(default=None, description=(
        "text after the completion: the model fills in between the prompt and it (fill-in-the-middle; "
        "only for models whose tokenizer has FIM tokens)"))
    max_tokens: int | None = Field(default=16, ge=0, description=(
        "tokens to generate (null: as many as the context holds); 0 needs echo and scores the prompt only"))

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, value: Any, handler: Any) -> Any:
        # pydantic reports a union's first member ("Input should be a valid string") for a list
        # such as [1, 2.0]; name the shapes instead.
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("send a string, a list of token ids (integers), or a batch: a list of strings or a "
                             "list of token-id lists") from None


class InfillRequest(_Sampling):
    """The body of POST /infill (llama.cpp's): code between a prefix and a suffix."""
    input_prefix: str = ""
    input_suffix: str = ""
    prompt: str = Field(default="", description="the start of the middle, written after <fim_middle>")
    input_extra: list[dict[str, Any]] | None = Field(default=None, description="other files (not supported: 400)")
    n_predict: int | None = Field(default=None, ge=-1, description="tokens to generate (-1 or null: max_tokens, "
                                  "else as many as the context holds)")


class ModerationRequest(_Strict):
    """The body of POST /v1/moderations."""
    model: str | None = None
    input: str | list[str]


class EmbeddingRequest(_Strict):
    """The body of POST /v1/embeddings."""
    model: str | None = None
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"  # the openai client asks for base64 by default


class TokenizeRequest(_Strict):
    """The body of POST /tokenize and /apply-template."""
    content: str | None = None
    prompt: str | None = None   # vLLM's name for `content` (lm-evaluation-harness's remote tokenizer sends it)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False   # text only: the tokenizer's own special tokens (e.g. a BOS) around it


class DetokenizeRequest(_Strict):
    """The body of POST /detokenize."""
    tokens: list[int]


def parse_body(raw: bytes, schema: type[BaseModel]) -> Any:
    """Bytes of a request body -> an instance of `schema`, or APIError(400) naming the problem."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply to parse; send a JSON object") from None
    except ValueError as e:   # e.g. an integer literal of more than 4300 digits
        raise APIError(400, f"the request body holds a value Python's JSON parser refuses ({e})") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    where = _unencodable(data)
    if where is not None:
        raise APIError(400, f"field '{where or 'body'}': the text holds a lone UTF-16 surrogate (an escape such as "
                       "\\ud800 without its pair), which is not a character; send valid Unicode", param=where or None)
    try:
        return schema.model_validate(data)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    except ValidationError as e:
        err = e.errors()[0]
        param = _field_path(err.get("loc", ()))
        got = err.get("input")
        shown = json.dumps(got)[:80] if _jsonable(got) else type(got).__name__
        message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")   # our validators' own words
        raise APIError(400, f"field '{param}': {message} (got {shown})", param=param) from None


def _unencodable(value: Any, path: str = "") -> str | None:
    """The path of the first string (key or value) that is not valid Unicode (a lone surrogate), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            inner = f"{path}.{k}" if path else str(k)
            bad = _unencodable(k, inner)
            if bad is None:
                bad = _unencodable(v, inner)
            if bad is not None:
                return bad
    elif isinstance(value, list):
        for i, v in enumerate(value):
            bad = _unencodable(v, f"{path}[{i}]")
            if bad is not None:
                return bad
    return None


ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
REQUEST_MODELS: list[type[BaseModel]] = []


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI parts of a route whose body is parsed by hand into `model`: its request body and
    the OpenAI error shape of its 4xx answers (the schemas themselves: `openapi_components`)."""
    if model not in REQUEST_MODELS:
        REQUEST_MODELS.append(model)
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return {"requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}},
            "responses": {"4XX": {"description": "a bad request, in OpenAI's error shape", **error},
                          "5XX": {"description": "the model is loading (503) or failed", **error}}}


def openapi_components() -> dict[str, Any]:
    """The JSON schemas of every request body and of the error object, for /openapi.json
    (schemas only; the bearer-key security scheme is added beside them by the app)."""
    out: dict[str, Any] = {"Error": ERROR_SCHEMA}
    for model in REQUEST_MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[TextPart]", "NamedToolChoice", "literal['none','auto','required']", "list[int]", "list[str]", "list[list[int]]", "int", "float",
                      "bool") or "[" in str(part):
            continue  # pydantic names the union member it tried; the user wants the field only
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def _jsonable(x: Any) -> bool:
    try:
        json.dumps(x)
        return True
    except (TypeError, ValueError):
        return False
