"""Expert learning through `moewatch.attach`: the experts table's `grad_norm` and `param_norm` against float64
references taken by hand.

Real training loops (gradient accumulation of two micro-batches, then ``optimizer.step(); optimizer.zero_grad();
watch.step()``) on moewatch's reference model and a tiny transformers Mixtral. The reference gradient norms are read
from ``p.grad`` by an optimizer step pre-hook the test registers on its own optimizer (the grads exactly as the
optimizer sees them), from the model's own structure (``moe.w_in_EDH``, ``mlp.experts.gate_up_proj``), never
through moewatch's discovery. The group sum over ranks is tested in tests/test_ranks_capture.py (DP x 4).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import moewatch
from moewatch.capture.types import Probe, RouterSpec
from moewatch.capture.watch import WatchConfig
from moewatch.reference.model import MoEConfig, MoEGPT
from tests.toy import ToyRouter, read_toy

RTOL = 1e-5  # float32 squares summed on the device vs float64


def sq64(*tensors: torch.Tensor) -> float:
    return float(sum(t.detach().double().square().sum() for t in tensors))


def reference_model() -> MoEGPT:
    cfg = MoEConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=16, n_experts=4, top_k=2,
                    d_expert=16, shared_expert=True)
    return MoEGPT(cfg).train()


def reference_sq(model: MoEGPT) -> dict[str, list[float]]:
    """Per router: each expert's float64 sum of squares of its rows of the fused tensors' grads."""
    return {f"blocks.{i}.moe.router": [sq64(b.moe.w_in_EDH.grad[e], b.moe.w_out_EHD.grad[e])
                                       for e in range(model.config.n_experts)]
            for i, b in enumerate(model.blocks)}


def reference_params(model: MoEGPT) -> dict[str, list[float]]:
    return {f"blocks.{i}.moe.router": [sq64(b.moe.w_in_EDH[e], b.moe.w_out_EHD[e])
                                       for e in range(model.config.n_experts)]
            for i, b in enumerate(model.blocks)}


def train(model: nn.Module, watch: moewatch.Watch, loss_of: Callable[[int], torch.Tensor],
          grads_of: Callable[[nn.Module], dict[str, list[float]]],
          params_of: Callable[[nn.Module], dict[str, list[float]]], steps: int,
          skip_optimizer: tuple[int, ...] = ()) -> tuple[dict, dict]:
    """The loop; returns the references {(step, layer): [E] norms} of the grads and of the params (after the
    update, as watch.step() sees them)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seen: list[dict[str, list[float]]] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(grads_of(model)))
    grads, params = {}, {}
    for step in range(steps):
        for micro in range(2):  # gradient accumulation
            (loss_of(2 * step + micro) / 2).backward()
        if step not in skip_optimizer:
            opt.step()
            for layer, v in seen.pop().items():
                grads[(step, layer)] = np.sqrt(v)
        opt.zero_grad(set_to_none=True)
        for layer, v in params_of(model).items():
            params[(step, layer)] = np.sqrt(v)
        assert watch.step() == step
    return grads, params


def check(run_dir: Path, grads: dict, params: dict, flush_steps: set[int], steps: int, layers: set[str]) -> None:
    ex = moewatch.load(run_dir).experts.sort_values(["step", "layer", "expert"])
    assert set(ex.layer) == layers and sorted(ex.step.unique()) == list(range(steps))
    for (step, layer), rows in ex.groupby(["step", "layer"]):
        g, p = rows.grad_norm.to_numpy(float), rows.param_norm.to_numpy(float)
        if (step, layer) in grads:
            np.testing.assert_allclose(g, grads[(step, layer)], rtol=RTOL, err_msg=f"grad_norm {step} {layer}")
            assert (g > 0).all()
        else:
            assert rows.grad_norm.isna().all(), f"no optimizer step at {step}: null"
        if step in flush_steps:
            np.testing.assert_allclose(p, params[(step, layer)], rtol=RTOL, err_msg=f"param_norm {step} {layer}")
        else:
            assert rows.param_norm.isna().all(), f"param_norm only at flush steps, not {step}"


