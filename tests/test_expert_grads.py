"""Per-expert gradient and parameter norms (`moewatch.capture.grads`) against float64 references taken by hand.

The references never go through `ExpertParams`: each test reads the experts' tensors from the model's own
structure (``mlp.experts.gate_up_proj``, ``moe.w_in_EDH``, ``experts[e]``, ...) and sums ``p.grad.double()**2``.
Models: moewatch's reference model (fused experts held by the block, a shared expert beside them), real
transformers 5.x models built tiny (Mixtral and Qwen3-MoE fused experts, DeepSeek-V3 with shared experts,
Switch-Transformers' ``expert_<i>`` modules) and a module-list block whose idle experts get no grad at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moewatch.capture.discovery import discover
from moewatch.capture.grads import GradTracker, combine_sq, find_expert_params
from moewatch.reference.model import MoEConfig, MoEGPT

ROOT = Path(__file__).resolve().parents[1]
RTOL = 2e-5  # float32 norms of float32 grads vs the float64 reference


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    np.testing.assert_allclose(got.detach().double().cpu().numpy(), want.detach().numpy(), rtol=RTOL, atol=1e-30)


def sq(*tensors: torch.Tensor | None) -> torch.Tensor:
    """float64 sum of squares of grads (None counts 0)."""
    return sum((t.double().square().sum() for t in tensors if t is not None), torch.zeros((), dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- reference model


def reference_model(**kw) -> MoEGPT:
    cfg = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=16, n_experts=4, top_k=2, d_expert=16)
    return MoEGPT(MoEConfig(**(cfg | kw))).train()


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 16), generator=g)
    return ids, torch.roll(ids, -1, 1)


def ref_reference(model: MoEGPT) -> dict[str, torch.Tensor]:
    return {f"blocks.{i}.moe.router": torch.stack([sq(b.moe.w_in_EDH.grad[e], b.moe.w_out_EHD.grad[e])
                                                   for e in range(model.config.n_experts)])
            for i, b in enumerate(model.blocks)}


def test_reference_model_fused_experts_shared_expert_left_out_and_param_norms():
    model = reference_model(shared_expert=True)
    tracker = GradTracker.attach(model, discover(model))
    try:
        ep = tracker.found["blocks.0.moe.router"]
        assert ep.layout == "fused" and ep.block == "blocks.0.moe" and not tracker.problems
        assert {t.name for t in ep.tensors} == {"blocks.0.moe.w_in_EDH", "blocks.0.moe.w_out_EHD"}
        assert not any("shared" in t.name for t in ep.tensors)
        # Expert 3 is never selected: its rows of the fused tensors get an exact-zero gradient.
        for b in model.blocks:
            b.moe.router.e_score_correction_bias[3] = -1e9
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(2):
            ids, targets = batch(step)
            model(ids, targets).loss.backward()
            want = ref_reference(model)
            opt.step()
            opt.zero_grad()
            took = tracker.take()
            assert took.steps == 1 and set(took.sq_E) == set(want)
            for layer, ref in want.items():
                close(took.sq_E[layer], ref)
                assert took.sq_E[layer][3].item() == 0.0 and (took.sq_E[layer][:3] > 0).all()
            close(took.norms()["blocks.1.moe.router"], want["blocks.1.moe.router"].sqrt())
        # Parameter norms after the updates, on demand (at a flush).
        norms = tracker.param_norms()
        for i, b in enumerate(model.blocks):
            want_p = torch.stack([sq(b.moe.w_in_EDH[e], b.moe.w_out_EHD[e]) for e in range(4)]).sqrt()
            close(norms[f"blocks.{i}.moe.router"], want_p)
        assert tracker.take().steps == 0 and tracker.take().sq_E == {}  # nothing since the last take
    finally:
        tracker.remove()


def test_gradient_accumulation_is_seen_whole_even_when_zero_grad_runs_before_take():
    model = reference_model()
    tracker = GradTracker.attach(model, discover(model))
    try:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for micro in range(2):
            ids, targets = batch(10 + micro)
            (model(ids, targets).loss / 2).backward()
            if micro == 0:
                first = ref_reference(model)
        want = ref_reference(model)
        opt.step()
        opt.zero_grad(set_to_none=True)  # a loop may zero before watch.step(): the hook has already read them
        took = tracker.take()
        assert took.steps == 1
        for layer, ref in want.items():
            close(took.sq_E[layer], ref)
            assert not torch.allclose(ref, first[layer])  # the second micro-batch mattered
    finally:
        tracker.remove()


def test_two_optimizers_each_count_their_own_params_once():
    model = reference_model()
    b1 = model.blocks[1].moe
    in_two = [b1.w_in_EDH]
    rest = [p for p in model.parameters() if p is not b1.w_in_EDH]
    opt1, opt2 = torch.optim.SGD(rest, lr=0.1), torch.optim.Adam(in_two, lr=1e-3)
    unrelated = torch.optim.SGD([nn.Parameter(torch.ones(3))], lr=0.1)  # an optimizer of something else
    tracker = GradTracker.attach(model, discover(model))
    try:
        ids, targets = batch(3)
        model(ids, targets).loss.backward()
        want = ref_reference(model)
        unrelated.param_groups[0]["params"][0].grad = torch.ones(3)
        unrelated.step()
        opt1.step()
        opt2.step()
        took = tracker.take()
        assert took.steps == 1
        for layer, ref in want.items():
            close(took.sq_E[layer], ref)
        # Only opt1 steps: layer 1 shows its w_out only.
        opt1.step()
        took = tracker.take()
        close(took.sq_E["blocks.1.moe.router"], torch.stack([sq(b1.w_out_EHD.grad[e]) for e in range(4)]))
        close(took.sq_E["blocks.0.moe.router"], want["blocks.0.moe.router"])
        # Two optimizer steps in one watch step: the squares add up and `steps` says so.
        opt1.step()
        opt1.step()
        took = tracker.take()
        assert took.steps == 2
        close(took.sq_E["blocks.0.moe.router"], 2 * want["blocks.0.moe.router"])
        close(took.norms()["blocks.0.moe.router"], want["blocks.0.moe.router"].sqrt())
    finally:
        tracker.remove()


class Wrapper(torch.optim.Optimizer):
    """An optimizer delegating to an inner one (both are hooked Optimizers holding the same parameters)."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        super().__init__([dict(g) for g in inner.param_groups], {})
        self.inner = inner

    def step(self, closure=None):
        return self.inner.step(closure)


