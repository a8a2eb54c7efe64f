"""Test support: config builders, SMTP client helpers, waiting, subprocess proxies."""
