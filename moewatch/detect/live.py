"""Live alerts during training: the sink ``attach(..., alerts=True)`` hands each flushed block of rows to.

It runs in the Watch's writer thread, feeds an :class:`AlertTracker`, logs every new alert once through the
``moewatch`` logger and calls the user's ``on_alert`` (so a training loop can stop itself on a critical alert).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pandas as pd

from .alerts import CRITICAL, WARNING, Alert
from .config import DetectorConfig
from .engine import AlertTracker

log = logging.getLogger("moewatch")
_LEVELS = {CRITICAL: logging.ERROR, WARNING: logging.WARNING}


def format_alert(alert: Alert) -> str:
    """The one log line for an alert, led by the status it puts its layer in (collapsed, critical, warning)."""
    status = alert.status if alert.status != "healthy" else alert.severity
    return (f"moewatch {status} ({alert.kind} {alert.severity}, step {alert.detected_step}): {alert.message} "
            f"Lever: {alert.lever}.")


def live_alerts(config: DetectorConfig | None = None, on_alert: Callable[[Alert], Any] | None = None,
                manifest: dict[str, Any] | None = None) -> Callable[[Any, Any], None]:
    """A sink ``(experts, layers)`` taking pyarrow Tables or DataFrames of newly flushed training rows; ``manifest``
    (the run's ``ep_size`` / ``expert_placement``) gives the expert-parallel placement the ep_straggler rule needs."""
    placement = None
    if manifest and (manifest.get("ep_size") or manifest.get("expert_placement")):
        from moewatch.store.placement import placement_for

        def placement(layer: str, num_experts: int):
            return placement_for(manifest, layer, num_experts)

    tracker = AlertTracker(config, placement)
    lock = threading.Lock()
    callback_failed = False

    def sink(experts: Any, layers: Any) -> None:
        nonlocal callback_failed
        with lock:  # one writer thread in practice; a lock keeps a second caller from interleaving state
            new = tracker.update(_frame(layers), _frame(experts))
        for alert in new:
            log.log(_LEVELS.get(alert.severity, logging.INFO), format_alert(alert))
            if on_alert is None:
                continue
            try:
                on_alert(alert)
            except Exception as exc:  # the user's callback must not stop the alerts (or the writer) for good
                if not callback_failed:
                    callback_failed = True
                    log.warning("moewatch: on_alert raised %s: %s (further failures are not logged)",
                                type(exc).__name__, exc)

    sink.__name__ = "live_alerts"
    sink.tracker = tracker  # type: ignore[attr-defined]
    return sink


def _frame(table: Any) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        return table
    return table.to_pandas()
