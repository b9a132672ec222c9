"""The demo world's web server on 127.0.0.1: renders images on request and injects faults.

Stateless apart from the first-request memory of flaky_503/rate_limited paths: every answer is a
function of the request path (scheme in vlforge/world/url_list.py). Each fault behaves as
documented there and in mess.KINDS:

    http_404 / http_500      that status, always
    flaky_503, rate_limited  first request to the path: 503, or 429 with Retry-After: 1; then the image
    always_429               429 with Retry-After: 1, every time
    timeout                  nothing at all for hold_seconds, then the image
    slow_body                headers at once, then the body one byte per 0.1 s for slow_body_seconds
    truncated                full Content-Length, half the body, connection closed
    corrupt                  image/jpeg: FF D8 FF, bytes no decoder accepts, FF D9
    redirect_loop            302 to itself, forever
    redirect_ok              302 -> ?hop=1 -> 302 -> ?hop=2 -> the image
    wrong_content_type       200 text/html page
    bad_magic                200 image/jpeg with an HTML body
    oversize                 Content-Length 40 MiB, streamed from one repeated buffer
    bomb                     a valid 12000x12000 1-bit PNG of ~20 KB
    connection_reset         the socket is reset without any response
    x_robots_noai            the image with `X-Robots-Tag: noai`
    redirect_private         302 to http://169.254.169.254/latest/meta-data/x.jpg
    hold (tests only)        blocks until release_holds() (or the server stops), then the image
"""

from __future__ import annotations

import http.server
import io
import random
import re
import socket
import struct
import threading
import urllib.parse
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterable
from functools import cache

from vlforge.world.render import render_scene
from vlforge.world.scene import sample_scene
from vlforge.world.url_list import (
    JPEG_QUALITY,
    PRIVATE_REDIRECT_TARGET,
    ROBOTS_DISALLOWED_PREFIX,
    TINY_SIZE,
    WIDE_SIZE,
    fault_path,
    image_path,
    near_params,
)

ROBOTS_TXT = (
    "# vlforge demo world: everything but the private prefix may be crawled\n"
    f"User-agent: *\nDisallow: {ROBOTS_DISALLOWED_PREFIX}\n"
)
OVERSIZE_BYTES = 40 * 1024 * 1024
# 12000^2 = 144 Mpx: over the crawler's 100 Mpx guard, under the 179 Mpx at which PIL's own
# Image.open raises (a 20000^2 header would surface as a generic decode error, not a bomb).
BOMB_SIDE = 12_000
TRICKLE_INTERVAL = 0.1  # s between slow-body bytes: far below any sane per-read timeout
HTML = b"<!doctype html><html><head><title>Not an image</title></head><body>hello</body></html>\n"

_IMAGE = re.compile(r"^/w/(\d+)/(img|tiny|wide)/(\d+)\.jpg$")
_SOURCED = re.compile(r"^/w/(\d+)/(dupimg|near)/(\d+)-(\d+)\.jpg$")
_FAULT = re.compile(r"^/w/(\d+)/fault/([a-z0-9_]+)/(\d+)\.jpg$")
_PRIVATE = re.compile("^" + re.escape(ROBOTS_DISALLOWED_PREFIX) + r"(\d+)/(\d+)\.jpg$")

ImageKey = tuple  # ("img"|"tiny"|"wide", seed, index) or ("near", seed, source, index)


class RequestLog(Counter):
    """Requests per path (with query). Increments take a lock; handler threads race otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def hit(self, path: str) -> int:
        with self._lock:
            self[path] += 1
            return self[path]


@cache
def bomb_png() -> bytes:
    """A valid PNG declaring 12000x12000 1-bit grey pixels; all zeros, so ~20 KB compressed."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + BOMB_SIDE // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row * 1000) for _ in range(BOMB_SIDE // 1000)) + packer.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def corrupt_jpeg(seed: int, index: int) -> bytes:
    """JPEG start and end markers around bytes that are never a marker (no 0xFF, and the first one
    after SOI is no known marker), so PIL and OpenCV both refuse it instead of guessing."""
    noise = random.Random(f"corrupt:{seed}:{index}").randbytes(2048)
    return b"\xff\xd8\xff" + bytes(1 + b % 0xBF for b in noise) + b"\xff\xd9"


