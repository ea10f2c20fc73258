"""Synthetic routing runs with known ground truth, for the detector's tests, evaluation set and benchmark.

A :class:`Scenario` says how one layer's expert load evolves (a collapse ramp, an oscillation, a recovery...); the
other layers stay healthy. :func:`simulate` samples per-step token counts from those load shares and derives every
column of the run tables from the counts, so frames built here conform to ``moewatch.store.schema``.

The load model: shares ``p(t) = (1 - c(t)) * base(t) + c(t) * hot`` where ``base`` is a healthy, slowly wandering
imbalance, ``hot`` puts all mass on a few experts and ``c(t)`` is the scenario's concentration curve. With uniform
``base`` the load CV is exactly ``c * sqrt(E / hot - 1)``, which makes ground truth easy to reason about.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .windows import LayerData

SHAPES = (
    "healthy", "small_batch", "drift", "sudden", "dead_gradual", "oscillation", "recovery", "drops", "logit_drift",
    "bias_runaway", "nonfinite", "ep_hot",
)


@dataclass(frozen=True)
class Scenario:
    """One synthetic run. ``label``: healthy | collapse | degraded (warnings are fair, a critical is not)."""

    name: str
    shape: str
    label: str
    steps: int = 3000
    num_experts: int = 16
    top_k: int = 2
    tokens: int = 2048
    layers: int = 2
    seed: int = 0
    onset: int = 1000
    ramp: int = 1000
    strength: float = 0.9
    hot: int = 1
    wander: float = 0.2
    wander_cap: float = 0.4  # the healthy base never exceeds this true load CV: what "healthy" means here
    capacity_factor: float | None = None
    aux_free: bool = False
    period: int = 600
    ep_size: int | None = None  # expert-parallel devices (contiguous placement); "ep_hot" loads device 0's experts

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"Scenario.shape must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        if self.label not in ("healthy", "collapse", "degraded"):
            raise ValueError(f"Scenario.label must be healthy, collapse or degraded, got {self.label!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"Scenario.top_k must be in [1, num_experts], got {self.top_k}")
        if self.ep_size is not None and (self.ep_size < 2 or self.num_experts % self.ep_size):
            raise ValueError(f"Scenario.ep_size must be >= 2 and divide num_experts, got {self.ep_size}")
        if self.shape == "ep_hot" and self.ep_size is None:
            raise ValueError("Scenario shape 'ep_hot' needs an ep_size")

    @property
    def placement(self) -> np.ndarray | None:
        if self.ep_size is None:
            return None
        from moewatch.store.placement import contiguous

        return contiguous(self.num_experts, self.ep_size)

    @property
    def collapse_step(self) -> int | None:
        """Step where the collapse is complete (end of the ramp); None for runs that do not collapse."""
        return self.onset + self.ramp if self.label == "collapse" else None

    def layer_name(self, i: int) -> str:
        return f"model.layers.{i}.mlp.gate"


@dataclass
class SimLayer:
    """One simulated layer: per-step per-expert arrays and per-step layer columns."""

    name: str
    top_k: int
    steps: np.ndarray
    tokens: np.ndarray  # [S, E] assignments that reached each expert
    dropped: np.ndarray  # [S, E]
    prob: np.ndarray | None  # [S, E] mean router prob
    bias: np.ndarray | None  # [S, E]
    cols: dict[str, np.ndarray]  # per-step layers-table columns
    placement: np.ndarray | None = None  # [E] expert-parallel device of each expert

    def layer_data(self) -> LayerData:
        stats = {k: self.cols[k].astype(np.float64) for k in ("tokens", "dropped", "entropy_norm", "z_loss",
                                                             "logit_abs_max", "nonfinite")}
        return LayerData(self.name, self.tokens.shape[1], self.top_k, self.steps, self.tokens, stats,
                         self.dropped if self.dropped.any() else None, self.bias, placement=self.placement)


@dataclass
class SyntheticRun:
    scenario: Scenario
    layers: list[SimLayer] = field(default_factory=list)

    def layer_data(self) -> list[LayerData]:
        return [layer.layer_data() for layer in self.layers]

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(layers, experts) tables with the run-directory schema's columns and dtypes (rank 0)."""
        lrows, erows = [], []
        for layer in self.layers:
            s, e = layer.tokens.shape
            lrows.append(pd.DataFrame({"step": layer.steps, "layer": layer.name, **layer.cols}))
            prob = layer.prob if layer.prob is not None else np.full((s, e), np.nan)
            bias = layer.bias if layer.bias is not None else np.full((s, e), np.nan)
            erows.append(pd.DataFrame({
                "step": np.repeat(layer.steps, e),
                "layer": layer.name,
                "expert": np.tile(np.arange(e, dtype=np.int32), s),
                "tokens": layer.tokens.reshape(-1).astype(np.int64),
                "dropped": layer.dropped.reshape(-1).astype(np.int64),
                "prob_mean": prob.reshape(-1).astype(np.float64),
                "bias": bias.reshape(-1).astype(np.float64),
            }))
        layers, experts = pd.concat(lrows, ignore_index=True), pd.concat(erows, ignore_index=True)
        for df in (layers, experts):
            df["rank"] = np.int32(0)
            df["session"] = np.int32(0)
            df["seq"] = df["step"].astype(np.int64)
        return _with_schema_dtypes(layers, experts)

    def write(self, path: str | Path, status: str = "finished") -> Path:
        """A run directory (run.json + one Parquet part per table), as a finished moewatch run would leave it."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from moewatch.store import schema

        path = Path(path)
        layers, experts = self.frames()
        for table, df, sch in ((schema.LAYERS, layers, schema.LAYERS_SCHEMA),
                               (schema.EXPERTS, experts, schema.EXPERTS_SCHEMA)):
            (path / table).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pandas(df[sch.names], schema=sch, preserve_index=False),
                           path / table / "part-r0-s0-000000.parquet")
        sc = self.scenario
        manifest = {
            "schema_version": schema.SCHEMA_VERSION,
            "status": status,
            "model_class": "SyntheticMoE",
            "world_size": 1,
            "routers": [{"name": layer.name, "num_experts": sc.num_experts, "top_k": sc.top_k,
                         "capacity": _capacity(sc)} for layer in self.layers],
            "meta": {"scenario": sc.name, "shape": sc.shape, "label": sc.label, "collapse_step": sc.collapse_step},
        }
        if sc.ep_size is not None:
            manifest["ep_size"] = sc.ep_size
        (path / schema.MANIFEST).write_text(json.dumps(manifest, indent=2))
        return path


def _with_schema_dtypes(layers: pd.DataFrame, experts: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    from moewatch.store import schema

    def cast(df: pd.DataFrame, sch) -> pd.DataFrame:
        out = {}
        for f in sch:
            if f.name not in df:  # a column the simulation has no value for (schema 2's routing diagnostics): null
                dtype = f.type.to_pandas_dtype()
                out[f.name] = np.full(len(df), np.nan) if dtype == np.float64 else np.full(len(df), None, object)
                continue
            col = df[f.name]
            out[f.name] = col.astype(str) if f.name == "layer" else col.to_numpy().astype(f.type.to_pandas_dtype())
        return pd.DataFrame(out)

    return cast(layers, schema.LAYERS_SCHEMA), cast(experts, schema.EXPERTS_SCHEMA)


def _capacity(sc: Scenario) -> int | None:
    if sc.capacity_factor is None:
        return None
    return int(math.floor(sc.capacity_factor * sc.tokens * sc.top_k / sc.num_experts))


def concentration(sc: Scenario, t: np.ndarray) -> np.ndarray:
    """The scenario's c(t) in [0, 1] for the affected layer."""
    ramp = np.clip((t - sc.onset) / max(sc.ramp, 1), 0.0, 1.0)
    if sc.shape in ("healthy", "small_batch", "logit_drift", "nonfinite"):
        return np.zeros_like(t, dtype=np.float64)
    if sc.shape in ("drift", "sudden", "dead_gradual", "drops", "ep_hot"):
        return sc.strength * ramp
    if sc.shape == "oscillation":
        phase = np.clip(t - sc.onset, 0, None)
        return sc.strength * (1 - np.cos(2 * np.pi * phase / sc.period)) / 2
    if sc.shape == "recovery":
        down = np.clip((t - sc.onset - sc.ramp) / max(sc.ramp, 1), 0.0, 1.0)
        return sc.strength * (ramp - down)
    if sc.shape == "bias_runaway":
        return sc.strength * np.where(t >= sc.onset, 1.0, ramp)
    raise ValueError(sc.shape)


