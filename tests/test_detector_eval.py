"""The detector's quality bar (issue 4): every collapsing run flagged before its collapse completes, no warning on
a healthy run, no critical on a run that recovers; plus the hook that adds labeled real runs to the set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import moewatch
from moewatch.detect import CRITICAL, WARNING
from moewatch.detect import synthetic as syn
from moewatch.detect.evaluate import (
    Scores,
    evaluate,
    evaluate_scenarios,
    labeled_runs,
    observed_collapse_step,
    scenario_set,
)

REPO = Path(__file__).resolve().parents[1]


def check(scores: Scores, median_lead: int = 100) -> None:
    report = scores.table()
    assert scores.recall == 1.0, report
    assert scores.precision == 1.0, report
    assert scores.false_alarms == [], report
    assert scores.missed == [], report
    assert scores.overcalled == [], report
    assert min(scores.leads) > 0 and scores.median_lead >= median_lead, report


def test_synthetic_evaluation_set():
    scores = evaluate(seeds=(0, 1))
    families = {c.name.split("/")[0] for c in scores.cases}
    assert families == {"healthy-noisy", "small-batch", "slow-drift", "sudden", "dead-gradual", "oscillation",
                        "late-recovery", "healthy-ep", "ep-hot-device"}
    check(scores)
    # Degraded runs are not silent either: each gets at least a warning.
    assert all(c.flagged for c in scores.cases if c.label == "degraded")
    # A hot expert-parallel device is an ep_straggler (and only that family has one), after its drift begins.
    for c in scores.cases:
        ep = [a for a in c.alerts if a.kind == "ep_straggler"]
        assert bool(ep) == c.name.startswith("ep-hot-device"), c.name
        assert all(a.first_step >= 800 and a.experts == tuple(range(len(a.experts))) for a in ep), c.name
    # The trend warning's projected crossing lands near the observed one.
    est = scores.trend_estimates
    assert len(est) >= len(scores.leads) // 2
    assert sorted(abs(p - o) for p, o in est)[len(est) // 2] < 150


@pytest.mark.slow
def test_synthetic_evaluation_set_more_seeds_and_the_frames_path():
    check(evaluate(seeds=range(2, 8)))
    subset = [sc for sc in scenario_set((9,)) if sc.num_experts == 16]
    check(Scores(tuple(evaluate_scenarios(subset, via_frames=True))))


def test_labeled_run_directories_join_the_set(tmp_path):
    runs = {
        "collapse": syn.Scenario("c", "sudden", "collapse", onset=1500, ramp=150),
        "healthy": syn.Scenario("h", "healthy", "healthy", seed=5),
        "degraded": syn.Scenario("r", "recovery", "degraded", onset=1200, ramp=600, strength=0.2),
    }
    for name, sc in runs.items():
        syn.simulate(sc).write(tmp_path / "lab" / name)
    unlabeled = syn.simulate(syn.Scenario("u", "healthy", "healthy"))
    unlabeled.write(tmp_path / "lab" / "unlabeled")
    manifest = tmp_path / "lab" / "unlabeled" / "run.json"
    manifest.write_text(manifest.read_text().replace('"label": "healthy"', '"label": null'))
    cases = labeled_runs(tmp_path / "lab")
    assert sorted(c.label for c in cases) == ["collapse", "degraded", "healthy"]
    assert {c.label: c.collapse_step for c in cases}["collapse"] == 1650
    check(Scores(tuple(cases)), median_lead=50)  # one sudden collapse: ~90 steps of warning


def check_demo(scores: Scores) -> None:
    report = scores.table()
    labels = sorted({c.label for c in scores.cases})
    assert labels == ["collapse", "collapse_at_start", "degraded", "healthy"], report
    assert scores.false_alarms == [] and scores.missed == [] and scores.overcalled == [], report
    assert scores.recall == 1.0 and scores.precision == 1.0 and min(scores.leads) > 0, report


def test_labeled_sample_runs_in_the_repo():
    """The reference model's demo runs (seed 0) as recorded in sample_runs/, each labelled in its run.json."""
    root = REPO / "sample_runs"
    if not root.is_dir():
        pytest.skip("sample_runs/ is not in this checkout")
    check_demo(Scores(tuple(labeled_runs(root))))
    check_lost_balancer(root / "aux-free-lost", "the recorded sample run", strict=True)


