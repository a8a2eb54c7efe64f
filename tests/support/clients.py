"""Real SMTP clients against the proxy: the messages they send and the checks at the sinks.

Used by tests/scenarios/test_client_compatibility.py. Every client sends the same
kinds of message (`corpus`): plain ASCII, an 8-bit UTF-8 body (8BITMIME), an
SMTPUTF8 message (non-ASCII envelope addresses and RFC 6532 UTF-8 headers), lines
that start with a dot (the client must dot-stuff them), lines of 998 octets (the
RFC 5321 maximum) and several recipients. Each message carries `X-Compat-Id`, so
`check_arrivals` can find it at the sinks and compare what the client was asked to
send with what the relays got: the envelope, every header line the test wrote and
the body byte for byte, after the `Received:` line the proxy adds.

Clients connect from 127.0.0.2, outside the proxy's `allow_networks`
(127.0.0.1/32), so they may relay only after STARTTLS and AUTH; the proxy's trace
header (`from … ([127.0.0.2]) … with ESMTPSA`) shows that they did.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme

USER = "espuser"
PASSWORD = "Compat-Pa55word-7"  # no spaces or colons: it also goes into Postfix's sasl map
CLIENT_IP = "127.0.0.2"  # outside allow_networks: AUTH is required
ALLOW_NETWORKS = ["127.0.0.1/32"]

KINDS = ("ascii", "8bit", "smtputf8", "dots", "long", "multi")
DATE = "Date: Sat, 28 Nov 2026 09:00:00 +0000"
UTF8_SENDER = "jöran@exämple.test"
UTF8_RECIPIENT = "åsa@empfänger.test"


# --- certificates and users ---------------------------------------------------------


@dataclass(frozen=True)
class Security:
    """A trustme CA, the proxy's certificate from it (localhost, 127.0.0.1), a users file."""

    ca: trustme.CA
    ca_pem: Path
    cert: Path
    key: Path
    users_file: Path

    def server_section(self, allow_networks: Sequence[str] = ALLOW_NETWORKS) -> dict[str, Any]:
        """`[server]` keys: STARTTLS on the listener, AUTH from the users file."""
        return {
            "tls_cert": str(self.cert),
            "tls_key": str(self.key),
            "users_file": str(self.users_file),
            "allow_networks": list(allow_networks),
            "auth_failure_delay": "0s",
        }


def make_security(directory: Path) -> Security:
    """Certificates from trustme and a users file line from the real `smtpbalancer passwd`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    cert, key, ca_pem = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    issued.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    ca.cert_pem.write_to_path(str(ca_pem))
    done = subprocess.run(
        [sys.executable, "-m", "smtpbalancer", "passwd", USER],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    users = directory / "users"
    users.write_text(done.stdout.strip() + "\n")
    return Security(ca=ca, ca_pem=ca_pem, cert=cert, key=key, users_file=users)


# --- the messages ---------------------------------------------------------------------


@dataclass(frozen=True)
class Outgoing:
    """One message as the test hands it to a client."""

    key: str  # X-Compat-Id, unique per test
    kind: str
    mail_from: str
    rcpts: tuple[str, ...]
    headers: tuple[bytes, ...]  # header lines without CRLF, each checked verbatim
    body: bytes  # CRLF line ends, ends with CRLF

    @property
    def data(self) -> bytes:
        return b"\r\n".join(self.headers) + b"\r\n\r\n" + self.body

    @property
    def smtputf8(self) -> bool:
        return any(not a.isascii() for a in (self.mail_from, *self.rcpts))

    @property
    def eight_bit(self) -> bool:
        return not self.data.isascii()


def _lines(*lines: str) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode()


def _body(kind: str, key: str) -> bytes:
    if kind == "8bit":
        return _lines(
            f"Body of {key}, 8-bit UTF-8 without any transfer encoding:",
            "Grüße aus Köln: naïve café, smørrebrød, Ελληνικά, 日本語のテキスト, 📬",
            "A line with a tab\tand trailing spaces   ",
            "",
            "ÄÖÜäöüß " * 60,  # 8-bit and long: 480 characters, 900 octets
            "end",
        )
    if kind == "smtputf8":
        return _lines(
            f"Body of {key}: Hej Åsa, hälsningar från Jöran.",
            "Привет, мир. Καλημέρα κόσμε. こんにちは世界.",
            "end",
        )
    if kind == "dots":
        return _lines(
            f"Body of {key}: lines that start with a dot.",
            ".leading dot",
            "..two leading dots",
            ".",
            "..",
            " . a space before the dot",
            ". ",
            "middle",
            ".",
            "From the start of a line (an mbox From_ line)",
            "end",
        )
    if kind == "long":
        prefix = f"{key} "
        return _lines(
            f"Body of {key}: lines of 998 octets, the most RFC 5321 allows.",
            prefix + "x" * (998 - len(prefix)),
            "y" * 997,
            # 997 octets with a leading dot: 998 on the wire once dot-stuffed, 1000 with CRLF.
            # (998 with a leading dot: test_a_998_octet_line_that_starts_with_a_dot_is_relayed.)
            "." + "z" * 996,
            "end",
        )
    return _lines(f"Body of {key}.", "The quick brown fox jumps over the lazy dog.", "end")


def make_outgoing(client: str, index: int, kind: str) -> Outgoing:
    key = f"{client}-{index:03d}-{kind}"
    mail_from = "esp@sender.test"
    rcpts: tuple[str, ...] = (f"reader{index}@rcpt.test",)
    if kind == "smtputf8":
        mail_from = UTF8_SENDER
        rcpts = (UTF8_RECIPIENT, f"reader{index}@rcpt.test")
    elif kind == "multi":
        rcpts = tuple(f"reader{index}.{n}@rcpt{n}.test" for n in range(3))
    headers = [
        f"From: {'Jöran <' + UTF8_SENDER + '>' if kind == 'smtputf8' else '<' + mail_from + '>'}",
        f"To: {', '.join('<' + r + '>' for r in rcpts)}",
        f"Subject: {'Grüße, ' if kind == 'smtputf8' else ''}{kind} message {index} from {client}",
        f"Message-ID: <{key}@compat.test>",
        DATE,
        f"X-Compat-Id: {key}",
        "MIME-Version: 1.0",
    ]
    if kind in ("8bit", "smtputf8"):
        headers += ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"]
    else:
        headers += ["Content-Type: text/plain; charset=us-ascii"]
    return Outgoing(
        key=key,
        kind=kind,
        mail_from=mail_from,
        rcpts=rcpts,
        headers=tuple(h.encode() for h in headers),
        body=_body(kind, key),
    )


def corpus(client: str, count: int, kinds: Sequence[str] = KINDS) -> list[Outgoing]:
    """`count` messages cycling through `kinds` (every kind at least once when count allows)."""
    return [make_outgoing(client, i, kinds[i % len(kinds)]) for i in range(count)]


# --- checks at the sinks ----------------------------------------------------------------


def split_trace(data: bytes) -> tuple[bytes, bytes]:
    """(the proxy's Received: header with its continuation lines, the rest as relayed)."""
    assert data.startswith(b"Received: "), data[:200]
    end = 0
    while True:
        end = data.index(b"\r\n", end) + 2
        if data[end : end + 1] not in (b" ", b"\t"):
            return data[:end], data[end:]


def compat_id(message: bytes) -> str | None:
    head = message.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"x-compat-id:"):
            return line.split(b":", 1)[1].strip().decode()
    return None


