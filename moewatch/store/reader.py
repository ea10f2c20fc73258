"""Reading a run: `load(path) -> Run`, with resumed steps de-duplicated and an all-ranks global view.

`load` reads run.json and the rank manifests only. A table is read in full on first access (`run.experts`, ...),
every part file (a corrupt one is skipped with a warning that names it), vectorized through pyarrow and pandas;
`run.experts_frame(layer=..., steps=..., columns=...)` reads only those rows and columns, with the layer and step
filters pushed into the Parquet reads. Rows a rank wrote after its process group's sum failed, for steps the group's
writer had already written, are left out (`superseded_rows`), so the global view counts every rank's tokens once.
"""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from moewatch.store.compact import live_parts
from moewatch.store.manifest import read_manifest, run_state
from moewatch.store.schema import (
    EVAL_EXPERTS,
    EVAL_LAYERS,
    EXPERTS,
    LAYERS,
    MANIFEST,
    RANKS_DIR,
    SCHEMA_VERSION,
    SCHEMAS,
    TABLES,
)


class RunError(ValueError):
    """A path that is not a readable moewatch run; the message is one line that says what to do."""


def part_files(run_dir: Path, table: str) -> list[Path]:
    """A table's part files to read, sorted: parts a compacted part replaces are left out (moewatch.store.compact)."""
    return live_parts(Path(run_dir) / table)


def warn_skipped(f: Path, error: Exception, skipped: list[str] | None, stacklevel: int = 2) -> None:
    """The one warning for a part file that cannot be read: given once per ``skipped`` list, which then names the
    file (every time without a list). Every reader skips such a part and goes on."""
    if skipped is not None and str(f) in skipped:
        return
    warnings.warn(f"moewatch: skipped corrupt part file {f} ({type(error).__name__}: {error})", RuntimeWarning,
                  stacklevel=stacklevel + 1)
    if skipped is not None:
        skipped.append(str(f))


def read_parts(files: list[Path], table: str, skipped: list[str] | None = None,
               columns: list[str] | None = None) -> pa.Table:
    """Concatenate part files into one table (only ``columns`` when given); a part that cannot be read is skipped
    with a warning."""
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f, schema=SCHEMAS[table], columns=columns))
        except (OSError, pa.ArrowException, ValueError) as e:
            warn_skipped(f, e, skipped)
    if not tables:
        empty = SCHEMAS[table].empty_table()
        return empty.select(columns) if columns is not None else empty
    return pa.concat_tables(tables)


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


_PAIRS = {EXPERTS: LAYERS, LAYERS: LAYERS, EVAL_EXPERTS: EVAL_LAYERS, EVAL_LAYERS: EVAL_LAYERS}
_KEYS = ["step", "layer", "rank", "session", "seq"]  # what de-duplication and the fallback rule read
_PROVENANCE = ("session", "seq")  # a sum over ranks has no single value for these: not in the global columns
# Filtered reads decode the layer column as a dictionary: comparing 2 M names as strings is what makes them slow.
_LOCAL = pafs.LocalFileSystem()
_DICT_FORMAT = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns={"layer"}))


def _pruned_groups(meta: pq.FileMetaData, names: list[str] | None, lo: int | None, hi: int | None) -> list[int]:
    """Row groups of a part that may hold rows of ``names`` (None: any layer) within steps [lo, hi]."""
    from moewatch.store.dense import column_stats, one_value

    layer_stats = column_stats(meta, "layer") or [None] * meta.num_row_groups
    step_stats = column_stats(meta, "step") or [None] * meta.num_row_groups
    wanted = None if names is None else set(names)
    out = []
    for g in range(meta.num_row_groups):
        ls, ss = layer_stats[g], step_stats[g]
        if wanted is not None and one_value(ls) and ls.min not in wanted:
            continue
        if ss is not None and ss.has_min_max and ((lo is not None and ss.max < lo) or (hi is not None and ss.min > hi)):
            continue
        out.append(g)
    return out


def _dict_schema(table: str) -> pa.Schema:
    schema = SCHEMAS[table]
    return schema.set(schema.get_field_index("layer"),
                      pa.field("layer", pa.dictionary(pa.int32(), pa.string()), nullable=False))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _listing(values: list[str], most: int = 12) -> str:
    shown = ", ".join(values[:most])
    return shown + (f", ... ({len(values)} in all)" if len(values) > most else "")