def cap_shares(p: np.ndarray, top_k: int) -> np.ndarray:
    """Clip shares at 1/k (an expert sees each token at most once) and hand the excess to the others."""
    if top_k <= 1:
        return p
    cap = 1.0 / top_k
    rows = np.flatnonzero(p.max(axis=1) > cap)
    if not len(rows):
        return p
    q = p[rows]
    for _ in range(top_k + 1):
        over = q > cap
        if not over.any():
            break
        excess = np.where(over, q - cap, 0.0).sum(axis=1, keepdims=True)
        room = np.where(over, 0.0, q)
        q = np.where(over, cap, q + excess * room / np.maximum(room.sum(axis=1, keepdims=True), 1e-12))
    p = p.copy()
    p[rows] = q
    return p


def _base_shares(rng: np.random.Generator, t: np.ndarray, e: int, wander: float, cap: float) -> np.ndarray:
    """Healthy imbalance: a fixed per-expert preference plus slow wander (random sinusoids), CV ~ ``wander``.

    The wander's shortest period is an eighth of the run, so it is computed on a grid of at most 4096 points and
    held between them: the same curve at a fraction of the cost on 100k-step runs.
    """
    span = float(max(t[-1] - t[0], 1))
    stride = max(1, math.ceil(len(t) / 4096))
    grid = t[::stride].astype(np.float64)
    fixed = rng.standard_normal(e)
    periods = span / rng.uniform(2.0, 8.0, size=(3, e))
    phases = rng.uniform(0, 2 * np.pi, size=(3, e))
    amps = rng.standard_normal((3, e)) / math.sqrt(3)
    slow = sum(amps[i] * np.sin(2 * np.pi * grid[:, None] / periods[i] + phases[i]) for i in range(3))
    logit = wander * (fixed + slow) / math.sqrt(2)
    p = _softmax(logit)
    # With few experts one draw can wander far; shrink it until its true CV stays under the cap.
    for _ in range(20):
        worst = float((p.std(axis=1) / p.mean(axis=1)).max())
        if worst <= cap:
            break
        logit *= 0.9 * cap / worst
        p = _softmax(logit)
    return np.repeat(p, stride, axis=0)[: len(t)] if stride > 1 else p