def test_reference_model_accumulated_grads_and_param_norms_match_float64(tmp_path):
    torch.manual_seed(0)
    model = reference_model()
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 64, (2, 16), generator=g) for _ in range(12)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything found, nothing to warn about
        watch = moewatch.attach(model, tmp_path, flush_steps=2)
    grads, params = train(model, watch, lambda i: model(data[i], torch.roll(data[i], -1, 1)).loss,
                          reference_sq, reference_params, steps=5, skip_optimizer=(2,))
    model(data[10], data[10]).loss.backward()  # routed after the last step(): close() writes it as step 5
    for layer, v in reference_params(model).items():
        params[(5, layer)] = np.sqrt(v)
    watch.close()
    # flush_steps=2: steps 1 and 3 flush and carry the parameter norms, and close()'s final step 5; step 4 is the
    # first of a flush that close() ends after it, so it has none. Steps 2 and 5 had no optimizer step: no grad_norm.
    check(tmp_path, grads, params, {1, 3, 5}, 6, {"blocks.0.moe.router", "blocks.1.moe.router"})
    meta = json.loads((tmp_path / "run.json").read_text())
    assert not [p for p in meta["problems"] if p["kind"].startswith("expert_")]


def test_transformers_mixtral_fused_experts_match_float64(tmp_path):
    pytest.importorskip("transformers")
    from tests import hf_tiny

    case = next(c for c in hf_tiny.CASES if c.module == "mixtral")
    model = hf_tiny.build(case)
    layers = [f"model.layers.{i}.mlp" for i in range(2)]

    def experts(i: int) -> nn.Module:
        return model.get_submodule(layers[i]).experts

    def grads_of(m: nn.Module) -> dict[str, list[float]]:
        return {f"{layers[i]}.gate": [sq64(experts(i).gate_up_proj.grad[e], experts(i).down_proj.grad[e])
                                      for e in range(4)] for i in range(2)}

    def params_of(m: nn.Module) -> dict[str, list[float]]:
        return {f"{layers[i]}.gate": [sq64(experts(i).gate_up_proj[e], experts(i).down_proj[e]) for e in range(4)]
                for i in range(2)}

    g = torch.Generator().manual_seed(2)
    data = [torch.randint(2, hf_tiny.VOCAB, (2, 8), generator=g) for _ in range(6)]
    watch = moewatch.attach(model, tmp_path, flush_steps=3)
    grads, params = train(model, watch, lambda i: model(input_ids=data[i], labels=data[i]).loss, grads_of,
                          params_of, steps=3)
    watch.close()
    check(tmp_path, grads, params, {2}, 3, {f"{name}.gate" for name in layers})


def test_grads_false_records_null_and_hooks_no_optimizer(tmp_path):
    from torch.optim.optimizer import _global_optimizer_pre_hooks

    model = reference_model()
    before = len(_global_optimizer_pre_hooks)
    watch = moewatch.attach(model, tmp_path, grads=False, flush_steps=1)
    assert len(_global_optimizer_pre_hooks) == before
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(ids, ids).loss.backward()
        opt.step()
        opt.zero_grad()
        watch.step()
    watch.close()
    ex = moewatch.load(tmp_path).experts
    assert len(ex) and ex.grad_norm.isna().all() and ex.param_norm.isna().all()
    with pytest.raises(TypeError, match="grads must be True"):
        WatchConfig(grads="yes")


def test_closing_removes_the_optimizer_hook(tmp_path):
    from torch.optim.optimizer import _global_optimizer_pre_hooks

    before = len(_global_optimizer_pre_hooks)
    watch = moewatch.attach(reference_model(), tmp_path)
    assert len(_global_optimizer_pre_hooks) == before + 1
    watch.close()
    assert len(_global_optimizer_pre_hooks) == before


class Bare(nn.Module):
    """A router beside a dense MLP: nothing holds experts."""

    def __init__(self) -> None:
        super().__init__()
        self.router = ToyRouter(8, 4, 2)
        self.mlp = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.router(x.reshape(-1, 8))
        return self.mlp(x)


class BareModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Bare()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def test_experts_not_found_record_null_with_a_problem(tmp_path):
    model = BareModel().train()
    spec = RouterSpec(name="block.router", num_experts=4, top_k=2, probes=[Probe(model.block.router, read_toy)])
    with pytest.warns(RuntimeWarning, match="expert parameters of 1 of 1 router"):
        watch = moewatch.attach(model, tmp_path, routers={"block.router": spec})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(3, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        watch.step()
    watch.close()
    ex = moewatch.load(tmp_path).experts
    assert len(ex) == 8 and ex.grad_norm.isna().all() and ex.param_norm.isna().all()
    problems = [p for p in json.loads((tmp_path / "run.json").read_text())["problems"]
                if p["kind"] == "expert_params_not_found"]
    assert len(problems) == 1 and problems[0]["router"] == "block.router"
    assert "no experts found" in problems[0]["message"]


def test_a_failing_hook_never_hurts_training_and_is_a_problem(tmp_path):
    model = reference_model()
    watch = moewatch.attach(model, tmp_path, flush_steps=1)

    def boom(optimizer: torch.optim.Optimizer) -> None:
        raise RuntimeError("boom")

    watch._grads._observe = boom
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="expert gradient tracking failed"):
        for _ in range(2):
            model(ids, ids).loss.backward()
            opt.step()  # still steps
            opt.zero_grad()
            watch.step()
    watch.close()
    run = moewatch.load(tmp_path)
    assert sorted(run.experts.step.unique()) == [0, 1] and run.experts.grad_norm.isna().all()
    kinds = [(p["kind"], p["router"]) for p in run.meta["problems"]]
    assert kinds.count(("expert_grads_stopped", None)) == 1


