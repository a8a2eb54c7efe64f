"""The names aiosmtpd looks up with dir() on every new connection, listed once per class.

aiosmtpd's SMTP.__init__ builds its tables of verbs (`smtp_*`), AUTH mechanisms
(`auth_*`) and handler hooks (`handle_*`) from `dir()` of the protocol and of the
handler, and from `inspect.getmembers()`, which reads every attribute of both. That
was a third of the CPU of a one-message connection (the way many ESPs send). The names
are fixed per class, so the protocol and the handler answer `dir()` with just them,
computed once per class; aiosmtpd uses `dir()` nowhere else.
"""

from __future__ import annotations

from typing import Final

_PREFIXES: Final = ("smtp_", "auth_", "handle_")
_NAMES: dict[type, tuple[str, ...]] = {}


def aiosmtpd_names(obj: object) -> list[str]:
    """`dir(obj)` as far as aiosmtpd is concerned: its verb, AUTH and hook names."""
    cls = type(obj)
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(
            sorted(name for name in object.__dir__(obj) if name.startswith(_PREFIXES))
        )
    return list(names)
