"""Queue administration: `smtpbalancer queue …` and `smtpbalancer trace`.

Reading (list, summary, show, trace) needs no lock and works on a running
instance's spool too: it reuses spool/recovery.py (`listing`, `read_progress`),
which reads the segments and their done marks like recovery does but changes
nothing: a corrupt entry is listed as `corrupt` and left for the next start to
quarantine; a torn tail (a batch being written) is not listed, and a segment
reclaimed while it is read is skipped (everything in it was finished). With
`[server] workers = N` every shard is read (spool.directory and its worker-N/).

Changes (hold, release, delete, retry) go through the running instance when there
is one (its spool is locked): the CLI posts to the admin listener (`[metrics]
listen`, with the admin token), so the instance updates its schedule at once. On
a stopped instance they take the spool lock for the whole command:

- hold: an empty marker `queue/ID.hold`; recovery counts the message but does
  not deliver it until `release` removes the marker. The lifetime still runs.
- delete: a done mark for the message's record, fsync'd (a legacy message file is
  unlinked and the directory fsync'd), then its .state and .hold files are
  removed. No DSN is sent. A running instance refuses while the message is being
  delivered (try again in a moment).
- retry: running, the message (or every one with --all) is attempted now, skipping
  its backoff; stopped, retry delays live only in memory, so every spooled message
  that is not held is attempted as soon as the instance starts, and offline `retry`
  changes nothing on disk and says so (and names held messages: release them first).
Exit codes: 0 ok, 1 spool locked / unknown id / I/O error, 2 usage or config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

from smtpbalancer import admin_client, config
from smtpbalancer.admin_client import AdminUnavailable
from smtpbalancer.clock import SystemClock
from smtpbalancer.durable import fsync_dir
from smtpbalancer.envelope import valid_queue_id
from smtpbalancer.errors import ConfigError, SpoolCorrupt, SpoolError
from smtpbalancer.spool import recovery
from smtpbalancer.spool.record import MessageMeta, Progress
from smtpbalancer.spool.sidecar import HOLD_SUFFIX
from smtpbalancer.spool.store import LEGACY, SpoolStore, finish_durably

if TYPE_CHECKING:  # rich is imported where a table is drawn: `serve` never needs it
    from rich.console import Console

COMMANDS: Final = ("queue", "trace")
AGE_BUCKETS: Final = ((300.0, "<5m"), (3600.0, "<1h"), (21600.0, "<6h"), (86400.0, "<1d"))
OLDEST_BUCKET: Final = "≥1d"


class Refused(Exception):
    """The command cannot go on; the message is for the operator, the code for the shell."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Entry:
    """What the spool holds about one message; `problem` is set when it is corrupt."""

    queue_id: str
    meta: MessageMeta | None
    progress: Progress
    held: bool
    problem: str = ""
    seq: int = LEGACY  # the segment holding it; LEGACY: a file in queue/

    @property
    def state(self) -> str:
        if self.problem:
            return "corrupt"
        if self.held:
            return "held"
        return "partial" if self.progress.delivered or self.progress.failed else "queued"

    def counts(self) -> tuple[int, int, int]:
        """Recipients pending, delivered, failed."""
        if self.meta is None:
            return 0, 0, 0
        rcpts = self.meta.envelope.rcpt_tos
        pending = len(self.progress.pending(rcpts))
        return pending, len(self.progress.delivered), len(self.progress.failed)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `queue` and `trace` subcommands (wired into cli.py's parser)."""
    queue = sub.add_parser("queue", help="inspect or change the spool (a running instance's too)")
    actions = queue.add_subparsers(dest="action", required=True)
    for name, help_text in (
        ("list", "one line per spooled message"),
        ("show", "envelope, per-recipient state and failure replies of one message"),
        ("delete", "remove a message from the spool (no DSN is sent)"),
        ("hold", "keep a message in the spool, undelivered, until released"),
        ("release", "let a held message be delivered again"),
        ("retry", "attempt now (a running instance); offline: report what the start attempts"),
        ("summary", "counts by age, sender domain and state"),
    ):
        p = actions.add_parser(name, help=help_text)
        p.add_argument("--config", required=True, type=Path)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if name in ("show", "delete", "hold", "release"):
            p.add_argument("queue_id")
        if name == "retry":
            p.add_argument("queue_id", nargs="?")
            p.add_argument("--all", action="store_true")
        if name == "delete":
            p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    trace = sub.add_parser("trace", help="what the spool and a JSON log know about a message")
    trace.add_argument("queue_id")
    trace.add_argument("--config", required=True, type=Path)
    trace.add_argument("--log", type=Path, default=None, help="a log file (JSON or text lines)")
    trace.add_argument("--json", action="store_true")


READ_ONLY = frozenset({"list", "summary", "show"})


def run(args: argparse.Namespace) -> int:
    # Reading needs no lock: segment readers stop at a record still being written and
    # skip segments reclaimed underneath them, and .state files are renamed into place,
    # so list/summary/show/trace also work on the spool of a running instance.
    read_only = args.command == "trace" or getattr(args, "action", "") in READ_ONLY
    try:
        cfg = _config(args.config)
        if not read_only and _running(cfg):
            return _online(cfg, args)
        with offline_spools(cfg, lock=not read_only) as stores:
            if args.command == "trace":
                return _trace(stores, args)
            return _queue(stores, args)
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code


def _config(path: Path) -> config.Config:
    try:
        return config.load(path)
    except ConfigError as exc:
        raise Refused("; ".join(exc.problems), 2) from None


def shard_directories(cfg: config.Config) -> list[Path]:
    """spool.directory, then worker-N/ shards that exist (any count: a shard left after
    lowering `workers` is shown too)."""
    root = cfg.spool.directory
    shards = [root]
    if root.is_dir():
        numbered = [
            (int(p.name.removeprefix("worker-")), p)
            for p in root.iterdir()
            if p.name.startswith("worker-") and p.name.removeprefix("worker-").isdigit()
        ]
        shards += [p for _, p in sorted(numbered)]
    return [d for d in shards if (d / "queue").is_dir()]


def _running(cfg: config.Config) -> bool:
    """Does an instance hold any shard's lock? (Then changes go through its admin listener.)"""
    for directory in shard_directories(cfg):
        probe = SpoolStore(directory, SystemClock(), threads=1)
        try:
            probe.open()
        except SpoolError:
            return True
        finally:
            probe.close()
    return False


@contextmanager
def offline_spools(cfg: config.Config, *, lock: bool = True) -> Iterator[list[SpoolStore]]:
    """Every shard of the configured spool; with `lock`, locked for the duration (Refused
    if an instance runs on one), else read-only views a running instance may change."""
    directories = shard_directories(cfg)
    if not directories:
        raise Refused(f"no spool at {cfg.spool.directory}")
    stores = [SpoolStore(d, SystemClock(), threads=1) for d in directories]
    try:
        for store in stores:
            if lock:
                store.open()
        yield stores
    except SpoolError:
        raise Refused(
            f"the spool {cfg.spool.directory} is locked by a running instance whose admin"
            " listener is off: enable [metrics] listen, or stop it first"
        ) from None
    finally:
        for store in stores:
            store.close()


# --- changes through a running instance ---------------------------------------------

_ONLINE_DONE: Final = {"held", "released", "deleted", "scheduled"}


def _online(cfg: config.Config, args: argparse.Namespace) -> int:
    action: str = args.action
    query: list[tuple[str, str]]
    if action == "retry":
        if bool(args.all) == bool(args.queue_id):
            raise Refused("give a queue id or --all", 2)
        query = [("all", "1")] if args.all else [("id", args.queue_id)]
    else:
        query = [("id", args.queue_id)]
    if action == "delete":
        _confirm(args.yes, f"delete {args.queue_id} without a bounce?")
    try:
        status, doc = admin_client.post(cfg.metrics, f"/queue/{action}", query)
    except AdminUnavailable as exc:
        raise Refused(f"an instance runs on the spool, but {exc}") from None
    if status == 401:
        raise Refused("the admin listener wants its token: set [metrics] admin_token_file")
    results = dict(doc.get("results", {}))
    if status not in (200, 404) or (not results and action != "retry"):
        raise Refused(f"the admin listener answered {status}: {doc.get('error', doc)}")
    rows = [{"queue_id": qid, "action": outcome} for qid, outcome in sorted(results.items())]
    _emit(args.json, rows if action == "retry" else rows[0], None)
    problems = {qid: o for qid, o in results.items() if o not in _ONLINE_DONE and o != "held"}
    if action != "retry" and problems:
        qid, outcome = next(iter(problems.items()))
        if outcome == "unknown":
            raise Refused(f"no message {qid} in the spool")
        if outcome == "busy":
            raise Refused(f"{qid} is being delivered right now: try again in a moment")
        raise Refused(f"{qid}: {outcome}")
    return 0


def entries(stores: list[SpoolStore]) -> list[Entry]:
    found: dict[str, Entry] = {}
    for store in stores:
        names = set(os.listdir(store.queue_dir))
        for listed in recovery.listing(store):  # the first of two copies is the one delivered
            if listed.name not in found:
                found[listed.name] = _entry(store, listed, names)
    return sorted(found.values(), key=lambda e: e.queue_id)


def _entry(store: SpoolStore, listed: recovery.Listed, names: set[str]) -> Entry:
    name = listed.name
    held = f"{name}{HOLD_SUFFIX}" in names
    if listed.meta is None:
        return Entry(name, None, Progress(), held, listed.problem, listed.seq)
    try:
        progress = recovery.read_progress(store, name)
    except SpoolCorrupt as exc:  # the next start restarts its recipients
        return Entry(name, listed.meta, Progress(), held, f"state file: {exc.why}", listed.seq)
    return Entry(name, listed.meta, progress, held, seq=listed.seq)


def _one(stores: list[SpoolStore], queue_id: str) -> Entry:
    return _copies(stores, queue_id)[1][0]


def _copies(stores: list[SpoolStore], queue_id: str) -> tuple[SpoolStore, list[Entry]]:
    """The shard holding the message, and the message in every segment that holds it
    (two after a crash during compaction, the older first: the one recovery delivers)."""
    for store in stores if valid_queue_id(queue_id) else ():
        names = set(os.listdir(store.queue_dir))
        found = [
            _entry(store, listed, names)
            for listed in recovery.listing(store)
            if listed.name == queue_id
        ]
        if found:
            return store, found
    raise Refused(f"no message {queue_id} in the spool")


def _queue(stores: list[SpoolStore], args: argparse.Namespace) -> int:
    now = SystemClock().wall()
    action: str = args.action
    if action == "list":
        rows = [_row(e, now) for e in entries(stores)]
        _emit(args.json, rows, lambda: _list_table(rows))
    elif action == "summary":
        doc = summary(entries(stores), now)
        _emit(args.json, doc, lambda: _summary_tables(doc))
    elif action == "show":
        doc = detail(_one(stores, args.queue_id), now)
        _emit(args.json, doc, lambda: _detail_table(doc))
    elif action == "hold":
        store, _ = _copies(stores, args.queue_id)
        _write_marker(store, args.queue_id)
        _emit(args.json, {"queue_id": args.queue_id, "action": "held"}, None)
    elif action == "release":
        store, (entry, *_) = _copies(stores, args.queue_id)
        if entry.held:
            (store.queue_dir / f"{args.queue_id}{HOLD_SUFFIX}").unlink(missing_ok=True)
            fsync_dir(store.queue_dir)
        _emit(args.json, {"queue_id": args.queue_id, "action": "released"}, None)
    elif action == "delete":
        store, copies = _copies(stores, args.queue_id)
        _confirm(args.yes, f"delete {args.queue_id} without a bounce?")
        for entry in copies:
            finish_durably(store.directory, entry.seq, args.queue_id)
        _emit(args.json, {"queue_id": args.queue_id, "action": "deleted"}, None)
    elif action == "retry":
        return _retry(stores, args)
    return 0


def _retry(stores: list[SpoolStore], args: argparse.Namespace) -> int:
    if bool(args.all) == bool(args.queue_id):
        raise Refused("give a queue id or --all", 2)
    chosen = entries(stores) if args.all else [_one(stores, args.queue_id)]
    docs = [
        {
            "queue_id": e.queue_id,
            "action": "none",
            "note": "held: release it first" if e.held else "attempted as soon as it starts",
        }
        for e in chosen
    ]
    _emit(args.json, docs, None)
    return 0


def _confirm(yes: bool, question: str) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise Refused("not a terminal: add --yes to confirm", 2)
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise Refused("not confirmed", 1)


def _write_marker(store: SpoolStore, queue_id: str) -> None:
    fd = os.open(store.queue_dir / f"{queue_id}{HOLD_SUFFIX}", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(store.queue_dir)


# --- documents ----------------------------------------------------------------


def _rfc3339(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _age(seconds: float) -> str:
    whole = max(0, int(seconds))
    for big, big_unit, small, small_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "m")):
        if whole >= big:
            return f"{whole // big}{big_unit}{(whole % big) // small}{small_unit}"
    return f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s"


def _row(e: Entry, now: float) -> dict[str, object]:
    pending, delivered, failed = e.counts()
    meta = e.meta
    return {
        "queue_id": e.queue_id,
        "age_s": round(now - meta.received_wall, 1) if meta else None,
        "size": meta.body_size if meta else None,
        "sender": (meta.envelope.mail_from or "<>") if meta else None,
        "pending": pending,
        "delivered": delivered,
        "failed": failed,
        "state": e.state,
        **({"problem": e.problem} if e.problem else {}),
    }


def detail(e: Entry, now: float) -> dict[str, object]:
    doc = _row(e, now)
    meta = e.meta
    if meta is None:
        return doc
    recipients: list[dict[str, object]] = []
    for rcpt in meta.envelope.rcpt_tos:
        failure = e.progress.failed.get(rcpt)
        if failure is not None:
            recipients.append(
                {
                    "rcpt": rcpt,
                    "state": "failed",
                    "status": failure.status,
                    "reply": failure.diagnostic,
                    "remote_mta": failure.remote_mta,
                    "at": _rfc3339(failure.at_wall) if failure.at_wall else None,
                }
            )
        else:
            state = "delivered" if rcpt in e.progress.delivered else "pending"
            recipients.append({"rcpt": rcpt, "state": state})
    doc.update(
        arrival=_rfc3339(meta.received_wall),
        client=meta.client,
        smtputf8=meta.envelope.smtputf8,
        body_8bit=meta.envelope.body_8bit,
        attempts_recorded=e.progress.attempts,
        held=e.held,
        recipients=recipients,
    )
    return doc


def summary(all_entries: list[Entry], now: float) -> dict[str, object]:
    ages: Counter[str] = Counter()
    domains: Counter[str] = Counter()
    states: Counter[str] = Counter()
    size = 0
    for e in all_entries:
        states[e.state] += 1
        if e.meta is None:
            continue
        size += e.meta.body_size
        age = now - e.meta.received_wall
        ages[next((label for limit, label in AGE_BUCKETS if age < limit), OLDEST_BUCKET)] += 1
        sender = e.meta.envelope.mail_from
        domains[sender.rpartition("@")[2].lower() if sender else "<>"] += 1
    order = [label for _, label in AGE_BUCKETS] + [OLDEST_BUCKET]
    return {
        "messages": len(all_entries),
        "bytes": size,
        "by_age": {label: ages[label] for label in order if ages[label]},
        "by_sender_domain": dict(domains.most_common()),
        "by_state": dict(states.most_common()),
    }


# --- output -------------------------------------------------------------------


def _console() -> Console:
    from rich.console import Console

    # Not a terminal (a pipe, a test): wide enough that queue ids and replies never fold.
    return Console() if sys.stdout.isatty() else Console(width=200, no_color=True)


def _emit(as_json: bool, doc: object, table: Callable[[], None] | None) -> None:
    if as_json:
        print(json.dumps(doc, ensure_ascii=False, indent=2))
    elif table is not None:
        table()
    else:
        for item in doc if isinstance(doc, list) else [doc]:
            assert isinstance(item, dict)
            print(" ".join(f"{k}={v}" for k, v in item.items()))


def _list_table(rows: list[dict[str, object]]) -> None:
    from rich.table import Table

    table = Table("queue id", "age", "size", "sender", "pending", "delivered", "failed", "state")
    for r in rows:
        age = r["age_s"]
        table.add_row(
            str(r["queue_id"]),
            _age(age) if isinstance(age, float) else "?",
            str(r["size"] if r["size"] is not None else "?"),
            str(r["sender"] or "?"),
            str(r["pending"]),
            str(r["delivered"]),
            str(r["failed"]),
            str(r["state"]) + (f" ({r['problem']})" if "problem" in r else ""),
        )
    console = _console()
    console.print(table)
    console.print(f"{len(rows)} message(s)")


def _summary_tables(doc: dict[str, object]) -> None:
    from rich.table import Table

    console = _console()
    console.print(f"{doc['messages']} message(s), {doc['bytes']} bytes")
    for key, title in (
        ("by_age", "age"),
        ("by_sender_domain", "sender domain"),
        ("by_state", "state"),
    ):
        table = Table(title, "messages")
        counts = doc[key]
        assert isinstance(counts, dict)
        for label, count in counts.items():
            table.add_row(str(label), str(count))
        console.print(table)


def _detail_table(doc: dict[str, object]) -> None:
    from rich.table import Table

    console = _console()
    head = Table(show_header=False)
    for key, value in doc.items():
        if key != "recipients":
            head.add_row(key, str(value))
    console.print(head)
    recipients = doc.get("recipients")
    if isinstance(recipients, list):
        table = Table("recipient", "state", "status", "reply", "at")
        for r in recipients:
            table.add_row(
                r["rcpt"], r["state"], r.get("status", ""), r.get("reply", ""), r.get("at") or ""
            )
        console.print(table)


# --- trace --------------------------------------------------------------------


def _trace(stores: list[SpoolStore], args: argparse.Namespace) -> int:
    queue_id: str = args.queue_id
    try:
        spooled: dict[str, object] | None = detail(_one(stores, queue_id), SystemClock().wall())
    except Refused:
        spooled = None
    lines = log_lines(args.log, queue_id) if args.log is not None else []
    if args.json:
        print(json.dumps({"spool": spooled, "log": lines}, ensure_ascii=False, indent=2))
    else:
        if spooled is None:
            print(f"{queue_id}: not in the spool (delivered, bounced, deleted or unknown)")
        else:
            _detail_table(spooled)
        for line in lines:
            print(f"{line.get('ts', '')} {line.get('level', '')} {line.get('message', '')}")
    return 0 if spooled is not None or lines else 1


def log_lines(path: Path, queue_id: str) -> list[dict[str, object]]:
    """Every line of a log file about `queue_id`, in file order.

    JSON lines match on their `queue_id` or `dsn_queue_id` field; other lines
    (the text format) on `queue_id=ID` anywhere in them.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise Refused(f"cannot read {path}: {exc.strerror}") from None
    found: list[dict[str, object]] = []
    needle = f"queue_id={queue_id}"
    for raw in text.splitlines():
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            if queue_id in (doc.get("queue_id"), doc.get("dsn_queue_id")):
                found.append(doc)
        elif needle in raw:
            found.append({"message": raw})
    return found
