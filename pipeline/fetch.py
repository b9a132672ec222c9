"""One guarded HTTP GET with explicit limits: what a polite, safe image crawler needs per URL.

Built on http.client rather than requests because the connection must be pinned to the address
the SSRF guard approved (requests re-resolves the name), and because every limit (per-read
timeout, total deadline over slow bodies, byte cap, redirect count) must be enforced by us.
"""

from __future__ import annotations

import http.client
import random
import socket
import ssl
import threading
import time
import urllib.parse
from collections import defaultdict
from dataclasses import dataclass

from vlforge import __version__
from vlforge.pipeline.address_guard import AddressGuard, BlockedAddress, ResolveError
from vlforge.pipeline.robots import RobotsCache, x_robots_disallows

USER_AGENT_TOKEN = "vlforge"
USER_AGENT = (
    f"{USER_AGENT_TOKEN}/{__version__} (image-text research crawler; "
    "honours robots.txt with --respect-robots and X-Robots-Tag noai/noimageai)"
)
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
RETRYABLE_REASONS = frozenset({"timeout", "deadline_exceeded", "connection_error", "http_429"})


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

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """TLS to an approved address, verifying the certificate against the host name (SNI)."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
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
        self.robots = RobotsCache(self._fetch_robots_text, USER_AGENT_TOKEN)

    # -- public -------------------------------------------------------------------------------
    def fetch(self, url: str) -> FetchResult:
        """GET `url` with retries; never raises for network or server trouble."""
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
                        final_url=url,
                        attempts=attempts,
                        detail=failure.detail[:300],
                    )
                time.sleep(self._backoff(attempts, failure.retry_after))

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
        current = url
        for _hop in range(self.config.max_redirects + 1):
            parts = urllib.parse.urlsplit(current)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise _Failure("failed", "bad_url", f"unsupported URL {current[:200]}")
            origin = f"{parts.scheme}://{parts.netloc}"
            if self.config.respect_robots and not self.robots.allowed(origin, current):
                raise _Failure("blocked", "robots_txt", f"robots.txt disallows {parts.path}")
            status, headers, body = self._request(parts, deadline, self.config.max_bytes)
            if status in REDIRECT_CODES and headers.get("location"):
                current = urllib.parse.urljoin(current, headers["location"])
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
            if content_type and not content_type.startswith("image/"):
                raise _Failure("failed", "wrong_content_type", content_type, status)
            return FetchResult(
                "ok", "", status, body=body, content_type=content_type, final_url=current
            )
        raise _Failure("failed", "too_many_redirects", f"more than {self.config.max_redirects}")

    def _pause_host(self, netloc: str, retry_after: float | None) -> None:
        pause = min(retry_after if retry_after is not None else self.config.backoff, 60.0)
        state = self._host(netloc)
        state.not_before = max(state.not_before, time.monotonic() + pause)

    def _request(
        self, parts: urllib.parse.SplitResult, deadline: _Deadline, max_bytes: int
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            address = self.guard.resolve(host, port)
        except BlockedAddress as err:
            raise _Failure("blocked", "private_address", str(err)) from err
        except ResolveError as err:
            raise _Failure("failed", "dns_error", str(err)) from err
        state = self._host(parts.netloc)
        queued = time.monotonic()
        with state.semaphore:
            wait = state.not_before - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            deadline.extend(time.monotonic() - queued)
            return self._exchange(parts, host, port, address, deadline, max_bytes)

    def _exchange(
        self,
        parts: urllib.parse.SplitResult,
        host: str,
        port: int,
        address: str,
        deadline: _Deadline,
        max_bytes: int,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        timeout = self.config.timeout
        remaining = deadline.remaining()
        if remaining <= 0:
            raise _Failure("failed", "deadline_exceeded", "deadline before request")
        cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        conn = cls(host, port, address, timeout=min(timeout, remaining))
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            conn.request(
                "GET",
                path,
                headers={
                    "User-Agent": self.config.user_agent,
                    "Accept": "image/*,*/*;q=0.5",
                    "Accept-Encoding": "identity",
                    "Connection": "close",
                },
            )
            response = conn.getresponse()
            if response.status in REDIRECT_CODES or response.status != 200:
                return response.status, response.msg, b""
            declared = response.length
            if declared is not None and declared > max_bytes:
                raise _Failure("failed", "too_large", f"Content-Length {declared}", 200)
            body = self._read_body(conn, response, deadline, max_bytes)
            if declared is not None and len(body) < declared:
                raise _Failure("failed", "truncated", f"{len(body)} of {declared} bytes", 200)
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
            conn.close()

    def _read_body(
        self,
        conn: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
        deadline: _Deadline,
        max_bytes: int,
    ) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            remaining = deadline.remaining()
            if remaining <= 0:
                raise _Failure("failed", "deadline_exceeded", f"body still arriving after {size} B")
            if conn.sock is not None:  # a slow body must not outlive the total deadline
                conn.sock.settimeout(min(self.config.timeout, remaining))
            chunk = response.read1(65536)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > max_bytes:
                raise _Failure("failed", "too_large", f"body over {max_bytes} bytes", 200)
            chunks.append(chunk)

    def _fetch_robots_text(self, url: str) -> tuple[int, str]:
        parts = urllib.parse.urlsplit(url)
        deadline = _Deadline(self.config.deadline)
        try:
            status, _headers, body = self._request(parts, deadline, 512 * 1024)
        except _Failure as failure:
            if failure.status == "blocked":
                return 403, ""
            raise
        return status, body.decode("utf-8", "replace")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP-date: fall back to our own backoff
