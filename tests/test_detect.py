"""The collapse detector: config, time-series primitives, every alert kind on targeted synthetic runs, the frames
path, and the live tracker's agreement with a batch report."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moewatch import load
from moewatch.detect import (
    Alert,
    AlertTracker,
    DetectorConfig,
    LayerThresholds,
    analyze,
    analyze_frames,
    detect,
    detect_frames,
    parse_pairs,
)
from moewatch.detect import synthetic as syn
from moewatch.detect.evaluate import _strength
from moewatch.detect.series import Hysteresis, forward_fill, hysteresis, run_lengths, theil_sen
from moewatch.detect.windows import LayerData, layer_data_from_frames, make_windows, window_size

LAYER0 = "model.layers.0.mlp.gate"


def alerts_for(sc: syn.Scenario, config: DetectorConfig | None = None) -> list[Alert]:
    return analyze(syn.simulate(sc).layer_data(), config).alerts


def kinds(alerts: list[Alert], severity: str | None = None) -> set[str]:
    return {a.kind for a in alerts if severity is None or a.severity == severity}


def serious(alerts: list[Alert]) -> list[Alert]:
    return [a for a in alerts if a.severity in ("warning", "critical")]


# ----------------------------------------------------------------------------------------------- config


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="cv_warning"):
        DetectorConfig(cv_warning=2.0)  # above cv_critical
    with pytest.raises(ValueError, match="window_steps"):
        DetectorConfig(window_steps=0)
    with pytest.raises(ValueError, match="dead_share"):
        DetectorConfig(dead_share=1.5)
    with pytest.raises(ValueError, match="trend_scales"):
        DetectorConfig(trend_scales=(4, 1))
    with pytest.raises(ValueError, match="fire_windows"):
        DetectorConfig(fire_windows=2.5)


def test_with_overrides_parses_cli_strings_and_names_unknown_keys():
    cfg = DetectorConfig().with_overrides({"cv_warning": "0.4", "fire_windows": "3", "trend_scales": "1,8"})
    assert cfg.cv_warning == 0.4 and cfg.fire_windows == 3 and cfg.trend_scales == (1, 8)
    with pytest.raises(ValueError, match="cv_warnign") as exc:
        DetectorConfig().with_overrides({"cv_warnign": 0.4})
    assert "cv_warning" in str(exc.value)  # lists the known settings
    with pytest.raises(ValueError, match="fire_windows"):
        DetectorConfig().with_overrides({"fire_windows": "two"})
    assert parse_pairs(["a=1", " b = x "]) == {"a": "1", "b": "x"}
    with pytest.raises(ValueError, match="key=value"):
        parse_pairs(["cv_warning"])


def test_from_toml_top_level_or_detector_table(tmp_path):
    flat = tmp_path / "flat.toml"
    flat.write_text("cv_warning = 0.3\nclear_windows = 5\ntrend_scales = [1, 2]\n")
    cfg = DetectorConfig.from_toml(flat)
    assert (cfg.cv_warning, cfg.clear_windows, cfg.trend_scales) == (0.3, 5, (1, 2))
    nested = tmp_path / "nested.toml"
    nested.write_text("[detector]\ndrop_warning = 0.1\n")
    assert DetectorConfig.from_toml(nested).drop_warning == 0.1
    bad = tmp_path / "bad.toml"
    bad.write_text("bogus_key = 1\n")
    with pytest.raises(ValueError, match="bogus_key") as exc:
        DetectorConfig.from_toml(bad)
    assert str(bad) in str(exc.value)
    broken = tmp_path / "broken.toml"
    broken.write_text("cv_warning = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        DetectorConfig.from_toml(broken)
    with pytest.raises(ValueError, match="does not exist"):
        DetectorConfig.from_toml(tmp_path / "missing.toml")


def test_layer_thresholds_scale_with_layer_shape():
    cfg = DetectorConfig()
    big = LayerThresholds.resolve(cfg, 64, 2)
    assert big.cv_critical == cfg.cv_critical and big.cv_warning == cfg.cv_warning
    # E=4, top-2 can show CV 1.0 at most: thresholds are capped below that ceiling.
    small = LayerThresholds.resolve(cfg, 4, 2)
    assert small.cv_critical < 1.0 and small.cv_warning < small.cv_critical
    for e, k in ((8, 1), (8, 2), (64, 2), (256, 8)):
        th = LayerThresholds.resolve(cfg, e, k)
        assert 1 / e < th.dominant_warning < th.dominant_critical < 1 / k
    assert LayerThresholds.resolve(cfg, 64, 2).dead_critical == 16
    # Derived dominant shares are the share one expert needs to push the CV to the threshold on its own.
    for e, k in ((8, 1), (16, 2), (64, 2)):
        th = LayerThresholds.resolve(cfg, e, k)
        shares = np.full(e, (1 - th.dominant_critical) / (e - 1))
        shares[0] = th.dominant_critical
        assert shares.std() / shares.mean() == pytest.approx(th.cv_critical)
    assert LayerThresholds.resolve(cfg, 8, 2).dominant_critical == pytest.approx(0.45)  # capped at 90% of 1/k
    fixed = LayerThresholds.resolve(DetectorConfig(dominant_warning=0.3, dominant_critical=0.4), 64, 2)
    assert (fixed.dominant_warning, fixed.dominant_critical) == (0.3, 0.4)
    with pytest.raises(ValueError, match="dominant_warning"):
        DetectorConfig(dominant_warning=0.4, dominant_critical=0.3)


# ---------------------------------------------------------------------------------------------- series


def test_run_lengths_continue_a_carried_run():
    flags = np.array([True, True, False, True])
    assert run_lengths(flags, 0).tolist() == [1, 2, 0, 1]
    assert run_lengths(flags, 3).tolist() == [4, 5, 0, 1]


def test_hysteresis_ignores_one_spike_and_needs_quiet_to_clear():
    flags = np.array([0, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0], bool)
    active, _ = hysteresis(flags, Hysteresis.new(), fire=2, clear=3)
    assert active.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0]


def test_hysteresis_in_pieces_equals_one_pass():
    rng = np.random.default_rng(1)
    flags = rng.random((200, 5)) < 0.45
    whole, _ = hysteresis(flags, Hysteresis.new((5,)), 2, 3)
    state = Hysteresis.new((5,))
    parts = [hysteresis(flags[a:b], state, 2, 3)[0] for a, b in ((0, 7), (7, 8), (8, 120), (120, 200))]
    assert np.array_equal(np.concatenate(parts), whole)


def test_theil_sen_slope_shrugs_off_a_spike():
    x = np.arange(10, dtype=float) * 20
    y = 0.01 * x + 1
    y_spiked = y.copy()
    y_spiked[5] += 100
    fit = theil_sen(x, y_spiked, 8)
    assert np.allclose(fit.slope, 0.01)
    assert np.allclose(theil_sen(x, y, 8).last, y[7:])
    assert (fit.up >= 0.75).all() and (fit.down <= 0.25).all()


def test_forward_fill_carries_history_evaluations_in():
    out = forward_fill(np.array([-3, -1, 2, 5]), np.array([1.0, 2.0, 3.0, 4.0]), 6, np.nan)
    assert out.tolist() == [2.0, 2.0, 3.0, 3.0, 3.0, 4.0]


# ------------------------------------------------------------------------------------------- windows


def test_window_size_widens_for_small_batches():
    cfg = DetectorConfig()
    big = syn.simulate(syn.Scenario("b", "healthy", "healthy", steps=200, tokens=4096, num_experts=64)).layer_data()
    small = syn.simulate(syn.Scenario("s", "small_batch", "healthy", steps=200, tokens=32, num_experts=64))
    assert window_size(big[0], cfg) == cfg.window_steps
    # 32 tokens x top-2 over 64 experts: 1 assignment per expert per step, 50 needed per window.
    assert window_size(small.layer_data()[0], cfg) == 50


def test_make_windows_sums_loads_and_keeps_a_half_tail():
    data = syn.simulate(syn.Scenario("w", "healthy", "healthy", steps=55, layers=1)).layer_data()[0]
    win, used = make_windows(data, 20, include_tail=True)
    assert used == 55 and win.first.tolist() == [0, 20, 40] and win.last.tolist() == [19, 39, 54]
    assert np.array_equal(win.load[1], data.tokens[20:40].sum(axis=0))
    win, used = make_windows(data, 20, include_tail=False)
    assert used == 40 and len(win) == 2


# --------------------------------------------------------------------------------------------- rules


def test_healthy_noisy_run_raises_nothing():
    alerts = alerts_for(syn.Scenario("h", "healthy", "healthy", wander=0.3, seed=3))
    assert serious(alerts) == []


def test_small_batch_noise_is_not_imbalance():
    sc = syn.Scenario("sb", "small_batch", "healthy", tokens=32, num_experts=64, seed=1)
    run = syn.simulate(sc)
    layers, _ = run.frames()
    # Per step, the raw numbers look like a collapse (CV ~1, a third of the experts idle)...
    assert layers["cv"].mean() > 0.8 and layers["dead"].mean() > 15
    # ...but over windows with enough tokens the detector sees balance.
    assert serious(analyze(run.layer_data()).alerts) == []


def test_one_wild_step_does_not_flap():
    sc = syn.Scenario("spike", "healthy", "healthy", steps=1000, layers=1, seed=2)
    run = syn.simulate(sc)
    layer = run.layers[0]
    total = layer.tokens[500].sum()
    layer.tokens[500] = 0
    layer.tokens[500, 3] = total  # one step where one expert gets every assignment
    assert serious(analyze(run.layer_data()).alerts) == []


def test_slow_drift_warns_early_with_a_collapse_estimate():
    sc = syn.Scenario("d", "drift", "collapse", onset=600, ramp=1800, strength=0.9, seed=0)
    alerts = alerts_for(sc)
    crit = [a for a in alerts if a.kind == "imbalance" and a.severity == "critical"]
    trend = [a for a in alerts if a.kind == "imbalance_trend"]
    assert crit and trend and all(a.layer == LAYER0 for a in serious(alerts))
    first_warning = min(a.detected_step for a in serious(alerts))
    assert first_warning < crit[0].detected_step < sc.collapse_step
    # The projected crossing lands near where the critical imbalance actually began.
    assert abs(trend[0].collapse_step - crit[0].first_step) < 300
    assert trend[0].detected_step < crit[0].detected_step
    assert "aux-loss" in trend[0].lever


def test_dominant_expert_names_the_hot_expert():
    sc = syn.Scenario("dom", "sudden", "collapse", onset=1500, ramp=150, seed=4)
    run = syn.simulate(sc)
    hot = int(np.argmax(run.layers[0].tokens[-200:].sum(axis=0)))
    dom = [a for a in analyze(run.layer_data()).alerts if a.kind == "dominant_expert" and a.severity == "critical"]
    assert dom and dom[0].experts == (hot,)
    assert dom[0].value >= dom[0].threshold and dom[0].detected_step < sc.collapse_step


def test_dead_experts_listed_when_load_concentrates():
    sc = syn.Scenario("dead", "dead_gradual", "collapse", onset=800, ramp=1200, strength=0.97, hot=4, seed=0)
    run = syn.simulate(sc)
    load = run.layers[0].tokens[-100:].sum(axis=0)
    alive = set(np.flatnonzero(load >= load.mean()).tolist())  # the 4 hot experts, at ~4x their fair share
    assert len(alive) == 4
    dead = [a for a in analyze(run.layer_data()).alerts if a.kind == "dead_expert" and a.severity == "critical"]
    assert dead and len(dead[0].experts) == 12 and not alive & set(dead[0].experts)
    assert dead[0].value == 12 and dead[0].ongoing


def test_entropy_collapse_on_a_top1_router_that_saturates():
    sc = syn.Scenario("k1", "drift", "collapse", num_experts=8, top_k=1, tokens=1024, onset=600, ramp=1800,
                      strength=0.95)
    alerts = alerts_for(sc)
    ent = {a.severity for a in alerts if a.kind == "entropy_collapse"}
    assert ent == {"warning", "critical"}


def test_drops_rise_with_imbalance_under_a_capacity_factor():
    sc = syn.Scenario("drops", "drops", "degraded", capacity_factor=1.25, strength=_strength(0.6, 16, 1),
                      onset=500, ramp=1500)
    alerts = alerts_for(sc)
    drops = [a for a in alerts if a.kind == "drops"]
    assert drops and drops[0].severity == "warning" and drops[0].experts
    assert "capacity factor" in drops[0].lever
    assert kinds(alerts, "critical") == set()
    # The same run without a capacity limit drops nothing.
    assert "drops" not in kinds(alerts_for(syn.Scenario("nodrops", "drops", "degraded",
                                                        strength=_strength(0.6, 16, 1), onset=500, ramp=1500)))


def test_logit_drift_warns_before_logits_explode():
    sc = syn.Scenario("logit", "logit_drift", "degraded", onset=1000, ramp=1500)
    run = syn.simulate(sc)
    alerts = analyze(run.layer_data()).alerts
    drift = [a for a in alerts if a.kind == "logit_drift"]
    assert drift and drift[0].severity == "warning" and "z-loss" in drift[0].lever
    big = run.layers[0].steps[run.layers[0].cols["logit_abs_max"] >= 100]
    assert drift[0].detected_step < big[0]  # raised while max |logit| was still below the warning level
    assert kinds(alerts, "critical") == set()


def test_nonfinite_logits_are_critical_at_once():
    sc = syn.Scenario("nan", "nonfinite", "degraded", onset=1500)
    run = syn.simulate(sc)
    bad = run.layers[0].steps[run.layers[0].cols["nonfinite"] > 0]
    alerts = [a for a in analyze(run.layer_data()).alerts if a.kind == "nonfinite"]
    assert alerts and all(a.severity == "critical" for a in alerts)
    assert alerts[0].first_step <= bad[0] <= alerts[0].detected_step
    assert sum(a.value for a in alerts) == run.layers[0].cols["nonfinite"].sum()


def test_bias_runaway_only_when_bias_grows_and_imbalance_stays():
    runaway = syn.Scenario("bias", "bias_runaway", "degraded", aux_free=True, strength=_strength(0.4, 16, 1),
                           onset=1000)
    alerts = alerts_for(runaway)
    bias = [a for a in alerts if a.kind == "bias_runaway"]
    assert bias and bias[0].first_step >= runaway.onset and "bias" in bias[0].lever
    # Balance alerts on a bias-balanced router point at the bias, not the aux loss.
    assert all("bias" in a.lever for a in alerts if a.kind in ("imbalance", "imbalance_trend", "dominant_expert"))
    assert serious(alerts_for(syn.Scenario("ok", "healthy", "healthy", aux_free=True))) == []


def test_recovery_warns_then_clears():
    sc = syn.Scenario("rec", "recovery", "degraded", onset=1200, ramp=600, strength=_strength(0.8, 16, 1))
    alerts = alerts_for(sc)
    warn = [a for a in alerts if a.kind == "imbalance"]
    assert warn and kinds(alerts, "critical") == set()
    assert not any(a.ongoing for a in warn) and max(a.last_step for a in warn) < 2600



def _live(sc: syn.Scenario, config: DetectorConfig, chunk: int = 13) -> list[Alert]:
    layers, experts = syn.simulate(sc).frames()
    tracker = AlertTracker(config)
    return [a for lch, ech in _chunks(layers, experts, chunk) for a in tracker.update(lch, ech)]


def _keys(alerts: list[Alert]) -> list[tuple]:
    return sorted((a.kind, a.severity, a.layer, a.first_step, a.detected_step) for a in alerts)


def test_warmup_grace_drops_an_early_imbalance_that_resolves_itself():
    # The router starts badly unbalanced and sorts itself out by step ~60: the normal start of training.
    sc = syn.Scenario("start", "recovery", "healthy", steps=600, onset=0, ramp=30, strength=0.9, seed=3)
    without = DetectorConfig(warmup_steps=0)
    assert kinds(alerts_for(sc, without), "critical"), "the transient must be visible without the grace"
    assert alerts_for(sc) == [] and _live(sc, DetectorConfig()) == []
    assert _keys(_live(sc, without)) == _keys(alerts_for(sc, without))


@pytest.mark.parametrize("name", ["aux-free-bias", "aux-annealed", "collapse"])
def test_live_and_report_agree_on_recorded_demo_runs_whatever_the_warmup_and_chunks(name):
    """Real router traces: start-up imbalance ending near the warm-up's end, dead experts dated many windows back."""
    root = Path(__file__).resolve().parents[1] / "sample_runs" / name
    if not root.is_dir():
        pytest.skip("sample_runs/ is not in this checkout")
    view = load(root).global_view()
    layers, experts = view.layers, view.experts
    for warm in (0, 60, 100):
        config = DetectorConfig(warmup_steps=warm)
        batch = _keys(detect_frames(layers, experts, config))
        for chunk in (10, 25):
            tracker = AlertTracker(config)
            live = [a for lch, ech in _chunks(layers, experts, chunk) for a in tracker.update(lch, ech)]
            assert _keys(live) == batch, (warm, chunk)


