"""The fetcher against a scriptable loopback server that answers the ways real sites do."""

from __future__ import annotations

import gzip
import io
import socket
import zlib

import pytest
from PIL import Image

from tests.web_server import WebServer
from vlforge.pipeline.fetch import FetchConfig, Fetcher
from vlforge.pipeline.request_url import BadURL, redirect_target, request_url

LOOPBACK = ("127.0.0.0/8",)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


JPEG = _jpeg()
HTML = b"<!doctype html><html><body>not an image</body></html>"


_OPEN: list[Fetcher] = []


@pytest.fixture(autouse=True)
def _close_fetchers():
    yield
    while _OPEN:
        _OPEN.pop().close()


def _fetcher(**kw) -> Fetcher:
    config = dict(allowed_networks=LOOPBACK, timeout=2.0, deadline=5.0, retries=0)
    config.update(kw)
    _OPEN.append(Fetcher(FetchConfig(**config)))
    return _OPEN[-1]


@pytest.mark.parametrize(
    ("raw", "sent"),
    [
        ("http://ex.com/a b.jpg", "http://ex.com/a%20b.jpg"),
        ("http://ex.com/a%20b.jpg", "http://ex.com/a%20b.jpg"),  # not encoded twice
        ("http://ex.com/café/ä.jpg?q=ß x", "http://ex.com/caf%C3%A9/%C3%A4.jpg?q=%C3%9F%20x"),
        ("HTTP://Bücher.Example:80/x.jpg#top", "http://xn--bcher-kva.example/x.jpg"),
        (" http://ex.com/\tx\\y.jpg\n", "http://ex.com/x/y.jpg"),
        ("https://ex.com:8443/x?a=<1>", "https://ex.com:8443/x?a=%3C1%3E"),
        ("http://[::1]:8080/x", "http://[::1]:8080/x"),
    ],
)
def test_request_url_is_what_a_browser_sends(raw, sent):
    assert request_url(raw) == sent


@pytest.mark.parametrize(
    "raw",
    [
        "http://[foo/x.jpg",
        "http://ex.com:65536/x.jpg",
        "http://ex.com:99999999999/x.jpg",
        "ftp://ex.com/x.jpg",
        "javascript:alert(1)",
        "http:///x.jpg",
        "http://a b.com/x.jpg",
        "http://ex..com/x.jpg",
        "",
        None,
        12,
    ],
)
def test_unfetchable_urls_raise_bad_url(raw):
    with pytest.raises(BadURL):
        request_url(raw)


def test_redirect_location_in_raw_utf8_and_relative():
    assert redirect_target("http://ex.com/a/b.jpg", "../c d.jpg") == "http://ex.com/c%20d.jpg"
    latin1_view = "/é.jpg".encode().decode("latin-1")  # how http.client hands it to us
    assert redirect_target("http://ex.com/x", latin1_view) == "http://ex.com/%C3%A9.jpg"
    with pytest.raises(BadURL):
        redirect_target("http://ex.com/x", "http://[broken/")


@pytest.mark.parametrize(
    "url", ["http://[foo/x.jpg", "http://127.0.0.1:70000/x.jpg", "http://ex.com:abc/x", None]
)
def test_malformed_urls_fail_with_a_reason_and_never_raise(url):
    result = _fetcher().fetch(url)
    assert (result.status, result.reason) == ("failed", "bad_url")
    assert result.detail


def test_spaces_and_non_ascii_paths_reach_the_server_encoded_once():
    with WebServer({"*": (200, [("Content-Type", "image/jpeg")], JPEG)}) as web:
        fetcher = _fetcher()
        assert fetcher.fetch(web.url("/dir/a b/ü.jpg?x=1 2")).status == "ok"
        assert fetcher.fetch(web.url("/dir/already%20done.jpg")).status == "ok"
    assert set(web.requests) == {"/dir/a%20b/%C3%BC.jpg?x=1%202", "/dir/already%20done.jpg"}