def _softmax(logit: np.ndarray) -> np.ndarray:
    p = np.exp(logit - logit.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def simulate(sc: Scenario, lean: bool = False) -> SyntheticRun:
    """Sample a run. ``lean`` skips what only the tables need (probs) to keep huge runs small."""
    rng = np.random.default_rng(sc.seed)
    t = np.arange(sc.steps, dtype=np.int64)
    run = SyntheticRun(sc)
    for i in range(sc.layers):
        affected = i == 0
        run.layers.append(_simulate_layer(sc, rng, t, sc.layer_name(i), affected, lean))
    return run


def _simulate_layer(sc: Scenario, rng: np.random.Generator, t: np.ndarray, name: str, affected: bool,
                    lean: bool) -> SimLayer:
    e, k, n_tok = sc.num_experts, sc.top_k, sc.tokens
    tf = t.astype(np.float64)
    base = _base_shares(rng, tf, e, sc.wander, sc.wander_cap)
    c = concentration(sc, tf) if affected else np.zeros(len(t))
    hot = np.zeros(e)
    hot_idx = rng.choice(e, size=min(sc.hot, e), replace=False)
    if sc.shape == "ep_hot":  # the experts device 0 holds get the extra load, evenly: a hot device, no hot expert
        hot_idx = np.flatnonzero(sc.placement == 0)
    hot[hot_idx] = 1.0 / len(hot_idx)
    p = cap_shares((1 - c)[:, None] * base + c[:, None] * hot[None, :], k) if c.any() else base
    n = n_tok * k
    # Batch composition makes real per-step loads over-dispersed; 15% extra noise on each expert's load.
    mean = n * p
    if len(t) * e <= 5_000_000:
        jitter = np.exp(0.15 * rng.standard_normal(p.shape) - 0.15**2 / 2)
        q = p * jitter
        counts = rng.multinomial(n, q / q.sum(axis=1, keepdims=True))
    else:
        # Normal approximation for huge runs: a multinomial per step would dominate the benchmark's set-up.
        sd = np.sqrt(mean + (0.15 * mean) ** 2).astype(np.float32)
        counts = np.rint(mean.astype(np.float32) + sd * rng.standard_normal(p.shape, dtype=np.float32))
        counts = np.clip(counts, 0, n).astype(np.int32)
    if sc.capacity_factor is not None:
        cap = _capacity(sc)
        dropped = np.clip(counts - cap, 0, None)
        counts = counts - dropped
    else:
        dropped = np.zeros_like(counts)
    cols = _layer_columns(sc, rng, tf, p, counts, dropped, c, affected)
    bias = None
    if sc.aux_free:
        bias = -0.05 * np.log(base * e) + 0.002 * rng.standard_normal(p.shape)
        if affected and sc.shape == "bias_runaway":
            # The bias update keeps pushing (sign of the load error) but the router ignores it.
            grow = 1e-3 * np.clip(tf - sc.onset, 0, None)[:, None]
            bias = bias - grow * np.sign(p - 1.0 / e)
    return SimLayer(name, k, t, counts, dropped, None if lean else p, bias, cols, sc.placement)


def _layer_columns(sc: Scenario, rng, tf, p, counts, dropped, c, affected) -> dict[str, np.ndarray]:
    e, k, n_tok = sc.num_experts, sc.top_k, sc.tokens
    s = len(tf)
    # float32 is plenty for per-step stats and halves the cost on benchmark-sized runs.
    fc = counts.astype(np.float32)
    assign = fc.sum(axis=1, dtype=np.float64)
    safe = np.maximum(assign, 1.0)
    mean = safe / e
    max_share = fc.max(axis=1) / safe
    cv = fc.std(axis=1, dtype=np.float64) / mean
    pf = p.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        load_h = -np.sum(pf * np.log(np.maximum(pf, 1e-30)), axis=1, dtype=np.float64) / math.log(e)
    # Routers start near uniform and grow confident; collapse drags per-token entropy down with the load entropy.
    h_base = 0.65 + 0.3 * np.exp(-tf / max(sc.steps / 15, 1))
    entropy_norm = np.clip(h_base * load_h**2 + 0.01 * rng.standard_normal(s), 0.0, 1.0)
    logit_abs_max = 3.0 + 1.5 * (1 - np.exp(-tf / max(sc.steps / 10, 1))) + 4.0 * c
    if affected and sc.shape == "logit_drift":
        logit_abs_max = logit_abs_max * np.exp(np.clip(tf - sc.onset, 0, None) * math.log(40) / max(sc.ramp, 1))
    logit_abs_max = logit_abs_max * np.exp(0.05 * rng.standard_normal(s))
    logit_std = logit_abs_max / 4
    z_loss = (math.log(e) + logit_std**2 / 2) ** 2
    nonfinite = np.zeros(s, np.int64)
    if affected and sc.shape == "nonfinite":
        bad = rng.choice(np.arange(sc.onset, sc.steps), size=3, replace=False)
        nonfinite[bad] = rng.integers(1, 50, size=3)
    layer_dropped = dropped.sum(axis=1)
    aux = e * np.sum(fc * pf, axis=1, dtype=np.float64) / safe
    return {
        "tokens": np.full(s, n_tok, np.int64),
        "top_k": np.full(s, k, np.int32),
        "num_experts": np.full(s, e, np.int32),
        "entropy": entropy_norm * math.log(e),
        "entropy_norm": entropy_norm,
        "cv": cv,
        "max_share": max_share,
        "dead": (counts == 0).sum(axis=1).astype(np.int32),
        "dropped": layer_dropped.astype(np.int64),
        "drop_rate": layer_dropped / (n_tok * k),
        "logit_abs_max": logit_abs_max,
        "logit_mean": np.zeros(s),
        "logit_std": logit_std,
        "z_loss": z_loss,
        "aux_loss": aux,
        "nonfinite": nonfinite,
        "calls": np.ones(s, np.int32),
        "time": 1.7e9 + 0.5 * tf,
    }


def benchmark_scenario(steps: int = 100_000, layers: int = 32, experts: int = 64, seed: int = 0) -> Scenario:
    """The issue's benchmark shape: one layer drifting to collapse, the rest healthy."""
    return Scenario("benchmark", "drift", "collapse", steps=steps, num_experts=experts, top_k=2, tokens=4096,
                    layers=layers, seed=seed, onset=steps // 2, ramp=steps // 4)
