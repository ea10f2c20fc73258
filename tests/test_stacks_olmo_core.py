"""OLMo-core (3.x): its ``MoE`` (capacity-limited ``ParallelMLP``) and ``DroplessMoE`` layers, softmax and sigmoid
routers with the auxiliary-loss-free ``score_bias`` (updated by the router's own ``post_batch``), trained a few steps
on CPU. Its token-permutation ops are GPU-only Triton kernels, replaced by plain-torch equivalents
(`tests.olmo_cpu_ops`); the routers, expert MLPs and capacity logic are OLMo-core's own.

With capacity, the router's indices include assignments the experts never see: tokens must count only what reached
the experts and the rest must be drops. The expert modules are not routers (no phantom layers in run.json).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moewatch
from tests import olmo_cpu_ops
from tests.stack_import import import_stack
from tests.stack_truth import (
    StackTruth,
    assert_bias_matches,
    assert_measures_recorded,
    assert_run_matches,
    bincount,
)

import_stack("olmo_core.nn.moe", "OLMo-core")

from olmo_core.nn.moe import MoEConfig, MoERouterConfig, MoEType  # noqa: E402
from olmo_core.nn.moe.router import MoERouter, MoERouterGatingFunction  # noqa: E402

D, E, K, VOCAB, STEPS = 16, 8, 2, 64, 3


class OlmoLM(nn.Module):
    def __init__(self, capacity: float | None, gating: str, bias_gamma: float | None, layers: int = 2):
        super().__init__()
        cfg = MoEConfig(name=MoEType.default if capacity else MoEType.dropless, num_experts=E, hidden_size=16,
                        capacity_factor=capacity,
                        router=MoERouterConfig(top_k=K, gating_function=MoERouterGatingFunction(gating),
                                               bias_gamma=bias_gamma),
                        lb_loss_weight=None)
        self.embed = nn.Embedding(VOCAB, D)
        self.moes = nn.ModuleList(cfg.build(D) for _ in range(layers))
        for moe in self.moes:
            moe.router.weight.data.normal_(std=0.3)  # sharper routing, so capacity drops happen
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        h = self.embed(ids)
        for moe in self.moes:
            h = h + moe(h)
        return self.head(h)


@pytest.mark.parametrize("capacity,gating,bias_gamma", [(1.0, "softmax", None), (None, "softmax", None),
                                                        (None, "sigmoid", 0.01)],
                         ids=["capacity", "dropless", "dropless-sigmoid-bias"])
def test_olmo_core_moe_exact_counts_drops_and_distribution(tmp_path, monkeypatch, capacity, gating, bias_gamma):
    olmo_cpu_ops.install(monkeypatch)
    torch.manual_seed(0)
    model = OlmoLM(capacity, gating, bias_gamma).train()
    names = {m: n for n, m in model.named_modules()}
    truth = StackTruth(E)
    logits_seen: dict[str, torch.Tensor] = {}

    for name, m in model.named_modules():
        if isinstance(m, MoERouter):
            inner = m.get_expert_logits

            def recorded(x, _inner=inner, _name=name):  # the router's own logits, as it computes them
                out = _inner(x)
                logits_seen[_name] = out.detach().float()
                return out

            monkeypatch.setattr(m, "get_expert_logits", recorded)

            def on_router(mod, args, out):
                layer = names[mod]
                logits = logits_seen.pop(layer)
                scores = logits.softmax(-1) if gating == "softmax" else torch.sigmoid(logits) + 1e-7
                routed = out[2].long()  # batch_size_per_expert: OLMo-core's own histogram of the indices
                assert (routed.numpy() == bincount(out[1], E)).all()
                if capacity is None:
                    truth.add(layer, kept_E=routed, dist_TE=scores, logits_TE=logits)
                else:
                    truth.add(layer, dist_TE=scores, logits_TE=logits)
                    truth.current[layer].routed = routed

            m.register_forward_hook(on_router)
    if capacity is not None:
        for i, moe in enumerate(model.moes):
            def on_experts(mod, args, out, _layer=f"moes.{i}.router"):
                kept = olmo_cpu_ops.GATHERED.pop()  # what binned_gather handed the experts
                routed = truth.current[_layer].routed
                truth.add(_layer, kept_E=kept, dropped_E=routed - kept, call=False)

            moe.experts.register_forward_hook(on_experts)

    info = moewatch.inspect(model)
    assert [str(i) for i in info] == ["moes.0.router", "moes.1.router"] and not info.unrouted
    assert info[0].kind == "olmo_core" and ("drops" in info[0].measures) == (capacity is not None)

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    biases = {}
    with moewatch.attach(model, tmp_path) as watch:
        for step in range(STEPS):
            ids = torch.randint(0, VOCAB, (2, 16))
            nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
            opt.step()
            opt.zero_grad()
            for i, moe in enumerate(model.moes):
                moe.router.post_batch()  # OLMo-core's own bias update (a no-op without bias_gamma)
                if bias_gamma is not None:
                    biases[(step, f"moes.{i}.router")] = moe.router.score_bias.clone()
            truth.cut(step)
            watch.step()
    run = moewatch.load(tmp_path)
    assert [r["name"] for r in run.meta["routers"]] == ["moes.0.router", "moes.1.router"]  # no phantom experts
    assert_run_matches(run, truth, tokens_per_step={s: 32 for s in range(STEPS)})
    if capacity is not None:
        assert run.layers.dropped.sum() > 0, "the test should make OLMo-core drop assignments"
    else:
        assert run.layers.dropped.sum() == 0
    assert_bias_matches(run, biases)
    if biases:
        assert run.experts.bias.abs().max() > 0
    assert_measures_recorded(info, run)
    assert run.meta["problems"] == []
