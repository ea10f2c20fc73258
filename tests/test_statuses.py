"""Signals a user can trust (issue 10): one health computation behind the strip, the layer statuses and the alerts;
statuses that say what holds at the end; alerts that name their peak and their latest value.

Exact checks on recorded data (sample_runs/, synthetic runs), and one real transformers Mixtral run whose starvation
is forced by an intervention on its router, so what it must report holds on any CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import moewatch
from moewatch.detect import (
    STATUSES,
    Alert,
    DetectorConfig,
    analyze_frames,
    fails,
    health,
    status_of,
    worst_status,
)
from moewatch.detect import synthetic as syn
from moewatch.report import build_report, report_paths

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_runs"
EXPECTED = {"aux-loss": "healthy", "z-loss+aux": "healthy", "aux-free-bias": "warning", "collapse": "collapsed",
            "capacity-1.0": "critical", "aux-annealed": "collapsed"}


def _alert(kind="imbalance", severity="critical", ongoing=False, layer="l0", first=0, last=10) -> Alert:
    return Alert(kind=kind, severity=severity, layer=layer, experts=(), first_step=first, last_step=last, value=1.0,
                 threshold=0.5, message="", lever="", detected_step=first, ongoing=ongoing)


def test_status_vocabulary_from_what_holds_at_the_end():
    assert STATUSES == ("healthy", "warning", "recovered", "critical", "collapsed")
    assert status_of([]) == "healthy"
    assert status_of([_alert(severity="info", kind="dead_expert", ongoing=True)]) == "healthy"
    assert status_of([_alert(severity="warning")]) == "warning"
    assert status_of([_alert()]) == "recovered"  # critical, over by the end
    assert status_of([_alert(), _alert(severity="warning", ongoing=True)]) == "recovered"
    assert status_of([_alert(kind="drops", ongoing=True)]) == "critical"
    assert status_of([_alert(kind="nonfinite", ongoing=True), _alert()]) == "critical"
    for kind in ("dead_expert", "dominant_expert", "imbalance", "entropy_collapse"):
        assert status_of([_alert(kind=kind, ongoing=True), _alert(kind="drops", ongoing=True)]) == "collapsed"
        assert _alert(kind=kind).status == "collapsed"
    assert _alert(kind="drops").status == "critical" and _alert(severity="warning").status == "warning"
    assert worst_status(["healthy", "recovered", "warning"]) == "recovered" and worst_status([]) == "healthy"
    assert not fails("recovered") and fails("critical") and fails("collapsed")
    assert fails("recovered", "recovered") and not fails("warning", "recovered") and fails("warning", "warning")
    with pytest.raises(ValueError, match="fail_on"):
        fails("warning", "healthy")


@pytest.fixture(scope="module")
def sample_health() -> dict[str, tuple[pd.DataFrame, object]]:
    if not SAMPLES.is_dir():
        pytest.skip("sample_runs/ is not in this checkout")
    out = {}
    for name in EXPECTED:
        rep = build_report(SAMPLES / name, DetectorConfig())
        out[name] = (health(SAMPLES / name), rep)
    return out


def test_health_of_every_sample_run_agrees_with_its_status(sample_health):
    warmup = DetectorConfig().warmup_steps
    for name, (h, rep) in sample_health.items():
        assert rep.status == EXPECTED[name], (name, rep.verdict)
        assert list(h.columns[:7]) == ["layer", "start_step", "end_step", "level", "status", "kinds", "warmup"]
        assert set(h["layer"]) == {layer.layer for layer in rep.analysis.layers}
        assert (h["start_step"] <= h["end_step"]).all() and h["level"].isin([0, 1, 2]).all()
        assert (h["warmup"] == (h["end_step"] < warmup)).all()
        after = h[~h["warmup"]]
        if rep.status == "healthy":
            assert (after["level"] == 0).all(), name
        if rep.status in ("healthy", "warning"):
            assert (after["level"] < 2).all(), name
        last = h.sort_values("end_step").groupby("layer").tail(1).set_index("layer")
        for layer in rep.analysis.layers:
            # A layer's status is what holds at its last window.
            at_end = last.loc[layer.layer, "status"]
            if layer.status in ("collapsed", "critical"):
                assert at_end == layer.status, (name, layer.layer)
            else:
                assert at_end in ("healthy", "warning"), (name, layer.layer)


def test_the_collapsed_run_is_critical_at_its_end_and_the_capacity_run_is_not_a_collapse(sample_health):
    h, _ = sample_health["collapse"]
    end = h.sort_values("end_step").groupby("layer").tail(1)
    assert (end["level"] == 2).all() and (end["status"] == "collapsed").all()
    assert end["kinds"].str.contains("dead_expert").all()
    h, rep = sample_health["capacity-1.0"]
    end = h.sort_values("end_step").groupby("layer").tail(1)
    assert (end["status"] == "critical").all() and (end["kinds"] == "drops").all()
    assert rep.verdict.startswith("CRITICAL: ") and "of assignments dropped at capacity on 2 of 2 layers" in rep.verdict
    drops = [a for a in rep.analysis.alerts if a.kind == "drops" and a.severity == "critical"]
    assert len(drops) == 2 and all(a.ongoing for a in drops)
    for a in drops:
        # The alert names its latest value (the table's drop rate) and its peak, each as such.
        row = next(layer.summary() for layer in rep.analysis.layers if layer.layer == a.layer)
        assert a.latest == pytest.approx(row["drop_rate"], rel=1e-9)
        assert a.value > a.latest and a.peak_step is not None
        assert f"{a.latest:.1%} now" in a.message and f"peak {a.value:.1%} at step {a.peak_step}" in a.message


def test_every_alert_paints_the_windows_it_covers(sample_health):
    for name, (h, rep) in sample_health.items():
        for layer in rep.analysis.layers:
            rows = h[h["layer"] == layer.layer]
            for a in layer.alerts:
                if a.severity == "info":
                    continue
                end = math.inf if a.ongoing else a.last_step
                covered = rows[(rows["end_step"] >= a.first_step) & (rows["start_step"] <= end)]
                rank = {"warning": 1, "critical": 2}[a.severity]
                assert len(covered) and (covered["level"] >= rank).all(), (name, a)
                assert covered["kinds"].str.contains(a.kind).all(), (name, a)


def test_health_accepts_a_path_a_loaded_run_or_an_analysis(tmp_path):
    sim = syn.simulate(syn.Scenario("c", "sudden", "collapse", onset=600, ramp=100, steps=1000))
    sim.write(tmp_path / "run")
    by_path = health(tmp_path / "run")
    run = moewatch.load(tmp_path / "run")
    by_run = health(run)
    view = run.global_view()
    by_analysis = analyze_frames(view.layers, view.experts).health()
    pd.testing.assert_frame_equal(by_path, by_run)
    pd.testing.assert_frame_equal(by_path, by_analysis)
    assert by_path["level"].max() == 2 and (by_path[by_path["end_step"] < 500]["level"] == 0).all()
    empty = health(analyze_frames(view.layers.iloc[:0], view.experts.iloc[:0]))
    assert len(empty) == 0 and "level" in empty.columns


def test_alert_latest_and_peak_on_a_recovering_episode():
    """A layer that drops 80% of its assignments early and 30% later: the drops alert peaks at the early value and
    says the later one is the latest; once drops stop, it is over and the run reads recovered."""
    steps, e = 600, 8
    rng = np.random.default_rng(0)
    tokens = rng.multinomial(256, np.full(e, 1 / e), size=steps)
    drop_rate = np.where(np.arange(steps) < 200, 0.8, np.where(np.arange(steps) < 400, 0.3, 0.0))
    layers = pd.DataFrame({"step": np.arange(steps), "layer": "l0", "top_k": 1, "num_experts": e,
                           "tokens": 256, "dropped": np.round(drop_rate * 256)})
    experts = pd.DataFrame({"step": np.repeat(np.arange(steps), e), "layer": "l0",
                            "expert": np.tile(np.arange(e), steps), "tokens": tokens.reshape(-1)})
    analysis = analyze_frames(layers, experts, DetectorConfig(warmup_steps=0))
    drops = [a for a in analysis.alerts if a.kind == "drops" and a.severity == "critical"]
    assert len(drops) == 1
    a = drops[0]
    assert a.value == pytest.approx(0.8, abs=0.01) and a.latest == pytest.approx(0.3, abs=0.01)
    assert a.peak_step < 200 <= a.last_step < 400 and not a.ongoing
    assert f"{a.latest:.1%} when it ended at step {a.last_step}" in a.message
    assert f"peak {a.value:.1%} at step {a.peak_step}" in a.message
    assert analysis.status == "recovered"
    d = a.to_dict()
    assert d["status"] == "critical" and d["latest"] == pytest.approx(a.latest) and d["peak_step"] == a.peak_step


# ------------------------------------------------------------------------------- a recovered transformers run

STARVED = (0, 1)


def starved_routing(module, output, starved: tuple[int, ...]):
    """A transformers Mixtral router's output with the experts `starved` masked out of its logits before the top-k
    (a routing bug): what a forward hook on the router returns so that the block routes no token to them."""
    logits_TE, _, _ = output
    mask_E = torch.zeros(logits_TE.shape[-1], dtype=torch.bool)
    mask_E[list(starved)] = True
    logits_TE = logits_TE.masked_fill(mask_E, -1e4)
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    top_TK, indices_TK = torch.topk(probs_TE, module.top_k, dim=-1)
    return logits_TE, top_TK / top_TK.sum(dim=-1, keepdim=True), indices_TK
STARVE_FROM, STARVE_TO, STEPS = 120, 180, 300


def _train_mixtral(run_dir: Path, seed: int = 0) -> None:
    """A tiny transformers Mixtral trained with its aux loss; experts 0 and 1 of layer 0 get no token in steps
    [120, 180): the router's logits for them are masked (as a routing bug or a bad restart would), then released."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=64, output_router_logits=True, router_aux_loss_coef=0.02,
                           use_cache=False)
    model = MixtralForCausalLM(config).train()
    router = model.model.layers[0].mlp.gate
    state = {"step": 0}

    def starve(module, args, output):
        if not STARVE_FROM <= state["step"] < STARVE_TO:
            return None
        return starved_routing(module, output, STARVED)

    router.register_forward_hook(starve)  # before attach: moewatch reads the choice the block really used
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # 1e-3 drifts this toy router into a collapse of its own
    gen = torch.Generator().manual_seed(seed)
    with moewatch.attach(model, run_dir) as watch:
        for step in range(STEPS):
            state["step"] = step
            ids = torch.randint(2, 64, (4, 16), generator=gen)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            watch.step()


