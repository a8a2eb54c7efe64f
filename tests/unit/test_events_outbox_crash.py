"""kill -9 in the middle of appends: every acknowledged event is found after a restart."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest

from smtpbalancer.clock import SystemClock
from smtpbalancer.events.outbox import Outbox

# Eight writers append small batches as fast as they can; after each append returns
# (fdatasync'd) the child prints the numbers it holds. Numbers are taken and queued in
# one step, so the log's order is the numbers' order.
_CHILD = """
import asyncio, itertools, sys
from pathlib import Path
from smtpbalancer.clock import SystemClock
from smtpbalancer.events.outbox import Outbox

async def main() -> None:
    box = Outbox(Path(sys.argv[1]), SystemClock(), name="crash", segment_bytes=32 * 1024)
    box.open()
    counter = itertools.count()
    print("ready", flush=True)

    async def writer(size: int) -> None:
        while True:
            ns = [next(counter) for _ in range(size)]
            await box.append([{"n": n, "pad": "x" * 40} for n in ns])
            print(" ".join(map(str, ns)), flush=True)

    await asyncio.gather(*(writer(1 + k % 5) for k in range(8)))

asyncio.run(main())
"""


@pytest.mark.slow
async def test_acknowledged_events_survive_kill_9(tmp_path: Path) -> None:
    directory = tmp_path / "events"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, str(directory), stdout=asyncio.subprocess.PIPE
    )
    acked: set[int] = set()
    try:
        assert child.stdout is not None
        async with asyncio.timeout(30):
            assert (await child.stdout.readline()).strip() == b"ready"
            while len(acked) < 3000:
                line = await child.stdout.readline()
                assert line, "the child died"
                acked.update(int(n) for n in line.split())
        child.send_signal(signal.SIGKILL)  # mid-append: the writers never pause
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()

    box = Outbox(directory, SystemClock(), name="crash-reopened")
    box.open()
    try:
        found: list[int] = []
        while (batch := await box.read(1000)) is not None:
            found += [json.loads(d)["n"] for d in batch.docs]
            await box.mark_sent(batch)
    finally:
        box.close()
    assert acked <= set(found)  # nothing acknowledged is lost
    assert found == sorted(set(found))  # in order, no duplicates
