"""Startup scan of the spool: what survived, what to delete, what to quarantine.

Runs once before the listener opens (blocking; the app runs it in a thread), after
`SpoolStore.open` took the lock, so nothing appends to the segments it reads (the
writer starts a new segment after the highest one found).

Segments (segment.py), in order, each with its .done marks:
- a record marked done is skipped; a segment with no live record left is deleted
  with its marks (and lone .done files too);
- a message found in two segments (a crash during compaction) is taken from the
  older one, the only copy known to be whole; the newer copy is marked done, durably;
- a record whose metadata fails its checksum but whose frame holds is copied to
  quarantine/<seq>.log@<offset> and marked "@<offset>" so the next start skips it;
- a torn tail (a crash during a write that was never acknowledged) is truncated
  away; a corrupt tail (bytes that frame no record) is first copied to quarantine/,
  then truncated. Bodies are not read here: a bad body is found and quarantined when
  the dispatcher loads it.
Legacy one-file messages in queue/ (a spool written before segments):
- `.tmp-*` files are unfinished writes: deleted, never delivered;
- a message file that fails validation is moved to quarantine/ and logged.
For both:
- a `.state` or `.hold` file without a live message is left over: deleted;
- a message with a `.hold` marker is counted but reported in `held`, not in
  `messages`, so it is not delivered until an operator releases it;
- a corrupt `.state` is quarantined and the message restarts with no settled
  recipients (at-least-once: some may be sent twice, none is lost).
Reads only headers and metadata, so startup is O(messages), not O(bytes); the cyclic
GC is paused while the index is built. Two passes over the metadata, for memory: the
scan keeps each record's index entry and raw metadata bytes (record.peek_meta only
reads its id and arrival), then every MessageMeta is decoded in one run; those live
only until the dispatcher has indexed them, and made together they are freed
together (see _Found). 100k messages: ~2 s of CPU; the index stays ~25 MB.

`listing` is the read-only half, for `smtpbalancer queue` on a running instance's
spool: it changes nothing, and tolerates a torn tail and segments that vanish.
"""

from __future__ import annotations

import array
import gc
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from smtpbalancer.envelope import valid_queue_id
from smtpbalancer.errors import SpoolCorrupt
from smtpbalancer.spool import record, segment
from smtpbalancer.spool.record import NO_PROGRESS, MessageMeta, Progress
from smtpbalancer.spool.segment import SegmentScan, Tail
from smtpbalancer.spool.sidecar import HOLD_SUFFIX, STATE_SUFFIX, TMP_PREFIX
from smtpbalancer.spool.store import LEGACY, Slot, SpoolStore

log = logging.getLogger(__name__)

_HEAD_READ = 64 * 1024