def test_wrapper_optimizer_delegating_to_an_inner_one_counts_once():
    model = reference_model()
    opt = Wrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    tracker = GradTracker.attach(model, discover(model))
    try:
        ids, targets = batch(4)
        model(ids, targets).loss.backward()
        want = ref_reference(model)
        opt.step()
        took = tracker.take()
        assert took.steps == 1
        for layer, ref in want.items():
            close(took.sq_E[layer], ref)
    finally:
        tracker.remove()


def test_hook_error_warns_once_disables_the_tracker_and_training_continues(monkeypatch):
    model = reference_model()
    tracker = GradTracker.attach(model, discover(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def boom(optimizer):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(tracker, "_observe", boom)
    before = model.blocks[0].moe.w_in_EDH.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            ids, targets = batch(step)
            model(ids, targets).loss.backward()
            opt.step()
            opt.zero_grad()
    ours = [w for w in caught if "expert gradient tracking failed" in str(w.message)]
    assert len(ours) == 1 and "kaboom" in str(ours[0].message)
    assert tracker.error == "RuntimeError: kaboom" and tracker._handle is None
    assert tracker.take().sq_E == {}
    assert not torch.equal(before, model.blocks[0].moe.w_in_EDH)  # the optimizer kept stepping
    tracker.remove()  # idempotent


def test_grad_scaler_grads_are_seen_unscaled_plain_and_fused_optimizers():
    model = reference_model()
    tracker = GradTracker.attach(model, discover(model))
    try:
        for fused in (False, True):
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
            ids, targets = batch(5)
            scaler.scale(model(ids, targets).loss).backward()
            want = {k: v / 2.0**24 for k, v in ref_reference(model).items()}  # the unscaled grads' squares
            scaler.step(opt)  # plain: unscale_ then step; fused: step with optimizer.grad_scale set
            scaler.update()
            opt.zero_grad()
            took = tracker.take()
            assert took.steps == 1
            for layer, ref in want.items():
                close(took.sq_E[layer], ref)
    finally:
        tracker.remove()


# ---------------------------------------------------------------------------------------------- transformers


import hf_tiny  # noqa: E402  (tests/, builds transformers models from configs; imports transformers lazily)

BY_ID = {c.id: c for c in hf_tiny.CASES}


def hf_step(case_id: str) -> tuple[nn.Module, GradTracker, dict[str, torch.Tensor]]:
    """Build a tiny transformers model, attach, run one training step; return the grads' squares per layer."""
    pytest.importorskip("transformers")
    case = BY_ID[case_id]
    model = hf_tiny.build(case)
    specs = discover(model)
    tracker = GradTracker.attach(model, specs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(**hf_tiny.inputs(case))
    hidden = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    hidden.float().square().mean().backward()
    snapshot = {n: p.grad.detach().clone() if p.grad is not None else None for n, p in model.named_parameters()}
    opt.step()
    opt.zero_grad()
    model._grads = snapshot  # the grads as the optimizer saw them, for the references
    return model, tracker, tracker.take().sq_E


@pytest.mark.parametrize("case_id", ["mixtral", "qwen3_moe"])
def test_transformers_fused_experts_match_float64(case_id):
    model, tracker, got = hf_step(case_id)
    try:
        assert set(got) == {f"model.layers.{i}.mlp.gate" for i in range(2)} and not tracker.problems
        for i in range(2):
            layer = f"model.layers.{i}.mlp.gate"
            assert tracker.found[layer].layout == "fused"
            g_up = model._grads[f"model.layers.{i}.mlp.experts.gate_up_proj"]
            g_down = model._grads[f"model.layers.{i}.mlp.experts.down_proj"]
            assert g_up.shape[0] == 4 and g_up.dim() == 3  # transformers 5 keeps them fused [E, ...]
            close(got[layer], torch.stack([sq(g_up[e], g_down[e]) for e in range(4)]))
        norms = tracker.param_norms()
        w = model.model.layers[0].mlp.experts
        close(norms["model.layers.0.mlp.gate"],
              torch.stack([sq(w.gate_up_proj[e], w.down_proj[e]) for e in range(4)]).sqrt())
    finally:
        tracker.remove()


def test_deepseek_v3_shared_experts_are_not_routed_experts():
    model, tracker, got = hf_step("deepseek_v3")
    try:
        layer = "model.layers.0.mlp.gate"
        ep = tracker.found[layer]
        assert ep.num_experts == 8 and not any("shared" in t.name for t in ep.tensors)
        assert {t.name for t in ep.tensors} == {"model.layers.0.mlp.experts.gate_up_proj",
                                                "model.layers.0.mlp.experts.down_proj"}
        g = model._grads
        assert g["model.layers.0.mlp.shared_experts.gate_proj.weight"] is not None  # it trains, just not counted
        want = torch.stack([sq(g["model.layers.0.mlp.experts.gate_up_proj"][e],
                               g["model.layers.0.mlp.experts.down_proj"][e]) for e in range(8)])
        close(got[layer], want)
    finally:
        tracker.remove()


def test_switch_transformers_expert_modules_by_name():
    model, tracker, got = hf_step("switch_transformers")
    try:
        layer = "encoder.block.0.layer.1.mlp.router"
        assert tracker.found[layer].layout == "modules" and len(got) == 4
        g = model._grads
        prefix = "encoder.block.0.layer.1.mlp.experts"
        want = torch.stack([sq(g[f"{prefix}.expert_{e}.wi.weight"], g[f"{prefix}.expert_{e}.wo.weight"])
                            for e in range(4)])
        close(got[layer], want)
    finally:
        tracker.remove()


@pytest.mark.parametrize("case_id,layout,free", [("dbrx", "flat", ()), ("zaya", "fused", (4,)),
                                                 ("longcat_flash", "fused", (4, 5)), ("doge", "product_key", ()),
                                                 ("nllb_moe", "modules", ()), ("gpt_oss", "fused", ())])
def test_other_layouts_are_found(case_id, layout, free):
    pytest.importorskip("transformers")
    model = hf_tiny.build(BY_ID[case_id])
    specs = discover(model)
    names = [s.name for s in specs]
    for spec in specs:
        ep, reason = find_expert_params(model, spec.name, spec.num_experts, names)
        assert ep is not None, reason
        assert ep.layout == layout and ep.param_free == free and not any("shared" in t.name for t in ep.tensors)


def test_dbrx_flat_experts_and_parameter_free_tails_match_float64():
    model, tracker, got = hf_step("dbrx")
    try:
        g = model._grads
        w = {n: g[f"transformer.blocks.0.ffn.experts.mlp.{n}"].view(4, 32, 32) for n in ("w1", "v1", "w2")}
        close(got["transformer.blocks.0.ffn.router"], torch.stack([sq(*(w[n][e] for n in w)) for e in range(4)]))
    finally:
        tracker.remove()
    model, tracker, got = hf_step("zaya")  # 4 experts + the skip class: NaN, never a "stopped learning" 0
    try:
        v = got["model.layers.0.mlp.gate"]
        assert v.shape == (5,) and torch.isnan(v[4]) and torch.isfinite(v[:4]).all()
        assert torch.isnan(tracker.param_norms()["model.layers.0.mlp.gate"][4])
    finally:
        tracker.remove()


# ---------------------------------------------------------------------------------------------- experts as modules


class ListBlock(nn.Module):
    """Experts as an nn.ModuleList, run only on the tokens routed to them (idle experts get no grad at all)."""

    def __init__(self, d: int = 8, num_experts: int = 4, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d, num_experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d))
                                     for _ in range(num_experts))
        self.shared_expert = nn.Linear(d, d)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        probs_TE = self.gate(x_TD).softmax(-1)
        w_TK, ids_TK = probs_TE.topk(self.top_k, dim=-1)
        out_TD = self.shared_expert(x_TD)
        for e, expert in enumerate(self.experts):
            token_N, slot_N = torch.where(ids_TK == e)  # host sync: fine in a test model
            if token_N.numel():
                out_TD = out_TD.index_add(0, token_N, expert(x_TD[token_N]) * w_TK[token_N, slot_N, None])
        return x_TD + out_TD


class ListModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(ListBlock() for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_experts_as_modules_idle_expert_has_no_grad_and_reads_zero():
    model = ListModel().train()
    with torch.no_grad():
        for b in model.blocks:
            b.gate.bias[3] = -1e4  # expert 3 never chosen: its parameters' .grad stays None
    tracker = GradTracker.attach(model, discover(model))
    try:
        layer = "blocks.0.gate"
        ep = tracker.found[layer]
        assert ep.layout == "modules" and len(ep.tensors) == 16 and not any("shared" in t.name for t in ep.tensors)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(2):
            x = torch.randn(12, 8, generator=torch.Generator().manual_seed(step))
            F.mse_loss(model(x), torch.zeros_like(x)).backward()
            assert all(p.grad is None for p in model.blocks[0].experts[3].parameters())
            want = {f"blocks.{i}.gate": torch.stack([sq(*(p.grad for p in b.experts[e].parameters()))
                                                     for e in range(4)]) for i, b in enumerate(model.blocks)}
            opt.step()
            opt.zero_grad()
            took = tracker.take()
            for name, ref in want.items():
                close(took.sq_E[name], ref)
                assert took.sq_E[name][3].item() == 0.0
        norms = tracker.param_norms()
        close(norms[layer], torch.stack([sq(*model.blocks[0].experts[e].parameters()) for e in range(4)]).sqrt())
    finally:
        tracker.remove()


class NumberedExperts(nn.Module):
    """Per-expert tensors named by index in one module (Transformer Engine's GroupedLinear ``weight{i}``): ``up{e}``
    is ``[E, D]``, so its dim 0 equals E and the fused rule would split it; ``w1`` is no expert's (no 0)."""

    def __init__(self, E: int = 4, D: int = 8):
        super().__init__()
        self.E, self.num_experts_per_tok = E, 2
        self.gate = nn.Linear(D, E)
        self.experts = nn.Module()
        for e in range(E):
            self.experts.register_parameter(f"up{e}", nn.Parameter(torch.randn(E, D) * 0.3))
            self.experts.register_parameter(f"down{e}", nn.Parameter(torch.randn(D, E) * 0.3))
        self.experts.w1 = nn.Parameter(torch.ones(D))

    def forward(self, x):
        probs = self.gate(x).softmax(-1)
        out = sum(probs[:, e:e + 1] * (F.silu(x @ getattr(self.experts, f"up{e}").t())
                                       @ getattr(self.experts, f"down{e}").t()) for e in range(self.E))
        return out * self.experts.w1


def test_indexed_parameters_are_one_expert_each_before_the_fused_rule():
    model = Wrap(NumberedExperts()).train()
    tracker = GradTracker.attach(model, {"block.gate": 4})
    try:
        ep = tracker.found["block.gate"]
        assert ep.layout == "indexed" and ep.unattributed == ("block.experts.w1",)
        assert {(t.name, t.expert) for t in ep.tensors} == {(f"block.experts.{s}{e}", e) for s in ("up", "down")
                                                           for e in range(4)}
        F.mse_loss(model.block(torch.randn(6, 8)), torch.zeros(6, 8)).backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        experts = model.block.experts
        close(tracker.take().sq_E["block.gate"], torch.stack([sq(getattr(experts, f"up{e}").grad,
                                                                  getattr(experts, f"down{e}").grad)
                                                               for e in range(4)]))
    finally:
        tracker.remove()


# ---------------------------------------------------------------------------------------------- not found


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 4)
        self.mlp = nn.Linear(8, 8)


class ExpertParallel(nn.Module):
    """Two of four experts held locally (DeepSpeed/Megatron style): their global indices are not known here."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 4)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.experts.num_local_experts = 2
        self.num_experts = 4


class OnlyVectors(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(4, 4)
        self.experts = nn.Module()
        self.experts.scale = nn.Parameter(torch.ones(4))  # [E] or [D] with D == E: cannot tell


class Wrap(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block


@pytest.mark.parametrize("block,router,words", [
    (Plain(), "block.router", "no experts found"),
    (ExpertParallel(), "block.gate", "expert parallel"),
    (OnlyVectors(), "block.gate", "no parameter attributable"),
])
def test_not_found_says_why(block, router, words):
    ep, reason = find_expert_params(Wrap(block), router, 4)
    assert ep is None and words in reason
    tracker = GradTracker.attach(Wrap(block), {router: 4})
    assert tracker.found == {} and words in tracker.problems[router]
    tracker.remove()


# ---------------------------------------------------------------------------------------------- ranks


def test_combine_sq_takes_one_replica_and_sums_shards():
    a, b = torch.tensor([4.0, 9.0]), torch.tensor([4.0, 9.0])
    assert torch.equal(combine_sq([a, b], sharded=False), torch.tensor([2.0, 3.0]))  # DP: identical, keep one
    assert torch.allclose(combine_sq([a, b], sharded=True), torch.tensor([8.0, 18.0]).sqrt())
    np.testing.assert_allclose(combine_sq([np.array([1.0, 0.0]), np.array([3.0, 4.0])], sharded=True), [2.0, 2.0])


DTENSOR_SCRIPT = textwrap.dedent("""
    import torch, torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from moewatch.capture.grads import GradTracker

    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)  # this process plays rank 1 of 2
    mesh = init_device_mesh("cpu", (2,))
    full = torch.arange(4 * 3 * 2, dtype=torch.float64).reshape(4, 3, 2) + 1
    want = full.reshape(4, -1).square().sum(1)
    for placement in (Shard(0), Replicate()):
        block = nn.Module()
        block.gate = nn.Linear(2, 4)
        local = full.chunk(2)[1] if placement == Shard(0) else full
        block.w_EFD = nn.Parameter(DTensor.from_local(local.float().clone(), mesh, [placement], run_check=False))
        model = nn.Module()
        model.moe = block
        tracker = GradTracker.attach(model, {"moe.gate": 4})
        assert tracker.found["moe.gate"].sharded
        p = block.w_EFD
        p.grad = DTensor.from_local(local.float().clone(), mesh, [placement], run_check=False)
        torch.optim.SGD([p], lr=0.0).step()
        got = tracker.take().sq_E["moe.gate"].double()
        if placement == Shard(0):  # rank 1 holds experts 2, 3 at their global rows; the others are 0 here
            expect = torch.cat([torch.zeros(2, dtype=torch.float64), want[2:]])
        else:  # each of 2 replicas reports half: the sum over all ranks is the full square
            expect = want / 2
        assert torch.allclose(got, expect, rtol=1e-5), (placement, got, expect)
        assert torch.allclose(tracker.param_norms(squared=True)["moe.gate"].double(), expect, rtol=1e-5)
        tracker.remove()
    dist.destroy_process_group()
    print("ok")
""")


def test_dtensor_local_shards_land_at_their_global_experts():
    """FSDP2/EP-style DTensor grads: local squares at their global rows; replicas divided out (fake 2-rank group).

    In a subprocess: a process group and device mesh in this process would outlive the test."""
    pytest.importorskip("torch.distributed.tensor")
    out = subprocess.run([sys.executable, "-c", DTENSOR_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_hook_and_take_never_sync():
    model = reference_model().cuda()
    tracker = GradTracker.attach(model, discover(model))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)  # SGD's own step never syncs either
    try:
        ids, targets = (t.cuda() for t in batch(0))
        model(ids, targets).loss.backward()
        opt.step()  # the optimizer's state and the tracker's plan for it are built here
        opt.zero_grad()
        tracker.take()
        model(ids, targets).loss.backward()
        want = ref_reference(model)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
            took = tracker.take()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for layer, ref in want.items():
            close(took.sq_E[layer], ref.cpu())
    finally:
        tracker.remove()
