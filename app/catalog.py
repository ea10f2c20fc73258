"""The runs under the served root: discovery, their ids (their paths under the root), and the cache of loaded runs.

A run's id is its path relative to the served root ("team/exp 1"; the root's own name when the root is a run), so
its page has a readable, bookmarkable URL: /run/team/exp%201 (`run_href`). Security: an id from the browser is only
ever looked up among the run directories found under the root by their run.json; it is never opened as a path, so
"../x", an absolute path or a folder that is not a run is just an unknown run.

Loaded runs are kept in memory (`RunData`), least recently used first out once they hold more than `max_bytes`;
the run list's row (steps, status, verdict sentence, load-over-time chart) survives eviction. Runs are prepared
(read, then judged by the detector) on one background thread so the run list paints at once and fills in.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from moewatch.store.manifest import read_manifest, run_state
from moewatch.store.reader import find_runs, part_files
from moewatch.store.schema import EXPERTS, LAYERS, MANIFEST

from .arrays import human_bytes
from .data import RunData
from .detection import Detection, Detector, Trend

log = logging.getLogger("moewatch.app")


class UnknownRun(KeyError):
    """An id the server did not hand out (or whose run has gone)."""

    def __str__(self) -> str:
        return ("unknown run: no run with this path under the served folder (it may have been moved or removed); "
                "open runs from the run list")


@dataclass(frozen=True)
class RunEntry:
    run_id: str
    path: Path
    name: str


@dataclass(frozen=True)
class RunSummary:
    """One row of the run list."""

    run_id: str
    name: str
    status: str
    verdict: str | None  # the detector's status: healthy | warning | recovered | critical | collapsed; None: unknown
    verdict_note: str
    steps: int | None
    model: str
    model_full: str
    shape: str  # "experts × layers"
    problem: str = ""
    sentence: str = ""  # the detector's verdict sentence
    trend: Trend = Trend()  # load over time, for the run list's chart


def run_id_for(root: Path, path: Path) -> str:
    """A run's id: its path under `root` (posix), or the root's name when the root itself is the run."""
    root = Path(root).resolve()
    p = Path(path).resolve()
    return p.relative_to(root).as_posix() if p != root else root.name


def run_href(run_id: str) -> str:
    """The run page's URL: /run/<the run's path, URL-quoted> (/run/team/exp%201)."""
    return "/run/" + quote(run_id, safe="/")


def shape_text(routers: list[dict[str, Any]]) -> str:
    """'64 × 32' (experts × layers) from the manifest's routers; a range when layers differ."""
    counts = sorted({int(r.get("num_experts") or 0) for r in routers if isinstance(r, dict)})
    if not counts:
        return "–"
    e = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    return f"{e} × {len(routers)}"


