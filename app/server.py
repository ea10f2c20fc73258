"""`create_app(root)`: the Dash app of `moewatch serve`, reading the runs found under `root`.

Dash debug mode stays off unless the caller passes debug=True to `run` (the CLI's --debug); callbacks answer
failures with messages in the page, so no stack trace ever reaches the browser.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dash import Dash

from . import callbacks, layout
from .catalog import Catalog

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_CACHE_BYTES = 8 << 30


def create_app(root: str | os.PathLike, refresh_seconds: float = 5.0, *, background: bool = True,
               max_cache_bytes: int | None = None, config: Any = None) -> Dash:
    """The dashboard for the runs under `root` (a run directory or a folder of runs, found by run.json).

    `refresh_seconds`: how often an open page looks for new part files of a running run. `max_cache_bytes`: memory
    for loaded runs (default 8 GiB, or the MOEWATCH_CACHE_BYTES environment variable); least recently used first out.
    `config`: the detector's thresholds (a `moewatch.detect.DetectorConfig`, as `moewatch report --config/--set`
    builds it), so the page judges runs exactly as the report does; None for the defaults.
    """
    path = Path(root)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a run directory or a folder of runs")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory: pass a run directory or a folder of runs")
    if not refresh_seconds > 0:
        raise ValueError(f"refresh_seconds must be > 0, got {refresh_seconds!r}")
    if max_cache_bytes is None:
        max_cache_bytes = int(os.environ.get("MOEWATCH_CACHE_BYTES", DEFAULT_CACHE_BYTES))
    catalog = Catalog(path, background=background, max_bytes=max_cache_bytes, config=config)
    app = Dash(__name__, title="moewatch", update_title=None, assets_folder=ASSETS,
               serve_locally=True, suppress_callback_exceptions=False)
    app.layout = layout.build(str(catalog.root), refresh_seconds)
    callbacks.register(app, catalog, refresh_seconds)
    app.moewatch_catalog = catalog  # type: ignore[attr-defined]  # for tests and the benchmark
    return app
