"""One guarded HTTP GET with explicit limits: what a polite, safe image crawler needs per URL.

Built on http.client rather than requests because the connection must be pinned to the address
the SSRF guard approved (requests re-resolves the name), and because every limit (per-read
timeout, total deadline over slow bodies, byte cap, redirect count) must be enforced by us.
Connections are kept alive and reused per approved address, and one TLS context serves every
connection of a worker: a new TCP handshake per image, and loading the CA store per TLS
connection, cost more CPU than the image's resize on a fast network.
"""

from __future__ import annotations

import http.client
import random
import socket
import ssl
import threading
import time
import urllib.parse
import zlib
from collections import defaultdict
from dataclasses import dataclass

from vlforge import __version__
from vlforge.pipeline.address_guard import AddressGuard, BlockedAddress, ResolveError
from vlforge.pipeline.image_processing import sniff_format
from vlforge.pipeline.request_url import BadURL, redirect_target, request_url
from vlforge.pipeline.robots import RobotsCache, x_robots_disallows

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
# A reused keep-alive connection the server has since closed fails like this before any byte
# of the response: the request is then sent once more on a fresh connection.
_STALE_CONNECTION = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


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


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an approved address while sending the original Host header."""

    def __init__(self, host: str, port: int, address: str, timeout: float, context=None):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """TLS to an approved address, verifying the certificate against the host name (SNI)."""

    def __init__(self, host: str, port: int, address: str, timeout: float, context=None):
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


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
    semaphore: threading.BoundedSemaphore
    not_before: float = 0.0  # polite pause after a 429, shared by all threads of this worker


class _ConnectionPool:
    """Idle keep-alive connections per (scheme, host, port, approved address)."""

    def __init__(self, per_key: int):
        self._idle: dict[tuple, list[http.client.HTTPConnection]] = defaultdict(list)
        self._lock = threading.Lock()
        self._per_key = per_key

    def take(self, key: tuple) -> http.client.HTTPConnection | None:
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def give_back(self, key: tuple, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle[key]
            if len(idle) < self._per_key:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


class Fetcher:
    """Thread-safe fetcher shared by a worker's threads (per-host limits live here)."""

    def __init__(self, config: FetchConfig, rng: random.Random | None = None):
        self.config = config
        self.guard = AddressGuard(config.allowed_networks)
        self._rng = rng or random.Random(0)
        self._hosts: dict[str, _HostState] = defaultdict(
            lambda: _HostState(threading.BoundedSemaphore(config.per_host))
        )
        self._hosts_lock = threading.Lock()
        self._tls = ssl.create_default_context()
        self._pool = _ConnectionPool(config.per_host)
        self._resolved: dict[tuple[str, int], tuple[str, float]] = {}
        self.robots = RobotsCache(self._fetch_robots_text, USER_AGENT_TOKEN)

    # -- public -------------------------------------------------------------------------------
    def fetch(self, url: str) -> FetchResult:
        """GET `url` with retries; never raises, whatever the URL or the server sends."""
        attempts = 0
        while True:
            attempts += 1
            try:
                result = self._attempt(url)
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
                time.sleep(self._backoff(attempts, failure.retry_after))
            except Exception as err:  # a bug or a case we did not foresee: this row fails alone
                return FetchResult(
                    "failed",
                    "fetch_error",
                    final_url=url if isinstance(url, str) else "",
                    attempts=attempts,
                    detail=f"{type(err).__name__}: {err}"[:300],
                )

    def close(self) -> None:
        """Close idle keep-alive connections."""
        self._pool.close()

    # -- internals ----------------------------------------------------------------------------
    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.config.max_backoff)
        base = self.config.backoff * (2 ** (attempt - 1))
        return min(base * (0.5 + self._rng.random()), self.config.max_backoff)

    def _host(self, netloc: str) -> _HostState:
        with self._hosts_lock:
            return self._hosts[netloc]

    def _attempt(self, url: str) -> FetchResult:
        deadline = _Deadline(self.config.deadline)
        try:
            current = request_url(url)
        except BadURL as err:
            raise _Failure("failed", "bad_url", str(err)) from err
        for _hop in range(self.config.max_redirects + 1):
            parts = urllib.parse.urlsplit(current)
            origin = f"{parts.scheme}://{parts.netloc}"
            if self.config.respect_robots and not self.robots.allowed(origin, current):
                raise _Failure("blocked", "robots_txt", f"robots.txt disallows {parts.path}")
            status, headers, body = self._request(parts, deadline, self.config.max_bytes)
            if status in REDIRECT_CODES and headers.get("location"):
                try:
                    current = redirect_target(current, headers["location"])
                except BadURL as err:
                    raise _Failure("failed", "bad_redirect", str(err), status) from err
                continue
            if self.config.respect_x_robots and x_robots_disallows(
                headers.get_all("x-robots-tag") or [], USER_AGENT_TOKEN
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
        state = self._host(netloc)
        state.not_before = max(state.not_before, time.monotonic() + pause)

    def _resolve(self, host: str, port: int) -> str:
        """The guard's approved address, remembered for `dns_ttl` seconds per host name."""
        now = time.monotonic()
        cached = self._resolved.get((host, port))
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            address = self.guard.resolve(host, port)
        except BlockedAddress as err:
            raise _Failure("blocked", "private_address", str(err)) from err
        except ResolveError as err:
            raise _Failure("failed", "dns_error", str(err)) from err
        self._resolved[(host, port)] = (address, now + self.config.dns_ttl)
        return address

    def _request(
        self,
        parts: urllib.parse.SplitResult,
        deadline: _Deadline,
        max_bytes: int,
        truncate: bool = False,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = self._resolve(host, port)
        state = self._host(parts.netloc)
        queued = time.monotonic()
        with state.semaphore:
            wait = state.not_before - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            deadline.extend(time.monotonic() - queued)
            key = (parts.scheme, host, port, address)
            return self._exchange(parts, key, deadline, max_bytes, truncate)

    def _exchange(
        self,
        parts: urllib.parse.SplitResult,
        key: tuple,
        deadline: _Deadline,
        max_bytes: int,
        truncate: bool,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        remaining = deadline.remaining()
        if remaining <= 0:
            raise _Failure("failed", "deadline_exceeded", "deadline before request")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        headers = {
            "User-Agent": self.config.user_agent,
            "Accept": "image/*,*/*;q=0.5",
            "Accept-Encoding": "identity",
        }
        conn = self._pool.take(key)
        reused = conn is not None
        if conn is None:
            conn = self._connection(key, remaining)
        keep = False
        try:
            if conn.sock is not None:
                conn.sock.settimeout(min(self.config.timeout, remaining))
            try:
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
            except _STALE_CONNECTION:
                if not reused:
                    raise
                conn.close()  # the server closed the idle connection: one fresh try
                conn = self._connection(key, deadline.remaining())
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
            if response.status != 200:
                return response.status, response.msg, b""
            declared = response.length
            if declared is not None and declared > max_bytes and not truncate:
                raise _Failure("failed", "too_large", f"Content-Length {declared}", 200)
            body, complete = self._read_body(conn, response, deadline, max_bytes, truncate)
            response.close()  # frees the connection for its next request (the socket stays)
            if declared is not None and len(body) < declared and complete:
                raise _Failure("failed", "truncated", f"{len(body)} of {declared} bytes", 200)
            encoding = (response.getheader("content-encoding") or "").strip().lower()
            keep = complete and not response.will_close
            if encoding and encoding != "identity":
                body = _decode_content(body, encoding, max_bytes)
            return response.status, response.msg, body
        except _Failure:
            raise
        except TimeoutError as err:
            if deadline.remaining() <= 0:
                raise _Failure("failed", "deadline_exceeded", str(err)) from err
            raise _Failure("failed", "timeout", str(err) or "timed out") from err
        except http.client.IncompleteRead as err:
            raise _Failure(
                "failed", "truncated", f"incomplete read: {len(err.partial)} bytes"
            ) from err
        except ssl.SSLError as err:
            raise _Failure("failed", "tls_error", str(err)) from err
        except (OSError, http.client.HTTPException) as err:
            raise _Failure("failed", "connection_error", f"{type(err).__name__}: {err}") from err
        finally:
            if keep:
                self._pool.give_back(key, conn)
            else:
                conn.close()

    def _connection(self, key: tuple, remaining: float) -> http.client.HTTPConnection:
        scheme, host, port, address = key
        cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        timeout = max(0.01, min(self.config.timeout, remaining))
        return cls(host, port, address, timeout, self._tls)

    def _read_body(
        self,
        conn: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
        deadline: _Deadline,
        max_bytes: int,
        truncate: bool,
    ) -> tuple[bytes, bool]:
        """The body (and whether it was read to its end), cut at `max_bytes` when `truncate`."""
        chunks: list[bytes] = []
        size = 0
        while True:
            remaining = deadline.remaining()
            if remaining <= 0:
                raise _Failure("failed", "deadline_exceeded", f"body still arriving after {size} B")
            if conn.sock is not None:  # a slow body must not outlive the total deadline
                conn.sock.settimeout(min(self.config.timeout, remaining))
            if response.length == 0:  # all of a declared length is in
                return b"".join(chunks), True
            # With a known length, ask for all of it at once: one read call instead of many.
            want = response.length or 65536
            chunk = response.read1(min(want, max_bytes + 1 - size))
            if not chunk:
                return b"".join(chunks), True
            size += len(chunk)
            chunks.append(chunk)
            if size > max_bytes:
                if truncate:
                    return b"".join(chunks)[:max_bytes], False
                raise _Failure("failed", "too_large", f"body over {max_bytes} bytes", 200)

    def _fetch_robots_text(self, url: str) -> tuple[int, str]:
        """robots.txt of an origin: (status, text), redirects followed (RFC 9309 2.3.1.2)."""
        deadline = _Deadline(self.config.deadline)
        current = url
        for _hop in range(self.config.max_redirects + 1):
            parts = urllib.parse.urlsplit(current)
            try:
                status, headers, body = self._request(parts, deadline, ROBOTS_MAX_BYTES, True)
            except _Failure as failure:
                if failure.status == "blocked":
                    return 403, ""
                raise
            if status in REDIRECT_CODES and headers.get("location"):
                current = redirect_target(current, headers["location"])
                continue
            return status, body.decode("utf-8", "replace")
        return 404, ""  # more than five redirects: RFC 9309 2.3.1.2 reads that as unavailable


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
