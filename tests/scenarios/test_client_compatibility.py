"""Real clients, unchanged: SMTP clients nobody here wrote send through the proxy (issue 8).

Python's smtplib and aiosmtplib, swaks (Debian), nodemailer with `pool: true` (npm)
and Postfix's smtp client (a private instance with `relayhost` = the proxy). Each
connects from 127.0.0.2, outside `allow_networks`, so it can relay only after
STARTTLS and AUTH, and sends the corpus of tests/support/clients.py (8-bit UTF-8
bodies with BODY=8BITMIME, SMTPUTF8 envelopes and UTF-8 headers, lines starting
with a dot, 998-octet lines, several recipients) over as few connections as it
allows. The sinks must then hold every message exactly once: envelope as sent,
every header line the test wrote, the body byte for byte, and the proxy's trace
header naming 127.0.0.2 and `ESMTPSA` (`UTF8SMTPSA` for SMTPUTF8).

A client that is not installed skips with the reason; `.ci/run` installs swaks and
postfix, and the nodemailer test installs nodemailer with npm into a cache
directory (`$SMTPBALANCER_TEST_CACHE`, default ~/.cache/smtpbalancer-tests).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import json
import os
import shutil
import smtplib
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from support import postfix
from support.clients import (
    CLIENT_IP,
    PASSWORD,
    USER,
    Outgoing,
    Security,
    check_arrivals,
    compat_id,
    corpus,
    count_connections,
    make_outgoing,
    make_security,
    run,
    split_trace,
)
from support.proxy import make_config
from support.waiting import wait_until

from smtpbalancer.app import App
from smtpbalancer.sink import SinkMessage

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_factories=["uvloop"])]

SUPPORT = Path(__file__).resolve().parents[1] / "support"
NODEMAILER = "nodemailer@10"


@pytest.fixture(scope="module")
def security(tmp_path_factory: pytest.TempPathFactory) -> Security:
    return make_security(tmp_path_factory.mktemp("compat-security"))


@dataclass
class Proxy:
    app: App
    sinks: list[Any]
    connections: list[str]  # client address of every session, in order

    @property
    def port(self) -> int:
        return self.app.smtp_address[1]

    async def arrivals(self, count: int, timeout: float = 30.0) -> list[SinkMessage]:
        """The sinks' messages once `count` arrived and the spool is empty."""
        await wait_until(
            lambda: sum(s.messages for s in self.sinks) >= count and self.app.store.messages == 0,
            timeout=timeout,
        )
        return [m for s in self.sinks for m in s.received]


@contextlib.asynccontextmanager
async def start_proxy(
    tmp_path: Path, sinks: Any, security: Security, *, allow: list[str] | None = None
) -> AsyncIterator[Proxy]:
    relays = [await sinks("relay-a"), await sinks("relay-b")]
    server = security.server_section(*([allow] if allow else []))
    cfg = make_config(
        tmp_path / "spool",
        [("relay-a", relays[0].address, 2), ("relay-b", relays[1].address, 1)],
        server=server,
    )
    async with App(cfg) as app:
        yield Proxy(app, relays, count_connections(app))


@pytest.fixture
async def proxy(tmp_path: Path, sinks: Any, security: Security) -> AsyncIterator[Proxy]:
    async with start_proxy(tmp_path, sinks, security) as running:
        yield running


def client_context(security: Security) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(security.ca_pem))


def mail_options(out: Outgoing) -> list[str]:
    return (["BODY=8BITMIME"] if out.eight_bit else []) + (["SMTPUTF8"] if out.smtputf8 else [])


# --- Python's standard library ----------------------------------------------------------


def smtplib_session(port: int, security: Security, messages: list[Outgoing]) -> list[Any]:
    """One connection: EHLO, STARTTLS, EHLO, AUTH, then every message; the refusals."""
    refused = []
    with smtplib.SMTP(
        "127.0.0.1", port, local_hostname="smtplib.client.test", timeout=30,
        source_address=(CLIENT_IP, 0),
    ) as smtp:  # fmt: skip
        smtp.starttls(context=client_context(security))
        smtp.ehlo()
        smtp.login(USER, PASSWORD)
        for out in messages:
            refused.append(
                smtp.sendmail(out.mail_from, list(out.rcpts), out.data, mail_options(out))
            )
    return refused


@pytest.mark.timeout(60)
async def test_smtplib_sends_many_messages_on_one_connection(
    proxy: Proxy, security: Security
) -> None:
    messages = corpus("smtplib", 30)
    refused = await asyncio.to_thread(smtplib_session, proxy.port, security, messages)
    assert refused == [{}] * len(messages)
    check_arrivals(await proxy.arrivals(len(messages)), messages)
    assert proxy.connections == [CLIENT_IP]


