"""URL normalization and the stable sample key derived from it."""

from __future__ import annotations

import hashlib
import urllib.parse

from vlforge.pipeline.request_url import BadURL, request_url

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_url(url: str) -> str:
    """The URL as a browser requests it (so `a b.jpg` and `a%20b.jpg` are one URL, one key).

    A URL no browser could fetch keeps a light normalization (lower-case scheme and host, no
    default port or fragment): its row fails at fetch time with the reason, under a stable key.
    """
    try:
        return request_url(url)
    except BadURL:
        pass
    url = str(url).strip()
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return url
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{host}:{port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return urllib.parse.urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))


def sample_key(normalized_url: str) -> str:
    """Stable WebDataset key: 16 hex digits of SHA-1 of the normalized URL (no dots, no slashes)."""
    return hashlib.sha1(normalized_url.encode("utf-8")).hexdigest()[:16]
