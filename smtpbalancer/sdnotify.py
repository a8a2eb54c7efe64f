"""systemd's notify protocol (sd_notify(3)): one datagram of KEY=VALUE lines to $NOTIFY_SOCKET.

A `Type=notify` unit learns from it that the service is ready (`READY=1`, sent once
the SMTP listeners accept), reloading (`RELOADING=1` with `MONOTONIC_USEC=`, then
`READY=1` again) or stopping (`STOPPING=1`, when draining starts); `STATUS=` is the
line `systemctl status` shows. `$NOTIFY_SOCKET` is a file system path or, with a
leading '@', a name in Linux's abstract socket namespace.

Without `$NOTIFY_SOCKET` (not run by systemd) every call is a no-op. A send that
fails is logged at DEBUG and never raised: the service runs the same whether or not
a supervisor listens, as libsystemd's sd_notify() does.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Final

log = logging.getLogger(__name__)

# A datagram to a busy supervisor may block while its queue is full; bounded so a
# stuck supervisor cannot stall the event loop for long (these are rare, not per message).
SEND_TIMEOUT_S: Final = 1.0


def socket_address(value: str) -> str | bytes | None:
    """The AF_UNIX address for a $NOTIFY_SOCKET value, or None if it is not one we support.

    "@name" is the abstract namespace (a leading NUL byte on the wire); "/path" is a file.
    Other forms (a relative path, systemd's "vsock:" addresses) are not supported.
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode("utf-8", "surrogateescape")
    if value.startswith("/"):
        return value
    return None


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `state` ("READY=1", "STOPPING=1", lines joined by "\\n") to the supervisor.

    Returns True when the datagram was sent, False when there is no $NOTIFY_SOCKET or
    the send failed (logged at DEBUG). Never raises for a send failure.
    """
    target = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not target:
        return False
    address = socket_address(target)
    if address is None:
        log.debug("sdnotify.unsupported_socket socket=%s", target)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT_S)
            sock.sendto(state.encode("utf-8", "replace"), address)
    except OSError as exc:
        log.debug("sdnotify.send_failed socket=%s error=%s", target, exc)
        return False
    return True


def status_line(text: str) -> str:
    """A value for STATUS=: one line (the protocol separates assignments by newlines)."""
    return " ".join(text.split())
