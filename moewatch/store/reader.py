"""Reading a run: `load(path) -> Run`, with resumed steps de-duplicated and an all-ranks global view.

Reads every part file (a corrupt one is skipped with a warning that names it), vectorized through pyarrow and pandas.
Rows a rank wrote after its process group's sum failed, for steps the group's writer had already written, are left
out (`superseded_rows`), so the global view counts every rank's tokens once.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moewatch.store.manifest import read_manifest, run_state
from moewatch.store.schema import (
    EVAL_EXPERTS,
    EVAL_LAYERS,
    EXPERTS,
    LAYERS,
    MANIFEST,
    SCHEMA_VERSION,
    SCHEMAS,
)


class RunError(ValueError):
    """A path that is not a readable moewatch run; the message is one line that says what to do."""


def part_files(run_dir: Path, table: str) -> list[Path]:
    """A table's part files to read, sorted: parts a compacted part replaces are left out (moewatch.store.compact)."""
    from moewatch.store.compact import live_parts

    return live_parts(Path(run_dir) / table)


def read_parts(files: list[Path], table: str, skipped: list[str] | None = None) -> pa.Table:
    """Concatenate part files into one table; a part that cannot be read is skipped with a warning."""
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f, schema=SCHEMAS[table]))
        except (OSError, pa.ArrowException, ValueError) as e:
            msg = f"moewatch: skipped corrupt part file {f} ({type(e).__name__}: {e})"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            if skipped is not None:
                skipped.append(str(f))
    if not tables:
        return SCHEMAS[table].empty_table()
    return pa.concat_tables(tables)


RANKS_DIR = "ranks"


def read_rank_manifests(run_dir: Path) -> dict[int, dict[str, Any]]:
    """The rank manifests `ranks/r<rank>.json` of a multi-process run, by rank (unreadable ones are skipped)."""
    folder = Path(run_dir) / RANKS_DIR
    if not folder.is_dir():
        return {}
    out: dict[int, dict[str, Any]] = {}
    for f in sorted(folder.glob("r*.json")):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
            out[int(data["rank"])] = data
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def fallback_rules(ranks: dict[int, dict[str, Any]]) -> list[tuple[int, int, int, float]]:
    """(rank, session, writer, writer's first own seq) for every rank that wrote its own rows in a session whose
    process group had agreed to sum (its rows may repeat steps the writer wrote as the group's sum)."""
    rules = []
    for rank, rm in ranks.items():
        for key, entry in (rm.get("sessions") or {}).items():
            if not isinstance(entry, dict) or entry.get("aggregation") != "group" or not entry.get("agreed"):
                continue
            writer = entry.get("writer")
            if writer is None or int(writer) == rank or not entry.get("fallback"):
                continue
            w_entry = ((ranks.get(int(writer)) or {}).get("sessions") or {}).get(str(key)) or {}
            w_fallback = w_entry.get("fallback") or {}
            limit = float(w_fallback["seq"]) if w_fallback.get("seq") is not None else float("inf")
            rules.append((rank, int(key), int(writer), limit))
    return rules


def superseded_rows(table: pa.Table, rules: list[tuple[int, int, int, float]]) -> pa.Table:
    """Drop a fallen-back rank's rows at the (step, layer)s its group's writer wrote as the group's sum.

    After a failed sum a rank writes its own rows, including those of the last round it could not confirm; if the
    writer did write that round (its rows of the session below its own fallback seq), those rows are in the sum.
    """
    if not rules or table.num_rows == 0:
        return table
    rank = table["rank"].to_numpy().astype(np.int64)
    session = table["session"].to_numpy().astype(np.int64)
    seq = table["seq"].to_numpy().astype(np.int64)
    step = table["step"].to_numpy().astype(np.int64)
    layer = pc.dictionary_encode(table["layer"]).combine_chunks().indices.to_numpy().astype(np.int64)
    key = (step - step.min()) * (int(layer.max()) + 1) + layer
    drop = np.zeros(table.num_rows, dtype=bool)
    for r, sess, writer, limit in rules:
        mine = (rank == r) & (session == sess)
        if not mine.any():
            continue
        summed = (rank == writer) & (session == sess) & (seq < limit)
        drop |= mine & np.isin(key, np.unique(key[summed]))
    return table.filter(pa.array(~drop)) if drop.any() else table


def has_repeats(layers: pd.DataFrame) -> bool:
    """Whether any (rank, step, layer) was recorded more than once (a resumed run, or a step number reused)."""
    return bool(not layers.empty and layers.duplicated(["rank", "step", "layer"]).any())


