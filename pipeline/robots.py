"""Site opt-outs: robots.txt (RFC 9309) and the X-Robots-Tag header directives img2dataset honours."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

from protego import Protego

# img2dataset's default set: sites use these to opt images out of AI training and indexing.
DISALLOWED_X_ROBOTS_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})


def x_robots_disallows(
    header_values: Iterable[str],
    user_agent_token: str,
    directives: frozenset[str] = DISALLOWED_X_ROBOTS_DIRECTIVES,
) -> bool:
    """True if any X-Robots-Tag value opts out for all agents or for `user_agent_token`.

    A value is either `noai, noindex` (all agents) or `agent: noai` (one agent), as img2dataset reads it.
    """
    token = user_agent_token.lower()
    for value in header_values:
        head, sep, tail = value.partition(":")
        agent = head.strip().lower() if sep and "," not in head else None
        body = tail if agent is not None else value
        found = {d.strip().lower() for d in body.split(",")}
        if (agent is None or agent == token) and found & directives:
            return True
    return False


class RobotsCache:
    """robots.txt per origin, fetched once per worker with the crawler's own guarded fetch.

    RFC 9309: the longest matching rule wins (Allow on a tie), `*` and `$` are wildcards, a 4xx
    robots.txt means no rules (allow), a 5xx or unreachable one means disallow all; 429 is read
    as unreachable, since the site is asking us to stay away. Matching is Protego's (Scrapy's
    RFC 9309 parser): `urllib.robotparser` takes the first match and knows no wildcards.
    """

    def __init__(
        self, fetch_text: Callable[[str], Awaitable[tuple[int, str]]], user_agent_token: str
    ):
        self._fetch_text = fetch_text
        self._token = user_agent_token
        self._parsers: dict[str, Protego | bool] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def allowed(self, origin: str, url: str) -> bool:
        """Whether our agent may fetch `url` (a coroutine on the fetcher's loop)."""
        if origin not in self._parsers:
            lock = self._locks.setdefault(origin, asyncio.Lock())
            async with lock:  # one fetch per origin even when many requests ask at once
                if origin not in self._parsers:
                    self._parsers[origin] = await self._load(origin)
        parser = self._parsers[origin]
        if isinstance(parser, bool):
            return parser
        return parser.can_fetch(url, self._token)

    async def _load(self, origin: str) -> Protego | bool:
        try:
            status, text = await self._fetch_text(origin + "/robots.txt")
        except Exception:  # unreachable robots.txt: RFC 9309 says assume complete disallow
            return False
        if status == 429:
            return False
        if 400 <= status < 500:
            return True
        if status >= 500 or status < 200 or status >= 300:
            return False
        return Protego.parse(text)