class Catalog:
    """Runs found under `root` and their cached data. Thread-safe."""

    def __init__(self, root: str | Path, *, detector: Detector | None = None, max_bytes: int = 8 << 30,
                 rescan_seconds: float = 2.0, min_refresh_seconds: float = 0.5, background: bool = True,
                 config: Any = None):
        self.root = Path(root).resolve()
        self.config = config  # the detector's thresholds (moewatch.detect.DetectorConfig; None: the defaults)
        self.detector = detector or Detector(background=background)
        self.max_bytes = max_bytes
        self.rescan_seconds = rescan_seconds
        self.min_refresh_seconds = min_refresh_seconds
        self.background = background
        self._entries: dict[str, RunEntry] = {}
        self._scanned = -1e9
        self._scan_error = ""
        self._data: OrderedDict[str, RunData] = OrderedDict()
        self._known: dict[str, _Known] = {}
        self._lock = threading.RLock()
        self._pool: ThreadPoolExecutor | None = None
        self._preparing: dict[str, Future] = {}

    # ------------------------------------------------------------------ discovery

    def entries(self, force: bool = False) -> list[RunEntry]:
        """Runs under the root, sorted by name (rescanned at most every `rescan_seconds`)."""
        with self._lock:
            if force or time.monotonic() - self._scanned >= self.rescan_seconds:
                self._scan()
            return sorted(self._entries.values(), key=lambda e: e.name)

    @property
    def scan_error(self) -> str:
        return self._scan_error

    def _scan(self) -> None:
        self._scanned = time.monotonic()
        try:
            paths = find_runs(self.root)
            self._scan_error = ""
        except OSError as e:
            self._scan_error = f"cannot list {self.root}: {e}"
            paths = []
        found = {}
        for p in paths:
            rid = run_id_for(self.root, p)
            found[rid] = RunEntry(rid, p, rid)
        for gone in set(self._entries) - set(found):
            self._data.pop(gone, None)
            self.detector.forget(gone)
        self._entries = found

    def entry(self, run_id: Any) -> RunEntry:
        if not isinstance(run_id, str):
            raise UnknownRun(run_id)
        with self._lock:
            known = self._entries.get(run_id)
            if known is None or not (known.path / MANIFEST).is_file():
                self._scan()  # a new run may have appeared, or this one was removed
            if run_id not in self._entries:
                raise UnknownRun(run_id)
            return self._entries[run_id]

    # ------------------------------------------------------------------ data

    def run(self, run_id: str, refresh: bool = True) -> RunData:
        """The run's cached data, read up to the newest part files (at most every `min_refresh_seconds`)."""
        entry = self.entry(run_id)
        with self._lock:
            data = self._data.get(run_id)
            if data is None:
                data = self._data[run_id] = RunData(entry.path, run_id)
                data.detector_config = self.config
            self._data.move_to_end(run_id)
        if refresh and (data.generation == 0 or time.monotonic() - data.last_refresh >= self.min_refresh_seconds):
            data.refresh()
            self._evict(keep=run_id)
        return data

    def loaded(self, run_id: str) -> RunData | None:
        with self._lock:
            return self._data.get(run_id)

    def _evict(self, keep: str) -> None:
        with self._lock:
            total = sum(d.nbytes for d in self._data.values())
            for rid in list(self._data):
                if total <= self.max_bytes:
                    break
                if rid == keep:
                    continue
                total -= self._data.pop(rid).nbytes
                log.info("moewatch: dropped %s from memory (cache over %s)", rid, human_bytes(self.max_bytes))

    def alerts(self, run_id: str, wait: float = 0.0) -> Detection:
        return self.detector.get(self.run(run_id), wait=wait)

    # ------------------------------------------------------------------ run list

    def prepare(self, run_id: str) -> Future | None:
        """Read and judge a run in the background (for the run list); returns the job, or None when done inline."""
        if not self.background:
            self._prepare(run_id)
            return None
        with self._lock:
            job = self._preparing.get(run_id)
            if job is not None and not job.done():
                return job
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="moewatch-prepare")
            job = self._preparing[run_id] = self._pool.submit(self._prepare, run_id)
            return job

    def _prepare(self, run_id: str) -> None:
        try:
            entry = self.entry(run_id)
            files = _part_count(entry.path)
            data = self.run(run_id)
            det = self.detector.get(data, wait=600)
            self._remember(run_id, files, data, det)
        except UnknownRun:
            pass
        except Exception:  # a broken run shows its problem in the list; it must not stop the others
            log.exception("moewatch: could not prepare run %s", run_id)

    def _remember(self, run_id: str, files: int, data: RunData, det: Detection) -> None:
        note = {"ok": "", "pending": "checking…"}.get(det.state, det.message)
        with self._lock:
            self._known[run_id] = _Known(files, data.n, det.status, note, len(data.skipped), det.sentence, det.trend)

    def summaries(self, wait: float = 0.0) -> list[RunSummary]:
        """One row per run. A run is (re)read for the list only when its part files changed since it was last
        judged, so a folder of many large runs is read once, not on every refresh. Waits up to `wait` s for jobs."""
        entries = self.entries()
        jobs = []
        for e in entries:
            data = self.loaded(e.run_id)
            if data is not None:
                data_fresh = time.monotonic() - data.last_refresh < max(self.min_refresh_seconds, 5.0)
                if data_fresh and self.detector.get(data).generation == data.generation:
                    continue
            known = self._known.get(e.run_id)
            if data is None and known is not None and known.files == _part_count(e.path):
                continue
            job = self.prepare(e.run_id)
            if job is not None:
                jobs.append(job)
        deadline = time.monotonic() + wait
        for job in jobs:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                job.result(timeout=left)
            except Exception:  # a timeout leaves the row as "checking…"
                pass
        return [self.summary(e) for e in entries]

    def summary(self, entry: RunEntry) -> RunSummary:
        data = self.loaded(entry.run_id)
        problem = ""
        meta: dict[str, Any] = {}
        if data is not None and data.meta:
            meta = data.meta
            problem = data.meta_error or ""
        else:
            try:
                meta = read_manifest(entry.path)
            except (OSError, ValueError) as e:
                problem = f"unreadable run.json: {e}"
        status = run_state(meta) if meta else "unknown"
        model_full = str(meta.get("model_class") or "–")
        known = self._known.get(entry.run_id)
        verdict, note = (known.verdict, known.note) if known else (None, "checking…")
        sentence, trend = (known.sentence, known.trend) if known else ("", Trend())
        steps = known.steps if known else None
        skipped = known.skipped if known else 0
        if data is not None:
            det = self.detector.get(data)
            steps, skipped = data.n, len(data.skipped)
            if det.state != "pending" or known is None:
                verdict, sentence, trend = det.status, det.sentence, det.trend
                note = {"ok": "", "pending": "checking…"}.get(det.state, det.message)
        if skipped:
            problem = (problem + "; " if problem else "") + f"{skipped} corrupt part file(s) skipped"
        captured = len([p for p in meta.get("problems") or [] if isinstance(p, dict)])
        if captured:
            problem = (problem + "; " if problem else "") + (
                f"{captured} capture problem{'s' if captured > 1 else ''} (see the run page)")
        return RunSummary(entry.run_id, entry.name, status, verdict, note, steps, model_full.rsplit(".", 1)[-1],
                          model_full, shape_text(meta.get("routers") or []), problem, sentence, trend)


@dataclass(frozen=True)
class _Known:
    """What the run list last learned about a run (kept when its arrays are dropped from memory)."""

    files: int
    steps: int
    verdict: str | None
    note: str
    skipped: int
    sentence: str = ""
    trend: Trend = Trend()


def _part_count(path: Path) -> int:
    return len(part_files(path, EXPERTS)) + len(part_files(path, LAYERS))
