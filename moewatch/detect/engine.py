"""The detector engine: per-layer state machine over windows, batch analysis of a run, and the live tracker.

:class:`LayerDetector` consumes windows in batches of any size and carries hysteresis, trend history and open
episodes between batches. A report feeds it the whole run at once (:func:`analyze_frames`); the live
:class:`AlertTracker` feeds it each flush's rows and hands back only the episodes that started, so every alert is
raised once. Both paths run the same code, so a live run and its later report agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .alerts import Alert, fold_covered, lever_for, sort_alerts, status_of
from .config import DetectorConfig, LayerThresholds
from .rules import (
    TREND_SERIES,
    Track,
    dead_tracks,
    describe,
    level_tracks,
    stall_flags,
    stall_tracks,
    trend_tracks,
    window_metrics,
)
from .series import Hysteresis, hysteresis
from .windows import (
    LayerData,
    Windows,
    bias_moves,
    layer_data_from_dense,
    layer_data_from_frames,
    make_windows,
    window_size,
)

# Kinds the warm-up grace never holds back: NaN/inf logits are a bug at any step, not a start-of-training phase.
GRACE_EXEMPT = frozenset({"nonfinite"})

# Window series kept for the report's charts and layer summary.
SERIES = ("first", "last", "cv", "max_share", "entropy_norm", "drop_rate", "z_loss", "logit_abs_max", "dead",
          "nonfinite")


@dataclass(eq=False)  # compared by identity: episodes hold arrays, and two are never the same episode
class Episode:
    """A stretch of windows where one track was active; becomes an :class:`Alert`."""

    key: str
    kind: str
    severity: str
    threshold: float
    worse: int
    first_step: int
    detected_step: int
    last_step: int
    value: float
    experts: np.ndarray | None
    collapse_step: float | None
    ongoing: bool = True
    late_step: int | None = None  # first breaching window end at or past the warm-up (see _warmup_grace)
    peak_step: int | None = None  # window end where ``value`` (the peak) was seen
    hit_value: float = math.nan  # value in the last breaching window
    tail_value: float = math.nan  # value in the latest window while the episode is active

    @property
    def latest(self) -> float:
        """The value now while ongoing (even if counting down to clear), else in its last breaching window."""
        return self.tail_value if self.ongoing and math.isfinite(self.tail_value) else self.hit_value


class LayerDetector:
    """Rule state for one layer, fed windows in order."""

    def __init__(self, layer: str, num_experts: int, top_k: int, window: int, config: DetectorConfig,
                 has_bias: bool = False, keep: bool = True) -> None:
        self.layer, self.num_experts, self.top_k, self.window = layer, num_experts, top_k, window
        self.config = config
        self.th = LayerThresholds.resolve(config, num_experts, top_k)
        self.has_bias = has_bias
        self.keep = keep
        self.windows_seen = 0
        self._hyst: dict[str, Hysteresis] = {}
        self._dead = Hysteresis.new((num_experts,))
        self._stall = Hysteresis.new((num_experts,))
        # Trend fits need m points at the coarsest scale, plus one block of slack for alignment.
        self._hist_len = config.trend_windows * max(config.trend_scales) + max(config.trend_scales)
        self._hist: dict[str, np.ndarray] = {k: np.zeros(0) for k in ("x", *TREND_SERIES)}
        # Window starts kept for dating an onset that lies before the current batch: as far back as any track reaches.
        self._back = max(config.fire_windows, config.clear_windows, config.dead_warning_windows) + 1
        self._first_hist = np.zeros(0, np.int64)
        self._open: dict[str, Episode] = {}
        self._deferred: list[Episode] = []
        self.episodes: list[Episode] = []
        self.series: dict[str, list[np.ndarray]] = {k: [] for k in (*SERIES, "share")}

    def process(self, win: Windows) -> list[Episode]:
        """Evaluate every rule on new windows; returns the episodes that started in them."""
        n = len(win)
        if n == 0:
            return []
        if win.load.shape[1] != self.num_experts:
            raise ValueError(f"layer {self.layer!r} has {win.load.shape[1]} experts, expected {self.num_experts}")
        cfg, th = self.config, self.th
        m = window_metrics(win, self.num_experts, self.top_k, th, cfg)
        g0 = self.windows_seen - len(self._hist["x"])
        hist = {k: np.concatenate([self._hist[k], m[k]]) for k in self._hist}
        dead_active, dead_run = hysteresis(m["dead"], self._dead, cfg.fire_windows, cfg.clear_windows)
        tracks = [
            *level_tracks(m, th, cfg, self.num_experts),
            *dead_tracks(dead_active, dead_run, th, cfg),
            *trend_tracks(hist, g0, n, th, cfg, m),
        ]
        stalled = stall_flags(win, cfg)
        if stalled is not None:
            _, stall_run = hysteresis(stalled, self._stall, 1, 1)
            tracks += stall_tracks(stall_run, cfg)
        firsts = np.concatenate([self._first_hist, win.first])
        offset = len(self._first_hist)
        started: list[Episode] = []
        for track in tracks:
            started.extend(self._run_track(track, win, firsts, offset))
        if cfg.warmup_steps:
            started = self._warmup_grace(started)

        self.windows_seen += n
        self._hist = {k: v[-self._hist_len :] for k, v in hist.items()}
        self._first_hist = firsts[-self._back :]
        if self.keep:
            self._keep_series(win, m, dead_active)
        return started

    def _run_track(self, t: Track, win: Windows, firsts: np.ndarray, offset: int) -> list[Episode]:
        cfg = self.config
        fire = cfg.fire_windows if t.fire is None else t.fire
        clear = cfg.clear_windows if t.clear is None else t.clear
        state = self._hyst.setdefault(t.key, Hysteresis.new())
        was = bool(state.active)
        breach = np.asarray(t.breach, bool)
        active, run = hysteresis(breach, state, fire, clear)
        n = len(active)
        prev = np.concatenate(([was], active[:-1]))
        starts = list(np.flatnonzero(active & ~prev))
        stops = list(np.flatnonzero(~active & prev))
        seg_starts = ([0] if was else []) + starts
        seg_stops = stops + ([n] if active[-1] else [])
        started = []
        for s, e in zip(seg_starts, seg_stops, strict=True):
            is_new = not (s == 0 and was)
            if is_new:
                onset = s - (int(run[s]) - 1 if t.onset_back is None else t.onset_back)
                ep = Episode(
                    key=t.key, kind=t.kind, severity=t.severity, threshold=t.threshold, worse=t.worse,
                    first_step=int(firsts[max(onset + offset, 0)]), detected_step=int(win.last[s]),
                    last_step=int(win.last[s]), value=float(t.value[s]),
                    experts=None if t.experts is None else np.zeros(self.num_experts, bool),
                    collapse_step=_finite_or_none(t.collapse[s]) if t.collapse is not None else None,
                )
                lo = max(onset, 0)
            else:
                ep = self._open[t.key]
                lo = 0
            hit = np.flatnonzero(breach[lo:e]) + lo
            if len(hit):
                vals = t.value[hit]
                ok = np.isfinite(vals)
                if ok.any():
                    fv, fs = vals[ok], win.last[hit[ok]]
                    j = int(fv.argmax() if t.worse > 0 else fv.argmin())
                    peak = float(fv[j])
                    if not math.isfinite(ep.value) or ep.peak_step is None or t.worse * (peak - ep.value) > 0:
                        ep.value, ep.peak_step = peak, int(fs[j])
                    ep.hit_value = float(fv[-1])
                ep.last_step = int(win.last[hit[-1]])
                if ep.late_step is None:
                    ends = win.last[hit]
                    late = ends[ends >= self.config.warmup_steps]
                    ep.late_step = int(late[0]) if len(late) else None
                if t.experts is not None and ep.experts is not None:
                    ep.experts |= t.experts[hit].any(axis=0)
            if e < n:
                ep.ongoing = False
                self._open.pop(t.key, None)
            else:
                now = float(t.value[n - 1])
                if math.isfinite(now):
                    ep.tail_value = now
                self._open[t.key] = ep
            if is_new:
                started.append(ep)
                if self.keep:
                    self.episodes.append(ep)
        return started

    def _warmup_grace(self, started: list[Episode]) -> list[Episode]:
        """Hold back episodes raised before ``warmup_steps``: dropped if they end without breaching past it, raised
        at the first window past it where they still breach.

        The decision rests on breaching windows only (never on an episode still counting down to clear), so a live
        tracker fed any chunks decides exactly as the report does. A released episode keeps its true onset
        (``first_step``); its ``detected_step`` becomes that window's end. An episode still held when the run ends
        stays in the batch report but is never raised live. Non-finite logits (``GRACE_EXEMPT``) are raised at once.
        """
        warm = self.config.warmup_steps
        held, out = self._deferred, []
        for ep in started:
            (held if ep.detected_step < warm and ep.kind not in GRACE_EXEMPT else out).append(ep)
        self._deferred = []
        for ep in held:
            if ep.late_step is not None:
                ep.detected_step = ep.late_step
                out.append(ep)
            elif not ep.ongoing:
                if self.keep:
                    self.episodes = [e for e in self.episodes if e is not ep]
            else:
                self._deferred.append(ep)
        return out

    def _keep_series(self, win: Windows, m: dict, dead_active: np.ndarray) -> None:
        values = {
            "first": win.first, "last": win.last, "cv": m["cv"], "max_share": m["max_share"],
            "entropy_norm": m["entropy_norm"], "drop_rate": m["drop_rate"], "z_loss": m["z_loss"],
            "logit_abs_max": m["logit_abs_max"], "dead": m["dead"].sum(axis=1), "nonfinite": m["nonfinite"],
            "share": m["share"].astype(np.float32),
        }
        for k, v in values.items():
            self.series[k].append(v)

    def to_alert(self, ep: Episode) -> Alert:
        experts = tuple(int(i) for i in np.flatnonzero(ep.experts)) if ep.experts is not None else ()
        collapse = None if ep.collapse_step is None else int(round(ep.collapse_step))
        return Alert(
            kind=ep.kind, severity=ep.severity, layer=self.layer, experts=experts, first_step=ep.first_step,
            last_step=ep.last_step, value=ep.value, threshold=ep.threshold,
            message=describe(ep.kind, self.layer, experts, ep.value, ep.threshold, ep.first_step, collapse,
                             self.num_experts, self.config, latest=ep.latest, peak_step=ep.peak_step,
                             ongoing=ep.ongoing, last_step=ep.last_step),
            lever=lever_for(ep.kind, self.has_bias), detected_step=ep.detected_step, collapse_step=collapse,
            ongoing=ep.ongoing, latest=ep.latest, peak_step=ep.peak_step,
        )

    def alerts(self) -> list[Alert]:
        return [self.to_alert(ep) for ep in self.episodes]


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


@dataclass
class LayerResult:
    """One layer's analysis: alerts, window series for charts, and the final-window summary."""

    layer: str
    num_experts: int
    top_k: int
    window: int
    steps: int
    alerts: list[Alert]
    series: dict[str, np.ndarray] = field(repr=False)

    @property
    def status(self) -> str:
        """healthy | warning | recovered | critical | collapsed: see moewatch.detect.alerts.STATUSES."""
        return status_of(self.alerts)

    def summary(self) -> dict:
        """Final-window numbers for the report table (NaN where the run has no window yet)."""
        s = self.series
        last = len(s["cv"]) - 1

        def at(name: str) -> float:
            return float(s[name][last]) if last >= 0 else math.nan

        return {
            "layer": self.layer,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "last_step": int(s["last"][last]) if last >= 0 else None,
            "cv": at("cv"),
            "entropy_norm": at("entropy_norm"),
            "max_share": at("max_share"),
            "dead": int(s["dead"][last]) if last >= 0 else 0,
            "drop_rate": at("drop_rate"),
            "z_loss": at("z_loss"),
            "status": self.status,
        }