def newest_rows(table: pa.Table) -> pa.Table:
    """Keep, for every (rank, step, layer), only the rows of its newest recording (largest session, then seq).

    Expert rows are written together with their layer row, so one rule serves both tables. Works on Arrow with
    integer keys: sorting, grouping or even filtering millions of rows as Python strings is what makes it slow.
    """
    if table.num_rows == 0:
        return table

    def col(name: str) -> np.ndarray:
        return table[name].to_numpy().astype(np.int64, copy=False)

    version = (col("session") << 40) | col("seq")
    layer_code = pc.dictionary_encode(table["layer"]).combine_chunks().indices.to_numpy().astype(np.int64)
    step, rank = col("step"), col("rank")
    key = (rank << 52) | (layer_code << 40) | (step - step.min())
    uniq, group = np.unique(key, return_inverse=True)
    newest = np.full(len(uniq), -1, dtype=np.int64)
    np.maximum.at(newest, group, version)
    keep = np.nonzero(version == newest[group])[0]
    order = keep[np.lexsort((step[keep], rank[keep]))]  # stable: layer/expert order within a step kept
    return table.take(order)


def to_frame(table: pa.Table, kind: str = "layers") -> pd.DataFrame:
    """A table of parts as a DataFrame with only the newest recording of every (rank, step, layer[, expert])."""
    df = table.to_pandas()
    keys = ["rank", "step", "layer", "expert"] if kind == "experts" else ["rank", "step", "layer"]
    return newest_rows(table).to_pandas() if not df.empty and df.duplicated(keys).any() else df


@dataclass
class Run:
    """A loaded run: `experts` and `layers` DataFrames (all ranks), `meta` (the manifest), `path`."""

    path: Path
    meta: dict[str, Any]
    experts: pd.DataFrame
    layers: pd.DataFrame
    eval_experts: pd.DataFrame = field(default_factory=pd.DataFrame)
    eval_layers: pd.DataFrame = field(default_factory=pd.DataFrame)
    skipped: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        """running / finished / crashed; a `running` run whose heartbeat stopped long ago is reported crashed."""
        return run_state(self.meta)

    @property
    def steps(self) -> int:
        return int(self.layers["step"].nunique()) if not self.layers.empty else 0

    @property
    def layer_names(self) -> list[str]:
        return [r["name"] for r in self.meta.get("routers", [])] or sorted(self.layers["layer"].unique().tolist())

    def global_view(self) -> Run:
        """Counts summed across ranks per (step, layer[, expert]); layer metrics recomputed from the sums; rank -1."""
        if self.layers.empty or self.layers["rank"].nunique() <= 1:
            return Run(self.path, self.meta, self.experts.assign(rank=np.int32(-1)) if not self.experts.empty
                       else self.experts, self.layers.assign(rank=np.int32(-1)) if not self.layers.empty
                       else self.layers, skipped=self.skipped)
        ex, ly = global_frames(self.experts, self.layers)
        return Run(self.path, self.meta, ex, ly, skipped=self.skipped)


