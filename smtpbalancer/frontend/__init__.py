"""Front end: the SMTP listener ESP software talks to."""

from __future__ import annotations
