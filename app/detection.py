"""The detector's judgement of each run, computed off the request threads: the one health computation behind the
verdict badge, the verdict sentence, the alerts panel, the model-overview strip and the run list's chart.

The detector (moewatch.detect) is imported lazily: when it is missing or broken the dashboard still serves charts
and the panels say detection is unavailable. It judges the run directory as `moewatch report` does
(`moewatch.detect.analyze_run`: streamed layer by layer, from rollups where they are up to date), so the page and
the report cannot disagree and the dashboard never holds every layer's counts. The whole
`Analysis` is kept, with what the page draws from it (`analysis.health()`, the verdict sentence, the run list's
load-over-time series), all computed once per run generation on the detector's thread.

Results are cached per run generation (a live run is re-judged after new parts, at most every `min_interval` s).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .data import RunData

DETECT_BUDGET = 256 << 20  # bytes of dense counts the dashboard's detector holds at once

log = logging.getLogger("moewatch.app")

UNAVAILABLE = "unavailable"
PENDING = "pending"
OK = "ok"
ERROR = "error"

# Bars of the run list's load-over-time chart, at most (windows are merged by their maximum past that).
TREND_POINTS = 60


@dataclass(frozen=True)
class Trend:
    """The run list's load over time: per group of detector windows, the largest expert's load relative to the fair
    share on the worst layer (max over layers), and the health level there (0 healthy, 1 warning, 2 critical,
    3 collapsed), merged by their maximum. Plain tuples: it is kept after the run's arrays are dropped."""

    first: tuple[int, ...] = ()
    last: tuple[int, ...] = ()
    ratio: tuple[float, ...] = ()
    level: tuple[int, ...] = ()
    warmup: tuple[bool, ...] = ()

    def __len__(self) -> int:
        return len(self.last)


@dataclass(frozen=True)
class Detection:
    """One run's detector output. `state`: ok | pending (first result not ready) | unavailable | error.

    With state ok: `analysis` is the detector's `Analysis`, `alerts` the ones to show (`analysis.shown_alerts()`),
    `health` the per layer x window frame (`analysis.health()`), `sentence` the verdict sentence and `trend` the run
    list's chart.
    """

    state: str
    analysis: Any = None
    alerts: tuple[Any, ...] = ()
    health: Any = None
    sentence: str = ""
    trend: Trend = field(default_factory=Trend)
    message: str = ""
    generation: int = -1
    seconds: float = 0.0

    @property
    def status(self) -> str | None:
        """healthy | warning | recovered | critical | collapsed (the detector's); None when there is no result."""
        return self.analysis.status if self.state == OK and self.analysis is not None else None

    def layer(self, name: str) -> Any:
        """The detector's `LayerResult` for layer `name`, or None."""
        if self.analysis is None:
            return None
        return next((r for r in self.analysis.layers if r.layer == name), None)


def run_detector(run: RunData) -> Any:
    """The detector's `Analysis` of `run`; raises ImportError when the detector is not installed."""
    from moewatch.detect import analyze_run

    # A smaller budget than the report's: the server holds the page's layers too, and a pass reads only its layers'
    # row groups, so more passes cost little.
    return analyze_run(run.path, getattr(run, "detector_config", None), budget_bytes=DETECT_BUDGET)


def judge(run: RunData, generation: int = -1, seconds_from: float | None = None) -> Detection:
    """Everything the page needs from one detector pass over `run`."""
    from moewatch.detect.verdict import verdict

    t0 = time.perf_counter() if seconds_from is None else seconds_from
    analysis = run_detector(run)
    health = analysis.health()
    return Detection(OK, analysis, tuple(analysis.shown_alerts()), health, verdict(analysis),
                     trend_of(health), generation=generation,
                     seconds=time.perf_counter() - t0)


def cell_level(health: Any) -> np.ndarray:
    """Colour level of each health row: 0 healthy, 1 warning, 2 critical (not a collapse), 3 collapsed."""
    level = np.asarray(health["level"], dtype=np.int8)
    return level + (np.asarray(health["status"]) == "collapsed").astype(np.int8)


