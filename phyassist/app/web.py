"""What the counselor app's web server adds around Gradio, kept free of Gradio so it can be tested
alone: response headers that keep patient text out of the browser's cache and keep the page from
loading anything from outside the machine, one-time in-memory downloads for exports (only for
the counselor who asked), and login throttling per user and address."""

from __future__ import annotations

import contextvars
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import quote

# Nothing from another origin: no remote image, font, script, frame or form target. Gradio's page
# needs inline scripts and styles and eval (its front end), blob:/data: for media it makes itself.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval' blob:; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; media-src 'self' data: blob:; connect-src 'self'; "
    "worker-src 'self' blob:; frame-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; "
    "frame-ancestors 'self'")
SECURITY_HEADERS = [
    (b"cache-control", b"no-store"),  # every response: the page, the API, the /queue/data stream, files
    (b"pragma", b"no-cache"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
EXPORT_PREFIX = "/phyassist/export/"
CLIENT_ADDRESS: contextvars.ContextVar[str] = contextvars.ContextVar("phyassist_client_address", default="?")


@dataclass
class _Export:
    user: str
    filename: str
    data: bytes
    expires: float


class ExportDesk:
    """Exports held in memory until their counselor downloads them once (or ``ttl_s`` passes):
    nothing is written to disk, and another login's request gets 404 as if no such export existed."""

    def __init__(self, ttl_s: float = 300.0):
        self.ttl_s = ttl_s
        self._items: dict[str, _Export] = {}
        self._lock = threading.Lock()

    def put(self, user: str, filename: str, text: str) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._expire()
            self._items[token] = _Export(user, filename, text.encode("utf-8"), time.monotonic() + self.ttl_s)
        return f"{EXPORT_PREFIX}{token}"

    def take(self, token: str, user: str | None) -> _Export | None:
        """The export for ``user`` (removed: one download), or None."""
        with self._lock:
            self._expire()
            item = self._items.get(token)
            if item is None or user is None or not secrets.compare_digest(item.user, user):
                return None
            return self._items.pop(token)

    def _expire(self) -> None:
        now = time.monotonic()
        for token in [t for t, e in self._items.items() if e.expires < now]:
            del self._items[token]

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)


@dataclass
class _Failures:
    count: int = 0
    until: float = 0.0


@dataclass
class LoginThrottle:
    """Wrong passwords per (user, address), and per address over all users: after ``max_failures``
    in a row (4x that per address) logins from there are refused for ``lockout_s`` seconds, doubling
    with each further failure up to ``max_lockout_s``. A success clears its (user, address) count.
    Refused attempts do not test the password, so a locked-out guesser learns nothing."""

    max_failures: int = 5
    lockout_s: float = 30.0
    max_lockout_s: float = 900.0
    clock: Callable[[], float] = time.monotonic
    _pairs: dict[tuple[str, str], _Failures] = field(default_factory=dict)
    _addresses: dict[str, _Failures] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_s(self, user: str, address: str) -> float:
        """Seconds until ``user`` may try again from ``address`` (0: now)."""
        now = self.clock()
        with self._lock:
            until = max(self._pairs.get((user, address), _Failures()).until,
                        self._addresses.get(address, _Failures()).until)
        return max(0.0, until - now)

    def _bump(self, f: _Failures, limit: int, now: float) -> None:
        f.count += 1
        if f.count >= limit:
            f.until = now + min(self.max_lockout_s, self.lockout_s * 2 ** (f.count - limit))

    def failed(self, user: str, address: str) -> None:
        now = self.clock()
        with self._lock:
            self._bump(self._pairs.setdefault((user, address), _Failures()), self.max_failures, now)
            self._bump(self._addresses.setdefault(address, _Failures()), 4 * self.max_failures, now)

    def succeeded(self, user: str, address: str) -> None:
        with self._lock:
            self._pairs.pop((user, address), None)


def _cookie_user(scope: dict[str, Any]) -> str | None:
    """The Gradio login behind the request's access-token cookie (None: not logged in)."""
    app = scope.get("app")
    tokens = getattr(app, "tokens", None) or {}
    cookie_id = getattr(app, "cookie_id", None)
    raw = "; ".join(v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"cookie")
    jar = {}
    for part in raw.split(";"):  # plain split: one odd cookie must not hide the others (SimpleCookie stops)
        name, sep, value = part.strip().partition("=")
        if sep:
            jar.setdefault(name, value)
    for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
        if jar.get(name) in tokens:
            return tokens[jar[name]]
    return None


class GuardMiddleware:
    """Pure ASGI middleware (streams pass through untouched): the security headers on every HTTP
    response, the client address for login throttling, and the export download route."""

    def __init__(self, app, desk: ExportDesk, local_user: str):
        self.app = app
        self.desk = desk
        self.local_user = local_user

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = scope.get("client")
        CLIENT_ADDRESS.set(client[0] if client else "?")
        if scope.get("path", "").startswith(EXPORT_PREFIX):
            return await self._export(scope, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {n for n, _ in SECURITY_HEADERS}
                message["headers"] = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message["headers"] += SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _export(self, scope, send):
        app = scope.get("app")
        user = self.local_user if getattr(app, "auth", None) is None else _cookie_user(scope)
        item = self.desk.take(scope["path"][len(EXPORT_PREFIX):], user) if scope.get("method") == "GET" else None
        if item is None:
            status, body = 404, b"no such export (each export downloads once, for the counselor who made it)"
            headers = [(b"content-type", b"text/plain; charset=utf-8")]
        else:
            status, body = 200, item.data
            kind = b"application/json" if item.filename.endswith(".json") else b"text/markdown"
            headers = [(b"content-type", kind + b"; charset=utf-8"),
                       (b"content-disposition", f"attachment; filename*=UTF-8''{quote(item.filename)}".encode())]
        headers += SECURITY_HEADERS + [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
