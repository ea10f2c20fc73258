"""Per-step health score of a layer for the model overview strip: 0 healthy, 1 at a warning threshold, 2 critical.

The score is the worst of four: load CV, normalized router entropy, dead experts and drop rate, each mapped
piecewise-linearly through the detector's own thresholds (moewatch.detect.config.DetectorConfig, so the strip and
the alerts agree). It is a picture for the eye, not the detector: the detector judges windows with hysteresis;
here each step is scored alone, then columns are averaged, so a sustained collapse reads as a red band.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COMPONENTS = ("cv", "entropy", "dead", "drops")


@dataclass(frozen=True)
class HealthThresholds:
    """Where each component scores 1 (warning) and 2 (critical)."""

    cv_warning: float = 0.5
    cv_critical: float = 1.0
    entropy_ok: float = 0.5
    entropy_warning: float = 0.2
    entropy_critical: float = 0.05
    dead_critical_fraction: float = 0.25
    drop_warning: float = 0.05
    drop_critical: float = 0.2


def thresholds() -> HealthThresholds:
    """The detector's thresholds when its config is importable, else the same defaults."""
    try:
        from moewatch.detect.config import DetectorConfig
    except ImportError:
        return HealthThresholds()
    c = DetectorConfig()
    base = HealthThresholds()
    return HealthThresholds(
        cv_warning=getattr(c, "cv_warning", base.cv_warning),
        cv_critical=getattr(c, "cv_critical", base.cv_critical),
        entropy_ok=getattr(c, "entropy_trend_below", base.entropy_ok),
        entropy_warning=getattr(c, "entropy_warning", base.entropy_warning),
        entropy_critical=getattr(c, "entropy_critical", base.entropy_critical),
        dead_critical_fraction=getattr(c, "dead_critical_fraction", base.dead_critical_fraction),
        drop_warning=getattr(c, "drop_warning", base.drop_warning),
        drop_critical=getattr(c, "drop_critical", base.drop_critical),
    )


def corrected_cv(cv: np.ndarray, tokens: np.ndarray, num_experts, top_k) -> np.ndarray:
    """CV with multinomial sampling noise removed: with m assignments expected per expert, a perfectly balanced
    router still shows CV^2 ~ 1/m, which for small batches alone would paint the strip red."""
    E = np.asarray(num_experts, dtype=np.float64)
    m = tokens * np.asarray(top_k, dtype=np.float64) / np.maximum(E, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        noise = np.where(m > 0, 1.0 / np.where(m > 0, m, 1.0), np.nan)
        return np.sqrt(np.maximum(cv * cv - noise, 0.0))


def component_scores(s: dict[str, np.ndarray], num_experts, top_k, th: HealthThresholds | None = None
                     ) -> dict[str, np.ndarray]:
    """Each component's score (0..2, NaN where not recorded) from the series of `RunData.series/all_series`."""
    th = th or thresholds()
    E = np.maximum(np.asarray(num_experts, dtype=np.float64), 1)
    cv = corrected_cv(s["cv"], s["tokens"], num_experts, top_k)
    dead_frac = s["dead"] / E
    # Dead experts: one dead expert is a warning, dead_critical_fraction of them critical.
    one = 1.0 / E
    crit = np.maximum(th.dead_critical_fraction, one * 1.5)
    dead = np.where(dead_frac <= 0, 0.0, np.where(dead_frac <= one, 1.0, 1.0 + np.clip((dead_frac - one) /
                                                                                      (crit - one), 0, 1)))
    return {
        "cv": _ramp(cv, th.cv_warning, th.cv_critical),
        "entropy": _ramp(-s["entropy_norm"], -th.entropy_warning, -th.entropy_critical, start=-th.entropy_ok),
        "dead": np.where(np.isnan(s["dead"]), np.nan, dead),
        "drops": np.where(np.isnan(s["drop_rate"]), 0.0, _ramp(s["drop_rate"], th.drop_warning, th.drop_critical)),
    }


def score(s: dict[str, np.ndarray], num_experts, top_k, th: HealthThresholds | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """(worst score, index into COMPONENTS of the worst component); NaN score where the step was not recorded."""
    comps = component_scores(s, num_experts, top_k, th)
    stack = np.stack([comps[c] for c in COMPONENTS], axis=-1)
    filled = np.where(np.isnan(stack), -1.0, stack)
    worst = filled.argmax(axis=-1)
    value = np.take_along_axis(filled, worst[..., None], axis=-1)[..., 0]
    recorded = np.isfinite(s["tokens"]) & (value >= 0)
    return np.where(recorded, value, np.nan), worst


def _ramp(x: np.ndarray, warning: float, critical: float, start: float | None = None) -> np.ndarray:
    """0 at `start` (default 0) rising to 1 at `warning` and 2 at `critical`, capped at 2; NaN stays NaN."""
    lo = 0.0 if start is None else start
    with np.errstate(invalid="ignore"):
        out = np.interp(np.nan_to_num(x, nan=lo), [lo, warning, critical], [0.0, 1.0, 2.0])
    return np.where(np.isnan(x), np.nan, out)
