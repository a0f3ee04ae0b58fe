"""Guards of the rails API: admin authentication, per-client rate limits, body size limits.

- `require_admin`: a FastAPI dependency on every `/v1/admin/...` route. The key is
  `security.admin_api_key` (set it from the environment); without one the admin routes are
  off (503), so a deployment that forgot the key exposes nothing. The comparison takes the
  same time whatever the key sent, so response times leak nothing about it.
- `RateLimitMiddleware`: a token bucket per client on `POST /v1/rails/...` (the public,
  CPU-heavy endpoint; each new session id also writes Redis state), on by default. The
  client is the connection's peer address, or, when the peer is one of
  `security.trusted_proxies`, the address that proxy names in
  `security.trusted_proxy_header` (`ClientIdentity`). Nothing the client itself chooses
  picks its bucket: a header such as `X-Client-Id` would hand a scraper a fresh bucket per
  request. The table of buckets is bounded (least recently seen forgotten first).
- `BodyLimitMiddleware`: every POST body is capped at `security.max_body_bytes`, checked on
  `Content-Length` before anything is read and again on the bytes actually received (a
  client can send a false length, or none with chunked encoding).

Both middlewares are plain ASGI: they add no per-request task or buffering to the hot path.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Annotated

from fastapi import Header, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from railtower.logs import get_logger
from railtower.settings import SecuritySettings
from serving.metrics import Metrics
from serving.request_checks import BadRequest

log = get_logger(__name__)

RAILS_PREFIX = "/v1/rails/"
# A client key longer than this is cut: the bucket table's memory is bounded per entry too.
MAX_CLIENT_ID = 128

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# ------------------------------------------------------------------------------ admin key


def require_admin(request: Request, x_api_key: Annotated[str | None, Header()] = None) -> None:
    """Let the request through only with the configured admin key in `X-API-Key`.

    Raises:
        BadRequest: 503 when no key is configured (admin routes off), 401 when the header
            is missing or wrong.
    """
    check_admin_key(
        request,
        x_api_key,
        "admin endpoint",
        503,
        "admin endpoints disabled: set RAILTOWER_SECURITY__ADMIN_API_KEY",
    )


def require_explain_key(request: Request, x_api_key: str | None) -> None:
    """`explain=true` on the public route shows merchandising rule effects and the session's
    own history ("because you viewed ..."), so with `security.explain_needs_admin_key` it is
    for operators holding the admin key only.

    Raises:
        BadRequest: 403 when no key is configured, 401 when the header is missing or wrong.
    """
    settings = _settings_of(request)
    if settings.security.explain_needs_admin_key:
        check_admin_key(
            request,
            x_api_key,
            "explain=true",
            403,
            "explain=true needs the admin key, and "
            "none is set: set RAILTOWER_SECURITY__ADMIN_API_KEY and send it in X-API-Key",
        )


def check_admin_key(
    request: Request, x_api_key: str | None, what: str, unset: int, unset_why: str
) -> None:
    """`x_api_key` must match the configured admin key (compared in constant time).

    Raises:
        BadRequest: `unset` with `unset_why` when no key is configured, 401 when the header
            is missing or does not match.
    """
    security: SecuritySettings = _settings_of(request).security
    if security.admin_api_key is None:
        raise BadRequest(unset, unset_why)
    if x_api_key is None:
        raise BadRequest(401, f"{what}: send the admin key in the X-API-Key header")
    expected = security.admin_api_key.get_secret_value().encode()
    if not hmac.compare_digest(x_api_key.encode(), expected):
        log.warning("admin key rejected", path=request.url.path, client=_peer(request.scope))
        raise BadRequest(401, f"{what}: the X-API-Key header does not match the key")


def _settings_of(request: Request):  # type: ignore[no-untyped-def]
    state = request.app.state
    return getattr(state, "settings", None) or state.service.settings


# ------------------------------------------------------------------------------ rate limit


class TokenBuckets:
    """One token bucket per client: `rate_per_s` tokens a second, at most `burst` saved.

    Args:
        rate_per_s: sustained requests per second per client.
        burst: requests a client may send at once (the bucket's size).
        max_clients: buckets kept; the least recently seen client is forgotten first (it
            comes back with a full bucket, which bounds memory, not fairness).
        clock: seconds, monotonic; tests pass their own.

    Example:
        >>> now = [0.0]
        >>> buckets = TokenBuckets(1.0, 2, 100, clock=lambda: now[0])
        >>> [buckets.take("a") for _ in range(3)]
        [0.0, 0.0, 1.0]
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        max_clients: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1 or max_clients < 1:
            raise ValueError(
                f"need rate_per_s > 0, burst >= 1, max_clients >= 1; got {rate_per_s}, "
                f"{burst}, {max_clients} (a rate or burst of 0 means: build no limiter)"
            )
        self.rate_per_s, self.burst, self.max_clients = rate_per_s, float(burst), max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """Spend one token of `client`'s bucket; 0.0 if it had one, else seconds until it will."""
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate_per_s)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate_per_s
            self._buckets[client] = (tokens, now)  # re-inserted: most recently seen
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return wait

    def __len__(self) -> int:
        return len(self._buckets)