def test_malformed_location_header_fails_that_row_only():
    routes = {
        "/bad": (302, [("Location", "http://[nope/x.jpg")], b""),
        "/utf8": (302, [("Location", "/bild-ä.jpg")], b""),
        "/bild-%C3%A4.jpg": (200, [("Content-Type", "image/jpeg")], JPEG),
    }
    with WebServer(routes) as web:
        fetcher = _fetcher()
        bad = fetcher.fetch(web.url("/bad"))
        good = fetcher.fetch(web.url("/utf8"))
    assert (bad.status, bad.reason, bad.http_status) == ("failed", "bad_redirect", 302)
    assert good.status == "ok" and good.body == JPEG
    assert good.final_url.endswith("/bild-%C3%A4.jpg")


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        ("application/octet-stream", JPEG, "ok"),
        ("binary/octet-stream", JPEG, "ok"),
        ("text/plain", JPEG, "ok"),  # a mislabelled image is still an image
        ("", JPEG, "ok"),
        ("text/html; charset=utf-8", HTML, "wrong_content_type"),
        ("application/json", b'{"a": 1}', "wrong_content_type"),
    ],
)
def test_bytes_decide_not_the_content_type(content_type, body, expected):
    headers = [("Content-Type", content_type)] if content_type else []
    with WebServer({"/x": (200, headers, body)}) as web:
        result = _fetcher().fetch(web.url("/x"))
    assert (result.reason or result.status) == expected
    if expected == "ok":
        assert result.body == JPEG


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", gzip.compress(JPEG)),
        ("x-gzip", gzip.compress(JPEG)),
        ("deflate", zlib.compress(JPEG)),
        ("deflate", _raw_deflate(JPEG)),  # what some servers call deflate
        ("gzip, gzip", gzip.compress(gzip.compress(JPEG))),
    ],
)
def test_content_encoding_is_decoded_before_sniffing(encoding, body):
    headers = [("Content-Type", "application/octet-stream"), ("Content-Encoding", encoding)]
    with WebServer({"/x": (200, headers, body)}) as web:
        result = _fetcher().fetch(web.url("/x"))
    assert result.status == "ok", result
    assert result.body == JPEG


def test_content_encoding_bombs_and_unknown_codings_fail():
    bomb = gzip.compress(b"\0" * (4 * 1024 * 1024))
    routes = {
        "/bomb": (200, [("Content-Encoding", "gzip")], bomb),
        "/br": (200, [("Content-Encoding", "br")], b"\x0b\x02\x80hi\x03"),
        "/broken": (200, [("Content-Encoding", "gzip")], b"\x1f\x8b not gzip"),
    }
    with WebServer(routes) as web:
        fetcher = _fetcher(max_bytes=1024 * 1024)
        assert len(bomb) < 1024 * 1024  # small on the wire, large once decoded
        assert fetcher.fetch(web.url("/bomb")).reason == "too_large"
        assert fetcher.fetch(web.url("/br")).reason == "unsupported_encoding"
        assert fetcher.fetch(web.url("/broken")).reason == "decode_error"


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_byte_cap_holds_while_reading_a_body_without_content_length(framing):
    cap = 64 * 1024
    exact, over = JPEG + b"\0" * (cap - len(JPEG)), JPEG + b"\0" * (cap + 1 - len(JPEG))

    def reply(body: bytes):
        if framing == "chunked":  # pieces of 10 KiB: the cap is crossed inside a piece
            return 200, [], [body[i : i + 10_000] for i in range(0, len(body), 10_000)]
        return 200, [("Connection", "close")], body

    with WebServer({"/exact": reply(exact), "/over": reply(over)}) as web:
        fetcher = _fetcher(max_bytes=cap)
        at_cap = fetcher.fetch(web.url("/exact"))
        past_cap = fetcher.fetch(web.url("/over"))
    assert at_cap.status == "ok" and at_cap.body == exact
    assert (past_cap.status, past_cap.reason) == ("failed", "too_large")