def global_frames(experts: pd.DataFrame, layers: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Combine ranks: sums for counts, token-weighted means for per-token metrics, pooled moments for logits."""
    ly = layers.copy()
    w = ly["tokens"].astype("float64")
    n_logit = w * ly["num_experts"]
    ly["_w"] = w
    ly["_ent"] = ly["entropy"].fillna(0) * w
    ly["_z"] = ly["z_loss"].fillna(0) * w
    ly["_ls"] = ly["logit_mean"].fillna(0) * n_logit
    ly["_lsq"] = (ly["logit_std"].fillna(0) ** 2 + ly["logit_mean"].fillna(0) ** 2) * n_logit
    ly["_nl"] = n_logit
    g = ly.groupby(["step", "layer"], sort=True)
    out = g.agg(tokens=("tokens", "sum"), top_k=("top_k", "first"), num_experts=("num_experts", "first"),
                dropped=("dropped", "sum"), logit_abs_max=("logit_abs_max", "max"), nonfinite=("nonfinite", "sum"),
                calls=("calls", "sum"), time=("time", "max"), _w=("_w", "sum"), _ent=("_ent", "sum"),
                _z=("_z", "sum"), _ls=("_ls", "sum"), _lsq=("_lsq", "sum"), _nl=("_nl", "sum")).reset_index()
    wsum = out["_w"].where(out["_w"] > 0)
    out["entropy"] = out["_ent"] / wsum
    out["entropy_norm"] = out["entropy"] / np.log(out["num_experts"].clip(lower=2))
    out["z_loss"] = out["_z"] / wsum
    nl = out["_nl"].where(out["_nl"] > 0)
    out["logit_mean"] = out["_ls"] / nl
    out["logit_std"] = np.sqrt((out["_lsq"] / nl - out["logit_mean"] ** 2).clip(lower=0))

    e = experts.merge(layers[["rank", "step", "layer", "tokens"]].rename(columns={"tokens": "_lt"}),
                      on=["rank", "step", "layer"], how="left")
    e["_pw"] = e["prob_mean"].fillna(0) * e["_lt"]
    e["_w"] = e["_lt"].where(e["prob_mean"].notna(), 0)
    ge = e.groupby(["step", "layer", "expert"], sort=True).agg(
        tokens=("tokens", "sum"), dropped=("dropped", "sum"), _pw=("_pw", "sum"), _w=("_w", "sum"),
        bias=("bias", "mean")).reset_index()
    ge["prob_mean"] = ge["_pw"] / ge["_w"].where(ge["_w"] > 0)
    ge = ge.drop(columns=["_pw", "_w"])
    ge["rank"] = np.int32(-1)

    # Count-based layer metrics from the summed counts, one [steps*layers, E] block per expert count.
    for col in ("cv", "max_share", "dead", "aux_loss", "drop_rate"):
        out[col] = np.nan
    out = out.set_index(["step", "layer"])
    for E, block in ge.groupby(ge["layer"].map(out["num_experts"].groupby("layer").first())):
        block = block.sort_values(["step", "layer", "expert"])
        keys = block[["step", "layer"]].iloc[:: int(E)]
        counts = block["tokens"].to_numpy(np.float64).reshape(-1, int(E))
        probs = block["prob_mean"].to_numpy(np.float64).reshape(-1, int(E))
        idx = pd.MultiIndex.from_frame(keys)
        stats = count_metrics(counts, probs)
        for col, values in stats.items():
            out.loc[idx, col] = values
    out = out.reset_index()
    slots = out["tokens"] * out["top_k"]
    out["drop_rate"] = out["dropped"] / slots.where(slots > 0)
    out["dead"] = out["dead"].fillna(0).astype("int32")
    out["rank"] = np.int32(-1)
    out = out.drop(columns=[c for c in out.columns if c.startswith("_")])
    return ge, out


def count_metrics(counts_SE: np.ndarray, prob_mean_SE: np.ndarray) -> dict[str, np.ndarray]:
    """cv, max_share, dead and aux_loss from per-expert counts, in numpy (the loader's twin of moewatch.metrics)."""
    import torch

    from moewatch import metrics

    c = torch.from_numpy(counts_SE)
    p = torch.from_numpy(np.nan_to_num(prob_mean_SE))
    return {"cv": metrics.cv(c).numpy(), "max_share": metrics.max_share(c).numpy(),
            "dead": metrics.dead(c).numpy(), "aux_loss": metrics.aux_loss(c, p).numpy()}


def is_run_dir(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def find_runs(root: Path) -> list[Path]:
    """Run directories at or below `root` (found by their run.json), sorted."""
    root = Path(root)
    if is_run_dir(root):
        return [root]
    return sorted(p.parent for p in root.rglob(MANIFEST) if not any(part.startswith(".") for part in p.parts))


def read_run_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the run at `path`, checked: RunError (one line, says what to do) when it is not a run this
    moewatch can read."""
    run_dir = Path(path)
    if not run_dir.exists():
        raise RunError(f"{run_dir} does not exist: pass a run directory written by moewatch.attach")
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is not a directory: pass a run directory written by moewatch.attach")
    try:
        meta = read_manifest(run_dir)
    except FileNotFoundError:
        raise RunError(f"{run_dir} is not a moewatch run (no {MANIFEST}): pass a run directory, "
                       "or a folder of runs to `moewatch serve`/`report`") from None
    except (OSError, ValueError) as e:
        raise RunError(f"cannot read the manifest of {run_dir}: {e}") from None
    version = meta.get("schema_version")
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise RunError(f"{run_dir} uses schema version {version}, newer than this moewatch ({SCHEMA_VERSION}): "
                       "upgrade moewatch")
    return meta


def load(path: str | Path, *, eval: bool = True) -> Run:
    """Load a run directory. Raises RunError (one line, says what to do) when `path` is not a run."""
    run_dir = Path(path)
    meta = read_run_manifest(run_dir)
    skipped: list[str] = []
    frames = {}
    tables = (EXPERTS, LAYERS, EVAL_EXPERTS, EVAL_LAYERS) if eval else (EXPERTS, LAYERS)
    rules = fallback_rules(read_rank_manifests(run_dir))
    for ex, ly in ((EXPERTS, LAYERS), (EVAL_EXPERTS, EVAL_LAYERS)):
        if ly not in tables:
            continue
        ex_t = read_parts(part_files(run_dir, ex), ex, skipped)
        ly_t = read_parts(part_files(run_dir, ly), ly, skipped)
        if rules:
            ex_t, ly_t = superseded_rows(ex_t, rules), superseded_rows(ly_t, rules)
        layers = ly_t.to_pandas()
        if has_repeats(layers):
            ex_t, layers = newest_rows(ex_t), newest_rows(ly_t).to_pandas()
        frames[ex], frames[ly] = ex_t.to_pandas(), layers
    return Run(run_dir, meta, frames[EXPERTS], frames[LAYERS], frames.get(EVAL_EXPERTS, pd.DataFrame()),
               frames.get(EVAL_LAYERS, pd.DataFrame()), skipped)


