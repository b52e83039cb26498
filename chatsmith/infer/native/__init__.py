"""chatsmith's native (C++) decode and prefill steps and int4 kernel, compiled on first use with torch's extension builder.

`load()` returns the compiled module, or None when it cannot be built here (no C++ compiler, no
Python headers, `CHATSMITH_NATIVE=0`); callers then use the Python path, which computes the same
numbers more slowly. The build (about a minute) is cached under ~/.cache/chatsmith/torch_extensions,
keyed by the source and the torch version, so it happens once per machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode.cpp")
SOURCES = [SOURCE, Path(__file__).with_name("q4.cpp")]
_lock = threading.Lock()
_state: dict[str, Any] = {}


def build_dir() -> Path:
    """Where the compiled extension is cached (under chatsmith's cache)."""
    from chatsmith.models.registry import cache_dir

    return cache_dir() / "torch_extensions"


def enabled() -> bool:
    """Whether the native step may be used (CHATSMITH_NATIVE is not 0/false/no/off)."""
    return os.environ.get("CHATSMITH_NATIVE", "1").lower() not in ("0", "false", "no", "off")


def source_key() -> str:
    """The build's cache key: the sources and the torch version."""
    import torch

    return hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + torch.__version__.encode()).hexdigest()[:12]


def load() -> Any | None:
    """The compiled extension, or None (with the reason logged once) when it cannot be built."""
    if not enabled():
        return None
    with _lock:
        if "module" in _state:
            return _state["module"]
        module = None
        try:
            from torch.utils import cpp_extension

            key = source_key()
            out = build_dir() / key
            out.mkdir(parents=True, exist_ok=True)
            with _build_lock(out):
                module = cpp_extension.load(name=f"chatsmith_decode_{key}", sources=[str(p) for p in SOURCES],
                                            build_directory=str(out), extra_cflags=["-O3"], verbose=False)
        except Exception as e:  # a missing compiler or header: the Python path still works
            log.warning("chatsmith's native decode step could not be built (%s: %s); using the Python path, "
                        "which is slower. Install a C++ compiler and the Python headers to enable it, or set "
                        "CHATSMITH_NATIVE=0 to silence this.", type(e).__name__, str(e).splitlines()[0][:300])
        _state["module"] = module
        return module


@contextlib.contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """One chatsmith process at a time builds (or checks) the extension in `out`. torch's builder
    guards the build with a plain `lock` file that a killed build leaves behind, and every later
    build then waits for it forever (a server stuck at "loading"). This lock is an flock, which
    the kernel releases when its holder dies; holding it, a leftover `lock` file can only be stale."""
    try:
        import fcntl
    except ImportError:   # not POSIX: torch's own lock file only
        yield
        return
    with open(out / "chatsmith-build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        stale = out / "lock"
        if stale.exists():
            log.warning("removing %s, left by a build of the native decode step that was killed", stale)
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
