"""Outbound TLS and credentials: relays reached over STARTTLS or implicit TLS, with AUTH.

Real sinks on 127.0.0.1 with trustme certificates, the whole proxy in-process,
on both event loops. A TLS or AUTH failure must break the session: nothing in
plaintext, the message stays queued (deferred, never bounced), the breaker hears it.
"""

from __future__ import annotations

import base64
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from support.mail import make_message, send_mail
from support.proxy import make_config
from support.waiting import wait_until

from smtpbalancer.app import App
from smtpbalancer.config import Config, UpstreamTls
from smtpbalancer.errors import UpstreamError
from smtpbalancer.sink import Sink
from smtpbalancer.tls import client_context
from smtpbalancer.upstream.breaker import BreakerState
from smtpbalancer.upstream.connection import Security, UpstreamConnection

SECRET = "s3cret-Pa55word!"
TRIP_AT_ONCE = {"failure_threshold": 1, "open_for": "30s"}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


def counting_mail() -> tuple[list[str], Callable[[str], str | None]]:
    seen: list[str] = []

    def rule(sender: str) -> str | None:
        seen.append(sender)
        return None

    return seen, rule


async def relay_one(app: App, sink: Sink) -> None:
    _, body = make_message()
    await send_mail(app.smtp_address[1], body)
    await wait_until(lambda: sink.messages == 1 and app.store.messages == 0, timeout=4)


async def queued_after_the_breaker_opens(cfg: Config, upstream: str) -> int:
    """Send one message, wait until the upstream's breaker opens; how many stay spooled."""
    async with App(cfg) as app:
        await send_mail(app.smtp_address[1], make_message()[1])
        breaker = app.registry[upstream].breaker
        await wait_until(lambda: breaker.state is BreakerState.OPEN, timeout=4)
        return app.store.messages


async def test_starttls_with_a_pinned_ca_relays_over_tls(
    tmp_path: Path, sinks: Any, ca_file: Path, server_tls: ssl.SSLContext
) -> None:
    sink = await sinks("st", tls_context=server_tls)
    extra = {"tls": "starttls", "tls_ca": str(ca_file)}
    async with App(make_config(tmp_path / "spool", [("st", sink.address, 1, extra)])) as app:
        await relay_one(app, sink)
    assert sink.received[0].tls
    assert sink.received[0].user is None


async def test_implicit_tls_relays_to_an_implicit_tls_listener(
    tmp_path: Path, sinks: Any, ca_file: Path, server_tls: ssl.SSLContext
) -> None:
    sink = await sinks("imp", tls_context=server_tls, implicit_tls=True)
    extra = {"tls": "implicit", "tls_ca": str(ca_file)}
    async with App(make_config(tmp_path / "spool", [("imp", sink.address, 1, extra)])) as app:
        await relay_one(app, sink)
    assert sink.received[0].tls


async def test_opportunistic_upgrades_when_offered_and_stays_plain_otherwise(
    tmp_path: Path, sinks: Any, ca_file: Path, server_tls: ssl.SSLContext
) -> None:
    offers = await sinks("offers", tls_context=server_tls)
    plain = await sinks("plain")
    extra = {"tls_ca": str(ca_file), "slow_start": "0s"}  # tls defaults to opportunistic
    cfg = make_config(
        tmp_path / "spool", [("offers", offers.address, 1, extra), ("plain", plain.address, 1)]
    )
    assert cfg.upstreams[1].tls is UpstreamTls.OPPORTUNISTIC
    async with App(cfg) as app:
        for _ in range(4):
            await send_mail(app.smtp_address[1], make_message()[1])
        await wait_until(lambda: offers.messages + plain.messages == 4 and app.store.messages == 0)
    assert offers.messages >= 1 and plain.messages >= 1
    assert all(m.tls for m in offers.received)
    assert not any(m.tls for m in plain.received)


async def test_an_untrusted_certificate_defers_and_never_falls_back_to_plaintext(
    tmp_path: Path, sinks: Any, server_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))  # did not sign the sink's certificate
    mails, rule = counting_mail()
    sink = await sinks("mitm", tls_context=server_tls, mail_rule=rule)
    extra = {"tls": "starttls", "tls_ca": str(other_ca)}
    cfg = make_config(
        tmp_path / "spool", [("mitm", sink.address, 1, extra)], circuit_breaker=TRIP_AT_ONCE
    )
    assert await queued_after_the_breaker_opens(cfg, "mitm") == 1, (
        "deferred: still queued, not bounced"
    )
    assert sink.connections >= 1
    assert mails == [] and sink.messages == 0, "no MAIL, not even in plaintext"
    assert "upstream.breaker upstream=mitm closed->open reason=" in caplog.text
    assert "last: tls: 451 4.4.2 tls with mitm:" in caplog.text


