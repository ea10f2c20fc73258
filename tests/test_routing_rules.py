"""fragile_routing and balancer_override on windows of the routing diagnostics (schema 2): they fire on their
scenarios, stay quiet on healthy ones, and read the same through the dense reader's plan and a frames table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moewatch.detect import DetectorConfig, analyze, analyze_frames
from moewatch.detect.windows import LayerData


def layer(near_tie: np.ndarray | None = None, override: np.ndarray | None = None, skew: np.ndarray | None = None,
          steps: int = 1200, E: int = 16, seed: int = 0) -> LayerData:
    """A top-2 layer of 1,024 tokens a step: balanced unless ``skew`` (per step, the hot expert's extra share)."""
    rng = np.random.default_rng(seed)
    p = np.full((steps, E), 1.0 / E)
    if skew is not None:
        p = p * (1 - skew[:, None])
        p[:, 0] += skew
    tokens = np.stack([rng.multinomial(2048, row) for row in p])
    stats = {"tokens": np.full(steps, 1024.0), "dropped": np.zeros(steps), "entropy_norm": np.full(steps, 0.8),
             "z_loss": np.full(steps, 1.0), "logit_abs_max": np.full(steps, 3.0), "nonfinite": np.zeros(steps)}
    if near_tie is not None:
        stats.update(margin_tokens=np.full(steps, 1024.0), near_ties=near_tie * 1024, margin_sum=np.full(steps, 300.0))
    if override is not None:
        stats.update(overridden=override * 2048, override_slots=np.full(steps, 2048.0))
    return LayerData("gate", E, 2, np.arange(steps), tokens, stats)


def kinds(data: LayerData, config: DetectorConfig | None = None) -> dict[str, tuple[int, float]]:
    return {a.kind: (a.first_step, a.value) for a in analyze([data], config).alerts}


def test_a_router_that_cannot_tell_its_experts_apart_is_fragile():
    rng = np.random.default_rng(1)
    ntf = np.clip(0.4 + 0.05 * rng.standard_normal(1200), 0, 1)
    ntf[500:] = np.clip(np.linspace(0.4, 0.97, 700) + 0.02 * rng.standard_normal(700), 0, 1)
    got = kinds(layer(near_tie=ntf))
    assert set(got) == {"fragile_routing"}
    first, peak = got["fragile_routing"]
    assert 500 <= first <= 1100 and peak >= 0.85


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_balanced_uncertain_router_is_not_fragile(seed):
    """The reference model's balanced routers keep 0.3-0.6 of their tokens near a tie, rising early in training."""
    rng = np.random.default_rng(seed)
    ntf = np.clip(np.r_[np.linspace(0.3, 0.6, 150), np.linspace(0.6, 0.3, 1050)] + 0.05 * rng.standard_normal(1200),
                  0, 1)
    assert kinds(layer(near_tie=ntf, seed=seed)) == {}


def test_an_override_that_holds_back_a_collapse_is_flagged_and_one_that_balances_is_not():
    rng = np.random.default_rng(2)
    ovr = np.clip(np.r_[np.full(400, 0.05), np.linspace(0.05, 0.6, 800)] + 0.01 * rng.standard_normal(1200), 0, 1)
    skew = np.r_[np.zeros(400), np.linspace(0.0, 0.12, 800)]  # the imbalance the bias fights keeps growing
    got = kinds(layer(override=ovr, skew=skew))
    assert "balancer_override" in got and 400 <= got["balancer_override"][0] <= 1150
    # The same override share while the imbalance falls: the balancer is winning, nothing to say about it.
    falling = np.r_[np.full(400, 0.12), np.linspace(0.12, 0.0, 800)]
    assert "balancer_override" not in kinds(layer(override=ovr, skew=falling))
    # A bias that overrides little, on a balanced router.
    assert kinds(layer(override=np.full(1200, 0.05))) == {}
    assert "balancer_override" not in kinds(layer(override=np.full(1200, 0.2)), DetectorConfig())
    assert "balancer_override" in kinds(layer(override=np.full(1200, 0.2)), DetectorConfig(override_warning=0.15))


def test_the_frames_path_reads_the_routing_columns_like_the_dense_reader():
    rng = np.random.default_rng(3)
    ntf = np.clip(np.r_[np.full(500, 0.4), np.linspace(0.4, 0.97, 700)] + 0.02 * rng.standard_normal(1200), 0, 1)
    d = layer(near_tie=ntf)
    S, E = d.tokens.shape
    experts = pd.DataFrame({"step": np.repeat(d.steps, E), "layer": "gate", "expert": np.tile(np.arange(E), S),
                            "tokens": d.tokens.reshape(-1)})
    layers = pd.DataFrame({"step": d.steps, "layer": "gate", "top_k": 2, "num_experts": E,
                           **{k: d.stats[k] for k in ("tokens", "dropped", "entropy_norm", "z_loss", "logit_abs_max",
                                                      "nonfinite")},
                           "margin_tokens": 1024, "near_tie_frac": ntf, "margin_mean": 300 / 1024,
                           "overridden": np.nan, "override_slots": np.nan})
    got = {(a.kind, a.first_step) for a in analyze_frames(layers, experts).alerts}
    assert got == {(a.kind, a.first_step) for a in analyze([d]).alerts} and got


def test_the_dashboard_charts_the_routing_diagnostics_in_the_detectors_windows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from moewatch.app import figures
    from moewatch.app.data import RunData
    from moewatch.app.windows import detector_window, plan, window_series

    from tests.test_app_data import random_counts, set_columns, write_manifest, write_part

    rng = np.random.default_rng(4)
    run = tmp_path / "r"
    write_manifest(run, ["gate"], 8)
    write_part(run, {"gate": random_counts(rng, 600, 8)}, np.arange(600))
    f = run / "layers" / "r0000-s0001-00000000.parquet"
    ntf, mt = rng.uniform(0.2, 0.6, 600), rng.integers(500, 1024, 600)
    ovr, slots = rng.integers(0, 100, 600), np.full(600, 512)
    hist = rng.integers(0, 60, size=(600, 16))
    set_columns(f, near_tie_frac=ntf, margin_tokens=mt, margin_mean=np.full(600, 0.3), overridden=ovr,
                override_slots=slots, margin_hist=pa.array(list(hist), type=pa.list_(pa.int64())))
    ef = run / "experts" / "r0000-s0001-00000000.parquet"
    tokens = pq.read_table(ef, columns=["tokens"])["tokens"].to_numpy()
    gm = rng.uniform(0.0, 1.0, len(tokens)) * tokens  # combine weights below 1 per assignment
    set_columns(ef, gate_mass=gm)

    data = RunData(run, "r")
    data.refresh()
    window = detector_window(data, "gate")
    fig, _ = figures.metrics_figure(data, "gate", window=window)
    titles = " ".join(str(a.get("text", "")) for a in fig["layout"]["annotations"])
    assert "fragile routing" in titles and "balancer override" in titles and "routing margin" in titles
    s = window_series(data, "gate", plan(data, "gate", 0, data.n, window, 1 << 40))
    edges = np.arange(0, 601, window)
    want_ntf = np.add.reduceat(ntf * mt, edges[:-1]) / np.add.reduceat(mt, edges[:-1])
    want_ovr = np.add.reduceat(ovr, edges[:-1]) / np.add.reduceat(slots, edges[:-1])
    np.testing.assert_allclose(s["near_tie_frac"], want_ntf, rtol=1e-12)
    np.testing.assert_allclose(s["override_frac"], want_ovr, rtol=1e-12)
    raw = data.series("gate")
    np.testing.assert_allclose(raw["near_tie_frac"], ntf, rtol=1e-12)
    # The heatmap gets the margin histogram over time: each column's share of tokens per bin, in the same windows.
    heat, _ = figures.heatmap_figure(data, "gate", width_px=800, window=window)
    panel = next(tr for tr in heat["data"] if tr.get("yaxis") == "y3")
    z = np.asarray(panel["z"], dtype=np.float64)  # [bins, windows]
    want = np.add.reduceat(hist, edges[:-1], axis=0) / np.add.reduceat(hist, edges[:-1], axis=0).sum(1, keepdims=True)
    np.testing.assert_allclose(z.T, want, atol=1e-4)
    assert panel["y"][0].startswith("< 0.05")
    # Gate mass vs load: each expert's share of the combine weight next to its share of the assignments.
    shares, _ = figures.shares_figure(data, "gate", window=window)
    scatter = next(tr for tr in shares["data"] if tr.get("xaxis") == "x2")
    counts = tokens.reshape(600, 8).sum(0)
    mass = gm.reshape(600, 8).sum(0)
    np.testing.assert_allclose(scatter["x"], counts / counts.sum(), rtol=1e-12)
    np.testing.assert_allclose(scatter["y"], mass / mass.sum(), rtol=1e-12)
    # A run without them shows no such rows.
    plain = tmp_path / "p"
    write_manifest(plain, ["gate"], 8)
    write_part(plain, {"gate": random_counts(rng, 200, 8)}, np.arange(200))
    other = RunData(plain, "p")
    other.refresh()
    fig, _ = figures.metrics_figure(other, "gate", window=detector_window(other, "gate"))
    assert "fragile routing" not in " ".join(str(a.get("text", "")) for a in fig["layout"]["annotations"])


def test_watch_record_takes_the_routing_diagnostics_for_fused_kernels(tmp_path):
    """A fused kernel recorded by hand gets gate mass, margin and override like a hooked router (float64 check)."""
    import torch

    import moewatch

    torch.manual_seed(0)
    T, E, K = 64, 8, 2
    logits = torch.randn(T, E)
    bias = torch.zeros(E)
    bias[5] = 1.5  # a selection-only bias that pulls expert 5 into many choices
    biased = logits + bias
    idx = biased.topk(K, dim=-1).indices
    weights = torch.softmax(logits, -1).gather(1, idx)
    with moewatch.attach(None, tmp_path / "run", routers={}) as watch:
        watch.record("fused", logits=logits, indices=idx, weights=weights, select_scores=biased,
                     unbiased_scores=logits)
        watch.step()
    run = moewatch.load(tmp_path / "run")
    ly, ex = run.layers.iloc[0], run.experts.sort_values("expert")
    b = biased.double()
    top = b.topk(K + 1, dim=-1).values
    margin = (top[:, K - 1] - top[:, K]).numpy()
    assert ly.margin_tokens == T and ly.margin_mean == pytest.approx(margin.mean(), rel=1e-6)
    assert ly.near_tie_frac == pytest.approx((margin < 0.05).mean())
    kth = logits.double().topk(K, dim=-1).values[:, -1:]
    overridden = (logits.double().gather(1, idx) < kth).sum().item()
    assert (ly.overridden, ly.override_slots) == (overridden, T * K) and overridden > 0
    gate = torch.zeros(E, dtype=torch.float64).index_add_(0, idx.reshape(-1), weights.double().reshape(-1))
    np.testing.assert_allclose(ex.gate_mass.to_numpy(), gate.numpy(), rtol=1e-6)
