"""A counting SMTP sink for machines without Postfix's `smtp-sink` (CI smoke runs).

Accepts every message and throws it away, like `smtp-sink -c`: it prints
`sess=S quit=Q mesg=M` followed by a carriage return to stdout whenever the counts
changed (at most every 20 ms), so the suite reads both sinks the same way (the
last `mesg=` in the output). Speaks enough ESMTP for the load generator,
smtpbalancer's upstream client, Postfix's smtp client and HAProxy's pass-through:
EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT, pipelined or not.
Usage: python benchmarks/pysink.py HOST:PORT
"""

from __future__ import annotations

import asyncio
import sys

EHLO_REPLY = (
    b"250-pysink\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n250-8BITMIME\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n"
)


class Counts:
    sessions = 0
    quits = 0
    messages = 0


class SinkProtocol(asyncio.Protocol):
    def __init__(self, counts: Counts) -> None:
        self.counts = counts
        self.buf = b""
        self.in_data = False
        self.data_start = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.counts.sessions += 1
        transport.write(b"220 pysink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        out: list[bytes] = []
        while True:
            if self.in_data:
                # The terminator may be the very first line of the data.
                if self.data_start and self.buf.startswith(b".\r\n"):
                    end, skip = 0, 3
                else:
                    end = self.buf.find(b"\r\n.\r\n")
                    skip = 5
                if end < 0:
                    # Keep only a tail that may hold the start of a terminator.
                    if len(self.buf) >= 3:
                        self.data_start = False
                        self.buf = self.buf[-4:]
                    break
                self.buf = self.buf[end + skip :]
                self.in_data = False
                self.counts.messages += 1
                out.append(b"250 2.0.0 Ok: queued as PY%d\r\n" % self.counts.messages)
                continue
            nl = self.buf.find(b"\r\n")
            if nl < 0:
                break
            line, self.buf = self.buf[:nl], self.buf[nl + 2 :]
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(EHLO_REPLY)
            elif verb == b"DATA":
                self.in_data = True
                self.data_start = True
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                self.counts.quits += 1
                out.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                out.append(b"250 2.0.0 Ok\r\n")
            else:
                out.append(b"502 5.5.2 Error: command not recognized\r\n")
        if out:
            self.transport.write(b"".join(out))


async def main(listen: str) -> None:
    host, _, port = listen.rpartition(":")
    counts = Counts()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkProtocol(counts), host, int(port), backlog=4096)
    shown = (-1, -1, -1)
    async with server:
        while True:
            now = (counts.sessions, counts.quits, counts.messages)
            if now != shown:
                sys.stdout.write(f"sess={now[0]} quit={now[1]} mesg={now[2]}\r")
                sys.stdout.flush()
                shown = now
            await asyncio.sleep(0.02)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main(sys.argv[1]))
    except ImportError:
        asyncio.run(main(sys.argv[1]))
    except KeyboardInterrupt:
        pass
