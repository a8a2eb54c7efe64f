"""Fuzzing the front end: random commands and bytes from a client that may not relay.

The proxy must not crash, must not spool or relay anything for a client outside
allow_networks, and must still serve a well-formed client afterwards.
Hypothesis generates the sessions (derandomized, so CI sees the same ones) and
they are replayed against one running App; shrinking is given up for speed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.mail import make_message, send_mail
from support.proxy import make_config
from support.raw import RawClient
from support.waiting import wait_until

from smtpbalancer.app import App

COMMANDS = [
    b"EHLO fuzz.test", b"HELO fuzz.test", b"MAIL FROM:<a@sender.test>", b"MAIL FROM:<>",
    b"MAIL FROM:<a@sender.test> SIZE=100 BODY=8BITMIME", b"RCPT TO:<victim@elsewhere.test>",
    b"DATA", b"RSET", b"NOOP", b"VRFY a", b"EXPN a", b"HELP", b"STARTTLS", b"AUTH PLAIN AGEAYg==",
    b"BDAT 10 LAST", b"PROXY TCP4 203.0.113.7 127.0.0.1 1 2", b".", b"", b"MAIL FROM:<a\x01b@x>",
]  # fmt: skip
ENDINGS = [b"\r\n", b"\n", b"\r", b"", b"\r\r\n", b"\n.\r\n", b"\r\n.\r\n", b"\r.\r"]

chunk = st.one_of(
    st.builds(lambda c, e: c + e, st.sampled_from(COMMANDS), st.sampled_from(ENDINGS)),
    st.binary(max_size=300),
    st.sampled_from([b"x" * 600 + b"\r\n", b"x" * 1200, b"\x00\r\n", b"\xff\xfe\r\n"]),
)


def generated_sessions(count: int) -> list[list[bytes]]:
    found: list[list[bytes]] = []

    @settings(
        max_examples=count,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(chunk, max_size=12))
    def collect(session: list[bytes]) -> None:
        found.append(session)

    collect()
    return found


async def replay(address: tuple[str, int], session: list[bytes]) -> None:
    client = await RawClient.open(address, source="127.0.0.2", greet=False)
    try:
        for data in session:
            await client.send(data)
        await client.send(b"\r\nQUIT\r\n")
        await client.until_eof(timeout=2)
    except (ConnectionError, TimeoutError):
        pass  # the proxy may hang up on garbage; that is its right
    finally:
        await client.close()


async def test_fuzzed_sessions_neither_crash_nor_relay(tmp_path: Path, sinks) -> None:
    sink = await sinks("relay")
    cfg = make_config(
        tmp_path / "spool",
        [("relay", sink.address, 1)],
        server={"allow_networks": ["127.0.0.1/32"], "idle_timeout": "2s"},
    )
    sessions = generated_sessions(60)
    async with App(cfg) as app:
        for session in sessions:
            await replay(app.smtp_address, session)
        await asyncio.sleep(0.1)
        assert app.submitter.accepted == 0 and app.store.messages == 0
        assert sink.messages == 0

        _, body = make_message()
        errors, reply = await send_mail(app.smtp_address[1], body)
        assert errors == {} and reply.startswith("2.0.0 Ok: queued as ")
        await wait_until(lambda: sink.messages == 1 and app.store.messages == 0)
        assert sink.received[0].mail_from == "esp@sender.test"
