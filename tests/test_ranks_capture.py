"""Rank aggregation at capture on a real 4-process gloo group (CPU): DP×4, DP2×TP2, PP2×DP2, and a rank that dies
or stalls mid-run.

Every process runs WORKER below. Besides moewatch, a plain forward hook on each router counts the experts it chose
(non-dropped assignments) per step, independently of moewatch; the tests compare the run with those counts. Every
launch has a hard timeout, so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import moewatch
from moewatch.store.reader import global_frames

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("blocks.0.router", "blocks.1.router")

WORKER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    rank, world, init, run_dir, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    opts = json.loads(sys.argv[6])
    sys.path.insert(0, {root!r})
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from dataclasses import replace
    import moewatch
    from moewatch.capture.types import Probe, Routing
    from tests.test_routing_signals import add, reference, signal_vector
    from tests.toy import ToyMoE, toy_specs

    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=world)
    layout = opts["layout"]
    torch.manual_seed(0)  # the same weights on every rank
    model = ToyMoE(capacity=opts.get("capacity"))
    for b in model.blocks:  # a selection bias that changes some choices (the same on every rank)
        b.router.e_score_correction_bias.uniform_(0.0, 0.2, generator=torch.Generator().manual_seed(5))

    def select_of(probs, bias):  # the toy ranks probs + bias (> 0): their log is a logit-unit selection space
        return torch.log(probs.detach() + bias)

    def read_signals(module, args, kwargs, output):  # the toy reader, plus the routing diagnostics
        logits, probs, ids, dropped = output
        return Routing(logits_TE=logits, indices_TK=ids, dropped_TK=dropped,
                       weights_TK=probs.gather(-1, ids) * ~dropped,
                       select_TE=select_of(probs, module.e_score_correction_bias), unbiased_TE=probs)

    specs = {{s.name: replace(s, probes=[Probe(s.probes[0].module, read_signals)]) for s in toy_specs(model)}}
    counts, current, signals, current_sig = {{}}, {{}}, {{}}, {{}}

    def counting(name):
        def hook(mod, args, output):
            _, probs, ids, dropped = output
            c = torch.bincount(ids[~dropped].flatten(), minlength=mod.num_experts)
            key = name if torch.is_grad_enabled() else "eval:" + name
            current[key] = current.get(key, torch.zeros_like(c)) + c
            if torch.is_grad_enabled():  # this rank's own float64 reference of the diagnostics
                p = probs.detach()
                r = reference(mod.num_experts, ids.numpy(), weights=(p.gather(-1, ids) * ~dropped).double().numpy(),
                              dropped=dropped.numpy(), select=select_of(p, mod.e_score_correction_bias).double().numpy(),
                              unbiased=p.double().numpy())
                current_sig[name] = add(current_sig[name], r) if name in current_sig else r
        return hook

    kw = dict(flush_steps=opts.get("flush_steps", 3), flush_seconds=opts.get("flush_seconds", 30.0),
              per_rank=opts.get("per_rank", False), reduce_timeout=opts.get("reduce_timeout", 20.0),
              record_eval=bool(opts.get("eval_every")))
    data_rank, stage, watch, module, extra = rank, None, None, model, None
    if layout == "dp":
        for i, b in enumerate(model.blocks):
            b.router.register_forward_hook(counting(f"blocks.{{i}}.router"))
        watch = moewatch.attach(model, run_dir, routers=specs, **kw)
    elif layout == "tp":
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        data_rank = mesh.get_local_rank("dp")  # the TP replicas of a DP rank see the same batch
        for i, b in enumerate(model.blocks):
            b.router.register_forward_hook(counting(f"blocks.{{i}}.router"))
        if mesh.get_local_rank("tp") == 0:  # one rank per TP group records, summed over its DP group
            watch = moewatch.attach(model, run_dir, routers=specs, group=mesh.get_group("dp"), **kw)
        # the mistake, side by side: every rank attached with the default (world) group
        extra = moewatch.attach(model, run_dir + "-all", routers=specs, **kw)
    elif layout == "fsdp":  # FSDP2 over a 1-D DeviceMesh; attach before fully_shard, summed over the mesh
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        for i, b in enumerate(model.blocks):
            b.router.register_forward_hook(counting(f"blocks.{{i}}.router"))
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
        watch = moewatch.attach(model, run_dir, routers=specs, group=mesh.get_group("dp"), **kw)
        for b in model.blocks:
            fully_shard(b, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)  # the routing changes between steps
    elif layout == "off":  # group=False: each rank writes its own rows, summed when loading
        for i, b in enumerate(model.blocks):
            b.router.register_forward_hook(counting(f"blocks.{{i}}.router"))
        watch = moewatch.attach(model, run_dir, routers=specs, group=False, **kw)
    elif layout == "pp":
        stage, data_rank = rank // 2, rank % 2
        dp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
        module = model.blocks[stage]
        name = f"blocks.{{stage}}.router"
        module.router.register_forward_hook(counting(name))
        watch = moewatch.attach(module, run_dir, routers={{name: specs[name]}}, group=dp_groups[stage], **kw)
    gen = torch.Generator().manual_seed(100 + data_rank)
    steps, kill, eval_every = opts["steps"], opts.get("kill"), opts.get("eval_every")
    if opts.get("grads"):  # data-parallel training: grads averaged over the world before the step, like DDP
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
    norms = {{}}  # "grad:"/"param:" + router -> per step, this rank's own float64 norms of each expert
    for step in range(steps * (2 if opts.get("resume") else 1)):
        if step == steps:  # a second session: attach again to the same run directory
            watch.close()
            watch = moewatch.attach(model, run_dir, routers=specs, **kw)
        if eval_every and step % eval_every == 0:
            with torch.no_grad():
                model.eval()
                model(torch.randn(1, 5, 8, generator=gen))
                model.train()
        for _ in range(2):  # two micro-batches per step
            x = torch.randn(data_rank + 2, 5, 8, generator=gen)
            if stage is None:
                module(x).square().mean().backward()
            elif stage == 0:
                h = module(x)
                dist.send(h.detach(), dst=rank + 2)
                h.sum().backward()
            else:
                h = torch.empty(data_rank + 2, 5, 8)
                dist.recv(h, src=rank - 2)
                module(h.requires_grad_()).sum().backward()
        if layout == "fsdp":
            opt.step()
            opt.zero_grad()
        if opts.get("grads"):
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
            for i, b in enumerate(model.blocks):
                norms.setdefault("grad:blocks.%d.router" % i, []).append(
                    [sum(float(q.grad.double().square().sum()) for q in e.parameters()) ** 0.5 for e in b.experts])
            opt.step()
            opt.zero_grad()
            for i, b in enumerate(model.blocks):
                norms.setdefault("param:blocks.%d.router" % i, []).append(
                    [sum(float(q.detach().double().square().sum()) for q in e.parameters()) ** 0.5
                     for e in b.experts])
        if opts.get("manual_from") is not None and step >= opts["manual_from"] and watch is not None:
            ids = torch.randint(0, 4, (3 + rank, 2), generator=gen)  # a router recorded by hand, from a later step
            watch.record("manual.gate", indices=ids, num_experts=4)
            current["manual.gate"] = torch.bincount(ids.flatten(), minlength=4)
        for name in [n for n in current if not n.startswith("eval:")] + [n for n in counts if n.startswith("eval:")]:
            counts.setdefault(name, []).append(current.get(name, torch.zeros(4, dtype=torch.long)).tolist())
        for name in [n for n in current if n.startswith("eval:") and n not in counts]:
            counts[name] = [[0] * 4] * step + [current[name].tolist()]
        current.clear()
        for name in [n for n in counts if not n.startswith(("eval:", "manual."))]:
            signals.setdefault(name, []).append(signal_vector(current_sig.get(name), 4))
        current_sig.clear()
        if watch is not None:
            watch.step()
        if extra is not None:
            extra.step()
        with open(os.path.join(out, "rank%d.json" % rank), "w") as f:
            json.dump({{**counts, **norms, **{{"signals:" + k: v for k, v in signals.items()}}}}, f)  # before a kill
        if kill and rank == kill["rank"] and step == kill["after"]:
            watch.wait(10)  # this rank's steps so far are summed: the group's writer has them
            os.kill(os.getpid(), getattr(signal, kill["signal"]))
        time.sleep(opts.get("sleep", 0.0) * (rank + 1))
    if extra is not None:
        extra.close()
    if watch is not None:
        t0 = time.monotonic()
        watch.close()
        with open(os.path.join(out, "close%d.json" % rank), "w") as f:
            json.dump({{"close_seconds": time.monotonic() - t0}}, f)
    print("done", rank, flush=True)
    """
)


