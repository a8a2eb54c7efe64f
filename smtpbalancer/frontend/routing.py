"""Which named pool a message goes to: `[[route]]` rules, first match wins. Pure.

A route matches when every condition it names holds: a header field's value (glob,
case-insensitive), the AUTH user (glob), the envelope sender (glob, case-insensitive)
and the domain of every recipient (glob). A route without conditions matches all
mail (the default route). When no route matches, the fallback pool takes the message:
"default" if an upstream serves it, else the first pool the config names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from smtpbalancer import headers
from smtpbalancer.config import RouteConfig


@dataclass(frozen=True, slots=True)
class Decision:
    pool: str
    strip_header: str | None = None  # remove this field before spooling (keep_header unset)


class Router:
    def __init__(self, routes: Sequence[RouteConfig], fallback_pool: str) -> None:
        self._routes = tuple(routes)
        self.fallback = Decision(fallback_pool)
        self.reads_headers = any(r.header_name for r in self._routes)

    def __repr__(self) -> str:
        return f"<Router routes={len(self._routes)} fallback={self.fallback.pool}>"

    def route(
        self, *, sender: str, rcpts: Sequence[str], user: str | None, message: bytes
    ) -> Decision:
        for route in self._routes:
            if _matches(route, sender, rcpts, user, message):
                strip = None if route.keep_header else route.header_name
                return Decision(route.pool, strip)
        return self.fallback


def _matches(
    route: RouteConfig, sender: str, rcpts: Sequence[str], user: str | None, message: bytes
) -> bool:
    if route.sender is not None and not fnmatchcase(sender.lower(), route.sender.lower()):
        return False
    if route.user is not None and (user is None or not fnmatchcase(user, route.user)):
        return False
    if route.recipient_domain is not None:
        wanted = route.recipient_domain.lower()
        domains = [r.rpartition("@")[2].lower() for r in rcpts]
        if not domains or not all(fnmatchcase(d, wanted) for d in domains):
            return False
    if route.header_name is not None:
        value = headers.first(message, route.header_name)
        pattern = (route.header_value or "*").lower()
        if value is None or not fnmatchcase(value.lower(), pattern):
            return False
    return True
