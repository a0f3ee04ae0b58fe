"""The API's HTTP server answers what its parser refuses in the API's error shape.

A real uvicorn server with `serving.http_server.ApiHttpProtocol` on a free port, a tiny
ASGI app behind it, raw bytes over a socket: what a client on the wire sees.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from serving.http_server import ApiHttpProtocol, unparsable_request


async def echo_app(scope, receive, send):  # type: ignore[no-untyped-def]
    assert scope["type"] == "http"
    body = json.dumps({"path": scope["path"], "query": scope["query_string"].decode()}).encode()
    length = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": length})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    config = uvicorn.Config(
        echo_app, host="127.0.0.1", port=free, http=ApiHttpProtocol, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start in 20 s"
        time.sleep(0.05)
    yield free
    server.should_exit = True
    thread.join(timeout=10)


def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(raw)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, body


def test_a_url_too_long_to_parse_gets_json_naming_its_query_parameters(port):
    url = "/v1/rails/pdp_fbt?explain=true&session=" + "x" * 120_000
    raw = f"POST {url} HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{{}}".encode()
    status, headers, body = exchange(port, raw)
    assert status == 400
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert "query parameters explain, session" in error and "JSON body" in error


def test_bytes_that_are_not_http_get_json_too(port):
    status, headers, body = exchange(port, b"\x16\x03\x01 not http at all\r\n\r\n")
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"].startswith("request line or headers")


def test_a_request_it_can_parse_reaches_the_app_unchanged(port):
    raw = b"GET /v1/rails/x?explain=true HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"
    status, _, body = exchange(port, raw)
    assert status == 200
    assert json.loads(body) == {"path": "/v1/rails/x", "query": "explain=true"}


def test_the_message_names_each_parameter_once_and_survives_a_cut_url():
    body = unparsable_request(b"/v1/rails/hero?a=1&b=2&a=3&c")
    assert body["error"].startswith("query parameters a, b, c:")
    empty = unparsable_request(b"")  # bytes that never started a request line
    assert empty["error"].startswith("request line or headers") and empty["problems"] == [
        empty["error"]
    ]
