"""torchtitan (0.3.x): its MoE layers built by its own config builders (Qwen3-style softmax, DeepSeek-V3-style sigmoid
with expert bias and group-limited routing), trained a few steps on CPU under `moewatch.attach`.

Its ``TokenChoiceTopKRouter`` returns post-activation scores, not logits: the distribution columns must come from
those scores and the logit columns from the router's ``gate`` Linear; the bias column from the MoE's
``expert_bias_E``; counts from the returned expert ids (cross-checked with torchtitan's own ``tokens_per_expert_E``).
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
    assert_bias_matches,
    assert_measures_recorded,
    assert_run_matches,
    bincount,
)

import_stack("torchtitan.models.common.moe", "torchtitan")

from torchtitan.models.common.config_utils import (  # noqa: E402
    make_moe_config,
    make_routed_experts_config,
    make_router_config,
)
from torchtitan.models.common.moe import TokenChoiceTopKRouter  # noqa: E402

DIM, E, K, VOCAB, STEPS = 16, 8, 2, 64, 3
INIT = {"weight": lambda p: nn.init.normal_(p, std=0.3), "bias": nn.init.zeros_}
EXPERT_INIT = {w: (lambda p: nn.init.normal_(p, std=0.02)) for w in ("w1_EFD", "w2_EDF", "w3_EFD")}


def moe_layer(score_func: str, groups: int | None):
    return make_moe_config(
        num_experts=E,
        router=make_router_config(dim=DIM, num_experts=E, gate_param_init=INIT, top_k=K, score_func=score_func,
                                  route_norm=True, num_expert_groups=groups, num_limited_groups=2 if groups else None),
        routed_experts=make_routed_experts_config(dim=DIM, hidden_dim=8, num_experts=E, top_k=K,
                                                  param_init=EXPERT_INIT, comm_backend="standard"),
        load_balance_coeff=1e-3,
    ).build()


class TitanLM(nn.Module):
    def __init__(self, score_func: str, groups: int | None, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(moe_layer(score_func, groups) for _ in range(layers))
        for moe in self.layers:
            moe.init_states()
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids):
        h = self.embed(ids)
        for moe in self.layers:
            h = h + moe(h)
        return self.head(h)


@pytest.mark.parametrize("score_func,groups", [("softmax", None), ("sigmoid", 4)], ids=["qwen3", "deepseek_v3"])
def test_torchtitan_moe_exact_counts_and_router_distribution(tmp_path, score_func, groups):
    torch.manual_seed(0)
    model = TitanLM(score_func, groups).train()
    names = {m: n for n, m in model.named_modules()}
    truth = StackTruth(E)
    gate_out: dict[str, torch.Tensor] = {}

    def on_gate(mod, args, out):
        gate_out[names[mod].rpartition(".")[0]] = out

    def on_router(mod, args, out):
        _, ids, scores = out
        layer = names[mod]
        truth.add(layer, kept_E=bincount(ids, E), dist_TE=scores, logits_TE=gate_out.pop(layer))

    for m in model.modules():
        if isinstance(m, TokenChoiceTopKRouter):
            m.register_forward_hook(on_router)
            m.gate.register_forward_hook(on_gate)

    info = moewatch.inspect(model)
    assert [str(i) for i in info] == ["layers.0.router", "layers.1.router"] and not info.unrouted
    assert all(i.kind == "torchtitan" and (i.num_experts, i.top_k) == (E, K) for i in info)
    # softmax with an expert bias: its ranking is not its logits' (no margin); sigmoid ranks scores + bias in 2 of 4
    # groups of 2 experts: 4 choosable > K
    assert info[0].measures == ("counts", "distribution", "logits", "bias", "gate_mass",
                                *(("margin",) if score_func == "sigmoid" else ()), "override", "grad_norm")

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    biases = {}
    with moewatch.attach(model, tmp_path) as watch:
        for step in range(STEPS):
            for moe in model.layers:  # stands in for torchtitan's load-balancing update
                moe.expert_bias_E.copy_(torch.randn(E) * 0.05 * step)
                moe.tokens_per_expert_E.zero_()
            ids = torch.randint(0, VOCAB, (2, 12))
            loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            for i, moe in enumerate(model.layers):
                biases[(step, f"layers.{i}.router")] = moe.expert_bias_E.clone()
                np.testing.assert_array_equal(truth.current[f"layers.{i}.router"].tokens_E,
                                              moe.tokens_per_expert_E.numpy().astype(np.int64))
            truth.cut(step)
            watch.step()
    run = moewatch.load(tmp_path)
    assert_run_matches(run, truth, tokens_per_step={s: 24 for s in range(STEPS)})
    assert_bias_matches(run, biases)
    assert_measures_recorded(info, run)
    assert run.meta["problems"] == []
