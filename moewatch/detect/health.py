"""A run's health per layer and detector window: the one computation behind the dashboard's strip, the report's
layer statuses and the alerts.

:func:`health` judges a run and returns one row per (layer, window) with the level the detector's alerts give that
window (0 healthy, 1 warning, 2 critical), the status behind it (``collapsed`` for a collapse kind, ``critical``
otherwise), the alert kinds that hold there, whether the window lies in the warm-up, the layer's expert count, and
the window's signals as the rules read them (CV with sampling noise removed, largest share, starved experts,
entropy, drop rate, z-loss, max |logit|, NaN/inf count). A window's level comes from the alert episodes that cover it, from their onset to
their last breaching window (to the end of the data while an episode still holds), so the strip shows exactly
what the alerts say: a run reported healthy has no critical window after its warm-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .alerts import COLLAPSE_KINDS, CRITICAL, SEVERITY_RANK, WARNING, Alert

if TYPE_CHECKING:
    from .config import DetectorConfig
    from .engine import Analysis, LayerResult

SIGNALS = ("cv", "max_share", "dead", "entropy_norm", "drop_rate", "z_loss", "logit_abs_max", "nonfinite")
COLUMNS = ("layer", "start_step", "end_step", "level", "status", "kinds", "warmup", "num_experts", *SIGNALS)


def health(run: Any, config: DetectorConfig | None = None) -> pd.DataFrame:
    """Per-layer, per-window health of ``run``: a run directory path, a loaded run (``moewatch.load``) or an
    :class:`~moewatch.detect.engine.Analysis` already made. Columns: ``COLUMNS`` (see the module docstring)."""
    from .engine import Analysis, analyze_frames, analyze_run

    if isinstance(run, Analysis):
        return health_frame(run)
    if isinstance(run, (str, Path)):
        return health_frame(analyze_run(run, config))  # streamed, as the report reads it
    view = run.global_view()
    return health_frame(analyze_frames(view.layers, view.experts, config))


def health_frame(analysis: Analysis) -> pd.DataFrame:
    """The health rows of an analysis, layers in the analysis's order and windows in step order."""
    warmup = analysis.config.warmup_steps
    parts = [_layer_frame(layer, warmup) for layer in analysis.layers]
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in COLUMNS})
    return pd.concat(parts, ignore_index=True)


def window_levels(first: np.ndarray, last: np.ndarray, alerts: list[Alert]) -> tuple[np.ndarray, np.ndarray, list]:
    """(level [W], collapse flag [W], kinds per window) that ``alerts`` give windows spanning [first, last] steps.

    An alert covers the windows from its onset to its last breaching window, or to the end while it is ongoing;
    info alerts leave the level at 0.
    """
    n = len(first)
    level = np.zeros(n, np.int8)
    collapse = np.zeros(n, bool)
    kinds: list[list[tuple[int, str]]] = [[] for _ in range(n)]
    for a in alerts:
        rank = SEVERITY_RANK[a.severity]
        if rank == 0:
            continue
        end = np.inf if a.ongoing else a.last_step
        lo = int(np.searchsorted(last, a.first_step, side="left"))  # first window ending at or after the onset
        hi = int(np.searchsorted(first, end, side="right"))  # windows starting at or before the end
        if hi <= lo:
            continue
        level[lo:hi] = np.maximum(level[lo:hi], rank)
        if a.severity == CRITICAL and a.kind in COLLAPSE_KINDS:
            collapse[lo:hi] = True
        for i in range(lo, hi):
            kinds[i].append((-rank, a.kind))
    return level, collapse, kinds


def _layer_frame(layer: LayerResult, warmup: int) -> pd.DataFrame:
    s = layer.series
    first = np.asarray(s["first"], np.int64)
    last = np.asarray(s["last"], np.int64)
    if not len(first):
        return pd.DataFrame()
    level, collapse, kinds = window_levels(first, last, layer.alerts)
    status = np.where(level == 2, np.where(collapse, "collapsed", CRITICAL),
                      np.where(level == 1, WARNING, "healthy"))
    data: dict[str, Any] = {
        "layer": layer.layer,
        "start_step": first,
        "end_step": last,
        "level": level,
        "status": status,
        "kinds": [",".join(dict.fromkeys(k for _, k in sorted(ks))) for ks in kinds],
        "warmup": last < warmup,
        "num_experts": layer.num_experts,
    }
    for name in SIGNALS:
        data[name] = np.asarray(s[name], np.float64)
    return pd.DataFrame(data, columns=list(COLUMNS))


def _dtype(column: str) -> str:
    if column in ("layer", "status", "kinds"):
        return "object"
    if column == "warmup":
        return "bool"
    if column == "level":
        return "int8"
    if column in ("start_step", "end_step", "num_experts"):
        return "int64"
    return "float64"
