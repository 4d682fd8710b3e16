"""Tenants: which namespace a request belongs to, from its API key.

Keys come from a secret file (``serve.api_keys_file``, else ``$SRMOA_API_KEYS_FILE``), one key a line:

    <key> <namespace>        # blank lines and lines starting with '#' are skipped

A request's namespace is its key's; the single user key (``serve.api_key``) and the admin key map to
"default", and without any key configured every request is in "default". A namespace reaches its own
keys plus those of ``serve.shared_namespace`` (routing/namespaces.py); the admin key also acts on
other namespaces where a route takes one (listing, importing).

The auth middleware (serve/app.py) sets the request's `Caller` in a context variable, which the route
handlers read with `caller()`.
"""

from __future__ import annotations

import contextvars
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

from srmoa_dist.routing.namespaces import DEFAULT, check_name

KEYS_FILE_ENV = "SRMOA_API_KEYS_FILE"


@dataclass(frozen=True)
class Caller:
    """Who sent the request: its namespace, the namespaces it reaches, and whether it is the admin."""

    namespace: str = DEFAULT
    shared: str = "shared"
    admin: bool = False

    @property
    def reach(self) -> tuple[str, ...]:
        return (self.namespace,) if self.namespace == self.shared else (self.namespace, self.shared)


_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("srmoa_caller", default=None)


def caller() -> Caller:
    """The current request's caller (the default namespace outside a request)."""
    return _CALLER.get() or Caller()


def set_caller(c: Caller) -> None:
    _CALLER.set(c)


@dataclass(frozen=True)
class Tenants:
    """Tenant keys -> namespace, and the shared namespace."""

    keys: dict[str, str] = field(default_factory=dict)
    shared: str = "shared"

    def __post_init__(self) -> None:
        check_name(self.shared, "serve.shared_namespace")
        for ns in self.keys.values():
            check_name(ns)

    def namespace_of(self, token: str) -> str | None:
        """The namespace of a tenant key (compared in constant time), None for another token."""
        found = None
        for key, ns in self.keys.items():
            if token and hmac.compare_digest(token.encode(), key.encode()):
                found = ns
        return found

    def caller(self, namespace: str = DEFAULT, admin: bool = False) -> Caller:
        return Caller(namespace=namespace, shared=self.shared, admin=admin)


def read_keys_file(path: str | os.PathLike) -> dict[str, str]:
    """`key namespace` lines -> {key: namespace}; ValueError naming the file and line when bad."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"the API keys file {str(path)!r} cannot be read: {e.strerror}") from None
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected '<key> <namespace>', got {len(parts)} field(s)")
        key, ns = parts
        try:
            check_name(ns)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
        if key in out:
            raise ValueError(f"{path}:{n}: the key is listed twice")
        out[key] = ns
    return out


def resolve_tenants(keys_file: str | None, shared: str) -> Tenants:
    """The tenants of `keys_file`, else of $SRMOA_API_KEYS_FILE, else none."""
    path = keys_file or os.environ.get(KEYS_FILE_ENV)
    return Tenants(read_keys_file(path) if path else {}, shared)


__all__ = ["Caller", "Tenants", "caller", "set_caller", "read_keys_file", "resolve_tenants", "KEYS_FILE_ENV"]
