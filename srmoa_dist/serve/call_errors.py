"""How a failed call from the ingress becomes an HTTP error: backpressure, transient Ray/Serve
failures (503 + Retry-After), a full expert store (507), anything else (500)."""

from __future__ import annotations

import asyncio
import logging

from srmoa_dist.runtime.errors import brief
from srmoa_dist.serve.errors import APIError, overloaded

log = logging.getLogger(__name__)


def _generation_error(e: Exception) -> APIError:
    """The HTTP error for a failed call to the model server: 503 + Retry-After when it is transient
    (queue full, replica restarting, a store call timing out), else 500 without it."""
    if _is_backpressure(e):
        return overloaded("the model server's queue is full; retry later")
    log.error("generation failed: %s", brief(e), exc_info=e)
    if _is_transient(e):
        return APIError(503, f"generation failed ({brief(e)}); retry later", code="unavailable",
                        headers={"Retry-After": "1"})
    return APIError(500, f"generation failed ({brief(e)})", code="internal_error")


def _is_transient(e: BaseException) -> bool:
    """A failure of the call itself (Ray, Serve, a timeout), not an error raised by our code: a retry
    may succeed. An application error arrives as a RayTaskError whose cause is not a Ray error."""
    from ray.exceptions import RayError, RayTaskError
    from ray.serve.exceptions import RayServeException

    transient = (RayError, RayServeException, TimeoutError, asyncio.TimeoutError, ConnectionError)
    if isinstance(e, RayTaskError):
        return isinstance(getattr(e, "cause", None), transient)
    return isinstance(e, transient)


def _store_full_error(e: BaseException) -> APIError | None:
    """A shard refused a write for room (its map or its disk), also through Ray: a 507 whose message
    is the shard's (it says which setting to raise or what to free); None for any other error."""
    from srmoa_dist.experts.shard import ShardFullError

    cause = getattr(e, "cause", None)
    full = cause if isinstance(cause, ShardFullError) else e if isinstance(e, ShardFullError) else None
    if full is None:
        return None
    lines = str(full).strip().splitlines() or [type(full).__name__]
    return APIError(507, f"the expert store is full: {lines[0][:500]}", code="storage_full")


def _is_backpressure(e: BaseException) -> bool:
    from ray.serve.exceptions import BackPressureError

    return isinstance(e, BackPressureError) or "BackPressureError" in type(e).__name__
