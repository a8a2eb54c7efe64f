"""aiosmtpd builds its per-connection tables from dir(); the short dir() must lose nothing."""

from __future__ import annotations

import asyncio

from smtpbalancer.frontend.guard import Guard
from smtpbalancer.frontend.handler import Handler


def full(obj: object, prefix: str) -> set[str]:
    return {name.removeprefix(prefix) for name in object.__dir__(obj) if name.startswith(prefix)}


async def test_the_tables_built_from_the_short_dir_hold_every_verb_hook_and_mechanism() -> None:
    handler = object.__new__(Handler)  # only its methods matter here
    session = Guard(handler, hostname="t.test", loop=asyncio.get_running_loop())
    assert set(session._smtp_methods) == full(session, "smtp_")
    assert set(session._handle_hooks) == full(handler, "handle_")
    expected_auth = full(session, "auth_") | full(handler, "auth_")
    assert set(session._auth_methods) == {m.replace("__", "-") for m in expected_auth}
    assert session._ehlo_hook_ver == "new"  # the cached signature still reads as 5 arguments
    assert dir(session) == sorted(dir(session)) and "smtp_DATA" in dir(session)
