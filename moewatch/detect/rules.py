"""The alert rules: what each kind measures on a window, when it breaches, and how the alert is worded.

A rule turns window metrics into a :class:`Track`: one breach flag and one observed value per window. The engine
(engine.py) applies hysteresis to tracks and cuts them into episodes; nothing here keeps state except what the trend
fits read from the history the engine passes in. :func:`window_metrics` (the per-window metrics every rule reads,
also used by the dashboard's windowed charts on a :class:`~moewatch.detect.windows.Windows` it builds) and
:func:`describe` are public.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .alerts import CRITICAL, INFO, WARNING
from .config import DetectorConfig, LayerThresholds
from .series import Fit, forward_fill, theil_sen
from .windows import Windows

# Scalar window series kept as history for the trend fits (besides "x", the window's last step).
# moewatch.metrics.MARGIN_EPS, as words (importing metrics would import torch into the detector).
NEAR_TIE = "0.05 logit units"

TREND_SERIES = ("cv", "entropy_norm", "drop_rate", "log_logit", "bias_spread", "near_tie_frac", "override_frac")


@dataclass
class Track:
    """One condition's breach flag and observed value per window (``worse`` = +1 when higher is worse)."""

    key: str
    kind: str
    severity: str
    breach: np.ndarray
    value: np.ndarray
    threshold: float
    worse: int = 1
    experts: np.ndarray | None = None  # [W, E] bool: experts implicated in each window
    collapse: np.ndarray | None = None  # [W] projected step of collapse (trends)
    fire: int | None = None  # None: config.fire_windows
    clear: int | None = None  # None: config.clear_windows
    onset_back: int | None = None  # windows before activation where it began; None: the breach run's start