@pytest.mark.timeout(60)
async def test_a_998_octet_line_that_starts_with_a_dot_is_relayed(
    proxy: Proxy, security: Security
) -> None:
    """smtplib sends `..zzz…` (999 octets + CRLF on the wire) for a 998-octet content line."""
    plain = make_outgoing("smtplib", 0, "long")
    body = b"." + b"z" * 997 + b"\r\nend\r\n"
    out = Outgoing(plain.key, "long", plain.mail_from, plain.rcpts, plain.headers, body)
    refused = await asyncio.to_thread(smtplib_session, proxy.port, security, [out])
    assert refused == [{}]
    check_arrivals(await proxy.arrivals(1), [out])


@pytest.mark.timeout(60)
async def test_aiosmtplib_sends_many_messages_on_one_connection(
    proxy: Proxy, security: Security
) -> None:
    messages = corpus("aiosmtplib", 30)
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=proxy.port,
        local_hostname="aiosmtplib.client.test",
        source_address=(CLIENT_IP, 0),
        start_tls=True,  # STARTTLS is required, not opportunistic
        tls_context=client_context(security),
        timeout=30,
    )
    async with client:
        assert client.get_transport_info("sslcontext") is not None
        await client.login(USER, PASSWORD)
        for out in messages:
            errors, _ = await client.sendmail(
                out.mail_from, list(out.rcpts), out.data, mail_options=mail_options(out)
            )
            assert errors == {}, out.key
    check_arrivals(await proxy.arrivals(len(messages)), messages)
    assert proxy.connections == [CLIENT_IP]


