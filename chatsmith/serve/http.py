"""Running the app: uvicorn with limits on what a connection may hold.

uvicorn gives a new connection all the time it likes to send its request line and headers, and
a keep-alive connection is kept as long as a byte arrives every few seconds. Here a connection
must complete each request's head within `header_timeout` seconds or it is closed, at most
`max_connections` are open at once (more are closed at once), and at most `limit_concurrency`
requests run at once (more get 503 from uvicorn). Bodies are limited by serve/guard.py.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for every request head and a cap on connections."""

    header_timeout: float = 10.0
    max_connections: int = 256

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline: Any = None
        if len(self.connections) > self.max_connections:
            self.logger.warning("refusing a connection: %d are open (the limit)", self.max_connections)
            transport.close()
            return
        self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def _cancel_head_deadline(self) -> None:
        if getattr(self, "_head_deadline", None) is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if waiting_for_head and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._cancel_head_deadline()   # a request head arrived: the route's own limits apply now

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_deadline()      # the next request on this connection gets the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)


def uvicorn_config(app: Any, host: str, port: int, *, header_timeout: float = 10.0, max_connections: int = 256,
                   limit_concurrency: int = 512, lifespan: str = "auto") -> Any:
    """uvicorn's Config for `app` with the guarded protocol and its limits."""
    import uvicorn

    protocol = type("Protocol", (GuardedH11Protocol,), {"header_timeout": header_timeout,
                                                        "max_connections": max_connections})
    return uvicorn.Config(app, host=host, port=port, http=protocol, log_level="warning", lifespan=lifespan,
                          limit_concurrency=limit_concurrency, timeout_keep_alive=5)


class ServerThread:
    """Serve an app with uvicorn on a free port in a background thread (tests, notebooks).

    `with ServerThread(app) as url:` yields "http://127.0.0.1:PORT" once the socket listens.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **limits: Any) -> None:
        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn_config(app, host, port, lifespan="off", **limits))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="chatsmith-http")

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
