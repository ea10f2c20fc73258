"""Collapse detection: rules over windows of a run's routing stats that say which layer degrades, since when, and
what to do about it.

``detect(run)`` judges a loaded run on its all-ranks global view; ``detect_frames`` works on the tables directly;
``AlertTracker`` evaluates the same rules live, one flush at a time. Thresholds live in ``DetectorConfig``.
"""

from .alerts import CRITICAL, INFO, KINDS, SEVERITIES, WARNING, Alert, sort_alerts, worst
from .config import DetectorConfig, LayerThresholds, parse_pairs
from .engine import AlertTracker, Analysis, LayerResult, analyze, analyze_frames, detect, detect_frames

__all__ = [
    "Alert",
    "AlertTracker",
    "Analysis",
    "CRITICAL",
    "DetectorConfig",
    "INFO",
    "KINDS",
    "LayerResult",
    "LayerThresholds",
    "SEVERITIES",
    "WARNING",
    "analyze",
    "analyze_frames",
    "detect",
    "detect_frames",
    "parse_pairs",
    "sort_alerts",
    "worst",
]