class ClientIdentity:
    """Who a request comes from, as the rate limit keys it: an address, never a name the
    client picks.

    The peer address of the connection, unless `header` is set and the peer is one of
    `trusted` (addresses or networks): then the address that proxy reports. The header is
    read as a list of hops, left (the client, by its own account) to right (added by the
    last proxy), several header lines joined in order, and the right-most hop that is not a
    trusted proxy is the client. Right-most, not left-most: each proxy appends the address
    it saw, so only the hops added by trusted proxies are facts; the left part is whatever
    the client sent, and taking it would let a client pick its own bucket again. With
    `X-Real-IP` (one hop, which nginx overwrites) it is simply that address. A header from
    an untrusted peer is ignored, as is an empty one.

    Example:
        >>> who = ClientIdentity("X-Forwarded-For", ["10.0.0.0/8"])
        >>> who({"client": ("10.0.0.2", 1), "headers": [(b"x-forwarded-for", b"6.6.6.6, 1.2.3.4")]})
        '1.2.3.4'
        >>> who({"client": ("9.9.9.9", 1), "headers": [(b"x-forwarded-for", b"1.2.3.4")]})
        '9.9.9.9'
    """

    def __init__(self, header: str | None = None, trusted: Iterable[str] = ()) -> None:
        self.header = header.lower().encode("latin-1") if header else None
        self.trusted = tuple(ipaddress.ip_network(t, strict=False) for t in trusted)

    @classmethod
    def from_settings(cls, security: SecuritySettings) -> ClientIdentity:
        return cls(security.trusted_proxy_header, security.trusted_proxies)

    def __call__(self, scope: Scope) -> str:
        peer = _peer(scope)
        if self.header is None or not self._trusted(_address(peer)):
            return peer
        named = [value for name, value in scope.get("headers", ()) if name == self.header]
        text = b",".join(named).decode("latin-1")
        hops = [hop.strip() for hop in text.split(",") if hop.strip()]
        for hop in reversed(hops):
            address = _address(hop)
            if not self._trusted(address):
                return str(address) if address is not None else hop[:MAX_CLIENT_ID]
        # no header, or every hop a trusted proxy (a request from the proxies' own network)
        return _normal(hops[0]) if hops else peer

    def _trusted(self, address: IPAddress | None) -> bool:
        return address is not None and any(address in net for net in self.trusted)


def _address(text: str) -> IPAddress | None:
    """The IP address in `text` ("1.2.3.4", "1.2.3.4:5678", "[::1]:5678", "::1"), else None.
    An IPv4 address mapped into IPv6 (a dual-stack socket's "::ffff:1.2.3.4") is IPv4."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _normal(text: str) -> str:
    address = _address(text)
    return str(address) if address is not None else text[:MAX_CLIENT_ID]


class RateLimitMiddleware:
    """429 for a client over its token bucket on `POST /v1/rails/...`; others pass."""

    def __init__(
        self,
        app: ASGIApp,
        buckets: TokenBuckets,
        metrics: Metrics,
        identify: ClientIdentity | None = None,
    ) -> None:
        self.app, self.buckets, self.metrics = app, buckets, metrics
        self.identify = identify or ClientIdentity()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or not scope["path"].startswith(RAILS_PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        client = self.identify(scope)
        wait = self.buckets.take(client)
        if wait <= 0:
            await self.app(scope, receive, send)
            return
        self.metrics.errors.labels(kind="rate_limited").inc()
        retry = max(1, math.ceil(wait))
        b = self.buckets
        response = JSONResponse(
            {
                "error": f"rate limit exceeded for client {client}: {b.rate_per_s:g} "
                f"requests/s with bursts of {b.burst:g} per client (security.rate_limit_per_s, "
                f"security.rate_limit_burst); retry in {retry} s"
            },
            status_code=429,
            headers={"Retry-After": str(retry)},
        )
        await response(scope, receive, send)


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return _normal(str(client[0])) if client else "unknown"


# ------------------------------------------------------------------------------ body size


class _BodyTooLarge(Exception):
    """Raised into the app when the received bytes pass the limit."""


class BodyLimitMiddleware:
    """413 for a POST whose body is over `max_bytes`, announced or actually sent."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics) -> None:
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, f"Content-Length is {declared} bytes")
            return
        received, over, started = 0, False, False

        async def counted() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise _BodyTooLarge
            return message

        async def guarded(message: Message) -> None:
            # Once the limit is passed, whatever the app answers (FastAPI turns an error
            # while reading into a 400) gives way to the 413 sent below.
            nonlocal started
            if over and not started:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except _BodyTooLarge:
            pass
        if over and not started:
            await self._refuse(scope, receive, send, f"at least {received} bytes were sent")

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, what: str) -> None:
        self.metrics.errors.labels(kind="http_413").inc()
        response = JSONResponse(
            {
                "error": f"request body too large: {what}, the limit is {self.max_bytes} "
                "bytes (security.max_body_bytes)"
            },
            status_code=413,
        )
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # malformed: the server refuses it; the byte count still applies
    return None
