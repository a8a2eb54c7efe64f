"""Guard.push: a multi-line reply (EHLO's) leaves in one write, with its last line."""

from __future__ import annotations

import asyncio

from smtpbalancer.frontend.guard import Guard


class Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


class Writer:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport


async def test_a_multi_line_reply_is_one_write_and_single_lines_go_at_once() -> None:
    guard = Guard(object(), loop=asyncio.get_running_loop())
    transport = Transport()
    guard._writer = Writer(transport)  # type: ignore[assignment]
    guard.transport = transport  # type: ignore[assignment]
    await guard.push("250-mx.test")
    await guard.push("250-PIPELINING")
    assert transport.writes == []  # held until the reply's last line
    await guard.push("250 HELP")
    assert transport.writes == [b"250-mx.test\r\n250-PIPELINING\r\n250 HELP\r\n"]
    await guard.push("250 OK")
    await guard.push(b"334 VXNlcm5hbWU6")
    assert transport.writes[1:] == [b"250 OK\r\n", b"334 VXNlcm5hbWU6\r\n"]