def check_lost_balancer(path: Path, where: str, strict: bool = False) -> None:
    """The aux-free run whose bias stops at half-time: the override share (the bias overriding most of the router's
    choices) warns on every layer while the bias still holds the load, no critical alert comes before the bias
    stops, and the collapse it was holding back is critical once it has. ``strict`` (the recorded sample run, exact):
    balancer_override is the only warning before the stop."""
    from moewatch.detect import analyze_run, status_of
    from moewatch.reference.demo import DEFAULT_STEPS, SCENARIOS

    run = moewatch.load(path)
    stop = SCENARIOS["aux-free-lost"].collapse_after(DEFAULT_STEPS)
    alerts = analyze_run(path).alerts
    shown = f"{where}: {[(a.kind, a.severity, a.layer, a.first_step, a.detected_step) for a in alerts]}"
    override = {a.layer for a in alerts if a.kind == "balancer_override" and a.first_step < stop
                and a.detected_step < stop}
    assert override == set(run.layers["layer"].unique()), shown
    assert not [a for a in alerts if a.severity == CRITICAL and a.first_step < stop], shown
    assert [a for a in alerts if a.severity == CRITICAL and a.ongoing], shown
    assert status_of(alerts) == "collapsed", shown
    if strict:
        early = {a.kind for a in alerts if a.severity in (WARNING, CRITICAL) and a.first_step < stop}
        assert early == {"balancer_override"}, shown


# The reference model's trajectory is not bit-reproducible across CPU models: the kernels' rounding differs (AVX2 and
# AVX-512 builds of the same matmul and softmax), and a router amplifies it, so sample_runs/aux-annealed retrained
# with seed 0 on an AVX-512 machine parts from the recorded (AVX2) run at step 22. What a given seed's run does is a
# draw per machine: the test below asserts only what held, with a margin, in every draw of 3 kernel settings (AVX-512,
# AVX2, no SIMD) x 8 seeds x the 5 labelled scenarios, plus 48 draws of the annealed run (4 settings x 12 seeds), each
# run judged against its own recorded counts. To draw again on one machine: ATEN_CPU_CAPABILITY=avx2|default with
# MKL_ENABLE_INSTRUCTIONS=AVX2|SSE4_2 (the AVX2 setting retrains sample_runs/aux-annealed bit for bit), or cpu_threads=2.
ALL_SCENARIO_SEEDS = (1, 2)
ANNEALED_SEEDS = (1, 2, 3, 4)


@pytest.mark.slow
def test_reference_model_demo_runs_on_more_seeds(tmp_path):
    """The demo's labelled scenarios trained afresh at full demo size (seeds 1 and 2, and the annealed one on 3 and 4
    too: 12 runs, 70-100 s), held to what is true on any CPU:

    - the balanced runs get no warning (the worst two consecutive windows' noise-corrected CV was 0.38 over all draws,
      the warning line 0.5) and the start-of-run collapse is critical from its onset;
    - the bias-balanced run ends with no critical alert holding: statuses healthy, warning or recovered (in one draw of
      24 its start-up imbalance, which the bias needs ~150 steps to undo, lasted one window past the warm-up and was
      critical there; from step 140 on its CV stayed under 0.65, the critical line 1.0, and its entropy at the end
      above 0.14, the critical line 0.05). The recorded sample run is held to "no critical at all", above;
    - every annealed run is quiet while its balancing holds and ends collapsed: an ongoing critical collapse alert (at
      the end its worst layer's CV was 1.3 or more in every draw);
    - an annealed run whose recorded counts show the collapse completing (``observed_collapse_step``, which the demo
      writes into run.json) is flagged at most two detector windows after that step: its lead ranged from -9 to +146
      steps over the draws, so "before the collapse completes" does not hold on every CPU (the detector needs two
      windows, the observed collapse can complete within one). That strict collapse (half the experts starved for
      20 steps) completed in 43 of 48 draws: at least one of the four is asked for, so the scoring is exercised.
    """
    from moewatch.reference.demo import SCENARIOS, run_demo

    for seed in sorted({*ALL_SCENARIO_SEEDS, *ANNEALED_SEEDS}):
        chosen = [s for s in SCENARIOS.values() if s.label and (seed in ALL_SCENARIO_SEEDS or s.name == "aux-annealed")]
        run_demo(tmp_path / f"seed{seed}", device="cpu", seed=seed, scenarios=chosen, progress=False)
    check_retrained_demo(tmp_path, ALL_SCENARIO_SEEDS, ANNEALED_SEEDS)


