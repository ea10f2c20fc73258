"""The dashboard's view of one run: the small per-step layer columns held whole, expert counts read per layer on
demand, both through the store's one reader (``moewatch.store.dense``), refreshed from new part files only.

A run of 100k steps x 32 layers x 64 experts is 205M expert rows. The page shows one layer at a time, so only the
layers it asks for are read (``dense.read_layers``: the part files' row groups of other layers are skipped) and
kept, least recently used first out past ``layer_budget`` bytes. What every layer needs (tokens, drops, entropy,
z-loss, ... per step) comes from the layers table (``dense.plan_run``), as ``[steps, layers]`` columns on one
sorted step axis from which the charted metrics are derived on demand. The run's verdict is the detector's
streamed pass over the directory (``moewatch.detect.analyze_run``), not a second copy of the run.

Live: part files are immutable and appear atomically, so a refresh reads only parts it has not read. New expert
parts are added into the layers held in memory when no step was recorded twice; otherwise (a resumed run re-wrote
steps, a rank's group sum fell back) the held layers are dropped and re-read with the loader's de-duplication, so
the view always equals ``moewatch.load(path).global_view()``. `dirty_since` tells the figures from which step
index to redraw.

Nothing here imports dash or plotly.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moewatch.store.compact import COMPACTED, replaced_by
from moewatch.store.dense import Plan, PlanCache, column_stats, may_hold_values, plan_run, read_layers
from moewatch.store.manifest import read_manifest, run_state
from moewatch.store.reader import fallback_rules, part_files, read_rank_manifests, warn_skipped
from moewatch.store.schema import EXPERTS, LAYERS

from .arrays import Rows, count_metrics

# Per-step columns of a layer on the run's step axis (`RunData.layer_column`), made on demand from the layers
# table's per-layer stats (no second copy). Sums combine over bins exactly; derived metrics come from them
# (entropy = ent_w / tokens, ...). cv / max_share / dead are the recorded values; where several ranks wrote rows
# they are recomputed from the summed counts of a layer once it is read.
# The routing diagnostics (schema 2) are sums too: margin_tokens, near_ties, margin_sum, overridden, override_slots.
ROUTING = ("margin_tokens", "near_ties", "margin_sum", "overridden", "override_slots")
SUMS = ("tokens", "dropped", "ent_w", "z_w", "aux_w", "nonfinite", *ROUTING)
COLS = (*SUMS, "logit_abs_max", "rows", "cv", "max_share", "dead")
_COUNTED = ("cv", "max_share", "dead")

# Metric series a layer view can chart, in display order.
SERIES = ("cv", "entropy_norm", "max_share", "dead", "drop_rate", "z_loss", "logit_abs_max", "aux_loss", "tokens",
          "nonfinite", "near_tie_frac", "margin_mean", "override_frac")

LAYER_BUDGET = 768 << 20  # bytes of expert counts held per run (a 100k x 64 layer is 26 MB)

_INSTANCES = itertools.count()

# Generations of change kept for live clients; an older client just gets a full rebuild.
_DIRTY_LOG = 256


@dataclass
class Layer:
    """One router. `tokens` (``[steps, experts]`` on the run's step axis), `bias` and `dropped` are set while its
    counts are held (`RunData.layer` reads them); `bias`/`dropped` only if the run has them."""

    name: str
    index: int
    num_experts: int
    top_k: int
    tokens: Rows | None = None
    bias: Rows | None = None
    dropped: Rows | None = None
    grad: Rows | None = None  # [steps, experts] gradient norms (float32, NaN where none), when the run records them
    gate: Rows | None = None  # [steps, experts] gate mass (combine weights summed over assignments), when recorded
    sources: set[str] | None = None  # the expert part files the held counts were read from

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in (self.tokens, self.bias, self.dropped, self.grad, self.gate) if r is not None)

    def drop_counts(self) -> None:
        self.tokens = self.bias = self.dropped = self.grad = self.gate = self.sources = None


class RunData:
    """A run directory as the dashboard charts it; `refresh()` reads the part files not read yet.

    Thread-safe: dash callbacks run on several threads, so every public method takes the run's lock.
    """

    def __init__(self, path: str | Path, run_id: str = "", layer_budget: int = LAYER_BUDGET):
        self.path = Path(path)
        self.run_id = run_id
        self.layer_budget = layer_budget
        self.detector_config: Any = None  # the detector's thresholds for this run (None: the defaults)
        self.instance = next(_INSTANCES)  # tells a reloaded run from its evicted predecessor in figure caches
        self.lock = threading.RLock()
        self.meta: dict[str, Any] = {}
        self.meta_error: str | None = None
        self.generation = 0
        self.last_refresh = 0.0
        self._skipped: list[str] = []  # paths of unreadable parts (each warned about once)
        self._plans = PlanCache()  # layers parts read, and the last plan (plan_run extends it for appended steps)
        self._plan: Plan | None = None
        self._key: Any = None
        self._seen: set[str] = set()  # expert parts listed at the last refresh
        self._files: list[Path] = []  # ... and the list itself
        self._replaces: dict[str, list[str]] = {}  # compacted part -> the parts it replaces (files are immutable)
        self._footers: dict[str, pq.FileMetaData] = {}  # expert part -> its footer, read once
        self.has_grads = False  # some expert part records gradient norms (footers of new parts are checked)
        self.has_gate = False  # ... and gate mass
        self._hists: dict[str, tuple[Any, np.ndarray]] = {}  # layer -> (run state, margin histogram per step)
        self._steps = np.zeros(0, np.int64)
        self._counted: dict[str, dict[str, np.ndarray]] = {}  # layer -> cv/max_share/dead of the all-ranks sum
        self._layers: list[Layer] = []
        self._by_name: dict[str, int] = {}
        self._held: OrderedDict[str, None] = OrderedDict()  # layers whose counts are in memory, oldest use first
        self._dirty: list[tuple[int, int]] = []  # (generation, first step index changed in it)
        self._blocks: dict[str, Any] = {}  # layer -> its rollup (moewatch.store.rollup.Blocks), for this `_key`
        self._rollups: Any = False  # the run's RollupReader for this `_key` (None: no up-to-date rollups)

    # ------------------------------------------------------------------ reading

    def refresh(self) -> bool:
        """Read what changed since the last refresh (new layers parts, then new expert parts into the held layers).
        True if the data changed."""
        with self.lock:
            self.last_refresh = time.monotonic()
            self._read_meta()
            files = {t: part_files(self.path, t) for t in (LAYERS, EXPERTS)}
            rules = fallback_rules(read_rank_manifests(self.path))
            key = (tuple(f.name for f in files[LAYERS]), tuple(f.name for f in files[EXPERTS]), repr(rules))
            if key == self._key:
                return False
            new_experts, _, _ = self._classify(files[EXPERTS], self._seen)
            self._footers = {f.name: self._footers[f.name] for f in files[EXPERTS] if f.name in self._footers}
            for f in new_experts:
                meta = self._footer(f)
                if meta is not None:
                    self.has_grads = self.has_grads or may_hold_values(meta, "grad_norm")
                    self.has_gate = self.has_gate or may_hold_values(meta, "gate_mass")
            plan = plan_run(self.path, self._skipped, extra=True, cache=self._plans)
            old_steps, old_plan = self._steps, self._plan
            self._plan, self._key = plan, key
            self._blocks, self._rollups = {}, False
            self._seen, self._files = {f.name for f in files[EXPERTS]}, files[EXPERTS]
            self._rebuild(plan)
            first = _first_difference(old_plan, old_steps, plan, self._steps)
            low = self._lowest_step(new_experts)
            if low is not None and len(self._steps):
                i = int(np.searchsorted(self._steps, low))
                if i < len(self._steps):
                    first = i if first is None else min(first, i)
            self._update_held(old_steps)
            if first is None:
                return False
            self.generation += 1
            self._dirty.append((self.generation, first))
            del self._dirty[:-_DIRTY_LOG]
            return True

    def _read_meta(self) -> None:
        try:
            self.meta = read_manifest(self.path)
            self.meta_error = None
        except FileNotFoundError:
            self.meta_error = f"{self.path} has no run.json any more"
        except (OSError, ValueError) as e:
            # Keep the last good manifest: run.json is rewritten atomically, so this is a real problem to show.
            self.meta_error = f"cannot read run.json: {e}"

    def _classify(self, files: list[Path], sources: set[str]) -> tuple[list[Path], set[str], bool]:
        """Against the parts `sources` already read: the parts with rows not read yet, the names that then cover
        everything read, and whether adding the new parts is exact (False: a compaction mixes rows read and not
        read, or a part read is gone)."""
        new, known, covered, clean = [], set(), set(), True
        for f in files:
            if f.name in sources:
                known.add(f.name)
                continue
            if COMPACTED.match(f.name):
                if f.name not in self._replaces:
                    self._replaces[f.name] = replaced_by(f)
                replaces = self._replaces[f.name]
                hit = [n for n in replaces if n in sources]
                if hit and len(hit) == len(replaces):
                    known.add(f.name)
                    covered.update(hit)
                    continue
                clean = clean and not hit
            new.append(f)
        clean = clean and not (sources - known - covered)
        return new, known | {f.name for f in new}, clean

    def _footer(self, f: Path) -> pq.FileMetaData | None:
        """A part's Parquet footer, read once (parts are immutable); None for an unreadable part (warned once)."""
        if f.name not in self._footers:
            try:
                self._footers[f.name] = pq.read_metadata(f)
            except (OSError, pa.ArrowException, ValueError) as e:
                self._skip(f, e)
                return None
        return self._footers[f.name]

    def _lowest_step(self, files: list[Path]) -> int | None:
        """The smallest step in the new expert parts (from their statistics; an unreadable part is skipped)."""
        lows = []
        for f in files:
            meta = self._footer(f)
            for st in (column_stats(meta, "step") or []) if meta is not None else []:
                if st is not None and st.has_min_max:
                    lows.append(int(st.min))
        return min(lows, default=None)

    def _skip(self, f: Path, error: Exception) -> None:
        warn_skipped(f, error, self._skipped, stacklevel=4)

    def _rebuild(self, plan: Plan) -> None:
        """The layers (manifest order, then the table's) and the step axis of a new plan."""
        for r in self.meta.get("routers", []) or []:
            if isinstance(r, dict) and r.get("name"):
                self._layer_for(str(r["name"]), int(r.get("num_experts") or 0), int(r.get("top_k") or 1))
        for name in plan.names:
            self._layer_for(name, plan.num_experts[name], plan.top_k[name])
        self._steps = _union([plan.steps[n] for n in plan.names])
        self._counted = {}

    def _col(self, name: str, c: str) -> np.ndarray:
        """Column `c` (a name of COLS) of layer `name` on the step axis; 0 at steps it did not record."""
        plan, n = self._plan, len(self._steps)
        if plan is None or name not in plan.steps:
            return np.zeros(n)
        s, steps = plan.stats[name], plan.steps[name]
        if c in _COUNTED:
            v = np.nan_to_num(self._counted[name][c] if name in self._counted else s[c])  # bins sum them
        elif c == "rows":
            v = np.ones(len(steps))
        elif c in ROUTING:
            v = s.get(c)
            if v is None:  # not recorded (schema 1, or a router that does not expose it)
                return np.full(n, np.nan)
        elif c in ("ent_w", "z_w", "aux_w"):
            mean = {"ent_w": "entropy_norm", "z_w": "z_loss", "aux_w": "aux_loss"}[c]
            v = s[mean] * s["tokens"]
            if c == "ent_w":
                v = v * np.log(max(plan.num_experts[name], 2))
        else:
            v = s[c]
        if len(steps) == n:  # the layer recorded every step of the axis (the usual case): no scatter
            return v
        out = np.zeros(n)
        out[np.searchsorted(self._steps, steps)] = v
        return out

    def _update_held(self, old_steps: np.ndarray) -> None:
        """Bring the layers held in memory up to date: new parts added in place when that is exact (no step
        recorded twice, nothing read is gone), else the layer is dropped, to be read afresh when next shown."""
        plan, n = self._plan, len(self._steps)
        appended = len(old_steps) <= n and np.array_equal(self._steps[: len(old_steps)], old_steps)
        pos = None if appended else np.searchsorted(self._steps, old_steps)
        for name in list(self._held):
            lay = self.layer_info(name)
            new, names, clean = self._classify(self._files, lay.sources or set())
            if not clean or plan.winners is not None or lay.tokens.a.shape[1] != max(lay.num_experts, 1):
                self._release(name)
                continue
            for rows in (lay.tokens, lay.bias, lay.dropped, lay.grad, lay.gate):
                if rows is not None:
                    rows.resize(n) if appended else rows.remap(pos, n)
            lay.sources = names
            lo = self._lowest_step(new)
            if lo is not None and n:
                found = read_layers(self.path, [name], plan, steps=(lo, int(self._steps[-1])), files=new,
                                    skipped=self._skipped)
                if found:
                    self._put(lay, found[0], add=True)
        self._multi_rank_metrics(list(self._held))

    def _layer_for(self, name: str, num_experts: int, top_k: int) -> int:
        li = self._by_name.get(name)
        if li is None:
            li = len(self._layers)
            self._by_name[name] = li
            self._layers.append(Layer(name, li, num_experts, top_k))
            return li
        layer = self._layers[li]
        if num_experts > layer.num_experts:
            layer.num_experts = num_experts
            self._release(name)
        if top_k > 0:
            layer.top_k = top_k
        return li

    # ------------------------------------------------------------------ expert counts, per layer on demand

    def _hold(self, name: str) -> Layer:
        """The layer with its counts in memory (read now if not held), most recently used."""
        lay = self.layer_info(name)
        if name in self._held:
            self._held.move_to_end(name)
            return lay
        for attempt in range(2):
            if [f.name for f in part_files(self.path, EXPERTS)] != [f.name for f in self._files]:
                self.refresh()  # read the counts of the steps the step axis has, no more, no fewer
            skipped = list(self._skipped)
            found = read_layers(self.path, [name], self._plan, files=self._files, skipped=skipped) \
                if self._plan is not None else []
            if attempt == 0 and any(not Path(p).exists() for p in skipped[len(self._skipped):]):
                continue  # a compaction replaced a part while it was read: list and read again
            break
        self._skipped = skipped
        n, E = len(self._steps), max(lay.num_experts, 1)
        lay.tokens = Rows((E,), np.int64 if self._plan is not None and self._plan.wide else np.int32, 0, n)
        lay.sources = {f.name for f in self._files}
        if found:
            self._put(lay, found[0], add=False)
        self._held[name] = None
        self._multi_rank_metrics([name])
        total = sum(self._layers[self._by_name[h]].nbytes for h in self._held)
        for old in list(self._held):
            if total <= self.layer_budget or old == name:
                break
            total -= self._layers[self._by_name[old]].nbytes
            self._release(old)
        return lay

    def _put(self, lay: Layer, d: Any, add: bool) -> None:
        """Place a DenseLayer's counts on the run's step axis (added to what is held, or as the whole layer)."""
        rows = np.searchsorted(self._steps, d.steps)
        n, E = len(self._steps), lay.tokens.a.shape[1]
        tok = d.tokens[:, :E]
        lay.tokens.a[rows] = (lay.tokens.a[rows] + tok) if add else tok
        if d.dropped is not None:
            if lay.dropped is None:
                lay.dropped = Rows((E,), lay.tokens.a.dtype, 0, n)
            lay.dropped.a[rows] += d.dropped[:, :E].astype(lay.dropped.a.dtype)
        if d.bias is not None:
            if lay.bias is None:
                lay.bias = Rows((E,), np.float32, np.nan, n)
            lay.bias.a[rows] = d.bias[:, :E]
        if getattr(d, "gate_mass", None) is not None:
            if lay.gate is None:
                lay.gate = Rows((E,), np.float64, 0.0, n)
            lay.gate.a[rows] = (lay.gate.a[rows] + d.gate_mass[:, :E]) if add else d.gate_mass[:, :E]
        if getattr(d, "grad_norm", None) is not None:
            if lay.grad is None:
                lay.grad = Rows((E,), np.float32, np.nan, n)
            lay.grad.a[rows] = d.grad_norm[:, :E]

    def _release(self, name: str) -> None:
        self._held.pop(name, None)
        li = self._by_name.get(name)
        if li is not None:
            self._layers[li].drop_counts()

    def _multi_rank_metrics(self, names: list[str]) -> None:
        """cv / max share / dead of the all-ranks sum, where several ranks wrote rows (the layers table has each
        rank's own)."""
        if self._plan is None or self._plan.ranks <= 1:
            return
        for name in names:
            lay = self.layer_info(name)
            if lay.tokens is None or name not in self._plan.steps:
                continue
            counts = lay.tokens.a[np.searchsorted(self._steps, self._plan.steps[name])]
            cv, share, dead = count_metrics(counts)
            self._counted[name] = {"cv": cv, "max_share": share, "dead": dead}

    # ------------------------------------------------------------------ reading back (for charts)

    @property
    def steps(self) -> np.ndarray:
        return self._steps

    @property
    def n(self) -> int:
        return len(self._steps)

    @property
    def layers(self) -> list[Layer]:
        return list(self._layers)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self._layers]

    @property
    def ranks(self) -> list[int]:
        return list(range(self._plan.ranks)) if self._plan is not None else []

    @property
    def skipped(self) -> list[str]:
        """One line per part file that could not be read (it is left out of every chart)."""
        return [f"skipped corrupt part file {Path(p).parent.name}/{Path(p).name}" for p in self._skipped]

    @property
    def nbytes(self) -> int:
        with self.lock:
            stats = 0 if self._plan is None else sum(v.nbytes for st in self._plan.stats.values() for v in st.values())
            return int(self._steps.nbytes + stats + sum(layer.nbytes for layer in self._layers))

    @property
    def status(self) -> str:
        """running / finished / crashed, with the loader's rule for a stale heartbeat."""
        if not self.meta:
            return "unknown"
        return run_state(self.meta)

    def layer_info(self, name_or_index: str | int) -> Layer:
        """A layer's name, index and shape (its counts only if held: `layer` reads them)."""
        if isinstance(name_or_index, str):
            if name_or_index not in self._by_name:
                raise KeyError(f"no layer {name_or_index!r} in {self.path.name}")
            return self._layers[self._by_name[name_or_index]]
        return self._layers[name_or_index]

    def layer(self, name_or_index: str | int) -> Layer:
        """A layer with its counts (`tokens`, `bias`, `dropped`), read from the run if not held."""
        with self.lock:
            return self._hold(self.layer_info(name_or_index).name)

    def placement(self, layer: str) -> np.ndarray | None:
        """The device of each of the layer's experts when the run records an expert-parallel placement."""
        from moewatch.store.placement import placement_for

        return placement_for(self.meta, layer, max(self.layer_info(layer).num_experts, 1))

    def blocks(self, layer: str) -> Any:
        """The layer's exact block sums from the run's rollups (`moewatch.store.rollup.Blocks`: block b sums the
        layer's recorded rows [b * block, (b + 1) * block)), or None when the run has no up-to-date rollups for it
        (a live run between compactions). What a view coarser than a block reads instead of per-step counts."""
        with self.lock:
            if layer in self._blocks:
                return self._blocks[layer]
            if self._rollups is False:
                from moewatch.store.rollup import open_rollups

                self._rollups = open_rollups(self.path)
            lay = self.layer_info(layer)
            b = self._rollups.layer(layer, max(lay.num_experts, 1)) if self._rollups is not None else None
            rows = self.layer_rows(layer)
            n_rows = self.n if rows is None else len(rows)
            if b is not None and len(b.tokens) != -(-n_rows // b.block):
                b = None  # not the steps the layers table has (cannot happen with a fresh fingerprint; be safe)
            self._blocks[layer] = b
            return b

    def index_range(self, lo_step: float | None = None, hi_step: float | None = None) -> tuple[int, int]:
        """Step-axis indices [lo, hi) of the steps within [lo_step, hi_step] (None: open end)."""
        steps = self._steps
        lo = 0 if lo_step is None else int(np.searchsorted(steps, lo_step, side="left"))
        hi = len(steps) if hi_step is None else int(np.searchsorted(steps, hi_step, side="right"))
        return lo, max(lo, hi)

    def series(self, layer: str | int, lo: int = 0, hi: int | None = None) -> dict[str, np.ndarray]:
        """Per-step metrics of one layer over step indices [lo, hi): every name in SERIES (NaN where not recorded)."""
        with self.lock:
            lay = self.layer(layer) if self._plan is not None and self._plan.ranks > 1 else self.layer_info(layer)
            m = {c: self._col(lay.name, c)[lo:hi] for c in COLS}
            return derive(m, lay.num_experts, lay.top_k)

    def mean_cv(self, lo: int = 0) -> dict[str, float]:
        """Each layer's mean per-step load CV over step indices [lo, n) (from the layers table: no counts read)."""
        with self.lock:
            out = {}
            for layer in self._layers:
                present = self._col(layer.name, "rows")[lo:] > 0
                cv = self._col(layer.name, "cv")[lo:]
                out[layer.name] = float(cv[present].mean()) if present.any() else -1.0
            return out

    def layer_rows(self, layer: str | int) -> np.ndarray | None:
        """Step-axis indices where `layer` has a recorded row (what the detector judges); None when it has one at
        every step (the usual case: no index array is built)."""
        with self.lock:
            name = self.layer_info(layer).name
            steps = self._plan.steps.get(name) if self._plan is not None else None
            if steps is None:
                return None if not len(self._steps) else np.zeros(0, np.int64)
            return None if len(steps) == len(self._steps) and len(steps) else np.searchsorted(self._steps, steps)

    def layer_column(self, layer: str | int, name: str, rows: Any = slice(None)) -> np.ndarray:
        """One per-step column (a name of COLS: sums such as tokens, ent_w, or logit_abs_max) of `layer` at `rows`."""
        with self.lock:
            return self._col(self.layer_info(layer).name, name)[rows]

    def tokens(self, layer: str | int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        with self.lock:
            return self.layer(layer).tokens.a[lo:hi]

    def has_margins(self, layer: str) -> bool:
        """Whether the layer's router recorded routing margins (schema 2, routers that expose their scores)."""
        with self.lock:
            return self._plan is not None and "margin_tokens" in self._plan.stats.get(layer, {})

    def margin_hist(self, layer: str) -> np.ndarray | None:
        """Tokens per routing-margin bin per step on the step axis ([steps, MARGIN_BINS], all ranks summed; NaN
        where not recorded), read from the layers table for this layer only (cached until the run changes)."""
        with self.lock:
            if not self.has_margins(layer):
                return None
            key = (layer, self._key)
            cached = self._hists.get(layer)
            if cached is not None and cached[0] == key:
                return cached[1]
            import moewatch
            from moewatch.store.reader import hist_matrix

            frame = moewatch.load(self.path).layers_frame(layer, columns=["step", "margin_hist"])
            hist = hist_matrix(frame["margin_hist"])
            out = np.full((len(self._steps), hist.shape[1]), np.nan)
            out[np.searchsorted(self._steps, frame["step"].to_numpy())] = hist
            self._hists[layer] = (key, out)
            return out

    def gate_mass(self, layer: str | int, lo: int = 0, hi: int | None = None) -> np.ndarray | None:
        """Each expert's gate mass per step ([steps, experts]), or None when the router does not record it."""
        with self.lock:
            rows = self.layer(layer).gate
            return None if rows is None else rows.a[lo:hi]

    def grads(self, layer: str | int, lo: int = 0, hi: int | None = None) -> np.ndarray | None:
        """Each expert's gradient norm per step ([steps, experts], NaN where none), or None when not recorded."""
        with self.lock:
            rows = self.layer(layer).grad
            return None if rows is None else rows.a[lo:hi]

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


def _union(steps: list[np.ndarray]) -> np.ndarray:
    """The sorted union of the layers' step arrays (usually all equal: no sort then)."""
    if not steps:
        return np.zeros(0, np.int64)
    first = steps[0]
    if all(len(s) == len(first) and np.array_equal(s, first) for s in steps[1:]):
        return np.asarray(first, np.int64)
    return np.unique(np.concatenate(steps)).astype(np.int64)


def _first_difference(old: Plan | None, old_steps: np.ndarray, new: Plan, new_steps: np.ndarray) -> int | None:
    """The first step index where the new plan's axis or a layer's steps or stats differ from the old plan's (None:
    identical). cv, max share and dead are left out: they follow the counts, whose changes the new parts bound."""
    n0, n1 = len(old_steps), len(new_steps)
    k = min(n0, n1)
    diverge = np.flatnonzero(old_steps[:k] != new_steps[:k])
    first = int(diverge[0]) if len(diverge) else (k if n0 != n1 else None)

    def at(step: int) -> None:
        nonlocal first
        i = int(np.searchsorted(new_steps, step))
        first = i if first is None else min(first, i)

    for name in new.names:
        steps = new.steps[name]
        if old is None or name not in old.steps:
            if len(steps):
                at(int(steps[0]))
            continue
        a = old.steps[name]
        m = min(len(a), len(steps))
        bad = np.flatnonzero(a[:m] != steps[:m])
        j = int(bad[0]) if len(bad) else (m if len(a) != len(steps) else None)
        for c, v in new.stats[name].items():
            if c in _COUNTED or c not in old.stats[name]:
                continue
            upto = m if j is None else j
            x, y = old.stats[name][c][:upto], v[:upto]
            diff = np.flatnonzero(~((x == y) | (np.isnan(x) & np.isnan(y))))
            if len(diff):
                j = int(diff[0]) if j is None else min(j, int(diff[0]))
        if j is not None and j < len(steps):
            at(int(steps[j]))
        elif j is not None and len(a) > len(steps):  # the layer lost steps
            first = 0
    return first


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
            elif name in ("near_tie_frac", "margin_mean", "override_frac"):
                num, den = {"near_tie_frac": ("near_ties", "margin_tokens"), "margin_mean": ("margin_sum", "margin_tokens"),
                            "override_frac": ("overridden", "override_slots")}[name]
                v = np.where(present & (m[den] > 0), m[num] / np.where(m[den] > 0, m[den], 1.0), np.nan)
            elif name in ("cv", "max_share"):
                v = np.where(present & (tok > 0), m[name], np.nan)
            else:
                v = np.where(present, m[name].astype(np.float64), np.nan)
            out[name] = v
    return out