def _starve(data: list[LayerData], expert: int, start: int, stop: int) -> list[LayerData]:
    tokens = data[0].tokens.copy()
    tokens[start:stop, expert] = 0
    return [replace(data[0], tokens=tokens), *data[1:]]


def test_a_briefly_starved_expert_is_an_info_and_a_dead_one_a_warning():
    data = syn.simulate(syn.Scenario("h", "healthy", "healthy", steps=800, seed=4)).layer_data()
    assert serious(analyze(data).alerts) == []
    brief = [a for a in analyze(_starve(data, 3, 300, 380)).alerts if a.kind == "dead_expert"]  # 4 windows
    assert [(a.severity, a.experts) for a in brief] == [("info", (3,))]
    dead = [a for a in analyze(_starve(data, 3, 300, 800)).alerts if a.kind == "dead_expert"]
    warn = [a for a in dead if a.severity == "warning"]
    assert len(warn) == 1 and warn[0].experts == (3,) and warn[0].ongoing
    assert warn[0].first_step == 300  # dated from the first starved window, not from when it turned into a warning
    assert warn[0].detected_step == 399  # five 20-step windows starved in a row
    assert DetectorConfig(dead_warning_windows=2).dead_warning_windows == 2
    quick = [a for a in analyze(_starve(data, 3, 300, 380), DetectorConfig(dead_warning_windows=2)).alerts
             if a.kind == "dead_expert" and a.severity == "warning"]
    assert quick and quick[0].first_step == 300


