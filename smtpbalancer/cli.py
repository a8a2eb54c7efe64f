"""Command line: `smtpbalancer serve|check-config|passwd|sink|demo|queue|trace|version`.

Picks the event loop (uvloop unless `--loop asyncio`), sets up logging on
stderr, maps errors to exit codes: 0 ok, 1 runtime failure, 2 usage or
config error. Config keys are never mirrored as flags.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from smtpbalancer import __version__, config, logs, queue_admin, sdnotify
from smtpbalancer.errors import ConfigError, SpoolError

log = logging.getLogger("smtpbalancer")


def _parser() -> argparse.ArgumentParser:
    # No abbreviations: `trace --log FILE` must not be taken for a prefix of --log-level.
    p = argparse.ArgumentParser(
        prog="smtpbalancer", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    p.add_argument(
        "--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR (default INFO; demo WARNING)"
    )
    p.add_argument(
        "--log-format", choices=logs.FORMATS, default=None, help="default json for serve, else text"
    )
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    sub = p.add_subparsers(dest="command", required=True)
    queue_admin.add_commands(sub)

    serve = sub.add_parser("serve", help="run the relay in the foreground")
    serve.add_argument("--config", required=True, type=Path)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("--config", required=True, type=Path)

    sink = sub.add_parser("sink", help="run a small test relay that accepts mail")
    sink.add_argument("--listen", required=True, help="HOST:PORT (port 0 = any free port)")
    sink.add_argument("--maildir", type=Path, default=None, help="store accepted mail here")
    sink.add_argument("--tempfail-rate", type=float, default=0.0, help="P(RCPT answered 451)")
    sink.add_argument("--permfail-rate", type=float, default=0.0, help="P(RCPT answered 550)")
    sink.add_argument("--delay", type=float, default=0.0, help="seconds before the DATA reply")

    demo = sub.add_parser("demo", help="relay a few thousand messages through local sinks")
    demo.add_argument("--messages", type=int, default=3000)
    demo.add_argument("--clients", type=int, default=20)
    demo.add_argument("--keep-spool", type=Path, default=None, help="spool here, not in a temp dir")

    passwd = sub.add_parser(
        "passwd", help="print a users_file line for USER; the password is read from stdin"
    )
    passwd.add_argument("user")

    sub.add_parser("version", help="print the version")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    default_level = "WARNING" if args.command == "demo" else "INFO"
    default_format = "json" if args.command == "serve" else "text"
    logs.configure(str(args.log_level or default_level), args.log_format or default_format)
    command: str = args.command
    if command in queue_admin.COMMANDS:
        return queue_admin.run(args)
    if command == "version":
        print(f"smtpbalancer {__version__}")
        return 0
    if command == "check-config":
        return _check_config(args.config)
    if command == "serve":
        options = ["--loop", args.loop]  # what each worker of a supervisor is started with
        if args.log_level:
            options += ["--log-level", args.log_level]
        options += ["--log-format", args.log_format or default_format]
        return _serve(args.config, args.loop, options)
    if command == "passwd":
        return _passwd(args.user)
    if command == "sink":
        from smtpbalancer.sink import run_sink

        return _run(
            lambda: run_sink(
                args.listen,
                maildir=args.maildir,
                tempfail_rate=args.tempfail_rate,
                permfail_rate=args.permfail_rate,
                delay_s=args.delay,
            ),
            args.loop,
        )
    if command == "demo":
        from smtpbalancer.demo import run_demo

        return _run(
            lambda: run_demo(messages=args.messages, clients=args.clients, spool=args.keep_spool),
            args.loop,
        )
    raise AssertionError(command)


def _check_config(path: Path) -> int:
    try:
        cfg = config.load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    ups = ", ".join(
        f"{u.name}={u.endpoint} w={u.weight}{' backup' if u.backup else ''}" for u in cfg.upstreams
    )
    print(
        f"ok: {path}: listen {cfg.server.host}:{cfg.server.port}, spool {cfg.spool.directory}, "
        f"{len(cfg.upstreams)} upstream(s): {ups}"
    )
    return 0


def _serve(path: Path, loop_name: str, options: list[str]) -> int:
    try:
        cfg = config.load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("config.invalid %s", problem)
        return 2
    from smtpbalancer import workers
    from smtpbalancer.app import App
    from smtpbalancer.tasks import spawn

    role = workers.WorkerRole.from_env()
    if role is None and workers.refuse_stranded(cfg):
        return 1
    if role is None and cfg.server.workers > 1:
        return _run(lambda: workers.Supervisor(cfg, path, options).run(), loop_name)

    def make_app() -> App:
        if role is None:
            return App(cfg, config_path=path)
        return App(
            workers.worker_config(cfg, role),
            config_path=path,
            adapt=functools.partial(workers.worker_config, role=role),
            reuse_port=True,
        )

    async def serve() -> int:
        app = make_app()
        ready = False  # READY=1 was sent: systemd is told about reloads only after it

        async def reload() -> None:
            if ready:  # sd_notify(3): RELOADING=1 carries CLOCK_MONOTONIC in µs
                sdnotify.notify(f"RELOADING=1\nMONOTONIC_USEC={int(app.clock.monotonic() * 1e6)}")
            outcome = "reload failed"
            try:
                outcome = await app.reload()
            finally:
                if ready:
                    sdnotify.notify(f"READY=1\nSTATUS={sdnotify.status_line(outcome)}")

        # Before start: the ready line may make a supervisor send SIGHUP at once.
        # A reload (config file + certificate) runs as its own task; it logs its outcome.
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, lambda: spawn(reload(), name="config-reload")
        )
        try:
            await app.start()
        except SpoolError as exc:
            log.error("spool.unavailable %s", exc)
            return 1
        except OSError as exc:
            log.error("smtpbalancer.start_failed %s", exc)
            await app.stop()
            return 1
        _settle_collector()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, app.request_stop)
        ready = True  # app.start() returned: the SMTP listeners accept
        if role is not None:
            workers.report_ready(role, app.metrics_address[1] if app.metrics_address else 0)
        sdnotify.notify("READY=1\nSTATUS=accepting mail on {}:{}".format(*app.smtp_address))
        await app.wait_stopped()
        sdnotify.notify("STOPPING=1\nSTATUS=draining")
        await app.stop()
        return 0

    return _run(serve, loop_name)


# Container allocations between young-generation collections (CPython's default is 700).
GC_YOUNG_THRESHOLD = 3_000


def _settle_collector() -> None:
    """Take what exists once serving starts out of the cyclic collector's sight.

    Every full collection rescans every tracked object: modules, config, and a recovered
    queue (100k messages are over a million objects) cost pauses of ~100 ms on the event
    loop, which is every session's latency. What exists now lives as long as the process
    or is freed by reference counting, which freezing does not stop. A larger young
    generation also means fewer collections: a message allocates a few hundred containers,
    and with the default of 700 the collector ran every two or three messages.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def _passwd(user: str) -> int:
    """Print `user:scrypt$...`; the password never comes from argv (ps, shell history)."""
    from smtpbalancer import passwords

    if not passwords.valid_user(user):
        print("error: a user name has no white space or ':'", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass(f"Password for {user}: ")
        if getpass.getpass("Again: ") != password:
            print("error: the passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("error: empty password", file=sys.stderr)
        return 2
    print(f"{user}:{passwords.hash_password(password.encode('utf-8'))}")
    return 0


def _run(factory: Callable[[], Coroutine[Any, Any, Any]], loop_name: str) -> int:
    loop_factory = None
    if loop_name == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        try:
            result = runner.run(_cancel_on_signal(factory))
        except KeyboardInterrupt:
            return 130
    return int(result) if isinstance(result, int) else 0


async def _cancel_on_signal(factory: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run the coroutine; SIGTERM/SIGINT cancel it unless it installs its own handlers."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await factory()
    except asyncio.CancelledError:
        return 0
