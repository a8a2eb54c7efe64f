"""A raw-socket SMTP client for tests that must send bytes no real client would."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from support.waiting import wait_until


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(
        cls, address: tuple[str, int], *, source: str | None = None, greet: bool = True
    ) -> RawClient:
        local = (source, 0) if source else None
        reader, writer = await asyncio.open_connection(*address, local_addr=local)
        client = cls(reader, writer)
        if greet:
            assert (await client.reply()).startswith("220 ")
        return client

    async def reply(self, timeout: float = 5.0) -> str:
        """One whole reply (multi-line replies joined with newlines); "" at EOF."""
        lines: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.reader.readline()
                if not raw:
                    return "\n".join(lines)
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                lines.append(line)
                if line[3:4] != "-":
                    return "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, line: bytes) -> str:
        await self.send(line + b"\r\n")
        return await self.reply()

    async def until_eof(self, timeout: float = 5.0) -> bytes:
        async with asyncio.timeout(timeout):
            return await self.reader.read()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def raw_server(
    handle: object,
) -> AsyncIterator[tuple[str, int]]:
    """A plain asyncio server on 127.0.0.1:0 running `handle(reader, writer)`; all closed after."""
    writers: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        try:
            await handle(reader, writer)  # type: ignore[operator]
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            writers.discard(writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()
        for writer in list(writers):
            writer.close()
        await server.wait_closed()
        await wait_until(lambda: not writers, timeout=2)
