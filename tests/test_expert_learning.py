"""The expert_stalled rule: an expert whose gradient norm stays a small fraction of its layer's median expert's for
stall_windows windows in a row has stopped learning, named with its experts and onset; healthy spread never fires."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moewatch.detect import DetectorConfig, analyze, analyze_frames
from moewatch.detect.windows import LayerData


def layer(grad: np.ndarray | None, steps: int = 1200, E: int = 8, seed: int = 0) -> LayerData:
    rng = np.random.default_rng(seed)
    tokens = rng.multinomial(2048, np.full(E, 1 / E), size=steps)
    stats = {"tokens": np.full(steps, 1024.0), "dropped": np.zeros(steps), "entropy_norm": np.full(steps, 0.8),
             "z_loss": np.full(steps, 1.0), "logit_abs_max": np.full(steps, 3.0), "nonfinite": np.zeros(steps)}
    return LayerData("gate", E, 2, np.arange(steps), tokens, stats, grad_norm=grad)


def healthy_grads(steps: int = 1200, E: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.3, 3.0, size=E)  # experts learn at different rates: a 10x spread is healthy
    return scale * np.exp(0.5 * rng.standard_normal((steps, E)))


def test_starved_gradients_are_flagged_with_the_experts_and_their_onset():
    grad = healthy_grads()
    grad[600:, [3, 5]] *= 0.005  # experts 3 and 5 stop getting gradient from step 600
    analysis = analyze([layer(grad)])
    stalled = [a for a in analysis.alerts if a.kind == "expert_stalled"]
    assert len(stalled) == 1
    a = stalled[0]
    assert a.severity == "warning" and a.experts == (3, 5) and a.value == 2
    assert 560 <= a.first_step <= 660 and a.detected_step > a.first_step  # onset at the drop, raised 5 windows on
    assert "stopped learning" in a.message and "gradient" in a.lever
    assert not [x for x in analysis.alerts if x.kind != "expert_stalled"], "counts stay balanced: nothing else"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_healthy_spread_and_missing_gradients_never_fire(seed):
    grad = healthy_grads(seed=seed)
    grad[::7] = np.nan  # steps without a recorded norm (an optimizer step skipped) are ignored
    assert not analyze([layer(grad, seed=seed)]).alerts
    assert not analyze([layer(None, seed=seed)]).alerts  # no gradient norms recorded: the rule is silent
    zero = healthy_grads(seed=seed)
    zero[400:] = 0.0  # the whole layer's gradient vanishes (frozen layer): no median to compare against
    assert not [a for a in analyze([layer(zero, seed=seed)]).alerts if a.kind == "expert_stalled"]


def test_a_short_dip_is_not_a_stall_and_the_threshold_is_a_setting():
    grad = healthy_grads()
    grad[600:660, 2] *= 0.001  # three windows: fewer than stall_windows
    assert not analyze([layer(grad)]).alerts
    grad = healthy_grads()
    grad[:, 2] = np.median(grad, axis=1)
    grad[600:, 2] *= 0.2
    assert not analyze([layer(grad)]).alerts  # 20% of the median is slow, not stopped
    strict = analyze([layer(grad)], DetectorConfig(stall_fraction=0.5)).alerts
    assert [a.kind for a in strict] == ["expert_stalled"] and 2 in strict[0].experts
    with pytest.raises(ValueError, match="stall_fraction"):
        DetectorConfig(stall_fraction=1.5)


def test_the_frames_path_reads_a_grad_norm_column():
    grad = healthy_grads()
    grad[600:, 3] *= 0.005
    d = layer(grad)
    S, E = d.tokens.shape
    experts = pd.DataFrame({"step": np.repeat(d.steps, E), "layer": "gate", "expert": np.tile(np.arange(E), S),
                            "tokens": d.tokens.reshape(-1), "grad_norm": grad.reshape(-1)})
    layers = pd.DataFrame({"step": d.steps, "layer": "gate", "top_k": 2, "num_experts": E, **d.stats})
    alerts = analyze_frames(layers, experts).alerts
    assert [(a.kind, a.experts) for a in alerts] == [("expert_stalled", (3,))]


def test_the_dashboard_shows_gradient_norms_beside_the_load_and_the_detector_names_the_same_expert(tmp_path):
    from moewatch.app import figures
    from moewatch.app.data import RunData
    from moewatch.app.windows import detector_window

    from moewatch.detect import analyze_run
    from tests.test_app_data import random_counts, set_columns, write_manifest, write_part

    rng = np.random.default_rng(5)
    run = tmp_path / "r"
    write_manifest(run, ["gate"], 8)
    write_part(run, {"gate": random_counts(rng, 600, 8)}, np.arange(600))
    grad = healthy_grads(600, 8, seed=5)
    grad[300:, 3] *= 0.002
    # rows are step-major, experts in order (as write_part writes them)
    set_columns(run / "experts" / "r0000-s0001-00000000.parquet", grad_norm=grad.reshape(-1))

    stalled = [a for a in analyze_run(run).alerts if a.kind == "expert_stalled"]
    assert [a.experts for a in stalled] == [(3,)]
    data = RunData(run, "r")
    data.refresh()
    assert data.has_grads
    np.testing.assert_allclose(data.grads("gate"), grad, rtol=1e-6)
    fig, info = figures.heatmap_figure(data, "gate", width_px=800, window=detector_window(data, "gate"))
    assert len(fig["data"]) == 2 and fig["data"][1]["yaxis"] == "y2" and not info.raw
    z = np.asarray(fig["data"][1]["z"], dtype=np.float64)  # [experts (in display order), columns]
    row = fig["data"][1]["y"].index("e3")
    assert (z[row, -5:] <= -2 + 1e-6).all() and np.nanmax(np.abs(np.delete(z, row, axis=0)[:, -5:])) < 1.5


def test_nanmean_bins_is_the_per_bin_nanmean_for_equal_and_unequal_bins():
    """The windows' averaging of per-step values (a reshape-sum for equal bins, reduceat otherwise) against a float64
    nanmean per bin: every remainder length, NaN steps, and bins with nothing recorded (NaN)."""
    import warnings

    from moewatch.detect.windows import nanmean_bins

    rng = np.random.default_rng(0)
    for n in (1, 5, 37, 40, 41, 100):
        x = rng.random((n, 4)).astype(np.float32)
        x[rng.random((n, 4)) < 0.3] = np.nan
        cases = [np.arange(k) * size for size in (1, 3, 10, 40) for k in range(1, n // size + 2) if (k - 1) * size < n]
        cases.append(np.array([0, 2, 7]) if n > 7 else np.array([0]))
        for starts in cases:
            ends = [*starts[1:], n]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a bin with nothing recorded: NaN
                ref = np.array([np.nanmean(x[a:b].astype(np.float64), axis=0) for a, b in zip(starts, ends, strict=True)])
            np.testing.assert_allclose(nanmean_bins(x, starts), ref, rtol=1e-12, equal_nan=True)