def trace_protocol(out: Outgoing, *, authenticated: bool = True) -> str:
    return ("UTF8SMTP" if out.smtputf8 else "ESMTP") + "S" + ("A" if authenticated else "")


def check_arrivals(
    received: Iterable[Any],
    sent: Sequence[Outgoing],
    *,
    client_ip: str = CLIENT_IP,
    authenticated: bool = True,
    protocol: Mapping[str, str] | None = None,
) -> None:
    """Every message arrived exactly once, envelope, headers and body intact; nothing else.

    `received` are the sinks' SinkMessages. `protocol` overrides the expected
    Received `with` keyword per key (a client that cannot say SMTPUTF8).
    """
    expected = {out.key: out for out in sent}
    seen: dict[str, int] = {}
    problems: list[str] = []
    for got in received:
        trace, message = split_trace(got.data)
        key = compat_id(message)
        if key not in expected:
            problems.append(f"unexpected message at the sinks: {got.data[:300]!r}")
            continue
        seen[key] = seen.get(key, 0) + 1
        out = expected[key]
        if got.mail_from != out.mail_from:
            problems.append(f"{key}: MAIL FROM {got.mail_from!r}, sent {out.mail_from!r}")
        if sorted(got.rcpt_tos) != sorted(out.rcpts):
            problems.append(f"{key}: RCPT TO {got.rcpt_tos!r}, sent {out.rcpts!r}")
        want = (protocol or {}).get(key, trace_protocol(out, authenticated=authenticated))
        if f"([{client_ip}])".encode() not in trace or f" with {want} id ".encode() not in trace:
            problems.append(f"{key}: trace {trace!r}, expected [{client_ip}] and 'with {want}'")
        head, sep, body = message.partition(b"\r\n\r\n")
        if not sep:
            problems.append(f"{key}: no header/body separator")
            continue
        lines = set(head.split(b"\r\n"))
        for header in out.headers:
            if header not in lines:
                problems.append(f"{key}: header {header!r} missing or changed; got {head!r}")
        if body != out.body:
            problems.append(f"{key}: body differs:\n sent {out.body!r}\n  got {body!r}")
    for key in expected:
        if seen.get(key, 0) != 1:
            problems.append(f"{key}: arrived {seen.get(key, 0)} times")
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:20])


def count_connections(app: Any) -> list[str]:
    """Record the client address of every session the proxy admits from now on."""
    clients: list[str] = []
    frontend = app.frontend
    admit = frontend.admit

    def counting(session: Any, client: str) -> bool:
        clients.append(client)
        return bool(admit(session, client))

    frontend.admit = counting
    return clients


# --- subprocesses -----------------------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\nexit {self.returncode}\n"
            f"--- stdout\n{self.stdout[-6000:]}\n--- stderr\n{self.stderr[-6000:]}"
        )


async def run(
    *argv: str,
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
) -> Finished:
    """Run a command without blocking the loop (the proxy runs on it); killed by PID on timeout.

    It gets its own session, so on timeout the whole group it started is killed.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env) if env is not None else None,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = await proc.communicate()
        raise AssertionError(
            f"{argv[0]} did not finish within {timeout}s:\n"
            + str(
                Finished(
                    tuple(argv), -9, out.decode(errors="replace"), err.decode("utf-8", "replace")
                )
            )
        ) from None
    assert proc.returncode is not None
    return Finished(
        tuple(argv), proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    )
