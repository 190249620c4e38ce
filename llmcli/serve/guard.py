"""What answers a request before any route: the API key (401), shutting down (503), the body size (413)."""

from __future__ import annotations

import hmac
from typing import Any

from llmcli.serve.protocol import APIError, invalid, too_large
from llmcli.serve.state import ServerState


class Guard:
    """Pure ASGI middleware: API key (401), shutting down (503), body size (413) before any route.

    The body is read here, bounded, and handed on in one piece; after that the app's `receive`
    is the server's own, so handlers can watch it for the client disconnecting. Every response's
    status is counted for /metrics here, refusals included.
    """

    def __init__(self, app: Any, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        outer, path = send, scope.get("path", "")

        async def send(message):
            if message["type"] == "http.response.start":
                self.state.metrics.response(path, message["status"])
            await outer(message)

        error = self._refusal(scope)
        if error is not None:
            await error.response()(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.state.max_body_bytes:
                await too_large(self.state.max_body_bytes).response()(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    def _refusal(self, scope) -> APIError | None:
        """The error that answers this request before its body is read, if any."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = self.state.api_key
        if scope.get("path", "") not in PUBLIC_PATHS:
            if key is not None and not _authorized(headers.get("authorization"), key):
                return APIError(401, "Incorrect or missing API key: send the header "
                                     "'Authorization: Bearer KEY'", code="invalid_api_key")
            if self.state.draining:
                return APIError(503, "the server is shutting down")
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            return invalid("invalid Content-Length header")
        if length is not None and int(length) > self.state.max_body_bytes:
            return too_large(self.state.max_body_bytes)
        return None


PUBLIC_PATHS = ("/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")  # no API key needed


def _authorized(header: str | None, key: str) -> bool:
    if not header or header[:7].lower() != "bearer ":  # the scheme is case-insensitive
        return False
    return hmac.compare_digest(header[7:].strip().encode(), key.encode())
