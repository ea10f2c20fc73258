"""Reading a run layer by layer as dense arrays, within a memory budget: what the report and the detector stream.

``iter_dense_layers(run_dir)`` yields one :class:`DenseLayer` per router: its sorted steps, ``[steps, experts]``
token counts summed over ranks (the global view), per-expert drops and bias when the run has them, and the
per-step layer columns the detector reads. Only the columns it needs are read, with resumed steps de-duplicated like
``moewatch.load`` (the newest session wins). Layers are read in groups whose dense counts fit ``budget_bytes``: one
pass over the experts part files per group, so a run of 58 layers x 256 experts x 50k steps is judged in a few GB,
not the tens of GB its long table takes in pandas. The result equals ``moewatch.load(run_dir).global_view()``
(tested), for the columns it carries.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moewatch.store.compact import COMPACTED
from moewatch.store.reader import (
    fallback_rules,
    newest_rows,
    part_files,
    read_rank_manifests,
    repeated,
    superseded_rows,
    warn_skipped,
)
from moewatch.store.schema import EXPERTS, LAYERS, SCHEMAS

# Per-expert values averaged over the ranks that recorded them (replicas), not summed like counts.
MEAN_COLUMNS = ("bias", "grad_norm")
# How each is held: a gradient norm needs no more than float32 (it halves the largest array a run with gradient norms
# makes a pass hold); the bias keeps float64 (the detector's bias_runaway reads small moves of a large value).
MEAN_DTYPES = {"bias": np.float64, "grad_norm": np.float32}
BATCH_ROWS = 2_000_000  # expert rows decoded at once by a pass
# Bytes of dense per-expert arrays held at once (a pass holds one group of layers). More groups cost little: a pass
# decodes only its layers' row groups (parts are written a row group per layer), so 1 GiB keeps `moewatch report`
# of a 100k-step x 32-layer x 64-expert run recording gradient norms within 2 GiB of memory.
DEFAULT_BUDGET = 1 << 30
_LAYER_COLUMNS = ["step", "layer", "tokens", "top_k", "num_experts", "entropy", "z_loss", "logit_abs_max",
                  "dropped", "nonfinite", "rank", "session", "seq"]
_EXTRA_COLUMNS = ("aux_loss", "cv", "max_share", "dead")
# Schema-2 routing diagnostics (null where a router does not expose them, and in older parts): per-step sums over
# ranks of the counts behind near_tie_frac, margin_mean and override_frac, so a window's fraction is exact.
_ROUTING_COLUMNS = ("margin_tokens", "near_tie_frac", "margin_mean", "overridden", "override_slots")
ROUTING_STATS = ("margin_tokens", "near_ties", "margin_sum", "overridden", "override_slots")


@dataclass
class DenseLayer:
    """One router's series, all ranks summed. ``tokens``/``dropped``/``bias`` are ``[S, E]``; ``stats`` are ``[S]``:
    tokens (routed), dropped (layer total), entropy_norm, z_loss (token-weighted means over ranks), logit_abs_max
    (max over ranks), nonfinite (sum)."""

    layer: str
    num_experts: int
    top_k: int
    steps: np.ndarray
    tokens: np.ndarray
    stats: dict[str, np.ndarray]
    dropped: np.ndarray | None = None
    bias: np.ndarray | None = None
    block: int = 1  # > 1: tokens/dropped/bias are exact sums over blocks of this many steps (moewatch.store.rollup)
    head: np.ndarray | None = None  # with blocks: the first steps' counts, per step
    grad_norm: np.ndarray | None = None  # [S, E] per-step gradient norm of each expert (mean over ranks), if recorded;
    # with blocks: [blocks, E] the sum of the block's recorded norms, and grad_steps how many steps recorded one
    grad_steps: np.ndarray | None = None
    gate_mass: np.ndarray | None = None  # [S, E] combine weights each expert's assignments got (summed over ranks)


@dataclass
class Plan:
    """What the layers table says about each layer: its step axis, shape, and per-step stats (``plan_run``)."""

    names: list[str]
    steps: dict[str, np.ndarray]
    num_experts: dict[str, int]
    top_k: dict[str, int]
    stats: dict[str, dict[str, np.ndarray]]
    winners: np.ndarray | None  # sorted keys (rank, step, layer) of the kept recordings, when some were dropped
    versions: np.ndarray | None
    wide: bool  # counts may pass int32: hold them as int64
    ranks: int  # ranks that wrote rows (bias is averaged over them)
    drops: bool  # some assignment was dropped at capacity
    skipped: list[str] = field(default_factory=list)

    def cell_bytes(self, bias: bool, means: int = 0) -> int:
        """Memory per (step, expert) cell of a pass: counts, drops, the bias (float64) and ``means`` float32
        per-expert values (gradient norms), each averaged over ranks with a per-rank count."""
        count = 8 if self.wide else 4
        per_rank = 4 if self.ranks > 1 else 0
        return count + (count if self.drops else 0) + (8 + per_rank) * int(bias) + (4 + per_rank) * means


def iter_dense_layers(run_dir: str | Path, budget_bytes: int = DEFAULT_BUDGET, layers: list[str] | None = None,
                      skipped: list[str] | None = None, rollups: bool = False, gate: bool = False
                      ) -> Iterator[DenseLayer]:
    """Every router's :class:`DenseLayer` (or only ``layers``), in the order they first appear in the run.

    A corrupt part file is skipped with a warning (named in ``skipped`` when given), as ``moewatch.load`` does.
    ``rollups``: when the run's rollup file is up to date (``moewatch.store.rollup``), yield block sums from it
    (``block`` > 1) instead of reading the per-step expert rows at all. ``gate``: read each expert's gate mass too
    (the rollup writer; the detector does not use it).
    """
    run_dir = Path(run_dir)
    plan = plan_run(run_dir, skipped)
    names = [n for n in plan.names if layers is None or n in layers]
    if rollups:
        from moewatch.store.rollup import open_rollups

        reader = open_rollups(run_dir)
        if reader is not None:
            for name in names:
                b = reader.layer(name, plan.num_experts[name])
                if b is None or len(b.tokens) != -(-len(plan.steps[name]) // b.block):
                    yield from iter_dense_layers(run_dir, budget_bytes, [name], skipped, gate=gate)  # not rolled up
                    continue
                yield DenseLayer(name, plan.num_experts[name], plan.top_k[name], plan.steps[name], b.tokens,
                                 plan.stats[name], b.dropped, b.bias, b.block, b.head, grad_norm=b.grad_sum,
                                 grad_steps=b.grad_steps, gate_mass=b.gate_mass)
            return
    files = part_files(run_dir, EXPERTS)
    width = plan.cell_bytes(bias=any(_has_bias(f) for f in files),
                            means=int(has_values(files, "grad_norm")))
    width += 8 if gate and has_values(files, "gate_mass") else 0  # summed over ranks in float64
    group: list[str] = []
    size = 0
    for name in names:
        need = len(plan.steps[name]) * plan.num_experts[name] * width
        if group and size + need > budget_bytes:
            yield from _read_group(files, plan, group, skipped, with_gate=gate)
            group, size = [], 0
        group.append(name)
        size += need
    if group:
        yield from _read_group(files, plan, group, skipped, with_gate=gate)


@dataclass
class PlanCache:
    """What a live reader keeps between ``plan_run`` calls: the last plan and the layers parts it was made from.
    New parts holding only steps after every step seen (a run appending flushes) extend the plan; anything else (a
    resume re-writing steps, a late rank, a compaction) re-reads the layers table."""

    plan: Plan | None = None
    files: tuple[str, ...] = ()
    rules: str = ""
    extra: bool = False
    last_step: int = -1
    rank_ids: frozenset[int] = frozenset()


def plan_run(run_dir: str | Path, skipped: list[str] | None = None, extra: bool = False,
             cache: PlanCache | None = None) -> Plan:
    """Read the (small) layers table of a run: every layer's recorded steps, shape and per-step stats, resumed steps
    de-duplicated and a failed group sum's rows dropped as ``moewatch.load`` does.

    ``extra`` adds the stats a chart shows beside the detector's: ``aux_loss`` (token-weighted), and ``cv``,
    ``max_share``, ``dead`` as recorded (a single writer's are the global values; with several ranks
    (``Plan.ranks > 1``) they are one rank's, and the counts must be read to get the sum's). ``cache``: a live
    reader passes the same :class:`PlanCache` each time; when the new parts hold only steps after every step seen
    (a run appending flushes) only they are read, and the last plan is extended with them. A part listed in
    ``skipped`` (unreadable, already warned about) is not tried again."""
    run_dir = Path(run_dir)
    columns = _LAYER_COLUMNS + list(_EXTRA_COLUMNS if extra else ()) + list(_ROUTING_COLUMNS)
    files = part_files(run_dir, LAYERS)
    if skipped:
        files = [f for f in files if str(f) not in skipped]
    rules = fallback_rules(read_rank_manifests(run_dir))
    if cache is None:
        return _plan_table(_read_columns(files, columns, skipped), rules, extra)[0]
    names = [f.name for f in files]
    plan = None
    if (cache.plan is not None and cache.extra == extra and not rules and not cache.rules
            and cache.plan.winners is None and set(cache.files) <= set(names)):
        new = [f for f in files if f.name not in set(cache.files)]
        if not new:
            plan, ranks = cache.plan, cache.rank_ids
        elif not any(COMPACTED.match(f.name) for f in new):
            fresh = _read_columns(new, columns, skipped)
            if not len(fresh.codes):
                plan, ranks = cache.plan, cache.rank_ids
            elif int(fresh.col["step"].min()) > cache.last_step:
                delta, ranks = _plan_table(fresh, rules, extra)
                if delta.winners is None:
                    ranks = cache.rank_ids | ranks
                    plan = _extend(cache.plan, delta, len(ranks))
    if plan is None:
        files = [f for f in files if not skipped or str(f) not in skipped]  # new unreadable parts: warned once
        plan, ranks = _plan_table(_read_columns(files, columns, skipped), rules, extra)
    cache.plan, cache.files, cache.rules, cache.rank_ids = plan, tuple(names), repr(rules) if rules else "", ranks
    cache.extra = extra
    cache.last_step = max((int(v[-1]) for v in plan.steps.values() if len(v)), default=-1)
    return plan


def _extend(old: Plan, new: Plan, ranks: int) -> Plan:
    """``old`` followed by ``new``, whose steps all come after ``old``'s (each layer's arrays concatenated)."""
    steps, stats = dict(old.steps), dict(old.stats)
    E, k = dict(old.num_experts), dict(old.top_k)
    for n in new.names:
        if n in steps:
            steps[n] = np.concatenate([steps[n], new.steps[n]])
            a, b = stats[n], new.stats[n]  # a stat only one side has (routing diagnostics) is NaN on the other
            stats[n] = {c: np.concatenate([a.get(c, np.full(len(old.steps[n]), np.nan)),
                                           b.get(c, np.full(len(new.steps[n]), np.nan))]) for c in {*a, *b}}
            E[n] = max(E[n], new.num_experts[n])
        else:
            steps[n], stats[n], E[n] = new.steps[n], new.stats[n], new.num_experts[n]
        k[n] = new.top_k[n]
    names = old.names + [n for n in new.names if n not in old.steps]
    return Plan(names, steps, E, k, stats, None, None, old.wide or new.wide, ranks, old.drops or new.drops)


@dataclass
class _Columns:
    """A layers table as numpy columns, the layer column as codes into ``names``."""

    names: list[str]
    codes: np.ndarray
    col: dict[str, np.ndarray]

    def table(self) -> pa.Table:
        layer = pa.DictionaryArray.from_arrays(pa.array(self.codes.astype(np.int32)), pa.array(self.names))
        return pa.table({**self.col, "layer": layer})

    @classmethod
    def of(cls, table: pa.Table) -> _Columns:
        names, codes = _names_and_codes(table["layer"])
        return cls(names, codes, {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names
                                  if c != "layer"})


def _read_columns(files: list[Path], columns: list[str], skipped: list[str] | None) -> _Columns:
    """The layers parts' ``columns`` straight into preallocated numpy arrays, a part at a time: memory holds the
    columns once, not an Arrow table beside them. A corrupt part is skipped with a warning (named in ``skipped``)."""
    sizes = []
    for f in files:
        try:
            sizes.append(pq.read_metadata(f).num_rows)
        except (OSError, pa.ArrowException, ValueError):
            sizes.append(0)  # reported when read below
    schema = SCHEMAS[LAYERS]
    n = sum(sizes)
    def dtype(f: pa.Field) -> Any:  # a nullable integer column reads as float (NaN: not recorded)
        return np.float64 if f.nullable and pa.types.is_integer(f.type) else f.type.to_pandas_dtype()

    col = {c: np.empty(n, dtype(schema.field(c))) for c in columns if c != "layer"}
    codes = np.empty(n, np.int64)
    names: dict[str, int] = {}
    at = 0
    for f in files:
        try:
            t = pq.read_table(f, schema=schema, columns=columns)
        except (OSError, pa.ArrowException, ValueError) as e:
            warn_skipped(f, e, skipped, stacklevel=3)
            continue
        m = t.num_rows
        if at + m > n:  # the file changed size under us (cannot happen to an immutable part): grow
            for c in col:
                col[c] = np.concatenate([col[c][:at], np.empty(at + m - len(col[c]), col[c].dtype)])
            codes = np.concatenate([codes[:at], np.empty(at + m - len(codes), np.int64)])
            n = at + m
        part_names, part_codes = _dictionary(t["layer"])
        lut = np.array([names.setdefault(x, len(names)) for x in part_names], np.int64)
        codes[at : at + m] = lut[part_codes] if len(lut) else 0
        for c in col:
            col[c][at : at + m] = t[c].to_numpy(zero_copy_only=False)
        at += m
    col = {c: v[:at] for c, v in col.items()}
    order = sorted(names, key=names.get)
    out = _Columns(order, codes[:at], col)
    # Layer names by first appearance (the run's order), whatever order the parts named them in.
    first = np.full(len(order), at, np.int64)
    used, pos = np.unique(out.codes, return_index=True)
    first[used] = pos
    rank = np.argsort(first, kind="stable")
    remap = np.empty(len(order), np.int64)
    remap[rank] = np.arange(len(order))
    out.names = [order[i] for i in rank]
    out.codes = remap[out.codes] if len(out.codes) else out.codes
    return out


def _plan_table(data: _Columns, rules: list, extra: bool) -> tuple[Plan, frozenset[int]]:
    """The plan of a layers table (and the ranks that wrote it)."""
    filtered = bool(rules)
    if rules:  # rows a rank wrote after its group's sum failed, for steps the sum already holds (as load does)
        data = _Columns.of(superseded_rows(data.table(), rules))
    names, codes, col = data.names, data.codes, data.col
    repeats = repeated(col["rank"], col["step"], codes)
    if repeats:  # a resumed run re-wrote steps: keep the newest recording of each (rank, step, layer)
        data = _Columns.of(newest_rows(data.table()))
        names, codes, col = data.names, data.codes, data.col
    del data
    winners = versions = None
    if repeats or filtered:
        # Expert rows count only where their (rank, step, layer) recording is the one the layers table kept.
        key = _pack(col["rank"], col["step"], codes)
        order = np.argsort(key, kind="stable")
        winners = key[order]
        versions = _version(col["session"], col["seq"])[order]
    steps_of, E_of, k_of, stats_of = {}, {}, {}, {}
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
    wide = False
    for i, name in enumerate(names):
        rows = order[bounds[i] : bounds[i + 1]]
        step = col["step"][rows].astype(np.int64)
        if len(step) and np.all(step[1:] > step[:-1]):  # the usual case: one rank, steps in order, no gaps needed
            steps, inv = step, np.arange(len(step))
        else:
            steps, inv = np.unique(step, return_inverse=True)
        E = int(col["num_experts"][rows].max())
        k = int(col["top_k"][rows][np.argmax(step)])
        tok = col["tokens"][rows].astype(np.float64)
        n = len(steps)

        def total(values: np.ndarray, _inv=inv, _n=n) -> np.ndarray:
            return np.bincount(_inv, weights=np.nan_to_num(values), minlength=_n)

        def weighted(values: np.ndarray, _tok=tok) -> np.ndarray:
            ok = np.isfinite(values)
            num = total(np.where(ok, values * _tok, 0.0))
            den = total(np.where(ok, _tok, 0.0))
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)

        tokens = total(tok)
        logit = np.full(n, np.nan)
        lam = col["logit_abs_max"][rows].astype(np.float64)
        fin = np.isfinite(lam)
        np.fmax.at(logit, inv[fin], lam[fin])
        entropy = weighted(col["entropy"][rows].astype(np.float64))
        stats_of[name] = {
            "tokens": tokens,
            "dropped": total(col["dropped"][rows].astype(np.float64)),
            "entropy_norm": entropy / np.log(max(E, 2)),
            "z_loss": weighted(col["z_loss"][rows].astype(np.float64)),
            "logit_abs_max": logit,
            "nonfinite": total(col["nonfinite"][rows].astype(np.float64)),
        }
        if "margin_tokens" in col and np.isfinite(col["margin_tokens"][rows]).any():
            mt = col["margin_tokens"][rows].astype(np.float64)

            def recorded(values: np.ndarray, _mt=mt) -> np.ndarray:
                ok = np.isfinite(values)
                out = total(np.where(ok, values, 0.0))
                return np.where(total(ok.astype(np.float64)) > 0, out, np.nan)

            stats_of[name].update(
                margin_tokens=recorded(mt),
                near_ties=recorded(col["near_tie_frac"][rows] * mt),
                margin_sum=recorded(col["margin_mean"][rows] * mt),
                overridden=recorded(col["overridden"][rows].astype(np.float64)),
                override_slots=recorded(col["override_slots"][rows].astype(np.float64)),
            )
        if extra:
            stats_of[name]["aux_loss"] = weighted(col["aux_loss"][rows].astype(np.float64))
            for c in ("cv", "max_share", "dead"):  # as recorded: the last row's of a step (one writer: its only one)
                v = np.full(n, np.nan)
                v[inv] = col[c][rows].astype(np.float64)
                stats_of[name][c] = v
        steps_of[name], E_of[name], k_of[name] = steps, E, k
        wide = wide or bool(n and (tokens * k).max() >= 2**31 - 1)
    rank_ids = frozenset(int(r) for r in np.unique(col["rank"]))
    drops = bool(len(col["dropped"]) and np.any(col["dropped"]))
    return Plan(names, steps_of, E_of, k_of, stats_of, winners, versions, wide, len(rank_ids), drops), rank_ids


def read_layers(run_dir: str | Path, names: list[str], plan: Plan | None = None,
                steps: tuple[int, int] | None = None, files: list[Path] | None = None,
                skipped: list[str] | None = None) -> list[DenseLayer]:
    """The :class:`DenseLayer` of each of ``names`` (all held at once: the caller sizes the request), only its
    steps within ``steps`` = (first, last) when given, from the experts part files ``files`` (default: all the
    run's). Part row groups that hold only other layers, or only other steps, are not decoded. ``plan``: the run's
    ``plan_run`` when the caller has it. Reading only new parts into counts read before is exact when
    ``plan.winners is None`` (no step recorded twice)."""
    run_dir = Path(run_dir)
    plan = plan or plan_run(run_dir, skipped)
    names = [n for n in names if n in plan.steps]
    if steps is not None:
        lo, hi = steps
        cut = {}
        for n in names:
            keep = (plan.steps[n] >= lo) & (plan.steps[n] <= hi)
            cut[n] = keep
        plan = replace(plan, steps={**plan.steps, **{n: plan.steps[n][cut[n]] for n in names}},
                       stats={**plan.stats, **{n: {k: v[cut[n]] for k, v in plan.stats[n].items()} for n in names}})
    if not names:
        return []
    files = part_files(run_dir, EXPERTS) if files is None else files
    return list(_read_group(files, plan, names, skipped, steps, with_gate=True))


def _read_group(files: list[Path], plan: Plan, group: list[str], skipped: list[str] | None,
                steps: tuple[int, int] | None = None, with_gate: bool = False) -> Iterator[DenseLayer]:
    """One pass over the experts parts for ``group``: every layer's counts on the group's shared step axis (the union
    of its layers' steps; usually every layer records every step), in one flat buffer so each part is scattered
    with one vectorized add, whatever the number of layers."""
    dtype = np.int64 if plan.wide else np.int32
    axis = np.unique(np.concatenate([plan.steps[n] for n in group]))
    if len(axis) == 0:
        steps = (0, -1)  # nothing to read: every row group is skipped
    width = np.array([plan.num_experts[n] for n in group], np.int64)
    offset = np.concatenate([[0], np.cumsum(len(axis) * width)])
    tokens = np.zeros(int(offset[-1]), dtype)
    dropped: np.ndarray | None = None
    gate: np.ndarray | None = None
    means: dict[str, list] = {}  # column -> [sum (or the value, one rank), count over ranks or None]
    slot = {n: i for i, n in enumerate(group)}
    contiguous = len(axis) > 0 and int(axis[-1] - axis[0]) + 1 == len(axis)
    index = {n: i for i, n in enumerate(plan.names)}
    # Gate mass only where a view asks for it (the dashboard): the detector does not read it.
    for t, single in _part_batches(files, plan, set(group), skipped, steps, with_gate):
        names, codes = _dictionary(t["layer"])
        lut = np.array([slot.get(n, -1) for n in names], np.int64)
        local = lut[codes]
        step = t["step"].to_numpy()
        expert = t["expert"].to_numpy()
        if (lut >= 0).all() and plan.winners is None and len(step) and _in_range(step, expert, axis, width,
                                                                                  contiguous):
            # The common case, every row kept: no per-row masks at all.
            rows: slice | np.ndarray = slice(None)
            si = step - axis[0] if contiguous else np.searchsorted(axis, step)
            flat = offset[local] + si * width[local] + expert
        else:
            keep = local >= 0
            if not keep.any():
                continue
            if plan.winners is not None:
                global_codes = np.array([index.get(n, -1) for n in names], np.int64)[codes]
                keep &= _is_newest(plan, t["rank"].to_numpy(), step, global_codes, t["session"].to_numpy(),
                                   t["seq"].to_numpy())
            si = np.minimum(np.searchsorted(axis, step), len(axis) - 1)
            lw = width[np.maximum(local, 0)]
            keep &= (axis[si] == step) & (expert >= 0) & (expert < lw)
            rows = np.flatnonzero(keep)
            flat = offset[local[rows]] + si[rows] * lw[rows] + expert[rows]
        into = _Scatter(flat, single)
        into.add(tokens, t["tokens"].to_numpy()[rows].astype(dtype, copy=False))
        if "gate_mass" in t.column_names:  # additive like the counts, but a float (null: not recorded)
            gm = t["gate_mass"].to_numpy(zero_copy_only=False)[rows].astype(np.float64, copy=False)
            fin = np.isfinite(gm)
            if fin.any():
                gate = np.zeros(len(tokens)) if gate is None else gate
                _Scatter(flat[fin], single).add(gate, gm[fin])
        if "dropped" in t.column_names:
            drop = t["dropped"].to_numpy()[rows]
            if drop.any():
                dropped = np.zeros_like(tokens) if dropped is None else dropped
                into.add(dropped, drop.astype(dtype, copy=False))
        for c in MEAN_COLUMNS:
            if c not in t.column_names:
                continue
            b = t[c].to_numpy(zero_copy_only=False)[rows].astype(MEAN_DTYPES[c], copy=False)
            fin = np.isfinite(b)
            if not fin.any():
                continue
            acc = means.get(c)
            if acc is None:  # not setdefault: its default (a group-sized array) would be built for every batch
                acc = means[c] = [np.full(len(tokens), np.nan, MEAN_DTYPES[c]), None]
            if plan.ranks <= 1:  # one rank: the value itself, no count array
                if fin.all():  # the usual case (a value every step): no masked copies
                    into.put(acc[0], b)
                else:
                    acc[0][flat[fin]] = b[fin]
            else:  # the mean over the ranks that hold the value (replicas of one buffer, as load averages)
                acc[1] = np.zeros(len(tokens), np.int32) if acc[1] is None else acc[1]
                cells = flat[fin]
                acc[0][cells] = np.where(acc[1][cells] > 0, acc[0][cells], 0.0)
                into_cells = _Scatter(cells, single)
                into_cells.add(acc[0], b[fin])
                into_cells.add(acc[1], np.ones(len(cells), np.int32))
    for i, name in enumerate(group):
        E = int(width[i])
        rows = np.searchsorted(axis, plan.steps[name])
        whole = len(rows) == len(axis)  # the layer recorded every step of the axis: a view, not a copy

        def part(buf: np.ndarray | None, _i=i, _E=E, _rows=rows, _whole=whole) -> np.ndarray | None:
            if buf is None:
                return None
            block = buf[offset[_i] : offset[_i + 1]].reshape(len(axis), _E)
            return block if _whole else block[_rows]

        mean = {}
        for c, (total, n_ranks) in means.items():
            v = part(total)
            if n_ranks is not None:
                n = part(n_ranks)
                v = np.where(n > 0, v / np.maximum(n, 1).astype(v.dtype), np.nan)
            mean[c] = v if np.isfinite(v).any() else None
        drop = part(dropped)
        yield DenseLayer(name, plan.num_experts[name], plan.top_k[name], plan.steps[name], part(tokens),
                         plan.stats[name], drop if drop is not None and drop.any() else None, mean.get("bias"),
                         grad_norm=mean.get("grad_norm"), gate_mass=part(gate))


class _Scatter:
    """Writes a batch's values into a pass's flat buffers at the cells ``flat``. A part of one rank holds each (step,
    layer, expert) once; in the writer's layout (a layer's rows in step order, its experts in order) it covers a few
    runs of consecutive cells, one per layer, written as slices, several times faster than fancy indexing; other
    one-rank orders are fancy-indexed (``buf[idx] += v``, exact when each index occurs once, ~10x faster than
    ``np.add.at``), and a part mixing ranks (not what moewatch writes, but valid) gets the duplicate-safe
    ``np.add.at``."""

    MAX_RUNS = 4096

    def __init__(self, flat: np.ndarray, single_rank: bool):
        self.flat, self.single = flat, single_rank
        self.runs: list[tuple[int, int, int]] | None = None
        if single_rank and len(flat) > 1:
            breaks = np.flatnonzero(np.diff(flat) != 1) + 1
            if len(breaks) < self.MAX_RUNS:
                bounds = [0, *breaks.tolist(), len(flat)]
                self.runs = [(int(flat[a]), a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def add(self, buf: np.ndarray, values: np.ndarray) -> None:
        if self.runs is not None:
            for at, a, b in self.runs:
                buf[at : at + b - a] += values[a:b]
        elif self.single:
            buf[self.flat] += values
        else:
            np.add.at(buf, self.flat, values)

    def put(self, buf: np.ndarray, values: np.ndarray) -> None:
        """One rank's values (each cell once)."""
        if self.runs is not None:
            for at, a, b in self.runs:
                buf[at : at + b - a] = values[a:b]
        else:
            buf[self.flat] = values


def _in_range(step: np.ndarray, expert: np.ndarray, axis: np.ndarray, width: np.ndarray, contiguous: bool) -> bool:
    """Every row's step is on the axis and its expert below the narrowest layer's count (scalar checks only)."""
    if not contiguous or int(expert.min()) < 0 or int(expert.max()) >= int(width.min()):
        return False
    return int(step.min()) >= int(axis[0]) and int(step.max()) <= int(axis[-1])


def _part_batches(files: list[Path], plan: Plan, group: set[str], skipped: list[str] | None,
                  steps: tuple[int, int] | None = None, gate: bool = False) -> Iterator[tuple[pa.Table, bool]]:
    """The experts rows a pass needs, a row group at a time (so a part of 15 M rows never sits decoded whole), with
    whether each part holds one rank's rows. Only the columns needed are read (drops and bias only where a part has
    any; provenance only when some recordings are dropped), and row groups whose statistics show they hold only
    other layers are skipped (compacted parts keep a row group per layer). A corrupt part is warned about once."""
    for f in files:
        try:
            pf = pq.ParquetFile(f, read_dictionary=["layer"])
            meta = pf.metadata
            columns = ["step", "layer", "expert", "tokens"]
            if plan.winners is not None:
                columns += ["rank", "session", "seq"]
            wanted = ("dropped", "gate_mass", *MEAN_COLUMNS) if gate else ("dropped", *MEAN_COLUMNS)
            columns += [c for c in wanted if may_hold_values(meta, c)]
            single = _single_valued(meta, "rank")
            # Row groups a few at a time, up to BATCH_ROWS rows: one read per part in the usual case (a row group
            # per layer is small), while a compacted part of millions of rows never sits decoded whole.
            batch: list[int] = []
            rows = 0
            for g in _row_groups(meta, group, steps):
                n = meta.row_group(g).num_rows
                if batch and rows + n > BATCH_ROWS:
                    yield pf.read_row_groups(batch, columns=columns), single
                    batch, rows = [], 0
                batch.append(g)
                rows += n
            if batch:
                yield pf.read_row_groups(batch, columns=columns), single
        except (OSError, pa.ArrowException, ValueError, KeyError) as e:
            warn_skipped(f, e, skipped, stacklevel=3)  # once per file, not once per pass


def column_stats(meta: pq.FileMetaData, column: str) -> list | None:
    """The column's statistics in each row group (an entry is None where none were written); None when the part
    has no such column."""
    schema = meta.schema.to_arrow_schema()
    if column not in schema.names:
        return None
    j = schema.get_field_index(column)
    return [meta.row_group(g).column(j).statistics for g in range(meta.num_row_groups)]


def one_value(stats) -> bool:
    return stats is not None and stats.has_min_max and stats.min == stats.max


def _row_groups(meta: pq.FileMetaData, group: set[str], steps: tuple[int, int] | None = None) -> list[int]:
    """Row groups that may hold a layer of ``group`` (and a step within ``steps``): all but those whose statistics
    name one other layer, or a step range outside ``steps``."""
    stats = column_stats(meta, "layer") or [None] * meta.num_row_groups
    out = [g for g, st in enumerate(stats) if not (one_value(st) and st.min not in group)]
    if steps is not None:
        step_stats = column_stats(meta, "step") or [None] * meta.num_row_groups
        lo, hi = steps
        out = [g for g in out if not (step_stats[g] is not None and step_stats[g].has_min_max
                                      and (step_stats[g].max < lo or step_stats[g].min > hi))]
    return out


def _single_valued(meta: pq.FileMetaData, column: str) -> bool:
    """Whether the row-group statistics prove the column holds one value in the whole part."""
    stats = column_stats(meta, column)
    return stats is not None and all(one_value(st) for st in stats) and len({st.min for st in stats}) <= 1


def has_values(files: list[Path], column: str) -> bool:
    """Whether some part's statistics show values in ``column`` (a gradient norm, say; cheap: footers only)."""
    for f in files:
        try:
            if may_hold_values(pq.read_metadata(f), column):
                return True
        except (OSError, pa.ArrowException, ValueError):
            continue
    return False


def _has_bias(f: Path) -> bool:
    try:
        return may_hold_values(pq.read_metadata(f), "bias")
    except (OSError, pa.ArrowException, ValueError):
        return False


def may_hold_values(meta: pq.FileMetaData, column: str) -> bool:
    """False when the row-group statistics show the column is all null (bias) or all zero (dropped)."""
    stats = column_stats(meta, column)
    if stats is None:
        return False
    for g, st in enumerate(stats):
        if st is None or not st.has_min_max:
            if st is None or st.null_count != meta.row_group(g).num_rows:
                return True
            continue
        if column in MEAN_COLUMNS or column == "gate_mass" or st.min != 0 or st.max != 0:
            return True
    return False


def _is_newest(plan: Plan, rank, step, codes, session, seq) -> np.ndarray:
    key = _pack(rank, step, codes)
    pos = np.minimum(np.searchsorted(plan.winners, key), len(plan.winners) - 1)
    return (plan.winners[pos] == key) & (plan.versions[pos] == _version(session, seq))


def _pack(rank, step, codes) -> np.ndarray:
    # rank: 20 bits, layer code: 16 bits, step: 28 bits (a quarter of a billion steps).
    return ((np.asarray(rank, np.int64) + 1) << 44) | (np.asarray(codes, np.int64) << 28) | np.asarray(step, np.int64)


def _version(session, seq) -> np.ndarray:
    return (np.asarray(session, np.int64) << 40) | np.asarray(seq, np.int64)


def _dictionary(col: pa.ChunkedArray) -> tuple[list[str], np.ndarray]:
    """A layer column's dictionary and each row's code into it (no re-numbering: cheap on every part)."""
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if not pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_encode()
    return [str(n) for n in arr.dictionary.to_pylist()], arr.indices.to_numpy(zero_copy_only=False)


def _names_and_codes(col: pa.ChunkedArray) -> tuple[list[str], np.ndarray]:
    """Layer names in order of first appearance and each row's code into them."""
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if not pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_encode()
    names = [str(n) for n in arr.dictionary.to_pylist()]
    codes = arr.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    if not len(codes):
        return [], codes
    # Re-number by first appearance so the order is the run's, whatever the dictionary's order.
    first = np.full(len(names), len(codes), np.int64)
    used, at = np.unique(codes, return_index=True)
    first[used] = at
    present = np.flatnonzero(first < len(codes))
    present = present[np.argsort(first[present], kind="stable")]
    remap = np.full(len(names), -1, np.int64)
    remap[present] = np.arange(len(present))
    return [names[i] for i in present], remap[codes]
