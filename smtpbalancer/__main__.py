"""`python -m smtpbalancer` is the same as the `smtpbalancer` console script."""

from __future__ import annotations

from smtpbalancer.cli import main

raise SystemExit(main())
