"""User-facing errors. The CLI prints these as one clear message (no traceback) and exits 2."""

from __future__ import annotations


class ChatsmithError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do."""


class ConfigError(ChatsmithError):
    """A bad configuration key or value."""


class DataError(ChatsmithError):
    """A malformed record: names the file, the record (line or index), the field and the fix."""

    def __init__(self, message: str, *, path: str | None = None, record: str | None = None,
                 field: str | None = None, hint: str | None = None) -> None:
        self.path, self.record, self.field, self.hint = path, record, field, hint
        where = ", ".join(p for p in (path, record, f"field '{field}'" if field else None) if p)
        text = f"{where}: {message}" if where else message
        if hint:
            text += f" ({hint})"
        super().__init__(text)


class ModelNotFoundError(ChatsmithError):
    """A model argument that resolves to nothing loadable."""
