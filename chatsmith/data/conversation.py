"""The one data model every reader produces and every stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
# Plain text for continued pre-training is a conversation with one message of role "text":
# the renderer trains on all of its tokens and uses no chat template.
TEXT_ROLE = "text"


@dataclass
class Message:
    """One turn: a role (system, user, assistant, tool or text) and its content."""
    role: str
    content: str
    # Whether this message's tokens are trained on. None means the default: assistant turns
    # (and plain text) are trained, everything else is not. A reader sets False to keep an
    # assistant turn as context only (e.g. LLaMA-Factory's `loss_weight: 0.0`).
    train: bool | None = None
    # Tool calling (chatsmith/data/tools.py): an assistant's calls [{id, name, arguments: dict}],
    # and the id of the call a tool message answers.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def trains(self) -> bool:
        """Whether this message's tokens are training targets."""
        if self.train is not None:
            return self.train
        return self.role in ("assistant", TEXT_ROLE)

    def to_dict(self) -> dict[str, Any]:
        """{role, content} (and train, when set explicitly)."""
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.train is not None:
            d["train"] = self.train
        if self.tool_calls:
            d["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        return d


@dataclass
class Conversation:
    """A list of messages with where it came from and the record's other fields."""
    messages: list[Message]
    # Where the record came from, e.g. "data/alpaca.json, record 12" -- used in error messages.
    source: str | None = None
    # Extra fields of the record that later stages may use (ids, labels, reward targets...).
    meta: dict[str, Any] = field(default_factory=dict)
    # The functions the assistant may call, in OpenAI's shape (chatsmith/data/tools.py), or None.
    tools: list[dict[str, Any]] | None = None

    @property
    def is_text(self) -> bool:
        """Whether this is a plain-text document (continued pre-training), not a chat."""
        return len(self.messages) == 1 and self.messages[0].role == TEXT_ROLE

    def turns(self) -> int:
        """Number of assistant turns."""
        return sum(1 for m in self.messages if m.role == "assistant")

    def to_openai(self) -> list[dict[str, str]]:
        """The messages as OpenAI-style [{role, content}]."""
        return [{"role": m.role, "content": m.content} for m in self.messages]
