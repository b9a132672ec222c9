"""URLs as they come from real lists, made into what a browser would put on the wire.

Web-scraped lists hold URLs with spaces, raw non-ASCII paths and host names, fragments,
backslashes and stray control characters. A browser fixes these up before it sends a request
(the WHATWG URL standard): host names become IDNA A-labels, the path and query are
percent-encoded as UTF-8, the fragment is never sent, and an escape that is already there
(`%20`) is left alone rather than encoded twice. `urllib.parse` parses but does none of this, so
the crawler does it here, once per URL and once per redirect `Location`.
"""

from __future__ import annotations

import contextlib
import re
import urllib.parse

import idna

# WHATWG percent-encode sets, written as what stays literal. '%' stays so that existing escapes
# are not encoded twice (a browser does the same: a lone '%' goes out as it is).
_PATH_SAFE = "/%:@!$&'()*+,;=-._~[]|^`{}"
_QUERY_SAFE = "/?%:@!$&'()*+,;=-._~[]|^`{}\\"
_STRIP_INSIDE = re.compile(r"[\t\n\r]")  # the standard removes these anywhere in the URL
_C0_AND_SPACE = "".join(chr(c) for c in range(0x21))


class BadURL(ValueError):
    """The URL cannot be requested (unparseable, unsupported scheme, bad host or port)."""


def request_url(url: str) -> str:
    """The URL as a browser would send it; raises BadURL when no browser could fetch it."""
    if not isinstance(url, str):
        raise BadURL(f"not a string: {type(url).__name__}")
    cleaned = _STRIP_INSIDE.sub("", url.strip(_C0_AND_SPACE))
    try:
        parts = urllib.parse.urlsplit(cleaned)
        port = parts.port  # raises for a port that is not a number or is above 65535
    except ValueError as err:
        raise BadURL(f"{err}: {cleaned[:200]}") from err
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise BadURL(f"unsupported scheme {scheme or '(none)'!r}: {cleaned[:200]}")
    host = _ascii_host(parts.hostname or "")
    netloc = host if port in (None, 80 if scheme == "http" else 443) else f"{host}:{port}"
    # Special schemes treat '\' as '/', as browsers do.
    path = urllib.parse.quote(parts.path.replace("\\", "/") or "/", safe=_PATH_SAFE)
    query = urllib.parse.quote(parts.query, safe=_QUERY_SAFE)
    return urllib.parse.urlunsplit((scheme, netloc, path, query, ""))


def redirect_target(base: str, location: str) -> str:
    """The request URL a `Location` header points to, relative to `base`.

    http.client decodes header bytes as Latin-1; servers that put raw UTF-8 in `Location` meant
    UTF-8 (browsers read it so), so the bytes are re-read that way first.
    """
    with contextlib.suppress(UnicodeEncodeError, UnicodeDecodeError):
        location = location.encode("latin-1").decode("utf-8")
    try:
        joined = urllib.parse.urljoin(base, location.strip(_C0_AND_SPACE))
    except ValueError as err:
        raise BadURL(f"bad Location {location[:200]!r}: {err}") from err
    return request_url(joined)


def _ascii_host(host: str) -> str:
    if not host:
        raise BadURL("no host name")
    if ":" in host:  # an IPv6 literal, already validated by urlsplit
        return f"[{host}]"
    host = urllib.parse.unquote(host).rstrip(".").lower()
    if host.isascii():
        if not re.fullmatch(r"[a-z0-9._-]+", host) or ".." in host:
            raise BadURL(f"bad host name {host[:100]!r}")
        return host
    try:  # IDNA 2008 with UTS #46 mapping, what browsers use
        return idna.encode(host, uts46=True).decode("ascii")
    except idna.IDNAError as err:
        raise BadURL(f"bad host name {host[:100]!r}: {err}") from err
