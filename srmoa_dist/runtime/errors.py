"""Short error summaries: what a job record, a log line or an HTTP error body says about an exception."""

from __future__ import annotations


def brief(e: BaseException, limit: int = 300) -> str:
    """'Type: first line of the message' (the line cut at `limit` characters), or the type alone."""
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:limit]}" if s else type(e).__name__


__all__ = ["brief"]
