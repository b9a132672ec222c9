"""A scriptable HTTP/1.1 server on 127.0.0.1 for fetch tests: each path answers as a test says.

The demo world's server speaks HTTP/1.0 and only the faults it knows; these tests need keep-alive,
raw header bytes, chunked bodies without Content-Length and Content-Encoding, as real sites send.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

# (status, headers, body); the body may be a list of pieces, sent chunked without Content-Length,
# and a `Connection: close` header sends it close-delimited (no length at all).
Reply = tuple[int, list[tuple[str, str]], bytes | list[bytes]]


@dataclass
class WebServer:
    routes: dict[str, Callable[[], Reply] | Reply] = field(default_factory=dict)
    requests: Counter = field(default_factory=Counter)  # raw request path → times asked
    hosts: list[str] = field(default_factory=list)  # Host header of every request
    connections: int = 0
    _sockets: list[socket.socket] = field(default_factory=list)

    def __enter__(self) -> WebServer:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                server.connections += 1
                server._sockets.append(self.connection)

            def log_message(self, *_: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                server.requests[self.path] += 1
                server.hosts.append(self.headers.get("Host", ""))
                route = server.routes.get(self.path) or server.routes.get("*")
                if route is None:
                    route = (404, [("Content-Type", "text/plain")], b"no such route\n")
                status, headers, body = route() if callable(route) else route
                self.send_response_only(status)
                self.flush_headers()  # the status line; headers follow as raw bytes
                for name, value in headers:
                    # Header bytes as the server wrote them (raw UTF-8 included), not re-encoded.
                    self.wfile.write(f"{name}: ".encode() + value.encode("utf-8") + b"\r\n")
                if isinstance(body, list):
                    self.wfile.write(b"Transfer-Encoding: chunked\r\n\r\n")
                    for piece in body:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    names = {name.lower(): value for name, value in headers}
                    close_delimited = names.get("connection") == "close"
                    if "content-length" not in names and not close_delimited:
                        self.wfile.write(f"Content-Length: {len(body)}\r\n".encode())
                    self.wfile.write(b"\r\n" + body)
                    self.close_connection = close_delimited

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def hang_up_idle(self) -> None:
        """Close the server's side of every connection so far, as servers drop idle ones."""
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._sockets.clear()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"
