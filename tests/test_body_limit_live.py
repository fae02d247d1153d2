"""Bodies over the request size limit against a real `bitskip serve` on loopback (issue 14): the
413 error object comes at once, before the body is read; the connection then closes cleanly
(the client reads the 413, not a reset), even for a client that sends its whole body before
reading; a client that stalls mid-body or declares a body too large to drain is let go of, and
other requests are served meanwhile."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import httpx
import pytest

from models.config import preset
from models.random_checkpoint import write_random_checkpoint
from server.body_limit import DRAIN_BYTES

from test_server_live import bitskip_serve

pytestmark = pytest.mark.timeout(180)

LIMIT = 1 << 20
BIG = json.dumps({"prompt": "x" * (50 * 1024 * 1024)}).encode()  # the 50 MiB prompt


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    path = tmp_path_factory.mktemp("body-limit") / "tiny-test"
    write_random_checkpoint(path, preset("tiny-test"))
    with bitskip_serve(path, path.parent / "server.log", "--max-body-bytes", str(LIMIT)) as (proc, port):
        yield f"http://127.0.0.1:{port}"
        assert proc.poll() is None
        assert "Traceback" not in (path.parent / "server.log").read_text()


def check_413(status: int, body: bytes) -> None:
    assert status == 413
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and str(LIMIT) in error["message"]


def raw_request(url: str, headers: dict, body: bytes = b"") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": host, "Content-Type": "application/json", **headers}.items())
    sock.sendall(f"POST /generate HTTP/1.1\r\n{head}\r\n".encode() + body)
    return sock


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of one response with a Content-Length, read off the socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    length = int(next(v for k, v in (h.split(": ", 1) for h in lines[1:]) if k.lower() == "content-length"))
    while len(rest) < length:
        rest += sock.recv(65536)
    assert "connection: close" in head.decode("latin-1").lower()
    return int(lines[0].split()[1]), rest[:length]


def closed_by_server(sock: socket.socket) -> bool:
    """The server ended the connection (orderly or not) rather than waiting for more."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("client", ["socket", "httpx", "httpx-chunked"])
def test_a_client_that_writes_before_reading_gets_the_413(url, client):
    """The issue's 50 MiB prompt from clients that send the whole body before reading (a plain
    socket, httpx's async client, with Content-Length or chunked): the upload is drained, so
    they read the 413. Without the drain the close reset the connection under the client's
    writes and it saw ConnectionResetError / httpx.ReadError instead of the 413."""
    if client == "socket":
        with raw_request(url, {"Content-Length": str(len(BIG))}, BIG) as sock:
            check_413(*read_response(sock))
            assert closed_by_server(sock)
    else:
        async def post():
            content = BIG if client == "httpx" else chunks()
            async with httpx.AsyncClient(timeout=60) as c:
                return await c.post(f"{url}/generate", content=content, headers={"content-type": "application/json"})

        async def chunks():
            for i in range(0, len(BIG), 1 << 20):
                yield BIG[i:i + (1 << 20)]
        r = asyncio.run(post())
        check_413(r.status_code, r.content)
        assert r.headers["connection"] == "close"
    assert httpx.get(f"{url}/health", timeout=60).status_code == 200


def test_the_413_comes_before_the_body_is_sent(url):
    """A body declared far past what is drained: the 413 is the answer to the headers alone,
    and the server closes instead of waiting for 10 GiB."""
    sock = raw_request(url, {"Content-Length": str(10 << 30)})
    with sock:
        check_413(*read_response(sock))
        assert closed_by_server(sock)
    assert 10 << 30 > DRAIN_BYTES


def test_expect_100_continue_gets_the_413_instead(url):
    with raw_request(url, {"Content-Length": str(len(BIG)), "Expect": "100-continue"}) as sock:
        check_413(*read_response(sock))  # a "100 Continue" first would fail here
        assert closed_by_server(sock)


def test_a_stalled_upload_is_let_go_and_others_are_served(url):
    """A client that sends part of an oversized body and stops: it gets the 413 at once, other
    requests are answered while it stalls, and the server ends the connection (after the drain's
    time bound) instead of holding it."""
    sock = raw_request(url, {"Content-Length": str(4 * LIMIT)}, b"{" + b" " * LIMIT)
    with sock:
        check_413(*read_response(sock))
        results = []

        def generate():
            results.append(httpx.post(f"{url}/generate", json={"prompt": "hello", "max_tokens": 4}, timeout=60))
        others = [threading.Thread(target=generate) for _ in range(2)]
        for t in others:
            t.start()
        assert httpx.get(f"{url}/health", timeout=60).status_code == 200
        for t in others:
            t.join(60)
        assert [r.status_code for r in results] == [200, 200]
        assert closed_by_server(sock)  # socket timeout 60 s: the drain's bound is well under it
