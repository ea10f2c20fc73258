"""From run tables to what the rules read: per-layer dense arrays, then fixed windows of steps.

A layer's data is held as ``[steps, experts]`` numpy arrays (:class:`LayerData`) rather than a long table, so a run of
100k steps x 64 experts costs 25-50 MB per layer and every reduction is one numpy call. Windows (:class:`Windows`) sum
a fixed number of consecutive recorded steps; all rules look at windows, never at single steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .config import DetectorConfig

# Per-step layer columns the rules use; a missing column reads as NaN (or 0 for counts).
LAYER_STATS = ("tokens", "dropped", "entropy_norm", "z_loss", "logit_abs_max", "nonfinite")
# Optional per-step sums behind the routing diagnostics (schema 2; absent or NaN where a router does not expose them).
ROUTING_STATS = ("margin_tokens", "near_ties", "margin_sum", "overridden", "override_slots")
_EXPERT_COLUMNS = ("step", "layer", "expert", "tokens")
_LAYER_COLUMNS = ("step", "layer")


def bias_moves(bias: np.ndarray | None) -> bool:
    """Whether a bias series is real bias balancing: it differs from one value somewhere.

    Routers with a zero buffer they never update record a constant bias; levers and the bias rule must ignore it.
    """
    return bias is not None and bool(np.isfinite(bias).any()) and bool(np.nanmax(bias) > np.nanmin(bias))


@dataclass
class LayerData:
    """One layer's per-step series, sorted by step. ``tokens``/``dropped``/``bias`` are ``[S, E]``."""

    layer: str
    num_experts: int
    top_k: int
    steps: np.ndarray
    tokens: np.ndarray
    stats: dict[str, np.ndarray]
    dropped: np.ndarray | None = None
    bias: np.ndarray | None = None
    block: int = 1  # > 1: tokens/dropped/bias hold exact sums over blocks of this many steps (rollups)
    head: np.ndarray | None = None  # with blocks: the first steps' counts, per step (for the window size)
    placement: np.ndarray | None = None  # [E] expert-parallel device of each expert (moewatch.store.placement)
    grad_norm: np.ndarray | None = None  # [S, E] each expert's gradient norm per step (NaN: not recorded)
    grad_steps: np.ndarray | None = None  # with blocks: grad_norm is [blocks, E] sums of norms over this many steps

    def __len__(self) -> int:
        return len(self.steps)

    def slice(self, start: int, stop: int | None = None) -> LayerData:
        if self.block != 1:
            raise ValueError("a layer read from rollups cannot be sliced by step")
        sl = slice(start, stop)
        return LayerData(
            self.layer,
            self.num_experts,
            self.top_k,
            self.steps[sl],
            self.tokens[sl],
            {k: v[sl] for k, v in self.stats.items()},
            None if self.dropped is None else self.dropped[sl],
            None if self.bias is None else self.bias[sl],
            placement=self.placement,
            grad_norm=None if self.grad_norm is None else self.grad_norm[sl],
        )

    @staticmethod
    def concat(a: LayerData, b: LayerData) -> LayerData:
        """``a`` then ``b`` (a live tracker's pending rows and the next flush); optional arrays padded as absent."""
        if a.tokens.shape[1] != b.tokens.shape[1]:
            raise ValueError(
                f"layer {a.layer!r} changed its expert count from {a.tokens.shape[1]} to {b.tokens.shape[1]}"
            )
        e = a.tokens.shape[1]

        def stack(x: np.ndarray | None, y: np.ndarray | None, fill: float) -> np.ndarray | None:
            if x is None and y is None:
                return None
            return np.concatenate([np.full((len(a), e), fill) if x is None else x,
                                   np.full((len(b), e), fill) if y is None else y])

        return LayerData(
            a.layer,
            max(a.num_experts, b.num_experts),
            b.top_k,
            np.concatenate([a.steps, b.steps]),
            np.concatenate([a.tokens, b.tokens]),
            {k: np.concatenate([a.stats.get(k, np.full(len(a), np.nan)), b.stats.get(k, np.full(len(b), np.nan))])
             for k in dict.fromkeys([*LAYER_STATS, *a.stats, *b.stats])},
            stack(a.dropped, b.dropped, 0.0),
            stack(a.bias, b.bias, np.nan),
            placement=b.placement if b.placement is not None else a.placement,
            grad_norm=stack(a.grad_norm, b.grad_norm, np.nan),
        )


