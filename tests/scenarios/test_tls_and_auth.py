"""Inbound TLS and AUTH as ESP clients see them: STARTTLS, implicit TLS, AUTH, relay policy.

Real SMTP over 127.0.0.1 on both loops, certificates from trustme, users made by the
real `smtpbalancer passwd` command, clients aiosmtplib and (in a thread) smtplib.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import signal
import smtplib
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme
from support.mail import make_message
from support.proxy import config_mapping, make_config, to_toml
from support.waiting import wait_until

from smtpbalancer import config
from smtpbalancer.app import App

USER = "alice"
PASSWORD = "correct horse battery staple 7"


@pytest.fixture(scope="module")
def users_line() -> str:
    """One users_file line made by the real CLI, the password given on stdin."""
    done = subprocess.run(
        [sys.executable, "-m", "smtpbalancer", "passwd", USER],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    line = done.stdout.strip()
    assert line.startswith(f"{USER}:scrypt$n=16384,r=8,p=1$")
    assert PASSWORD not in done.stdout + done.stderr
    return line


class Certs:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cert = directory / "cert.pem"
        self.key = directory / "key.pem"
        self.ca = self.issue()

    def issue(self) -> trustme.CA:
        """A new CA and a server certificate from it, written over cert.pem/key.pem."""
        ca = trustme.CA()
        issued = ca.issue_cert("localhost", "127.0.0.1")
        issued.private_key_pem.write_to_path(str(self.key))
        self.cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
        return ca


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


def security(certs: Certs, users_file: Path | None, **extra: Any) -> dict[str, Any]:
    server: dict[str, Any] = {
        "tls_cert": str(certs.cert),
        "tls_key": str(certs.key),
        "tls_listen": "127.0.0.1:0",
        "allow_networks": ["127.0.0.1/32"],
        "auth_failure_delay": "0s",
    }
    if users_file is not None:
        server["users_file"] = str(users_file)
    server.update(extra)
    return server


@pytest.fixture
def users_file(tmp_path: Path, users_line: str) -> Path:
    path = tmp_path / "users"
    path.write_text(f"# smtpbalancer users\n\n{users_line}\n")
    return path


@pytest.fixture
async def app(tmp_path: Path, sinks, certs: Certs, users_file: Path) -> AsyncIterator[App]:
    relay = await sinks("relay")
    cfg = make_config(
        tmp_path / "spool", [("relay", relay.address, 1)], server=security(certs, users_file)
    )
    async with App(cfg) as running:
        running.relay = relay  # type: ignore[attr-defined]
        yield running


async def connect(
    app: App, certs: Certs, source: str = "127.0.0.1", *, implicit: bool = False
) -> aiosmtplib.SMTP:
    address = app.frontend.tls_address if implicit else app.smtp_address
    assert address is not None
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=address[1],
        use_tls=implicit,
        start_tls=False,
        tls_context=client_context(certs.ca),
        timeout=5,
        source_address=(source, 0),
    )
    await client.connect()
    await client.ehlo(hostname="client.test")
    return client


def auth_plain_blob(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


async def test_starttls_is_advertised_and_negotiates_tls_1_2_or_newer(
    app: App, certs: Certs
) -> None:
    client = await connect(app, certs)
    assert client.supports_extension("starttls")
    await client.starttls()
    assert client.get_transport_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    await client.quit()

    def with_smtplib() -> str:
        with smtplib.SMTP("127.0.0.1", app.smtp_address[1], timeout=5) as smtp:
            smtp.ehlo("client.test")
            assert smtp.has_extn("starttls")
            smtp.starttls(context=client_context(certs.ca))
            smtp.ehlo("client.test")
            assert smtp.has_extn("auth")
            version = smtp.sock.version()  # type: ignore[union-attr]
            assert version is not None
            return version

    assert await asyncio.to_thread(with_smtplib) in ("TLSv1.2", "TLSv1.3")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_a_client_limited_to_tls_1_1_cannot_handshake(app: App, certs: Certs) -> None:
    ctx = client_context(certs.ca)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client itself offer TLS 1.0/1.1
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=app.smtp_address[1], start_tls=False)
    await client.connect(timeout=5)
    await client.ehlo()
    with pytest.raises((ssl.SSLError, aiosmtplib.SMTPException, ConnectionError)):
        await client.starttls(tls_context=ctx)
    client.close()


async def test_implicit_tls_listener_offers_auth_but_not_starttls(app: App, certs: Certs) -> None:
    client = await connect(app, certs, source="127.0.0.2", implicit=True)
    assert client.get_transport_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    assert not client.supports_extension("starttls")
    assert "PLAIN" in client.esmtp_extensions["auth"].split()
    again = await client.execute_command(b"STARTTLS")
    assert (again.code, again.message[:5]) == (503, "5.5.1")
    assert (await client.auth_plain(USER, PASSWORD)).code == 235
    _, body = make_message()
    await client.sendmail("esp@sender.test", ["reader@rcpt.test"], body)
    await client.quit()
    await wait_until(lambda: app.relay.messages == 1)  # type: ignore[attr-defined]
    assert b"with ESMTPSA id" in app.relay.received[0].data  # type: ignore[attr-defined]


async def test_auth_is_neither_advertised_nor_accepted_before_tls(app: App, certs: Certs) -> None:
    client = await connect(app, certs)
    assert not client.supports_extension("auth")
    refused = await client.execute_command(b"AUTH", b"PLAIN", auth_plain_blob(USER, PASSWORD))
    assert (refused.code, refused.message[:6]) == (538, "5.7.11")
    await client.quit()


@pytest.mark.parametrize("mechanism", ["plain", "login"])
async def test_auth_after_starttls_lets_an_outside_client_relay(
    app: App, certs: Certs, mechanism: str
) -> None:
    client = await connect(app, certs, source="127.0.0.2")
    await client.starttls()
    await client.ehlo(hostname="client.test")
    assert {"LOGIN", "PLAIN"} <= set(client.esmtp_extensions["auth"].split())
    login = client.auth_plain if mechanism == "plain" else client.auth_login
    reply = await login(USER, PASSWORD)
    assert (reply.code, reply.message[:5]) == (235, "2.7.0")
    again = await client.execute_command(b"AUTH", b"PLAIN", auth_plain_blob(USER, PASSWORD))
    assert (again.code, again.message[:5]) == (503, "5.5.1")
    _, body = make_message()
    await client.sendmail("esp@sender.test", ["reader@rcpt.test"], body)
    await client.quit()
    await wait_until(lambda: app.relay.messages == 1)  # type: ignore[attr-defined]
    assert b"with ESMTPSA id" in app.relay.received[0].data  # type: ignore[attr-defined]
    assert app.authenticator is not None and app.authenticator.successes == 1


async def test_received_header_says_esmtps_for_tls_without_auth(app: App, certs: Certs) -> None:
    client = await connect(app, certs)
    await client.starttls()
    await client.ehlo(hostname="client.test")
    _, body = make_message()
    await client.sendmail("esp@sender.test", ["reader@rcpt.test"], body)
    await client.quit()
    await wait_until(lambda: app.relay.messages == 1)  # type: ignore[attr-defined]
    assert b"with ESMTPS id" in app.relay.received[0].data  # type: ignore[attr-defined]


async def test_an_outside_client_without_auth_gets_530_and_nothing_is_spooled(
    app: App, certs: Certs
) -> None:
    client = await connect(app, certs, source="127.0.0.2")
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as plain:
        await client.mail("esp@sender.test")
    assert (plain.value.code, plain.value.message[:5]) == (530, "5.7.0")
    await client.starttls()
    await client.ehlo(hostname="client.test")
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as encrypted:
        await client.mail("esp@sender.test")
    assert (encrypted.value.code, encrypted.value.message[:5]) == (530, "5.7.0")
    await client.quit()
    assert app.store.messages == 0 and app.submitter.accepted == 0


async def test_wrong_password_is_535_and_the_third_failure_closes_with_421(
    app: App, certs: Certs
) -> None:
    client = await connect(app, certs, source="127.0.0.2")
    await client.starttls()
    await client.ehlo(hostname="client.test")
    for _ in range(2):
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as wrong:
            await client.auth_plain(USER, "wrong")
        assert (wrong.value.code, wrong.value.message[:5]) == (535, "5.7.8")
    third = await client.execute_command(b"AUTH", b"PLAIN", auth_plain_blob("nobody", "x"))
    assert (third.code, third.message) == (421, "4.7.0 Too many failed authentication attempts")
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await client.noop()


async def test_a_client_over_its_failure_budget_gets_421_at_the_next_auth(
    tmp_path: Path, sinks, certs: Certs, users_file: Path
) -> None:
    relay = await sinks("relay")
    cfg = make_config(
        tmp_path / "spool",
        [("relay", relay.address, 1)],
        server=security(
            certs, users_file, auth_max_failures_per_client=2, auth_failure_delay="200ms"
        ),
    )
    async with App(cfg) as app:
        client = await connect(app, certs, implicit=True)
        loop = asyncio.get_running_loop()
        for _ in range(2):
            started = loop.time()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                await client.auth_plain(USER, "wrong")
            assert loop.time() - started >= 0.2  # each failure reply is delayed
        await client.quit()
        client = await connect(app, certs, implicit=True)
        blocked = await client.execute_command(b"AUTH", b"PLAIN", auth_plain_blob(USER, PASSWORD))
        assert (blocked.code, blocked.message[:5]) == (421, "4.7.0")
        client.close()


async def test_passwords_never_reach_the_logs(
    app: App, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="mail.log")  # aiosmtpd's own protocol log
    secrets = [PASSWORD, "wrong-secret-1", "raw-typed-secret"]
    client = await connect(app, certs, source="127.0.0.2")
    await client.starttls()
    await client.ehlo(hostname="client.test")
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        await client.auth_login(USER, secrets[1])
    # A confused client sends its password raw instead of base64, and as a user name.
    await client.execute_command(b"AUTH", b"LOGIN")
    assert (await client.execute_command(secrets[2].encode())).code == 501
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        await client.auth_login(PASSWORD, PASSWORD)
    await client.auth_plain(USER, PASSWORD)
    await client.quit()
    text = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert "smtp.auth_ok" in text and "smtp.auth_failed" in text  # logging was on
    assert any(r.name == "mail.log" and r.levelno == logging.DEBUG for r in caplog.records)
    for secret in secrets:
        for form in (secret, base64.b64encode(secret.encode()).decode()):
            assert form not in text
    assert auth_plain_blob(USER, PASSWORD).decode() not in text


@pytest.fixture
async def reloadable(tmp_path: Path, sinks, certs: Certs, users_file: Path) -> AsyncIterator[App]:
    """Like `app`, but started from a config file, so that reload() re-reads it."""
    relay = await sinks("relay")
    raw = config_mapping(tmp_path / "spool", [("relay", relay.address, 1)])
    raw["server"].update(security(certs, users_file))
    path = tmp_path / "relay.toml"
    path.write_text(to_toml(raw))
    async with App(config.load(path), config_path=path) as running:
        yield running


def rewrite(path: Path, text: str) -> None:
    path.write_text(text)


async def auth_code(app: App, certs: Certs, user: str, password: str) -> int:
    client = await connect(app, certs, source="127.0.0.2")
    await client.starttls()
    await client.ehlo(hostname="client.test")
    try:
        return (await client.auth_plain(user, password)).code
    except aiosmtplib.SMTPAuthenticationError as exc:
        return exc.code
    finally:
        client.close()


async def test_reload_rereads_the_users_file_and_keeps_it_when_the_new_one_is_bad(
    reloadable: App, certs: Certs, users_file: Path, users_line: str
) -> None:
    bob_line = users_line.replace(f"{USER}:", "bob:", 1)  # same password, another user
    assert await auth_code(reloadable, certs, "bob", PASSWORD) == 535
    rewrite(users_file, f"{users_line}\n{bob_line}\n")
    assert (await reloadable.reload()).startswith("reload generation=2")
    assert await auth_code(reloadable, certs, "bob", PASSWORD) == 235
    assert await auth_code(reloadable, certs, USER, PASSWORD) == 235

    rewrite(users_file, f"{bob_line}\ngarbage\n")
    assert (await reloadable.reload()).startswith("reload failed generation=2 kept=old")
    assert await auth_code(reloadable, certs, USER, PASSWORD) == 235  # the old users stay


async def test_reload_swaps_the_certificate_and_keeps_it_on_a_bad_file(
    reloadable: App, certs: Certs
) -> None:
    second = certs.issue()
    assert (await reloadable.reload()).startswith("reload generation=2")
    client = await connect(reloadable, certs)  # trusts only the first CA
    with pytest.raises((ssl.SSLError, aiosmtplib.SMTPException)):
        await client.starttls()
    client.close()
    certs.ca = second
    client = await connect(reloadable, certs)
    await client.starttls()
    await client.quit()

    certs.key.write_text("not a key\n")
    assert (await reloadable.reload()).startswith("reload failed")  # the second cert stays
    client = await connect(reloadable, certs)
    await client.starttls()
    await client.quit()


async def test_second_starttls_is_refused(app: App, certs: Certs) -> None:
    client = await connect(app, certs)
    await client.starttls()
    await client.ehlo(hostname="client.test")
    assert not client.supports_extension("starttls")
    again = await client.execute_command(b"STARTTLS")
    assert (again.code, again.message) == (503, "5.5.1 TLS already active")
    assert (await client.noop()).code == 250
    await client.quit()


async def test_plaintext_pipelined_after_starttls_is_discarded(app: App, certs: Certs) -> None:
    reader, writer = await asyncio.open_connection(*app.smtp_address)
    assert (await reader.readline()).startswith(b"220 ")
    writer.write(b"EHLO client.test\r\n")
    while not (await reader.readline()).startswith(b"250 "):
        pass
    # RFC 3207 §4.2: the MAIL sent in the clear with STARTTLS must not survive the upgrade.
    writer.write(b"STARTTLS\r\nMAIL FROM:<x@y.test>\r\n")
    assert (await reader.readline()).startswith(b"220 ")
    await writer.start_tls(client_context(certs.ca), server_hostname="127.0.0.1")
    writer.write(b"EHLO client.test\r\n")
    assert (await reader.readline()).startswith(b"250-")  # not a reply to the injected MAIL
    while not (await reader.readline()).startswith(b"250 "):
        pass
    writer.write(b"MAIL FROM:<a@sender.test>\r\n")
    assert (await reader.readline()).startswith(b"250 2.1.0")  # no open transaction was left
    writer.write(b"QUIT\r\n")
    assert (await reader.readline()).startswith(b"221 ")
    writer.close()


async def test_mail_after_starttls_needs_a_new_ehlo(app: App, certs: Certs) -> None:
    client = await connect(app, certs)
    await client.starttls()
    refused = await client.execute_command(b"MAIL", b"FROM:<a@sender.test>")
    assert (refused.code, refused.message[:5]) == (503, "5.5.1")
    await client.ehlo(hostname="client.test")
    assert (await client.mail("a@sender.test")).code == 250
    await client.quit()


async def test_without_a_users_file_no_auth_is_offered(tmp_path: Path, sinks, certs: Certs) -> None:
    relay = await sinks("relay")
    cfg = make_config(
        tmp_path / "spool", [("relay", relay.address, 1)], server=security(certs, None)
    )
    async with App(cfg) as app:
        client = await connect(app, certs)
        await client.starttls()
        await client.ehlo(hostname="client.test")
        assert not client.supports_extension("auth")
        await client.quit()


@pytest.mark.slow
async def test_sighup_reloads_the_certificate_of_a_running_proxy(
    tmp_path: Path, sinks, proxies, certs: Certs
) -> None:
    relay = await sinks("relay")
    raw = config_mapping(tmp_path / "spool", [("relay", relay.address, 1)])
    raw["server"].update(security(certs, None))
    path = tmp_path / "relay.toml"
    path.write_text(to_toml(raw))
    proxy = await proxies(path)
    certs.ca = certs.issue()
    proxy.signal(signal.SIGHUP)
    await wait_until(lambda: "tls.reloaded" in proxy.log(), timeout=5)
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=proxy.port,
        start_tls=False,
        tls_context=client_context(certs.ca),
        timeout=5,
    )
    await client.connect()
    await client.ehlo()
    await client.starttls()
    await client.quit()
