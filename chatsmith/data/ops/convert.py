"""One raw record -> a Conversation, through the same format detection and converters as the
readers (data/formats.py), for the tools that need roles and turns."""

from __future__ import annotations

from typing import Any

from chatsmith.data.conversation import Conversation
from chatsmith.data.sources import RecordContext
from chatsmith.errors import DataError


def record_conversation(record: Any, where: str = "record") -> Conversation | None:
    """The record's conversation (the first, for records that hold several), or None when the
    record is in no format chatsmith reads."""
    from chatsmith.data.formats import _CONVERTERS, _detect

    ctx = RecordContext("data", where)
    try:
        fmt, columns = _detect(record, ctx, None, None)
        convs = _CONVERTERS[fmt](record, ctx, columns or {})
    except DataError:
        return None
    return convs[0] if convs else None