def launch(tmp_path: Path, timeout: float = 150.0, world: int = 4, **opts) -> tuple[Path, Path]:
    """Run WORKER on `world` processes; fail (after killing them all) if any is still running after `timeout`."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    procs = []
    for r in range(world):
        log = open(tmp_path / f"log{r}.txt", "w")
        procs.append((subprocess.Popen([sys.executable, str(worker), str(r), str(world), str(tmp_path / "init"),
                                        str(run_dir), str(out), json.dumps(opts)], stdout=log, stderr=log,
                                       env=env, cwd=tmp_path), log))
    victim = (opts.get("kill") or {}).get("rank")
    deadline = time.monotonic() + timeout
    try:
        for r, (p, _) in enumerate(procs):
            if r != victim:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        hung = [r for r, (p, _) in enumerate(procs) if p.poll() is None and r != victim]
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    logs = "\n".join(f"--- rank {r}\n" + (tmp_path / f"log{r}.txt").read_text()[-3000:] for r in range(world))
    assert not hung, f"ranks {hung} still running after {timeout} s\n{logs}"
    codes = {r: p.returncode for r, (p, _) in enumerate(procs) if r != victim}
    assert all(c == 0 for c in codes.values()), f"exit codes {codes}\n{logs}"
    return run_dir, out


def rank_counts(out: Path, ranks) -> dict[int, dict[str, np.ndarray]]:
    return {r: {k: np.asarray(v) for k, v in json.loads((out / f"rank{r}.json").read_text()).items()} for r in ranks}


def assert_signals_are_rank_sums(run, truth: dict[int, dict[str, np.ndarray]], ranks) -> None:
    """The group's routing diagnostics equal the float64 sums of each rank's own reference (`signal_vector` rows
    per step): counts exactly, sums to float64 rounding, fractions from the summed counts."""
    from moewatch.store.reader import hist_matrix
    from tests.test_routing_signals import H

    E = 4
    for layer in LAYERS:
        exp = sum(truth[r]["signals:" + layer] for r in ranks)
        rows = run.layers[run.layers.layer == layer].sort_values("step")
        gate = run.experts[run.experts.layer == layer].pivot(index="step", columns="expert", values="gate_mass")
        np.testing.assert_allclose(gate.sort_index().to_numpy(), exp[:, :E], rtol=1e-12)
        n, hist = exp[:, E + 1], exp[:, E + 2 : E + 2 + H]
        np.testing.assert_array_equal(rows.margin_tokens.to_numpy(), n)
        np.testing.assert_array_equal(hist_matrix(rows.margin_hist), hist)
        np.testing.assert_allclose(rows.margin_mean.to_numpy(), exp[:, E] / n, rtol=1e-12)
        np.testing.assert_allclose(rows.near_tie_frac.to_numpy(), hist[:, 0] / n, rtol=1e-12)
        np.testing.assert_array_equal(rows.overridden.to_numpy(), exp[:, E + 2 + H])
        np.testing.assert_array_equal(rows.override_slots.to_numpy(), exp[:, E + 3 + H])
        np.testing.assert_allclose(rows.override_frac.to_numpy(), exp[:, E + 2 + H] / exp[:, E + 3 + H], rtol=1e-12)
        assert (exp[:, E + 2 + H] > 0).any() and (hist[:, 1:].sum(1) > 0).all()  # the bias overrode; margins vary


def experts_grid(experts: pd.DataFrame, layer: str) -> np.ndarray:
    """[steps, experts] token counts of one layer (one row per (step, expert) is asserted by the callers)."""
    e = experts[experts.layer == layer]
    return e.pivot(index="step", columns="expert", values="tokens").sort_index().to_numpy()


def assert_one_row_each(run) -> None:
    assert not run.experts.duplicated(["step", "layer", "expert"]).any(), "a (step, layer, expert) written twice"
    assert not run.layers.duplicated(["step", "layer"]).any()


def assert_matches_per_rank_sum(run_dir: Path, run) -> None:
    """The group's rows equal the loader's all-ranks sum of the per-rank rows (ranks/): the capture-time reduction
    and the load-time one agree on every statistic."""
    ex, ly = pd.read_parquet(run_dir / "ranks" / "experts"), pd.read_parquet(run_dir / "ranks" / "layers")
    gex, gly = global_frames(ex, ly)
    a = run.layers.sort_values(["step", "layer"]).reset_index(drop=True)
    b = gly.sort_values(["step", "layer"]).reset_index(drop=True)
    for col in ("tokens", "dropped", "dead", "nonfinite", "calls"):
        np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy(), err_msg=col)
    for col in ("cv", "max_share", "drop_rate", "entropy", "z_loss", "logit_mean", "logit_std", "logit_abs_max",
                "aux_loss"):
        np.testing.assert_allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=1e-9, atol=1e-12,
                                   err_msg=col)
    for col in ("margin_tokens", "overridden", "override_slots"):
        assert a[col].notna().all(), col
        np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy(), err_msg=col)
    np.testing.assert_array_equal(np.stack(a.margin_hist.to_numpy()), np.stack(b.margin_hist.to_numpy()))
    for col in ("margin_mean", "near_tie_frac", "override_frac"):
        np.testing.assert_allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=1e-12, err_msg=col)
    ae = run.experts.sort_values(["step", "layer", "expert"]).reset_index(drop=True)
    be = gex.sort_values(["step", "layer", "expert"]).reset_index(drop=True)
    np.testing.assert_array_equal(ae.tokens.to_numpy(), be.tokens.to_numpy())
    np.testing.assert_allclose(ae.prob_mean.to_numpy(float), be.prob_mean.to_numpy(float), rtol=1e-9)
    np.testing.assert_allclose(ae.bias.to_numpy(float), be.bias.to_numpy(float))
    np.testing.assert_allclose(ae.gate_mass.to_numpy(float), be.gate_mass.to_numpy(float), rtol=1e-12)
    for col in ("grad_norm", "param_norm"):  # the group's exact norms equal the mean of the ranks' own (replicas)
        np.testing.assert_allclose(ae[col].to_numpy(float), be[col].to_numpy(float), rtol=1e-12, err_msg=col)


def assert_norms_are_one_replicas(run, truth: dict[int, dict[str, np.ndarray]], ranks) -> None:
    """Data parallel: every rank holds the same averaged gradients, so the group's grad_norm (a sum of R ranks'
    squares over R steps' worth of weight) equals each rank's own float64 norm, never R or sqrt(R) times it; the
    parameter norms likewise, at the steps where some rank flushed (ranks flush at different steps)."""
    for layer in LAYERS:
        for kind in ("grad", "param"):
            own = [truth[r][f"{kind}:{layer}"] for r in ranks]
            for other in own[1:]:
                np.testing.assert_allclose(other, own[0], rtol=1e-6)  # the ranks agree (all-reduced grads)
            got = run.experts[run.experts.layer == layer].pivot(index="step", columns="expert",
                                                                values=f"{kind}_norm").sort_index().to_numpy()
            has = ~np.isnan(got)
            assert has.all(axis=1).sum() == has.any(axis=1).sum(), "a step has norms for some experts only"
            assert has.all() if kind == "grad" else has.any()
            np.testing.assert_allclose(got[has], own[0][has], rtol=1e-5, err_msg=f"{kind}_norm {layer}")


@pytest.mark.slow
def test_dp4_sums_once_even_with_time_based_flushes(tmp_path):
    # flush_seconds is shorter than a step on the slower ranks, so ranks flush at different steps.
    steps = 7
    run_dir, out = launch(tmp_path, layout="dp", steps=steps, capacity=6, flush_steps=3, flush_seconds=0.05,
                          sleep=0.03, eval_every=3, grads=True)
    truth = rank_counts(out, range(4))
    run = moewatch.load(run_dir)
    assert_one_row_each(run)
    assert set(run.experts["rank"]) == {0} and set(run.layers["rank"]) == {0}
    assert {p.name[:5] for p in (run_dir / "experts").glob("*.parquet")} == {"r0000"}, "written once, by rank 0"
    assert not (run_dir / "ranks" / "experts").exists(), "per-rank rows only with per_rank=True"
    for layer in LAYERS:
        expected = sum(truth[r][layer] for r in range(4))
        np.testing.assert_array_equal(experts_grid(run.experts, layer), expected)
        rows = run.layers[run.layers.layer == layer].sort_values("step")
        np.testing.assert_array_equal(rows.tokens, [2 * 5 * (2 + 3 + 4 + 5)] * steps)  # tokens of all ranks
        np.testing.assert_array_equal(rows.calls, [2 * 4] * steps)  # micro-batches of all ranks
        np.testing.assert_allclose(rows.cv, expected.std(1) / expected.mean(1))
        np.testing.assert_allclose(rows.drop_rate, 1 - expected.sum(1) / (2 * rows.tokens.to_numpy()))
    assert run.meta["aggregation"] == "group" and run.meta["world_size"] == 4
    assert run.meta["groups"] == [{"writer": 0, "ranks": [0, 1, 2, 3], "routers": list(LAYERS)}]
    assert run.meta["fallbacks"] == [] and run.meta["status"] == "finished"
    assert_signals_are_rank_sums(run, truth, range(4))
    assert_norms_are_one_replicas(run, truth, range(4))
    g = run.global_view()
    np.testing.assert_array_equal(experts_grid(g.experts, LAYERS[0]), experts_grid(run.experts, LAYERS[0]))
    # record_eval: the evaluation forwards (every third step) are summed into the eval tables the same way
    assert sorted(run.eval_layers.step.unique()) == [0, 3, 6]
    assert not run.eval_experts.duplicated(["step", "layer", "expert"]).any()
    for layer in LAYERS:
        expected = sum(truth[r]["eval:" + layer] for r in range(4))[[0, 3, 6]]
        np.testing.assert_array_equal(experts_grid(run.eval_experts, layer), expected)
        assert (run.eval_layers[run.eval_layers.layer == layer].tokens == 4 * 5).all()


@pytest.mark.slow
def test_resumed_group_run_continues_the_group_numbering(tmp_path):
    steps = 3
    run_dir, out = launch(tmp_path, world=2, layout="dp", steps=steps, flush_steps=2, resume=True, manual_from=1)
    truth = rank_counts(out, range(2))
    run = moewatch.load(run_dir)
    assert_one_row_each(run)
    assert sorted(run.layers.step.unique()) == list(range(2 * steps)), "the non-writer resumed after the writer"
    assert sorted(run.layers.session.unique()) == [1, 2] and run.meta["sessions"] == 2
    for layer in LAYERS:
        np.testing.assert_array_equal(experts_grid(run.experts, layer), truth[0][layer] + truth[1][layer])
    # a router registered by watch.record() in a later step (1) joins the sum from that step, in both sessions
    manual = run.experts[run.experts.layer == "manual.gate"]
    assert sorted(manual.step.unique()) == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(experts_grid(run.experts, "manual.gate"),
                                  truth[0]["manual.gate"] + truth[1]["manual.gate"])
    assert run.meta["fallbacks"] == []
    rank1 = json.loads((run_dir / "ranks" / "r0001.json").read_text())
    assert sorted(rank1["sessions"]) == ["1", "2"] and all(e["agreed"] for e in rank1["sessions"].values())


@pytest.mark.slow
def test_dp2_tp2_tp_replicas_are_not_summed(tmp_path):
    steps = 5
    run_dir, out = launch(tmp_path, layout="tp", steps=steps, per_rank=True, grads=True)
    truth = rank_counts(out, range(4))
    for layer in LAYERS:  # mesh (dp, tp): ranks 0,1 are one TP group, 2,3 the other; replicas route alike
        np.testing.assert_array_equal(truth[0][layer], truth[1][layer])
        np.testing.assert_array_equal(truth[2][layer], truth[3][layer])
        assert not np.array_equal(truth[0][layer], truth[2][layer])
    run = moewatch.load(run_dir)
    assert_one_row_each(run)
    assert set(run.experts["rank"]) == {0}
    for layer in LAYERS:
        np.testing.assert_array_equal(experts_grid(run.experts, layer), truth[0][layer] + truth[2][layer])
        rows = run.layers[run.layers.layer == layer]
        assert (rows.tokens == 2 * 5 * (2 + 3)).all()
    assert run.meta["groups"] == [{"writer": 0, "ranks": [0, 2], "routers": list(LAYERS)}]
    # per_rank=True: each recording rank's own rows too, under ranks/, not in the run's tables
    own = pd.read_parquet(run_dir / "ranks" / "experts")
    assert set(own["rank"]) == {0, 2}
    for r in (0, 2):
        for layer in LAYERS:
            np.testing.assert_array_equal(experts_grid(own[own["rank"] == r], layer), truth[r][layer])
    assert_matches_per_rank_sum(run_dir, run)
    assert not [p for p in run.meta["problems"] if p["kind"] == "replicated_ranks"]
    # Attached on every rank with the world group, the replicas are summed: twice the tokens, and it says so.
    wrong = moewatch.load(tmp_path / "run-all")
    assert (wrong.layers.tokens == 2 * 2 * 5 * (2 + 3)).all()
    problems = [p for p in wrong.meta["problems"] if p["kind"] == "replicated_ranks"]
    assert len(problems) == 1 and "ranks {0, 1} and {2, 3}" in problems[0]["message"]


@pytest.mark.slow
def test_fsdp2_device_mesh_group_and_group_false(tmp_path):
    steps = 4
    run_dir, out = launch(tmp_path / "fsdp", world=2, layout="fsdp", steps=steps)
    truth = rank_counts(out, range(2))
    run = moewatch.load(run_dir)
    assert_one_row_each(run)
    assert set(run.experts["rank"]) == {0} and run.meta["groups"][0]["ranks"] == [0, 1]
    for layer in LAYERS:
        np.testing.assert_array_equal(experts_grid(run.experts, layer), truth[0][layer] + truth[1][layer])
    # group=False: the pre-aggregation layout, each rank its own rows; the loader sums them
    run_dir, out = launch(tmp_path / "off", world=2, layout="off", steps=steps)
    truth = rank_counts(out, range(2))
    run = moewatch.load(run_dir)
    assert sorted(run.experts["rank"].unique()) == [0, 1] and run.meta["aggregation"] == "rank"
    g = run.global_view()
    for layer in LAYERS:
        np.testing.assert_array_equal(experts_grid(g.experts, layer), truth[0][layer] + truth[1][layer])


@pytest.mark.slow
def test_pp2_dp2_each_stage_its_routers_and_group(tmp_path):
    steps = 5
    run_dir, out = launch(tmp_path, layout="pp", steps=steps, flush_steps=2)
    truth = rank_counts(out, range(4))
    run = moewatch.load(run_dir)
    assert_one_row_each(run)
    assert {r["name"] for r in run.meta["routers"]} == set(LAYERS), "run.json lists both stages' routers"
    assert run.meta["groups"] == [{"writer": 0, "ranks": [0, 1], "routers": [LAYERS[0]]},
                                  {"writer": 2, "ranks": [2, 3], "routers": [LAYERS[1]]}]
    for stage, layer in enumerate(LAYERS):
        rows = run.experts[run.experts.layer == layer]
        assert set(rows["rank"]) == {2 * stage}, "each stage's first rank writes its routers"
        np.testing.assert_array_equal(experts_grid(run.experts, layer),
                                      truth[2 * stage][layer] + truth[2 * stage + 1][layer])
    g = run.global_view()
    assert_one_row_each(g)
    for layer in LAYERS:
        np.testing.assert_array_equal(experts_grid(g.experts, layer), experts_grid(run.experts, layer))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_rank_that_dies_or_stalls_hangs_nobody(tmp_path, how):
    steps, after = 10, 4
    t0 = time.monotonic()
    run_dir, out = launch(tmp_path, layout="dp", steps=steps, flush_steps=2, sleep=0.05, reduce_timeout=3.0,
                          per_rank=True, kill={"rank": 3, "after": after, "signal": how})
    elapsed = time.monotonic() - t0
    truth = rank_counts(out, range(4))
    assert len(truth[3][LAYERS[0]]) == after + 1
    for r in range(3):  # the survivors closed, in bounded time
        assert json.loads((out / f"close{r}.json").read_text())["close_seconds"] < 20
    run = moewatch.load(run_dir)
    fallbacks = run.meta["fallbacks"]
    assert {f["rank"] for f in fallbacks} == {0, 1, 2}, fallbacks
    g = run.global_view()
    assert_one_row_each(g)
    for layer in LAYERS:
        got = experts_grid(g.experts, layer)
        survivors = sum(truth[r][layer] for r in range(3))
        assert got.shape[0] == steps
        dead = np.zeros_like(survivors)
        dead[: after + 1] = truth[3][layer]
        # every step counts each survivor once, and the dead rank's steps once if they were summed before it died
        recorded = [bool(np.array_equal(got[s], survivors[s] + dead[s])) for s in range(steps)]
        assert all(recorded[s] or np.array_equal(got[s], survivors[s]) for s in range(steps)), (got, survivors)
        assert all(recorded[: after + 1]), "the dead rank's steps were summed before it died (it waited for that)"
        np.testing.assert_array_equal(got[after + 1:], survivors[after + 1:])
    print(f"{how}: {elapsed:.1f} s")


def test_loader_drops_fallback_rows_the_group_sum_already_holds(tmp_path):
    """After a failed sum, rank 1 rewrote the round it could not confirm (steps 2-3) although the writer had
    written it; from step 4 both write their own rows. The loader keeps each token once."""
    from tests.run_builders import FALLBACK_TOKENS, fallback_run

    run_dir = fallback_run(tmp_path / "run")
    run = moewatch.load(run_dir)
    assert sorted(zip(run.layers["rank"], run.layers.step, strict=True)) == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5),
                                                                (1, 4), (1, 5)]
    g = run.global_view()
    np.testing.assert_array_equal(experts_grid(g.experts, "gate"), FALLBACK_TOKENS)
    # Without the writer's fallback mark, its own rows at steps 4-5 would count as the group's sum and rank 1's
    # rows there would be dropped: the mark is what keeps them.
    assert g.layers.set_index("step").tokens.to_dict() == {0: 4, 1: 4, 2: 4, 3: 4, 4: 3, 5: 3}


def test_single_process_runs_write_no_rank_files(tmp_path):
    from tests.toy import ToyMoE, toy_specs

    model = ToyMoE()
    with moewatch.attach(model, tmp_path / "run", routers={s.name: s for s in toy_specs(model)}) as watch:
        model(torch.randn(2, 5, 8)).sum().backward()
        watch.step()
    assert not (tmp_path / "run" / "ranks").exists()
    meta = moewatch.load(tmp_path / "run").meta
    assert "aggregation" not in meta and "fallbacks" not in meta