@dataclass
class Analysis:
    """A run's judgement: per-layer results (alerts and window series) and every alert, most severe first."""

    layers: list[LayerResult]
    alerts: list[Alert]
    config: DetectorConfig = field(default_factory=DetectorConfig)
    steps: int = 0  # distinct steps recorded over all layers

    @property
    def status(self) -> str:
        """The run's status: healthy | warning | recovered | critical | collapsed (the worst of its layers')."""
        return status_of(self.alerts)

    def shown_alerts(self) -> list[Alert]:
        """The alerts to show a person: every episode except warnings a more severe alert covers (``fold_covered``).

        ``alerts`` keeps them all, as the live tracker raised them; statuses and health are the same either way.
        """
        return sort_alerts(fold_covered(self.alerts))

    def health(self) -> pd.DataFrame:
        """Per layer and detector window: level 0/1/2 and the signals behind it (see moewatch.detect.health)."""
        from .health import health_frame

        return health_frame(self)


def analyze_layer(data: LayerData, config: DetectorConfig) -> LayerResult:
    size = window_size(data, config)
    win, _ = make_windows(data, size, include_tail=True)
    det = LayerDetector(data.layer, data.tokens.shape[1], data.top_k, size, config, has_bias=bias_moves(data.bias))
    det.process(win)
    series = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in det.series.items()}
    if not det.series["share"]:
        series["share"] = np.zeros((0, data.tokens.shape[1]), np.float32)
    return LayerResult(data.layer, data.tokens.shape[1], data.top_k, size, len(data), det.alerts(), series)


