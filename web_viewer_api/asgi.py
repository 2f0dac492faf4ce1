"""A piece shared by the pure-ASGI middlewares (metrics, audit)."""

from __future__ import annotations

from starlette.types import Message, Send


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


__all__ = ["StatusRecorder"]
