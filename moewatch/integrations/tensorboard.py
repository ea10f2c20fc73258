"""The TensorBoard bridge: per-layer router-health scalars and expert-load histograms in a TensorBoard log directory.

`TensorBoardBridge(log_dir)` is an `on_tables` sink for `moewatch.attach`: the Watch's writer thread calls it with
each flushed block of rows, so nothing here runs on the training thread. For every (step, layer) it writes

- scalars `moewatch/<layer>/<metric>` for cv, entropy_norm, max_share, dead, drop_rate, z_loss and aux_loss (the
  values of the run's `layers` table; null values, e.g. z_loss of a router without logits, are left out);
- a histogram `moewatch/<layer>/expert_load` with one bucket per expert: the x axis is the expert index (bucket
  `i` spans `i - 0.5 .. i + 0.5`) and the bucket height is the token assignments expert `i` received in the step,
  so TensorBoard's histogram tab shows the load across experts over time.

Like other TensorBoard writers in distributed training, only rank 0's rows are written by default (each rank sees its
own shard of the data; `moewatch.load(run_dir).global_view()` has the all-ranks sums); `all_ranks=True` writes each
rank to `<log_dir>/rank<k>`.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from moewatch.integrations import require
from moewatch.store.schema import LAYERS, SCHEMAS

require("tensorboard", "tensorboard", "moewatch.integrations.tensorboard")

SCALARS = ("cv", "entropy_norm", "max_share", "dead", "drop_rate", "z_loss", "aux_loss")


@dataclass(frozen=True)
class TensorBoardConfig:
    """What the bridge writes and where. Validated on construction."""

    log_dir: str | os.PathLike
    scalars: tuple[str, ...] = SCALARS
    histograms: bool = True
    prefix: str = "moewatch"
    all_ranks: bool = False

    def __post_init__(self) -> None:
        if not str(self.log_dir):
            raise ValueError("log_dir must be a directory path")
        known = set(SCHEMAS[LAYERS].names)
        unknown = [s for s in self.scalars if s not in known]
        if unknown:
            raise ValueError(f"unknown layer metrics {unknown}; pick from the `layers` table: {sorted(known)}")
        if not self.prefix or self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise ValueError(f"prefix must be a non-empty tag prefix without leading/trailing '/', got {self.prefix!r}")


class TensorBoardBridge:
    """Writes moewatch's flushed rows to TensorBoard event files; pass it as `attach(..., on_tables=bridge)`.

    The event file is created on the first block that this bridge writes (ranks that write nothing create none) and
    flushed after every block, so TensorBoard sees each step once moewatch has flushed it. Call `close()` after the
    Watch is closed (or use both as context managers, the Watch innermost).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        *,
        scalars: tuple[str, ...] = SCALARS,
        histograms: bool = True,
        prefix: str = "moewatch",
        all_ranks: bool = False,
    ):
        self.config = TensorBoardConfig(Path(log_dir), tuple(scalars), histograms, prefix, all_ranks)
        self._writers: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._closed = False

    @property
    def log_dir(self) -> Path:
        return Path(self.config.log_dir)

    def _writer(self, rank: int) -> Any:
        writer = self._writers.get(rank)
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            folder = self.log_dir / f"rank{rank}" if self.config.all_ranks else self.log_dir
            writer = SummaryWriter(log_dir=str(folder), filename_suffix=".moewatch")
            self._writers[rank] = writer
        return writer

    def __call__(self, experts: pa.Table, layers: pa.Table) -> None:
        """Write one flushed block (called by the Watch's writer thread)."""
        if layers.num_rows == 0:
            return
        with self._lock:
            if self._closed:
                return
            ly = layers.to_pandas()
            ex = experts.to_pandas() if self.config.histograms and experts.num_rows else None
            for rank, rows in ly.groupby("rank", sort=True):
                if rank != 0 and not self.config.all_ranks:
                    continue
                writer = self._writer(int(rank))
                self._write_scalars(writer, rows)
                if ex is not None:
                    self._write_histograms(writer, ex[ex["rank"] == rank], rows)
                writer.flush()

    def _write_scalars(self, writer: Any, rows: Any) -> None:
        p = self.config.prefix
        for row in rows.itertuples(index=False):
            step, walltime = int(row.step), _finite_or_none(row.time)
            for name in self.config.scalars:
                value = _finite_or_none(getattr(row, name))
                if value is not None:
                    writer.add_scalar(f"{p}/{row.layer}/{name}", value, global_step=step, walltime=walltime)

    def _write_histograms(self, writer: Any, ex: Any, rows: Any) -> None:
        p = self.config.prefix
        times = {(r.step, r.layer): _finite_or_none(r.time) for r in rows.itertuples(index=False)}
        ex = ex.sort_values(["layer", "step", "expert"], kind="stable")
        for (layer, step), g in ex.groupby(["layer", "step"], sort=False):
            counts = g["tokens"].to_numpy(np.float64)
            add_expert_load(writer, f"{p}/{layer}/expert_load", counts, int(step), times.get((step, layer)))

    def close(self) -> None:
        """Flush and close the event files; later blocks are ignored."""
        with self._lock:
            self._closed = True
            writers, self._writers = self._writers, {}
        for w in writers.values():
            w.close()

    def __enter__(self) -> TensorBoardBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorBoardBridge({str(self.log_dir)!r})"


def add_expert_load(writer: Any, tag: str, counts_E: np.ndarray, step: int, walltime: float | None = None) -> None:
    """One histogram bucket per expert: bucket `i` spans `i - 0.5 .. i + 0.5` and holds expert `i`'s assignments.

    Written as a raw histogram in which each assignment is a sample whose value is its expert index, so num/sum/
    sum_squares are that sample's statistics and min/max bound the experts that received any (TensorBoard drops
    empty edge buckets and uses min/max as the outer edges; the half-unit margin keeps every bucket one unit wide).
    """
    counts = np.asarray(counts_E, dtype=np.float64)
    idx = np.arange(len(counts), dtype=np.float64)
    hot = np.nonzero(counts > 0)[0]
    lo, hi = (float(hot[0]) - 0.5, float(hot[-1]) + 0.5) if len(hot) else (-0.5, len(counts) - 0.5)
    writer.add_histogram_raw(
        tag,
        min=lo,
        max=hi,
        num=float(counts.sum()),
        sum=float((idx * counts).sum()),
        sum_squares=float((idx * idx * counts).sum()),
        bucket_limits=(idx + 0.5).tolist(),
        bucket_counts=counts.tolist(),
        global_step=step,
        walltime=walltime,
    )


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
