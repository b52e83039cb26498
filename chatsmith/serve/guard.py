"""What every HTTP request passes before it reaches a route: the checks that keep one client from
hurting the server or another client. A pure ASGI middleware (it wraps `receive`, so it also limits
bodies sent in chunks, and it never buffers a streamed response).

- Host: when the server listens on loopback only, the Host header must name loopback too (403
  otherwise): a web page cannot reach the server through DNS rebinding.
- Content-Type: a POST must say `application/json` (415 otherwise): a cross-site form or a
  `text/plain` fetch, which browsers send without asking, never reaches a route.
- API key (with `--api-key`, CHATSMITH_API_KEY or a key file): `Authorization: Bearer KEY`, the
  scheme in any case (RFC 7235), compared in constant time (401 otherwise).
- Body: at most `max_body_bytes` (413), each chunk within `body_timeout` seconds (408).
- Metrics: every request is counted by route template and status, with its latency.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Any

from chatsmith.serve.schemas import APIError

# Routes that need the API key when one is set (the web page, /health and the schema stay open).
PROTECTED_PREFIXES = ("/v1/",)
PROTECTED_PATHS = ("/tokenize", "/detokenize", "/apply-template", "/tokenizer_info", "/metrics", "/infill")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def host_of(header: str) -> str:
    """The host part of a Host header ("127.0.0.1:8000" -> "127.0.0.1", "[::1]:80" -> "[::1]")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def key_matches(authorization: str, key: str) -> bool:
    """Whether an Authorization header carries `key` as a bearer token (scheme case-insensitive;
    the comparison takes the same time wherever the first difference is)."""
    scheme, _, token = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


class RequestGuard:
    """ASGI middleware enforcing the checks of the module docstring over `state` (a ServerState)."""

    def __init__(self, app: Any, state: Any) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state, start, path = self.state, time.monotonic(), scope.get("path", "")
        recorded = False

        async def send_counted(message: dict) -> None:
            nonlocal recorded
            if message["type"] == "http.response.start" and not recorded:
                recorded = True
                state.metrics.request(path, message["status"], time.monotonic() - start)
            await send(message)

        error = self.check(scope)
        if error is not None:
            await self.reply(error, send_counted)
            return
        await self.app(scope, self.limited(receive), send_counted)

    def check(self, scope: dict) -> APIError | None:
        """The error a request gets before any route sees it, or None when it may go on."""
        state = self.state
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if state.allowed_hosts is not None and host_of(headers.get("host", "")) not in state.allowed_hosts:
            return APIError(403, f"host '{headers.get('host', '')}' is not served here; this server answers to "
                            f"{', '.join(sorted(state.allowed_hosts))} (start it with --allowed-host NAME to add one)",
                            type="permission_error", code="host_not_allowed")
        protected = path.startswith(PROTECTED_PREFIXES) or path in PROTECTED_PATHS
        if state.api_key and protected and not key_matches(headers.get("authorization", ""), state.api_key):
            return APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the "
                            "server's key", type="authentication_error", code="invalid_api_key")
        if method == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return APIError(415, f"send the body as JSON with the header 'Content-Type: application/json' (got "
                                f"'{ctype or 'none'}')", code="unsupported_media_type")
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > state.max_body_bytes):
                return self.too_large()
        return None

    def too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.state.max_body_bytes:,} bytes; send less (the "
                        "limit is `chatsmith serve --max-body-mb`)", code="request_too_large")

    def limited(self, receive: Any) -> Any:
        """`receive` that raises 413 past the body limit and 408 when a chunk takes too long."""
        state, received, body_done = self.state, 0, False

        async def receive_limited() -> dict:
            nonlocal received, body_done
            if body_done:   # after the body only a disconnect comes: wait for it as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=state.body_timeout)
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body did not arrive within {state.body_timeout:g} s",
                               code="request_timeout") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > state.max_body_bytes:
                    raise self.too_large()
                body_done = not message.get("more_body", False)
            return message

        return receive_limited

    async def reply(self, error: APIError, send: Any) -> None:
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
