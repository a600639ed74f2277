"""The dashboard's guards: every path inside its root, capped uploads, the access token.

Each refusal is a ``Refused`` with the HTTP status and one line that says what was wrong; the
app turns it into ``{"error": ...}`` (API) or an error page, never a server error.
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path

TOKEN_COOKIE = "caffe_dashboard_token"


class Refused(Exception):
    """A request the dashboard will not carry out (status 4xx and one line why)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def contained(root: Path, requested: str | os.PathLike, what: str = "path") -> Path:
    """``requested`` (relative to ``root``, or absolute) resolved, if it stays inside ``root``.

    Symlinks are followed before the check, so a link inside the root that points out of it is
    refused like ``..`` is. Raises ``Refused(403)`` otherwise, ``Refused(404)`` if missing."""
    text = os.fspath(requested).strip()
    if not text or "\x00" in text:
        raise Refused(400, f"{what}: empty or invalid")
    root = root.resolve()
    candidate = Path(text) if os.path.isabs(text) else root / text
    resolved = candidate.resolve()
    if resolved != root and root not in resolved.parents:
        raise Refused(403, f"{what} '{text}' is outside {root} (after following links); "
                           "refused")
    if not resolved.exists():
        raise Refused(404, f"{what} '{text}': no such file or folder under {root}")
    return resolved


def links_leaving(folder: Path, root: Path, limit: int = 100_000) -> list[str]:
    """Symlinks under ``folder`` whose target is outside ``root`` (the first few, by path)."""
    root = root.resolve()
    found = []
    for count, (dirpath, dirnames, filenames) in enumerate(os.walk(folder, followlinks=False)):
        if count > limit:
            break
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                target = path.resolve()
                if target != root and root not in target.parents:
                    found.append(str(path.relative_to(folder)))
    return sorted(found)[:5]


def check_folder_links(folder: Path, root: Path) -> None:
    """Refuse a folder that reaches outside ``root`` through a symlink inside it."""
    leaving = links_leaving(folder, root)
    if leaving:
        raise Refused(403, f"'{folder.name}' holds links to files outside {root.resolve()} "
                           f"({', '.join(leaving)}); refused")


def capped(data: bytes, cap: int, what: str) -> bytes:
    if len(data) > cap:
        raise Refused(413, f"{what} is {len(data):,} bytes; the limit is {cap:,}")
    return data


async def read_upload(upload, cap: int, what: str) -> bytes:
    """An uploaded part's bytes, refused (413) past ``cap`` without reading it all."""
    data = await upload.read(cap + 1)
    return capped(data, cap, what)


def same_origin(method: str, headers, host_is_loopback: bool) -> str | None:
    """Why a request must be refused as coming from another site, or None.

    A page elsewhere can make the browser send a form to 127.0.0.1 (a "simple" cross-origin
    POST needs no permission), or point its own name at 127.0.0.1 (DNS rebinding). So a
    loopback server answers only requests addressed to a loopback name, and no server takes a
    state-changing request whose Origin is another site."""
    host = headers.get("host", "")
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
    if host_is_loopback and name not in ("127.0.0.1", "localhost", "[::1]"):
        return f"this dashboard answers requests to 127.0.0.1 only (not '{host}')"
    origin = headers.get("origin")
    if method not in ("GET", "HEAD", "OPTIONS") and origin and \
            origin.split("://", 1)[-1] != host:
        return f"a request from {origin} (another site) to change something; refused"
    return None


def token_matches(expected: str | None, headers, query, cookies) -> bool:
    """No token configured (loopback): everyone local may ask. Otherwise the request carries it
    as ``Authorization: Bearer T``, ``?token=T`` or the cookie the first page set."""
    if not expected:
        return True
    auth = headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else \
        query.get("token") or cookies.get(TOKEN_COOKIE) or ""
    return hmac.compare_digest(given.encode(), expected.encode())


__all__ = ["Refused", "contained", "links_leaving", "check_folder_links", "capped",
           "read_upload", "same_origin", "token_matches", "TOKEN_COOKIE"]