@dataclass
class Windows:
    """Consecutive windows of one layer: per-window sums (loads) or token-weighted means (stats)."""

    first: np.ndarray  # first step of each window
    last: np.ndarray  # last step of each window
    load: np.ndarray  # [W, E] assignments per expert
    tokens: np.ndarray  # [W] tokens routed
    dropped: np.ndarray  # [W] dropped assignments (layer total, including slots with no expert)
    entropy_norm: np.ndarray  # [W]
    z_loss: np.ndarray  # [W]
    logit_abs_max: np.ndarray  # [W]
    nonfinite: np.ndarray  # [W]
    dropped_e: np.ndarray | None = None  # [W, E]
    bias: np.ndarray | None = None  # [W, E], value at the window's last step
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    placement: np.ndarray | None = None  # [E] expert-parallel device of each expert
    grad_norm: np.ndarray | None = None  # [W, E] each expert's mean gradient norm over the window's steps

    def __len__(self) -> int:
        return len(self.first)


def window_size(data: LayerData | np.ndarray, config: DetectorConfig) -> int:
    """Steps per window for a layer (its ``LayerData`` or its ``[steps, experts]`` counts): wide enough that each
    expert expects ``min_window_load`` assignments.

    Decided from the first ``window_steps`` recorded steps, so a live tracker, a batch report and the dashboard's
    charts agree.
    """
    if isinstance(data, LayerData):
        tokens = data.tokens if data.block == 1 else data.head
    else:
        tokens = np.asarray(data)
    head = tokens[: config.window_steps]
    per_step = float(np.median(head.sum(axis=1))) if len(head) else 0.0
    if per_step <= 0:
        return config.max_window_steps
    need = math.ceil(config.min_window_load * tokens.shape[1] / per_step)
    return int(min(max(config.window_steps, need), config.max_window_steps))


