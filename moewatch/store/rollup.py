"""Rollups: exact pre-summed blocks of every layer's expert counts, kept beside the per-step rows so that what is
coarser than a step (the detector's windows) reads ten times fewer rows.

``write_rollups(run_dir)`` sums the run's global view (all ranks, resumed steps de-duplicated: the one reader,
``moewatch.store.dense``) over blocks of ``BLOCK`` consecutive recorded steps of each layer, counted from the
layer's first recorded step, and keeps the layer's first ``HEAD`` steps per step (the detector sizes its windows
from them). Counts are additive, so a block is the exact sum of its steps; the bias is the value at the block's last
step. Per-expert gradient norms (schema 2) roll up as a sum over the block's recorded steps and their number, so a
window's mean norm (the detector's ``expert_stalled``) is exact too; gate mass (additive) is summed like the counts.
One file, ``rollups/experts-b<BLOCK>.parquet``, written atomically; its metadata names the part files it was
computed from (``moewatch.rollup``), and a reader uses it only while those are still exactly the run's live parts:
any new flush, resumed session or compaction makes it stale, and readers then fall back to the per-step rows until
the next ``moewatch compact`` (which writes rollups) brings it up to date.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moewatch.store.manifest import atomic_write_bytes
from moewatch.store.schema import EXPERTS, LAYERS, RANKS_DIR

BLOCK = 10
HEAD = 1000
FOLDER = "rollups"
KEY = b"moewatch.rollup"
_SCHEMA = pa.schema([
    pa.field("layer", pa.string()),
    pa.field("head", pa.bool_()),  # True: one of the layer's first HEAD steps, per step; False: a block
    pa.field("index", pa.int64()),  # block number, or step index for head rows
    pa.field("expert", pa.int32()),
    pa.field("tokens", pa.int64()),
    pa.field("dropped", pa.int64()),
    pa.field("bias", pa.float64()),
    pa.field("grad_sum", pa.float64()),  # sum of the block's recorded gradient norms (null: none recorded)
    pa.field("grad_steps", pa.int32()),  # how many of the block's steps recorded one
    pa.field("gate_mass", pa.float64()),  # sum of the combine weights the expert's assignments got (null: none)
])
VERSION = 2  # 1: counts, drops and bias only (read as stale: the next compact rewrites it)
NULLABLE = ("grad_sum", "grad_steps", "gate_mass")  # null where the run records none: read as 0


@dataclass
class Blocks:
    """One layer's rollup: ``tokens``/``dropped``/``bias`` are ``[blocks, E]``, ``head`` ``[min(S, HEAD), E]``;
    ``grad_sum``/``grad_steps`` ``[blocks, E]`` when the run records gradient norms, ``gate_mass`` when it records
    combine weights."""

    block: int
    tokens: np.ndarray
    dropped: np.ndarray | None
    bias: np.ndarray | None
    head: np.ndarray
    grad_sum: np.ndarray | None = None
    grad_steps: np.ndarray | None = None
    gate_mass: np.ndarray | None = None


def path_for(run_dir: Path, block: int = BLOCK) -> Path:
    return Path(run_dir) / FOLDER / f"experts-b{block}.parquet"


def fingerprint(run_dir: Path) -> str:
    """The live part files (names and sizes) and rank manifests a rollup is computed from, as one string."""
    from moewatch.store.reader import part_files

    items: list[list] = []
    for table in (EXPERTS, LAYERS):
        for f in part_files(run_dir, table):
            items.append([table, f.name, f.stat().st_size])
    ranks = Path(run_dir) / RANKS_DIR
    if ranks.is_dir():
        items.extend([RANKS_DIR, f.name, f.stat().st_size] for f in sorted(ranks.glob("r*.json")))
    return json.dumps(items, separators=(",", ":"))


def write_rollups(run_dir: str | Path, block: int = BLOCK) -> Path | None:
    """Write (or refresh) the run's rollup file; None when the run has no recorded step."""
    from moewatch.store.dense import iter_dense_layers

    run_dir = Path(run_dir)
    stamp = fingerprint(run_dir)
    buf = io.BytesIO()
    writer: pq.ParquetWriter | None = None
    for d in iter_dense_layers(run_dir, skipped=[], gate=True):
        S, E = d.tokens.shape
        starts = np.arange(0, S, block)
        ends = np.minimum(starts + block, S) - 1
        tokens = np.add.reduceat(d.tokens, starts, axis=0, dtype=np.int64) if S else np.zeros((0, E), np.int64)
        dropped = None if d.dropped is None else np.add.reduceat(d.dropped, starts, axis=0, dtype=np.int64)
        bias = None if d.bias is None else d.bias[ends]
        head = d.tokens[:HEAD].astype(np.int64)
        grad = None
        if d.grad_norm is not None and S:
            ok = np.isfinite(d.grad_norm)
            grad = (np.add.reduceat(np.where(ok, d.grad_norm, 0.0), starts, axis=0, dtype=np.float64),
                    np.add.reduceat(ok, starts, axis=0, dtype=np.int32))
        gate = None if d.gate_mass is None or not S else np.add.reduceat(np.nan_to_num(d.gate_mass), starts, axis=0)
        parts = [_rows(d.layer, False, tokens, dropped, bias, grad, gate), _rows(d.layer, True, head, None, None)]
        table = pa.concat_tables(parts)
        if writer is None:
            meta = {KEY: json.dumps({"version": VERSION, "block": block, "head": HEAD, "parts": stamp}).encode()}
            writer = pq.ParquetWriter(buf, _SCHEMA.with_metadata(meta), compression="zstd")
        writer.write_table(table)
    if writer is None:
        return None
    writer.close()
    out = path_for(run_dir, block)
    out.parent.mkdir(exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    return out


def _rows(layer: str, head: bool, tokens: np.ndarray, dropped: np.ndarray | None, bias: np.ndarray | None,
          grad: tuple[np.ndarray, np.ndarray] | None = None, gate: np.ndarray | None = None) -> pa.Table:
    n, E = tokens.shape
    nulls = np.ones(n * E, bool)
    return pa.table({
        "layer": pa.array([layer] * (n * E), pa.string()),
        "head": np.full(n * E, head),
        "index": np.repeat(np.arange(n, dtype=np.int64), E),
        "expert": np.tile(np.arange(E, dtype=np.int32), n),
        "tokens": tokens.reshape(-1),
        "dropped": np.zeros(n * E, np.int64) if dropped is None else dropped.reshape(-1),
        "bias": pa.array(np.full(n * E, np.nan) if bias is None else bias.reshape(-1), pa.float64(),
                         from_pandas=True),
        "grad_sum": pa.array(np.zeros(n * E), mask=nulls) if grad is None else grad[0].reshape(-1),
        "grad_steps": pa.array(np.zeros(n * E, np.int32), mask=nulls) if grad is None else grad[1].reshape(-1),
        "gate_mass": pa.array(np.zeros(n * E), mask=nulls) if gate is None else gate.reshape(-1),
    }, schema=_SCHEMA)


class RollupReader:
    """Reads one layer's rollup at a time (its row groups only) from an up-to-date rollup file."""

    def __init__(self, path: Path, block: int):
        self.block = block
        from moewatch.store.dense import column_stats, one_value

        self._pf = pq.ParquetFile(path)
        self._groups: dict[str, list[int]] = {}
        for g, stats in enumerate(column_stats(self._pf.metadata, "layer") or []):
            if not one_value(stats):
                raise ValueError("a rollup row group mixes layers")
            self._groups.setdefault(str(stats.min), []).append(g)

    def layer(self, name: str, num_experts: int) -> Blocks | None:
        groups = self._groups.get(name)
        if not groups:
            return None
        t = self._pf.read_row_groups(groups)
        names = ("tokens", "dropped", "bias", "grad_sum", "grad_steps", "gate_mass")
        col = {c: t[c].to_numpy(zero_copy_only=False) for c in ("head", "index", "expert", *names)}
        floats = {"bias": np.float64, "grad_sum": np.float64, "gate_mass": np.float64}
        grids = {}
        for is_head in (False, True):
            rows = np.flatnonzero(col["head"] == is_head)
            n = int(col["index"][rows].max()) + 1 if len(rows) else 0
            grid = {c: np.zeros((n, num_experts), floats.get(c, np.int64)) for c in names}
            for c, arr in grid.items():
                arr[col["index"][rows], col["expert"][rows]] = np.nan_to_num(col[c][rows]) if c in NULLABLE \
                    else col[c][rows]
            grids[is_head] = grid
        blocks = grids[False]
        bias = blocks["bias"] if np.isfinite(blocks["bias"]).any() else None
        dropped = blocks["dropped"] if blocks["dropped"].any() else None
        grad = blocks["grad_steps"].any()
        gate = t["gate_mass"].null_count < len(t)
        return Blocks(self.block, blocks["tokens"], dropped, bias, grids[True]["tokens"],
                      blocks["grad_sum"] if grad else None, blocks["grad_steps"] if grad else None,
                      blocks["gate_mass"] if gate else None)


def open_rollups(run_dir: str | Path, block: int = BLOCK) -> RollupReader | None:
    """A reader of the run's rollups when its rollup file is up to date with the live parts, else None."""
    path = path_for(Path(run_dir), block)
    if not path.is_file():
        return None
    try:
        info = json.loads((pq.read_schema(path).metadata or {}).get(KEY, b"{}"))
        stale = info.get("version") != VERSION or info.get("block") != block
        if stale or info.get("parts") != fingerprint(Path(run_dir)):
            return None
        return RollupReader(path, block)
    except (OSError, pa.ArrowException, ValueError):
        return None