@pytest.fixture(scope="module")
def recovered_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("mixtral") / "recovered"
    _train_mixtral(run_dir)
    return run_dir


def test_a_recovered_mixtral_run_reports_recovered(recovered_run, capsys):
    from typer.testing import CliRunner

    from moewatch.cli import app

    experts = moewatch.load(recovered_run).experts
    starved = experts[(experts["layer"] == "model.layers.0.mlp.gate") & experts["expert"].isin(STARVED)]
    window = starved[(starved["step"] >= STARVE_FROM) & (starved["step"] < STARVE_TO)]
    assert len(window) == 2 * (STARVE_TO - STARVE_FROM) and (window["tokens"] == 0).all()  # the forced starvation
    assert starved[starved["step"] >= STARVE_TO + 20]["tokens"].sum() > 0  # and its end

    rep = build_report(recovered_run, DetectorConfig())
    assert rep.status == "recovered", rep.verdict
    layers = {layer.layer: layer.status for layer in rep.analysis.layers}
    assert layers["model.layers.0.mlp.gate"] == "recovered"
    assert layers["model.layers.1.mlp.gate"] in ("healthy", "warning")
    dead = [a for a in rep.analysis.alerts if a.kind == "dead_expert" and a.severity == "critical"]
    assert dead and not any(a.ongoing for a in dead)
    assert all(STARVE_FROM - 20 <= a.first_step <= STARVE_FROM + 20 for a in dead)
    assert set(STARVED) <= set(dead[0].experts)
    assert rep.verdict.startswith("RECOVERED: ") and "no critical alert holds at the end" in rep.verdict
    h = health(recovered_run)
    end = h.sort_values("end_step").groupby("layer").tail(1)
    assert (end["level"] < 2).all()

    runner = CliRunner()
    ok = runner.invoke(app, ["report", str(recovered_run), "--format", "json"])
    assert ok.exit_code == 0, ok.output
    doc = json.loads(ok.stdout)
    assert doc["status"] == "recovered" and doc["runs"][0]["verdict"].startswith("RECOVERED")
    assert runner.invoke(app, ["report", str(recovered_run), "--fail-on", "recovered"]).exit_code == 1
    assert runner.invoke(app, ["report", str(recovered_run), "--fail-on", "critical"]).exit_code == 0
    bad = runner.invoke(app, ["report", str(recovered_run), "--fail-on", "sometimes"])
    assert bad.exit_code == 2


