"""WSGI entry point for gunicorn and friends: the dashboard of the runs under $MOEWATCH_ROOT.

    MOEWATCH_ROOT=runs gunicorn --workers 1 --threads 8 -b 127.0.0.1:8050 moewatch.app.wsgi:server

One worker process: each process keeps its own in-memory copy of the runs, so more workers mean more memory and
no speed-up for one user. MOEWATCH_REFRESH sets the live refresh period in seconds (default 5).
"""

from __future__ import annotations

import os

from . import create_app


def _app():
    root = os.environ.get("MOEWATCH_ROOT", "").strip()
    if not root:
        raise RuntimeError("MOEWATCH_ROOT is not set: export MOEWATCH_ROOT=/path/to/runs (a run directory or a "
                           "folder of runs) before starting moewatch.app.wsgi:server")
    try:
        refresh = float(os.environ.get("MOEWATCH_REFRESH", "5"))
    except ValueError:
        raise RuntimeError(f"MOEWATCH_REFRESH must be a number of seconds, got "
                           f"{os.environ['MOEWATCH_REFRESH']!r}") from None
    return create_app(root, refresh_seconds=refresh)


app = _app()
server = app.server
