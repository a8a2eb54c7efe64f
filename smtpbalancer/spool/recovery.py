"""Startup scan of the spool: what survived, what to delete, what to quarantine.

Runs once before the listener opens (blocking; the app runs it in a thread).
- `.tmp-*` files are unfinished writes: deleted, never delivered.
- a message file that fails validation is moved to quarantine/ and logged.
- a `.state` file without its message is left over from a removal: deleted.
- a message with a `.hold` marker is counted but reported in `held`, not in
  `messages`, so it is not delivered until an operator releases it (offline).
  A marker without its message is deleted.
- a corrupt `.state` is quarantined and the message restarts with no settled
  recipients (at-least-once: some may be sent twice, none is lost).
Reads only headers and metadata, so startup is O(messages), not O(bytes).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from smtpbalancer.envelope import valid_queue_id
from smtpbalancer.errors import SpoolCorrupt
from smtpbalancer.spool import record
from smtpbalancer.spool.record import MessageMeta, Progress
from smtpbalancer.spool.store import HOLD_SUFFIX, STATE_SUFFIX, TMP_PREFIX, SpoolStore

log = logging.getLogger(__name__)

_HEAD_READ = 64 * 1024


@dataclass(frozen=True, slots=True)
class Recovered:
    messages: list[tuple[MessageMeta, Progress]]
    removed_temp: int
    quarantined: int
    held: list[str] = field(default_factory=list)


def scan(store: SpoolStore) -> Recovered:
    names = sorted(os.listdir(store.queue_dir))
    present = set(names)
    found: list[tuple[MessageMeta, Progress]] = []
    held: list[str] = []
    removed = quarantined = 0
    for name in names:
        path = store.queue_dir / name
        if name.startswith(TMP_PREFIX):
            path.unlink(missing_ok=True)
            removed += 1
            continue
        if name.endswith((STATE_SUFFIX, HOLD_SUFFIX)):
            if name.rpartition(".")[0] not in present:
                path.unlink(missing_ok=True)
            continue
        try:
            if not valid_queue_id(name):
                raise SpoolCorrupt(name, "not a queue file")
            meta = read_meta(store, name)
        except SpoolCorrupt as exc:
            log.error("spool.quarantine file=%s reason=%s", name, exc.why)
            store.quarantine_now(name)
            quarantined += 1
            continue
        store.adopt(meta)
        if f"{name}{HOLD_SUFFIX}" in present:
            log.info("spool.held queue_id=%s action=skip", name)
            held.append(name)
            continue
        found.append((meta, _read_progress(store, name, present)))
    return Recovered(found, removed, quarantined, held)


def read_meta(store: SpoolStore, name: str) -> MessageMeta:
    """Envelope metadata of queue file `name`, its size checked. Raises SpoolCorrupt."""
    path = store.queue_dir / name
    with open(path, "rb") as fh:
        head = fh.read(_HEAD_READ)
        need = record.head_size(name, head)
        if need > len(head):  # metadata larger than the first read
            fh.seek(0)
            head = fh.read(need)
        layout = record.decode_message_head(name, head)
        size = os.fstat(fh.fileno()).st_size
    if size != layout.file_size:
        raise SpoolCorrupt(name, f"size {size} != expected {layout.file_size}")
    return layout.meta


def _read_progress(store: SpoolStore, name: str, present: set[str]) -> Progress:
    state_name = f"{name}{STATE_SUFFIX}"
    if state_name not in present:
        return Progress()
    path = store.queue_dir / state_name
    try:
        return read_progress(store, name)
    except SpoolCorrupt as exc:
        log.error("spool.bad_state queue_id=%s reason=%s action=restart-recipients", name, exc.why)
        os.replace(path, store.quarantine_dir / state_name)
        return Progress()


def read_progress(store: SpoolStore, name: str) -> Progress:
    """Settled recipients of `name` (none without a .state file). Raises SpoolCorrupt."""
    state_name = f"{name}{STATE_SUFFIX}"
    try:
        data = (store.queue_dir / state_name).read_bytes()
    except FileNotFoundError:
        return Progress()
    return record.decode_progress(state_name, data)
