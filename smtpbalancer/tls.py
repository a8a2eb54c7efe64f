"""TLS contexts: the listeners' server context (and its reload on SIGHUP).

Server contexts speak TLS 1.2 or newer only and never ask clients for a
certificate. `reload_server_context` swaps the certificate of a live context:
the new files are first loaded into a scratch context, so a missing or
mismatched file raises and leaves the live context serving the old certificate.
Handshakes already done keep their certificate; new ones get the new one.
This module holds no state and does no logging: callers log and decide.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A listener context (STARTTLS and implicit TLS) with cert/key loaded.

    Raises OSError or ssl.SSLError when the files are missing, unreadable or do not match.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8996: TLS 1.0/1.1 are deprecated
    context.options |= ssl.OP_NO_COMPRESSION  # CRIME
    context.verify_mode = ssl.CERT_NONE  # SMTP clients rarely have certificates
    context.load_cert_chain(cert, key)
    return context


def reload_server_context(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    """Load cert/key into the live context; on any error the old certificate stays."""
    server_context(cert, key)  # validate first: a half-loaded live context would be worse
    context.load_cert_chain(cert, key)


# --- upstream (client) contexts: outbound TLS to relays -----------------------------


def client_context(*, verify: bool, ca: Path | None) -> ssl.SSLContext:
    """A context for sessions to one upstream relay, TLS 1.2 or newer.

    verify: check the chain and that the certificate names the host we dialled.
    ca: trust only this PEM bundle (a pinned CA); None = the system store.
    Raises OSError or ssl.SSLError when `ca` cannot be loaded.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8996
    if not verify:
        context.check_hostname = False  # must come before CERT_NONE
        context.verify_mode = ssl.CERT_NONE
    return context
