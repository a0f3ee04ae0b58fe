"""The rails API's HTTP server: uvicorn with the httptools parser, on uvloop.

httptools (a C parser) parses a request in a fraction of h11's time, but where it gives up
(a request line or header block over its limit, ~80 KB, or bytes that are not HTTP) uvicorn
answers a plain-text "Invalid HTTP request received." that names no input. `ApiHttpProtocol`
answers those in this API's error shape instead, naming the query parameters the request
line carried as far as it was read, so a client learns what to shorten (and that large
inputs belong in the JSON body). Everything it parses goes to the app exactly as before.

    python -m serving.http_server --host 127.0.0.1 --port 8090 [--workers N]

is what `railtower serve` and the dev stack (devstack.local_services) run.
"""

from __future__ import annotations

import argparse
from urllib.parse import parse_qsl, urlsplit

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

APP_FACTORY = "serving.app:create_app"


def unparsable_request(url: bytes) -> dict[str, object]:
    """The 400 body for a request the parser refused: which query parameters it carried."""
    query = urlsplit(url.decode("latin-1")).query
    names = sorted({name for name, _ in parse_qsl(query, keep_blank_values=True)})
    if names:
        what = "query parameter" + ("s " if len(names) > 1 else " ") + ", ".join(names)
        why = (
            f"{what}: the request line is too long or malformed to parse (over ~80 KB); "
            "send large inputs in the JSON body"
        )
    else:
        why = (
            "request line or headers: too long (over ~80 KB) or not valid HTTP/1.1; "
            "send large inputs in the JSON body"
        )
    return {"error": why, "problems": [why]}


class ApiHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering a request it cannot parse in JSON."""

    def send_400_response(self, msg: str) -> None:  # noqa: ARG002 - uvicorn's text, replaced
        # on_message_begin sets url; bytes that never started a message have none
        body = orjson.dumps(unparsable_request(getattr(self, "url", b"")))
        content = [b"HTTP/1.1 400 Bad Request\r\n"]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()


def run(
    host: str, port: int, workers: int = 1, log_level: str = "info", http: str = "httptools"
) -> None:
    """Serve the API; each worker process builds its own app from the same settings (the
    RAILTOWER_CONFIG file and the environment). `http="h11"` runs uvicorn's pure-Python
    parser instead, for side-by-side benchmarks (benchmarks/rails_api.py)."""
    uvicorn.run(
        APP_FACTORY,
        factory=True,
        host=host,
        port=port,
        workers=workers if workers > 1 else None,
        http=ApiHttpProtocol if http == "httptools" else "h11",
        loop="auto",  # uvloop, a dependency
        log_level=log_level,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--http", choices=("httptools", "h11"), default="httptools")
    args = parser.parse_args()
    run(args.host, args.port, args.workers, args.log_level, args.http)


if __name__ == "__main__":
    main()
