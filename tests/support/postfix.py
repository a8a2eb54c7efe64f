"""A private Postfix instance whose smtp client relays everything to the proxy.

Its own config, queue and data directories (`postfix -c DIR start|stop`); the
system's instance is never touched and nothing is killed by name: the instance is
stopped with its own `postfix -c DIR stop` (then `abort`), and only if its master
is still alive after that, the master's PID is killed. Mail is injected through
the instance's own smtpd on a free high port of 127.0.0.1; its smtp client binds
127.0.0.2 and talks STARTTLS (the test CA as smtp_tls_CAfile, so Postfix logs the
proxy as Trusted) and AUTH (Cyrus SASL client, PLAIN or LOGIN) to
`relayhost = [127.0.0.1]:PROXYPORT`, with connection caching (TLS via tlsproxy).

Postfix's unprivileged processes run as the `postfix` user, so the instance lives
in a directory of its own under /tmp (mode 0755), not under pytest's 0700 tmp.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from support.clients import CLIENT_IP, Finished, run

SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/lib/postfix/sbin")
SASL_PLUGIN_DIRS = ("/usr/lib/x86_64-linux-gnu/sasl2", "/usr/lib/aarch64-linux-gnu/sasl2",
                    "/usr/lib/sasl2", "/usr/lib64/sasl2")  # fmt: skip

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
tlsproxy  unix  -       -       n       -       0       tlsproxy
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix-client.test
mydomain = client.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
smtputf8_enable = yes
biff = no
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
# The client side under test: everything to the proxy, from 127.0.0.2, TLS then AUTH.
relayhost = [127.0.0.1]:{proxy_port}
smtp_bind_address = {client_ip}
smtp_helo_name = postfix-client.test
smtp_tls_security_level = encrypt
smtp_tls_CAfile = {ca}
smtp_tls_loglevel = 1
smtp_sasl_auth_enable = {sasl}
smtp_sasl_password_maps = texthash:{root}/sasl_passwd
smtp_sasl_security_options = noanonymous
smtp_sasl_tls_security_options = noanonymous
# Reuse sessions to the proxy: one delivery agent at a time, its connection cached
# (a TLS session is cached in tlsproxy, Postfix >= 3.4).
smtp_destination_concurrency_limit = 1
smtp_connection_cache_destinations = $relayhost
smtp_connection_cache_time_limit = 10s
smtp_tls_connection_reuse = yes
# Retry at once if something was deferred (a loaded machine), never wait minutes.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
"""


def binary(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + ":".join(SBIN_DIRS))


def unavailable() -> str | None:
    """Why this machine cannot run a private Postfix instance, or None."""
    if binary("postfix") is None:
        return "postfix is not installed (Debian: apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (its master runs as root)"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no 'postfix' user"
    return None


def sasl_client_available() -> bool:
    """Postfix built with Cyrus SASL and the PLAIN or LOGIN client plugin installed."""
    postconf = binary("postconf")
    if postconf is None:
        return False
    types = subprocess.run([postconf, "-A"], capture_output=True, text=True, timeout=30)
    if "cyrus" not in types.stdout.split():
        return False
    return any(
        (Path(d) / f"lib{mech}.so").exists() or (Path(d) / f"lib{mech}.so.2").exists()
        for d in SASL_PLUGIN_DIRS
        for mech in ("plain", "login")
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivatePostfix:
    QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

    def __init__(self, *, proxy_port: int, ca: Path, user: str | None, password: str) -> None:
        exe = binary("postfix")
        assert exe is not None
        self.exe = exe
        self.root = Path(tempfile.mkdtemp(prefix="smtpb-postfix-"))
        self.root.chmod(0o755)
        self.etc = self.root / "etc"
        self.pidfile = self.root / "queue" / "pid" / "master.pid"
        self.proxy_port = proxy_port
        self.ca = self.root / "ca.pem"  # where the postfix user can read it
        shutil.copyfile(ca, self.ca)
        self.user = user
        self.password = password
        self.port = 0
        self.master_pid: int | None = None
        self._started = False

    async def postfix(self, *args: str, timeout: float = 60) -> Finished:
        return await run(self.exe, "-c", str(self.etc), *args, timeout=timeout)

    async def start(self) -> None:
        for d in (self.etc, self.root / "queue", self.root / "data"):
            d.mkdir()
        self.root.joinpath("queue").chmod(0o755)
        self.ca.chmod(0o644)
        pw = pwd.getpwnam("postfix")
        os.chown(self.root / "data", pw.pw_uid, pw.pw_gid)
        # texthash needs no postmap; the key is the relayhost exactly as written in main.cf.
        if self.user is not None:
            secrets = self.root / "sasl_passwd"
            secrets.write_text(f"[127.0.0.1]:{self.proxy_port} {self.user}:{self.password}\n")
            secrets.chmod(0o600)
        self.port = free_port()
        (self.etc / "main.cf").write_text(
            MAIN_CF.format(
                root=self.root,
                proxy_port=self.proxy_port,
                client_ip=CLIENT_IP,
                ca=self.ca,
                sasl="yes" if self.user else "no",
            )
        )
        (self.etc / "master.cf").write_text(MASTER_CF.format(port=self.port))
        self._started = True
        started = await self.postfix("start")
        if started.returncode != 0:
            raise RuntimeError(f"postfix start failed:\n{started}\n{self.log()}")
        async with asyncio.timeout(20):
            while (pid := self.read_pid()) is None:
                await asyncio.sleep(0.05)
        self.master_pid = pid
        async with asyncio.timeout(30):
            while not await self._answers():
                await asyncio.sleep(0.05)

    def read_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    async def _answers(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            return (await asyncio.wait_for(reader.readline(), 5)).startswith(b"220")
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def queued(self) -> int:
        return sum(
            len(files)
            for q in self.QUEUES
            for _dir, _subdirs, files in os.walk(self.root / "queue" / q)
        )

    def log(self) -> str:
        try:
            return (self.root / "maillog").read_text(errors="replace")
        except OSError:
            return ""

    async def stop(self) -> None:
        """`postfix stop`, then `postfix abort`, then SIGKILL to the master's PID; rm -r."""
        try:
            if self._started:
                pid = self.master_pid or self.read_pid()
                for command in ("stop", "abort"):
                    with contextlib.suppress(AssertionError):  # run() timed out
                        await self.postfix(command, timeout=30)
                    if pid is None or await gone(pid, 15):
                        break
                else:
                    assert pid is not None
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)  # this instance's master only
                    await gone(pid, 10)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


async def gone(pid: int, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if not alive(pid):
            return True
        await asyncio.sleep(0.05)
    return False


def alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie its parent has not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