def window_metrics(win: Windows, num_experts: int, top_k: int, th: LayerThresholds, config: DetectorConfig) -> dict:
    """Per-window metrics from summed loads; CV has the part multinomial sampling noise explains removed."""
    e, k = num_experts, max(min(top_k, num_experts), 1)
    load = win.load
    assign = load.sum(axis=1)
    has = assign > 0
    safe = np.where(has, assign, 1.0)
    share = load / safe[:, None]
    mean = safe / e
    # Routing T tokens top-k uniformly at random gives E[CV^2] = (E-k)/(T*k): subtract it so a small batch that is
    # balanced reads ~0, not 1/sqrt(load per expert).
    cv2 = load.var(axis=1) / mean**2 - (e - k) / safe
    cv = np.sqrt(np.clip(cv2, 0.0, None))
    cv[~has] = np.nan
    max_share = np.where(has, share.max(axis=1), np.nan)
    argmax = share.argmax(axis=1)
    dead = (share < th.dead_share) & has[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        drop_rate = win.dropped / (win.tokens * k)
        log_logit = np.where(win.logit_abs_max > 0, np.log(win.logit_abs_max), np.nan)
    drop_rate = np.where(win.tokens > 0, drop_rate, np.nan)
    if win.bias is not None and len(win.bias):
        finite = np.isfinite(win.bias).any(axis=1)
        bmax = np.max(np.where(np.isfinite(win.bias), win.bias, -np.inf), axis=1)
        bmin = np.min(np.where(np.isfinite(win.bias), win.bias, np.inf), axis=1)
        bias_spread = np.where(finite, bmax - bmin, np.nan)
    else:
        bias_spread = np.full(len(win), np.nan)
    if win.placement is not None and len(win.placement) == e:
        from moewatch.store.placement import device_load, straggler_ratio

        device_ratio, busiest = straggler_ratio(device_load(load, win.placement))
        busiest_experts = win.placement[None, :] == busiest[:, None]  # [W, E]: the experts the busiest device holds
    else:
        device_ratio, busiest_experts = np.full(len(win), np.nan), None
    if win.dropped_e is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            expert_drop = win.dropped_e / (win.dropped_e + load)
        drop_experts = np.nan_to_num(expert_drop) >= config.drop_warning
    else:
        drop_experts = None
    return {
        "x": win.last.astype(np.float64),
        "cv": cv,
        "share": share,
        "max_share": max_share,
        "argmax": argmax,
        "dead": dead,
        "entropy_norm": win.entropy_norm,
        "drop_rate": drop_rate,
        "z_loss": win.z_loss,
        "logit_abs_max": win.logit_abs_max,
        "log_logit": log_logit,
        "nonfinite": win.nonfinite,
        "bias_spread": bias_spread,
        "drop_experts": drop_experts,
        "device_ratio": device_ratio,
        "busiest_experts": busiest_experts,
        "near_tie_frac": win.extra.get("near_tie_frac", np.full(len(win), np.nan)),
        "margin_mean": win.extra.get("margin_mean", np.full(len(win), np.nan)),
        "override_frac": win.extra.get("override_frac", np.full(len(win), np.nan)),
    }


def level_tracks(m: dict, th: LayerThresholds, config: DetectorConfig, num_experts: int) -> list[Track]:
    """Threshold rules on the current window: imbalance, dominant expert, entropy, drops, logits, non-finite."""
    n = len(m["x"])
    onehot = np.zeros((n, num_experts), bool)
    onehot[np.arange(n), m["argmax"]] = True
    cv, share, ent, drop = m["cv"], m["max_share"], m["entropy_norm"], m["drop_rate"]
    with np.errstate(invalid="ignore"):
        return [
            Track("imbalance/w", "imbalance", WARNING, cv >= th.cv_warning, cv, th.cv_warning),
            Track("imbalance/c", "imbalance", CRITICAL, cv >= th.cv_critical, cv, th.cv_critical),
            Track("dominant/w", "dominant_expert", WARNING, share >= th.dominant_warning, share,
                  th.dominant_warning, experts=onehot),
            Track("dominant/c", "dominant_expert", CRITICAL, share >= th.dominant_critical, share,
                  th.dominant_critical, experts=onehot),
            Track("entropy/c", "entropy_collapse", CRITICAL, ent <= config.entropy_critical, ent,
                  config.entropy_critical, worse=-1),
            Track("drops/c", "drops", CRITICAL, drop >= config.drop_critical, drop, config.drop_critical,
                  experts=m["drop_experts"]),
            Track("nonfinite", "nonfinite", CRITICAL, m["nonfinite"] > 0, m["nonfinite"], 0.0, fire=1),
            *ep_tracks(m, config),
        ]


def ep_tracks(m: dict, config: DetectorConfig) -> list[Track]:
    """Expert-parallel stragglers: the busiest device's load over the mean device load (runs with a placement)."""
    if m["busiest_experts"] is None:
        return []
    ratio = m["device_ratio"]
    with np.errstate(invalid="ignore"):
        return [
            Track("ep/w", "ep_straggler", WARNING, ratio >= config.ep_warning, ratio, config.ep_warning,
                  experts=m["busiest_experts"]),
            Track("ep/c", "ep_straggler", CRITICAL, ratio >= config.ep_critical, ratio, config.ep_critical,
                  experts=m["busiest_experts"]),
        ]


def stall_flags(win: Windows, config: DetectorConfig) -> np.ndarray | None:
    """[W, E] experts whose gradient norm is under ``stall_fraction`` of the layer's median expert's in the window
    (None without gradient norms). A window where the median itself is 0 or unknown flags nobody."""
    g = win.grad_norm
    if g is None:
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        median = np.nanmedian(np.where(np.isfinite(g), g, np.nan), axis=1, keepdims=True)
        return (g < config.stall_fraction * median) & (median > 0) & np.isfinite(g)


def stall_tracks(stalled_run: np.ndarray, config: DetectorConfig) -> list[Track]:
    """An expert that stopped learning: its gradient starved ``stall_windows`` windows in a row (already debounced)."""
    stuck = stalled_run >= config.stall_windows
    count = stuck.sum(axis=1).astype(np.float64)
    return [Track("stalled/w", "expert_stalled", WARNING, count >= 1, count, 1.0, experts=stuck, fire=1, clear=1,
                  onset_back=config.stall_windows - 1)]


def dead_tracks(active: np.ndarray, starved_run: np.ndarray, th: LayerThresholds, config: DetectorConfig) -> list[Track]:
    """Layer-level dead-expert tracks from the per-expert hysteresis state (already debounced, so fire at once).

    A starved expert is an info until it has been starved ``dead_warning_windows`` windows in a row
    (``starved_run``: each expert's run of starved windows, carried across batches by the hysteresis state):
    balancing pulls an expert back after a dip, a dead one stays dead.
    """
    count = active.sum(axis=1).astype(np.float64)
    back = config.fire_windows - 1
    stuck = active & (starved_run >= config.dead_warning_windows)
    stuck_count = stuck.sum(axis=1).astype(np.float64)
    return [
        Track("dead/i", "dead_expert", INFO, count >= 1, count, 1.0, experts=active, fire=1, clear=1,
              onset_back=back),
        Track("dead/w", "dead_expert", WARNING, stuck_count >= 1, stuck_count, 1.0, experts=stuck, fire=1, clear=1,
              onset_back=config.dead_warning_windows - 1),
        Track("dead/c", "dead_expert", CRITICAL, count >= th.dead_critical, count, float(th.dead_critical),
              experts=active, fire=1, clear=1, onset_back=back),
    ]


def trend_tracks(
    hist: dict[str, np.ndarray],
    g0: int,
    n_new: int,
    th: LayerThresholds,
    config: DetectorConfig,
    new: dict,
) -> list[Track]:
    """Robust-slope rules over history + new windows, merged with their level counterparts where they share a kind.

    ``hist`` holds the series for the last windows before and including the new ones (global window index of its
    first element: ``g0``); results are for the last ``n_new`` windows.
    """
    lo_rise = config.trend_min_rise
    specs = {
        # name: (series, direction, target, must be beyond this level, min change over the fit)
        "cv": ("cv", 1, th.cv_critical, config.trend_min_level * th.cv_warning, lo_rise * th.cv_critical),
        "entropy": ("entropy_norm", -1, config.entropy_critical, config.entropy_trend_below, lo_rise),
        "drops": ("drop_rate", 1, config.drop_critical, config.trend_min_level * config.drop_warning,
                  lo_rise * config.drop_critical),
        "logit": ("log_logit", 1, math.log(config.logit_abs_warning), math.log(config.logit_floor),
                  math.log1p(config.logit_min_growth)),
    }
    routing = {
        "fragile": ("near_tie_frac", 1, config.fragile_warning, config.fragile_trend_floor,
                    lo_rise * config.fragile_warning),
        "override": ("override_frac", 1, config.override_warning, config.override_trend_floor,
                     lo_rise * config.override_warning),
    }
    # The routing diagnostics are fitted only where a router recorded them (most runs before schema 2: none).
    specs.update({k: v for k, v in routing.items() if np.isfinite(hist[v[0]]).any()})
    results = {name: _multiscale(hist, g0, n_new, config, *spec) for name, spec in specs.items()}
    bias = _multiscale_bias(hist, g0, n_new, th, config)

    cv_b, cv_v, cv_c = results["cv"]
    en_b, _, en_c = results["entropy"]
    dr_b, _, dr_c = results["drops"]
    lg_b, _, lg_c = results["logit"]
    ent, drop, logit = new["entropy_norm"], new["drop_rate"], new["logit_abs_max"]
    with np.errstate(invalid="ignore"):
        return [
            Track("imbalance_trend", "imbalance_trend", WARNING, cv_b & ~(new["cv"] >= th.cv_critical), cv_v,
                  th.cv_critical, collapse=cv_c),
            Track("entropy/w", "entropy_collapse", WARNING, (ent <= config.entropy_warning) | en_b, ent,
                  config.entropy_warning, worse=-1, collapse=en_c),
            Track("drops/w", "drops", WARNING, (drop >= config.drop_warning) | dr_b, drop, config.drop_warning,
                  experts=new["drop_experts"], collapse=dr_c),
            Track("logit", "logit_drift", WARNING, (logit >= config.logit_abs_warning) | lg_b, logit,
                  config.logit_abs_warning, collapse=lg_c),
            Track("bias", "bias_runaway", WARNING, bias[0], bias[1], config.bias_min_growth),
            *_routing_tracks(results, hist, n_new, th, config, new),
        ]


def _routing_tracks(results: dict, hist: dict, n_new: int, th: LayerThresholds, config: DetectorConfig,
                    new: dict) -> list[Track]:
    """fragile_routing: near-tie share high or rising toward it; balancer_override: override share high or rising
    toward it while the imbalance it should fix does not fall (its CV is not below what it was a fit ago)."""
    out = []
    with np.errstate(invalid="ignore"):
        if "fragile" in results:
            b, _, c = results["fragile"]
            ntf = new["near_tie_frac"]
            out.append(Track("fragile", "fragile_routing", WARNING, (ntf >= config.fragile_warning) | b, ntf,
                             config.fragile_warning, collapse=c))
        if "override" in results:
            b, _, c = results["override"]
            ovr = new["override_frac"]
            cv = hist["cv"]
            lag = config.trend_windows
            then = np.r_[np.full(lag, np.nan), cv[:-lag]][-n_new:] if len(cv) > lag else np.full(n_new, np.nan)
            not_falling = ~(cv[-n_new:] < then - config.trend_min_rise * th.cv_critical)
            out.append(Track("override", "balancer_override", WARNING,
                             ((ovr >= config.override_warning) | b) & not_falling, ovr, config.override_warning,
                             collapse=c))
    return out


def _projection(f: Fit, recent: np.ndarray, config: DetectorConfig, direction: int, target: float, start: float,
                min_change: float):
    """Breach where the fit moves steadily toward ``target`` and would cross it within the horizon.

    ``recent`` is the last fitted point's actual value: a line fitted across a hump that has already come down
    extrapolates to a level the run left long ago, so the actual value must be past ``start`` as well.
    """
    d = direction
    with np.errstate(invalid="ignore", divide="ignore"):
        steady = (d * f.slope > 0) & ((f.up if d > 0 else f.down) >= config.trend_consistency)
        moved = d * (f.last - f.first) >= min_change
        level_ok = (d * (f.last - start) >= 0) & (d * (recent - start) >= 0) & (d * (target - f.last) > 0)
        eta = (target - f.last) / f.slope
        soon = eta <= config.trend_horizon * f.span
    plausible = steady & moved & level_ok
    return plausible & soon, f.last, eta, plausible


def _scale_blocks(hist: dict[str, np.ndarray], g0: int, n_new: int, s: int, m: int, names: tuple[str, ...]):
    """Block means at scale ``s`` (blocks of ``s`` windows aligned to global window index multiples of ``s``).

    Only the blocks that the fits still needed use are returned: fits ending inside the new windows, plus the last
    one before them (its verdict holds into the first new windows). Returns (position of each fit's last window
    relative to the new windows, block mean x, block last x, block means per name), or None with too few blocks.
    """
    total = len(hist["x"])
    a = (-g0) % s
    nb = (total - a) // s
    if nb < m:
        return None
    pos = a + (np.arange(nb) + 1) * s - 1 - (total - n_new)
    before = np.flatnonzero(pos[m - 1 :] < 0)
    j0 = m - 1 + (int(before[-1]) if len(before) else 0)
    b0 = j0 - (m - 1)
    cut = slice(a + b0 * s, a + nb * s)
    x = hist["x"][cut].reshape(nb - b0, s)
    return pos[j0:], x.mean(axis=1), x[:, -1], {n: hist[n][cut].reshape(nb - b0, s).mean(axis=1) for n in names}


def _multiscale(hist, g0, n_new, config, name, direction, target, start, min_change):
    """Projection rule on Theil-Sen fits of ``name`` at every scale; OR the breaches over scales.

    The projected step is the earliest over every scale with a steady, plausible trend, not only the scales that
    fired: a coarse fit that reaches back before the onset fires first but underestimates the slope, while the fine
    scale already sees the real one. Fits are computed only where the latest point is past ``start`` (a condition
    of both), which on a healthy layer is almost nowhere.
    """
    m = config.trend_windows
    breach = np.zeros(n_new, bool)
    level = np.full(n_new, np.nan)
    eta_step = np.full(n_new, np.inf)
    for s in config.trend_scales:
        blocks = _scale_blocks(hist, g0, n_new, s, m, (name,))
        if blocks is None:
            continue
        pos, xb, xe, yb = blocks
        recent = yb[name][m - 1 :]
        with np.errstate(invalid="ignore"):
            rows = np.flatnonzero(direction * (recent - start) >= 0)
        if not len(rows):
            continue
        fit = theil_sen(xb, yb[name], m, rows)
        b_r, lvl_r, eta_r, plausible = _projection(fit, recent[rows], config, direction, target, start, min_change)
        # Back to one verdict per fit position; a position that was no candidate is a plain "no".
        b = np.zeros(len(pos), bool)
        lvl = np.full(len(pos), np.nan)
        when = np.full(len(pos), np.inf)
        b[rows], lvl[rows] = b_r, lvl_r
        when[rows] = xe[m - 1 :][rows] + np.where(plausible, eta_r, np.inf)
        bf = forward_fill(pos, b, n_new, False).astype(bool)
        lf = forward_fill(pos, lvl, n_new, np.nan)
        wf = forward_fill(pos, when, n_new, np.inf)
        level = np.where(bf & ~breach, lf, level)
        eta_step = np.minimum(eta_step, wf)
        breach |= bf
    collapse = np.where(breach & np.isfinite(eta_step), eta_step, np.nan)
    return breach, level, collapse


def _multiscale_bias(hist, g0, n_new, th: LayerThresholds, config: DetectorConfig):
    """Bias spread growing steadily while the imbalance it should fix does not fall."""
    m = config.trend_windows
    breach = np.zeros(n_new, bool)
    value = np.full(n_new, np.nan)
    if not np.isfinite(hist["bias_spread"]).any():
        return breach, value
    for s in config.trend_scales:
        blocks = _scale_blocks(hist, g0, n_new, s, m, ("bias_spread", "cv"))
        if blocks is None:
            continue
        pos, xb, _, yb = blocks
        floor = config.trend_min_level * th.cv_warning
        with np.errstate(invalid="ignore"):
            b = (yb["cv"][m - 1 :] >= floor) & np.isfinite(yb["bias_spread"][m - 1 :])
        rows = np.flatnonzero(b)
        growth = np.full(len(b), np.nan)
        if len(rows):
            fb = theil_sen(xb, yb["bias_spread"], m, rows)
            fc = theil_sen(xb, yb["cv"], m, rows)
            with np.errstate(invalid="ignore"):
                # Relative to where the fit started, but a spread starting at 0 (bias just enabled) must not read
                # as infinite growth: the base is at least a tenth of the current spread.
                base = np.maximum(np.abs(fb.first), np.maximum(0.1 * np.abs(fb.last), 1e-9))
                growth[rows] = (fb.last - fb.first) / base
                b[rows] = (
                    (fb.slope > 0)
                    & (fb.up >= config.trend_consistency)
                    & (growth[rows] >= config.bias_min_growth)
                    & (fc.last >= fc.first - config.trend_min_rise * th.cv_critical)
                    & (fc.last >= floor)
                )
        bf = forward_fill(pos, b, n_new, False).astype(bool)
        value = np.where(bf & ~breach, forward_fill(pos, growth, n_new, np.nan), value)
        breach |= bf
    return breach, value


def describe(kind: str, layer: str, experts: tuple[int, ...], value: float, threshold: float, first_step: int,
             collapse_step: int | None, num_experts: int, config: DetectorConfig, *, latest: float = math.nan,
             peak_step: int | None = None, ongoing: bool = False, last_step: int | None = None) -> str:
    """The alert's one-sentence message: what, where, since when, its latest value and its peak (each named)."""
    who = _experts_text(experts)
    fair = 1.0 / max(num_experts, 1)

    def vals(fmt: str, worst: str = "peak") -> str:
        # "27.8% now, peak 81.3% at step 40": the latest window's value first, named, then the episode's worst.
        peak = f"{worst} {fmt.format(value)}" + (f" at step {peak_step}" if peak_step is not None else "")
        if not math.isfinite(latest):
            return peak
        now = fmt.format(latest) + (" now" if ongoing else
                                    f" when it ended at step {last_step}" if last_step is not None else " at its end")
        return now + (f" (its {worst})" if fmt.format(latest) == fmt.format(value) else f", {peak}")

    if kind == "dead_expert":
        peak = f"peak {int(value)} of {num_experts} at once" + (f" at step {peak_step}" if peak_step is not None else "")
        if ongoing and math.isfinite(latest):
            return (f"{int(latest)} of {num_experts} experts in {layer} get under {config.dead_share:.0%} of their fair "
                    f"share of tokens now, since step {first_step} ({peak}; {who} over the episode).")
        return (f"Experts in {layer} got under {config.dead_share:.0%} of their fair share of tokens from step "
                f"{first_step} to {last_step} ({peak}; {who} over the episode).")
    if kind == "dominant_expert":
        lead = (f"{who.capitalize()} in {layer} took turns at the top" if len(experts) > 1
                else f"{who.capitalize()} in {layer} takes the largest share")
        return (f"{lead} of assignments from step {first_step} (fair share {fair:.1%}, threshold "
                f"{threshold:.1%}): {vals('{:.1%}')}.")
    if kind == "imbalance":
        return (f"Expert load in {layer} is imbalanced from step {first_step} (threshold CV {threshold:.2f}): "
                f"CV {vals('{:.2f}')}.")
    if kind == "imbalance_trend":
        when = f"around step {collapse_step}" if collapse_step is not None else "soon"
        return (f"Load imbalance in {layer} has been rising steadily since step {first_step} (CV "
                f"{vals('{:.2f}')}) and projects to cross the collapse threshold {threshold:.2f} {when}.")
    if kind == "entropy_collapse":
        trend = f"; projected to reach collapse around step {collapse_step}" if collapse_step is not None else ""
        return (f"Router entropy in {layer} (as a fraction of its maximum) is low from step {first_step} (alert "
                f"level {threshold:.3f}): {vals('{:.3f}', 'lowest')}{trend}.")
    if kind == "drops":
        return (f"{layer} drops assignments at capacity from step {first_step} (threshold {threshold:.1%} of "
                f"assignments): {vals('{:.1%}')}" + (f"; mostly at {who}." if experts else "."))
    if kind == "logit_drift":
        return (f"Router logits in {layer} keep growing from step {first_step} (warning level {threshold:.3g}): "
                f"max |logit| {vals('{:.3g}')}.")
    if kind == "nonfinite":
        return (f"Non-finite (NaN/inf) router logits in {layer} from step {first_step} (NaN/inf values per window): "
                f"{vals('{:.0f}')}.")
    if kind == "bias_runaway":
        return (f"The spread of the balancing bias in {layer} keeps growing ({vals('+{:.0%}')} over the trend fit) "
                f"while the load imbalance does not fall, from step {first_step}.")
    if kind == "fragile_routing":
        return (f"Routing in {layer} is fragile from step {first_step}: a large share of tokens is within "
                f"{NEAR_TIE} of choosing different experts (threshold {threshold:.0%}: "
                f"{vals('{:.0%}')}). Near-ties turn into load flips.")
    if kind == "balancer_override":
        return (f"The balancing bias in {layer} changes a growing share of the router's choices from step "
                f"{first_step} (threshold {threshold:.0%} of assignments: {vals('{:.0%}')}) while the imbalance it "
                f"fights does not fall: a collapse held back by force.")
    if kind == "expert_stalled":
        now = f"{int(latest)} now, " if ongoing and math.isfinite(latest) else ""
        return (f"{who.capitalize()} in {layer} stopped learning from step {first_step}: gradient norm under "
                f"{config.stall_fraction:.0%} of the layer's median expert's for {config.stall_windows} windows in "
                f"a row ({now}peak {int(value)} of {num_experts} at once). A starved expert's gradient fades "
                f"before its load reaches zero.")
    if kind == "ep_straggler":
        loss = f"{1 - 1 / value:.0%}" if value > 1 else "none"
        return (f"The busiest expert-parallel device of {layer} (holding {who}) carries more than its share from "
                f"step {first_step} (its load over the mean device load, threshold {threshold:.2f}×: "
                f"{vals('{:.2f}×')}): each step waits on it, so about {loss} of the layer's expert throughput is "
                f"lost at the peak.")
    raise ValueError(f"no message for alert kind {kind!r}")


def _experts_text(experts: tuple[int, ...], limit: int = 8) -> str:
    if not experts:
        return "no single expert"
    head = ", ".join(str(e) for e in experts[:limit])
    more = f" and {len(experts) - limit} more" if len(experts) > limit else ""
    return ("expert " if len(experts) == 1 else "experts ") + head + more
