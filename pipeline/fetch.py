"""One guarded HTTP GET with explicit limits: what a polite, safe image crawler needs per URL.

Requests are coroutines on one event loop per worker (aiohttp: a C HTTP parser, keep-alive pools,
one TLS context for every connection). A crawl worker used to hold one OS thread per concurrent
request; 32 threads that each wake for every socket read fight over Python's GIL with the
threads that decode images, and on a fast network that contention cost more CPU than the
image work itself (demo world: 2.3 ms of CPU per row with 32 threads, against 1.6 ms with one).
One loop thread holds every connection; the images are decoded beside it (crawl_stage.py).

Every limit is ours, on top of aiohttp: the connection is pinned to the address the SSRF guard
approved (the connector's resolver only hands back that address, so a name is never looked up
twice per request), redirects are followed one hop at a time through the guard and robots.txt,
the per-read timeout, the total deadline over slow bodies, the byte cap before and after
Content-Encoding, per-host concurrency and a host's 429 pause.
"""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import SplitResult, urlsplit

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDictProxy

from vlforge import __version__
from vlforge.pipeline.address_guard import AddressGuard, BlockedAddress, ResolveError
from vlforge.pipeline.image_processing import sniff_format
from vlforge.pipeline.request_url import BadURL, redirect_target, request_url
from vlforge.pipeline.robots import RobotsCache, x_robots_disallows

T = TypeVar("T")

USER_AGENT_TOKEN = "vlforge"
USER_AGENT = (
    f"{USER_AGENT_TOKEN}/{__version__} (image-text research crawler; "
    "honours robots.txt with --respect-robots and X-Robots-Tag noai/noimageai)"
)
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
RETRYABLE_REASONS = frozenset({"timeout", "deadline_exceeded", "connection_error", "http_429"})
ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309 2.5: parse at least the first 500 KiB
# Content types that say nothing about the bytes: object stores and CDNs label images so.
_UNINFORMATIVE_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
# A non-200 body is read (so its connection is kept alive) only when it is this small.
SMALL_ERROR_BODY = 64 * 1024


def is_retryable(reason: str) -> bool:
    """Transient failures worth another try: timeouts, dropped connections, 429 and 5xx."""
    return reason in RETRYABLE_REASONS or (reason.startswith("http_5") and len(reason) == 8)


@dataclass(frozen=True)
class FetchConfig:
    timeout: float = 10.0  # seconds for connect and for each read (img2dataset's default)
    deadline: float = 30.0  # seconds for one attempt in all: redirects, headers and body
    retries: int = 2  # extra attempts for retryable failures (img2dataset: 0)
    backoff: float = 1.0  # first retry waits this long, doubling, with jitter
    max_backoff: float = 30.0  # also caps a server's Retry-After
    max_redirects: int = 5
    max_bytes: int = 32 * 1024 * 1024
    per_host: int = 16  # concurrent requests to one host from one worker
    allowed_networks: tuple[str, ...] = ()  # non-public networks we may contact
    respect_robots: bool = False
    respect_x_robots: bool = True
    user_agent: str = USER_AGENT
    dns_ttl: float = 60.0  # seconds an approved address is reused for a host name


@dataclass
class FetchResult:
    status: str  # ok, failed or blocked
    reason: str = ""
    http_status: int = 0
    body: bytes = b""
    content_type: str = ""
    final_url: str = ""
    attempts: int = 0
    detail: str = ""


class _Failure(Exception):
    def __init__(self, status: str, reason: str, detail: str = "", http_status: int = 0):
        super().__init__(detail or reason)
        self.status, self.reason, self.detail, self.http_status = (
            status,
            reason,
            detail,
            http_status,
        )
        self.retry_after: float | None = None


class _Deadline:
    """The time one attempt may take. Time spent queueing for a host slot or sitting out a
    host's 429 pause is not the server's slowness, so it extends the deadline."""

    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def extend(self, seconds: float) -> None:
        self.at += seconds


@dataclass
class _HostState:
    slots: asyncio.Semaphore
    not_before: float = 0.0  # polite pause after a 429, shared by all requests of this worker


