"""Open a written report in headless Chromium and collect what its console said.

Chromium's `--enable-logging=stderr` prints console messages without their level and never
prints failed resource loads, so this speaks the DevTools protocol instead: Chromium listens on
a random port of 127.0.0.1 (found in its DevToolsActivePort file), a small standard-library
websocket client attaches to the page, enables the Runtime, Log and Page domains, navigates to
the file and records `Runtime.consoleAPICalled`, `Runtime.exceptionThrown` and `Log.entryAdded`
until the load event (plus a short settle), then takes a screenshot. Used by the tests and by
`vlforge report --check`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlforge.errors import UserError

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",  # containers run as root, where the sandbox refuses to start
    "--disable-gpu",
    "--disable-background-networking",  # no update checks, no safe-browsing lists: no network
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--no-first-run",
    "--no-default-browser-check",
    "--hide-scrollbars",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",  # any free port; Chromium writes it to DevToolsActivePort
)


@dataclass
class ConsoleMessage:
    level: str  # "error", "warning", "info", "log", "exception", …
    text: str
    source: str = ""


@dataclass
class PageLoad:
    messages: list[ConsoleMessage] = field(default_factory=list)
    screenshot: Path | None = None
    values: dict[str, Any] = field(default_factory=dict)  # results of the expressions asked for

    @property
    def errors(self) -> list[ConsoleMessage]:
        return [m for m in self.messages if m.level in ("error", "exception", "assert")]


def find_chromium() -> str | None:
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class _WebSocket:
    """Just enough RFC 6455 for one DevTools session: masked text frames out, frames in."""

    def __init__(self, url: str, timeout: float):
        assert url.startswith("ws://"), url
        hostport, _, path = url[len("ws://") :].partition("/")
        host, _, port = hostport.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.buffer = bytearray()
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise OSError(f"websocket handshake refused: {head[:200]!r}")
        self.buffer = bytearray(rest)

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise OSError("DevTools connection closed")
        self.buffer.extend(chunk)

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        header = bytearray([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header.append(0x80 | n)
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes(header) + mask + masked)

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def _frame(self) -> tuple[int, int, bytes]:
        """(fin, opcode, payload) of the next frame. Bytes leave the buffer only once the whole
        frame is in, so a read that times out half-way leaves the stream intact for the next."""
        while True:
            data = self.buffer
            if len(data) >= 2:
                fin, opcode, n, at = data[0] & 0x80, data[0] & 0x0F, data[1] & 0x7F, 2
                if n == 126 and len(data) >= 4:
                    n, at = struct.unpack_from("!H", data, 2)[0], 4
                elif n == 127 and len(data) >= 10:
                    n, at = struct.unpack_from("!Q", data, 2)[0], 10
                masked = data[1] & 0x80
                if (data[1] & 0x7F) < 126 or at > 2:
                    begin = at + (4 if masked else 0)
                    if len(data) >= begin + n:
                        payload = bytes(data[begin : begin + n])
                        if masked:
                            mask = data[at : at + 4]
                            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                        del self.buffer[: begin + n]
                        return fin, opcode, payload
            self._fill()

    def recv(self) -> str:
        parts: list[bytes] = []
        while True:
            fin, opcode, payload = self._frame()
            if opcode == 0x8:
                raise OSError("DevTools closed the connection")
            if opcode == 0x9:  # ping
                self._send_frame(0xA, payload)
                continue
            if opcode in (0x0, 0x1, 0x2):
                parts.append(payload)
                if fin:
                    return b"".join(parts).decode("utf-8")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class _Session:
    def __init__(self, ws: _WebSocket, load: PageLoad):
        self.ws, self.load, self.next_id = ws, load, 0
        self.events: list[str] = []

    def call(self, method: str, **params: Any) -> dict:
        self.next_id += 1
        wanted = self.next_id
        self.ws.send(json.dumps({"id": wanted, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == wanted:
                if "error" in message:
                    raise OSError(f"DevTools {method}: {message['error']}")
                return message.get("result", {})
            self.handle(message)

    def pump(self, until: str | None, seconds: float) -> None:
        """Record events for `seconds`, or until the named event arrives."""
        if until is not None and until in self.events:  # arrived while awaiting a reply
            return
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.ws.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                message = json.loads(self.ws.recv())
            except TimeoutError:
                return
            self.handle(message)
            if until is not None and message.get("method") == until:
                return
        if until is not None:
            raise OSError(f"no {until} within {seconds:.0f} s")

    def handle(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params") or {}
        self.events.append(method or "")
        if method == "Runtime.consoleAPICalled":
            text = " ".join(
                str(a.get("value", a.get("description", ""))) for a in params.get("args", [])
            )
            frame = (params.get("stackTrace") or {}).get("callFrames") or [{}]
            self.load.messages.append(
                ConsoleMessage(str(params.get("type")), text, str(frame[0].get("url", "")))
            )
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails") or {}
            text = (details.get("exception") or {}).get("description") or details.get("text", "")
            self.load.messages.append(
                ConsoleMessage("exception", str(text), str(details.get("url", "")))
            )
        elif method == "Log.entryAdded":
            entry = params.get("entry") or {}
            self.load.messages.append(
                ConsoleMessage(
                    str(entry.get("level")), str(entry.get("text")), str(entry.get("url", ""))
                )
            )


def _devtools_port(profile: Path, process: subprocess.Popen, timeout: float) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise OSError(f"chromium exited with {process.returncode} before DevTools was up")
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(marker.read_text().splitlines()[0])
        time.sleep(0.05)
    raise OSError(f"chromium's DevTools port did not appear within {timeout:.0f} s")


def _page_target(port: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as reply:
            targets = json.load(reply)
        pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
        if pages:
            return pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.1)
    raise OSError("chromium opened no page target")


def load_page(
    html: Path,
    screenshot: Path | None = None,
    width: int = 1280,
    height: int = 1600,
    expressions: dict[str, str] | None = None,
    timeout: float = 60.0,
    settle: float = 0.5,
    chromium: str | None = None,
) -> PageLoad:
    """Load `html` (a local file) in headless Chromium; return its console messages, the values
    of `expressions` (JavaScript, evaluated after load) and, if asked, a PNG screenshot."""
    binary = chromium or find_chromium()
    if binary is None:
        raise UserError("chromium is not installed (Debian: apt-get install chromium)")
    url = Path(html).resolve().as_uri()
    load = PageLoad()
    # Chromium's helper processes (crashpad, the zygote's children) can still be writing to the
    # profile for a moment after the browser exits: a leftover file must not fail the check.
    with tempfile.TemporaryDirectory(
        prefix="vlforge-chromium-", ignore_cleanup_errors=True
    ) as profile_dir:
        profile = Path(profile_dir)
        command = [
            binary,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        ws = None
        try:
            port = _devtools_port(profile, process, timeout)
            ws = _WebSocket(_page_target(port, timeout), timeout)
            session = _Session(ws, load)
            for domain in ("Runtime", "Log", "Page"):
                session.call(f"{domain}.enable")
            session.call(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
            ws.sock.settimeout(timeout)
            navigated = session.call("Page.navigate", url=url)
            if navigated.get("errorText"):
                raise OSError(f"navigation to {url} failed: {navigated['errorText']}")
            session.pump("Page.loadEventFired", timeout)
            session.pump(None, settle)  # late messages (timers, deferred scripts)
            ws.sock.settimeout(timeout)
            for name, expression in (expressions or {}).items():
                result = session.call("Runtime.evaluate", expression=expression, returnByValue=True)
                if "exceptionDetails" in result:
                    raise OSError(f"evaluating {name!r} threw: {result['exceptionDetails']}")
                load.values[name] = (result.get("result") or {}).get("value")
            if screenshot is not None:
                shot = session.call("Page.captureScreenshot", format="png")
                Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
                load.screenshot = Path(screenshot)
        finally:
            if ws is not None:
                ws.close()
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return load
