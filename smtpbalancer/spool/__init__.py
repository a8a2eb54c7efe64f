"""Spool: the durable queue on disk, and the source of truth."""

from __future__ import annotations
