"""A real 2-process torchrun launch (gloo, CPU) of examples/torchrun_ddp.py: the ranks' steps are summed at capture
and written once by rank 0; with --per-rank each rank's own rows are kept under ranks/.

Each rank runs the example's own `main()`; a driver adds, before training, a separate forward hook on every
router that dumps that rank's counts (straight from the router's top-k indices) to a JSON file.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import moewatch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
STEPS, ACCUMULATE, BATCH, SEQ = 3, 2, 2, 16

DRIVER = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    import torch
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    spec = importlib.util.spec_from_file_location("torchrun_ddp", {example!r})
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    calls = {{}}  # router name -> per-call expert counts, in call order

    def build_model():
        model = original()
        for name, module in model.named_modules():
            if isinstance(module, MixtralTopKRouter):
                def hook(mod, args, out, name=name):
                    counts = torch.bincount(out[2].flatten(), minlength=mod.num_experts)
                    calls.setdefault(name, []).append(counts.tolist())
                module.register_forward_hook(hook)
        return model

    original, example.build_model = example.build_model, build_model
    example.main(sys.argv[1:])
    with open(os.path.join({out!r}, "rank%s.json" % os.environ["RANK"]), "w") as f:
        json.dump(calls, f)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_rank_torchrun_global_view_is_the_sum_of_the_ranks(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "counts"
    out.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(example=str(ROOT / "examples" / "torchrun_ddp.py"), out=str(out)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(driver),
           "--run-dir", str(run_dir), "--steps", str(STEPS), "--accumulate", str(ACCUMULATE),
           "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--per-rank"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "max_share" in proc.stdout  # rank 0 printed the global view

    run = moewatch.load(run_dir)
    assert run.meta["status"] == "finished" and run.meta["world_size"] == 2
    assert run.meta["meta"]["example"] == "torchrun_ddp"
    assert sorted(run.layers["rank"].unique()) == [0], "the ranks' sum is written once, by rank 0"
    assert not run.experts.duplicated(["step", "layer", "expert"]).any()
    parts = sorted(p.name[:5] for p in (run_dir / "experts").glob("*.parquet"))
    assert set(parts) == {"r0000"}
    own = pd.read_parquet(run_dir / "ranks" / "experts")  # --per-rank: each rank's own rows
    assert sorted(own["rank"].unique()) == [0, 1]

    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    layers = sorted(per_rank[0])
    assert layers == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    g = run.global_view()
    assert sorted(g.layers.step.unique()) == list(range(STEPS))
    differ = False
    for layer in layers:
        # ACCUMULATE router calls per optimizer step on each rank
        steps = [np.asarray(per_rank[r][layer]).reshape(STEPS, ACCUMULATE, -1).sum(1) for r in (0, 1)]
        differ |= not np.array_equal(steps[0], steps[1])
        for step in range(STEPS):
            for r in (0, 1):
                mine = own[(own["rank"] == r) & (own.layer == layer) & (own.step == step)].sort_values("expert")
                np.testing.assert_array_equal(mine.tokens.to_numpy(), steps[r][step])
            got = g.experts[(g.experts.layer == layer) & (g.experts.step == step)].sort_values("expert")
            expected = steps[0][step] + steps[1][step]
            np.testing.assert_array_equal(got.tokens.to_numpy(), expected)
            row = g.layers[(g.layers.layer == layer) & (g.layers.step == step)].iloc[0]
            assert row.tokens == 2 * ACCUMULATE * BATCH * SEQ
            assert row.cv == pytest.approx(expected.std() / expected.mean())
            assert row.max_share == pytest.approx(expected.max() / expected.sum())
    assert differ, "the ranks saw different data, so the sum is a real test"
