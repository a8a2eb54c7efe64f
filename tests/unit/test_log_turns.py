"""TurnHandler: on the event loop, one write per loop turn; off it, one write per line."""

from __future__ import annotations

import asyncio
import io
import logging

from smtpbalancer.logs import TurnHandler


class Stream(io.StringIO):
    """Remembers each write, so a test can count them."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def logger_into(stream: Stream, name: str) -> logging.Logger:
    log = logging.getLogger(f"tests.turns.{name}")
    log.handlers[:] = [TurnHandler(stream)]
    log.propagate = False
    log.setLevel(logging.INFO)
    return log


async def test_the_lines_of_one_loop_turn_go_out_in_one_write_after_the_turn() -> None:
    stream = Stream()
    log = logger_into(stream, "turn")
    for i in range(3):
        log.info("delivery.delivered n=%d", i)
    assert stream.writes == []  # still this turn
    await asyncio.sleep(0)
    assert stream.writes == [
        "delivery.delivered n=0\ndelivery.delivered n=1\ndelivery.delivered n=2\n"
    ]
    log.info("delivery.delivered n=%d", 3)
    await asyncio.sleep(0)
    assert len(stream.writes) == 2 and stream.writes[1] == "delivery.delivered n=3\n"


def test_off_the_loop_every_line_is_written_at_once() -> None:
    stream = Stream()
    log = logger_into(stream, "sync")
    log.info("queue.listed n=%d", 1)
    log.info("queue.listed n=%d", 2)
    assert stream.writes == ["queue.listed n=1\n", "queue.listed n=2\n"]


def test_flush_writes_what_waits_for_its_turn() -> None:
    # logging.shutdown() flushes every handler at exit.
    stream = Stream()
    log = logger_into(stream, "flush")

    async def log_and_stop() -> None:
        log.info("server.stopping reason=%s", "signal")
        log.handlers[0].flush()

    asyncio.run(log_and_stop())
    assert stream.getvalue() == "server.stopping reason=signal\n"


def test_lines_left_by_a_loop_that_closed_come_out_with_the_next_line() -> None:
    stream = Stream()
    log = logger_into(stream, "closed")
    loop = asyncio.new_event_loop()

    def log_and_stop() -> None:
        log.info("server.ready n=%d", 1)
        loop.stop()  # the loop ends with this turn: the flush it scheduled never runs

    loop.call_soon(log_and_stop)
    loop.run_forever()
    loop.close()
    assert stream.getvalue() == ""
    log.info("server.stopped n=%d", 2)  # off any loop
    assert stream.getvalue() == "server.ready n=1\nserver.stopped n=2\n"
    stream.writes.clear()

    async def later() -> None:  # and a new loop gets its per-turn writes again
        log.info("server.ready n=%d", 3)
        log.info("server.ready n=%d", 4)
        await asyncio.sleep(0)

    asyncio.run(later())
    assert stream.writes == ["server.ready n=3\nserver.ready n=4\n"]
