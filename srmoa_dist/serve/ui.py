"""GET /ui: the key-space page, one self-contained HTML file shipped in the package
(serve/static/ui.html: inline CSS and JavaScript, an SVG map, no CDN, works offline). It polls
GET /v1/keyspace (serve/keyspace.py) and redraws; the API key, when the server needs one, is typed
into the page and kept in the browser's localStorage."""

from __future__ import annotations

import functools
from importlib import resources

UI_PATH = "/ui"


@functools.lru_cache(maxsize=1)
def ui_html() -> str:
    """The page's HTML (read once from the package)."""
    return resources.files("srmoa_dist.serve").joinpath("static/ui.html").read_text(encoding="utf-8")


__all__ = ["UI_PATH", "ui_html"]
