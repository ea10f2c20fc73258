"""Megatron-Core (0.16.x): ``TopKRouter`` read on its documented output contract, ``(probs [T, E], routing_map [T, E])``
after token dropping, with the logits from its gating.

On CPU the real router runs with two shims: its ``gating`` moves the weights to CUDA first, so the test replaces
that method with the same ``router_gating_linear`` call minus the move, and its expert-bias buffers are created on
``torch.cuda.current_device()``, which the test points at the CPU while building it; routing, token dropping, expert
bias and padding are Megatron's own. Without Transformer Engine, Megatron 0.16's ``router_gating_linear`` refers to an
undefined ``te_general_gemm``; the tests define it as None, which selects the plain-torch branch Megatron has for it.
The ``gpu`` test runs the unmodified router on CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import moewatch
from tests.stack_import import import_stack
from tests.stack_truth import (
    StackTruth,
    assert_measures_recorded,
    assert_run_matches,
    bincount,
    one_process_group,
)

import_stack("megatron.core.transformer.moe.router", "Megatron-Core")

from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.transformer.moe import moe_utils  # noqa: E402
from megatron.core.transformer.moe import router as megatron_router  # noqa: E402
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from moewatch.capture.stack_readers import MegatronRouterReader  # noqa: E402

D, E, K, VOCAB, SEQ, STEPS = 16, 8, 2, 64, 12, 3


@pytest.fixture(scope="module")
def group():
    """A one-process gloo group (Megatron routers take their process groups explicitly)."""
    with one_process_group() as g:
        yield ProcessGroupCollection(tp=g, cp=g, tp_cp=g, tp_dp_cp=g)


@pytest.fixture
def te_fallback(monkeypatch):
    if getattr(moe_utils, "te_general_gemm", None) is None:
        monkeypatch.setattr(moe_utils, "te_general_gemm", None, raising=False)


def make_router(pgc, *, capacity: float | None, score: str, bias: bool, monkeypatch=None) -> TopKRouter:
    """A TopKRouter; with `monkeypatch` its CUDA-placed buffers (expert bias, token counts) are created on CPU."""
    cfg = TransformerConfig(num_layers=1, hidden_size=D, num_attention_heads=4, num_moe_experts=E,
                            moe_router_topk=K, moe_expert_capacity_factor=capacity, moe_token_drop_policy="probs",
                            moe_aux_loss_coeff=0.0, moe_router_score_function=score,
                            moe_router_enable_expert_bias=bias, use_cpu_initialization=True,
                            moe_router_dtype="fp32", init_method_std=0.3)
    if monkeypatch is not None:
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "current_device", lambda: "cpu")
            router = TopKRouter(config=cfg, pg_collection=pgc)
    else:
        router = TopKRouter(config=cfg, pg_collection=pgc)
    if bias:
        router.expert_bias.copy_(torch.randn(E, device=router.expert_bias.device) * 0.05)
    return router


def cpu_gating(router: TopKRouter):
    """``TopKRouter.gating`` minus its move of the weights to CUDA."""
    def gating(x):
        return moe_utils.router_gating_linear(x, router.weight, router.bias, torch.float32)
    return gating


class MegatronLM(nn.Module):
    """Embeddings, Megatron routers with dense expert MLPs weighted by the routers' probs (zero off the kept choice),
    in Megatron's [sequence, batch, hidden] layout."""

    def __init__(self, routers: list[TopKRouter]):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.routers = nn.ModuleList(routers)
        self.experts = nn.ModuleList(nn.ModuleList(nn.Linear(D, D) for _ in range(E)) for _ in routers)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids_SB, padding_mask=None):
        h = self.embed(ids_SB)
        for router, experts in zip(self.routers, self.experts, strict=True):
            probs_TE, _ = router(h, padding_mask=padding_mask)
            x_TD = h.reshape(-1, D)
            out = sum(probs_TE[:, e : e + 1] * f(x_TD) for e, f in enumerate(experts))
            h = h + out.reshape(h.shape)
        return self.head(h)


