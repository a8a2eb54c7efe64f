"""Outbound TLS and credential keys of [[upstream]]: defaults, secrets by reference, errors."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path

import pytest
import trustme

from smtpbalancer.config import UpstreamTls, from_mapping, is_loopback_host, parse_upstream_tls
from smtpbalancer.errors import ConfigError
from smtpbalancer.tls import client_context
from smtpbalancer.upstream.connection import Security

SECRET = "hunter2-but-longer"
REMOTE = {"name": "ses", "address": "email-smtp.eu-west-1.amazonaws.com:587"}


def config_with(**upstream: object) -> Mapping[str, object]:
    return {"upstream": [{**REMOTE, **upstream}]}


def problems_of(**upstream: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        from_mapping(config_with(**upstream))
    return caught.value.problems


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def test_defaults_are_opportunistic_verified_and_anonymous() -> None:
    [up] = from_mapping(config_with()).upstreams
    assert (up.tls, up.tls_verify, up.tls_ca, up.username, up.password) == (
        UpstreamTls.OPPORTUNISTIC,
        True,
        None,
        None,
        None,
    )


@pytest.mark.parametrize("mode", ["none", "starttls", "implicit", "opportunistic"])
def test_every_tls_mode_parses(mode: str) -> None:
    assert parse_upstream_tls(mode) is UpstreamTls(mode)


def test_an_unknown_tls_mode_names_the_choices() -> None:
    assert problems_of(tls="required") == [
        "upstream[0].tls: expected one of 'none', 'starttls', 'implicit', 'opportunistic',"
        " got 'required'"
    ]


def test_password_env_is_resolved_and_hidden_from_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SES_SMTP_PASSWORD", SECRET)
    cfg = from_mapping(config_with(username="AKIA1", password_env="SES_SMTP_PASSWORD"))
    assert cfg.upstreams[0].password == SECRET
    assert SECRET not in repr(cfg)
    assert SECRET not in repr(Security.of(cfg.upstreams[0]))


def test_password_file_is_read_without_its_trailing_newline(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    cfg = from_mapping(config_with(username="AKIA1", password_file=str(secret)))
    assert cfg.upstreams[0].password == SECRET


def test_an_inline_password_is_refused_with_the_keys_to_use() -> None:
    [problem] = problems_of(username="AKIA1", password=SECRET)
    assert problem.startswith("upstream[0].password: inline passwords are not accepted")
    assert "password_env" in problem and "password_file" in problem
    assert SECRET not in problem


def test_a_missing_environment_variable_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    assert problems_of(username="AKIA1", password_env="NOT_SET_ANYWHERE") == [
        "upstream[0].password_env: environment variable 'NOT_SET_ANYWHERE' is not set or empty"
    ]


def test_an_unreadable_password_file_names_the_key(tmp_path: Path) -> None:
    [problem] = problems_of(username="AKIA1", password_file=str(tmp_path / "absent"))
    assert problem.startswith("upstream[0].password_file: cannot read ")


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"username": "u"}, "upstream[0].username: needs password_env or password_file"),
        ({"password_env": "HOME"}, "upstream[0].password_env: needs username"),
        (
            {"username": "u", "password_env": "HOME", "password_file": "/etc/hostname"},
            "upstream[0].password_file: give password_env or password_file, not both",
        ),
    ],
)
def test_credential_keys_come_together(keys: dict[str, object], expected: str) -> None:
    assert problems_of(**keys) == [expected]


def test_credentials_with_tls_none_to_a_remote_relay_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PW", SECRET)
    [problem] = problems_of(tls="none", username="u", password_env="PW")
    assert problem.startswith("upstream[0].tls: credentials would cross the network in clear")


def test_credentials_with_tls_none_to_loopback_are_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PW", SECRET)
    raw = {
        "upstream": [
            {"name": "local", "address": "127.0.0.1:2525", "tls": "none", "username": "u"}
            | {"password_env": "PW"}
        ]
    }
    assert from_mapping(raw).upstreams[0].username == "u"


def test_a_pinned_ca_must_load(tmp_path: Path, ca_file: Path) -> None:
    assert from_mapping(config_with(tls_ca=str(ca_file))).upstreams[0].tls_ca == ca_file
    [missing] = problems_of(tls_ca=str(tmp_path / "absent.pem"))
    assert missing.startswith("upstream[0].tls_ca: cannot read ")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert problems_of(tls_ca=str(junk)) == [
        f"upstream[0].tls_ca: {junk} holds no usable PEM certificate"
    ]


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"tls": "none"}, 'upstream[0].tls_ca: has no effect with tls = "none"'),
        ({"tls_verify": False}, "upstream[0].tls_ca: has no effect with tls_verify = false"),
    ],
)
def test_a_pinned_ca_that_would_be_ignored_is_an_error(
    ca_file: Path, keys: dict[str, object], expected: str
) -> None:
    assert problems_of(tls_ca=str(ca_file), **keys) == [expected]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("10.0.0.1", False),
        ("::2", False),
        ("localhost.example.com", False),
        ("smtp.example.com", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_client_context_verifies_by_default_and_speaks_tls_1_2_or_newer(ca_file: Path) -> None:
    strict = client_context(verify=True, ca=ca_file)
    assert strict.verify_mode is ssl.CERT_REQUIRED and strict.check_hostname
    assert strict.minimum_version is ssl.TLSVersion.TLSv1_2
    assert len(strict.get_ca_certs()) == 1, "pinned: only the given CA is trusted"
    lax = client_context(verify=False, ca=None)
    assert lax.verify_mode is ssl.CERT_NONE and not lax.check_hostname
    assert lax.minimum_version is ssl.TLSVersion.TLSv1_2


def test_security_for_probes_drops_the_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PW", SECRET)
    [up] = from_mapping(config_with(tls="starttls", username="u", password_env="PW")).upstreams
    security = Security.of(up)
    assert (security.tls, security.username, security.password) == (
        UpstreamTls.STARTTLS,
        "u",
        SECRET,
    )
    assert not security.plaintext_auth_ok
    probe = security.without_credentials()
    assert (probe.username, probe.password, probe.context) == (None, None, security.context)