def make_windows(data: LayerData, size: int, include_tail: bool) -> tuple[Windows, int]:
    """Cut ``data`` into windows of ``size`` steps; returns them and how many steps they used.

    A trailing partial window is kept only when ``include_tail`` and it holds at least half a window (a report at
    the end of the run), so its loads are comparable with the others'.
    """
    n = len(data)
    full = n // size
    used = full * size
    starts = list(range(0, used, size))
    if include_tail and n - used >= max(1, (size + 1) // 2):
        starts.append(used)
        used = n
    if not starts:
        return _empty_windows(data), 0
    idx = np.asarray(starts, dtype=np.int64)
    ends = np.append(idx[1:], used) - 1
    if data.block != 1 and size % data.block:
        raise ValueError(f"windows of {size} steps cannot be cut from blocks of {data.block}")
    b = data.block
    cut = -(-used // b)  # blocks the windows use: whole blocks, the last one partial only at the run's end
    tokens = data.stats["tokens"][:used].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        wsum = np.add.reduceat(tokens, idx)
        entropy = _weighted_mean(data.stats["entropy_norm"][:used], tokens, idx, wsum)
        z_loss = _weighted_mean(data.stats["z_loss"][:used], tokens, idx, wsum)
    logit = data.stats["logit_abs_max"][:used]
    return (
        Windows(
            first=data.steps[idx],
            last=data.steps[ends],
            load=_window_sum(data.tokens, size, full, used) if b == 1 else _block_sum(data.tokens, idx // b, cut),
            tokens=wsum,
            dropped=np.add.reduceat(data.stats["dropped"][:used].astype(np.float64), idx),
            entropy_norm=entropy,
            z_loss=z_loss,
            logit_abs_max=np.fmax.reduceat(logit, idx),
            nonfinite=np.add.reduceat(data.stats["nonfinite"][:used].astype(np.float64), idx),
            dropped_e=None if data.dropped is None else (
                _window_sum(data.dropped, size, full, used) if b == 1 else _block_sum(data.dropped, idx // b, cut)),
            bias=None if data.bias is None else data.bias[ends // b],
            placement=data.placement,
            grad_norm=_grad_windows(data, idx, used, cut),
            extra=routing_windows(data.stats, idx, used),
        ),
        used,
    )


def routing_windows(stats: dict[str, np.ndarray], idx: np.ndarray, used: int) -> dict[str, np.ndarray]:
    """Per window: near_tie_frac, margin_mean and override_frac from the summed counts (exact over steps and
    ranks), NaN where the router recorded none."""
    def total(name: str) -> tuple[np.ndarray, np.ndarray]:
        v = stats.get(name)
        if v is None:
            return np.zeros(len(idx)), np.zeros(len(idx), bool)
        v = v[:used].astype(np.float64)
        ok = np.isfinite(v)
        return np.add.reduceat(np.where(ok, v, 0.0), idx), np.add.reduceat(ok, idx) > 0

    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for name, num, den in (("near_tie_frac", "near_ties", "margin_tokens"), ("margin_mean", "margin_sum",
                               "margin_tokens"), ("override_frac", "overridden", "override_slots")):
            (n, n_ok), (d, d_ok) = total(num), total(den)
            out[name] = np.where(n_ok & d_ok & (d > 0), n / np.where(d > 0, d, 1.0), np.nan)
    return out


def nanmean_bins(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``[rows, ...]`` -> ``[bins, ...]`` means over consecutive bins of rows starting at ``starts`` (the last bin
    runs to the end), ignoring NaN (steps without a recorded value). The detector's windows of gradient norms and
    the dashboard's columns of them and of margin histograms use this one."""
    ok = np.isfinite(values)
    x = np.where(ok, values, 0)
    n, k = len(values), len(starts)
    size = int(starts[1] - starts[0]) if k > 1 else n
    if k and starts[0] == 0 and size > 0 and (k - 1) * size < n and (np.diff(starts) == size).all():
        # Equal bins, the last running to the end (the detector's windows): a reshape-sum, several times faster
        # than reduceat on [steps, experts] arrays. Rows past the k-th (the last bin's remainder) fold into it.
        full = min(k, n // size)
        sums, counts = _window_sum(x, size, full, n), _window_sum(ok, size, full, n)
        if len(sums) > k:
            sums[k - 1] += sums[k:].sum(axis=0)
            counts[k - 1] += counts[k:].sum(axis=0)
            sums, counts = sums[:k], counts[:k]
    else:
        sums = np.add.reduceat(x, starts, axis=0, dtype=np.float64)
        counts = np.add.reduceat(ok, starts, axis=0, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


def _grad_windows(data: LayerData, idx: np.ndarray, used: int, cut: int) -> np.ndarray | None:
    """[W, E] each expert's mean gradient norm over the window's recorded steps: from the per-step norms, or from a
    rollup's block sums and step counts (the same mean: windows are whole blocks)."""
    if data.grad_norm is None:
        return None
    if data.block == 1:
        return nanmean_bins(data.grad_norm[:used], idx)
    if data.grad_steps is None:
        return None
    starts = idx // data.block
    with np.errstate(invalid="ignore", divide="ignore"):
        return _block_sum(data.grad_norm, starts, cut) / _block_sum(data.grad_steps, starts, cut)


def _window_sum(arr: np.ndarray, size: int, full: int, used: int) -> np.ndarray:
    """[S, E] -> [W, E] float64 sums; a reshape-sum is ~6x faster than reduceat on the big per-expert arrays."""
    acc = np.int64 if np.issubdtype(arr.dtype, np.integer) else np.float64
    head = arr[: full * size].reshape(full, size, arr.shape[1]).sum(axis=1, dtype=acc)
    if used > full * size:
        head = np.concatenate([head, arr[full * size : used].sum(axis=0, dtype=acc)[None, :]])
    return head.astype(np.float64)


def _block_sum(blocks: np.ndarray, starts: np.ndarray, cut: int) -> np.ndarray:
    """[blocks, E] -> [W, E] float64 sums of the blocks from each window's first block."""
    return np.add.reduceat(blocks[:cut], starts, axis=0, dtype=np.float64)


def _weighted_mean(values: np.ndarray, weights: np.ndarray, idx: np.ndarray, wsum: np.ndarray) -> np.ndarray:
    # NaN-aware: steps where the stat is missing drop out of both numerator and denominator.
    ok = np.isfinite(values)
    num = np.add.reduceat(np.where(ok, values * weights, 0.0), idx)
    den = np.add.reduceat(np.where(ok, weights, 0.0), idx)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _empty_windows(data: LayerData) -> Windows:
    e = data.tokens.shape[1]
    z = np.zeros(0)
    return Windows(
        first=np.zeros(0, np.int64),
        last=np.zeros(0, np.int64),
        load=np.zeros((0, e)),
        tokens=z,
        dropped=z,
        entropy_norm=z,
        z_loss=z,
        logit_abs_max=z,
        nonfinite=z,
        dropped_e=None if data.dropped is None else np.zeros((0, e)),
        bias=None if data.bias is None else np.zeros((0, e)),
    )


def layer_data_from_dense(dense) -> LayerData:
    """A layer streamed by :func:`moewatch.store.dense.iter_dense_layers` (all ranks summed) as the rules' input.

    Same rules as :func:`layer_data_from_frames`: no drops array when nothing was dropped, no bias unless it moves,
    and a missing per-step token count falls back to assignments / k.
    """
    stats = {k: np.asarray(dense.stats[k], np.float64).copy() for k in (*LAYER_STATS, *ROUTING_STATS)
             if k in dense.stats}
    no_tok = ~np.isfinite(stats["tokens"])
    if no_tok.any() and dense.block != 1:
        raise ValueError(f"layer {dense.layer!r} has steps without a token count: read it per step, not from rollups")
    if no_tok.any():
        stats["tokens"][no_tok] = dense.tokens[no_tok].sum(axis=1) / max(dense.top_k, 1)
    dropped = dense.dropped if dense.dropped is not None and dense.dropped.any() else None
    bias = dense.bias if bias_moves(dense.bias) else None
    return LayerData(dense.layer, dense.num_experts, dense.top_k, dense.steps, dense.tokens, stats, dropped, bias,
                     dense.block, dense.head, grad_norm=getattr(dense, "grad_norm", None),
                     grad_steps=getattr(dense, "grad_steps", None))


def layer_data_from_frames(layers: pd.DataFrame, experts: pd.DataFrame) -> list[LayerData]:
    """Split the (global-view) ``layers`` and ``experts`` tables into per-layer arrays, vectorized.

    Steps are the union of both tables' steps for the layer; an expert row missing for a step reads as 0 tokens. A
    bias column holding one constant value is treated as no bias.
    Raises ValueError naming a missing column or when rows of several ranks are mixed (pass ``run.global_view()``).
    """
    if len(layers) == 0 and len(experts) == 0:
        return []
    for name, df, cols in (("experts", experts, _EXPERT_COLUMNS), ("layers", layers, _LAYER_COLUMNS)):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise ValueError(f"the {name} table lacks column(s) {', '.join(missing)}")
    for name, df in (("experts", experts), ("layers", layers)):
        if "rank" in df.columns and len(df) and df["rank"].nunique() > 1:
            raise ValueError(f"the {name} table mixes several ranks; pass the global view (run.global_view())")

    lcodes, lnames = _factorize(layers["layer"])
    ecodes, enames = _factorize(experts["layer"])
    names = list(dict.fromkeys([*lnames, *enames]))
    index = {name: i for i, name in enumerate(names)}
    # Small integer codes: numpy's stable sort on int16 is a radix sort, O(rows) even for 100M+ expert rows.
    code_type = np.int16 if len(names) < 2**15 else np.int64
    lcodes = np.array([index[n] for n in lnames], dtype=code_type)[lcodes] if len(lcodes) else lcodes
    ecodes = np.array([index[n] for n in enames], dtype=code_type)[ecodes] if len(ecodes) else ecodes
    eorder = np.argsort(ecodes, kind="stable")
    eb = np.searchsorted(ecodes[eorder], np.arange(len(names) + 1))
    lorder = np.argsort(lcodes, kind="stable")
    lb = np.searchsorted(lcodes[lorder], np.arange(len(names) + 1))

    e_step = _numpy(experts["step"], np.int64)
    e_expert = _numpy(experts["expert"], np.int64)
    e_tokens = _numpy(experts["tokens"])
    e_dropped = _numpy(experts["dropped"]) if "dropped" in experts.columns else None
    e_bias = _numpy(experts["bias"], np.float64) if "bias" in experts.columns else None
    e_grad = _numpy(experts["grad_norm"], np.float64) if "grad_norm" in experts.columns else None
    l_step = _numpy(layers["step"], np.int64)
    lcols = {c: _numpy(layers[c], np.float64) for c in LAYER_STATS if c in layers.columns}
    # Routing diagnostics from a layers frame: the counts behind the fractions (global view: already rank-summed).
    # (Only where recorded, as the dense reader does: a schema-1 run, or a router without them, has none.)
    mt = _numpy(layers["margin_tokens"], np.float64) if "margin_tokens" in layers.columns else None
    if mt is not None and np.isfinite(mt).any():
        lcols["margin_tokens"] = mt
        if "near_tie_frac" in layers.columns:
            lcols["near_ties"] = _numpy(layers["near_tie_frac"], np.float64) * mt
        if "margin_mean" in layers.columns:
            lcols["margin_sum"] = _numpy(layers["margin_mean"], np.float64) * mt
        for c in ("overridden", "override_slots"):
            if c in layers.columns:
                lcols[c] = _numpy(layers[c], np.float64)

    out: list[LayerData] = []
    for code, name in enumerate(names):
        erows = eorder[eb[code] : eb[code + 1]]
        lrows = lorder[lb[code] : lb[code + 1]]
        esteps = e_step[erows]
        steps = np.union1d(_sorted_unique(esteps), l_step[lrows])
        n_e = int(e_expert[erows].max()) + 1 if len(erows) else 0
        if len(lrows) and "num_experts" in layers.columns:
            n_e = max(n_e, int(layers["num_experts"].to_numpy()[lrows].max()))
        top_k = int(layers["top_k"].to_numpy()[lrows][-1]) if len(lrows) and "top_k" in layers.columns else 1
        if n_e == 0:
            continue
        si = np.searchsorted(steps, esteps)
        ex = e_expert[erows]
        tokens = np.zeros((len(steps), n_e), dtype=np.int64)
        tokens[si, ex] = e_tokens[erows]
        dropped = None
        if e_dropped is not None and np.any(e_dropped[erows]):
            dropped = np.zeros((len(steps), n_e), dtype=np.int64)
            dropped[si, ex] = e_dropped[erows]
        bias = None
        eb_rows = e_bias[erows] if e_bias is not None else None
        if bias_moves(eb_rows):
            bias = np.full((len(steps), n_e), np.nan)
            bias[si, ex] = eb_rows
        grad = None
        if e_grad is not None and np.isfinite(e_grad[erows]).any():
            grad = np.full((len(steps), n_e), np.nan)
            grad[si, ex] = e_grad[erows]
        lsi = np.searchsorted(steps, l_step[lrows])
        stats: dict[str, np.ndarray] = {}
        for col in (*LAYER_STATS, *(c for c in ROUTING_STATS if c in lcols)):
            fill = 0.0 if col in ("nonfinite", "dropped") else np.nan
            arr = np.full(len(steps), fill)
            if col in lcols:
                arr[lsi] = lcols[col][lrows]
            stats[col] = arr
        # The layers table's token count is what top-k was applied to; fall back to assignments / k if missing.
        no_tok = ~np.isfinite(stats["tokens"])
        if no_tok.any():
            stats["tokens"][no_tok] = tokens[no_tok].sum(axis=1) / max(top_k, 1)
        out.append(LayerData(str(name), n_e, top_k, steps, tokens, stats, dropped, bias, grad_norm=grad))
    return out


def _factorize(col: pd.Series) -> tuple[np.ndarray, list[str]]:
    # pandas factorizes Arrow-backed strings and categoricals without building a Python object per row.
    codes, uniques = pd.factorize(col, sort=False)
    return codes, [str(u) for u in uniques]


def _numpy(col: pd.Series, dtype: type | None = None) -> np.ndarray:
    """A column as numpy without a copy when it already is one; missing values read as NaN for floats."""
    if dtype is np.float64:
        return col.to_numpy(np.float64, na_value=np.nan)
    return col.to_numpy(dtype) if dtype is not None else col.to_numpy()


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    if len(values) == 0:
        return values
    if np.all(values[1:] >= values[:-1]):
        return values[np.concatenate(([True], values[1:] != values[:-1]))]
    return np.unique(values)