def analyze(layers: Iterable[LayerData], config: DetectorConfig | None = None,
            progress: Callable[[Iterable], Iterable] | None = None) -> Analysis:
    """Run every rule on every layer (any iterable, consumed once); ``progress`` wraps it (e.g. ``tqdm``)."""
    config = config or DetectorConfig()
    # Layers are judged one at a time and only their results kept, so a stream of layers (the report reading a
    # big run layer by layer) never holds more than one layer's arrays here.
    results, steps = [], np.zeros(0, np.int64)
    for d in progress(layers) if progress else layers:
        steps = np.union1d(steps, d.steps)
        results.append(analyze_layer(d, config))
        # Dropped before the next layer is read: a layer's arrays may be views of its whole group's buffer, which the
        # reader frees before it reads the next group only when nothing holds them.
        del d
    return Analysis(results, sort_alerts([a for r in results for a in r.alerts]), config, len(steps))


def analyze_run(path, config: DetectorConfig | None = None,
                progress: Callable[[Iterable], Iterable] | None = None, budget_bytes: int | None = None) -> Analysis:
    """Judge a run directory on its all-ranks global view, streamed layer by layer (``moewatch.store.dense``):
    memory holds one group of layers' counts at a time (at most ``budget_bytes``; default
    ``moewatch.store.dense.DEFAULT_BUDGET``), never the run's long table. A layer is read from the run's rollups
    (exact block sums, when up to date) where its windows are whole blocks, else from its per-step rows."""
    from moewatch.store.dense import DEFAULT_BUDGET, iter_dense_layers
    from moewatch.store.manifest import read_manifest
    from moewatch.store.placement import placement_for

    config = config or DetectorConfig()
    budget = DEFAULT_BUDGET if budget_bytes is None else budget_bytes
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError):
        manifest = None  # no placement known: the other rules still run

    def stream():
        for dense in iter_dense_layers(path, budget, skipped=[], rollups=True):
            if dense.block != 1 and not _blocks_fit(dense, config):
                (dense,) = iter_dense_layers(path, layers=[dense.layer], skipped=[])
            data = layer_data_from_dense(dense)
            data.placement = placement_for(manifest, data.layer, data.tokens.shape[1])
            del dense
            yield data
            del data  # (see analyze: held while the next group is read, it would keep this group's buffer)

    return analyze(stream(), config, progress)