# --- swaks ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (Debian: swaks)")
async def test_swaks_with_starttls_and_auth_plain(
    proxy: Proxy, security: Security, tmp_path: Path
) -> None:
    """One message per swaks run (swaks has no reuse), from 127.0.0.2, STARTTLS + AUTH PLAIN.

    swaks (20201014, Debian 12) cannot add MAIL parameters: it sends 8-bit bodies
    without BODY=8BITMIME, and it cannot send an SMTPUTF8 envelope, so the SMTPUTF8
    message is left out. It sends the DATA file as it is, dot-stuffing it itself.
    """
    messages = corpus("swaks", 5, kinds=("ascii", "8bit", "dots", "long", "multi"))
    for out in messages:
        data = tmp_path / f"{out.key}.eml"
        data.write_bytes(out.data[:-2])  # swaks adds the CRLF before the final dot itself
        done = await run(
            "swaks", "--server", "127.0.0.1", "--port", str(proxy.port),
            "--local-interface", CLIENT_IP, "--ehlo", "swaks.client.test",
            "--from", out.mail_from, "--to", ",".join(out.rcpts),
            "--tls", "--tls-verify", "--tls-ca-path", str(security.ca_pem),
            "--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD,
            "--data", f"@{data}",
            timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, str(done)
        assert "<~  235 2.7.0" in done.stdout and "<~  250 2.0.0 Ok: queued as " in done.stdout
    check_arrivals(await proxy.arrivals(len(messages)), messages)
    assert proxy.connections == [CLIENT_IP] * len(messages)


# --- nodemailer -------------------------------------------------------------------------


def cache_dir() -> Path:
    configured = os.environ.get("SMTPBALANCER_TEST_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "smtpbalancer-tests"


@pytest.fixture(scope="session")
def nodemailer_modules() -> Path:
    """node_modules holding nodemailer, installed once with npm into a cache directory."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node or npm is not installed")
    target = cache_dir() / "node"
    modules = target / "node_modules"
    if (modules / "nodemailer" / "package.json").exists():
        return modules
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f"node.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        done = subprocess.run(
            ["npm", "install", "--prefix", str(staging), "--no-audit", "--no-fund",
             "--fetch-retries=1", "--fetch-timeout=15000", NODEMAILER],
            capture_output=True, text=True, timeout=40, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        pytest.skip(f"npm install {NODEMAILER} failed: {exc}")
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        errors = [
            line for line in done.stderr.splitlines() if "npm error" in line or "ERR!" in line
        ]
        why = "; ".join(errors[:3]) or done.stderr.strip()[-300:]
        pytest.skip(f"npm install {NODEMAILER} failed (exit {done.returncode}): {why}")
    try:
        staging.rename(target)  # atomic: a concurrent run either sees all of it or nothing
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another run installed it first
    return modules


@pytest.mark.timeout(60)
async def test_nodemailer_pool_with_starttls_and_auth(
    proxy: Proxy, security: Security, tmp_path: Path, nodemailer_modules: Path
) -> None:
    """nodemailer, `pool: true` with two connections, `requireTLS`, AUTH, PIPELINING.

    Raw messages (`raw` + `envelope`, as an ESP that builds its own MIME) keep their
    bytes, so they are compared exactly; nodemailer adds SMTPUTF8 itself for the
    non-ASCII envelope and BODY=8BITMIME when asked (`envelope.use8BitMime`). One more
    message is composed by nodemailer (UTF-8 subject and text) and compared decoded.
    """
    messages = corpus("nodemailer", 30)
    composed_key = "nodemailer-composed"
    text = "Grüße aus Köln ✓\n.a line that starts with a dot\n\nend\n"
    job = {
        "host": "127.0.0.1",
        "port": proxy.port,
        "localAddress": CLIENT_IP,
        "name": "nodemailer.client.test",
        "ca": security.ca_pem.read_text(),
        "user": USER,
        "pass": PASSWORD,
        "maxConnections": 2,
        "messages": [
            {
                "key": out.key,
                "from": out.mail_from,
                "to": list(out.rcpts),
                "raw": base64.b64encode(out.data).decode(),
                "use8BitMime": out.eight_bit,
            }
            for out in messages
        ]
        + [
            {
                "key": composed_key,
                "compose": {
                    "from": '"Jöran Sender" <esp@sender.test>',
                    "to": "composed@rcpt.test",
                    "subject": "Grüße → composed by nodemailer",
                    "text": text,
                    "headers": {"X-Compat-Id": composed_key},
                },
            }
        ],
    }
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    env = dict(os.environ, NODE_PATH=str(nodemailer_modules))
    done = await run(
        "node", str(SUPPORT / "nodemailer_send.cjs"), str(job_file), env=env, timeout=45
    )
    assert done.returncode == 0, str(done)
    results = {r["key"]: r for r in json.loads(done.stdout)}
    failed = [r for r in results.values() if not r["ok"] or r["rejected"]]
    assert not failed, f"{failed}\n{done}"
    assert all(r["response"].startswith("250 2.0.0 Ok: queued as ") for r in results.values())
    transcript = done.stderr
    assert "MAIL FROM:<jöran@exämple.test> SMTPUTF8 BODY=8BITMIME" in transcript, transcript
    assert "BODY=8BITMIME" in transcript and "STARTTLS" in transcript

    received = await proxy.arrivals(len(messages) + 1)
    composed = [m for m in received if compat_id(split_trace(m.data)[1]) == composed_key]
    check_arrivals([m for m in received if m not in composed], messages)
    assert len(composed) == 1
    assert (composed[0].mail_from, composed[0].rcpt_tos) == (
        "esp@sender.test",
        ("composed@rcpt.test",),
    )
    parsed = email.message_from_bytes(split_trace(composed[0].data)[1], policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed["Subject"] == "Grüße → composed by nodemailer"
    assert str(parsed["From"]) == "Jöran Sender <esp@sender.test>"
    assert parsed.get_content().replace("\r\n", "\n") == text
    assert 1 <= len(proxy.connections) <= 2 and set(proxy.connections) == {CLIENT_IP}


# --- Postfix as a client --------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.skipif(postfix.unavailable() is not None, reason=str(postfix.unavailable()))
async def test_postfix_relays_through_the_proxy(
    tmp_path: Path, sinks: Any, security: Security
) -> None:
    """A private Postfix instance with `relayhost = [127.0.0.1]:PROXYPORT` as the client.

    Mail goes into Postfix's own smtpd (smtplib, one session, SMTPUTF8 and 8BITMIME
    as needed); Postfix's smtp client, bound to 127.0.0.2, relays it with
    `smtp_tls_security_level = encrypt` (CA file = the test CA) and Cyrus SASL AUTH
    from a texthash map, one delivery agent with a cached connection. Postfix adds
    its own Received: line; everything the test wrote must arrive as written.
    Without a Cyrus SASL client plugin (libsasl2-modules) the proxy lets 127.0.0.2
    relay without AUTH instead, and the trace header is checked for ESMTPS.
    """
    sasl = postfix.sasl_client_available()
    allow = None if sasl else ["127.0.0.1/32", f"{CLIENT_IP}/32"]
    messages = corpus("postfix", 24)
    async with start_proxy(tmp_path, sinks, security, allow=allow) as proxy:
        instance = postfix.PrivatePostfix(
            proxy_port=proxy.port, ca=security.ca_pem, user=USER if sasl else None,
            password=PASSWORD,
        )  # fmt: skip
        try:
            await instance.start()

            def inject() -> list[Any]:
                refused = []
                with smtplib.SMTP("127.0.0.1", instance.port, timeout=30) as smtp:
                    smtp.ehlo("injector.test")
                    for out in messages:
                        refused.append(
                            smtp.sendmail(
                                out.mail_from, list(out.rcpts), out.data, mail_options(out)
                            )
                        )
                return refused

            assert await asyncio.to_thread(inject) == [{}] * len(messages)
            try:
                received = await proxy.arrivals(len(messages), timeout=60)
            except TimeoutError:
                pytest.fail(f"not everything arrived; Postfix's log:\n{instance.log()[-8000:]}")
            check_arrivals(received, messages, authenticated=sasl)
            await wait_until(lambda: instance.queued() == 0, timeout=10)
            log = instance.log()
            sent = sum(len(out.rcpts) for out in messages)
            assert log.count("status=sent") == sent, log[-8000:]
            assert f"relay=127.0.0.1[127.0.0.1]:{proxy.port}" in log
            assert "Trusted TLS connection established to 127.0.0.1" in log, log[-8000:]
            assert set(proxy.connections) == {CLIENT_IP}
            assert "conn_use=" in log  # Postfix says it reused a cached session
            assert len(proxy.connections) < len(messages) / 2, proxy.connections  # reused
        finally:
            await instance.stop()
