"""Delivery: scheduling, retry policy, outcomes, dispatch and bounces."""

from __future__ import annotations
