"""The demo: its scenarios really collapse or stay healthy, moewatch records them, the summaries add up."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import moewatch
from moewatch.detect import STATUSES
from moewatch.detect import synthetic as syn
from moewatch.detect.evaluate import observed_collapse_step
from moewatch.reference.data import build_corpus
from moewatch.reference.demo import (
    BASE_CONFIG,
    SCENARIOS,
    Scenario,
    ScenarioSummary,
    _record_collapse_step,
    default_scenarios,
    format_summary_table,
    judge,
    routing_stats,
    run_demo,
    train_scenario,
)

# The demo's recipe shrunk to seconds: one narrower MoE layer, shorter sequences, more of them. With one layer
# there is one chance to collapse, not two, so it gets 32 (smaller) experts: a collapsed router keeps only the
# handful the data structure supports (about 8 here), which is far past the half-dead line, while balanced
# routers keep almost all.
SMALL = dataclasses.replace(
    BASE_CONFIG, n_layer=1, d_model=32, n_head=2, n_experts=32, d_expert=16, block_size=32
)
SMALL_STEPS = 300
TINY = dataclasses.replace(
    BASE_CONFIG, n_layer=2, d_model=16, n_head=2, n_experts=4, d_expert=8, block_size=8
)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(200_000, seed=0)


def small(name: str) -> Scenario:
    return default_scenarios(SMALL)[name]


def test_default_scenarios_differ_only_in_balancing() -> None:
    assert list(SCENARIOS) == ["collapse", "aux-loss", "z-loss+aux", "aux-free-bias", "aux-annealed", "aux-free-lost",
                               "capacity-1.0"]
    balancing = {
        "aux_loss_coef",
        "z_loss_coef",
        "bias_update_rate",
        "capacity_factor",
        "router_noise",
        "noise_std",
    }
    collapse = SCENARIOS["collapse"]
    assert (
        collapse.config.aux_loss_coef == collapse.config.z_loss_coef == collapse.config.bias_update_rate == 0
    )
    assert collapse.config.capacity_factor is None and collapse.config.router_noise == "none"
    for s in SCENARIOS.values():
        assert (s.lr, s.batch_size, s.grad_clip) == (collapse.lr, collapse.batch_size, collapse.grad_clip)
        for field in dataclasses.fields(s.config):
            if field.name not in balancing:
                assert getattr(s.config, field.name) == getattr(collapse.config, field.name), field.name
    assert SCENARIOS["aux-loss"].config.aux_loss_coef > 0
    assert SCENARIOS["z-loss+aux"].config.z_loss_coef > 0 and SCENARIOS["z-loss+aux"].config.aux_loss_coef > 0
    assert SCENARIOS["aux-free-bias"].config.bias_update_rate > 0
    assert SCENARIOS["capacity-1.0"].config.capacity_factor == 1.0
    annealed = SCENARIOS["aux-annealed"]
    assert annealed.config == SCENARIOS["aux-loss"].config and annealed.aux_decay is not None
    assert [s.aux_decay for s in SCENARIOS.values()].count(None) == len(SCENARIOS) - 1
    lost = SCENARIOS["aux-free-lost"]
    assert lost.config == SCENARIOS["aux-free-bias"].config and lost.bias_stop == 0.5
    assert [s.bias_stop for s in SCENARIOS.values()].count(None) == len(SCENARIOS) - 1


def test_bias_stop_freezes_the_bias_where_it_stands(corpus, tmp_path) -> None:
    """From bias_stop on, the aux-free bias is not updated: the recorded bias is constant after it and moving before."""
    scenario = dataclasses.replace(small("aux-free-lost"), warmup_steps=0)
    train_scenario(scenario, steps=20, device="cpu", seed=0, run_dir=tmp_path / "r", corpus=corpus, progress=False)
    run = moewatch.load(tmp_path / "r")
    bias = run.experts.pivot_table(index="step", columns=["layer", "expert"], values="bias").to_numpy()
    # bias recorded at step s is the one used in step s's forward: updates after steps 0..9 show in steps 1..10
    assert np.abs(np.diff(bias[:11], axis=0)).max() > 0
    np.testing.assert_array_equal(bias[11:], np.broadcast_to(bias[10], bias[11:].shape))
    assert run.meta["meta"]["bias_stop"] == 0.5
    with pytest.raises(ValueError, match="bias_stop"):
        Scenario("x", "x", SMALL, bias_stop=0.5)  # no bias to stop
    with pytest.raises(ValueError, match="bias_stop"):
        dataclasses.replace(scenario, bias_stop=1.0)


def starved_at_end(run_dir, steps: int = 20) -> int:
    """Experts of the (one-layer) run that got under 10% of their fair share over its last ``steps`` recorded steps.

    Judged over a stretch rather than the final step alone: one step of 512 tokens over 32 experts leaves a few
    experts idle by chance, a stretch of 20 does not.
    """
    experts = moewatch.load(run_dir).experts
    load = experts[experts["step"] > experts["step"].max() - steps].groupby("expert")["tokens"].sum()
    return int((load < 0.1 * load.mean()).sum())


# The reference model's trajectory differs between CPU models (kernel rounding, amplified by the router), so each
# seed's run is a draw per machine. The assertions below held with these margins in every one of 36 draws (seeds 0-11
# under AVX-512, AVX2 and no-SIMD kernels): the collapse starved 21-28 of the 32 experts over its last 20 steps (the
# line: 16) while the balanced runs starved at most 2; a balanced run's final-step CV was at most 0.40x the collapse's
# (the line: 0.6x), its max share at most 0.22 (0.8) and its idle experts at most 7 (16). The demo's own single-step
# criterion (ScenarioSummary.collapsed) held too, but with 17 idle experts for the line's 16 in one draw: the test
# reads the collapse over a stretch instead.
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_collapse_collapses_and_balancing_keeps_cv_well_below(seed: int, corpus, tmp_path) -> None:
    results = {
        name: train_scenario(
            small(name),
            steps=SMALL_STEPS,
            device="cpu",
            seed=seed,
            run_dir=tmp_path / name,
            corpus=corpus,
            progress=False,
        )
        for name in ("collapse", "aux-loss", "aux-free-bias")
    }
    collapse = results["collapse"]
    assert starved_at_end(tmp_path / "collapse") >= SMALL.n_experts / 2, collapse
    for name in ("aux-loss", "aux-free-bias"):
        healthy = results[name]
        assert not healthy.collapsed, healthy
        assert starved_at_end(tmp_path / name) < SMALL.n_experts / 4, healthy
        assert max(healthy.cv) < 0.6 * max(collapse.cv), (name, healthy.cv, collapse.cv)
    # The summary agrees with what moewatch recorded for the final step (the collapse is in the run
    # directory).
    run = moewatch.load(tmp_path / "collapse")
    last = run.layers[run.layers["step"] == SMALL_STEPS - 1].sort_values("layer")
    assert len(last) == SMALL.n_layer
    assert last["cv"].tolist() == pytest.approx(list(collapse.cv), rel=1e-6)
    assert last["max_share"].tolist() == pytest.approx(list(collapse.max_share), rel=1e-6)
    assert last["dead"].tolist() == list(collapse.dead)


def test_run_demo_records_every_scenario_with_its_settings(tmp_path, corpus) -> None:
    scenarios = list(default_scenarios(TINY).values())
    summaries = run_demo(
        tmp_path, steps=6, device="cpu", seed=3, scenarios=scenarios, progress=False, corpus_bytes=50_000
    )
    assert [s.name for s in summaries] == list(SCENARIOS)
    for scenario, summary in zip(scenarios, summaries, strict=True):
        run = moewatch.load(tmp_path / scenario.name)
        assert summary.run_dir == str(tmp_path / scenario.name)
        assert sorted(run.layers["step"].unique().tolist()) == list(range(6))
        assert sorted(run.layers["layer"].unique()) == ["blocks.0.moe.router", "blocks.1.moe.router"]
        meta = run.meta["meta"]
        assert meta["scenario"] == scenario.name and meta["steps"] == 6 and meta["seed"] == 3
        assert meta["config"] == json.loads(
            json.dumps(dataclasses.asdict(dataclasses.replace(scenario.config, seed=3)))
        )
        assert meta["optimizer"]["lr"] == scenario.lr and meta["batch_size"] == scenario.batch_size
        # Every assignment is recorded: kept plus dropped = tokens * top_k per layer and step.
        per_step = run.experts.groupby(["step", "layer"])[["tokens", "dropped"]].sum()
        assert (
            (per_step["tokens"] + per_step["dropped"]) == scenario.batch_size * TINY.block_size * TINY.top_k
        ).all()
        dropped = int(run.experts["dropped"].sum())
        biases = run.experts["bias"].abs().max()
        if scenario.name == "capacity-1.0":
            assert dropped > 0 and summary.drop_rate > 0
        else:
            assert dropped == 0 and summary.drop_rate == 0
        if scenario.config.bias_update_rate > 0:
            assert biases > 0  # the bias moved, and moewatch saw it
        else:
            assert biases == 0 or math.isnan(biases)
    statuses = judge(summaries)
    assert set(statuses) == set(SCENARIOS) and set(statuses.values()) <= set(STATUSES)
    table = format_summary_table(summaries, statuses)
    assert all(name in table for name in SCENARIOS)


def test_run_demo_rejects_unknown_and_duplicate_scenarios(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown scenario 'nope'"):
        run_demo(tmp_path, steps=2, scenarios=["nope"], progress=False)
    with pytest.raises(ValueError, match="steps"):
        run_demo(tmp_path, steps=0, progress=False)
    with pytest.raises(ValueError, match="unique"):
        run_demo(tmp_path, steps=2, scenarios=["collapse", SCENARIOS["collapse"]], progress=False)


def test_one_step_run(tmp_path, corpus) -> None:
    (s,) = run_demo(tmp_path, steps=1, device="cpu", scenarios=[Scenario("one", "", TINY)], progress=False)
    assert s.steps == 1 and sum(s.dead) < TINY.n_layer * TINY.n_experts
    assert moewatch.load(tmp_path / "one").layers["step"].tolist() == [0, 0]


def test_train_scenario_without_run_dir_and_progress_bar(corpus, capsys) -> None:
    scenario = Scenario("tiny", "", TINY, batch_size=2)
    summary = train_scenario(
        scenario, steps=12, device="cpu", seed=0, corpus=corpus, progress=True, log_every=5
    )
    assert summary.run_dir is None and summary.steps == 12 and math.isfinite(summary.final_loss)
    assert len(summary.cv) == TINY.n_layer and sum(summary.dead) <= TINY.n_layer * TINY.n_experts
    err = capsys.readouterr().err
    assert "tiny" in err and "max_share" in err  # the bar shows loss, CV and max share


def test_routing_stats_match_float64_reference() -> None:
    tokens_LE = torch.tensor([[10.0, 0.0, 5.0, 1.0], [4.0, 4.0, 4.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    cv, share, dead = routing_stats(tokens_LE)
    row = [10.0, 0.0, 5.0, 1.0]
    mean = sum(row) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / 4)
    assert cv[0] == pytest.approx(std / mean) and share[0] == pytest.approx(10 / 16) and dead[0] == 1
    assert cv[1] == 0.0 and share[1] == pytest.approx(0.25) and dead[1] == 0
    assert cv[2] == 0.0 and share[2] == 0.0 and dead[2] == 4  # nothing routed: no division by zero


def summary(**kw) -> ScenarioSummary:
    base = dict(
        name="x",
        steps=1,
        final_loss=1.0,
        cv=(0.1, 0.2),
        max_share=(0.2, 0.3),
        dead=(0, 1),
        drop_rate=0.0,
        num_experts=8,
        seconds=1.0,
        run_dir=None,
    )
    return ScenarioSummary(**{**base, **kw})


def test_collapse_criterion() -> None:
    assert not summary().collapsed
    assert summary(max_share=(0.2, 0.8)).collapsed
    assert summary(dead=(4, 0)).collapsed  # half of 8 experts
    assert not summary(dead=(3, 3), max_share=(0.79, 0.5)).collapsed
    table = format_summary_table([summary(name="good"), summary(name="bad", dead=(6, 7), drop_rate=0.25)])
    lines = table.splitlines()
    assert "collapsed" not in next(line for line in lines if line.startswith("good"))
    bad = next(line for line in lines if line.startswith("bad"))
    assert "collapsed at the final step" in bad and "6,7" in bad and "25.0%" in bad
    # With the detector's statuses (what `moewatch demo` prints), the table speaks the report's vocabulary.
    judged = format_summary_table([summary(name="good"), summary(name="bad")], {"good": "healthy", "bad": "critical"})
    assert judged.splitlines()[0].endswith("status") and "<-" not in judged
    assert judged.splitlines()[2].endswith("healthy") and judged.splitlines()[3].endswith("critical")


def test_aux_decay_schedule() -> None:
    s = SCENARIOS["aux-annealed"]
    start, end = s.aux_decay
    coef = s.config.aux_loss_coef
    assert [s.aux_coef_at(t, 400) for t in (0, int(start * 400))] == [coef, coef]
    mid = int((start + end) / 2 * 400)
    assert s.aux_coef_at(mid, 400) == pytest.approx(coef / 2)
    assert s.aux_coef_at(int(end * 400), 400) == 0.0 and s.aux_coef_at(399, 400) == 0.0
    assert SCENARIOS["aux-loss"].aux_coef_at(399, 400) == coef
    with pytest.raises(ValueError, match="Scenario.aux_decay"):
        dataclasses.replace(s, aux_decay=(0.6, 0.5))
    with pytest.raises(ValueError, match="aux_loss_coef > 0"):
        dataclasses.replace(SCENARIOS["collapse"], aux_decay=(0.1, 0.2))


def test_collapse_scenarios_record_their_observed_collapse_step(tmp_path, corpus) -> None:
    """The ground truth the detector's evaluation uses comes from the recorded counts, written after the run."""
    # 100 steps: the observed collapse needs 20 recorded steps of holding after it, and it completed by step 9-24 in
    # every one of 36 draws of this run (seeds 0-11, three CPU kernel settings), so it is recorded with room to spare.
    train_scenario(small("collapse"), steps=100, device="cpu", seed=0, run_dir=tmp_path / "c", corpus=corpus,
                   progress=False)
    run = moewatch.load(tmp_path / "c")
    meta, view = run.meta["meta"], run.global_view()
    assert meta["collapse_step"] == observed_collapse_step(view.layers, view.experts)  # from the recorded counts
    assert meta["label"] == "collapse_at_start" and 0 < meta["collapse_step"] < 50
    # A collapse scenario whose router held on: no collapse to record, so no label either.
    syn.simulate(syn.Scenario("held", "healthy", "healthy", steps=200)).write(tmp_path / "held")
    _record_collapse_step(tmp_path / "held", after=50)
    meta = moewatch.load(tmp_path / "held").meta["meta"]
    assert meta["label"] is None and meta["collapse_step"] is None and "not evaluated" in meta["label_note"]


@pytest.mark.parametrize(
    ("field", "value"), [("name", ""), ("name", "a/b"), ("lr", 0.0), ("batch_size", 0), ("grad_clip", -1.0)]
)
def test_scenario_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"Scenario.{field}"):
        dataclasses.replace(SCENARIOS["collapse"], **{field: value})