def encode_jpeg(key: ImageKey) -> bytes:
    """Render and encode one image; deterministic, so dupimg bytes equal their source's."""
    variant, seed = key[0], key[1]
    if variant == "near":
        source, index = key[2], key[3]
        jitter, quality = near_params(index)
        image = render_scene(sample_scene(seed, source), jitter=jitter)
    else:
        size = TINY_SIZE if variant == "tiny" else WIDE_SIZE if variant == "wide" else ()
        image, quality = render_scene(sample_scene(seed, key[2], *size)), JPEG_QUALITY
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def image_key(path: str) -> ImageKey | None:
    """The image a path serves when it serves one (fault paths: the image behind the fault)."""
    path = urllib.parse.urlsplit(path).path
    if m := _IMAGE.match(path):
        return (m[2], int(m[1]), int(m[3]))
    if m := _SOURCED.match(path):
        seed, source, index = int(m[1]), int(m[3]), int(m[4])
        return ("img", seed, source) if m[2] == "dupimg" else ("near", seed, source, index)
    if m := _FAULT.match(path):
        return ("img", int(m[1]), int(m[3]))
    if m := _PRIVATE.match(path):
        return ("img", int(m[1]), int(m[2]))
    return None


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stopping must not wait for held or trickling requests
    request_queue_size = 1024  # crawlers open dozens of connections at once
    world: WorldServer

    def handle_error(self, request, client_address) -> None:  # type: ignore[override]
        import sys

        # A crawler hanging up on a slow, huge or held response is the point, not an error.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection; the crawler closes anyway
    server: _HTTPServer
    server_version = "vlforge-world/1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # the default prints a line per request

    def do_GET(self) -> None:  # noqa: N802
        world = self.server.world
        parts = urllib.parse.urlsplit(self.path)
        if parts.scheme:  # absolute-form request line ("GET http://host/path"): keep the path
            self.path = urllib.parse.urlunsplit(("", "", parts.path, parts.query, ""))
            parts = urllib.parse.urlsplit(self.path)
        world.request_log.hit(self.path)
        if parts.path == "/robots.txt":
            return self._send(200, ROBOTS_TXT.encode(), "text/plain; charset=utf-8")
        if m := _FAULT.match(parts.path):
            return self._fault(m[2], int(m[1]), int(m[3]), parts)
        key = image_key(parts.path)
        if key is None:
            return self._send(404, b"not found\n", "text/plain")
        return self._image(key)

    # -- responses ------------------------------------------------------------------------------
    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _image(self, key: ImageKey, headers: dict | None = None) -> None:
        self._send(200, self.server.world.image_bytes(key), "image/jpeg", headers)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _fault(self, kind: str, seed: int, index: int, parts: urllib.parse.SplitResult) -> None:
        world = self.server.world
        key = ("img", seed, index)
        if kind == "http_404":
            self._send(404, b"not found\n", "text/plain")
        elif kind == "http_500":
            self._send(500, b"internal server error\n", "text/plain")
        elif kind == "flaky_503":
            if world.first_request(parts.path):
                self._send(503, b"service unavailable\n", "text/plain")
            else:
                self._image(key)
        elif kind == "rate_limited":
            if world.first_request(parts.path):
                self._send(429, b"slow down\n", "text/plain", {"Retry-After": "1"})
            else:
                self._image(key)
        elif kind == "always_429":
            self._send(429, b"slow down\n", "text/plain", {"Retry-After": "1"})
        elif kind == "timeout":
            if not world.stopping.wait(world.hold_seconds):
                self._image(key)
        elif kind == "hold":
            world.wait_for_release()
            if not world.stopping.is_set():
                self._image(key)
        elif kind == "slow_body":
            self._slow_body(world.image_bytes(key), world)
        elif kind == "truncated":
            body = world.image_bytes(key)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
        elif kind == "corrupt":
            self._send(200, corrupt_jpeg(seed, index), "image/jpeg")
        elif kind == "redirect_loop":
            self._redirect(parts.path)
        elif kind == "redirect_ok":
            hop = int(urllib.parse.parse_qs(parts.query).get("hop", ["0"])[0] or 0)
            if hop >= 2:
                self._image(key)
            else:
                self._redirect(f"{parts.path}?hop={hop + 1}")
        elif kind == "wrong_content_type":
            self._send(200, HTML, "text/html; charset=utf-8")
        elif kind == "bad_magic":
            self._send(200, HTML, "image/jpeg")
        elif kind == "oversize":
            self._oversize(world)
        elif kind == "bomb":
            self._send(200, bomb_png(), "image/png")
        elif kind == "connection_reset":
            # Linger 0: close() sends RST, so the client sees a reset rather than a clean EOF.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
        elif kind == "x_robots_noai":
            self._image(key, {"X-Robots-Tag": "noai"})
        elif kind == "redirect_private":
            self._redirect(PRIVATE_REDIRECT_TARGET)
        else:
            self._send(404, b"unknown fault\n", "text/plain")

    def _slow_body(self, body: bytes, world: WorldServer) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.flush()
        steps = min(len(body), max(1, int(world.slow_body_seconds / TRICKLE_INTERVAL)))
        for i in range(steps):
            if world.stopping.wait(TRICKLE_INTERVAL):
                return
            self.wfile.write(body[i : i + 1])
            self.wfile.flush()
        self.wfile.write(body[steps:])

    def _oversize(self, world: WorldServer) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(OVERSIZE_BYTES))
        self.end_headers()
        # One 64 KiB buffer written over and over: 40 MiB promised, nothing allocated per request.
        block = memoryview(_ZEROS)
        self.wfile.write(b"\xff\xd8\xff")
        sent = 3
        while sent < OVERSIZE_BYTES and not world.stopping.is_set():
            piece = block[: OVERSIZE_BYTES - sent]
            self.wfile.write(piece)
            sent += len(piece)