def test_warmup_grace_keeps_a_collapse_that_outlasts_it_with_its_true_onset():
    sc = syn.Scenario("early", "sudden", "collapse", steps=600, onset=0, ramp=10, strength=0.95, seed=2)
    config = DetectorConfig(warmup_steps=200)
    crit = [a for a in alerts_for(sc, config) if a.kind == "imbalance" and a.severity == "critical"]
    assert crit and crit[0].first_step < 60  # the onset the grace does not hide
    assert 200 <= crit[0].detected_step < 260  # raised with the first window past the warm-up
    assert _keys(_live(sc, config)) == _keys(alerts_for(sc, config))
    # NaN/inf logits are never held back: a bug at step 30 is reported at step 39, like one at step 3,000.
    nan = syn.Scenario("nan", "nonfinite", "degraded", steps=300, onset=20, seed=1)
    early_nan = [a for a in alerts_for(nan, config) if a.kind == "nonfinite"]
    assert early_nan and min(a.detected_step for a in early_nan) < 200
    assert _keys([a for a in _live(nan, config) if a.kind == "nonfinite"]) == _keys(early_nan)
    # A run shorter than its warm-up still reports what it saw.
    short = syn.Scenario("short", "sudden", "collapse", steps=150, onset=0, ramp=10, strength=0.95, seed=2)
    assert kinds(alerts_for(short, config), "critical")

