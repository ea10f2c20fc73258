"""Writing a run: per-step accumulator snapshots -> Arrow tables -> immutable Parquet part files, off the training thread.

The training thread hands `Chunk`s (device->host copies still in flight) to a `FlushWorker` thread, which waits for the
copy, turns the sums into metrics (moewatch.metrics.finalize_layers), and writes one part file per table. A failed write
keeps the tables for the next try (bounded), so a full disk warns instead of crashing the training loop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from moewatch import metrics
from moewatch.store.manifest import atomic_write_bytes
from moewatch.store.schema import EVAL_EXPERTS, EVAL_LAYERS, EXPERTS, LAYERS, RANKS_DIR, SCHEMAS, part_bytes

log = logging.getLogger("moewatch")

# Rows kept in memory while the disk refuses writes; past this the oldest are dropped with a warning.
MAX_PENDING_ROWS = 5_000_000


@dataclass(frozen=True)
class LayerSlot:
    """Where one layer's accumulator sits in a chunk's columns."""

    name: str
    num_experts: int
    top_k: int
    has_bias: bool
    start: int
    stop: int


@dataclass
class Chunk:
    """A block of finished steps of one device's layers: `states_SX` rows are steps, columns the layers' accumulators."""

    states_SX: torch.Tensor  # host tensor (maybe still being filled by a non-blocking copy)
    ready: Any  # a torch.cuda.Event to wait for, or None
    layout: tuple[LayerSlot, ...]
    steps: list[int]
    seqs: list[int]
    times: list[float]
    calls: list[dict[str, int]]  # per step: router calls per layer (layers with 0 calls get no rows)
    phase: str  # "train" or "eval"
    rank: int | None = None  # the rows' rank column; None: the writer's rank
    dest: str = "main"  # "main": the run's tables; "ranks": the per-rank tables under ranks/ (attach(per_rank=True))


def chunk_to_tables(chunk: Chunk, rank: int, session: int) -> tuple[pa.Table, pa.Table]:
    """The Arrow tables (experts, layers) for one chunk; vectorized per layer, no per-row Python."""
    states = chunk.states_SX.double()
    steps = np.asarray(chunk.steps, dtype=np.int64)
    seqs = np.asarray(chunk.seqs, dtype=np.int64)
    times = np.asarray(chunk.times, dtype=np.float64)
    ex_parts: list[dict[str, np.ndarray]] = []
    ly_parts: list[dict[str, np.ndarray]] = []
    for slot in chunk.layout:
        ran = np.asarray([c.get(slot.name, 0) for c in chunk.calls], dtype=np.int32)
        keep = ran > 0
        if not keep.any():
            continue
        idx = np.nonzero(keep)[0]
        S, E = len(idx), slot.num_experts
        out = metrics.finalize_layers(states[idx, slot.start : slot.stop], E, slot.top_k, slot.has_bias)
        ex, ly = out["experts"], out["layer"]
        ex_parts.append(
            {
                "step": np.repeat(steps[idx], E),
                "layer": np.full(S * E, slot.name, dtype=object),
                "expert": np.tile(np.arange(E, dtype=np.int32), S),
                "tokens": ex["tokens"].round().long().reshape(-1).numpy(),
                "dropped": ex["dropped"].round().long().reshape(-1).numpy(),
                "prob_mean": ex["prob_mean"].reshape(-1).numpy(),
                "bias": ex["bias"].reshape(-1).numpy(),
                "gate_mass": ex["gate_mass"].reshape(-1).numpy(),
                "grad_norm": ex["grad_norm"].reshape(-1).numpy(),
                "param_norm": ex["param_norm"].reshape(-1).numpy(),
                "seq": np.repeat(seqs[idx], E),
            }
        )
        layer_cols = {k: v.numpy() for k, v in ly.items()}
        ly_parts.append(
            {
                "step": steps[idx],
                "layer": np.full(S, slot.name, dtype=object),
                "top_k": np.full(S, slot.top_k, dtype=np.int32),
                "num_experts": np.full(S, E, dtype=np.int32),
                **layer_cols,
                "tokens": np.rint(layer_cols["tokens"]).astype(np.int64),
                "dropped": np.rint(layer_cols["dropped"]).astype(np.int64),
                "dead": layer_cols["dead"].astype(np.int32),
                "nonfinite": np.rint(layer_cols["nonfinite"]).astype(np.int64),
                "calls": ran[idx],
                "time": times[idx],
                "seq": seqs[idx],
            }
        )
    return _table(ex_parts, SCHEMAS[EXPERTS], rank, session), _table(ly_parts, SCHEMAS[LAYERS], rank, session)


def _table(parts: list[dict[str, np.ndarray]], schema: pa.Schema, rank: int, session: int) -> pa.Table:
    if not parts:
        return schema.empty_table()
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    n = len(cols["step"])
    # Layers rows step-major (training order). Expert rows layer-major, steps in order within a layer, so a part has
    # a row group per layer (`part_bytes`) and a reader of a few layers skips the others' row groups unread.
    layer_pos = np.concatenate([np.full(len(p["step"]), i) for i, p in enumerate(parts)])
    keys = (cols["expert"], cols["seq"], layer_pos) if "expert" in cols else (layer_pos, cols["seq"])
    order = np.lexsort(keys)
    cols = {k: v[order] for k, v in cols.items()}
    cols["rank"] = np.full(n, rank, dtype=np.int32)
    cols["session"] = np.full(n, session, dtype=np.int32)
    arrays = []
    for field in schema:
        v = cols[field.name]
        if pa.types.is_list(field.type):
            arrays.append(count_lists(v))
        elif pa.types.is_floating(field.type) or v.dtype.kind == "f":
            # NaN -> null (a count column computed in float64 holds whole numbers; rint keeps the cast exact)
            arrays.append(pa.array(v if pa.types.is_floating(field.type) else np.rint(v), type=field.type,
                                   from_pandas=True))
        else:
            arrays.append(pa.array(v, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def count_lists(counts_NH: np.ndarray) -> pa.Array:
    """Rows of float64 counts [N, H] as a list<int64> column, a row with NaN as null (not recorded)."""
    n, h = counts_NH.shape
    null_N = np.isnan(counts_NH).any(axis=1)
    values = np.rint(np.nan_to_num(counts_NH)).astype(np.int64).reshape(-1)
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * h)
    return pa.ListArray.from_arrays(offsets, pa.array(values), mask=pa.array(null_N) if null_N.any() else None)




class PartWriter:
    """Immutable part files `<table>/r<rank>-s<session>-<n>.parquet`, each written atomically."""

    def __init__(self, run_dir: Path, rank: int, session: int):
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.session = session
        self.count = 0

    def write(self, table_name: str, table: pa.Table) -> Path:
        folder = self.run_dir / table_name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"r{self.rank:04d}-s{self.session:04d}-{self.count:08d}.parquet"
        atomic_write_bytes(path, part_bytes(table))
        self.count += 1
        return path


class FlushWorker(threading.Thread):
    """Background thread: waits for device copies, computes metrics, writes parts, beats the heartbeat."""

    def __init__(
        self,
        writer: PartWriter,
        heartbeat: Callable[[], None] | None,
        heartbeat_seconds: float,
        on_tables: Callable[[pa.Table, pa.Table], None] | None = None,
        rank_writer: PartWriter | None = None,
    ):
        super().__init__(name="moewatch-flush", daemon=True)
        self.writer = writer
        self.writers = {"main": writer, RANKS_DIR: rank_writer or PartWriter(writer.run_dir / RANKS_DIR,
                                                                            writer.rank, writer.session)}
        self.heartbeat = heartbeat
        self.heartbeat_seconds = heartbeat_seconds
        self.on_tables = on_tables
        self.jobs: queue.Queue[Chunk | None | threading.Event] = queue.Queue()
        self.pending: list[tuple[PartWriter, str, pa.Table]] = []
        self.errors = 0
        self._warned_disk = False
        self._last_beat = 0.0

    # -- called from the training thread (or the rank reducer)
    def submit(self, chunk: Chunk) -> None:
        self.jobs.put(chunk)

    def set_session(self, session: int) -> None:
        """The session in part names (a process group agrees on one); call before anything is submitted."""
        for w in self.writers.values():
            w.session = session

    def drain(self, timeout: float | None = None) -> bool:
        """Block until everything submitted so far is written (or failed); True if it finished in time."""
        done = threading.Event()
        self.jobs.put(done)
        return done.wait(timeout)

    def stop(self, timeout: float | None = None) -> None:
        self.jobs.put(None)
        self.join(timeout)

    # -- the thread
    def run(self) -> None:
        while True:
            try:
                job = self.jobs.get(timeout=self.heartbeat_seconds)
            except queue.Empty:
                self._beat(force=True)
                continue
            if job is None:
                self._write_pending()
                return
            if isinstance(job, threading.Event):
                self._write_pending()
                self._beat(force=True)
                job.set()
                continue
            try:
                self._convert(job)
            except Exception as e:  # never let a bad chunk kill the thread (and with it all later writes)
                warnings.warn(f"moewatch: could not convert recorded steps ({type(e).__name__}: {e}); skipped",
                              RuntimeWarning, stacklevel=1)
            self._write_pending()
            self._beat()

    def _convert(self, chunk: Chunk) -> None:
        if chunk.ready is not None:
            chunk.ready.synchronize()
        writer = self.writers["main" if chunk.dest == "main" else RANKS_DIR]
        experts, layers = chunk_to_tables(chunk, writer.rank if chunk.rank is None else chunk.rank, writer.session)
        names = (EXPERTS, LAYERS) if chunk.phase == "train" else (EVAL_EXPERTS, EVAL_LAYERS)
        # The layers part first: a crash between the two writes then leaves steps whose expert rows are missing
        # (read as no counts, by every reader alike), never expert rows without their steps, which a resume would
        # record again.
        if layers.num_rows:
            self.pending.append((writer, names[1], layers))
        if experts.num_rows:
            self.pending.append((writer, names[0], experts))
        if chunk.dest == "main" and chunk.phase == "train" and self.on_tables is not None and layers.num_rows:
            try:
                self.on_tables(experts, layers)
            except Exception as e:
                warnings.warn(f"moewatch: an on_tables callback failed ({type(e).__name__}: {e})",
                              RuntimeWarning, stacklevel=1)

    def _write_pending(self) -> None:
        while self.pending:
            writer, name, table = self.pending[0]
            try:
                writer.write(name, table)
            except OSError as e:
                self.errors += 1
                if not self._warned_disk:
                    self._warned_disk = True
                    warnings.warn(
                        f"moewatch: could not write to {self.writer.run_dir} ({e}); keeping recorded steps in memory "
                        "and retrying at the next flush", RuntimeWarning, stacklevel=1)
                self._bound_pending()
                return
            self.pending.pop(0)
        self._warned_disk = False

    def _bound_pending(self) -> None:
        rows = sum(t.num_rows for _, _, t in self.pending)
        while rows > MAX_PENDING_ROWS and len(self.pending) > 1:
            _, _, t = self.pending.pop(0)
            rows -= t.num_rows
            log.warning("moewatch: dropped %d unwritten rows: the disk has refused writes too long", t.num_rows)

    def _beat(self, force: bool = False) -> None:
        if self.heartbeat is None:
            return
        now = time.time()
        if force or now - self._last_beat >= self.heartbeat_seconds:
            self._last_beat = now
            try:
                self.heartbeat()
            except OSError:
                pass  # the next flush retries; a missed heartbeat is not worth a warning
