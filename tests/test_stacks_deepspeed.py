"""DeepSpeed (0.19.x): ``deepspeed.moe.layer.MoE`` (top-1 with noisy routing, top-2 with a sampled second expert,
top-3), capacity-limited so tokens drop, trained a few steps on CPU (no ``deepspeed.initialize`` needed for one
process), and its ``TopKGate`` called directly for the dense dispatch-mask output.

The gate returns expert-first ``[K, S]`` indices with -1 for dropped routes, and ``exp_counts`` before capacity:
kept and dropped assignments per expert must be exact. Its logits are never returned: the reference captures the
tensor DeepSpeed's own gating function receives.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moewatch
from tests.stack_import import import_stack
from tests.stack_truth import StackTruth, assert_measures_recorded, assert_run_matches, bincount

import_stack("deepspeed.moe.layer", "DeepSpeed")

from deepspeed.moe import sharded_moe  # noqa: E402
from deepspeed.moe.layer import MoE  # noqa: E402

D, E, VOCAB, STEPS = 16, 4, 64, 3


class DSLM(nn.Module):
    def __init__(self, k: int, noisy: str | None, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.moes = nn.ModuleList(
            MoE(hidden_size=D, expert=nn.Sequential(nn.Linear(D, D), nn.ReLU()), num_experts=E, k=k,
                capacity_factor=1.0, min_capacity=1, noisy_gate_policy=noisy) for _ in range(layers))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        h = self.embed(ids)
        aux = 0.0
        for moe in self.moes:
            out, l_aux, _ = moe(h)
            h, aux = h + out, aux + l_aux
        return self.head(h), aux


@pytest.fixture
def captured_logits(monkeypatch):
    """The logits each DeepSpeed gating function receives (cloned: top-2 adds its Gumbel noise in place)."""
    seen: list[torch.Tensor] = []
    for fn in ("top1gating", "top2gating", "topkgating"):
        inner = getattr(sharded_moe, fn)

        def wrapped(logits, *a, _inner=inner, **kw):
            seen.append(logits.detach().clone())
            return _inner(logits, *a, **kw)

        monkeypatch.setattr(sharded_moe, fn, wrapped)
    return seen


@pytest.mark.parametrize("k,noisy", [(1, "RSample"), (2, None), (3, None), (1, "Jitter")],
                         ids=["top1-rsample", "top2", "top3", "top1-jitter"])
def test_deepspeed_moe_exact_counts_drops_and_distribution(tmp_path, captured_logits, k, noisy):
    torch.manual_seed(0)
    model = DSLM(k, noisy).train()
    truth = StackTruth(E)
    names = {m: n for n, m in model.named_modules()}
    jitter = noisy == "Jitter"

    def on_gate(mod, args, out):
        logits = captured_logits.pop()
        ids_KS, exp_counts = out[3], out[-1]
        kept = bincount(ids_KS, E)
        truth.add(names[mod], kept_E=kept, dropped_E=exp_counts.numpy() - kept,
                  dist_TE=None if jitter else logits.softmax(-1), logits_TE=None if jitter else logits)

    for m in model.modules():
        if isinstance(m, sharded_moe.TopKGate):
            m.register_forward_hook(on_gate)
    info = moewatch.inspect(model)
    assert [str(i) for i in info] == ["moes.0.deepspeed_moe.gate", "moes.1.deepspeed_moe.gate"] and not info.unrouted
    assert info[0].kind == "deepspeed" and (info[0].num_experts, info[0].top_k) == (E, k)
    assert [i.kind for i in moewatch.inspect(model, routers={"mine": model.moes[0].deepspeed_moe.gate})] == ["deepspeed"]  # by hand

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with moewatch.attach(model, tmp_path) as watch:
        for step in range(STEPS):
            ids = torch.randint(0, VOCAB, (2, 12))
            logits, aux = model(ids)
            (nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()) + 0.01 * aux).backward()
            opt.step()
            opt.zero_grad()
            truth.cut(step)
            watch.step()
    run = moewatch.load(tmp_path)
    assert_run_matches(run, truth, logits=not jitter, distribution=not jitter,
                       tokens_per_step={s: 24 for s in range(STEPS)})
    assert_measures_recorded(info, run)
    assert run.layers.dropped.sum() > 0, "the test should make DeepSpeed drop tokens"
    assert run.meta["problems"] == []


class DenseGateLM(nn.Module):
    """Calls the gate itself and uses its dense (combine_weights, dispatch_mask) output, as pre-0.18 MOELayer did."""

    def __init__(self, k: int):
        super().__init__()
        self.gate = sharded_moe.TopKGate(D, E, k=k, capacity_factor=1.0, min_capacity=1)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, x):
        x_SD = x.reshape(-1, D)
        _, combine_SEC, dispatch_SEC, _ = self.gate(x_SD)
        expert_in_ECD = torch.einsum("sec,sd->ecd", dispatch_SEC.float(), x_SD)
        out_ECD = torch.stack([f(expert_in_ECD[e]) for e, f in enumerate(self.experts)])
        return torch.einsum("sec,ecd->sd", combine_SEC, out_ECD)


@pytest.mark.parametrize("k", [1, 2])
def test_deepspeed_dense_dispatch_output(tmp_path, captured_logits, k):
    torch.manual_seed(1)
    model = DenseGateLM(k).train()
    truth = StackTruth(E)

    def on_gate(mod, args, out):
        logits = captured_logits.pop()
        kept = out[2].any(-1).sum(0)
        truth.add("gate", kept_E=kept, dropped_E=out[3] - kept, dist_TE=logits.softmax(-1), logits_TE=logits)

    model.gate.register_forward_hook(on_gate)
    with moewatch.attach(model, tmp_path) as watch:
        for step in range(2):
            model(torch.randn(3, 8, D)).square().mean().backward()
            truth.cut(step)
            watch.step()
    run = moewatch.load(tmp_path)
    assert_run_matches(run, truth, tokens_per_step={0: 24, 1: 24})
    assert run.layers.dropped.sum() > 0


class UsedTokenGate(nn.Module):
    """Calls a top-1 gate with DeepSpeed's ``used_token`` mask and sparse routes, as MOELayer does."""

    def __init__(self):
        super().__init__()
        self.gate = sharded_moe.TopKGate(D, E, k=1, capacity_factor=1.0, min_capacity=1)

    def forward(self, x_SD, used_S):
        out = self.gate(x_SD, used_S, True)
        return out[5].sum() + out[0]


def test_deepspeed_used_token_leaves_unused_tokens_out(tmp_path, captured_logits):
    torch.manual_seed(2)
    model = UsedTokenGate().train()
    truth = StackTruth(E)

    def on_gate(mod, args, out):
        logits, used = captured_logits.pop(), args[1].bool()
        kept = bincount(out[3], E)
        truth.add("gate", kept_E=kept, dropped_E=out[-1].numpy() - kept, dist_TE=logits.softmax(-1),
                  logits_TE=logits, token_mask_T=used)

    model.gate.register_forward_hook(on_gate)
    used = torch.ones(24)
    used[::3] = 0  # a third of the tokens are padding
    with moewatch.attach(model, tmp_path) as watch:
        for step in range(2):
            model(torch.randn(24, D), used).backward()
            truth.cut(step)
            watch.step()
    run = moewatch.load(tmp_path)
    assert_run_matches(run, truth, tokens_per_step={0: 16, 1: 16})
