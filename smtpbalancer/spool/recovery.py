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
GC is paused while the index is built (100k messages: ~2 s of CPU, ~120 MB).

`listing` is the read-only half, for `smtpbalancer queue` on a running instance's
spool: it changes nothing, and tolerates a torn tail and segments that vanish.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from smtpbalancer.envelope import valid_queue_id
from smtpbalancer.errors import SpoolCorrupt
from smtpbalancer.spool import record, segment
from smtpbalancer.spool.record import MessageMeta, Progress
from smtpbalancer.spool.segment import SegmentScan, Tail
from smtpbalancer.spool.sidecar import HOLD_SUFFIX, STATE_SUFFIX, TMP_PREFIX
from smtpbalancer.spool.store import LEGACY, SpoolStore

log = logging.getLogger(__name__)

_HEAD_READ = 64 * 1024
_NO_PROGRESS: Final = Progress()  # shared: progress is replaced, never changed in place


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


def _scan(store: SpoolStore) -> Recovered:
    names = sorted(os.listdir(store.queue_dir))
    live: list[tuple[MessageMeta, int, int, int]] = []  # meta, seq, offset, head_len
    removed = quarantined = 0
    for name in names:
        if name.startswith(TMP_PREFIX):
            (store.queue_dir / name).unlink(missing_ok=True)
            removed += 1
        elif not name.endswith((STATE_SUFFIX, HOLD_SUFFIX)):
            try:
                if not valid_queue_id(name):
                    raise SpoolCorrupt(name, "not a queue file")
                live.append((read_meta(store, name), LEGACY, 0, 0))
            except SpoolCorrupt as exc:
                log.error("spool.quarantine file=%s reason=%s", name, exc.why)
                store.quarantine_now(name)
                quarantined += 1
    seen: set[str] = set()
    sizes: list[tuple[int, int]] = []
    for seq in segment.sequences(store.segments_dir):
        result, set_aside = _recover_segment(store, seq)
        quarantined += set_aside
        kept, copies = len(live), []
        for meta, offset, head_len in result.found:
            # A message in two segments was being compacted: the older copy is the one
            # known to be whole (the newer one's batch may never have been synced).
            if meta.queue_id in seen:
                copies.append(meta.queue_id)
            else:
                seen.add(meta.queue_id)
                live.append((meta, seq, offset, head_len))
        if len(live) == kept:
            _reclaim(store, result)
            continue
        sizes.append((seq, result.end))
        if copies:  # durably: a finished or deleted message must not come back as the copy
            done = segment.done_path(store.segments_dir, seq)
            segment.append_done(done, copies, durable=True)
    _delete_lone_marks(store)
    live.sort(key=lambda entry: entry[0].queue_id)  # arrival order: ids are time-ordered
    with_state = _ids_with(names, STATE_SUFFIX)
    with_hold = _ids_with(names, HOLD_SUFFIX)
    messages: list[tuple[MessageMeta, Progress]] = []
    held: list[tuple[MessageMeta, Progress]] = []
    for meta, seq, offset, head_len in live:
        name = meta.queue_id
        stated, on_hold = name in with_state, name in with_hold
        store.adopt(meta, seq, offset, head_len, sidecars=stated or on_hold)
        progress = _read_progress(store, name) if stated else _NO_PROGRESS
        if on_hold:
            log.info("spool.held queue_id=%s action=skip", name)
            held.append((meta, progress))
        else:
            messages.append((meta, progress))
    for seq, size in sizes:
        store.adopt_segment(seq, size)
    gone = (with_state | with_hold) - store.queue_ids()
    for name in gone:  # .state and .hold files of messages that are gone
        for suffix in (STATE_SUFFIX, HOLD_SUFFIX):
            (store.queue_dir / f"{name}{suffix}").unlink(missing_ok=True)
    return Recovered(messages, removed, quarantined, held)


def _ids_with(names: list[str], suffix: str) -> set[str]:
    return {name[: -len(suffix)] for name in names if name.endswith(suffix)}


def _recover_segment(store: SpoolStore, seq: int) -> tuple[SegmentScan, int]:
    """One segment scanned, after setting aside what is damaged; and how much was."""
    directory = store.segments_dir
    path, done_path = segment.log_path(directory, seq), segment.done_path(directory, seq)
    result = segment.scan(path, seq, segment.read_done(done_path))
    for bad in result.damaged:
        log.error(
            "spool.quarantine segment=%s offset=%d bytes=%d reason=%s",
            segment.path_label(seq), bad.offset, bad.length, bad.why,
        )  # fmt: skip
        segment.copy_out(path, bad.offset, bad.length, _aside(store, seq, bad.offset))
        segment.append_done(done_path, [f"@{bad.offset}"], durable=True)
    if result.tail is not Tail.CLEAN:
        _cut_tail(store, result)
    return result, len(result.damaged) + (result.tail is Tail.CORRUPT)


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