# ---------------------------------------------------------------------------------------- frames path


def test_frames_path_matches_array_path():
    sc = syn.Scenario("d", "drift", "collapse", onset=600, ramp=1800, aux_free=True, capacity_factor=1.5)
    run = syn.simulate(sc)
    layers, experts = run.frames()
    # Shuffled rows and a string layer column must not matter.
    experts = experts.sample(frac=1.0, random_state=0)
    key = [(a.kind, a.severity, a.layer, a.first_step, a.last_step, a.experts) for a in analyze(run.layer_data()).alerts]
    assert [(a.kind, a.severity, a.layer, a.first_step, a.last_step, a.experts)
            for a in detect_frames(layers, experts)] == key
    data = layer_data_from_frames(layers, experts)
    assert [d.layer for d in data] == [LAYER0, "model.layers.1.mlp.gate"]
    assert np.array_equal(data[0].tokens, run.layers[0].tokens) and data[0].bias is not None


def test_recorded_steps_with_gaps_keep_real_step_numbers():
    # A loop that records every 10th optimizer step: windows count recorded steps, trends use real step numbers.
    sc = syn.Scenario("d", "drift", "collapse", onset=600, ramp=1800, seed=0)
    layers, experts = syn.simulate(sc).frames()
    dense = detect_frames(layers, experts)
    sparse = detect_frames(layers.assign(step=layers.step * 10), experts.assign(step=experts.step * 10))
    assert [(a.kind, a.severity, a.first_step * 10, a.last_step * 10) for a in dense] == [
        (a.kind, a.severity, a.first_step, a.last_step) for a in sparse]
    trend = [(d.collapse_step, s.collapse_step) for d, s in zip(dense, sparse, strict=True)
             if d.kind == "imbalance_trend"]
    assert trend and all(abs(s - 10 * d) <= 10 for d, s in trend)