class Run:
    """A run: ``path``, ``meta`` (its run.json) and its tables as pandas DataFrames, all ranks.

    ``moewatch.load(path)`` reads only run.json and the rank manifests; each table is read in full on first access
    to ``run.experts``, ``run.layers``, ``run.eval_experts`` or ``run.eval_layers`` and then kept (corrupt parts are
    skipped with a warning and named in ``run.skipped``, resumed steps de-duplicated: the newest session wins).
    ``run.experts_frame(...)`` and ``run.layers_frame(...)`` read only the layers, steps and columns asked for.
    ``Run(path, meta, experts, layers, ...)`` built from frames holds them as given.
    """

    def __init__(self, path: Path, meta: dict[str, Any], experts: pd.DataFrame | None = None,
                 layers: pd.DataFrame | None = None, eval_experts: pd.DataFrame | None = None,
                 eval_layers: pd.DataFrame | None = None, skipped: list[str] | None = None) -> None:
        self.path = path
        self.meta = meta
        self.skipped: list[str] = [] if skipped is None else skipped
        self._frames: dict[str, pd.DataFrame | None] = {
            EXPERTS: experts, LAYERS: layers, EVAL_EXPERTS: eval_experts, EVAL_LAYERS: eval_layers}
        self._unread: set[str] = set()  # tables read from `path` on first access
        self._backed: set[str] = set()  # tables whose rows live in `path` (filtered reads read them from there)
        self._rules: list[tuple[int, int, int, float]] = []
        self._scans: dict[str, tuple[tuple[str, ...], bool, int]] = {}
        self._lock = threading.RLock()

    @classmethod
    def _lazy(cls, path: Path, meta: dict[str, Any], tables: tuple[str, ...],
              rules: list[tuple[int, int, int, float]]) -> Run:
        run = cls(path, meta)
        run._unread, run._backed, run._rules = set(tables), set(tables), rules
        return run

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        held = [f"{t}={len(f):,} rows" for t, f in self._frames.items() if f is not None and t not in self._unread]
        unread = [t for t in TABLES if t in self._unread]
        return (f"Run({str(self.path)!r}, " + ", ".join(held + ([f"not read yet: {', '.join(unread)}"] if unread
                                                                 else [])) + ")")

    # --- the tables, read in full on first access --------------------------------------------------------------
    @property
    def experts(self) -> pd.DataFrame:
        """One row per (rank, step, layer, expert): the whole table, read on first access (memory: about 90 B a row)."""
        return self._table(EXPERTS)

    @experts.setter
    def experts(self, frame: pd.DataFrame) -> None:
        self._set(EXPERTS, frame)

    @property
    def layers(self) -> pd.DataFrame:
        """One row per (rank, step, layer): the whole table, read on first access."""
        return self._table(LAYERS)

    @layers.setter
    def layers(self, frame: pd.DataFrame) -> None:
        self._set(LAYERS, frame)

    @property
    def eval_experts(self) -> pd.DataFrame:
        return self._table(EVAL_EXPERTS)

    @eval_experts.setter
    def eval_experts(self, frame: pd.DataFrame) -> None:
        self._set(EVAL_EXPERTS, frame)

    @property
    def eval_layers(self) -> pd.DataFrame:
        return self._table(EVAL_LAYERS)

    @eval_layers.setter
    def eval_layers(self, frame: pd.DataFrame) -> None:
        self._set(EVAL_LAYERS, frame)

    def _set(self, table: str, frame: pd.DataFrame) -> None:
        with self._lock:
            self._frames[table] = frame
            self._unread.discard(table)

    def _table(self, table: str) -> pd.DataFrame:
        with self._lock:
            if table in self._unread:
                self._frames[table] = self._read_all(table)
                self._unread.discard(table)
            frame = self._frames[table]
            if frame is None:
                frame = self._frames[table] = pd.DataFrame()
            return frame

    # --- what needs no table (or one column) -------------------------------------------------------------------
    @property
    def status(self) -> str:
        """running / finished / crashed; a `running` run whose heartbeat stopped long ago is reported crashed."""
        return run_state(self.meta)

    @property
    def steps(self) -> int:
        """The number of distinct steps recorded; reads only the layers table's step column when it is not held."""
        if LAYERS not in self._unread:
            layers = self.layers
            return int(layers["step"].nunique()) if not layers.empty else 0
        steps = [t["step"].to_numpy() for t in self._parts(LAYERS, ["step"])]
        return int(len(pd.unique(np.concatenate(steps)))) if steps else 0

    @property
    def layer_names(self) -> list[str]:
        """The routers listed in run.json (read from the layers table's layer column only when it lists none)."""
        names = [r["name"] for r in self.meta.get("routers", [])]
        if names:
            return names
        if LAYERS in self._unread:
            return self._data_layer_names()
        return sorted(self.layers["layer"].unique().tolist())

    def global_view(self) -> Run:
        """Counts summed across ranks per (step, layer[, expert]); layer metrics recomputed from the sums; rank -1.

        Materializes both training tables (``run.experts`` and ``run.layers``) and a summed copy of them: for a run
        too big for that, use ``experts_frame(layer=..., steps=...)``, which sums only the rows it reads."""
        layers = self.layers
        ex, ly = _sum_ranks(self.experts, layers, int(layers["rank"].nunique()) if not layers.empty else 0)
        return Run(self.path, self.meta, ex, ly, skipped=self.skipped)

    # --- filtered reads ----------------------------------------------------------------------------------------
    def experts_frame(self, layer: str | list[str] | None = None, steps: int | tuple[int | None, int | None] | None
                      = None, columns: list[str] | None = None, ranks: str = "global") -> pd.DataFrame:
        """The expert rows of ``layer`` (a name or a list of names; None: every layer) at ``steps`` (one step, or
        ``(first, last)``, both inclusive, either end None for open), with only ``columns`` (None: all), reading only
        those rows and columns from the Parquet parts (or filtering ``run.experts`` when it is already held).

        De-duplicated like ``run.experts``. ``ranks="global"`` (default) sums the ranks exactly as ``global_view()``
        does, so the result equals ``run.global_view().experts`` filtered the same way; ``ranks="each"`` keeps
        every rank's rows, as ``run.experts`` has them. Raises ValueError for an unknown layer or column, or steps
        outside the run. Rows in the order the full table has them, with a fresh index.
        """
        return self._window(EXPERTS, layer, steps, columns, ranks)

    def layers_frame(self, layer: str | list[str] | None = None, steps: int | tuple[int | None, int | None] | None
                     = None, columns: list[str] | None = None, ranks: str = "global") -> pd.DataFrame:
        """The layer rows, filtered like :meth:`experts_frame`; ``ranks="global"`` equals
        ``run.global_view().layers`` filtered (on a multi-rank run it reads the same expert rows too: the global
        cv, max_share, dead and aux_loss are recomputed from the summed counts)."""
        return self._window(LAYERS, layer, steps, columns, ranks)

    def device_load(self, layer: str, steps: int | tuple[int | None, int | None] | None = None) -> pd.DataFrame:
        """Per step, each expert-parallel device's share of ``layer``'s assignments (all ranks summed), from the
        placement run.json records (``attach(ep_size=...)`` / ``expert_placement``): one row per step (the index),
        one column per device, plus ``straggler`` (busiest device's load / mean device load: a step lasts about as
        long as its busiest device, so ``1 - 1/straggler`` of the layer's expert throughput is lost). Raises
        ValueError when the run records no placement for the layer."""
        from moewatch.store.placement import device_load, placement_for, straggler_ratio

        ex = self.experts_frame(layer, steps, columns=["step", "expert", "tokens"])
        E = int(self._num_experts(layer))
        placement = placement_for(self.meta, layer, E)
        if placement is None:
            raise ValueError(f"{self.path} records no expert placement for {layer!r} ({E} experts): pass "
                             "attach(..., ep_size=N) or expert_placement= when recording")
        grid = ex.pivot_table(index="step", columns="expert", values="tokens", aggfunc="sum", fill_value=0)
        grid = grid.reindex(columns=range(E), fill_value=0)
        load = device_load(grid.to_numpy(np.float64), placement)
        total = load.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            shares = np.where(total > 0, load / np.where(total > 0, total, 1.0), np.nan)
        out = pd.DataFrame(shares, index=grid.index, columns=[f"device{d}" for d in range(load.shape[1])])
        out["straggler"] = straggler_ratio(load)[0]
        return out

    def _num_experts(self, layer: str) -> int:
        for r in self.meta.get("routers") or []:
            if isinstance(r, dict) and r.get("name") == layer and r.get("num_experts"):
                return int(r["num_experts"])
        return int(self.layers_frame(layer, columns=["num_experts"])["num_experts"].max())

    def _window(self, table: str, layer: Any, steps: Any, columns: Any, ranks: str) -> pd.DataFrame:
        if ranks not in ("global", "each"):
            raise ValueError(f"ranks must be 'global' (summed over ranks, like global_view()) or 'each'; got {ranks!r}")
        cols = self._check_columns(table, columns, ranks)
        names = self._check_layers(layer)
        lo, hi = self._check_steps(steps)
        if ranks == "each":
            out = self._rows(table, names, lo, hi, None if cols is None else list(dict.fromkeys(cols + _KEYS)))
        else:
            n_ranks = self._rank_count()
            if n_ranks > 1:  # the sum needs both tables: layer tokens weight the experts' means, counts give cv
                ex, ly = self._rows(EXPERTS, names, lo, hi, None), self._rows(LAYERS, names, lo, hi, None)
            elif table == EXPERTS:
                ex, ly = self._rows(EXPERTS, names, lo, hi, None), pd.DataFrame()
            else:
                ex, ly = pd.DataFrame(), self._rows(LAYERS, names, lo, hi, None)
            ex, ly = _sum_ranks(ex, ly, n_ranks)
            out = ex if table == EXPERTS else ly
        return out if cols is None else out[cols]

    def _check_columns(self, table: str, columns: Any, ranks: str) -> list[str] | None:
        if columns is None:
            return None
        cols = [columns] if isinstance(columns, str) else list(columns)
        valid = [c for c in SCHEMAS[table].names if ranks == "each" or c not in _PROVENANCE]
        bad = [c for c in cols if c not in valid]
        if bad or not cols:
            what = f"unknown column {bad[0]!r}" if bad else "columns is empty"
            raise ValueError(f"{what} for {table} (ranks={ranks!r}): valid columns are {', '.join(valid)}")
        return list(dict.fromkeys(cols))

    def _check_layers(self, layer: Any) -> list[str] | None:
        if layer is None:
            return None
        names = [layer] if isinstance(layer, str) else list(layer) if isinstance(layer, (list, tuple, set)) else None
        valid = self.layer_names
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"layer must be a layer name or a list of them; got {layer!r}; this run's layers: "
                             f"{_listing(valid)}")
        unknown = [n for n in names if n not in valid]
        if unknown and self.meta.get("routers"):  # recorded, though run.json does not list it?
            seen = set(self._data_layer_names())
            unknown = [n for n in unknown if n not in seen]
        if unknown:
            raise ValueError(f"unknown layer {unknown[0]!r}: this run's layers are {_listing(valid)}")
        return list(dict.fromkeys(names))

    def _check_steps(self, steps: Any) -> tuple[int | None, int | None]:
        if steps is None:
            return None, None
        if _is_int(steps):
            lo = hi = int(steps)
        elif (isinstance(steps, (tuple, list)) and len(steps) == 2
              and all(s is None or _is_int(s) for s in steps)):
            lo, hi = (None if s is None else int(s) for s in steps)
        else:
            raise ValueError(f"steps must be a step or (first, last), both inclusive, either end None; got {steps!r}"
                             f"{self._bounds_note()}")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"steps=({lo}, {hi}) selects nothing (first > last){self._bounds_note()}")
        bounds = self._step_bounds()
        if bounds is not None and ((lo is not None and lo > bounds[1]) or (hi is not None and hi < bounds[0])):
            raise ValueError(f"steps={steps!r} is outside this run{self._bounds_note(bounds)}")
        return lo, hi

    def _bounds_note(self, bounds: tuple[int, int] | None = None) -> str:
        bounds = bounds or self._step_bounds()
        return f"; this run has steps {bounds[0]}..{bounds[1]}" if bounds else "; this run has no steps yet"

    def _step_bounds(self) -> tuple[int, int] | None:
        """First and last step of the layers table: from the part footers' statistics when it is not held."""
        if LAYERS not in self._unread:
            layers = self.layers
            return None if layers.empty else (int(layers["step"].min()), int(layers["step"].max()))
        lo, hi = None, None
        for f in part_files(self.path, LAYERS):
            try:
                meta = pq.read_metadata(f)
                j = meta.schema.to_arrow_schema().get_field_index("step")
                stats = [meta.row_group(g).column(j).statistics for g in range(meta.num_row_groups)] if j >= 0 else []
                if j < 0 or any(s is None or not s.has_min_max for s in stats):
                    step = pq.read_table(f, columns=["step"])["step"].to_numpy()
                    pairs = [(int(step.min()), int(step.max()))] if len(step) else []
                else:
                    pairs = [(int(s.min), int(s.max)) for s in stats if s.num_values]
            except (OSError, pa.ArrowException, ValueError, KeyError) as e:
                self._skip(f, e)
                continue
            for a, b in pairs:
                lo, hi = a if lo is None else min(lo, a), b if hi is None else max(hi, b)
        return None if lo is None else (lo, hi)

    def _rows(self, table: str, names: list[str] | None, lo: int | None, hi: int | None,
              columns: list[str] | None) -> pd.DataFrame:
        """Rows of ``table`` in the window, de-duplicated like the full read, in its order, with a fresh index."""
        if table not in self._unread:  # held (read, or given): filter the frame
            frame = self._table(table)
            if frame.empty:
                return frame.copy()
            mask = np.ones(len(frame), dtype=bool)
            if names is not None:
                mask &= frame["layer"].isin(names).to_numpy()
            if lo is not None:
                mask &= (frame["step"] >= lo).to_numpy()
            if hi is not None:
                mask &= (frame["step"] <= hi).to_numpy()
            out = frame.loc[mask].reset_index(drop=True)
            return out if columns is None else out[[c for c in columns if c in out.columns]]
        expr = None
        for term in ((pc.field("layer").isin(names) if names is not None else None),
                     (pc.field("step") >= lo if lo is not None else None),
                     (pc.field("step") <= hi if hi is not None else None)):
            if term is not None:
                expr = term if expr is None else expr & term
        pieces = self._parts(table, columns, expr=expr, keep_dictionary=True, prune=(names, lo, hi))
        cols = columns or SCHEMAS[table].names
        t = (pa.concat_tables(pieces) if pieces
             else pa.schema([SCHEMAS[table].field(c) for c in cols]).empty_table())
        del pieces
        if self._rules:
            t = superseded_rows(_strings(t, table), self._rules)
        if t.num_rows:
            # Repeats of a (rank, step, layer) fall in the window whole: its rows decide, as the layers table
            # decides for the full read. The run-wide answer is needed only to order a window read out of
            # (rank, step) order (the full read sorts by them when the run has repeats anywhere).
            rank, step = t["rank"].to_numpy(), t["step"].to_numpy()
            if table == _PAIRS[table]:
                repeats = repeated(rank, step, _layer_codes(t["layer"]))
            else:  # expert rows repeat whenever their layer row does: the window's layer rows decide
                repeats = self._key_scan(_PAIRS[table], expr=expr)[0]
            if not repeats and not _sorted_by(rank, step):
                repeats = self._scan(_PAIRS[table])[1]
            if repeats:
                t = newest_rows(_strings(t, table))
        t = _strings(t, table)  # cast once, after the filter: the dictionary kept the read small
        return t.to_pandas(split_blocks=True, self_destruct=True)  # frees the Arrow columns as it converts

    # --- reading parts -----------------------------------------------------------------------------------------
    def _skip(self, f: Path, e: Exception) -> None:
        """Warn about a corrupt part once per run, and name it in ``skipped``."""
        warn_skipped(f, e, self.skipped, stacklevel=5)

    def _parts(self, table: str, columns: list[str] | None, files: list[Path] | None = None,
               expr: pc.Expression | None = None, keep_dictionary: bool = False,
               prune: tuple[list[str] | None, int | None, int | None] | None = None) -> list[pa.Table]:
        """Every readable part of ``table`` (or of ``files``): ``columns`` (None: all, in schema order), the rows
        ``expr`` keeps. A filter decodes the layer column as a dictionary (then cast back to strings, for the few
        rows kept, unless ``keep_dictionary``). ``prune`` = (layers, first step, last step) of the filter: row
        groups whose statistics show none of those layers or steps are not decoded (an experts part keeps a row
        group per layer, so one layer of a long run reads a small fraction of it)."""
        out = []
        for f in part_files(self.path, table) if files is None else files:
            try:
                if prune is not None and expr is not None:
                    groups = _pruned_groups(pq.read_metadata(f), *prune)
                    if not groups:
                        continue
                    t = _DICT_FORMAT.make_fragment(str(f), filesystem=_LOCAL, row_groups=groups).to_table(
                        schema=_dict_schema(table), columns=columns, filter=expr)
                elif expr is None and not keep_dictionary:
                    t = pq.read_table(f, columns=columns, schema=SCHEMAS[table])
                else:
                    t = ds.dataset(f, schema=_dict_schema(table), format=_DICT_FORMAT).to_table(
                        columns=columns, filter=expr)
            except (OSError, pa.ArrowException, ValueError) as e:
                self._skip(f, e)
                continue
            if not keep_dictionary and pa.types.is_dictionary(t.schema.field("layer").type if "layer" in
                                                             t.column_names else pa.string()):
                i = t.column_names.index("layer")
                t = t.set_column(i, SCHEMAS[table].field("layer"), pc.cast(t["layer"], pa.string()))
            out.append(t)
        return out

    def _read_all(self, table: str) -> pd.DataFrame:
        """The whole table as today's loader read it: corrupt parts skipped, fallen-back rows the group sum holds
        dropped, and the newest recording of every (rank, step, layer) kept when some were recorded again."""
        files = part_files(self.path, table)
        pieces = self._parts(table, None, files)
        t = pa.concat_tables(pieces) if pieces else SCHEMAS[table].empty_table()
        del pieces
        if self._rules:
            t = superseded_rows(t, self._rules)
        if _PAIRS[table] == table:  # a layers table: its own repeats decide (for its experts table too)
            codes = pc.dictionary_encode(t["layer"]).combine_chunks().indices.to_numpy() if t.num_rows else None
            repeats = t.num_rows > 0 and repeated(t["rank"].to_numpy(), t["step"].to_numpy(), codes)
            ranks = len(pd.unique(t["rank"].to_numpy())) if t.num_rows else 0
            self._scans[table] = (tuple(str(f) for f in files), repeats, ranks)
        else:
            repeats = self._scan(_PAIRS[table])[1]
        return (newest_rows(t) if repeats else t).to_pandas()

    def _scan(self, table: str) -> tuple[tuple[str, ...], bool, int]:
        """(part files, whether some (rank, step, layer) was recorded twice, number of ranks) of a layers table,
        from its key columns only; kept until its part files change."""
        with self._lock:
            if table not in self._backed:  # frames given to Run(...): nothing on disk
                frame = self._table(table)
                return ((), has_repeats(frame) if not frame.empty else False,
                        int(frame["rank"].nunique()) if not frame.empty else 0)
            paths = part_files(self.path, table)
            files = tuple(str(f) for f in paths)
            if table in self._scans and self._scans[table][0] == files:  # parts are immutable: still true
                return self._scans[table]
            repeats, ranks = self._key_scan(table, paths)
            self._scans[table] = (files, repeats, ranks)
            return self._scans[table]

    def _key_scan(self, table: str, files: list[Path] | None = None,
                  expr: pc.Expression | None = None) -> tuple[bool, int]:
        """(whether some (rank, step, layer) was recorded twice, number of ranks) in a layers table's rows (those
        ``expr`` keeps), after the fallback rule; reads its key columns only."""
        cols = ["step", "layer", "rank", *(_PROVENANCE if self._rules else ())]
        pieces = self._parts(table, cols, files, expr=expr, keep_dictionary=True)
        if not pieces:
            return False, 0
        t = pa.concat_tables(pieces)
        keys = pa.table({c: (_layer_codes(t[c]) if c == "layer" else t[c].to_numpy()) for c in cols})
        if self._rules:  # the fallback rule reads (rank, session, seq, step, layer), layer as any code
            keys = superseded_rows(keys, self._rules)
        rank = keys["rank"].to_numpy()
        return repeated(rank, keys["step"].to_numpy(), keys["layer"].to_numpy()), len(pd.unique(rank))

    def _rank_count(self) -> int:
        """Ranks in the layers table (after the fallback rule), as ``global_view()`` counts them: from the part
        footers' rank statistics when they settle it, else from a scan of its key columns."""
        if LAYERS not in self._backed or LAYERS not in self._unread or self._rules:
            return self._scan(LAYERS)[2]
        ranks: set[int] = set()
        for f in part_files(self.path, LAYERS):
            try:
                meta = pq.read_metadata(f)
            except (OSError, pa.ArrowException, ValueError) as e:
                self._skip(f, e)
                continue
            j = meta.schema.to_arrow_schema().get_field_index("rank")
            for g in range(meta.num_row_groups):
                stats = meta.row_group(g).column(j).statistics if j >= 0 else None
                if stats is None or not stats.has_min_max:
                    return self._scan(LAYERS)[2]
                if stats.num_values:
                    ranks.update((int(stats.min), int(stats.max)))
        return len(ranks)

    def _data_layer_names(self) -> list[str]:
        if LAYERS not in self._unread:
            layers = self.layers
            return sorted(layers["layer"].unique().tolist()) if not layers.empty else []
        names: set[str] = set()
        for t in self._parts(LAYERS, ["layer"], keep_dictionary=True):
            for chunk in t["layer"].chunks:
                used = np.unique(chunk.indices.to_numpy())
                names.update(chunk.dictionary.take(pa.array(used)).to_pylist())
        return sorted(names)


