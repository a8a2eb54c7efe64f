"""Inbound TLS/AUTH building blocks: password hashes, users file, relay policy, config keys."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

import pytest
import trustme

from smtpbalancer import config, passwords, replies, tls
from smtpbalancer.errors import ConfigError
from smtpbalancer.frontend import admission
from smtpbalancer.frontend.admission import Limits

LOOPBACK_ONLY = (ipaddress.ip_network("127.0.0.1/32"),)


def test_hash_is_self_describing_salted_and_verifies() -> None:
    one, two = passwords.hash_password(b"pw"), passwords.hash_password(b"pw")
    assert one.startswith("scrypt$n=16384,r=8,p=1$") and one != two
    stored = passwords.parse_hash(one)
    assert passwords.verify(stored, b"pw")
    assert not passwords.verify(stored, b"pW")
    assert not passwords.verify(passwords.DUMMY, b"pw")


def test_users_file_skips_comments_and_names_the_bad_line_without_its_content() -> None:
    good = passwords.hash_password(b"pw")
    users = passwords.parse_users(f"# users\n\nalice:{good}\n  bob:{good}  \n")
    assert set(users) == {"alice", "bob"}
    with pytest.raises(ValueError, match="line 2") as bad:
        passwords.parse_users(f"alice:{good}\nbob:plaintext-secret\n")
    assert "plaintext-secret" not in str(bad.value)
    with pytest.raises(ValueError, match="line 2: duplicate"):
        passwords.parse_users(f"alice:{good}\nalice:{good}\n")


@pytest.mark.parametrize(
    ("extended", "utf8", "tls_on", "auth", "expected"),
    [
        (False, False, False, False, "SMTP"),
        (True, False, False, False, "ESMTP"),
        (True, False, True, False, "ESMTPS"),
        (True, False, True, True, "ESMTPSA"),
        (True, True, False, False, "UTF8SMTP"),
        (True, True, True, True, "UTF8SMTPSA"),
    ],
)
def test_received_with_keyword_follows_rfc_3848(
    extended: bool, utf8: bool, tls_on: bool, auth: bool, expected: str
) -> None:
    assert (
        admission.trace_protocol(extended=extended, smtputf8=utf8, tls=tls_on, authenticated=auth)
        == expected
    )


@pytest.mark.parametrize(
    ("auth_offered", "client", "authenticated", "at_mail", "at_rcpt"),
    [
        (True, "127.0.0.1", False, None, None),
        (True, "127.0.0.2", False, replies.AUTH_REQUIRED, replies.RELAY_DENIED),
        (True, "127.0.0.2", True, None, None),
        (False, "127.0.0.2", False, None, replies.RELAY_DENIED),  # no AUTH to ask for
    ],
)
def test_relay_policy(
    auth_offered: bool,
    client: str,
    authenticated: bool,
    at_mail: replies.Reply | None,
    at_rcpt: replies.Reply | None,
) -> None:
    limits = Limits(10, LOOPBACK_ONLY, auth_offered=auth_offered)
    assert admission.on_mail_relay(limits, client, authenticated) is at_mail
    assert admission.on_rcpt(limits, client, 0, authenticated) is at_rcpt


@pytest.fixture
def cert_files(tmp_path: Path) -> tuple[Path, Path]:
    issued = trustme.CA().issue_cert("localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


def test_server_context_refuses_anything_older_than_tls_1_2(cert_files: tuple[Path, Path]) -> None:
    context = tls.server_context(*cert_files)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def _problems(server: dict[str, object]) -> list[str]:
    raw = {"server": server, "upstream": [{"name": "a", "address": "127.0.0.1:25"}]}
    with pytest.raises(ConfigError) as err:
        config.from_mapping(raw)
    return err.value.problems


def test_config_errors_name_the_tls_and_auth_keys(
    tmp_path: Path, cert_files: tuple[Path, Path]
) -> None:
    cert, key = cert_files
    assert any(p.startswith("server.tls_key:") for p in _problems({"tls_cert": str(cert)}))
    missing = _problems({"tls_cert": str(tmp_path / "nope.pem"), "tls_key": str(key)})
    assert any(p.startswith("server.tls_cert: cannot load") for p in missing)
    assert any(p.startswith("server.tls_listen:") for p in _problems({"tls_listen": "x:1"}))
    users = tmp_path / "users"
    users.write_text("alice:not-a-hash\n")
    bad_users = _problems({"tls_cert": str(cert), "tls_key": str(key), "users_file": str(users)})
    assert bad_users == ["server.users_file: line 1: expected scrypt$n=N,r=R,p=P$<salt>$<hash>"]
    users.write_text("")
    assert any("AUTH needs TLS" in p for p in _problems({"users_file": str(users)}))


def test_config_defaults_for_the_auth_limits(cert_files: tuple[Path, Path]) -> None:
    cert, key = cert_files
    raw = {
        "server": {"tls_cert": str(cert), "tls_key": str(key), "tls_listen": "127.0.0.1:465"},
        "upstream": [{"name": "a", "address": "127.0.0.1:25"}],
    }
    server = config.from_mapping(raw).server
    assert server.tls_enabled and server.tls_listen == ("127.0.0.1", 465)
    assert (server.auth_max_failures, server.auth_max_failures_per_client) == (3, 10)
    assert (server.auth_failure_window_s, server.auth_failure_delay_s) == (300.0, 1.0)