def trend_of(health: Any, points: int = TREND_POINTS) -> Trend:
    """The run list's chart from a health frame (see `Trend`)."""
    if health is None or len(health) == 0:
        return Trend()
    E = health["num_experts"].to_numpy(np.float64)
    ratio = np.nan_to_num(health["max_share"].to_numpy(np.float64) * E, nan=0.0)
    level = cell_level(health)
    end = health["end_step"].to_numpy(np.int64)
    start = health["start_step"].to_numpy(np.int64)
    warm = health["warmup"].to_numpy(bool)
    # Windows of all layers ordered by their end, grouped by the same end step (layers usually share windows).
    order = np.lexsort((start, end))
    end, start, ratio, level, warm = end[order], start[order], ratio[order], level[order], warm[order]
    cut = np.flatnonzero(np.r_[True, end[1:] != end[:-1]])
    n = len(cut)
    g = max(1, -(-n // points))
    groups = cut[::g]
    return Trend(
        first=tuple(int(v) for v in np.minimum.reduceat(start, groups)),
        last=tuple(int(v) for v in np.maximum.reduceat(end, groups)),
        ratio=tuple(round(float(v), 3) for v in np.maximum.reduceat(ratio, groups)),
        level=tuple(int(v) for v in np.maximum.reduceat(level, groups)),
        warmup=tuple(bool(v) for v in np.logical_and.reduceat(warm, groups)),
    )


@dataclass
class Detector:
    """Runs the detector on one background thread (so two cores are not both busy with it) and caches results."""

    background: bool = True
    min_interval: float = 2.0
    slow_factor: float = 5.0  # a run is re-judged at most every slow_factor x its last judgement's duration
    _results: dict[str, Detection] = field(default_factory=dict)
    _pending: dict[str, Future] = field(default_factory=dict)
    _last: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pool: ThreadPoolExecutor | None = None

    def get(self, run: RunData, wait: float = 0.0) -> Detection:
        """The latest result for `run` (maybe of an older generation while a newer one is computed)."""
        key = run.run_id or str(run.path)
        with self._lock:
            have = self._results.get(key)
            fresh = have is not None and have.generation == run.generation
            # A slow detector (a huge live run) is re-run at most every 5x its own duration: ~20% of one core.
            wait_between = max(self.min_interval, self.slow_factor * (have.seconds if have is not None else 0.0))
            due = time.monotonic() - self._last.get(key, -1e9) >= wait_between
            if not fresh and key not in self._pending and (have is None or due or have.state != OK):
                self._last[key] = time.monotonic()
                if self.background:
                    if self._pool is None:
                        self._pool = ThreadPoolExecutor(1, thread_name_prefix="moewatch-detect")
                    self._pending[key] = self._pool.submit(self._work, key, run)
                else:
                    self._pending[key] = Future()
            future = self._pending.get(key)
        if future is not None and not self.background and not future.done():
            self._work(key, run)
        elif future is not None and wait > 0:
            try:
                future.result(timeout=wait)
            except Exception:  # recorded by _work; a timeout just means "pending"
                pass
        with self._lock:
            return self._results.get(key) or Detection(PENDING, message="checking the run for collapse…")

    def _work(self, key: str, run: RunData) -> None:
        t0 = time.perf_counter()
        with run.lock:
            generation = run.generation
        try:
            result = judge(run, generation, t0)
        except ImportError as e:
            result = Detection(UNAVAILABLE, message=f"collapse detection is unavailable ({e}); charts still work",
                               generation=generation)
        except Exception as e:  # a detector bug must not take the dashboard down
            log.exception("moewatch: detection failed for %s", run.path)
            result = Detection(ERROR, message=f"collapse detection failed on this run: {type(e).__name__}: {e}",
                               generation=generation)
        with self._lock:
            self._results[key] = result
            future = self._pending.pop(key, None)
        if future is not None and not self.background:
            future.set_result(None)

    def forget(self, key: str) -> None:
        with self._lock:
            self._results.pop(key, None)
            self._last.pop(key, None)
