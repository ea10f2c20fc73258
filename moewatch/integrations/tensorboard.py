"""The TensorBoard bridge: per-layer router-health scalars and expert-load histograms in a TensorBoard log directory.

`TensorBoardBridge(log_dir)` is an `on_tables` sink for `moewatch.attach`: the Watch's writer thread calls it with
each flushed block of rows, so nothing here runs on the training thread. For every (step, layer) it writes (the rows
and names come from `moewatch.integrations.bridge`, shared with the W&B, MLflow and trackio bridges)

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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moewatch.integrations import require
from moewatch.integrations.bridge import (
    EXPERT_LOAD,
    SCALARS,
    BridgeConfig,
    StepRows,
    TrackerBridge,
    metric_key,
)

require("tensorboard", "tensorboard", "moewatch.integrations.tensorboard")

__all__ = ["SCALARS", "TensorBoardBridge", "TensorBoardConfig", "add_expert_load"]


@dataclass(frozen=True, kw_only=True)
class TensorBoardConfig(BridgeConfig):
    """What the bridge writes and where (plus the shared `BridgeConfig` fields). Validated on construction."""

    log_dir: str | os.PathLike

    def __post_init__(self) -> None:
        super().__post_init__()
        if not str(self.log_dir):
            raise ValueError("log_dir must be a directory path")


class TensorBoardBridge(TrackerBridge):
    """Writes moewatch's flushed rows to TensorBoard event files; pass it as `attach(..., on_tables=bridge)`.

    The event file is created on the first block that this bridge writes (ranks that write nothing create none) and
    flushed after every block, so TensorBoard sees each step once moewatch has flushed it. Call `close()` after the
    Watch is closed (or use both as context managers, the Watch innermost). A writer error warns once and turns the
    bridge off; training goes on.
    """

    tracker = "TensorBoard"

    def __init__(
        self,
        log_dir: str | os.PathLike,
        *,
        scalars: tuple[str, ...] = SCALARS,
        histograms: bool = True,
        prefix: str = "moewatch",
        all_ranks: bool = False,
    ):
        super().__init__(TensorBoardConfig(log_dir=Path(log_dir), scalars=tuple(scalars), histograms=histograms,
                                           prefix=prefix, all_ranks=all_ranks))
        self._writers: dict[int, Any] = {}

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

    def _log_steps(self, rows: list[StepRows]) -> None:
        used = {}
        for r in rows:
            writer = used[r.rank] = self._writer(r.rank)
            for tag, value in r.scalars.items():
                writer.add_scalar(tag, value, global_step=r.step, walltime=r.time)
            for layer, counts in r.loads.items():
                add_expert_load(writer, metric_key(self.config.prefix, layer, EXPERT_LOAD), counts, r.step, r.time)
        for writer in used.values():
            writer.flush()

    def _finish(self) -> None:
        """Flush and close the event files; later blocks are ignored."""
        writers, self._writers = self._writers, {}
        for w in writers.values():
            w.close()

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

