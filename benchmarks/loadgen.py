"""The suite's SMTP load generator: raw SMTP over asyncio streams, one process.

Each of `--sessions` concurrent sessions takes messages from a shared counter until
`--messages` have been tried; with `--per-connection` every message gets its own
connection (connect, 220, EHLO, MAIL, RCPT, DATA, body, QUIT), otherwise a session
keeps its connection for all its messages. Commands are sent one at a time and each
reply is awaited (no pipelining), like `smtp-source` and aiosmtplib.

Accept latency is the time from writing the end of the body (`CRLF.CRLF`) to reading
the final reply, per message. A message whose final reply is not 2xx counts as
rejected; a broken connection counts the message in flight as an error. Each message
is tried once: nothing is retried, so `accepted` is what the receiver owes.

Prints one JSON object: counts, `t_start`/`t_end` (time.perf_counter, which is
CLOCK_MONOTONIC and so comparable across processes on Linux) and the latencies in
microseconds. Usage:
  python benchmarks/loadgen.py --port P[,P2...] --messages N --sessions S --size BYTES
                               [--per-connection]
With several ports, session i connects to port i mod their number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field

SENDER = b"bench@sender.test"
RECIPIENT = b"rcpt@rcpt.test"


def message_body(size: int, serial: int) -> bytes:
    """A message of about `size` bytes (headers included), CRLF lines, never a leading dot."""
    head = (
        b"From: <bench@sender.test>\r\nTo: <rcpt@rcpt.test>\r\nSubject: bench\r\n"
        b"Message-ID: <%d.%d@bench.test>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n\r\n" % (serial, os.getpid())
    )
    line = b"x" * 76 + b"\r\n"
    rest = max(0, size - len(head))
    lines, tail = divmod(rest, len(line))
    body = line * lines
    if tail > 2:
        body += b"y" * (tail - 2) + b"\r\n"
    return head + body


@dataclass
class Tally:
    accepted: int = 0
    rejected: int = 0
    errors: int = 0
    connections: int = 0
    reject_codes: dict[str, int] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)
    latencies_us: list[int] = field(default_factory=list)


class SmtpError(Exception):
    pass


async def reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One (possibly multi-line) reply: its code and its last line."""
    line = await reader.readline()
    while line[3:4] == b"-":
        line = await reader.readline()
    if len(line) < 4 or not line[:3].isdigit():
        raise SmtpError("connection closed" if not line else f"bad reply {line[:40]!r}")
    return int(line[:3]), line


async def command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes, want: int
) -> None:
    writer.write(line)
    code, _text = await reply(reader)
    if code // 100 != want // 100:
        raise SmtpError(f"{line[:4].decode()} {code}")


class Generator:
    def __init__(
        self, host: str, ports: list[int], messages: int, size: int, per_connection: bool
    ) -> None:
        self.host, self.ports = host, ports
        self.remaining = messages
        self.per_connection = per_connection
        # One body per run (every message is the same bytes), so the generator's own CPU
        # per message stays small next to what it measures.
        self.template = message_body(size, os.getpid())
        self.payload = self.template + b".\r\n"
        self.tally = Tally()

    def take(self) -> bool:
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True

    async def open(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.host, port, limit=1 << 16)
        sock = writer.get_extra_info("socket")
        if sock is not None:  # asyncio sets it already; uvloop may not: never wait for Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tally.connections += 1
        code, _text = await reply(reader)
        if code != 220:
            writer.close()
            raise SmtpError(f"greeting {code}")
        await command(reader, writer, b"EHLO loadgen.bench.test\r\n", 250)
        return reader, writer

    async def send_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await command(reader, writer, b"MAIL FROM:<" + SENDER + b">\r\n", 250)
        await command(reader, writer, b"RCPT TO:<" + RECIPIENT + b">\r\n", 250)
        await command(reader, writer, b"DATA\r\n", 354)
        writer.write(self.payload)  # body and end-of-data in one write, as smtp-source does
        t0 = time.perf_counter()
        code, _text = await reply(reader)
        t1 = time.perf_counter()
        if code // 100 == 2:
            self.tally.accepted += 1
            self.tally.latencies_us.append(int((t1 - t0) * 1e6))
        else:
            self.tally.rejected += 1
            key = str(code)
            self.tally.reject_codes[key] = self.tally.reject_codes.get(key, 0) + 1

    async def close(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"QUIT\r\n")
            await asyncio.wait_for(reply(reader), 10)
        except (OSError, SmtpError, TimeoutError):
            pass
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    def error(self, exc: BaseException) -> None:
        self.tally.errors += 1
        kind = type(exc).__name__ if not isinstance(exc, SmtpError) else str(exc)
        self.tally.error_kinds[kind] = self.tally.error_kinds.get(kind, 0) + 1

    async def session(self, port: int) -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while self.take():
            try:
                if conn is None:
                    conn = await self.open(port)
                await self.send_one(*conn)
                if self.per_connection:
                    await self.close(*conn)
                    conn = None
            except (OSError, SmtpError, asyncio.IncompleteReadError) as exc:
                self.error(exc)
                if conn is not None:
                    conn[1].close()
                conn = None
                await asyncio.sleep(0.01)  # a refused connection must not spin
        if conn is not None:
            await self.close(*conn)


async def run(
    host: str, ports: list[int], messages: int, sessions: int, size: int, per_connection: bool
) -> dict[str, object]:
    gen = Generator(host, ports, messages, size, per_connection)
    t_start = time.perf_counter()
    await asyncio.gather(*(gen.session(ports[i % len(ports)]) for i in range(sessions)))
    t_end = time.perf_counter()
    t = gen.tally
    return {
        "messages": messages,
        "sessions": sessions,
        "size": len(gen.template),
        "per_connection": per_connection,
        "accepted": t.accepted,
        "rejected": t.rejected,
        "errors": t.errors,
        "connections": t.connections,
        "reject_codes": t.reject_codes,
        "error_kinds": t.error_kinds,
        "t_start": t_start,
        "t_end": t_end,
        "latencies_us": t.latencies_us,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", required=True, help="PORT, or PORT,PORT,... (sessions alternate)")
    p.add_argument("--messages", type=int, required=True)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--per-connection", action="store_true", help="one message per connection")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    a = p.parse_args()
    ports = [int(p) for p in a.port.split(",")]
    coro = run(a.host, ports, a.messages, max(1, a.sessions), a.size, a.per_connection)
    if a.loop == "uvloop":
        try:
            import uvloop

            result = uvloop.run(coro)
        except ImportError:
            result = asyncio.run(coro)
    else:
        result = asyncio.run(coro)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