def _blocks_fit(dense, config: DetectorConfig) -> bool:
    """Whether a layer read as block sums gives the windows its per-step rows give: its window size is known from
    the stored head steps, is a whole number of blocks, and every step has its token count."""
    if len(dense.head) < min(config.window_steps, len(dense.steps)):
        return False
    if not np.isfinite(dense.stats["tokens"]).all():
        return False
    return window_size(dense.head, config) % dense.block == 0


def analyze_frames(layers: pd.DataFrame, experts: pd.DataFrame, config: DetectorConfig | None = None,
                   progress: Callable[[Iterable], Iterable] | None = None,
                   manifest: dict | None = None) -> Analysis:
    """Judge global-view tables; ``manifest`` (the run's run.json) gives the expert-parallel placement, if any."""
    from moewatch.store.placement import placement_for

    def placed():
        for data in layer_data_from_frames(layers, experts):
            data.placement = placement_for(manifest, data.layer, data.tokens.shape[1])
            yield data

    return analyze(placed(), config, progress)


def detect_frames(layers: pd.DataFrame, experts: pd.DataFrame, config: DetectorConfig | None = None) -> list[Alert]:
    """All alerts for one run's global-view tables, most severe first."""
    return analyze_frames(layers, experts, config).alerts


def detect(run, config: DetectorConfig | None = None) -> list[Alert]:
    """All alerts for a loaded run (``moewatch.load``), judged on its all-ranks global view."""
    view = run.global_view()
    return analyze_frames(view.layers, view.experts, config, manifest=run.meta).alerts


