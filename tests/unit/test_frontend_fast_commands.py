"""The front end's MAIL/RCPT fast paths answer and change the envelope exactly as aiosmtpd does."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from smtpbalancer.frontend import commands
from smtpbalancer.frontend.server import _Session


class _RecordingHandler:
    """Records what each hook saw and behaves like our Handler on success."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, list[str]]] = []

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.calls.append(("MAIL", address, list(options)))
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.calls.append(("RCPT", address, list(options)))
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(options)
        return "250 OK"


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _run(
    loop: asyncio.AbstractEventLoop,
    verb: str,
    arg: str | None,
    *,
    reference: bool,
    helo: str | None = "client.test",
    extended: bool = True,
    mail_from: str | None = None,
) -> tuple[object, ...]:
    """Everything observable after one MAIL or RCPT: replies, hook calls, envelope."""
    handler = _RecordingHandler()
    server = _Session(
        handler=handler,  # type: ignore[arg-type]
        frontend=None,  # type: ignore[arg-type]
        loop=loop,
        data_size_limit=1000,
        enable_SMTPUTF8=True,
    )
    pushed: list[str] = []

    async def push(status: Any) -> None:
        pushed.append(status)

    server.push = push  # type: ignore[method-assign]
    server.session = server._create_session()
    server.session.host_name = helo
    server.session.extended_smtp = extended
    server.envelope = server._create_envelope()
    server.envelope.mail_from = mail_from
    method = getattr(SMTP if reference else _Session, f"smtp_{verb}")
    try:
        loop.run_until_complete(method(server, arg))
        raised = None
    except Exception as exc:
        raised = type(exc)
    env = server.envelope
    return (
        pushed,
        handler.calls,
        raised,
        env.mail_from,
        env.mail_options,
        env.smtp_utf8,
        env.rcpt_tos,
        env.rcpt_options,
    )


MAIL_ARGS = [
    "FROM:<alice@example.com>",
    "from:<alice@example.com>",
    "FROM: <alice@example.com>",
    "FROM:<alice@example.com> SIZE=100",
    "FROM:<alice@example.com> SIZE=0",
    "FROM:<alice@example.com> size=1000 body=8bitmime",
    "FROM:<alice@example.com> SIZE=1001",
    "FROM:<alice@example.com> SIZE=",
    "FROM:<alice@example.com> SIZE",
    "FROM:<alice@example.com> SIZE=abc",
    "FROM:<alice@example.com> SIZE=\u00b2",
    "FROM:<alice@example.com> SIZE=10 SIZE=20",
    "FROM:<alice@example.com> SIZE=10 SIZE=x",
    "FROM:<alice@example.com> BODY=7BIT",
    "FROM:<alice@example.com> BODY=BINARYMIME",
    "FROM:<alice@example.com> BODY=",
    "FROM:<alice@example.com> SMTPUTF8",
    "FROM:<alice@example.com> SMTPUTF8=yes",
    "FROM:<alice@example.com> AUTH=<>",
    "FROM:<alice@example.com> FOO",
    "FROM:<alice@example.com>\tSIZE=5",
    "FROM:<a.b+tag@sub.example.co.uk>",
    "FROM:<>",
    'FROM:<"quoted local"@example.com>',
    "FROM:<a@[192.0.2.1]>",
    "FROM:alice@example.com",
    "FROM:<alice@example.com",
    "FROM:<a@b.c>x",
    "FROM:",
    "FROM",
    "TO:<alice@example.com>",
    "",
    None,
]


@pytest.mark.parametrize("extended", [True, False])
@pytest.mark.parametrize("arg", MAIL_ARGS)
def test_mail_fast_path_matches_aiosmtpd(
    loop: asyncio.AbstractEventLoop, arg: str | None, extended: bool
) -> None:
    ours = _run(loop, "MAIL", arg, reference=False, extended=extended)
    assert ours == _run(loop, "MAIL", arg, reference=True, extended=extended)


@pytest.mark.parametrize("state", [{"helo": None}, {"mail_from": "earlier@example.com"}])
def test_mail_fast_path_leaves_session_errors_to_aiosmtpd(
    loop: asyncio.AbstractEventLoop, state: dict[str, Any]
) -> None:
    arg = "FROM:<alice@example.com>"
    ours = _run(loop, "MAIL", arg, reference=False, **state)
    assert ours == _run(loop, "MAIL", arg, reference=True, **state)


RCPT_ARGS = [
    "TO:<bob@example.com>",
    "to:<bob@example.com>",
    "TO: <bob@example.com>",
    "TO:<bob@example.com> NOTIFY=NEVER",
    "TO:<bob@example.com> SIZE=5",
    "TO:<>",
    "TO:<postmaster>",
    "TO:bob@example.com",
    "TO:",
    "FROM:<bob@example.com>",
    "",
    None,
]


@pytest.mark.parametrize("extended", [True, False])
@pytest.mark.parametrize("arg", RCPT_ARGS)
def test_rcpt_fast_path_matches_aiosmtpd(
    loop: asyncio.AbstractEventLoop, arg: str | None, extended: bool
) -> None:
    state: dict[str, Any] = {"extended": extended, "mail_from": "alice@example.com"}
    ours = _run(loop, "RCPT", arg, reference=False, **state)
    assert ours == _run(loop, "RCPT", arg, reference=True, **state)


@pytest.mark.parametrize("state", [{"helo": None}, {"mail_from": None}])
def test_rcpt_fast_path_leaves_session_errors_to_aiosmtpd(
    loop: asyncio.AbstractEventLoop, state: dict[str, Any]
) -> None:
    ours = _run(loop, "RCPT", "TO:<bob@example.com>", reference=False, **state)
    assert ours == _run(loop, "RCPT", "TO:<bob@example.com>", reference=True, **state)


def test_fast_parsers_only_take_the_plain_lines() -> None:
    assert commands.simple_mail(
        "FROM:<a@b.c> SIZE=5", extended=True, size_limit=0, smtputf8_enabled=False
    ) == ("a@b.c", ["SIZE=5"], False)
    assert (
        commands.simple_mail(
            "FROM:<a@b.c> SMTPUTF8", extended=True, size_limit=0, smtputf8_enabled=False
        )
        is None
    )
    assert commands.simple_rcpt("TO:<a@b.c>") == "a@b.c"
    assert commands.simple_rcpt("TO:<a@b.c> NOTIFY=NEVER") is None