def repeated(rank: np.ndarray, step: np.ndarray, layer_codes: np.ndarray) -> bool:
    """Whether some (rank, step, layer) occurs twice (the integer keys of ``newest_rows``)."""
    if len(step) < 2:
        return False
    step = step.astype(np.int64)
    key = np.sort((rank.astype(np.int64) << 52) | (layer_codes.astype(np.int64) << 40) | (step - step.min()))
    return bool((key[1:] == key[:-1]).any())  # (np.unique's hash path is ~10x slower here)


def _sorted_by(rank: np.ndarray, step: np.ndarray) -> bool:
    """Whether rows are in (rank, step) order (ties in any order)."""
    if len(step) < 2:
        return True
    dr, ds_ = np.diff(rank.astype(np.int64)), np.diff(step.astype(np.int64))
    return bool(np.all((dr > 0) | ((dr == 0) & (ds_ >= 0))))


def _layer_codes(column: pa.ChunkedArray) -> np.ndarray:
    """Integer codes of a layer column, string or dictionary chunks (each chunk its own dictionary)."""
    if not pa.types.is_dictionary(column.type):
        return pc.dictionary_encode(column).combine_chunks().indices.to_numpy().astype(np.int64)
    codes_of: dict[str, int] = {}
    out = []
    for chunk in column.chunks:
        lut = np.array([codes_of.setdefault(n, len(codes_of)) for n in chunk.dictionary.to_pylist()], np.int64)
        out.append(lut[chunk.indices.to_numpy()] if len(lut) else np.zeros(len(chunk), np.int64))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _strings(table: pa.Table, name: str) -> pa.Table:
    """``table`` with its layer column as strings (as the schema has it)."""
    if not pa.types.is_dictionary(table.schema.field("layer").type):
        return table
    return table.set_column(table.column_names.index("layer"), SCHEMAS[name].field("layer"),
                            pc.cast(table["layer"], pa.string()))


