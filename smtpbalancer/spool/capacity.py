"""How much room the spool has: stored bytes, reservations and free disk.

The front end reserves a transaction's declared size at MAIL and releases it
at RSET, end of DATA, the next MAIL or disconnect; this module only keeps the
sum. Free and total disk come from os.statvfs on the spool directory, which
may block (NFS, a sick disk), so it runs in a thread once at start and then
every `refresh_every_s` from a background loop — never per message.
If statvfs fails the free space is taken as 0: better a 452 than a 250 the
disk cannot keep.

Satisfies `frontend.handler.PressureSource`; it must not import the front end.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Final

from smtpbalancer.clock import Clock
from smtpbalancer.config import SpoolConfig

log = logging.getLogger(__name__)

REFRESH_EVERY_S: Final = 1.0


class Capacity:
    """The spool's size limit and free disk, as plain numbers the front end can read."""

    def __init__(
        self,
        config: SpoolConfig,
        spool_bytes: Callable[[], int],
        clock: Clock,
        *,
        refresh_every_s: float = REFRESH_EVERY_S,
    ) -> None:
        self._config = config
        self._spool_bytes = spool_bytes
        self._clock = clock
        self._refresh_every_s = refresh_every_s
        self.max_spool_bytes = config.max_size_bytes
        self.reserved_bytes = 0
        self.free_disk_bytes = 0
        self.total_disk_bytes = 0
        self.min_free_disk_bytes = 0
        self._statvfs_failing = False
        self._accepting = True  # last logged backpressure state: off

    def __repr__(self) -> str:
        return (
            f"<Capacity spool={self.spool_bytes}+{self.reserved_bytes}/{self.max_spool_bytes}"
            f" disk_free={self.free_disk_bytes}/{self.total_disk_bytes}"
            f" floor={self.min_free_disk_bytes}>"
        )

    def reconfigure(self, config: SpoolConfig) -> None:
        """A reload: new size limit and free-disk floor (the floor from the next refresh)."""
        self._config = config
        self.max_spool_bytes = config.max_size_bytes

    @property
    def spool_bytes(self) -> int:
        return self._spool_bytes()

    def reserve(self, size: int) -> None:
        self.reserved_bytes += size

    def release(self, size: int) -> None:
        self.reserved_bytes = max(0, self.reserved_bytes - size)

    def usage_percent(self) -> float:
        """Stored bytes as a percentage of [spool] max_size (reservations not counted)."""
        if self.max_spool_bytes <= 0:
            return 100.0
        return 100.0 * self.spool_bytes / self.max_spool_bytes

    def accepting(self) -> bool:
        """Whether a MAIL without SIZE= would be admitted now (for readiness)."""
        return (
            self.free_disk_bytes >= self.min_free_disk_bytes
            and self.spool_bytes + self.reserved_bytes <= self.max_spool_bytes
        )

    async def refresh(self) -> None:
        """Read free and total disk of the spool's file system (in a thread)."""
        try:
            st = await asyncio.to_thread(os.statvfs, self._config.directory)
        except OSError as exc:
            if not self._statvfs_failing:
                log.error(
                    "spool.statvfs_failed directory=%s errno=%s",
                    self._config.directory,
                    exc.errno,
                )
            self._statvfs_failing = True
            self.free_disk_bytes = 0
            self._log_pressure_change()
            return
        if self._statvfs_failing:
            log.info("spool.statvfs_recovered directory=%s", self._config.directory)
            self._statvfs_failing = False
        self.total_disk_bytes = st.f_blocks * st.f_frsize
        self.free_disk_bytes = st.f_bavail * st.f_frsize  # what a non-root writer can use
        self.min_free_disk_bytes = self._config.min_free_disk.floor(self.total_disk_bytes)
        self._log_pressure_change()

    def _log_pressure_change(self) -> None:
        """Log backpressure turning on or off (checked once per refresh, not per message)."""
        accepting = self.accepting()
        if accepting is self._accepting:
            return
        self._accepting = accepting
        log.log(
            logging.INFO if accepting else logging.WARNING,
            "spool.backpressure state=%s spool_bytes=%d reserved_bytes=%d max_bytes=%d"
            " free_disk_bytes=%d min_free_disk_bytes=%d",
            "off" if accepting else "on",
            self.spool_bytes,
            self.reserved_bytes,
            self.max_spool_bytes,
            self.free_disk_bytes,
            self.min_free_disk_bytes,
        )

    async def run(self) -> None:
        """Refresh forever; the owner cancels it. Call `refresh()` once before accepting mail."""
        while True:
            await self._clock.sleep(self._refresh_every_s)
            await self.refresh()