class _ApprovedAddresses(AbstractResolver):
    """The connector's resolver: it answers only with the address the guard approved for the
    request being made (Fetcher._resolve runs first), so a connection can never reach a
    different address than the one checked, whatever the name's DNS answers now."""

    def __init__(self, approved: dict[tuple[str, int], tuple[str, float]]):
        self._approved = approved

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        approved = self._approved.get((host, port))
        if approved is None:
            raise OSError(f"{host}:{port} has no approved address")
        address = approved[0]
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": family,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        pass


class Fetcher:
    """One per worker: `get` is a coroutine on the fetcher's own event loop, which any thread
    can drive with `run`; `fetch` is the blocking form. Per-host limits and the keep-alive
    pool are shared by everything that runs on that loop."""

    def __init__(self, config: FetchConfig, rng: random.Random | None = None):
        self.config = config
        self.guard = AddressGuard(config.allowed_networks)
        self._rng = rng or random.Random(0)
        self._hosts: dict[str, _HostState] = defaultdict(
            lambda: _HostState(asyncio.Semaphore(config.per_host))
        )
        self._tls = ssl.create_default_context()
        self._resolved: dict[tuple[str, int], tuple[str, float]] = {}
        self.robots = RobotsCache(self._fetch_robots_text, USER_AGENT_TOKEN)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._start_lock = threading.Lock()

    # -- public -------------------------------------------------------------------------------
    def run(self, work: Awaitable[T]) -> T:
        """Run a coroutine on the fetcher's loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(work, self._started_loop()).result()

    def fetch(self, url: str) -> FetchResult:
        """GET `url` with retries, blocking; never raises, whatever the URL or the server sends."""
        return self.run(self.get(url))

    async def get(self, url: str) -> FetchResult:
        """GET `url` with retries, on the fetcher's loop; never raises."""
        attempts = 0
        while True:
            attempts += 1
            try:
                result = await self._attempt(url)
                result.attempts = attempts
                return result
            except _Failure as failure:
                retry = failure.status == "failed" and is_retryable(failure.reason)
                if not retry or attempts > self.config.retries:
                    return FetchResult(
                        failure.status,
                        failure.reason,
                        http_status=failure.http_status,
                        final_url=url if isinstance(url, str) else "",
                        attempts=attempts,
                        detail=failure.detail[:300],
                    )
                await asyncio.sleep(self._backoff(attempts, failure.retry_after))
            except Exception as err:  # a bug or a case we did not foresee: this row fails alone
                return FetchResult(
                    "failed",
                    "fetch_error",
                    final_url=url if isinstance(url, str) else "",
                    attempts=attempts,
                    detail=f"{type(err).__name__}: {err}"[:300],
                )

    def close_connections(self) -> None:
        """Drop every idle keep-alive connection (the next request opens a fresh one)."""
        if self._loop is not None:
            self.run(self._close_session())

    def close(self) -> None:
        """Close the connections and stop the loop thread (a later request starts a new one)."""
        with self._start_lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._close_session(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        self._hosts.clear()  # their semaphores belong to the stopped loop

    # -- internals ----------------------------------------------------------------------------
    def _started_loop(self) -> asyncio.AbstractEventLoop:
        with self._start_lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="fetch-loop", daemon=True
                )
                self._thread.start()
            return self._loop

    async def _new_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            resolver=_ApprovedAddresses(self._resolved),
            use_dns_cache=False,  # our guard's cache (dns_ttl) is the only one
            limit=0,  # concurrency is the crawl's and the per-host slots' business
            ssl=self._tls,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # Content-Encoding is undone by us, under the byte cap
            cookie_jar=aiohttp.DummyCookieJar(),  # an image crawler keeps no cookies
            trust_env=False,  # no proxy from the environment: it would bypass the pinning
            skip_auto_headers=("Accept-Encoding",),
        )
        return self._session

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _session_now(self) -> aiohttp.ClientSession:
        return self._session if self._session is not None else await self._new_session()

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.config.max_backoff)
        base = self.config.backoff * (2 ** (attempt - 1))
        return min(base * (0.5 + self._rng.random()), self.config.max_backoff)

    async def _attempt(self, url: str) -> FetchResult:
        deadline = _Deadline(self.config.deadline)
        try:
            current = request_url(url)
        except BadURL as err:
            raise _Failure("failed", "bad_url", str(err)) from err
        for _hop in range(self.config.max_redirects + 1):
            parts = urlsplit(current)
            origin = f"{parts.scheme}://{parts.netloc}"
            if self.config.respect_robots and not await self.robots.allowed(origin, current):
                raise _Failure("blocked", "robots_txt", f"robots.txt disallows {parts.path}")
            status, headers, body = await self._request(parts, deadline, self.config.max_bytes)
            if status in REDIRECT_CODES and headers.get("location"):
                try:
                    current = redirect_target(current, headers["location"])
                except BadURL as err:
                    raise _Failure("failed", "bad_redirect", str(err), status) from err
                continue
            if self.config.respect_x_robots and x_robots_disallows(
                headers.getall("x-robots-tag", []), USER_AGENT_TOKEN
            ):
                raise _Failure("blocked", "x_robots_tag", "X-Robots-Tag opts out", status)
            if status == 429:
                failure = _Failure("failed", "http_429", "too many requests", status)
                failure.retry_after = _retry_after(headers.get("retry-after"))
                self._pause_host(parts.netloc, failure.retry_after)
                raise failure
            if status != 200:
                raise _Failure("failed", f"http_{status}", "", status)
            content_type = (headers.get("content-type") or "").split(";")[0].strip().lower()
            # The bytes decide; the header only names the failure when they are not an image.
            informative = content_type not in _UNINFORMATIVE_TYPES
            if informative and not content_type.startswith("image/") and not sniff_format(body):
                raise _Failure("failed", "wrong_content_type", content_type, status)
            return FetchResult(
                "ok", "", status, body=body, content_type=content_type, final_url=current
            )
        raise _Failure("failed", "too_many_redirects", f"more than {self.config.max_redirects}")

    def _pause_host(self, netloc: str, retry_after: float | None) -> None:
        pause = min(retry_after if retry_after is not None else self.config.backoff, 60.0)
        state = self._hosts[netloc]
        state.not_before = max(state.not_before, time.monotonic() + pause)

    async def _resolve(self, host: str, port: int) -> str:
        """The guard's approved address, remembered for `dns_ttl` seconds per host name."""
        now = time.monotonic()
        cached = self._resolved.get((host, port))
        if cached is not None and cached[1] > now:
            return cached[0]
        loop = asyncio.get_running_loop()
        try:  # getaddrinfo blocks: off the loop, so other requests go on meanwhile
            address = await loop.run_in_executor(None, self.guard.resolve, host, port)
        except BlockedAddress as err:
            raise _Failure("blocked", "private_address", str(err)) from err
        except ResolveError as err:
            raise _Failure("failed", "dns_error", str(err)) from err
        self._resolved[(host, port)] = (address, time.monotonic() + self.config.dns_ttl)
        return address

    async def _request(
        self,
        parts: SplitResult,
        deadline: _Deadline,
        max_bytes: int,
        truncate: bool = False,
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        await self._resolve(host, port)
        state = self._hosts[parts.netloc]
        queued = time.monotonic()
        async with state.slots:
            wait = state.not_before - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            deadline.extend(time.monotonic() - queued)
            return await self._exchange(parts, deadline, max_bytes, truncate)

    async def _exchange(
        self, parts: SplitResult, deadline: _Deadline, max_bytes: int, truncate: bool
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        remaining = deadline.remaining()
        if remaining <= 0:
            raise _Failure("failed", "deadline_exceeded", "deadline before request")
        headers = {
            "User-Agent": self.config.user_agent,
            "Accept": "image/*,*/*;q=0.5",
            "Accept-Encoding": "identity",
        }
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.config.timeout, sock_read=self.config.timeout
        )
        session = await self._session_now()
        try:
            async with asyncio.timeout(remaining):  # the whole exchange, body included
                async with session.get(
                    yarl.URL(parts.geturl(), encoded=True),  # request_url encoded it already
                    headers=headers,
                    allow_redirects=False,
                    timeout=timeout,
                ) as response:
                    declared = response.content_length
                    if response.status != 200:
                        if declared is not None and declared <= SMALL_ERROR_BODY:
                            await response.read()  # read to its end: the connection stays open
                        return response.status, response.headers, b""
                    if declared is not None and declared > max_bytes and not truncate:
                        raise _Failure("failed", "too_large", f"Content-Length {declared}", 200)
                    body = await _read_body(response, max_bytes, truncate)
                    encoding = (response.headers.get("content-encoding") or "").strip().lower()
                    if encoding and encoding != "identity":
                        body = _decode_content(body, encoding, max_bytes)
                    return response.status, response.headers, body
        except _Failure:
            raise
        except TimeoutError as err:  # asyncio's deadline and aiohttp's per-read timeouts alike
            if deadline.remaining() <= 0:
                raise _Failure("failed", "deadline_exceeded", "deadline passed") from err
            raise _Failure("failed", "timeout", str(err) or "timed out") from err
        except aiohttp.ClientPayloadError as err:
            raise _Failure("failed", "truncated", str(err)) from err
        except (aiohttp.ClientSSLError, ssl.SSLError) as err:
            raise _Failure("failed", "tls_error", str(err)) from err
        except (OSError, aiohttp.ClientError) as err:
            raise _Failure("failed", "connection_error", f"{type(err).__name__}: {err}") from err

    async def _fetch_robots_text(self, url: str) -> tuple[int, str]:
        """robots.txt of an origin: (status, text), redirects followed (RFC 9309 2.3.1.2)."""
        deadline = _Deadline(self.config.deadline)
        current = url
        for _hop in range(self.config.max_redirects + 1):
            parts = urlsplit(current)
            try:
                status, headers, body = await self._request(parts, deadline, ROBOTS_MAX_BYTES, True)
            except _Failure as failure:
                if failure.status == "blocked":
                    return 403, ""
                raise
            if status in REDIRECT_CODES and headers.get("location"):
                current = redirect_target(current, headers["location"])
                continue
            return status, body.decode("utf-8", "replace")
        return 404, ""  # more than five redirects: RFC 9309 2.3.1.2 reads that as unavailable


async def _read_body(response: aiohttp.ClientResponse, max_bytes: int, truncate: bool) -> bytes:
    """The body, cut at `max_bytes` when `truncate`; over the cap it fails as too_large."""
    if response.content_length is not None and response.content_length <= max_bytes:
        return await response.read()  # a declared length within the cap: one read
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await response.content.read(min(65536, max_bytes + 1 - size))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        chunks.append(chunk)
        if size > max_bytes:
            if truncate:
                return b"".join(chunks)[:max_bytes]
            raise _Failure("failed", "too_large", f"body over {max_bytes} bytes", 200)


def _decode_content(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """Undo `Content-Encoding` (gzip, deflate; applied in order, so undone in reverse)."""
    for coding in reversed([c.strip() for c in encoding.split(",") if c.strip()]):
        if coding in ("gzip", "x-gzip"):
            body = _inflate(body, zlib.MAX_WBITS | 16, max_bytes)
        elif coding == "deflate":
            try:  # RFC 9110 deflate is zlib-wrapped; some servers send raw deflate
                body = _inflate(body, zlib.MAX_WBITS, max_bytes)
            except zlib.error:
                body = _inflate(body, -zlib.MAX_WBITS, max_bytes)
        elif coding != "identity":
            raise _Failure("failed", "unsupported_encoding", f"Content-Encoding {coding}", 200)
    return body


def _inflate(data: bytes, wbits: int, max_bytes: int) -> bytes:
    try:
        inflater = zlib.decompressobj(wbits)
        out = inflater.decompress(data, max_bytes + 1)
    except zlib.error:
        if wbits == zlib.MAX_WBITS:
            raise
        raise _Failure("failed", "decode_error", "corrupt compressed body", 200) from None
    if len(out) > max_bytes:
        raise _Failure("failed", "too_large", f"decoded body over {max_bytes} bytes", 200)
    return out


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP-date: fall back to our own backoff