@dataclass(frozen=True, slots=True)
class Recovered:
    messages: list[tuple[MessageMeta, Progress]]
    removed_temp: int
    quarantined: int
    held: list[tuple[MessageMeta, Progress]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Listed:
    """One message as `listing` found it: where, and its metadata or what is wrong."""

    name: str  # the queue id, or <seq>.log@<offset> for a record too damaged to name itself
    meta: MessageMeta | None
    seq: int = LEGACY
    problem: str = ""


def scan(store: SpoolStore) -> Recovered:
    # Building an index of 100k messages makes the cyclic GC rescan everything built so
    # far again and again; nothing here makes cycles, and nothing else runs until it ends.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _scan(store)
    finally:
        if enabled:
            gc.enable()


class _Found:
    """Live segment records as the scan finds them, kept flat: the index's own objects
    (queue id, Slot) and the heads' raw bytes in one buffer, nothing else per message.

    Why: the metadata objects of 100k messages live only until the dispatcher has
    indexed them. Made while the index is built, they would be interleaved with it in
    the allocator's arenas and keep them all resident after they are freed; made
    afterwards, in one run (`meta`), they leave whole arenas that go back to the OS.
    """

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.slots: list[Slot] = []
        self.metas = bytearray()  # the metadata JSON of each, back to back
        self.ends = array.array("q")  # where each one's metadata ends in `metas`
        self.crcs = array.array("L")  # body checksums
        self.seen: set[str] = set()
        self.copies: list[str] = []  # ids already found in an older segment
        self.seq = 0

    def keep(
        self, queue_id: str, received: float, frame: record.Frame, offset: int, meta: bytes
    ) -> None:
        # A message in two segments was being compacted: the older copy is the one
        # known to be whole (the newer one's batch may never have been synced).
        if queue_id in self.seen:
            self.copies.append(queue_id)
            return
        self.seen.add(queue_id)
        self.ids.append(queue_id)
        self.slots.append(Slot(self.seq, offset, frame.head_len, frame.body_len, received))
        self.metas += meta
        self.ends.append(len(self.metas))
        self.crcs.append(frame.body_crc)

    def meta(self, i: int) -> MessageMeta:
        """Record i's metadata, decoded, sharing the index's id and arrival time.
        Raises SpoolCorrupt (what the scan's quicker check let through)."""
        start = self.ends[i - 1] if i else 0
        queue_id, slot = self.ids[i], self.slots[i]
        name = segment.path_label(slot.seq)
        raw = bytes(self.metas[start : self.ends[i]])
        meta = record.decode_checked_meta(name, raw, slot.body_size, self.crcs[i])
        if meta.queue_id != queue_id:
            raise SpoolCorrupt(name, "metadata does not match the file")
        return MessageMeta(
            queue_id, meta.envelope, slot.received_wall, slot.body_size, meta.client, meta.body_crc
        )


def _scan(store: SpoolStore) -> Recovered:
    names = sorted(os.listdir(store.queue_dir))
    legacy: list[MessageMeta] = []
    removed = quarantined = 0
    for name in names:
        if name.startswith(TMP_PREFIX):
            (store.queue_dir / name).unlink(missing_ok=True)
            removed += 1
        elif not name.endswith((STATE_SUFFIX, HOLD_SUFFIX)):
            try:
                if not valid_queue_id(name):
                    raise SpoolCorrupt(name, "not a queue file")
                legacy.append(read_meta(store, name))
            except SpoolCorrupt as exc:
                log.error("spool.quarantine file=%s reason=%s", name, exc.why)
                store.quarantine_now(name)
                quarantined += 1
    found = _Found()
    sizes: dict[int, int] = {}
    for seq in segment.sequences(store.segments_dir):
        found.seq, kept, found.copies = seq, len(found.ids), []
        result, set_aside = _recover_segment(store, seq, found.keep)
        quarantined += set_aside
        if len(found.ids) == kept:
            _reclaim(store, result)
            continue
        sizes[seq] = result.end
        if found.copies:  # durably: a finished or deleted message must not come back
            done = segment.done_path(store.segments_dir, seq)
            segment.append_done(done, found.copies, durable=True)
    _delete_lone_marks(store)
    # Arrival order (ids are time-ordered): i >= 0 is found's record i, i < 0 legacy[-1 - i].
    order = sorted(
        [(queue_id, i) for i, queue_id in enumerate(found.ids)]
        + [(meta.queue_id, -1 - j) for j, meta in enumerate(legacy)]
    )
    with_state = _ids_with(names, STATE_SUFFIX)
    with_hold = _ids_with(names, HOLD_SUFFIX)
    messages: list[tuple[MessageMeta, Progress]] = []
    held: list[tuple[MessageMeta, Progress]] = []
    adopted: list[tuple[str, int]] = []
    for entry in order:  # the metadata in one run, then the index (see _Found)
        name, i = entry
        try:
            meta = found.meta(i) if i >= 0 else legacy[-1 - i]
        except SpoolCorrupt as exc:
            slot = found.slots[i]
            _set_aside(store, slot.seq, slot.offset, slot.length, exc.why)
            quarantined += 1
            continue
        adopted.append(entry)
        progress = _read_progress(store, name) if name in with_state else NO_PROGRESS
        if name in with_hold:
            log.info("spool.held queue_id=%s action=skip", name)
            held.append((meta, progress))
        else:
            messages.append((meta, progress))
    for name, i in adopted:
        sidecars = name in with_state or name in with_hold
        if i >= 0:
            store.adopt_slot(name, found.slots[i], sidecars=sidecars)
        else:
            store.adopt(legacy[-1 - i], sidecars=sidecars)
    for seq, size in sizes.items():
        store.adopt_segment(seq, size)
    gone = (with_state | with_hold) - store.queue_ids()
    for name in gone:  # .state and .hold files of messages that are gone
        for suffix in (STATE_SUFFIX, HOLD_SUFFIX):
            (store.queue_dir / f"{name}{suffix}").unlink(missing_ok=True)
    return Recovered(messages, removed, quarantined, held)


def _ids_with(names: list[str], suffix: str) -> set[str]:
    return {name[: -len(suffix)] for name in names if name.endswith(suffix)}


def _recover_segment(store: SpoolStore, seq: int, keep: segment.Keep) -> tuple[SegmentScan, int]:
    """One segment scanned (its live records go to `keep`), after setting aside what is
    damaged; and how much was."""
    directory = store.segments_dir
    path, done_path = segment.log_path(directory, seq), segment.done_path(directory, seq)
    result = segment.scan(path, seq, segment.read_done(done_path), keep)
    for bad in result.damaged:
        _set_aside(store, seq, bad.offset, bad.length, bad.why)
    if result.tail is not Tail.CLEAN:
        _cut_tail(store, result)
    return result, len(result.damaged) + (result.tail is Tail.CORRUPT)


def _set_aside(store: SpoolStore, seq: int, offset: int, length: int, why: str) -> None:
    """Copy a damaged record to quarantine/ and mark its offset done, durably."""
    log.error(
        "spool.quarantine segment=%s offset=%d bytes=%d reason=%s",
        segment.path_label(seq), offset, length, why,
    )  # fmt: skip
    path = segment.log_path(store.segments_dir, seq)
    segment.copy_out(path, offset, length, _aside(store, seq, offset))
    done = segment.done_path(store.segments_dir, seq)
    segment.append_done(done, [f"@{offset}"], durable=True)


def _reclaim(store: SpoolStore, result: SegmentScan) -> None:
    log.info(
        "spool.segment_reclaimed segment=%s finished=%d",
        segment.path_label(result.seq), result.finished,
    )  # fmt: skip
    segment.log_path(store.segments_dir, result.seq).unlink(missing_ok=True)
    segment.done_path(store.segments_dir, result.seq).unlink(missing_ok=True)


def _cut_tail(store: SpoolStore, result: SegmentScan) -> None:
    path = segment.log_path(store.segments_dir, result.seq)
    cut = result.size - result.end
    if result.tail is Tail.CORRUPT:
        log.error(
            "spool.quarantine segment=%s offset=%d bytes=%d reason=%s action=truncate",
            segment.path_label(result.seq), result.end, cut, result.why,
        )  # fmt: skip
        segment.copy_out(path, result.end, None, _aside(store, result.seq, result.end))
    else:
        log.warning(
            "spool.torn_tail segment=%s offset=%d bytes=%d action=truncate",
            segment.path_label(result.seq), result.end, cut,
        )  # fmt: skip
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, result.end)
        os.fsync(fd)
    finally:
        os.close(fd)


