"""Crash safety (a real SIGKILL mid-run) and multi-process recording (a real 2-process gloo group)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import moewatch

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {root!r})
    from moewatch.capture.watch import Watch, WatchConfig
    from tests.toy import ToyMoE, toy_specs
    torch.manual_seed(0)
    model = ToyMoE()
    watch = Watch(model, {run!r}, toy_specs(model), WatchConfig(flush_steps=3, flush_seconds=0.2))
    step = 0
    while True:
        model(torch.randn(2, 5, 8)).sum().backward()
        watch.step()
        if step % 4 == 3:
            watch.wait()
            print(step, flush=True)
        step += 1
    """
)


def test_sigkill_mid_run_loses_nothing_flushed(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT), run=str(run_dir))],
                            stdout=subprocess.PIPE, text=True)
    durable = -1
    try:
        for line in proc.stdout:
            durable = int(line)
            if durable >= 23:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert durable >= 23, "the child never reported durable steps"
    run = moewatch.load(run_dir)  # no corrupt file, no warning
    assert run.skipped == []
    steps = sorted(run.layers.step.unique())
    assert steps == list(range(len(steps))), "steps must be a contiguous prefix"
    assert steps[-1] >= durable
    assert set(run.experts.step.unique()) == set(steps)
    assert run.meta["status"] == "running"  # nobody could mark it
    import pandas as pd

    assert pd.read_parquet(run_dir / "experts").step.nunique() == len(steps)  # readers ignore half-written temp files
    # Re-attaching after the crash resumes numbering after the last durable step.
    from moewatch.capture.watch import Watch, WatchConfig
    from tests.toy import ToyMoE, toy_specs

    model = ToyMoE()
    with Watch(model, run_dir, toy_specs(model), WatchConfig()) as watch:
        assert watch._next_step == steps[-1] + 1


def _rank_main(rank, world, run_dir, init_file, out_dir):
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    from moewatch.capture.watch import Watch, WatchConfig
    from tests.toy import ToyMoE, toy_specs

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same weights on every rank, as DDP would have
    model = ToyMoE(capacity=6)
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
    counts = {}
    for i, b in enumerate(model.blocks):
        def hook(mod, args, out, name=f"blocks.{i}.router"):
            _, _, ids, dropped = out
            c = torch.bincount(ids[~dropped].flatten(), minlength=4)
            counts.setdefault(name, []).append(c.tolist())
        b.router.register_forward_hook(hook)
    watch = Watch(model, run_dir, toy_specs(model), WatchConfig(flush_steps=2))
    for _ in range(3):
        model(torch.randn(rank + 2, 5, 8, generator=gen)).sum().backward()
        watch.step()
    watch.close()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(counts))
    dist.barrier()
    dist.destroy_process_group()


def test_two_process_gloo_group_global_view(tmp_path):
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    out_dir.mkdir()
    mp.start_processes(_rank_main, args=(2, str(run_dir), str(tmp_path / "init"), str(out_dir)), nprocs=2,
                       start_method="spawn")
    run = moewatch.load(run_dir)
    assert sorted(run.layers["rank"].unique()) == [0, 1]
    assert run.meta["world_size"] == 2
    names = sorted(p.name for p in (run_dir / "experts").glob("*.parquet"))
    assert any(n.startswith("r0000-") for n in names) and any(n.startswith("r0001-") for n in names)
    per_rank = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    g = run.global_view()
    assert (g.layers["rank"] == -1).all() and (g.experts["rank"] == -1).all()
    for layer in ("blocks.0.router", "blocks.1.router"):
        for step in range(3):
            expected = np.array(per_rank[0][layer][step]) + np.array(per_rank[1][layer][step])
            got = g.experts[(g.experts.layer == layer) & (g.experts.step == step)].sort_values("expert")
            np.testing.assert_array_equal(got["tokens"].to_numpy(), expected)
            row = g.layers[(g.layers.layer == layer) & (g.layers.step == step)].iloc[0]
            assert row.tokens == 2 * 5 + 3 * 5
            assert row.cv == pytest.approx(expected.std() / expected.mean())
            assert row.max_share == pytest.approx(expected.max() / expected.sum())
            assert row.dead == int((expected == 0).sum())
            assert row.drop_rate == pytest.approx((25 * 2 - expected.sum()) / 50)
            # the token-weighted entropy lies between the two ranks' values
            ranks = run.layers[(run.layers.layer == layer) & (run.layers.step == step)]["entropy"]
            assert ranks.min() - 1e-12 <= row.entropy <= ranks.max() + 1e-12


EXIT_CHILD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {root!r})
    from moewatch.capture.watch import Watch, WatchConfig
    from tests.toy import ToyMoE, toy_specs
    model = ToyMoE()
    watch = Watch(model, {run!r}, toy_specs(model), WatchConfig(flush_steps=100, flush_seconds=600))
    for _ in range(3):
        model(torch.randn(2, 5, 8)).sum().backward()
        watch.step()
    model(torch.randn(2, 5, 8)).sum().backward()  # routed after the last step(): becomes a final step
    if {fail!r}:
        raise RuntimeError("training blew up")
    """
)


@pytest.mark.parametrize("fail", [False, True])
def test_interpreter_exit_flushes_an_unclosed_watch(tmp_path, fail):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", EXIT_CHILD.format(root=str(ROOT), run=str(run_dir), fail=fail)],
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode != 0) == fail, proc.stderr
    run = moewatch.load(run_dir)
    assert sorted(run.layers.step.unique()) == [0, 1, 2, 3]  # nothing was flushed before exit: all of it at exit
    assert run.meta["status"] == ("crashed" if fail else "finished")
