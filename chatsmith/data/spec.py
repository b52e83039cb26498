"""The `--data` grammar: "PATH", "PATH:WEIGHT", "PATH@FORMAT" or "PATH@FORMAT:WEIGHT"."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from chatsmith.errors import ChatsmithError

# The conversation formats a `@FORMAT` suffix (and `--format`) may name; readers in data/formats.py.
FORMATS = ("alpaca", "sharegpt", "messages", "hh", "text", "columns")


@dataclass
class DataSource:
    """One `--data` argument: a path or hub name, its mixing weight and an explicit format."""

    path: str
    weight: float | None = None
    format: str | None = None



def parse_data_spec(spec: str) -> DataSource:
    """Parse "PATH", "PATH:WEIGHT", "PATH@FORMAT" or "PATH@FORMAT:WEIGHT" (PATH may be a hub name)."""
    spec = spec.strip()
    if not spec:
        raise ChatsmithError("empty --data value: pass a file as PATH or PATH:WEIGHT")
    path, weight = spec, None
    # The weight is after the *last* colon, so "C:\\data\\x.json" and "hf://..." stay paths.
    if not os.path.exists(spec) and ":" in spec:
        head, tail = spec.rsplit(":", 1)
        try:
            value = float(tail)
        except ValueError:
            if os.path.exists(head.split("@")[0]):
                raise ChatsmithError(
                    f"--data {spec}: weight '{tail}' is not a number (write PATH:WEIGHT, e.g. {head}:0.5)"
                ) from None
        else:
            if not math.isfinite(value) or value <= 0:
                raise ChatsmithError(f"--data {spec}: weight must be a positive number, got '{tail}'")
            path, weight = head, value
    fmt = None
    if "@" in path and not os.path.exists(path):
        head, tail = path.rsplit("@", 1)
        if tail.lower() in FORMATS:
            path, fmt = head, tail.lower()
        elif re.fullmatch(r"[A-Za-z][\w-]*", tail):
            raise ChatsmithError(f"--data {spec}: unknown format '{tail}'. Known formats: {', '.join(FORMATS)}")
    return DataSource(path=path, weight=weight, format=fmt)
