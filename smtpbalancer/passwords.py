"""Password hashes and the users file: `user:scrypt$n=16384,r=8,p=1$<salt>$<hash>`.

The KDF is the standard library's scrypt (RFC 7914); the hash is
self-describing, so the cost can be raised later without breaking old lines.
Verification compares with hmac.compare_digest. Everything here is CPU work
and synchronous: callers on the event loop run `verify` in a thread.
Used by config (validation), the CLI (`smtpbalancer passwd`) and
frontend/auth.py; it must never log, and never put a password in an error.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

_FORMAT = re.compile(
    r"^scrypt\$n=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+={0,2})\$([A-Za-z0-9+/]+={0,2})$"
)
_USER = re.compile(r"^[^\s:]{1,255}$")
N: Final = 16384  # 2**14, r=8, p=1: ~16 MiB and tens of ms per check (RFC 7914 §2 guidance)
R: Final = 8
P: Final = 1
_SALT_BYTES: Final = 16
_KEY_BYTES: Final = 32
_MAX_MEM: Final = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Scrypt:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes = b""

    def derive(self, password: bytes) -> bytes:
        return hashlib.scrypt(
            password, salt=self.salt, n=self.n, r=self.r, p=self.p,
            maxmem=_MAX_MEM, dklen=len(self.digest) or _KEY_BYTES,
        )  # fmt: skip

    def encode(self) -> str:
        b64 = base64.b64encode
        return (
            f"scrypt$n={self.n},r={self.r},p={self.p}"
            f"${b64(self.salt).decode()}${b64(self.digest).decode()}"
        )


def parse_hash(text: str) -> Scrypt:
    """Raises ValueError (without echoing the text) for anything but a scrypt hash."""
    found = _FORMAT.match(text)
    if not found:
        raise ValueError("expected scrypt$n=N,r=R,p=P$<salt>$<hash>")
    n, r, p = (int(found.group(i)) for i in (1, 2, 3))
    if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or 128 * n * r > _MAX_MEM:
        raise ValueError("scrypt parameters out of range")
    salt = base64.b64decode(found.group(4))
    digest = base64.b64decode(found.group(5))
    if len(digest) < 16:
        raise ValueError("scrypt hash too short")
    return Scrypt(n, r, p, salt, digest)


def hash_password(password: bytes, *, salt: bytes | None = None) -> str:
    params = Scrypt(N, R, P, salt if salt is not None else os.urandom(_SALT_BYTES))
    return Scrypt(N, R, P, params.salt, params.derive(password)).encode()


def verify(stored: Scrypt, password: bytes) -> bool:
    return hmac.compare_digest(stored.derive(password), stored.digest)


# Checked when the user is unknown, so that an unknown user costs the same one KDF.
DUMMY: Final = Scrypt(N, R, P, b"\x00" * _SALT_BYTES, b"\x00" * _KEY_BYTES)


def valid_user(name: str) -> bool:
    return _USER.match(name) is not None


def parse_users(text: str) -> Mapping[str, Scrypt]:
    """`user:hash` lines; `#` comments and blank lines are skipped.

    Raises ValueError naming the line number (never its content: it holds a hash).
    """
    users: dict[str, Scrypt] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, encoded = line.partition(":")
        if not sep or not valid_user(name):
            raise ValueError(f"line {number}: expected user:scrypt$...")
        if name in users:
            raise ValueError(f"line {number}: duplicate user {name!r}")
        try:
            users[name] = parse_hash(encoded)
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
    return users