_ZEROS = bytes(64 * 1024)


class WorldServer:
    """The faulty loopback web, in a background thread; use as a context manager."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        hold_seconds: float = 30.0,
        slow_body_seconds: float = 20.0,
        cache_size: int = 0,
    ) -> None:
        self.hold_seconds = float(hold_seconds)
        self.slow_body_seconds = float(slow_body_seconds)
        self.cache_size = int(cache_size)
        self.request_log = RequestLog()
        self.stopping = threading.Event()
        self._released = threading.Event()
        self._seen: set[str] = set()
        self._seen_lock = threading.Lock()
        self._cache: OrderedDict[ImageKey, bytes] = OrderedDict()
        self._pinned: dict[ImageKey, bytes] = {}
        self._cache_lock = threading.Lock()
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.world = self
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self.base_url = f"http://{host}:{self.port}"
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> WorldServer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
            )
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving; held, timing-out and trickling requests end without a response."""
        self.stopping.set()
        self._released.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    stop = close

    def __enter__(self) -> WorldServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- URLs -----------------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return self.base_url + path

    def image_url(self, seed: int, index: int) -> str:
        """A plain image of the world (what a clean row points at)."""
        return self.url(image_path(seed, index))

    def hold_url(self, index: int, seed: int = 0) -> str:
        """A URL whose request blocks until release_holds() (tests of interrupted crawls)."""
        return self.url(fault_path(seed, "hold", index))

    # -- state ----------------------------------------------------------------------------------
    def release_holds(self) -> None:
        """Answer every held request, and answer later hold requests at once."""
        self._released.set()

    def wait_for_release(self) -> None:
        self._released.wait()

    def first_request(self, path: str) -> bool:
        with self._seen_lock:
            if path in self._seen:
                return False
            self._seen.add(path)
            return True

    def image_bytes(self, key: ImageKey) -> bytes:
        with self._cache_lock:
            cached = self._pinned.get(key) or self._cache.get(key)
            if cached is not None:
                if key in self._cache:
                    self._cache.move_to_end(key)
                return cached
        data = encode_jpeg(key)  # outside the lock: rendering in parallel threads is the point
        if self.cache_size > 0:
            with self._cache_lock:
                self._cache[key] = data
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return data

    def prerender(self, urls: Iterable[str]) -> int:
        """Render the images behind `urls` now and keep them (benchmarks measure crawling, not
        rendering); returns how many images are kept."""
        for url in urls:
            parts = urllib.parse.urlsplit(url)
            key = image_key(parts.path)
            if key is not None and key not in self._pinned:
                data = encode_jpeg(key)
                with self._cache_lock:
                    self._pinned[key] = data
        return len(self._pinned)
