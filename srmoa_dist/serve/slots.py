"""Admission slots of the Ingress: held by a request, given back exactly once (also by a stream)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import StreamingResponse


class _Slots:
    """Admission slots held by one request; `release` gives them back to the Ingress exactly once."""

    def __init__(self, owner: Any, n: int) -> None:
        self._owner, self._n = owner, n

    def release(self) -> None:
        n, self._n = self._n, 0
        self._owner.inflight -= n


class _ReleasingStream(StreamingResponse):
    """A StreamingResponse that releases its request's slots when it ends, however it ends (a body
    iterator that never started has no `finally` to run)."""

    def __init__(self, content: Any, slots: _Slots, **kw: Any) -> None:
        super().__init__(content, **kw)
        self._slots = slots

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slots.release()