def _unseen(run_dir: Path) -> list[tuple[str | None, str]]:
    return [(p["router"], p["message"]) for p in json.loads((run_dir / "run.json").read_text())["problems"]
            if p["kind"] == "expert_grads_unseen"]


def _loop(model: MoEGPT, watch: moewatch.Watch, opt: torch.optim.Optimizer, steps: int) -> None:
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(ids, ids).loss.backward()
        opt.step()
        opt.zero_grad()
        watch.step()


def test_an_optimizer_stepping_copies_of_the_parameters_is_said_not_silent(tmp_path):
    """fp32 master weights (Megatron's mixed-precision and distributed optimizers, DeepSpeed ZeRO) are stepped instead
    of the model's parameters: the hook never sees the experts, and the run says so instead of leaving grad_norm null
    without a word."""
    model = reference_model()
    masters = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for m in masters:
        m.grad = torch.zeros_like(m)
    watch = moewatch.attach(model, tmp_path / "copies")
    with pytest.warns(RuntimeWarning, match="optimizer steps ran but none held the experts' parameters"):
        _loop(model, watch, torch.optim.SGD(masters, lr=0.1), steps=4)
        watch.close()  # a run shorter than GRADS_SILENT_STEPS hears it at close
    (problem,) = _unseen(tmp_path / "copies")
    assert problem[0] is None and "fp32 master weights" in problem[1]
    assert moewatch.load(tmp_path / "copies").experts.grad_norm.isna().all()

    model = reference_model()  # forward and backward but no optimizer at all
    watch = moewatch.attach(model, tmp_path / "none")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="no torch.optim optimizer step ran"):
        for _ in range(3):
            model(ids, ids).loss.backward()
            watch.step()
        watch.close()
    assert [r for r, _ in _unseen(tmp_path / "none")] == [None]


def test_frozen_experts_are_named_and_a_normal_run_has_no_such_problem(tmp_path):
    from moewatch.capture.watch import GRADS_SILENT_STEPS

    model = reference_model()
    model.blocks[1].moe.w_in_EDH.requires_grad_(False)
    model.blocks[1].moe.w_out_EHD.requires_grad_(False)
    watch = moewatch.attach(model, tmp_path / "frozen")
    with pytest.warns(RuntimeWarning, match="1 router\\(s\\) never showed expert gradients"):
        _loop(model, watch, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
              steps=GRADS_SILENT_STEPS)  # checked at that step, before close
        assert _unseen(tmp_path / "frozen")
    watch.close()
    assert [r for r, _ in _unseen(tmp_path / "frozen")] == ["blocks.1.moe.router"]

    model = reference_model()
    watch = moewatch.attach(model, tmp_path / "normal")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _loop(model, watch, torch.optim.SGD(model.parameters(), lr=0.1), steps=4)
        watch.close()
    assert _unseen(tmp_path / "normal") == []


def test_global_view_averages_rank_rows_never_sums_them():
    from moewatch.store.reader import global_frames

    rows = []
    for rank in range(3):
        for e in range(2):
            rows.append(dict(rank=rank, step=0, layer="gate", expert=e, tokens=1, dropped=0, prob_mean=0.5,
                             bias=np.nan, gate_mass=np.nan, grad_norm=[2.0, 3.0][e] if rank < 2 else np.nan,
                             param_norm=10.0 + e))
    ex = pd.DataFrame(rows)
    ly = pd.DataFrame([dict(rank=r, step=0, layer="gate", tokens=1, top_k=1, num_experts=2, dropped=0,
                            logit_abs_max=np.nan, nonfinite=0, calls=1, time=0.0, entropy=np.nan, z_loss=np.nan,
                            logit_mean=np.nan, logit_std=np.nan) for r in range(3)])
    ge, _ = global_frames(ex, ly)
    ge = ge.sort_values("expert")
    np.testing.assert_array_equal(ge.grad_norm, [2.0, 3.0])  # the rank without one is left out, not a 0
    np.testing.assert_array_equal(ge.param_norm, [10.0, 11.0])