def check_retrained_demo(root: Path, all_scenario_seeds: tuple[int, ...], annealed_seeds: tuple[int, ...]) -> None:
    """What test_reference_model_demo_runs_on_more_seeds states, on demo runs under ``root/seed<n>/<scenario>``: every
    labelled scenario for ``all_scenario_seeds``, the annealed one for ``annealed_seeds``."""
    from moewatch.detect import DetectorConfig, detect, status_of
    from moewatch.reference.demo import DEFAULT_STEPS, SCENARIOS

    labelled = [s for s in SCENARIOS.values() if s.label]
    annealed = SCENARIOS["aux-annealed"]
    scores = Scores(tuple(labeled_runs(root)))
    report = scores.table()
    others = [c for c in scores.cases if c.label != "collapse"]
    expected = sorted(s.label for s in labelled if s.label != "collapse") * len(all_scenario_seeds)
    assert sorted(c.label for c in others) == sorted(expected), report
    assert scores.false_alarms == [], report
    assert all(c.onset_found for c in scores.cases if c.label == "collapse_at_start"), report
    degraded = {c.name: status_of(list(c.alerts)) for c in scores.cases if c.label == "degraded"}
    assert set(degraded.values()) <= {"healthy", "warning", "recovered"}, (degraded, report)

    window = DetectorConfig().window_steps
    balancing_goes = annealed.collapse_after(DEFAULT_STEPS)
    collapsed = []
    for seed in annealed_seeds:
        run = moewatch.load(root / f"seed{seed}" / annealed.name)
        alerts = detect(run)
        flagged = [a for a in alerts if a.severity in (WARNING, CRITICAL)]
        where = f"seed {seed}: {[(a.kind, a.severity, a.first_step, a.detected_step) for a in flagged]}\n{report}"
        assert flagged and min(a.first_step for a in flagged) >= balancing_goes, where
        assert status_of(alerts) == "collapsed", where
        step = run.meta["meta"]["collapse_step"]
        if step is not None:
            collapsed.append(seed)
            assert min(a.detected_step for a in flagged) <= step + 2 * window, (step, where)
    assert collapsed, f"no annealed run's recorded counts show its collapse completing\n{report}"
    assert [c.label for c in scores.cases if annealed.name in c.name].count("collapse") == len(collapsed), report
    for seed in all_scenario_seeds:
        check_lost_balancer(root / f"seed{seed}" / "aux-free-lost", f"seed {seed}")


def _frames(counts_SE: np.ndarray, top_k: int = 1, layer: str = "l0", steps: np.ndarray | None = None):
    s, e = counts_SE.shape
    steps = np.arange(s) if steps is None else steps
    experts = pd.DataFrame({"step": np.repeat(steps, e), "layer": layer, "expert": np.tile(np.arange(e), s),
                            "tokens": counts_SE.reshape(-1)})
    layers = pd.DataFrame({"step": steps, "layer": layer, "top_k": top_k})
    return layers, experts


def test_observed_collapse_step_needs_a_collapse_that_lasts():
    rng = np.random.default_rng(0)
    counts = rng.poisson(32, size=(200, 16)).astype(float)  # balanced top-1, 512 tokens a step
    assert observed_collapse_step(*_frames(counts)) is None
    blip = counts.copy()
    blip[40:52, 1:] = 0  # one expert takes everything for 12 steps, then balance returns: a transient
    assert observed_collapse_step(*_frames(blip)) is None
    assert observed_collapse_step(*_frames(blip), hold=1) is not None
    late = counts.copy()
    late[120:, 8:] = 0  # half the experts starve from step 120 on
    # The starved half falls under 10% of its fair share once the trailing 10-step window is mostly past step 120.
    step = observed_collapse_step(*_frames(late))
    assert step is not None and 120 < step <= 129
    assert observed_collapse_step(*_frames(late), after=150) == 150  # only what happens from `after` on
    # Recorded every 5th step: steps are the recorded ones, windows count rows.
    sparse = observed_collapse_step(*_frames(late, steps=np.arange(200) * 5))
    assert sparse == step * 5
    assert observed_collapse_step(*_frames(counts[:0])) is None


def test_observed_collapse_step_reads_top_k_and_any_layer():
    rng = np.random.default_rng(1)
    counts = rng.poisson(64, size=(100, 8)).astype(float)
    hot = counts.copy()
    rest = hot[30:, 1:].sum(axis=1)
    hot[30:, 0] = rest * 0.45 / 0.55  # 45% of a top-2 layer's assignments: 90% of what one expert can get
    l0, e0 = _frames(counts, top_k=2, layer="a")
    l1, e1 = _frames(hot, top_k=2, layer="b")
    layers, experts = pd.concat([l0, l1]), pd.concat([e0, e1])
    step = observed_collapse_step(layers, experts)
    assert step is not None and 30 < step <= 39  # once the trailing 10-step window is mostly past step 30
    l1k, e1k = _frames(hot, top_k=1, layer="b")  # read as top-1, 45% is no collapse
    assert observed_collapse_step(pd.concat([l0, l1k]), pd.concat([e0, e1k])) is None


def test_a_collapse_label_without_its_step_is_skipped_with_a_warning(tmp_path):
    sc = syn.Scenario("c", "sudden", "collapse", onset=1500, ramp=150, steps=1800)
    syn.simulate(sc).write(tmp_path / "c")
    manifest = tmp_path / "c" / "run.json"
    manifest.write_text(manifest.read_text().replace('"collapse_step": 1650', '"collapse_step": null'))
    with pytest.warns(UserWarning, match="without a collapse_step"):
        assert labeled_runs(tmp_path) == []