def _sum_ranks(experts: pd.DataFrame, layers: pd.DataFrame, ranks: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The global view of some rows of a run that has ``ranks`` ranks: ``global_frames`` when there are several,
    else the rows relabelled rank -1. ``global_view()`` and the filtered reads both go through here."""
    if layers.empty or ranks <= 1:
        return (experts.assign(rank=np.int32(-1)) if not experts.empty else experts,
                layers.assign(rank=np.int32(-1)) if not layers.empty else layers)
    return global_frames(experts, layers)


def global_frames(experts: pd.DataFrame, layers: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Combine ranks: sums for counts, token-weighted means for per-token metrics, pooled moments for logits, plain
    means (over the ranks that recorded one) for the experts' `grad_norm` and `param_norm`."""
    ly = layers.copy()
    w = ly["tokens"].astype("float64")
    n_logit = w * ly["num_experts"]
    # Each mean is weighted by the tokens of the ranks that recorded the metric: a router that hands over no
    # distribution (or no logits) records NaN, which must stay NaN, not read as an entropy (or z-loss) of 0.
    ly["_w"] = w.where(ly["entropy"].notna(), 0.0)
    ly["_wz"] = w.where(ly["z_loss"].notna(), 0.0)
    ly["_ent"] = ly["entropy"].fillna(0) * w
    ly["_z"] = ly["z_loss"].fillna(0) * w
    ly["_ls"] = ly["logit_mean"].fillna(0) * n_logit
    ly["_lsq"] = (ly["logit_std"].fillna(0) ** 2 + ly["logit_mean"].fillna(0) ** 2) * n_logit
    ly["_nl"] = n_logit.where(ly["logit_mean"].notna(), 0.0)
    routing = [c for c in _ROUTING_SUMS if c in ly.columns]
    if "margin_mean" in ly.columns and "margin_tokens" in ly.columns:
        ly["_ms"] = ly["margin_mean"].fillna(0) * ly["margin_tokens"].fillna(0)  # each rank's margin sum
    g = ly.groupby(["step", "layer"], sort=True)
    sums = {c: (c, "sum") for c in routing} | {f"_n_{c}": (c, "count") for c in routing}
    if "_ms" in ly.columns:
        sums["_ms"] = ("_ms", "sum")
    out = g.agg(tokens=("tokens", "sum"), top_k=("top_k", "first"), num_experts=("num_experts", "first"),
                dropped=("dropped", "sum"), logit_abs_max=("logit_abs_max", "max"), nonfinite=("nonfinite", "sum"),
                calls=("calls", "sum"), time=("time", "max"), _w=("_w", "sum"), _wz=("_wz", "sum"),
                _ent=("_ent", "sum"), _z=("_z", "sum"), _ls=("_ls", "sum"), _lsq=("_lsq", "sum"),
                _nl=("_nl", "sum"), **sums).reset_index()
    if "margin_hist" in ly.columns:
        out["margin_hist"] = _hist_column(group_hist_sums(ly["margin_hist"], g.ngroup().to_numpy(), len(out)))
    if routing:
        _routing_fractions(out, routing)
    out["entropy"] = out["_ent"] / out["_w"].where(out["_w"] > 0)
    out["entropy_norm"] = out["entropy"] / np.log(out["num_experts"].clip(lower=2))
    out["z_loss"] = out["_z"] / out["_wz"].where(out["_wz"] > 0)
    nl = out["_nl"].where(out["_nl"] > 0)
    out["logit_mean"] = out["_ls"] / nl
    out["logit_std"] = np.sqrt((out["_lsq"] / nl - out["logit_mean"] ** 2).clip(lower=0))

    e = experts.merge(layers[["rank", "step", "layer", "tokens"]].rename(columns={"tokens": "_lt"}),
                      on=["rank", "step", "layer"], how="left")
    e["_pw"] = e["prob_mean"].fillna(0) * e["_lt"]
    e["_w"] = e["_lt"].where(e["prob_mean"].notna(), 0)
    gate = {"gate_mass": ("gate_mass", "sum"), "_gm": ("gate_mass", "count")} if "gate_mass" in e.columns else {}
    # Norms are never summed: data-parallel ranks hold the same gradients and parameters, so each rank's row holds
    # the same norm and their mean (over the ranks that recorded one) is it. A group's rows are already exact.
    norms = {c: (c, "mean") for c in NORM_COLUMNS if c in e.columns}
    ge = e.groupby(["step", "layer", "expert"], sort=True).agg(
        tokens=("tokens", "sum"), dropped=("dropped", "sum"), _pw=("_pw", "sum"), _w=("_w", "sum"),
        bias=("bias", "mean"), **gate, **norms).reset_index()
    ge["prob_mean"] = ge["_pw"] / ge["_w"].where(ge["_w"] > 0)
    if gate:  # a sum over the ranks that recorded it; null where none did
        ge["gate_mass"] = ge["gate_mass"].where(ge["_gm"] > 0)
    ge = ge.drop(columns=[c for c in ge.columns if c.startswith("_")])
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


# Count columns of the routing diagnostics, summed over ranks (the fractions are derived from the sums).
_ROUTING_SUMS = ("margin_tokens", "overridden", "override_slots")
# Expert-learning norms: averaged over ranks (see global_frames), never summed.
NORM_COLUMNS = ("grad_norm", "param_norm")


def _routing_fractions(out: pd.DataFrame, routing: list[str]) -> None:
    """margin_mean, near_tie_frac and override_frac of summed rows from their summed counts, as the writer derives
    them (`moewatch.metrics.routing_columns`); a count no rank recorded stays null."""
    for c in routing:
        out[c] = out[c].where(out[f"_n_{c}"] > 0)
    if "margin_tokens" in routing:
        n = out["margin_tokens"].where(out["margin_tokens"] > 0)
        if "_ms" in out.columns:
            out["margin_mean"] = out["_ms"] / n
        if "margin_hist" in out.columns:
            out["near_tie_frac"] = hist_matrix(out["margin_hist"])[:, 0] / n
    if "overridden" in routing and "override_slots" in routing:
        out["override_frac"] = out["overridden"] / out["override_slots"].where(out["override_slots"] > 0)
    for c in routing:
        if out[c].notna().all():
            out[c] = out[c].astype("int64")


def hist_matrix(column: Any) -> np.ndarray:
    """A ``margin_hist`` column (Arrow list<int64>, or a pandas/numpy column of arrays and None) as a float64
    matrix ``[rows, MARGIN_BINS]``, NaN rows where it is null (not recorded, or a part written before schema 2)."""
    from moewatch.metrics import MARGIN_BINS

    if isinstance(column, pd.Series):
        column = column.array
    if not isinstance(column, (pa.Array, pa.ChunkedArray)):  # an Arrow-backed pandas column converts at no cost
        column = pa.array(column if hasattr(column, "__arrow_array__") else list(column), type=pa.list_(pa.int64()),
                          from_pandas=True)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    out = np.full((len(column), MARGIN_BINS), np.nan)
    valid = ~column.is_null().to_numpy(zero_copy_only=False)
    if valid.any():
        out[valid] = pc.list_flatten(column).to_numpy().astype(np.float64).reshape(-1, MARGIN_BINS)
    return out


def group_hist_sums(column: Any, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum ``margin_hist`` rows per group (``groups``: each row's group number): ``[n_groups, MARGIN_BINS]``, NaN
    for a group none of whose rows recorded it."""
    rows = hist_matrix(column)
    valid = ~np.isnan(rows[:, 0])
    out = np.zeros((n_groups, rows.shape[1]))
    np.add.at(out, groups[valid], rows[valid])
    seen = np.zeros(n_groups, dtype=bool)
    seen[groups[valid]] = True
    out[~seen] = np.nan
    return out


def _hist_column(matrix: np.ndarray) -> list[np.ndarray | None]:
    """Rows of a hist matrix back to the column's form as pandas reads it: int64 arrays, None for NaN rows."""
    rows: list[np.ndarray | None] = list(np.nan_to_num(matrix).astype(np.int64))
    for i in np.flatnonzero(np.isnan(matrix[:, 0])):
        rows[i] = None
    return rows


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
    """Open a run directory: reads run.json and the rank manifests only, and returns at once. The tables are read
    on first access (``run.experts``, ``run.layers``, ...) or filtered (``run.experts_frame(...)``); see docs/format.md,
    "Reading a run". ``eval=False`` leaves the evaluation tables empty. Raises RunError (one line, says what to do)
    when `path` is not a run."""
    run_dir = Path(path)
    meta = read_run_manifest(run_dir)
    tables = TABLES if eval else (EXPERTS, LAYERS)
    return Run._lazy(run_dir, meta, tables, fallback_rules(read_rank_manifests(run_dir)))
