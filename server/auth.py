"""Who may call what, for both front doors: inference calls need the API key (when the server has
one); admin calls need the admin token (and are off without one); adapter listings show paths and
raw errors only to the admin token."""

from __future__ import annotations

import hmac

from .errors import Forbidden, Unauthorized


def _bearer_matches(authorization: str | None, secret: str) -> bool:
    """Constant-time check of an ``Authorization: Bearer <secret>`` value."""
    return hmac.compare_digest((authorization or "").encode("utf-8", "surrogateescape"),
                               f"Bearer {secret}".encode())


def require_api_key(authorization: str | None, api_key: str | None) -> None:
    """Inference calls: open unless the server was started with ``--api-key``."""
    if api_key is not None and not _bearer_matches(authorization, api_key):
        raise Unauthorized("a valid API key is required (authorization: Bearer <key>)")


def require_admin(authorization: str | None, admin_token: str | None) -> None:
    """Adapter admin calls: disabled without ``--admin-token``."""
    if admin_token is None:
        raise Forbidden("admin calls are disabled: start the server with --admin-token")
    if not _bearer_matches(authorization, admin_token):
        raise Unauthorized("a valid admin token is required (authorization: Bearer <token>)")


def is_admin(authorization: str | None, admin_token: str | None) -> bool:
    return admin_token is not None and _bearer_matches(authorization, admin_token)


def require_reader(authorization: str | None, api_key: str | None, admin_token: str | None) -> bool:
    """Listings (models, adapters): the API key or the admin token; True for the admin."""
    if is_admin(authorization, admin_token):
        return True
    require_api_key(authorization, api_key)
    return False
