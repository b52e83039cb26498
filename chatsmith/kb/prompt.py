"""Retrieved chunks -> numbered sources in the prompt, for `chat --kb` and `serve --kb`.

The sources go into the system message (after the user's own system prompt, if any), numbered
[1]..[k] in rank order, each with its file, heading path and location, and the model is asked to
cite them by number. The prompt is rendered by the one template renderer like every other prompt;
when it does not fit the context window (with room kept for the answer), the lowest-ranked sources
are dropped whole until it does: a chunk is never cut.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from chatsmith.data.conversation import Message
from chatsmith.kb.search import search
from chatsmith.kb.store import KnowledgeBase

INSTRUCTION = ("Answer the user's question from the numbered sources below. Cite each source you use by its "
               "number in square brackets, like [1] or [2][3]. If the sources do not hold the answer, say so.")


@dataclass
class Source:
    """One numbered source of an answer: the chunk, where it comes from, and its rank score."""

    n: int
    id: int
    source: str
    heading: str
    location: str
    text: str
    score: float

    @property
    def label(self) -> str:
        """"docs/serve.md > Routes (line 29)": how the prompt and the terminal name it."""
        name = _shown(self.source)
        head = f" > {self.heading}" if self.heading else ""
        loc = f" ({self.location})" if self.location else ""
        return f"{name}{head}{loc}"

    def to_dict(self) -> dict[str, Any]:
        """The API's form, with a link to the chunk (GET /v1/kb/chunks/ID)."""
        d = asdict(self)
        d["source"] = _shown(self.source)
        d["url"] = f"/v1/kb/chunks/{self.id}"
        return d


def _shown(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return Path(path).name if rel.startswith("..") else rel


class Retriever:
    """A knowledge base opened for answering: `retrieve(question)` gives the top-k numbered sources."""

    def __init__(self, kb: str | Path | KnowledgeBase, top_k: int = 5, embedder: Any = None) -> None:
        self.kb = kb if isinstance(kb, KnowledgeBase) else KnowledgeBase(kb)
        self.top_k = top_k
        if embedder is None:
            from chatsmith.embed import shared_embedder

            embedder = shared_embedder(self.kb.model)
        self.embedder = embedder

    @property
    def generation(self) -> int:
        return self.kb.generation

    def retrieve(self, question: str, top_k: int | None = None) -> list[Source]:
        hits = search(self.kb, question, k=top_k or self.top_k, embedder=self.embedder)
        return [Source(i, h.chunk_id, h.source, h.heading, h.location, h.text, round(h.score, 6))
                for i, h in enumerate(hits, 1)]


def context_text(sources: list[Source], system: str | None = None) -> str:
    """The system message that carries the sources (after the user's own system prompt)."""
    parts = [system.strip()] if system and system.strip() else []
    parts.append(INSTRUCTION)
    for s in sources:
        parts.append(f"[{s.n}] {s.label}\n{s.text}")
    return "\n\n".join(parts)


def with_sources(messages: list[Message], sources: list[Source]) -> list[Message]:
    """The conversation with its system message carrying `sources` (unchanged when there are none)."""
    if not sources:
        return list(messages)
    msgs = list(messages)
    system = None
    if msgs and msgs[0].role == "system":
        system = msgs.pop(0).content
    return [Message("system", context_text(sources, system), train=False), *msgs]


def fit_sources(render: Callable[[list[Source]], list[int]], sources: list[Source],
                limit: int) -> tuple[list[int], list[Source]]:
    """Render with `sources`, dropping the lowest-ranked ones whole until the prompt has at most
    `limit` tokens (or none are left). Returns (prompt ids, sources kept)."""
    kept = list(sources)
    while True:
        ids = render(kept)
        if len(ids) <= limit or not kept:
            return ids, kept
        kept = kept[:-1]


def sources_footer(sources: list[Source]) -> str:
    """The sources as the terminal shows them after an answer."""
    return "sources:\n" + "\n".join(f"  [{s.n}] {s.label}" for s in sources)