def _aside(store: SpoolStore, seq: int, offset: int) -> Path:
    return store.quarantine_dir / f"{segment.path_label(seq)}@{offset}"


def _delete_lone_marks(store: SpoolStore) -> None:
    logs = set(segment.sequences(store.segments_dir))
    for seq in segment.sequences(store.segments_dir, segment.DONE_SUFFIX):
        if seq not in logs:
            segment.done_path(store.segments_dir, seq).unlink(missing_ok=True)


def read_meta(store: SpoolStore, name: str) -> MessageMeta:
    """Envelope metadata of legacy queue file `name`, its size checked. Raises SpoolCorrupt."""
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


def _read_progress(store: SpoolStore, name: str) -> Progress:
    try:
        return read_progress(store, name)
    except SpoolCorrupt as exc:
        log.error("spool.bad_state queue_id=%s reason=%s action=restart-recipients", name, exc.why)
        state_name = f"{name}{STATE_SUFFIX}"
        os.replace(store.queue_dir / state_name, store.quarantine_dir / state_name)
        return Progress()


def read_progress(store: SpoolStore, name: str) -> Progress:
    """Settled recipients of `name` (none without a .state file). Raises SpoolCorrupt."""
    state_name = f"{name}{STATE_SUFFIX}"
    try:
        data = (store.queue_dir / state_name).read_bytes()
    except FileNotFoundError:
        return Progress()
    return record.decode_progress(state_name, data)


def listing(store: SpoolStore) -> Iterator[Listed]:
    """Every message in the spool, legacy files first, without changing anything."""
    for name in sorted(os.listdir(store.queue_dir)):
        if name.startswith(TMP_PREFIX) or name.endswith((STATE_SUFFIX, HOLD_SUFFIX)):
            continue
        try:
            if not valid_queue_id(name):
                raise SpoolCorrupt(name, "not a queue file")
            yield Listed(name, read_meta(store, name))
        except SpoolCorrupt as exc:
            yield Listed(name, None, problem=exc.why)
        except FileNotFoundError:  # delivered and removed by a running instance meanwhile
            continue
    if not store.segments_dir.is_dir():
        return
    sequences = segment.sequences(store.segments_dir)
    for seq in sequences:
        try:
            done = segment.read_done(segment.done_path(store.segments_dir, seq))
            result = segment.scan(segment.log_path(store.segments_dir, seq), seq, done)
        except FileNotFoundError:  # reclaimed by a running instance meanwhile
            continue
        for f in result.found:
            yield Listed(f.meta.queue_id, f.meta, seq)
        label = segment.path_label(seq)
        for bad in result.damaged:
            yield Listed(f"{label}@{bad.offset}", None, seq, bad.why)
        # The newest segment of a running instance may end in a batch being written.
        if result.tail is Tail.CORRUPT and seq != sequences[-1]:
            yield Listed(f"{label}@{result.end}", None, seq, result.why)