def test_frames_validation_names_the_problem():
    run = syn.simulate(syn.Scenario("v", "healthy", "healthy", steps=100))
    layers, experts = run.frames()
    with pytest.raises(ValueError, match="tokens"):
        detect_frames(layers, experts.drop(columns=["tokens"]))
    two_ranks = pd.concat([experts, experts.assign(rank=1)])
    with pytest.raises(ValueError, match="global view"):
        detect_frames(layers, two_ranks)


def test_detect_reads_a_run_directory(tmp_path):
    import moewatch

    sc = syn.Scenario("d", "sudden", "collapse", onset=1500, ramp=150)
    run = syn.simulate(sc)
    run.write(tmp_path / "run")
    alerts = detect(moewatch.load(tmp_path / "run"))
    assert "critical" in {a.severity for a in alerts}
    assert [a.first_step for a in alerts] == [a.first_step for a in analyze(run.layer_data()).alerts]


def test_alert_contract():
    alert = alerts_for(syn.Scenario("d", "sudden", "collapse", onset=1500, ramp=150))[0]
    d = json.loads(json.dumps(alert.to_dict()))
    for key in ("kind", "severity", "layer", "experts", "first_step", "last_step", "value", "threshold", "message",
                "lever"):
        assert key in d
    assert d["message"].endswith(".") and d["message"].count(". ") == 0  # one sentence
    with pytest.raises(ValueError, match="kind"):
        Alert("melting", "warning", "l", (), 0, 0, 1.0, 1.0, "m.", "x", 0)
    with pytest.raises(ValueError, match="severity"):
        Alert("drops", "scary", "l", (), 0, 0, 1.0, 1.0, "m.", "x", 0)


