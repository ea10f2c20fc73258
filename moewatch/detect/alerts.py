"""What the detector says: the :class:`Alert` record, severities, alert kinds and the lever each kind suggests."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

INFO, WARNING, CRITICAL = "info", "warning", "critical"
SEVERITIES = (INFO, WARNING, CRITICAL)
SEVERITY_RANK = {INFO: 0, WARNING: 1, CRITICAL: 2}

KINDS = (
    "dead_expert",
    "dominant_expert",
    "imbalance",
    "imbalance_trend",
    "entropy_collapse",
    "drops",
    "logit_drift",
    "nonfinite",
    "bias_runaway",
)

# The action to take, per kind. Balance problems point at the aux loss unless the router balances with a bias
# (DeepSeek-style aux-free), where the bias update rate is the knob instead.
LEVERS = {
    "dead_expert": "add router noise (jitter) and raise the aux-loss coefficient so starved experts get tokens again",
    "dominant_expert": "raise the aux-loss coefficient",
    "imbalance": "raise the aux-loss coefficient",
    "imbalance_trend": "raise the aux-loss coefficient now, before the collapse completes",
    "entropy_collapse": "add router noise and z-loss to keep the router from saturating",
    "drops": "raise the capacity factor",
    "logit_drift": "add z-loss (or raise its coefficient) or lower the learning rate",
    "nonfinite": "lower the learning rate and add z-loss; compute the router in float32",
    "bias_runaway": "tune bias balancing: raise the bias update rate or add a small aux loss",
}
BIAS_LEVERS = {
    "dominant_expert": "tune bias balancing: raise the bias update rate",
    "imbalance": "tune bias balancing: raise the bias update rate",
    "imbalance_trend": "tune bias balancing (raise the bias update rate) now, before the collapse completes",
}


def lever_for(kind: str, has_bias: bool) -> str:
    if has_bias and kind in BIAS_LEVERS:
        return BIAS_LEVERS[kind]
    return LEVERS[kind]


@dataclass(frozen=True)
class Alert:
    """One episode of one condition on one layer.

    ``first_step`` is where the condition began (the first window of the run of windows that fired it),
    ``detected_step`` where the detector could first say so (live, the alert is raised there), ``last_step`` the last
    step it still held. ``value`` is the worst observed value and ``threshold`` the one it crossed; for trends,
    ``collapse_step`` is the projected step where the collapse threshold will be crossed. ``ongoing`` is True when
    the condition still held at the end of the data.
    """

    kind: str
    severity: str
    layer: str
    experts: tuple[int, ...]
    first_step: int
    last_step: int
    value: float
    threshold: float
    message: str
    lever: str
    detected_step: int
    collapse_step: int | None = None
    ongoing: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Alert.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"Alert.severity must be one of {', '.join(SEVERITIES)}, got {self.severity!r}")

    @property
    def rank(self) -> int:
        return SEVERITY_RANK[self.severity]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: experts as a list, non-finite numbers as None."""
        d = asdict(self)
        d["experts"] = list(self.experts)
        for key in ("value", "threshold"):
            if not math.isfinite(d[key]):
                d[key] = None
        return d


def sort_alerts(alerts: list[Alert]) -> list[Alert]:
    """Most severe first, then by onset, layer and kind."""
    return sorted(alerts, key=lambda a: (-a.rank, a.first_step, a.layer, a.kind, a.detected_step))


def worst(alerts: list[Alert]) -> str:
    """Verdict for a set of alerts: ``collapsed`` with any critical, ``warning`` with any warning, else ``healthy``."""
    rank = max((a.rank for a in alerts), default=0)
    return {2: "collapsed", 1: "warning"}.get(rank, "healthy")
