"""What the detector says: the :class:`Alert` record, severities, alert kinds and the lever each kind suggests."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

INFO, WARNING, CRITICAL = "info", "warning", "critical"
SEVERITIES = (INFO, WARNING, CRITICAL)
SEVERITY_RANK = {INFO: 0, WARNING: 1, CRITICAL: 2}

# What a run or a layer is, from its alerts, least to most severe (docs/detector.md, "Statuses"):
#   healthy    no warning or critical alert
#   warning    warning alerts, never a critical one
#   recovered  critical alerts, none of them holding at the end
#   critical   a critical alert that is not a collapse (drops, NaN/inf logits, ...) holds at the end
#   collapsed  a critical collapse alert (dead, dominant, imbalance, entropy) holds at the end
HEALTHY, RECOVERED, COLLAPSED = "healthy", "recovered", "collapsed"
STATUSES = (HEALTHY, WARNING, RECOVERED, CRITICAL, COLLAPSED)
STATUS_RANK = {s: i for i, s in enumerate(STATUSES)}
# Statuses that fail a CI gate by default (`moewatch report` exit 1); `--fail-on` lowers the bar.
FAILING = CRITICAL

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
    "ep_straggler",
    "expert_stalled",
    "fragile_routing",
    "balancer_override",
)
# Kinds whose critical alert means the routing itself collapsed (as opposed to drops or numerics going wrong).
COLLAPSE_KINDS = frozenset({"dead_expert", "dominant_expert", "imbalance", "entropy_collapse"})

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
    "fragile_routing": ("the router barely separates its top-k from the rest: lower the router's learning rate (or warm "
                        "it up longer) and check its input (a collapsed hidden state scores every expert alike)"),
    "balancer_override": ("the balancing bias is holding back a collapse: add (or raise) a small aux loss so the "
                          "router balances by itself, or lower the learning rate"),
    "expert_stalled": ("check the starved experts' gradients (a frozen or detached expert, a learning-rate or weight-"
                       "decay group that excludes them) and route them tokens again: router noise, a higher "
                       "aux-loss coefficient"),
    "ep_straggler": ("spread the hot experts over devices (re-place or replicate them, as EPLB does) or strengthen "
                     "load balancing"),
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
    step it still held. ``value`` is the peak (worst) value over the episode, reached in the window ending at
    ``peak_step``; ``latest`` is the value in the episode's latest window: the window at the end of the data while
    it is ``ongoing``, else its last breaching window. ``threshold`` is the level it crossed; for trends,
    ``collapse_step`` is the projected step where the collapse threshold will be crossed. ``ongoing`` is True when
    the condition still held at the end of the data (hysteresis not yet cleared).
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
    latest: float = math.nan
    peak_step: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Alert.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"Alert.severity must be one of {', '.join(SEVERITIES)}, got {self.severity!r}")

    @property
    def rank(self) -> int:
        return SEVERITY_RANK[self.severity]

    @property
    def status(self) -> str:
        """The status this alert puts its layer in while it holds: collapsed, critical, warning or healthy (info)."""
        if self.severity == CRITICAL:
            return COLLAPSED if self.kind in COLLAPSE_KINDS else CRITICAL
        return WARNING if self.severity == WARNING else HEALTHY

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: experts as a list, non-finite numbers as None, plus the ``status`` it implies."""
        d = asdict(self)
        d["experts"] = list(self.experts)
        for key in ("value", "threshold", "latest"):
            if d[key] is not None and not math.isfinite(d[key]):
                d[key] = None
        d["status"] = self.status
        return d


def sort_alerts(alerts: list[Alert]) -> list[Alert]:
    """Most severe first, then by onset, layer and kind."""
    return sorted(alerts, key=lambda a: (-a.rank, a.first_step, a.layer, a.kind, a.detected_step))


def fold_covered(alerts: list[Alert]) -> list[Alert]:
    """Drop a warning (or info) that a more severe alert of the same kind and layer covers: it says nothing new.

    Covered means the more severe episode began no later, was raised no later and lasted at least as long. One that
    began or was raised earlier stays: it is the early warning a monitor exists for.
    """
    by_track: dict[tuple[str, str], list[Alert]] = {}
    for a in alerts:
        by_track.setdefault((a.kind, a.layer), []).append(a)
    return [a for a in alerts if not any(
        c.rank > a.rank and c.first_step <= a.first_step and c.detected_step <= a.detected_step
        and c.last_step >= a.last_step and (c.ongoing or not a.ongoing)
        for c in by_track[(a.kind, a.layer)])]


def status_of(alerts: list[Alert]) -> str:
    """The status of a run or a layer from its alerts (see ``STATUSES``): what holds at the end of the data decides
    between collapsed, critical and recovered; any warning otherwise makes it a warning."""
    critical = [a for a in alerts if a.severity == CRITICAL]
    holding = [a for a in critical if a.ongoing]
    if any(a.kind in COLLAPSE_KINDS for a in holding):
        return COLLAPSED
    if holding:
        return CRITICAL
    if critical:
        return RECOVERED
    return WARNING if any(a.severity == WARNING for a in alerts) else HEALTHY


def worst_status(statuses: list[str]) -> str:
    """The most severe of several statuses (a run from its layers, a folder from its runs); healthy when none."""
    return max(statuses, key=STATUS_RANK.__getitem__, default=HEALTHY)


def fails(status: str, fail_on: str = FAILING) -> bool:
    """Whether ``status`` fails a gate set at ``fail_on`` (warning, recovered or critical; collapsed always fails)."""
    if fail_on not in STATUS_RANK or fail_on == HEALTHY:
        raise ValueError(f"fail_on must be one of warning, recovered, critical, collapsed; got {fail_on!r}")
    return STATUS_RANK[status] >= STATUS_RANK[fail_on]
