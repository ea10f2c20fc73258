"""The verdict sentence: one line that names the status and what is wrong, with the numbers that hold now.

``verdict(analysis)`` gives e.g. "CRITICAL: 25% of assignments dropped at capacity on 2 of 2 layers, since step 0;
it holds at the end (step 599)." The report prints it; the dashboard shows it beside the status badge.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .alerts import COLLAPSE_KINDS, COLLAPSED, CRITICAL, HEALTHY, RECOVERED, WARNING, Alert, status_of

if TYPE_CHECKING:
    from .engine import Analysis

# What each kind means in a verdict, fed the value that matters (latest while holding, peak once over) and the
# layer's expert count.
_PHRASES = {
    "dead_expert": lambda v, e: f"{v} of {e} experts starved",
    "dominant_expert": lambda v, e: f"one expert taking {v} of assignments",
    "imbalance": lambda v, e: f"load imbalance (CV {v})",
    "imbalance_trend": lambda v, e: f"load imbalance rising toward collapse (CV {v})",
    "entropy_collapse": lambda v, e: f"router entropy down to {v} of its maximum",
    "drops": lambda v, e: f"{v} of assignments dropped at capacity",
    "nonfinite": lambda v, e: "NaN/inf router logits",
    "logit_drift": lambda v, e: f"router logits growing (max |logit| {v})",
    "bias_runaway": lambda v, e: "the balancing bias running away",
    "ep_straggler": lambda v, e: f"an expert-parallel device at {v} the mean device load",
    "expert_stalled": lambda v, e: f"{v} of {e} experts no longer learning (starved gradients)",
    "fragile_routing": lambda v, e: f"fragile routing ({v} of tokens near a tie)",
    "balancer_override": lambda v, e: f"the balancing bias overriding {v} of the router's choices",
}
_FORMATS = {"dead_expert": "{:.0f}", "dominant_expert": "{:.0%}", "imbalance": "{:.2f}", "imbalance_trend": "{:.2f}",
            "entropy_collapse": "{:.2f}", "drops": "{:.0%}", "logit_drift": "{:.3g}", "ep_straggler": "{:.2f}×",
            "expert_stalled": "{:.0f}", "fragile_routing": "{:.0%}", "balancer_override": "{:.0%}"}


def verdict(analysis: Analysis) -> str:
    """``STATUS: what is wrong, where, since when`` for an analysed run (see moewatch.detect.alerts.STATUSES)."""
    alerts = analysis.alerts
    n = len(analysis.layers)
    experts = {layer.layer: layer.num_experts for layer in analysis.layers}
    ends = {layer.layer: int(layer.series["last"][-1]) for layer in analysis.layers if len(layer.series["last"])}
    end = max(ends.values(), default=None)
    at_end = f" (step {end})" if end is not None else ""
    status = status_of(alerts)
    if status == HEALTHY and n and not ends:
        # No layer has a detector window yet: nothing was judged, so "no warning" would overclaim.
        steps = max(layer.steps for layer in analysis.layers)
        need = min(max(1, (layer.window + 1) // 2) for layer in analysis.layers)
        return (f"HEALTHY: too few steps to judge yet: {steps} recorded, the detector's first window needs {need} "
                f"(no warning so far).")
    critical = [a for a in alerts if a.severity == CRITICAL]
    warnings = [a for a in alerts if a.severity == WARNING]
    if status in (COLLAPSED, CRITICAL):
        holding = [a for a in critical if a.ongoing and (status != COLLAPSED or a.kind in COLLAPSE_KINDS)]
        rest = [a for a in critical if a.ongoing and a not in holding]
        text = (f"{status.upper()}: {_what(holding, n, experts, now=True, ends=ends)}, since step "
                f"{min(a.first_step for a in holding)}; it holds at the end{at_end}")
        if rest:
            text += f"; also {_what(rest, n, experts, now=True, ends=ends)}"
        return text + "."
    if status == RECOVERED:
        last = max(a.last_step for a in critical)
        text = (f"RECOVERED: {_what(critical, n, experts, now=False)} between steps "
                f"{min(a.first_step for a in critical)} and {last}; no critical alert holds at the end{at_end}")
        still = [a for a in warnings if a.ongoing]
        if still:
            text += f", but {_what(still, n, experts, now=True, ends=ends)} still warns"
        return text + "."
    if status == WARNING:
        still = [a for a in warnings if a.ongoing]
        shown = still or warnings
        text = (f"WARNING: {_what(shown, n, experts, now=bool(still), ends=ends)}, from step "
                f"{min(a.first_step for a in shown)}; no critical alert")
        return text + ("; it holds at the end." if still else "; cleared by the end.")
    assert status == HEALTHY
    return f"HEALTHY: no warning on any of {n} layer{'s' if n != 1 else ''}."


def _what(alerts: list[Alert], n_layers: int, experts: dict[str, int], now: bool,
          ends: dict[str, int] | None = None) -> str:
    """'25% of assignments dropped at capacity on 2 of 2 layers; 9 of 16 experts starved on 1 of 2 layers'.

    With ``now``, a kind whose every alert still holds only while its hysteresis counts down (its last breaching
    window is not its layer's last window, so the value now is back past the threshold) says so: "(clearing)".
    """
    by_kind: dict[str, list[Alert]] = {}
    for a in alerts:
        by_kind.setdefault(a.kind, []).append(a)
    parts = []
    for kind, group in by_kind.items():
        values = [a.latest if now and math.isfinite(a.latest) else a.value for a in group]
        values = [v for v in values if math.isfinite(v)]
        fmt = _FORMATS.get(kind, "{:.3g}")
        shown = sorted({fmt.format(v) for v in values}, key=lambda t: float(t.rstrip("%")))
        value = (shown[0] if len(shown) == 1 else f"{shown[0]}–{shown[-1]}") if shown else "?"
        e = sorted({experts.get(a.layer, 0) for a in group})
        layers = len({a.layer for a in group})
        word = "peak " if not now and kind not in ("nonfinite", "bias_runaway") else ""
        phrase = _PHRASES[kind](value, e[0] if len(e) == 1 else f"{e[0]}–{e[-1]}")
        clearing = now and ends is not None and all(
            a.ongoing and a.last_step < ends.get(a.layer, a.last_step) for a in group)
        parts.append(f"{word}{phrase} on {layers} of {n_layers} layer{'s' if n_layers != 1 else ''}"
                     + (" (clearing)" if clearing else ""))
    return "; ".join(parts)