class AlertTracker:
    """Live rule evaluation: ``update`` with each flush's new rows returns the alerts that started, once each.

    Cost per update is bounded by the new rows plus a fixed history per layer (the trend fits' span), never the
    whole run. Steps at or before a layer's last seen step are ignored (a resumed run repeating steps). Rows of
    one rank are judged as they are: in multi-process training each rank's tracker sees its own share of tokens.
    """

    def __init__(self, config: DetectorConfig | None = None,
                 placement: Callable[[str, int], np.ndarray | None] | None = None) -> None:
        self.config = config or DetectorConfig()
        self.placement = placement  # (layer, num_experts) -> device of each expert, for the ep_straggler rule
        self._pending: dict[str, LayerData] = {}
        self._detectors: dict[str, LayerDetector] = {}
        self._last_step: dict[str, int] = {}

    def update(self, layers: pd.DataFrame, experts: pd.DataFrame) -> list[Alert]:
        cfg = self.config
        new: list[Alert] = []
        for data in layer_data_from_frames(layers, experts):
            name = data.layer
            last = self._last_step.get(name)
            if last is not None:
                data = data.slice(int(np.searchsorted(data.steps, last, side="right")))
            if len(data) == 0:
                continue
            if self.placement is not None:
                data.placement = self.placement(name, data.tokens.shape[1])
            self._last_step[name] = int(data.steps[-1])
            pending = self._pending.get(name)
            pending = data if pending is None else LayerData.concat(pending, data)
            det = self._detectors.get(name)
            if det is None:
                if len(pending) < cfg.window_steps:
                    self._pending[name] = pending
                    continue
                size = window_size(pending, cfg)
                det = LayerDetector(name, pending.tokens.shape[1], pending.top_k, size, cfg,
                                    has_bias=pending.bias is not None, keep=False)
                self._detectors[name] = det
            det.has_bias = det.has_bias or pending.bias is not None
            win, used = make_windows(pending, det.window, include_tail=False)
            self._pending[name] = pending.slice(used)
            new.extend(det.to_alert(ep) for ep in det.process(win))
        # Live alerts go out in the order they were raised (most severe first within one step).
        return sorted(new, key=lambda a: (a.detected_step, -a.rank, a.first_step, a.layer, a.kind))
