"""The `moewatch serve` dashboard (installed as moewatch.app; imports dash, so `import moewatch` never loads it).

`create_app(root, refresh_seconds=5.0) -> dash.Dash`; `moewatch.app.wsgi:server` for gunicorn.
"""

from __future__ import annotations

from typing import Any


def create_app(root: Any, refresh_seconds: float = 5.0, **kwargs: Any):
    """The Dash app for the runs under `root`; see moewatch.app.server.create_app."""
    from .server import create_app as _create

    return _create(root, refresh_seconds, **kwargs)


__all__ = ["create_app"]
