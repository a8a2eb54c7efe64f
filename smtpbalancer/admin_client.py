"""Client side of the admin listener: how the queue CLI acts on a running instance.

A running instance owns its spool (flock) and keeps an index of it in memory, so
an operator's hold/release/delete/retry must go through it: the CLI posts to
`/queue/OP` on the `[metrics] listen` address with the admin token, and the
instance applies the change and updates its schedule at once.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, Final

from smtpbalancer.config import MetricsConfig

TIMEOUT_S: Final = 35.0  # the listener waits up to 30 s for the event loop
_WILDCARDS: Final = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


class AdminUnavailable(Exception):
    """The admin listener could not be reached (the instance is down or metrics are off)."""


def base_url(cfg: MetricsConfig) -> str:
    host = _WILDCARDS.get(cfg.host, cfg.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.port}"


def post(
    cfg: MetricsConfig, path: str, query: Sequence[tuple[str, str]] = ()
) -> tuple[int, Mapping[str, Any]]:
    """POST to the admin listener; returns (HTTP status, JSON document)."""
    if not cfg.enabled:
        raise AdminUnavailable("[metrics] is disabled, so there is no admin listener")
    url = base_url(cfg) + path
    if query:
        url += "?" + urllib.parse.urlencode(list(query))
    request = urllib.request.Request(url, data=b"", method="POST")
    if cfg.admin_token:
        request.add_header("Authorization", f"Bearer {cfg.admin_token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, _document(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _document(exc.read())
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminUnavailable(f"admin listener {base_url(cfg)}: {reason}") from None


def _document(raw: bytes) -> Mapping[str, Any]:
    try:
        doc = json.loads(raw or b"{}")
    except ValueError:
        return {"error": raw.decode("utf-8", "replace")[:200]}
    return doc if isinstance(doc, dict) else {"value": doc}