# ------------------------------------------------------------------------------------------------- live


def _chunks(layers: pd.DataFrame, experts: pd.DataFrame, size: int):
    lg, eg = layers["step"] // size, experts["step"] // size
    for key in sorted(lg.unique()):
        yield layers[lg == key], experts[eg == key]


def test_tracker_raises_each_alert_once_and_agrees_with_the_report():
    # Bias and capacity drops too, so every optional column travels through the tracker's pending rows.
    sc = syn.Scenario("d", "drift", "collapse", onset=600, ramp=1800, seed=1, aux_free=True, capacity_factor=1.5)
    layers, experts = syn.simulate(sc).frames()
    tracker = AlertTracker()
    live = []
    for lch, ech in _chunks(layers, experts, 37):
        live += tracker.update(lch, ech)
    batch = detect_frames(layers, experts)

    def key(a):
        return (a.kind, a.severity, a.layer, a.first_step, a.detected_step)

    assert sorted(map(key, live)) == sorted(map(key, batch))
    assert len(set(map(key, live))) == len(live)
    # A resumed run re-sending old steps raises nothing new.
    assert tracker.update(layers[layers.step < 1000], experts[experts.step < 1000]) == []


def test_tracker_cost_stays_bounded():
    sc = syn.Scenario("long", "healthy", "healthy", steps=6000, layers=1)
    layers, experts = syn.simulate(sc).frames()
    tracker = AlertTracker(DetectorConfig(trend_scales=(1, 4)))  # history: 8 fits x 4 windows + 4 = 36 windows
    for lch, ech in _chunks(layers, experts, 100):
        tracker.update(lch, ech)
    det = tracker._detectors[LAYER0]
    assert det.windows_seen == 300
    assert all(len(v) <= det._hist_len for v in det._hist.values()) and det._hist_len < det.windows_seen
    assert len(tracker._pending[LAYER0]) < det.window and det.episodes == []


def test_tracker_waits_for_enough_steps_to_size_windows():
    sc = syn.Scenario("s", "healthy", "healthy", steps=30, layers=1)
    layers, experts = syn.simulate(sc).frames()
    tracker = AlertTracker()
    assert tracker.update(pd.DataFrame(), pd.DataFrame()) == []  # a flush with nothing new
    assert tracker.update(layers[layers.step < 5], experts[experts.step < 5]) == []
    assert LAYER0 not in tracker._detectors and len(tracker._pending[LAYER0]) == 5
    tracker.update(layers[layers.step >= 5], experts[experts.step >= 5])
    assert LAYER0 in tracker._detectors