def run_and_check(model, routers, tmp_path, truth, device="cpu", padding=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with moewatch.attach(model, tmp_path) as watch:
        for step in range(STEPS):
            ids = torch.randint(0, VOCAB, (SEQ, 2), device=device)
            pad = None
            if padding:
                pad = torch.zeros(SEQ, 2, dtype=torch.bool, device=device)
                pad[-3:, 1] = True  # padding marked True, as the router's own statistics read it
            for r in routers:
                if r.local_tokens_per_expert is not None:
                    r.local_tokens_per_expert.zero_()
            nn.functional.cross_entropy(model(ids, pad).flatten(0, 1), ids.flatten()).backward()
            opt.step()
            opt.zero_grad()
            for i, r in enumerate(routers):  # Megatron's own per-expert count of kept, non-padding tokens
                if r.local_tokens_per_expert is not None:
                    np.testing.assert_array_equal(truth.current[f"routers.{i}"].tokens_E,
                                                  r.local_tokens_per_expert.cpu().numpy().astype(np.int64))
            truth.cut(step)
            watch.step()
    return moewatch.load(tmp_path)


@pytest.mark.parametrize("capacity,score,bias,padding", [
    (None, "softmax", False, False), (0.5, "softmax", False, True), (None, "sigmoid", True, False)],
    ids=["dropless", "capacity-padding", "sigmoid-bias"])  # (Megatron 0.16 cannot combine its expert bias with padding)
def test_megatron_topk_router_on_cpu(tmp_path, monkeypatch, group, te_fallback, capacity, score, bias, padding):
    torch.manual_seed(0)
    routers = [make_router(group, capacity=capacity, score=score, bias=bias, monkeypatch=monkeypatch)
               for _ in range(2)]
    for r in routers:
        monkeypatch.setattr(r, "gating", cpu_gating(r))
    model = MegatronLM(routers).train()
    truth = StackTruth(E)
    names = {m: n for n, m in model.named_modules()}
    seen: dict[str, tuple] = {}

    inner_drop = megatron_router.apply_router_token_dropping

    def dropping(probs, routing_map, **kw):  # Megatron's own choice before and after token dropping
        out = inner_drop(probs, routing_map, **kw)
        seen["drop"] = (routing_map.clone(), out[1].clone())
        return out

    monkeypatch.setattr(megatron_router, "apply_router_token_dropping", dropping)

    def on_router(mod, args, kwargs, out):
        layer = names[mod]
        logits = mod.gating(args[0]).reshape(-1, E)
        real = None if kwargs.get("padding_mask") is None else ~kwargs["padding_mask"].reshape(-1)
        pre, post = seen.pop("drop") if capacity is not None else (out[1], out[1])
        keep = torch.ones(pre.shape[0], dtype=torch.bool) if real is None else real
        kept_E = post[keep].sum(0).numpy()
        dropped_E = (pre & ~post)[keep].sum(0).numpy()
        dist_TE = logits.softmax(-1) if score == "softmax" else torch.sigmoid(logits)
        truth.add(layer, kept_E=kept_E, dropped_E=dropped_E, dist_TE=dist_TE, logits_TE=logits, token_mask_T=real)

    for r in routers:
        r.register_forward_hook(on_router, with_kwargs=True)
    info = moewatch.inspect(model)
    assert [str(i) for i in info] == ["routers.0", "routers.1"]
    assert info[0].kind == "megatron" and (info[0].num_experts, info[0].top_k) == (E, K)
    assert ("drops" in info[0].measures) == (capacity is not None) and ("bias" in info[0].measures) == bias

    run = run_and_check(model, routers, tmp_path, truth, padding=padding)
    assert_run_matches(run, truth, tokens_per_step={s: 2 * SEQ - (3 if padding else 0) for s in range(STEPS)})
    assert_measures_recorded(info, run)
    assert all(i.no_grad_norm.startswith("the experts were not found") for i in info)  # said before training too
    if capacity is not None:
        assert run.layers.dropped.sum() > 0, "the test should make Megatron drop tokens"
    if bias:
        rows = run.experts[(run.experts.layer == "routers.0") & (run.experts.step == 0)].sort_values("expert")
        np.testing.assert_allclose(rows.bias.to_numpy(), routers[0].expert_bias.numpy(), rtol=1e-6)
    # This harness keeps its experts beside the routers, not in an MoE block with them (Megatron's MoELayer holds
    # `router` and `experts` together): the one thing capture cannot find is each router's expert weights, and it
    # says so, once per router.
    kinds = [p["kind"] for p in run.meta["problems"]]
    assert kinds == ["expert_params_not_found"] * len(routers), run.meta["problems"]


def test_megatron_reader_on_recorded_outputs(group, te_fallback):
    """The reader alone on one real router call: indices are the pre-drop choice, drops those missing after."""
    torch.manual_seed(1)
    router = make_router(group, capacity=0.5, score="softmax", bias=False)
    x = torch.randn(SEQ, 2, D)
    logits = cpu_gating(router)(x)
    pre_probs, pre_map = moe_utils.topk_routing_with_score_function(logits.reshape(-1, E), K)
    probs, post_map = router.routing(logits)
    r = MegatronRouterReader(E, K, "softmax")(router, (x,), {}, (probs, post_map))
    np.testing.assert_array_equal(bincount(r.indices_TK, E), pre_map.sum(0).numpy())
    kept = r.indices_TK[~r.dropped_TK]
    np.testing.assert_array_equal(bincount(kept, E), post_map.sum(0).numpy())
    assert r.dropped_TK.sum() == (pre_map & ~post_map).sum() > 0
    torch.testing.assert_close(r.logits_TE, logits.reshape(-1, E))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_megatron_topk_router_on_gpu(tmp_path, group, te_fallback):
    """The unmodified router on CUDA (its gating moves its weights there itself), capacity and padding."""
    torch.manual_seed(0)
    routers = [make_router(group, capacity=0.5, score="softmax", bias=False) for _ in range(2)]
    model = MegatronLM(routers).cuda().train()
    truth = StackTruth(E)
    names = {m: n for n, m in model.named_modules()}

    def on_router(mod, args, kwargs, out):
        logits = mod.gating(args[0]).reshape(-1, E).float()
        _, pre = moe_utils.topk_routing_with_score_function(logits, K)
        real = ~kwargs["padding_mask"].reshape(-1)
        post = out[1]
        truth.add(names[mod], kept_E=post[real].sum(0).cpu(), dropped_E=(pre & ~post)[real].sum(0).cpu(),
                  dist_TE=logits.softmax(-1), logits_TE=logits, token_mask_T=real)

    for r in routers:
        r.register_forward_hook(on_router, with_kwargs=True)
    run = run_and_check(model, routers, tmp_path, truth, device="cuda", padding=True)
    assert_run_matches(run, truth, rel=1e-4)
    assert run.layers.dropped.sum() > 0