async def test_starttls_required_but_not_offered_breaks_the_session(
    tmp_path: Path, sinks: Any, ca_file: Path
) -> None:
    mails, rule = counting_mail()
    sink = await sinks("stripped", mail_rule=rule)  # no STARTTLS: a downgrade, as if stripped
    extra = {"tls": "starttls", "tls_ca": str(ca_file)}
    cfg = make_config(
        tmp_path / "spool", [("stripped", sink.address, 1, extra)], circuit_breaker=TRIP_AT_ONCE
    )
    assert await queued_after_the_breaker_opens(cfg, "stripped") == 1
    assert mails == []


async def test_username_and_password_env_authenticate_after_starttls_and_stay_secret(
    tmp_path: Path,
    sinks: Any,
    ca_file: Path,
    server_tls: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("RELAY_PASSWORD", SECRET)
    sink = await sinks("authd", tls_context=server_tls, users={"relay-user": SECRET})
    extra = {
        "tls": "starttls",
        "tls_ca": str(ca_file),
        "username": "relay-user",
        "password_env": "RELAY_PASSWORD",
    }
    cfg = make_config(tmp_path / "spool", [("authd", sink.address, 1, extra)])
    async with App(cfg) as app:
        await relay_one(app, sink)
        shown = [repr(cfg), repr(app.registry), repr(app.registry["authd"].security)]
    assert sink.received[0].user == "relay-user"
    assert sink.received[0].tls
    plain = f"\0relay-user\0{SECRET}".encode()
    for form in (SECRET, base64.b64encode(plain).decode(), base64.b64encode(SECRET.encode())):
        text = form if isinstance(form, str) else form.decode()
        assert text not in caplog.text
        assert not any(text in s for s in shown)


async def test_a_wrong_password_is_deferred_not_bounced_and_opens_the_breaker(
    tmp_path: Path,
    sinks: Any,
    ca_file: Path,
    server_tls: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("RELAY_PASSWORD", "not-the-password")
    mails, rule = counting_mail()
    sink = await sinks("deny", tls_context=server_tls, users={"relay-user": SECRET}, mail_rule=rule)
    extra = {
        "tls": "starttls",
        "tls_ca": str(ca_file),
        "username": "relay-user",
        "password_env": "RELAY_PASSWORD",
    }
    cfg = make_config(
        tmp_path / "spool", [("deny", sink.address, 1, extra)], circuit_breaker=TRIP_AT_ONCE
    )
    assert await queued_after_the_breaker_opens(cfg, "deny") == 1, (
        "deferred, still queued: a 535 is no reason to bounce"
    )
    assert sink.auth_failures >= 1
    assert mails == [] and sink.messages == 0
    assert "last: auth: 451 4.4.2 auth with deny: 5.7.8" in caplog.text


async def test_password_file_authenticates_over_implicit_tls(
    tmp_path: Path, sinks: Any, ca_file: Path, server_tls: ssl.SSLContext
) -> None:
    secret_file = tmp_path / "relay.secret"
    secret_file.write_text(SECRET + "\n")  # the trailing newline editors add is not the secret
    sink = await sinks(
        "filed", tls_context=server_tls, implicit_tls=True, users={"file-user": SECRET}
    )
    extra = {
        "tls": "implicit",
        "tls_ca": str(ca_file),
        "username": "file-user",
        "password_file": str(secret_file),
    }
    async with App(make_config(tmp_path / "spool", [("filed", sink.address, 1, extra)])) as app:
        await relay_one(app, sink)
    assert sink.received[0].user == "file-user"
    assert sink.received[0].tls


async def test_credentials_are_not_sent_in_clear_to_a_remote_relay(sinks: Any) -> None:
    # Opportunistic TLS to a relay that offers no STARTTLS: the session stays in
    # plaintext, so AUTH must not happen unless the relay is on loopback. The sink is on
    # loopback, so pretend it is not.
    sink = await sinks("clear", users={"u": SECRET})
    remote = Security(
        UpstreamTls.OPPORTUNISTIC,
        client_context(verify=True, ca=None),
        "u",
        SECRET,
        plaintext_auth_ok=False,
    )
    conn = UpstreamConnection(
        "clear", *sink.address, local_hostname="p.test", timeout_s=2, security=remote
    )
    with pytest.raises(UpstreamError) as caught:
        await conn.open()
    assert caught.value.stage == "auth"
    assert sink.auth_failures == 0, "no AUTH command was sent"
    assert conn.broken


async def test_health_probe_uses_the_upstream_tls_but_never_auth(
    sinks: Any, ca_file: Path, server_tls: ssl.SSLContext
) -> None:
    from smtpbalancer.upstream.health import smtp_probe

    sink = await sinks("probed", tls_context=server_tls, users={"u": SECRET})
    good = Security(UpstreamTls.STARTTLS, client_context(verify=True, ca=ca_file), "u", "wrong")
    await smtp_probe(*sink.address, local_hostname="p.test", timeout_s=2, security=good)()
    assert sink.auth_failures == 0, "the probe does not AUTH (the wrong password is unused)"

    untrusted = Security(UpstreamTls.STARTTLS, client_context(verify=True, ca=None))
    with pytest.raises(UpstreamError) as caught:
        await smtp_probe(*sink.address, local_hostname="p.test", timeout_s=2, security=untrusted)()
    assert caught.value.stage == "tls"
