"""smtpbalancer: a load-balancing SMTP relay proxy with a durable spool."""

from __future__ import annotations

__version__ = "0.1.0"
