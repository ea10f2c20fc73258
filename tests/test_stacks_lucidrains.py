"""lucidrains' research MoE code: st-moe-pytorch (0.1.x) ``MoE`` with ``TopNGating``, and mixture-of-experts (0.2.x)
``MoE`` with ``Top2Gating``, trained a few steps on CPU with capacity small enough to drop tokens.

Both return GShard-style dispatch and combine tensors ``[b, n, E, C]``; their E and K are ``num_gates`` and
``top_n`` (or 2). Kept assignments come from the dispatch tensor; capacity drops of the first expert (always routed)
against a reference built from GShard's capacity rule per sequence; mixture-of-experts' deterministic ``"all"``
policy also drops second experts. The randomly routed further experts of st-moe and of the ``"random"`` policy are
not counted when not dispatched (they cannot be told from skips).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import moewatch
from tests.stack_import import import_stack
from tests.stack_truth import StackTruth, assert_measures_recorded, assert_run_matches

import_stack("st_moe_pytorch", "st-moe-pytorch")
import_stack("mixture_of_experts", "mixture-of-experts")

import mixture_of_experts  # noqa: E402
import st_moe_pytorch  # noqa: E402

D, E, VOCAB, SEQ, STEPS = 16, 4, 64, 16, 3
MIN_CAPACITY = 4  # both libraries' MIN_EXPERT_CAPACITY


def capacity(cf: float) -> int:
    return max(min(SEQ, int(SEQ * cf / E)), MIN_CAPACITY)


def gshard_drops(first_BN: torch.Tensor, second_BN: torch.Tensor | None, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-expert (routed, dropped) under GShard's rule: per sequence, each expert takes its first-choice tokens in
    order up to the capacity, then its second-choice tokens in the room left."""
    routed, dropped = np.zeros(E, np.int64), np.zeros(E, np.int64)
    for b in range(first_BN.shape[0]):
        c1 = np.bincount(first_BN[b].numpy(), minlength=E)
        kept1 = np.minimum(c1, cap)
        routed += c1
        dropped += c1 - kept1
        if second_BN is not None:
            c2 = np.bincount(second_BN[b].numpy(), minlength=E)
            routed += c2
            dropped += c2 - np.minimum(c2, cap - kept1)
    return routed, dropped


class LM(nn.Module):
    def __init__(self, make_moe, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.moes = nn.ModuleList(make_moe() for _ in range(layers))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids, **kw):
        h = self.embed(ids)
        aux = 0.0
        for moe in self.moes:
            out = moe(h, **kw)
            h, aux = h + out[0], aux + out[1]
        return self.head(h), aux


def train(model, tmp_path, truth, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with moewatch.attach(model, tmp_path) as watch:
        for step in range(STEPS):
            ids = torch.randint(0, VOCAB, (2, SEQ))
            logits, aux = model(ids, **kw)
            (nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()) + aux).backward()
            opt.step()
            opt.zero_grad()
            truth.cut(step)
            watch.step()
    return moewatch.load(tmp_path)


@pytest.mark.parametrize("noise", [False, True], ids=["plain", "noise_gates"])
def test_st_moe_top_n_gating(tmp_path, noise):
    torch.manual_seed(0)
    cf = 0.75
    model = LM(lambda: st_moe_pytorch.MoE(dim=D, num_experts=E, gating_top_n=2, capacity_factor_train=cf)).train()
    for moe in model.moes:
        nn.init.normal_(moe.gate.to_gates.weight, std=1.0)
    truth = StackTruth(E)
    names = {m: n for n, m in model.named_modules()}
    gate_logits = {}

    def on_to_gates(mod, args, out):
        gate_logits[names[mod].rpartition(".")[0]] = out.detach()

    def on_gate(mod, args, kwargs, out):
        layer = names[mod]
        logits = gate_logits.pop(layer)
        kept_E = (out[0] != 0).any(-1).sum((0, 1))
        if noise:
            truth.add(layer, kept_E=kept_E, dist_TE=logits.softmax(-1), logits_TE=logits)
            return
        routed, dropped = gshard_drops(logits.argmax(-1), None, capacity(cf))
        # kept first choices are min(routed, capacity); everything else kept is a randomly routed further expert
        truth.add(layer, kept_E=kept_E, dropped_E=dropped, dist_TE=logits.softmax(-1), logits_TE=logits)

    for moe in model.moes:
        moe.gate.to_gates.register_forward_hook(on_to_gates)
        moe.gate.register_forward_hook(on_gate, with_kwargs=True)
    info = moewatch.inspect(model)
    assert [str(i) for i in info] == ["moes.0.gate", "moes.1.gate"] and not info.unrouted
    assert info[0].kind == "st_moe" and (info[0].num_experts, info[0].top_k) == (E, 2)

    run = train(model, tmp_path, truth, noise_gates=noise)
    assert_run_matches(run, truth)
    assert_measures_recorded(info, run)
    if not noise:
        assert run.layers.dropped.sum() > 0, "the test should make st-moe drop first-choice tokens"
    assert run.meta["problems"] == []


@pytest.mark.parametrize("policy", ["all", "random"])
def test_mixture_of_experts_top2_gating(tmp_path, policy):
    torch.manual_seed(0)
    cf = 0.75
    model = LM(lambda: mixture_of_experts.MoE(dim=D, num_experts=E, capacity_factor_train=cf,
                                              second_policy_train=policy)).train()
    for moe in model.moes:
        nn.init.normal_(moe.gate.w_gating, std=1.0)
    truth = StackTruth(E)
    names = {m: n for n, m in model.named_modules()}

    def on_gate(mod, args, out):
        layer = names[mod]
        logits = (args[0].double() @ mod.w_gating.double())  # float64 reference from the gate's input and weight
        kept_E = (out[0] != 0).any(-1).sum((0, 1))
        top2 = logits.topk(2, dim=-1).indices
        _, dropped = gshard_drops(top2[..., 0], top2[..., 1] if policy == "all" else None, capacity(cf))
        truth.add(layer, kept_E=kept_E, dropped_E=dropped, dist_TE=logits.softmax(-1), logits_TE=logits)

    for moe in model.moes:
        moe.gate.register_forward_hook(on_gate)
    info = moewatch.inspect(model)
    assert [str(i) for i in info] == ["moes.0.gate", "moes.1.gate"] and not info.unrouted
    assert info[0].kind == "mixture_of_experts" and (info[0].num_experts, info[0].top_k) == (E, 2)
    assert [i.kind for i in moewatch.inspect(model, routers={"mine": model.moes[0].gate})] == ["mixture_of_experts"]  # by hand

    run = train(model, tmp_path, truth)
    assert_run_matches(run, truth)
    assert_measures_recorded(info, run)
    assert run.layers.dropped.sum() > 0
    if policy == "all":  # every token routes to two experts: tokens = slots / 2 = SEQ * batch
        assert (run.layers.tokens == 2 * SEQ).all()
    assert run.meta["problems"] == []
