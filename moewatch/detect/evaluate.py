"""The detector's evaluation set and its scores: precision, recall and lead time before collapse completes.

Cases are synthetic scenarios (:func:`scenario_set`) and, optionally, real run directories whose run.json carries a
label in the user ``meta`` (:func:`labeled_runs`): ``{"label": "healthy"|"collapse"|"collapse_at_start"|"degraded",
"collapse_step": int (collapse runs), "affected_layers": [names] (optional)}``. A run counts as flagged when it gets a
warning or critical alert; lead time is ``collapse_step`` minus the step where the first one was raised.

``collapse_at_start`` is a run whose router collapses within its first steps (no balancing at all): faster than any
window can lead, so it is scored on its verdict (a critical alert whose onset is at or before the collapse), not on
lead time. For real runs, :func:`observed_collapse_step` gives the ground truth from the recorded counts alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .alerts import CRITICAL, WARNING, Alert
from .config import DetectorConfig
from .engine import analyze, analyze_frames
from .series import run_lengths
from .synthetic import Scenario, simulate
from .windows import layer_data_from_frames

LABELS = ("healthy", "collapse", "collapse_at_start", "degraded")
COLLAPSE_LABELS = ("collapse", "collapse_at_start")  # the labels that need a collapse_step


@dataclass(frozen=True)
class Case:
    """One evaluated run: its ground truth and what the detector said."""

    name: str
    label: str
    collapse_step: int | None
    affected: tuple[str, ...]
    alerts: tuple[Alert, ...] = field(repr=False)

    @property
    def flagged(self) -> list[Alert]:
        return [a for a in self.alerts if a.severity in (WARNING, CRITICAL)]

    @property
    def detected_step(self) -> int | None:
        """Where the first warning or critical alert on an affected layer was raised."""
        steps = [a.detected_step for a in self.flagged if not self.affected or a.layer in self.affected]
        return min(steps) if steps else None

    @property
    def lead(self) -> int | None:
        if self.label != "collapse" or self.collapse_step is None or self.detected_step is None:
            return None
        return self.collapse_step - self.detected_step

    @property
    def stray(self) -> list[Alert]:
        """Warnings or criticals on layers the scenario left healthy."""
        if not self.affected:
            return [] if self.label != "healthy" else self.flagged
        return [a for a in self.flagged if a.layer not in self.affected]

    @property
    def critical(self) -> bool:
        return any(a.severity == CRITICAL for a in self.alerts)

    @property
    def onset_found(self) -> bool:
        """A critical alert on an affected layer dates its onset at or before the observed collapse."""
        if self.collapse_step is None:
            return False
        return any(a.severity == CRITICAL and a.first_step <= self.collapse_step
                   and (not self.affected or a.layer in self.affected) for a in self.alerts)


@dataclass(frozen=True)
class Scores:
    cases: tuple[Case, ...]

    def _of(self, label: str) -> list[Case]:
        return [c for c in self.cases if c.label == label]

    @property
    def recall(self) -> float:
        """Collapsing runs flagged before their collapse completed."""
        col = self._of("collapse")
        hit = [c for c in col if c.lead is not None and c.lead > 0]
        return len(hit) / len(col) if col else math.nan

    @property
    def precision(self) -> float:
        """Flagged runs (or layers) that were not healthy: a stray alert on a healthy layer counts as a false one."""
        flagged = [c for c in self.cases if c.flagged]
        true = [c for c in flagged if c.label != "healthy" and not c.stray]
        return len(true) / len(flagged) if flagged else math.nan

    @property
    def leads(self) -> list[int]:
        return [c.lead for c in self._of("collapse") if c.lead is not None]

    @property
    def median_lead(self) -> float:
        return float(np.median(self.leads)) if self.leads else math.nan

    @property
    def false_alarms(self) -> list[Case]:
        """Healthy runs with any warning/critical, and runs with one on a layer they left healthy."""
        return [c for c in self.cases if (c.label == "healthy" and c.flagged) or c.stray]

    @property
    def missed(self) -> list[Case]:
        """Collapse runs not flagged before their collapse or never called critical; start-of-run collapses not
        called critical from (at the latest) the step they collapsed."""
        late = [c for c in self._of("collapse") if c.lead is None or c.lead <= 0 or not c.critical]
        return late + [c for c in self._of("collapse_at_start") if not c.onset_found]

    @property
    def overcalled(self) -> list[Case]:
        """Degraded (recovering, oscillating) runs that got a critical alert."""
        return [c for c in self._of("degraded") if c.critical]

    @property
    def trend_estimates(self) -> list[tuple[int, int]]:
        """(projected, observed) collapse-threshold crossing for collapse runs whose trend alert came first.

        Projected: the first ``imbalance_trend`` alert's ``collapse_step``; observed: the onset of the first critical
        ``imbalance`` alert on the same layer.
        """
        out = []
        for c in self._of("collapse"):
            trend = [a for a in c.alerts if a.kind == "imbalance_trend" and a.collapse_step is not None]
            crit = [a for a in c.alerts if a.kind == "imbalance" and a.severity == CRITICAL]
            if trend and crit:
                t = min(trend, key=lambda a: a.detected_step)
                k = min((a for a in crit if a.layer == t.layer), key=lambda a: a.first_step, default=None)
                if k is not None and t.detected_step < k.detected_step:
                    out.append((int(t.collapse_step), k.first_step))
        return out

    def table(self) -> str:
        lines = [f"{'case':34s} {'label':17s} {'collapse':>8s} {'detected':>8s} {'lead':>6s}  verdict"]
        for c in self.cases:
            verdict = "critical" if c.critical else ("warning" if c.flagged else "quiet")
            lines.append(
                f"{c.name:34s} {c.label:17s} {_fmt(c.collapse_step):>8s} {_fmt(c.detected_step):>8s} "
                f"{_fmt(c.lead):>6s}  {verdict}{' STRAY' if c.stray else ''}"
            )
        lines.append(
            f"precision {self.precision:.3f}  recall {self.recall:.3f}  median lead {self.median_lead:.0f} steps  "
            f"(min {min(self.leads) if self.leads else 'n/a'}; {len(self.cases)} runs: "
            f"{len(self._of('collapse'))} collapse, {len(self._of('degraded'))} degraded, "
            f"{len(self._of('healthy'))} healthy)"
        )
        at_start = self._of("collapse_at_start")
        if at_start:
            found = sum(c.onset_found for c in at_start)
            lines.append(f"collapse at start: {found} of {len(at_start)} called critical from their onset")
        est = self.trend_estimates
        if est:
            err = np.abs(np.array([p - o for p, o in est]))
            lines.append(
                f"imbalance_trend warned before the critical imbalance in {len(est)} of {len(self._of('collapse'))} "
                f"collapse runs; projected crossing off by a median {np.median(err):.0f} steps (max {err.max():.0f})"
            )
        return "\n".join(lines)


def _fmt(v: int | None) -> str:
    return "-" if v is None else str(v)


def _ep(e: int) -> int:
    return e // 4 if e >= 16 else e // 2


def _strength(cv: float, e: int, hot: int) -> float:
    """Concentration giving load CV ``cv`` (uncapped model: CV = c * sqrt(E / hot - 1))."""
    return min(cv / math.sqrt(e / hot - 1), 1.0)


def scenario_set(seeds: Iterable[int] = (0, 1, 2)) -> list[Scenario]:
    """The synthetic half of the evaluation set: every issue-4 family across seeds and layer shapes."""
    out: list[Scenario] = []
    shapes = ((16, 2, 2048), (64, 2, 4096), (8, 1, 1024), (8, 2, 2048))
    for seed in seeds:
        for e, k, tok in shapes:
            tag = f"E{e}k{k}s{seed}"
            common = dict(num_experts=e, top_k=k, tokens=tok, seed=seed)
            out += [
                Scenario(f"healthy-noisy/{tag}", "healthy", "healthy", wander=0.3, **common),
                Scenario(f"small-batch/{tag}", "small_batch", "healthy", **{**common, "tokens": max(e // 2, 4)}),
                Scenario(f"slow-drift/{tag}", "drift", "collapse", onset=600, ramp=1800, strength=0.9, **common),
                Scenario(f"sudden/{tag}", "sudden", "collapse", onset=1500 + 100 * seed, ramp=150, strength=0.9,
                         hot=1 + seed % 2, **common),
                Scenario(f"dead-gradual/{tag}", "dead_gradual", "collapse", onset=800, ramp=1200, strength=0.97,
                         hot=max(e // 4, 1), **common),
                Scenario(f"oscillation/{tag}", "oscillation", "degraded", onset=200, strength=_strength(0.7, e, 1),
                         period=500 + 100 * seed, **common),
                Scenario(f"late-recovery/{tag}", "recovery", "degraded", onset=1200, ramp=600,
                         strength=_strength(0.8, e, 1), **common),
                # Expert parallelism over E/2 devices (E/4 for E >= 16): a healthy router must not make a
                # straggler; device 0's experts drifting to 1.75x the mean device load must.
                Scenario(f"healthy-ep/{tag}", "healthy", "healthy", ep_size=_ep(e), **common),
                Scenario(f"ep-hot-device/{tag}", "ep_hot", "degraded", onset=800, ramp=600,
                         strength=0.75 / (_ep(e) - 1), ep_size=_ep(e), **common),
            ]
    return out


def evaluate_scenarios(scenarios: Iterable[Scenario], config: DetectorConfig | None = None,
                       via_frames: bool = False) -> list[Case]:
    cases = []
    for sc in scenarios:
        run = simulate(sc)
        if via_frames:
            alerts = analyze_frames(*run.frames(), config, manifest={"ep_size": sc.ep_size}).alerts
        else:
            alerts = analyze(run.layer_data(), config).alerts
        cases.append(Case(sc.name, sc.label, sc.collapse_step, (sc.layer_name(0),), tuple(alerts)))
    return cases


def labeled_runs(root: str | Path, config: DetectorConfig | None = None) -> list[Case]:
    """Cases from real run directories under ``root`` whose run.json ``meta`` has a ``label`` (others skipped).

    A collapse label without a ``collapse_step`` cannot be scored: such a run is skipped with a warning.
    """
    import warnings

    import moewatch

    cases = []
    for manifest in sorted(Path(root).rglob("run.json")):
        user = json.loads(manifest.read_text()).get("meta") or {}
        if user.get("label") not in LABELS:
            continue
        if user["label"] in COLLAPSE_LABELS and user.get("collapse_step") is None:
            warnings.warn(f"{manifest.parent}: label {user['label']!r} without a collapse_step; not evaluated "
                          "(add one, e.g. from moewatch.detect.evaluate.observed_collapse_step)", stacklevel=2)
            continue
        run = moewatch.load(manifest.parent)
        view = run.global_view()
        alerts = analyze_frames(view.layers, view.experts, config).alerts
        step = user.get("collapse_step")
        cases.append(Case(str(manifest.parent), user["label"], None if step is None else int(step),
                          tuple(user.get("affected_layers") or ()), tuple(alerts)))
    return cases


def observed_collapse_step(layers: pd.DataFrame, experts: pd.DataFrame, after: int = 0, window: int = 10,
                           hold: int = 20, max_share: float = 0.8, starved: float = 0.5,
                           fair: float = 0.1) -> int | None:
    """Where a recorded run's routing collapsed, judged from its token counts alone (never the detector).

    Over a trailing window of ``window`` recorded steps (full windows only), a layer is collapsed when one expert
    takes at least ``max_share`` of what a top-k router can give one expert (``max_share / k`` of all assignments;
    80% for top-1) or at least ``starved`` of its experts get under ``fair`` of their fair share. The collapse step
    is the first step at or after ``after`` from which some layer stays collapsed for ``hold`` recorded steps in a
    row, so a start-up transient or a flicker across the line is not a collapse. None if there is none.
    ``layers`` and ``experts`` are a run's global-view tables (``moewatch.load(path).global_view()``).
    """
    out = None
    for data in layer_data_from_frames(layers, experts):
        counts = data.tokens.astype(np.float64)
        steps = data.steps
        csum = np.cumsum(np.vstack([np.zeros((1, counts.shape[1])), counts]), axis=0)
        lo = np.maximum(np.arange(1, len(counts) + 1) - window, 0)
        load = csum[1:] - csum[lo]  # trailing-window load per expert
        total = load.sum(axis=1)
        e = counts.shape[1]
        with np.errstate(divide="ignore", invalid="ignore"):
            share = load / total[:, None]
        k = max(data.top_k, 1)
        hit = (share.max(axis=1) >= max_share / k) | ((share < fair / e).sum(axis=1) >= starved * e)
        hit &= (total > 0) & (steps >= after) & (np.arange(len(steps)) >= window - 1)
        held = np.flatnonzero(run_lengths(hit, 0) >= hold)
        if len(held):
            step = int(steps[held[0] - hold + 1])
            out = step if out is None else min(out, step)
    return out


def evaluate(config: DetectorConfig | None = None, seeds: Iterable[int] = (0, 1, 2),
             runs_dir: str | Path | None = None) -> Scores:
    """Score the detector on the synthetic set plus any labeled runs under ``runs_dir``."""
    cases = evaluate_scenarios(scenario_set(seeds), config)
    if runs_dir is not None:
        cases += labeled_runs(runs_dir, config)
    return Scores(tuple(cases))
