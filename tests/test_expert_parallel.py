"""Expert-parallel load: the placement recorded at attach, per-device shares at read time, the ep_straggler rule,
and the EP degree read from DTensor expert weights on a real 2-process gloo DeviceMesh."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import moewatch
from moewatch.detect import DetectorConfig, analyze_run
from moewatch.detect.windows import LayerData
from moewatch.store.placement import (
    check_placement,
    contiguous,
    device_load,
    placement_for,
    straggler_ratio,
)
from tests.test_app_data import write_manifest, write_part

ROOT = Path(__file__).resolve().parents[1]


def test_placement_helpers_against_a_float64_reference():
    assert contiguous(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="divide"):
        contiguous(6, 4)
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(7, 8))
    placement = np.array([1, 0, 2, 2, 0, 1, 3, 3])
    load = device_load(counts, placement)
    for d in range(4):
        np.testing.assert_array_equal(load[:, d], counts[:, placement == d].sum(axis=1))
    ratio, busiest = straggler_ratio(load)
    ref = np.array([row.max() / row.mean() for row in load.astype(np.float64)])
    np.testing.assert_allclose(ratio, ref, rtol=1e-15)
    assert (busiest == load.argmax(axis=1)).all()
    assert np.isnan(straggler_ratio(np.zeros((1, 4)))[0][0])  # nothing routed: no ratio, not 0/0 = inf

    assert placement_for({"ep_size": 4}, "x", 8).tolist() == contiguous(8, 4).tolist()
    assert placement_for({"ep_size": 4}, "x", 6) is None  # does not fit this layer: no invented straggler
    assert placement_for({"expert_placement": {"x": [0, 1]}}, "x", 2).tolist() == [0, 1]
    assert placement_for({"expert_placement": {"x": [0, 1]}}, "y", 2) is None
    assert placement_for({"expert_placement": [0, 1, 1]}, "x", 2) is None
    assert placement_for({}, "x", 8) is None and placement_for({"ep_size": 1}, "x", 8) is None
    with pytest.raises(ValueError, match="ep_size"):
        check_placement(0, None)
    with pytest.raises(ValueError, match="device 4"):
        check_placement(4, [0, 1, 2, 4])
    with pytest.raises(TypeError, match="list of device"):
        check_placement(None, "0,1")


def skewed_run(path: Path, hot: float, steps: int = 300, E: int = 8, ep: int | None = 4) -> Path:
    """A run whose device 0 (experts 0 and 1 of 8 on 4 devices) gets ``hot`` of the assignments from step 100."""
    rng = np.random.default_rng(1)
    write_manifest(path, ["gate"], E)
    if ep:
        manifest = json.loads((path / "run.json").read_text())
        manifest["ep_size"] = ep
        (path / "run.json").write_text(json.dumps(manifest))
    p = np.full(E, 1.0 / E)
    counts = rng.multinomial(4096, p, size=steps)
    q = np.r_[np.full(2, hot / 2), np.full(E - 2, (1 - hot) / (E - 2))]
    counts[100:] = rng.multinomial(4096, q, size=steps - 100)
    write_part(path, {"gate": counts}, np.arange(steps))
    return path


def test_a_busy_device_is_an_ep_straggler_with_its_experts_and_lost_throughput(tmp_path):
    # Device 0 takes 55% of the load: 2.2x the mean of 4 devices, about 55% of the layer's expert throughput lost.
    analysis = analyze_run(skewed_run(tmp_path / "hot", hot=0.55))
    ep = [a for a in analysis.alerts if a.kind == "ep_straggler"]
    assert {a.severity for a in ep} == {"warning", "critical"}
    crit = next(a for a in ep if a.severity == "critical")
    assert crit.experts == (0, 1) and 90 <= crit.first_step <= 140
    assert crit.value == pytest.approx(2.2, abs=0.1) and f"about {1 - 1 / crit.value:.0%} of" in crit.message
    assert "re-place or replicate" in crit.lever
    run = moewatch.load(tmp_path / "hot")
    assert [a.kind for a in moewatch.detect.detect(run) if a.kind == "ep_straggler"]  # the frames path agrees

    # The same counts without a recorded placement, and a balanced run with one: no straggler.
    assert not [a for a in analyze_run(skewed_run(tmp_path / "noplace", hot=0.55, ep=None)).alerts
                if a.kind == "ep_straggler"]
    assert not [a for a in analyze_run(skewed_run(tmp_path / "calm", hot=0.25)).alerts
                if a.kind == "ep_straggler"]
    # Thresholds come from the config.
    strict = DetectorConfig(ep_warning=1.01, ep_critical=1.02)
    assert [a for a in analyze_run(skewed_run(tmp_path / "calm2", hot=0.26), strict).alerts
            if a.kind == "ep_straggler"]
    with pytest.raises(ValueError, match="ep_warning"):
        DetectorConfig(ep_warning=0.9)


def test_device_load_reads_the_recorded_placement(tmp_path):
    run = moewatch.load(skewed_run(tmp_path / "r", hot=0.45))
    shares = run.device_load("gate")
    ex = run.experts
    grid = ex.pivot(index="step", columns="expert", values="tokens").to_numpy(np.float64)
    ref = grid.reshape(len(grid), 4, 2).sum(axis=2)
    np.testing.assert_allclose(shares[[f"device{d}" for d in range(4)]].to_numpy(), ref / ref.sum(1, keepdims=True),
                               rtol=1e-12)
    np.testing.assert_allclose(shares["straggler"].to_numpy(), ref.max(1) / ref.mean(1), rtol=1e-12)
    assert shares.loc[200:, "device0"].mean() == pytest.approx(0.45, abs=0.02)
    with pytest.raises(ValueError, match="ep_size"):
        moewatch.load(skewed_run(tmp_path / "none", hot=0.3, ep=None)).device_load("gate")


def test_attach_records_the_placement_and_the_live_tracker_judges_it(tmp_path):
    from tests.toy import ToyMoE, toy_specs

    torch.manual_seed(0)
    model = ToyMoE(d=8, num_experts=4, top_k=2, layers=1)
    specs = {s.name: s for s in toy_specs(model)}
    with moewatch.attach(model, tmp_path / "a", routers=specs, ep_size=2, flush_steps=5) as watch:
        for _ in range(3):
            model(torch.randn(16, 8)).sum().backward()
            watch.step()
    meta = json.loads((tmp_path / "a" / "run.json").read_text())
    assert meta["ep_size"] == 2 and "expert_placement" not in meta
    placement = {specs_name: [1, 1, 0, 0] for specs_name in specs}
    with moewatch.attach(model, tmp_path / "b", routers=specs, expert_placement=placement) as watch:
        model(torch.randn(16, 8)).sum().backward()
        watch.step()
    assert json.loads((tmp_path / "b" / "run.json").read_text())["expert_placement"] == placement
    with pytest.raises(ValueError, match="device 2"):
        moewatch.attach(model, tmp_path / "c", routers=specs, ep_size=2, expert_placement=[0, 1, 2, 0])

    # The live tracker gets the placement too.
    from moewatch.detect.live import live_alerts

    sink = live_alerts(manifest={"ep_size": 4})
    data = LayerData("gate", 8, 2, np.arange(1), np.zeros((1, 8)), {})
    assert sink.tracker.placement("gate", data.num_experts).tolist() == contiguous(8, 4).tolist()


WORKER = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from torch import nn
    rank, init, run_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    sys.path.insert(0, {root!r})
    import moewatch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))

    class Experts(nn.Module):  # torchtitan's GroupedExperts keeps [E, ...] weights sharded on an "ep" mesh
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(distribute_tensor(torch.randn(4, 8, 16), mesh, [Shard(0)]))

    model = nn.Module()
    model.experts = Experts()
    watch = moewatch.attach(model, run_dir, routers={{}}, group=False)
    watch.close()
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_ep_size_is_read_from_dtensor_expert_weights_on_an_ep_mesh(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    init = tmp_path / "init"
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(init), str(tmp_path / "run")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out[-3000:]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["ep_size"] == 2


def test_the_dashboard_charts_the_busiest_device_as_the_detector_reads_it(tmp_path):
    from moewatch.app import figures
    from moewatch.app.data import RunData
    from moewatch.app.windows import detector_window, plan, window_series

    path = skewed_run(tmp_path / "r", hot=0.55)
    run = RunData(path, "r")
    run.refresh()
    window = detector_window(run, "gate")
    fig, _ = figures.metrics_figure(run, "gate", window=window)
    titles = [a["text"] for a in fig["layout"]["annotations"] if "device" in str(a.get("text", ""))]
    assert titles, "an EP run's metrics panel has the device-load row"
    levels = {s["y0"] for s in fig["layout"]["shapes"] if s.get("type") == "line" and s.get("xref") == "x domain"}
    assert {1.5, 2.0} <= levels  # the detector's ep_warning / ep_critical lines
    bins = plan(run, "gate", 0, run.n, window, 1 << 40)
    ratio = window_series(run, "gate", bins)["device_ratio"]
    analysis = analyze_run(path)
    crit = next(a for a in analysis.alerts if a.kind == "ep_straggler" and a.severity == "critical")
    assert np.nanmax(ratio) == pytest.approx(crit.value, rel=1e-9)  # the chart's peak is the alert's peak
    raw, _ = figures.metrics_figure(run, "gate")  # raw per-step view has the row too
    assert any("device" in str(a.get("text", "")) for a in raw["layout"]["annotations"])
    plain = RunData(skewed_run(tmp_path / "p", hot=0.55, ep=None), "p")
    plain.refresh()
    fig, _ = figures.metrics_figure(plain, "gate", window=window)
    assert not any("device" in str(a.get("text", "")) for a in fig["layout"]["annotations"])
