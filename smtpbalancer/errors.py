"""Exceptions of the project: data, not prose.

A peer never sees `str(exc)`; it sees a `Reply` from `replies.py`.
"""

from __future__ import annotations


class ConfigError(Exception):
    """One or more config problems, each `key.path: what is wrong`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class SpoolError(Exception):
    """The spool could not make a message durable (write, fsync or rename failed)."""

    def __init__(self, operation: str, errno: int | None = None) -> None:
        super().__init__(f"{operation} failed (errno={errno})")
        self.operation = operation
        self.errno = errno


class SpoolCorrupt(Exception):
    """A spool entry failed validation; it is quarantined, never delivered."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"{name}: {why}")
        self.name = name
        self.why = why


class UpstreamError(Exception):
    """The upstream session broke: connect, timeout, disconnect, TLS, or a 421.

    Nothing in the transaction can be assumed delivered; the upstream, not the
    message, is suspect.
    """

    def __init__(self, upstream: str, stage: str, reason: str, code: int | None = None) -> None:
        super().__init__(f"{upstream} {stage}: {reason}")
        self.upstream = upstream
        self.stage = stage
        self.reason = reason
        self.code = code
