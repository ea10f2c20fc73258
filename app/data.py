"""The dashboard's per-run cache: one run held as dense per-layer numpy arrays, refreshed from new part files only.

A run of 100k steps x 32 layers x 64 experts is 205M expert rows: far too much as a pandas frame. Here each layer
keeps ``[steps, experts]`` int32 token counts (all ranks summed), and a few ``[steps, layers]`` columns hold per-step
sums (tokens, dropped, token-weighted entropy, ...) from which the charted metrics are derived on demand (about
1.1 GB for that run). Steps are one sorted axis shared by all layers.

The live cursor is the set of part files already read (part files are immutable and appear atomically, so a name
read once never needs reading again). New rows for (rank, step, layer) keys not seen before are added in place; a key
seen before means a resumed run re-wrote steps, and the affected step range is re-read from every part with the
loader's own de-duplication (newest session wins), so the cache always equals ``moewatch.load(path).global_view()``.

Nothing here imports dash or plotly.
"""

from __future__ import annotations

import itertools
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moewatch.store.compact import COMPACTED, replaced_by
from moewatch.store.manifest import read_manifest, run_state
from moewatch.store.reader import (
    fallback_rules,
    newest_rows,
    part_files,
    read_parts,
    read_rank_manifests,
    superseded_rows,
)
from moewatch.store.schema import EXPERTS, LAYERS

from .arrays import Rows, by_rank, count_metrics, dense_steps, part_columns

# Per-(step, layer) columns, one ``[steps, layers]`` array each. Sums (float64) combine ranks exactly; derived
# metrics come from them (entropy = ent_w / tokens, ...). cv / max_share / dead come from the layers table for
# single-rank runs (identical by construction) and are recomputed from the summed counts once a second rank shows up.
SUMS = ("tokens", "dropped", "ent_w", "z_w", "aux_w", "nonfinite")
COLS = (*SUMS, "logit_abs_max", "rows", "cv", "max_share", "dead")

# Metric series a layer view can chart, in display order.
SERIES = ("cv", "entropy_norm", "max_share", "dead", "drop_rate", "z_loss", "logit_abs_max", "aux_loss", "tokens",
          "nonfinite")

_EXPERT_COLUMNS = ["step", "layer", "expert", "tokens", "dropped", "bias", "rank"]
_LAYER_COLUMNS = ["step", "layer", "tokens", "top_k", "num_experts", "entropy", "cv", "max_share", "dead", "dropped",
                  "logit_abs_max", "z_loss", "aux_loss", "nonfinite", "rank"]

_INSTANCES = itertools.count()

# Generations of change kept for live clients; an older client just gets a full rebuild.
_DIRTY_LOG = 256


@dataclass
class Layer:
    """One router's arrays. `tokens` is ``[steps, experts]``; `bias`/`dropped` exist only if the run has them."""

    name: str
    index: int
    num_experts: int
    top_k: int
    tokens: Rows
    bias: Rows | None = None
    dropped: Rows | None = None


@dataclass
class _Batch:
    """What one refresh changed: the smallest step index touched, touched rows per layer, and a resume point."""

    first_changed: int | None = None
    recompute_from: int | None = None
    touched: dict[int, list[np.ndarray]] = field(default_factory=dict)

    def changed(self, index: int) -> None:
        self.first_changed = index if self.first_changed is None else min(self.first_changed, index)

    def collide(self, step: int) -> None:
        self.recompute_from = step if self.recompute_from is None else min(self.recompute_from, step)


