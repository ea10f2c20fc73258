"""Collapse detection: rules over windows of a run's routing stats that say which layer degrades, since when, and
what to do about it.

``detect(run)`` judges a loaded run on its all-ranks global view; ``analyze_frames`` works on the tables directly
and returns an :class:`Analysis` (alerts, per-layer window series, ``status``); ``health(run)`` gives the per-layer,
per-window levels the alerts imply (the dashboard's strip); ``AlertTracker`` evaluates the same rules live (alerts in the order raised), one flush
at a time. Thresholds live in ``DetectorConfig``; statuses are ``healthy | warning | recovered | critical |
collapsed`` (``STATUSES``).
"""

from .alerts import (
    COLLAPSE_KINDS,
    CRITICAL,
    INFO,
    KINDS,
    SEVERITIES,
    STATUS_RANK,
    STATUSES,
    WARNING,
    Alert,
    fails,
    sort_alerts,
    status_of,
    worst_status,
)
from .config import DetectorConfig, LayerThresholds, parse_pairs
from .engine import (
    AlertTracker,
    Analysis,
    LayerResult,
    analyze,
    analyze_frames,
    analyze_run,
    detect,
    detect_frames,
)
from .health import health

__all__ = [
    "Alert",
    "AlertTracker",
    "Analysis",
    "COLLAPSE_KINDS",
    "CRITICAL",
    "DetectorConfig",
    "INFO",
    "KINDS",
    "LayerResult",
    "LayerThresholds",
    "SEVERITIES",
    "STATUSES",
    "STATUS_RANK",
    "WARNING",
    "analyze",
    "analyze_frames",
    "analyze_run",
    "detect",
    "detect_frames",
    "fails",
    "health",
    "parse_pairs",
    "sort_alerts",
    "status_of",
    "worst_status",
]
