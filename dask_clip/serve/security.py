"""Who may use the app: a token on every request unless it listens on loopback only, and limits on what a request
may send.

On loopback with no token (the default) a request must name a loopback host (``Host: 127.0.0.1``), so a web page
that rebinds its own DNS name to 127.0.0.1 cannot read the app. With a token, every request carries it: as
``?token=`` (which also sets a cookie, so the pages' links work), an ``Authorization: token T`` header, or that
cookie. A request without it, or with another one, gets 401 and the reason.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

TOKEN_COOKIE = "dask_clip_token"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'",
}

Handler = Callable[[Request], Awaitable[Response]]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine only: ``localhost``, 127.0.0.0/8, ``::1``."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_for(host: str, token: str | None) -> str | None:
    """The token the app asks for when it listens on ``host``: ``token`` when given; a new random one when ``host``
    is not loopback (``secrets.token_urlsafe``); None (no token) on loopback."""
    if token is not None or is_loopback(host):
        return token
    return secrets.token_urlsafe(32)


def request_token(request: Request) -> str | None:
    """The token a request carries: in its query, its ``Authorization: token T`` header or its cookie."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    header = value.strip() if scheme.lower() in ("token", "bearer") else None
    return request.query_params.get("token") or header or request.cookies.get(TOKEN_COOKIE)


def guard(token: str | None) -> Callable[[Request, Handler], Awaitable[Response]]:
    """An HTTP middleware that refuses requests without ``token`` (with no token: requests not addressed to a
    loopback host) and adds ``HEADERS`` to every response."""

    async def check(request: Request, call_next: Handler) -> Response:
        refusal = _refusal(request, token)
        if refusal is not None:
            return JSONResponse({"detail": refusal}, status_code=401 if token else 403)
        response = await call_next(request)
        response.headers.update(HEADERS)
        if token is not None and request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    return check


def _refusal(request: Request, token: str | None) -> str | None:
    """Why ``request`` is refused, or None."""
    if token is None:
        host = (request.url.hostname or "").strip("[]")
        if not is_loopback(host):
            return f"this server answers requests to a loopback address only, not to host {host!r}"
        return None
    given = request_token(request)
    if given is None:
        return "a token is needed: open the address the server printed (?token=...), or send 'Authorization: token T'"
    if not secrets.compare_digest(given.encode(), token.encode()):
        return "wrong token: use the one the server printed when it started"
    return None
