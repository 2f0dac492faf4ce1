"""A piece shared by the pure-ASGI middlewares (metrics, audit)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class StatusRecorder:
    """Wraps `send` and remembers the response status: 500 until a response starts (an
    exception before any answer is what the error handler turns into a 500)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.code = 500

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.code = int(message["status"])
        await self._send(message)

    async def run(self, app: ASGIApp, scope: Scope, receive: Receive) -> None:
        """Call `app` with this recorder as its `send`. An exception after the answer
        started (the store failing mid-stream: the client gets a cut-off body) is recorded
        as 500, not as the status already sent; a cancelled request keeps its status."""
        try:
            await app(scope, receive, self)
        except Exception:
            self.code = 500
            raise


__all__ = ["StatusRecorder"]
