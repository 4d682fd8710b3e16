"""Where the API keys come from: the config, else an environment variable, else a file it names."""

from __future__ import annotations

import os

from srmoa_dist.config import SrmoaConfig


def resolve_api_key(cfg: SrmoaConfig) -> str | None:
    """The user key: serve.api_key, else $SRMOA_API_KEY, else the file at $SRMOA_API_KEY_FILE."""
    return cfg.serve.api_key or _key_from_env("SRMOA_API_KEY")


def resolve_admin_key(cfg: SrmoaConfig) -> str | None:
    """The admin key: serve.admin_key, else $SRMOA_ADMIN_KEY, else the file at $SRMOA_ADMIN_KEY_FILE."""
    return cfg.serve.admin_key or _key_from_env("SRMOA_ADMIN_KEY")


def _key_from_env(var: str) -> str | None:
    """$VAR, else the content (stripped) of the file named by $VAR_FILE; a named file that cannot be
    read is a ValueError (serving without the key the operator asked for would open the API)."""
    if os.environ.get(var):
        return os.environ[var]
    path = os.environ.get(f"{var}_FILE")
    if not path:
        return None
    try:
        key = open(path, encoding="utf-8").read().strip()
    except OSError as e:
        raise ValueError(f"${var}_FILE names {path!r}, which cannot be read: {e.strerror}") from None
    if not key:
        raise ValueError(f"${var}_FILE names {path!r}, which is empty")
    return key
