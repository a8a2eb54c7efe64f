"""Upstream relays: selection, breakers, connection pools and the SMTP client."""

from __future__ import annotations