def test_fail_on_tightens_the_gate_for_every_status(capsys):
    if not SAMPLES.is_dir():
        pytest.skip("sample_runs/ is not in this checkout")
    for name, status in EXPECTED.items():
        for fail_on in ("warning", "recovered", "critical"):
            code = report_paths([SAMPLES / name], "json", fail_on=fail_on)
            assert code == int(fails(status, fail_on)), (name, fail_on)
            assert json.loads(capsys.readouterr().out)["status"] == status


def test_bad_cli_arguments_get_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "moewatch.cli", *args], capture_output=True, text=True,
                              timeout=120)

    for args, needle in ((["report", str(tmp_path), "--fail-on", "sometimes"], "'--fail-on'"),
                         (["report"], "Missing argument"), (["nosuch"], "No such command"),
                         (["report", str(tmp_path / "nope")], "does not exist")):
        done = cli(*args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, (args, done.stderr)
        assert lines[0].startswith("moewatch: error: ") and needle in lines[0], (args, lines)
    assert cli("version").returncode == 0


# ------------------------------------------------------------------------------- verdicts on edge cases


def _frames(shares_per_step: np.ndarray, tokens: int = 1024, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One layer's tables from per-step expert shares ``[S, E]`` (multinomial counts, top-1)."""
    rng = np.random.default_rng(seed)
    steps, e = shares_per_step.shape
    counts = np.stack([rng.multinomial(tokens, p) for p in shares_per_step])
    layers = pd.DataFrame({"step": np.arange(steps), "layer": "l0", "top_k": 1, "num_experts": e,
                           "tokens": tokens, "dropped": 0})
    experts = pd.DataFrame({"step": np.repeat(np.arange(steps), e), "layer": "l0",
                            "expert": np.tile(np.arange(e), steps), "tokens": counts.reshape(-1)})
    return layers, experts


def test_a_run_too_short_for_a_window_is_not_called_judged_healthy():
    """A run with fewer steps than the detector's first window has nothing judged: the verdict says so instead of
    "no warning on any layer"."""
    from moewatch.detect.verdict import verdict

    layers, experts = _frames(np.full((3, 8), 1 / 8))
    analysis = analyze_frames(layers, experts)
    assert analysis.status == "healthy" and len(analysis.health()) == 0
    text = verdict(analysis)
    assert text.startswith("HEALTHY: too few steps to judge yet: 3 recorded") and "no warning on any" not in text
    # One window is enough to be judged.
    layers, experts = _frames(np.full((20, 8), 1 / 8))
    assert verdict(analyze_frames(layers, experts)) == "HEALTHY: no warning on any of 1 layer."


def test_a_warning_still_counting_down_to_clear_is_said_to_be_clearing():
    """An imbalance warning whose last two windows are balanced again still holds (hysteresis clears after three):
    the verdict's value now is back under the threshold, so it must say the warning is clearing; one that still
    breaches in the last window must not."""
    from moewatch.detect.verdict import verdict

    e, steps = 8, 400
    hot = np.full(e, 0.7 / e)
    hot[0] += 0.3  # CV 0.3 * sqrt(7) ~ 0.79: a warning, never critical
    flat = np.full(e, 1 / e)
    config = DetectorConfig(warmup_steps=0)
    clearing = np.stack([hot if 100 <= t < steps - 40 else flat for t in range(steps)])
    analysis = analyze_frames(*_frames(clearing), config)
    assert analysis.status == "warning"
    held = [a for a in analysis.alerts if a.kind == "imbalance" and a.ongoing]
    assert held and all(a.last_step < steps - 40 and a.latest < a.threshold for a in held)
    assert "(clearing)" in verdict(analysis) and verdict(analysis).endswith("it holds at the end.")
    holding = np.stack([hot if t >= 100 else flat for t in range(steps)])
    analysis = analyze_frames(*_frames(holding), config)
    assert analysis.status == "warning" and "(clearing)" not in verdict(analysis)


def test_nonfinite_message_names_its_unit_once():
    layers, experts = _frames(np.full((200, 8), 1 / 8))
    layers["nonfinite"] = np.where((layers["step"] >= 60) & (layers["step"] < 80), 5, 0)
    analysis = analyze_frames(layers, experts)
    (a,) = [a for a in analysis.alerts if a.kind == "nonfinite"]
    assert "(NaN/inf values per window): 100 when it ended at step 79 (its peak)." in a.message, a.message


def test_a_report_row_for_a_condition_that_came_back_shows_the_episode_holding_now(capsys):
    """Two imbalance episodes on one layer: a strong one that ended, a weaker one holding at the end. The report's
    row (one per kind and layer) must describe the one holding now, which is what the layer table shows."""
    from moewatch.report import RunReport, render_text

    steps, e = 1000, 8
    rng = np.random.default_rng(0)
    c = np.where((np.arange(steps) >= 200) & (np.arange(steps) < 400), 0.9, np.where(np.arange(steps) >= 700, 0.5, 0))
    p = np.full((steps, e), 0.0) + ((1 - c) / e)[:, None]
    p[:, 0] += c
    tokens = np.stack([rng.multinomial(1024, row) for row in p])
    layers = pd.DataFrame({"step": np.arange(steps), "layer": "l0", "top_k": 1, "num_experts": e, "tokens": 1024,
                           "dropped": 0})
    experts = pd.DataFrame({"step": np.repeat(np.arange(steps), e), "layer": "l0",
                            "expert": np.tile(np.arange(e), steps), "tokens": tokens.reshape(-1)})
    analysis = analyze_frames(layers, experts, DetectorConfig())
    analysis.alerts = analysis.shown_alerts()
    imbalance = [a for a in analysis.alerts if a.kind == "imbalance" and a.severity == "critical"]
    assert len(imbalance) == 2 and sum(a.ongoing for a in imbalance) == 1
    text = render_text([RunReport(Path("flap"), {"model_class": "x"}, "finished", steps, analysis)])
    lines = text.splitlines()
    row = next(i for i, line in enumerate(lines) if "CRITICAL imbalance" in line)
    holding = next(a for a in imbalance if a.ongoing)
    assert "(ongoing)" in lines[row] and lines[row + 1].strip() == holding.message and " now" in holding.message
    cv_now = analysis.layers[0].summary()["cv"]
    assert f"CV {cv_now:.2f} now" in lines[row + 1]  # the table's CV, named as the latest value


def test_the_dashboard_judges_with_the_report_s_thresholds(tmp_path):
    """`moewatch serve --config/--set` and `moewatch report --config/--set` build one DetectorConfig: with the same
    thresholds the page's status, verdict and alerts are the report's."""
    from moewatch.app.catalog import Catalog

    from moewatch.report import build_config

    if not SAMPLES.is_dir():
        pytest.skip("sample_runs/ is not in this checkout")
    strict = build_config(None, ["drop_critical=0.9", "drop_warning=0.5"])  # 25% drops pass as healthy now
    for config, expected in ((DetectorConfig(), "critical"), (strict, "healthy")):
        rep = build_report(SAMPLES / "capacity-1.0", config)
        assert rep.status == expected
        catalog = Catalog(SAMPLES, background=False, config=config)
        run_id = next(e.run_id for e in catalog.entries() if e.name == "capacity-1.0")
        det = catalog.detector.get(catalog.run(run_id))
        assert det.status == rep.status and det.sentence == rep.verdict
        assert sorted(a.message for a in det.alerts) == sorted(a.message for a in rep.analysis.alerts)