class RunData:
    """A run directory held in memory for charting; `refresh()` reads the part files not read yet.

    Thread-safe: dash callbacks run on several threads, so every public method takes the run's lock.
    """

    def __init__(self, path: str | Path, run_id: str = ""):
        self.path = Path(path)
        self.run_id = run_id
        self.detector_config: Any = None  # the detector's thresholds for this run (None: the defaults)
        self.instance = next(_INSTANCES)  # tells a reloaded run from its evicted predecessor in figure caches
        self.lock = threading.RLock()
        self.meta: dict[str, Any] = {}
        self.meta_error: str | None = None
        self.generation = 0
        self.last_refresh = 0.0
        self._clear()

    def _clear(self) -> None:
        """Empty arrays and no part read (a new cache, or one rebuilt after a compaction it cannot follow)."""
        self.skipped: list[str] = []
        self._steps = Rows((), np.int64)
        self._m = {name: Rows((0,), np.float64 if name in SUMS else np.float32) for name in COLS}
        self._layers: list[Layer] = []
        self._by_name: dict[str, int] = {}
        self._presence: dict[tuple[str, int], Rows] = {}  # (table, rank) -> [steps, layers] bool
        self._read: dict[str, set[str]] = {EXPERTS: set(), LAYERS: set()}
        self._file_max_step: dict[tuple[str, str], int] = {}
        self._ranks: set[int] = set()
        self._dirty: list[tuple[int, int]] = []  # (generation, first step index changed in it)
        self._capacity = 0  # rows to allocate for arrays created later (a layer first seen mid-load)
        self._rules: list = []  # the loader's fallback rules (a multi-process run whose group sum failed)

    # ------------------------------------------------------------------ reading

    def refresh(self) -> bool:
        """Read part files not read yet (layers first: they are small and fix the step axis). True if data changed."""
        with self.lock:
            self.last_refresh = time.monotonic()
            self._read_meta()
            batch = _Batch()
            new = {table: [f for f in part_files(self.path, table) if f.name not in self._read[table]]
                   for table in (LAYERS, EXPERTS)}
            if not self._follow_compaction(new):
                self._clear()  # a compacted part mixes rows read and not read: read the run afresh
                batch.changed(0)
                new = {table: part_files(self.path, table) for table in (LAYERS, EXPERTS)}
            rules = fallback_rules(read_rank_manifests(self.path))
            if rules or self._rules:
                self._read_with_rules(new, rules, batch)
            else:
                self._reserve_for(new[LAYERS])
                for table in (LAYERS, EXPERTS):
                    for f in new[table]:
                        self._read_file(table, f, batch)
            if batch.recompute_from is not None:
                self._recompute(batch.recompute_from, batch)
            self._finish(batch)
            if batch.first_changed is None:
                return False
            self.generation += 1
            self._dirty.append((self.generation, batch.first_changed))
            del self._dirty[:-_DIRTY_LOG]
            return True

    def _reserve_for(self, files: list[Path]) -> None:
        """Size every array once for the steps the new layers parts bring (their step column is tiny to read)."""
        if len(files) < 2:
            return
        found = []
        for f in files:
            try:
                found.append(pq.read_table(f, columns=["step"])["step"].to_numpy())
            except (OSError, pa.ArrowException, ValueError, KeyError):
                continue  # reported when the part itself is read
        if not found:
            return
        steps = np.unique(np.concatenate(found))
        known = self._steps.a
        new = int((steps > known[-1]).sum()) if len(known) else len(steps)
        target = self._steps.n + new
        if self.meta.get("status") == "running":
            target += target // 8 + 1024  # headroom: the next flushes append without copying the run
        self._capacity = target
        for rows in self._all_rows():
            rows.reserve(target)

    def _read_meta(self) -> None:
        try:
            self.meta = read_manifest(self.path)
            self.meta_error = None
        except FileNotFoundError:
            self.meta_error = f"{self.path} has no run.json any more"
        except (OSError, ValueError) as e:
            # Keep the last good manifest: run.json is rewritten atomically, so this is a real problem to show.
            self.meta_error = f"cannot read run.json: {e}"
        for r in self.meta.get("routers", []) or []:
            if isinstance(r, dict) and r.get("name"):
                self._layer_for(str(r["name"]), int(r.get("num_experts") or 0), int(r.get("top_k") or 1))

    def _read_file(self, table: str, f: Path, batch: _Batch) -> None:
        self._read[table].add(f.name)
        cols = _LAYER_COLUMNS if table == LAYERS else _EXPERT_COLUMNS
        try:
            t = pq.read_table(f, columns=cols, read_dictionary=["layer"])
            arrays = part_columns(t)
        except (OSError, pa.ArrowException, ValueError, KeyError) as e:
            self._skip(f, e)
            return
        if len(arrays["step"]) == 0:
            return
        self._file_max_step[(table, f.name)] = int(arrays["step"].max())
        self._ingest(table, arrays, batch, check=True)

    def _skip(self, f: Path, error: Exception) -> None:
        """A part that cannot be read: warned about once (it is never read again) and listed on the run page."""
        msg = f"skipped corrupt part file {f.parent.name}/{f.name} ({type(error).__name__}: {error})"
        warnings.warn(f"moewatch: {msg}", RuntimeWarning, stacklevel=4)
        self.skipped.append(msg)

    def _follow_compaction(self, new: dict[str, list[Path]]) -> bool:
        """Take compacted parts whose rows are all in the cache already as read (in place of the parts they
        replace), dropping them from ``new``; False when one holds rows both read and not read."""
        for table, files in new.items():
            keep = []
            for f in files:
                replaces = replaced_by(f) if COMPACTED.match(f.name) else []
                seen = [n for n in replaces if n in self._read[table]]
                if not seen:
                    keep.append(f)
                    continue
                if len(seen) < len(replaces):
                    return False
                self._read[table].add(f.name)
                tops = [self._file_max_step.pop((table, n), None) for n in seen]
                self._read[table].difference_update(seen)
                tops = [t for t in tops if t is not None]
                if tops:
                    self._file_max_step[(table, f.name)] = max(tops)
            new[table] = keep
        return True

    def _read_with_rules(self, new: dict[str, list[Path]], rules: list, batch: _Batch) -> None:
        """A multi-process run whose group sum failed: some ranks rewrote rows the group's sum already holds, and
        only the loader's rule (`superseded_rows`, across files) tells which. Rare, so correctness over speed: the
        new parts' steps (every step when the rules changed) are re-read through that rule."""
        low = None
        for table in (LAYERS, EXPERTS):
            for f in new[table]:
                self._read[table].add(f.name)
                try:
                    steps = pq.read_table(f, columns=["step"])["step"].to_numpy()
                except (OSError, pa.ArrowException, ValueError, KeyError) as e:
                    self._skip(f, e)
                    continue
                if len(steps):
                    self._file_max_step[(table, f.name)] = int(steps.max())
                    low = int(steps.min()) if low is None else min(low, int(steps.min()))
        changed = repr(rules) != repr(self._rules)
        self._rules = rules
        if changed:
            batch.collide(-(2**62))  # every step: what the rules drop may lie anywhere
        elif low is not None:
            batch.collide(low)

    def _recompute(self, step0: int, batch: _Batch) -> None:
        """Re-read steps >= step0 from every part with the loader's de-duplication (a resumed run re-wrote them)."""
        i0 = int(np.searchsorted(self._steps.a, step0))
        for col in self._m.values():
            col.a[i0:] = 0
        for layer in self._layers:
            for rows in (layer.tokens, layer.bias, layer.dropped):
                if rows is not None:
                    rows.a[i0:] = rows.fill
        for pres in self._presence.values():
            pres.a[i0:] = False
        batch.changed(i0)
        for table in (LAYERS, EXPERTS):
            files = [self.path / table / name for (t, name), top in self._file_max_step.items()
                     if t == table and top >= step0]
            if not files:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # already reported when first read
                whole = read_parts(sorted(files), table)
            if self._rules:
                whole = superseded_rows(whole, self._rules)
            df = newest_rows(whole.filter(pc.greater_equal(whole["step"], step0))).to_pandas()
            if df.empty:
                continue
            arrays = {c: df[c].to_numpy() for c in (_EXPERT_COLUMNS if table == EXPERTS else _LAYER_COLUMNS)}
            names, codes = np.unique(df["layer"].astype(str).to_numpy(), return_inverse=True)
            arrays["layer_names"], arrays["layer"] = list(names), codes
            for col in ("bias", "entropy", "cv", "max_share", "logit_abs_max", "z_loss", "aux_loss"):
                if col in arrays:
                    arrays[col] = np.asarray(arrays[col], dtype=np.float64)
            self._ingest(table, arrays, batch, check=False)

    # ------------------------------------------------------------------ ingesting rows

    def _layer_for(self, name: str, num_experts: int, top_k: int) -> int:
        li = self._by_name.get(name)
        if li is None:
            li = len(self._layers)
            self._by_name[name] = li
            self._layers.append(Layer(name, li, num_experts, top_k, Rows((max(num_experts, 1),), np.int32, 0,
                                                                           self._steps.n, self._capacity)))
            for col in self._m.values():
                col.widen(1, li + 1)
            for pres in self._presence.values():
                pres.widen(1, li + 1)
        else:
            layer = self._layers[li]
            if num_experts > layer.num_experts:
                layer.num_experts = num_experts
                for rows in (layer.tokens, layer.bias, layer.dropped):
                    if rows is not None:
                        rows.widen(1, num_experts)
            if top_k > 0:
                layer.top_k = top_k
        return li

    def _step_index(self, steps: np.ndarray, batch: _Batch) -> np.ndarray:
        """Index of each step on the shared axis, appending (or, rarely, inserting) steps not seen yet."""
        known = self._steps.a
        n = len(known)
        uniq = np.unique(steps)
        if n and len(uniq) and uniq[0] <= known[-1]:
            pos = np.minimum(np.searchsorted(known, uniq), n - 1)
            uniq = uniq[known[pos] != uniq]
        if len(uniq) == 0:
            pass
        elif n == 0 or uniq[0] > known[-1]:
            self._resize_all(n + len(uniq))
            self._steps.a[n:] = uniq
            batch.changed(n)
        else:
            union = np.union1d(known, uniq)
            pos = np.searchsorted(union, known)
            for rows in self._all_rows():
                rows.remap(pos, len(union))
            self._steps.a[:] = union
            batch.changed(int(np.searchsorted(union, uniq[0])))
        return np.searchsorted(self._steps.a, steps)

    def _all_rows(self):
        yield self._steps
        yield from self._m.values()
        yield from self._presence.values()
        for layer in self._layers:
            for rows in (layer.tokens, layer.bias, layer.dropped):
                if rows is not None:
                    yield rows

    def _resize_all(self, n: int) -> None:
        for rows in self._all_rows():
            rows.resize(n)

    def _ingest(self, table: str, arrays: dict[str, Any], batch: _Batch, check: bool) -> None:
        lmap = np.asarray([self._layer_for(str(name), 0, 0) for name in arrays["layer_names"]], dtype=np.int64)
        for rank, a in by_rank(arrays):
            self._ranks.add(rank)
            pres = self._presence.get((table, rank))
            if pres is None:
                pres = self._presence[(table, rank)] = Rows((len(self._layers),), bool, False, self._steps.n,
                                                            self._capacity)
            if table == LAYERS:
                self._ingest_layers(a, lmap, pres, batch, check)
            else:
                self._ingest_experts(a, lmap, pres, batch, check)

    def _ingest_layers(self, a: dict[str, Any], lmap: np.ndarray, pres: Rows, batch: _Batch, check: bool) -> None:
        codes = a["layer"]
        for code in np.unique(codes):
            # num_experts / top_k from the rows: the manifest may predate a router's registration.
            last = np.flatnonzero(codes == code)[-1]
            self._layer_for(str(a["layer_names"][code]), int(a["num_experts"][last]), int(a["top_k"][last]))
        li = lmap[codes]
        si = self._step_index(a["step"], batch)
        keep: Any = slice(None)
        if check:
            seen = pres.a[si, li]
            # A step written twice within one part is a re-write too: the newest seq must win.
            key = si * len(self._layers) + li
            uniq, counts = np.unique(key, return_counts=True)
            if (counts > 1).any():
                seen = seen | np.isin(key, uniq[counts > 1])
            if seen.any():
                batch.collide(int(a["step"][seen].min()))
                keep = ~seen
        si, li = si[keep], li[keep]
        if len(si) == 0:
            return

        def col(name: str) -> np.ndarray:
            return np.asarray(a[name], dtype=np.float64)[keep]

        tok = col("tokens")
        m = {name: rows.a for name, rows in self._m.items()}
        m["tokens"][si, li] += tok
        m["dropped"][si, li] += col("dropped")
        # NaN stays NaN (a router that hands over no distribution, or no logits): read as 0 it would look like an
        # entropy collapse. Ranks record the same metrics, so a NaN beside a number does not happen in practice.
        m["ent_w"][si, li] += col("entropy") * tok
        m["z_w"][si, li] += col("z_loss") * tok
        m["aux_w"][si, li] += col("aux_loss") * tok
        m["nonfinite"][si, li] += col("nonfinite")
        m["logit_abs_max"][si, li] = np.fmax(m["logit_abs_max"][si, li], col("logit_abs_max"))
        m["rows"][si, li] += 1
        for name in ("cv", "max_share", "dead"):
            # NaN (an empty step) is stored as 0 so bins can sum the column; `derive` masks empty steps again.
            m[name][si, li] = np.nan_to_num(col(name))
        pres.a[si, li] = True
        batch.changed(int(si.min()))
        for layer_index in np.unique(li):
            batch.touched.setdefault(int(layer_index), []).append(si[li == layer_index])

    def _ingest_experts(self, a: dict[str, Any], lmap: np.ndarray, pres: Rows, batch: _Batch, check: bool) -> None:
        """Rows are handled per (step, layer) block of experts: the writer emits whole steps of E experts per
        layer, so a 2M-row part is a few thousand block rows and one reshape per layer."""
        codes = a["layer"]
        n = len(codes)
        cut = np.flatnonzero(codes[1:] != codes[:-1]) + 1
        starts = np.r_[0, cut]
        if len(np.unique(codes[starts])) != len(starts):
            # One layer's rows are not contiguous (not the writer's layout): group them, keeping row order.
            order = np.argsort(codes, kind="stable")
            a = {k: (v[order] if isinstance(v, np.ndarray) and len(v) == n else v) for k, v in a.items()}
            codes = a["layer"]
            cut = np.flatnonzero(codes[1:] != codes[:-1]) + 1
            starts = np.r_[0, cut]
        stops = np.r_[cut, n]
        steps, expert, tokens = a["step"], a["expert"], a["tokens"]
        segs = []
        for lo, hi in zip(starts.tolist(), stops.tolist(), strict=True):
            lidx = int(lmap[codes[lo]])
            layer = self._layers[lidx]
            e = expert[lo:hi]
            top = int(e.max()) + 1
            if top > layer.tokens.a.shape[1]:
                layer.num_experts = max(layer.num_experts, top)
                for rows in (layer.tokens, layer.bias, layer.dropped):
                    if rows is not None:
                        rows.widen(1, top)
            E = layer.tokens.a.shape[1]
            block = dense_steps(steps[lo:hi], e, E)
            segs.append((lidx, lo, hi, E, block))
        self._step_index(np.concatenate([b if b is not None else steps[lo:hi] for _, lo, hi, _, b in segs]), batch)
        axis = self._steps.a
        for lidx, lo, hi, E, block in segs:
            layer = self._layers[lidx]
            if block is not None:
                rows = np.searchsorted(axis, block)
                keep = ~pres.a[rows, lidx] if check else np.ones(len(rows), bool)
                if not keep.all():
                    batch.collide(int(block[~keep].min()))
                rows_k = rows[keep]
                layer.tokens.a[rows_k] += tokens[lo:hi].reshape(-1, E)[keep].astype(np.int32)
                extra = [(name, a[name][lo:hi].reshape(-1, E)[keep]) for name in ("dropped", "bias")
                         if a.get(name) is not None]
                pres.a[rows_k, lidx] = True
                touched, e_rows = rows_k, None
            else:
                s = np.searchsorted(axis, steps[lo:hi])
                e = expert[lo:hi]
                keep = ~pres.a[s, lidx] if check else np.ones(len(s), bool)
                key = s * E + e
                if len(np.unique(key)) != len(key) or not keep.all():
                    batch.collide(int(steps[lo:hi][~keep].min()) if not keep.all() else int(axis[s].min()))
                s, e = s[keep], e[keep]
                np.add.at(layer.tokens.a, (s, e), tokens[lo:hi][keep].astype(np.int32))
                extra = [(name, a[name][lo:hi][keep]) for name in ("dropped", "bias") if a.get(name) is not None]
                pres.a[s, lidx] = True
                touched, e_rows = np.unique(s), (s, e)
            for name, values in extra:
                self._add_extra(layer, name, values, touched if e_rows is None else e_rows)
            if len(touched):
                batch.changed(int(touched.min()))
                batch.touched.setdefault(lidx, []).append(touched)

    def _add_extra(self, layer: Layer, name: str, values: np.ndarray, where: Any) -> None:
        """Per-expert drops (summed over ranks) and router bias (replicated on every rank: the last value read)."""
        if name == "dropped":
            if not values.any():
                return
            if layer.dropped is None:
                layer.dropped = Rows((layer.tokens.a.shape[1],), np.int32, 0, self._steps.n, self._capacity)
            if isinstance(where, tuple):
                np.add.at(layer.dropped.a, where, values.astype(np.int32))
            else:
                layer.dropped.a[where] += values.astype(np.int32)
            return
        finite = np.isfinite(values)
        if not finite.any():
            return
        if layer.bias is None:
            layer.bias = Rows((layer.tokens.a.shape[1],), np.float32, np.nan, self._steps.n, self._capacity)
        if isinstance(where, tuple):
            layer.bias.a[where[0][finite], where[1][finite]] = values[finite]
        else:
            layer.bias.a[where] = np.where(finite, values, layer.bias.a[where])

    def _finish(self, batch: _Batch) -> None:
        """Recompute count-based metrics from summed counts where several ranks contributed."""
        if len(self._ranks) <= 1 or not batch.touched:
            return
        m = {name: rows.a for name, rows in self._m.items()}
        for lidx, parts in batch.touched.items():
            rows = np.unique(np.concatenate(parts))
            counts = self._layers[lidx].tokens.a[rows].astype(np.float64)
            cv, share, dead = count_metrics(counts)
            m["cv"][rows, lidx] = np.nan_to_num(cv)
            m["max_share"][rows, lidx] = np.nan_to_num(share)
            m["dead"][rows, lidx] = dead

    # ------------------------------------------------------------------ reading back (for charts)

    @property
    def steps(self) -> np.ndarray:
        return self._steps.a

    @property
    def n(self) -> int:
        return self._steps.n

    @property
    def layers(self) -> list[Layer]:
        return list(self._layers)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self._layers]

    @property
    def ranks(self) -> list[int]:
        return sorted(self._ranks)

    @property
    def nbytes(self) -> int:
        return sum(rows.nbytes for rows in self._all_rows())

    @property
    def status(self) -> str:
        """running / finished / crashed, with the loader's rule for a stale heartbeat."""
        if not self.meta:
            return "unknown"
        return run_state(self.meta)

    def layer(self, name_or_index: str | int) -> Layer:
        if isinstance(name_or_index, str):
            if name_or_index not in self._by_name:
                raise KeyError(f"no layer {name_or_index!r} in {self.path.name}")
            return self._layers[self._by_name[name_or_index]]
        return self._layers[name_or_index]

    def index_range(self, lo_step: float | None = None, hi_step: float | None = None) -> tuple[int, int]:
        """Step-axis indices [lo, hi) of the steps within [lo_step, hi_step] (None: open end)."""
        steps = self._steps.a
        lo = 0 if lo_step is None else int(np.searchsorted(steps, lo_step, side="left"))
        hi = len(steps) if hi_step is None else int(np.searchsorted(steps, hi_step, side="right"))
        return lo, max(lo, hi)

    def series(self, layer: str | int, lo: int = 0, hi: int | None = None) -> dict[str, np.ndarray]:
        """Per-step metrics of one layer over step indices [lo, hi): every name in SERIES (NaN where not recorded)."""
        with self.lock:
            lay = self.layer(layer)
            m = {name: rows.a[lo:hi, lay.index] for name, rows in self._m.items()}
            return derive(m, lay.num_experts, lay.top_k)

    def all_series(self, lo: int = 0, hi: int | None = None, names: tuple[str, ...] = SERIES
                   ) -> dict[str, np.ndarray]:
        """Like `series` for every layer at once (only `names`): each value is ``[steps, layers]``."""
        with self.lock:
            m = {name: rows.a[lo:hi] for name, rows in self._m.items()}
            E = np.asarray([max(layer.num_experts, 1) for layer in self._layers], dtype=np.float64)
            k = np.asarray([max(layer.top_k, 1) for layer in self._layers], dtype=np.float64)
            return derive(m, E, k, names)

    def layer_rows(self, layer: str | int) -> np.ndarray | None:
        """Step-axis indices where `layer` has a recorded row (what the detector judges); None when it has one at
        every step (the usual case: no index array is built)."""
        with self.lock:
            present = self._m["rows"].a[:, self.layer(layer).index] > 0
            return None if present.all() and len(present) else np.flatnonzero(present)

    def layer_column(self, layer: str | int, name: str, rows: Any = slice(None)) -> np.ndarray:
        """One per-step column (a name of COLS: sums such as tokens, ent_w, or logit_abs_max) of `layer` at `rows`."""
        with self.lock:
            return self._m[name].a[rows, self.layer(layer).index]

    def tokens(self, layer: str | int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        with self.lock:
            return self.layer(layer).tokens.a[lo:hi]

    def bias(self, layer: str | int, lo: int = 0, hi: int | None = None) -> np.ndarray | None:
        with self.lock:
            rows = self.layer(layer).bias
            return None if rows is None else rows.a[lo:hi]

    def dirty_since(self, generation: int) -> int | None:
        """The smallest step index changed after `generation` (None: nothing changed; 0: rebuild everything)."""
        with self.lock:
            if generation >= self.generation:
                return None
            if generation < 0 or not self._dirty or self._dirty[0][0] > generation + 1:
                return 0
            return min(first for gen, first in self._dirty if gen > generation)

    def detector_layers(self) -> list[Any]:
        """The detector's per-layer input (moewatch.detect.windows.LayerData), built from the cache without a reload."""
        from moewatch.detect.windows import LayerData

        out = []
        with self.lock:
            for layer in self._layers:
                present = self._m["rows"].a[:, layer.index] > 0
                if not present.any():
                    continue
                # Every step present (the usual case): views, not copies, so judging a 1 GB run does not double it.
                # Rows below `n` are only rewritten by a resume or a late rank, which bumps the generation and
                # makes the detector run again on the new data.
                idx: Any = slice(0, self._steps.n) if present.all() else np.flatnonzero(present)
                s = derive({name: rows.a[idx, layer.index] for name, rows in self._m.items()}, layer.num_experts,
                           layer.top_k)
                stats = {"tokens": s["tokens"], "dropped": self._m["dropped"].a[idx, layer.index],
                         "entropy_norm": s["entropy_norm"], "z_loss": s["z_loss"],
                         "logit_abs_max": s["logit_abs_max"], "nonfinite": s["nonfinite"]}
                out.append(LayerData(layer.name, layer.num_experts, layer.top_k, self._steps.a[idx].copy(),
                                     layer.tokens.a[idx], stats,
                                     None if layer.dropped is None else layer.dropped.a[idx],
                                     None if layer.bias is None else layer.bias.a[idx].astype(np.float64)))
        return out


def derive(m: dict[str, np.ndarray], num_experts: Any, top_k: Any, names: tuple[str, ...] = SERIES
           ) -> dict[str, np.ndarray]:
    """Chartable metrics from the per-step columns `m` (same-shaped arrays keyed by COLS); NaN where no layers
    row was read."""
    tok = m["tokens"]
    present = m["rows"] > 0
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        per_tok = np.where(present & (tok > 0), 1.0 / np.where(tok > 0, tok, 1.0), np.nan)
        for name in names:
            if name == "entropy_norm":
                ln_e = np.log(np.maximum(np.asarray(num_experts, dtype=np.float64), 2.0))
                v = m["ent_w"] * per_tok / ln_e
            elif name == "drop_rate":
                v = m["dropped"] * per_tok / np.asarray(top_k, dtype=np.float64)
            elif name == "z_loss":
                v = m["z_w"] * per_tok
            elif name == "aux_loss":
                v = m["aux_w"] * per_tok
            elif name in ("cv", "max_share"):
                v = np.where(present & (tok > 0), m[name], np.nan)
            else:
                v = np.where(present, m[name].astype(np.float64), np.nan)
            out[name] = v
    return out