def test_keep_alive_reuses_one_connection_and_survives_a_closed_one():
    with WebServer({"*": (200, [("Content-Type", "image/jpeg")], JPEG)}) as web:
        fetcher = _fetcher()
        results = [fetcher.fetch(web.url(f"/{i}.jpg")) for i in range(5)]
        assert all(r.status == "ok" for r in results)
        assert web.connections == 1
        fetcher.close_connections()  # as if the server had dropped the idle connection
        assert fetcher.fetch(web.url("/again.jpg")).status == "ok"
        assert web.connections == 2


def test_server_closing_an_idle_keep_alive_connection_is_retried_on_a_fresh_one():
    with WebServer({"*": (200, [("Content-Type", "image/jpeg")], JPEG)}) as web:
        fetcher = _fetcher()
        assert fetcher.fetch(web.url("/a.jpg")).status == "ok"
        web.hang_up_idle()  # the server side closes its idle keep-alive connection
        result = fetcher.fetch(web.url("/b.jpg"))
    assert result.status == "ok" and result.attempts == 1


def test_ssrf_pinning_connects_to_the_checked_address_of_a_name(monkeypatch):
    real = socket.getaddrinfo
    answers: list[str] = []

    def rebinding_dns(host, port, *args, **kwargs):
        if host != "images.example":
            return real(host, port, *args, **kwargs)
        address = answers.pop(0)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_dns)
    with WebServer({"*": (200, [("Content-Type", "image/jpeg")], JPEG)}) as web:
        fetcher = _fetcher(dns_ttl=0.0)
        answers[:] = ["127.0.0.1", "169.254.169.254"]
        first = fetcher.fetch(web.url("/a.jpg", host="images.example"))
        second = fetcher.fetch(web.url("/b.jpg", host="images.example"))
    # The name is never looked up again by the connection: it reached the approved address with
    # the name in the Host header, and a name that now answers a private address is refused.
    assert first.status == "ok" and web.hosts == [f"images.example:{web.port}"]
    assert (second.status, second.reason) == ("blocked", "private_address")
    assert web.requests == {"/a.jpg": 1}


ROBOTS = b"User-agent: *\nDisallow: /private/\nAllow: /private/open/\nDisallow: /*.gif$\n"


def test_robots_txt_redirect_is_followed_and_its_rules_apply():
    routes = {
        "/robots.txt": (301, [("Location", "/rules/robots.txt")], b""),
        "/rules/robots.txt": (200, [("Content-Type", "text/plain")], ROBOTS),
        "*": (200, [("Content-Type", "image/jpeg")], JPEG),
    }
    with WebServer(routes) as web:
        fetcher = _fetcher(respect_robots=True)
        results = {
            p: fetcher.fetch(web.url(p))
            for p in ("/private/a.jpg", "/private/open/b.jpg", "/c.gif", "/c.gif.jpg", "/d.jpg")
        }
    assert {p: r.reason or r.status for p, r in results.items()} == {
        "/private/a.jpg": "robots_txt",
        "/private/open/b.jpg": "ok",  # the longer Allow wins
        "/c.gif": "robots_txt",
        "/c.gif.jpg": "ok",  # `$` anchors the end
        "/d.jpg": "ok",
    }
    assert web.requests["/rules/robots.txt"] == 1  # once per origin
    assert "/private/a.jpg" not in web.requests and "/c.gif" not in web.requests


@pytest.mark.parametrize(("status", "allowed"), [(429, False), (503, False), (404, True)])
def test_robots_txt_unavailable_and_unreachable(status, allowed):
    routes = {
        "/robots.txt": (status, [("Content-Type", "text/plain")], b"Disallow: /\n"),
        "*": (200, [("Content-Type", "image/jpeg")], JPEG),
    }
    with WebServer(routes) as web:
        result = _fetcher(respect_robots=True).fetch(web.url("/a.jpg"))
    assert (result.status == "ok") is allowed
    assert ("/a.jpg" in web.requests) is allowed