def test_detection_is_vectorized_enough():
    # 20k steps x 4 layers x 64 experts (5M expert values): well under a second when nothing loops per step.
    sc = syn.Scenario("perf", "drift", "collapse", steps=20_000, layers=4, num_experts=64, tokens=4096,
                      onset=10_000, ramp=5_000)
    data = syn.simulate(sc, lean=True).layer_data()
    t0 = time.perf_counter()
    result = analyze(data)
    assert time.perf_counter() - t0 < 5.0
    assert any(a.severity == "critical" for a in result.alerts)


def test_empty_and_tiny_layers_give_no_alerts():
    sc = syn.Scenario("tiny", "healthy", "healthy", steps=5, layers=1)
    data = syn.simulate(sc).layer_data()
    res = analyze(data)
    assert res.alerts == [] and math.isnan(res.layers[0].summary()["cv"])
    empty = LayerData("x", 4, 1, np.zeros(0, np.int64), np.zeros((0, 4)), {k: np.zeros(0) for k in data[0].stats})
    assert analyze([empty]).alerts == []
    assert analyze_frames(*syn.simulate(sc).frames()).alerts == []


def test_live_sink_logs_each_alert_once_and_calls_back(caplog):
    import logging

    import pyarrow as pa

    from moewatch.detect.live import live_alerts

    sc = syn.Scenario("d", "sudden", "collapse", onset=1500, ramp=150, steps=2200)
    layers, experts = syn.simulate(sc).frames()
    seen: list[Alert] = []

    def stop_training(alert: Alert) -> None:
        seen.append(alert)
        raise RuntimeError("callback bug")  # must not stop further alerts

    sink = live_alerts(None, stop_training)
    with caplog.at_level(logging.INFO, logger="moewatch"):
        for lch, ech in _chunks(layers, experts, 50):  # what the writer thread hands over: Arrow tables
            sink(pa.Table.from_pandas(ech, preserve_index=False), pa.Table.from_pandas(lch, preserve_index=False))
    batch = detect_frames(layers, experts)
    assert sorted((a.kind, a.severity, a.first_step) for a in seen) == sorted(
        (a.kind, a.severity, a.first_step) for a in batch)
    lines = [r for r in caplog.records if r.getMessage().startswith(("moewatch collapsed", "moewatch critical"))]
    assert len(lines) == sum(a.severity == "critical" for a in batch) and lines[0].levelno == logging.ERROR
    # The live line speaks the report's status vocabulary: a critical imbalance is a collapse.
    assert all(a.status == "collapsed" for a in seen if a.severity == "critical" and a.kind == "imbalance")
    assert any(r.getMessage().startswith("moewatch collapsed (imbalance critical") for r in lines)
    assert "Lever: raise the aux-loss coefficient" in lines[0].getMessage()
    assert sum("on_alert raised RuntimeError" in r.getMessage() for r in caplog.records) == 1


def test_a_bias_column_that_never_moves_is_not_bias_balancing():
    # Routers that carry a zero correction-bias buffer they never update (seen in the reference model's runs).
    sc = syn.Scenario("d", "sudden", "collapse", onset=1500, ramp=150)
    layers, experts = syn.simulate(sc).frames()
    flat = experts.assign(bias=0.0)
    assert all(d.bias is None for d in layer_data_from_frames(layers, flat))
    levers = {a.lever for a in detect_frames(layers, flat) if a.kind == "imbalance"}
    assert levers == {"raise the aux-loss coefficient"}


def test_a_constant_bias_is_not_bias_balancing_on_any_path():
    """The dashboard builds LayerData itself: a zero bias buffer must not turn every lever into 'tune the bias'."""
    import dataclasses

    import numpy as np

    from moewatch.detect.engine import analyze_layer
    from moewatch.detect.windows import bias_moves

    assert not bias_moves(None) and not bias_moves(np.zeros((5, 4))) and not bias_moves(np.full((3, 2), np.nan))
    assert bias_moves(np.array([[0.0, 0.1], [0.0, 0.0]]))
    data = syn.simulate(syn.Scenario("c", "sudden", "collapse", steps=600, onset=200, layers=1)).layer_data()[0]
    zero_bias = dataclasses.replace(data, bias=np.zeros_like(data.tokens, dtype=np.float64))
    levers = {a.lever for a in analyze_layer(zero_bias, DetectorConfig()).alerts}
    assert levers and not any("bias" in lever for lever in levers)
