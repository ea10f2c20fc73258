"""Never silent: what `attach` says it found, `moewatch.inspect`, and the warnings (each also in run.json under
``problems``) for MoE blocks holding no router found, routers that record nothing in their first training steps,
outputs a reader cannot parse and failing hooks. Plain PyTorch modules; no training stack needed."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import moewatch
from moewatch.capture.discovery import NoRouterFoundError
from tests.toy import ToyMoE

D, E = 8, 4


class OpaqueMoE(nn.Module):
    """An MoE block whose router hides behind a fused projection: nothing here is a recognisable router."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, E)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, x):
        w = self.proj(x).softmax(-1)
        return sum(w[..., e : e + 1] * f(x) for e, f in enumerate(self.experts))


class Mixed(nn.Module):
    """A readable toy MoE followed by an opaque MoE block."""

    def __init__(self):
        super().__init__()
        self.toy = ToyMoE(d=D, num_experts=E, top_k=2, layers=1)
        self.opaque = OpaqueMoE()

    def forward(self, x):
        return self.opaque(self.toy(x))


def train(model, watch, steps: int, x=None, params=None) -> None:
    opt = torch.optim.SGD(model.parameters() if params is None else params, lr=1e-3)
    for _ in range(steps):
        model(torch.randn(2, 6, D) if x is None else x).sum().backward()
        opt.step()
        opt.zero_grad()
        watch.step()


def test_attach_logs_what_it_found_and_routers_describe_themselves(tmp_path, caplog):
    model = ToyMoE(d=D, num_experts=E, top_k=2, layers=2)
    with caplog.at_level(logging.INFO, logger="moewatch"):
        watch = moewatch.attach(model, tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "moewatch"]
    assert len(lines) == 1
    assert lines[0].startswith("moewatch: 2 routers in ToyMoE (router x2: E=4 K=2; counts, distribution, logits")
    assert str(tmp_path) in lines[0]
    assert watch.routers == ["blocks.0.router", "blocks.1.router"]  # still the names
    info = watch.routers[0]
    assert (info.kind, info.num_experts, info.top_k) == ("router", E, 2)
    assert info.measures == ("counts", "distribution", "logits", "bias", "grad_norm")
    assert info.expert_params is not None and info.no_grad_norm is None
    watch.close()
    run = moewatch.load(tmp_path)
    assert run.meta["routers"][0]["measures"] == ["counts", "distribution", "logits", "bias", "grad_norm"]
    assert run.meta["problems"] == []


def test_inspect_lists_routers_and_blocks_without_one():
    found = moewatch.inspect(Mixed())
    assert found == ["toy.blocks.0.router"] and found.unrouted == ["opaque"]
    text = str(found)
    assert "toy.blocks.0.router  router  E=4 K=2" in text and "opaque" in text
    nothing = moewatch.inspect(OpaqueMoE())
    assert nothing == [] and "found no MoE router" in nothing.error
    with pytest.raises(NoRouterFoundError, match=r"`proj`|look like MoE blocks"):
        moewatch.attach(nn.Sequential(OpaqueMoE()), "unused-run-dir")


def test_moe_block_without_router_warns_at_attach_and_is_recorded(tmp_path):
    model = Mixed()
    with pytest.warns(RuntimeWarning, match=r"look like MoE blocks but hold no router.*'opaque' \(OpaqueMoE\)"):
        watch = moewatch.attach(model, tmp_path)
    train(model, watch, 2)
    watch.close()
    problems = moewatch.load(tmp_path).meta["problems"]
    assert [(p["kind"], p["router"], p["modules"]) for p in problems] == [("unrouted_moe", None, ["opaque"])]
    assert "routers=" in problems[0]["message"]


class SometimesRouted(nn.Module):
    """Two toy blocks; the second is skipped in training (a router that never records)."""

    def __init__(self):
        super().__init__()
        self.toy = ToyMoE(d=D, num_experts=E, top_k=2, layers=2)

    def forward(self, x):
        return self.toy.blocks[0](x)


def test_router_silent_in_first_steps_warns_once_during_training(tmp_path):
    model = SometimesRouted()
    watch = moewatch.attach(model, tmp_path, silent_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, watch, 2)
        assert not caught
        train(model, watch, 1)
        assert len(caught) == 1
        message = str(caught[0].message)
        assert "'toy.blocks.1.router'" in message and "first 3 training steps" in message
        assert "routers=" in message and "watch.record" in message
        train(model, watch, 3)
        assert len(caught) == 1  # once
    # The problem is in run.json while training goes on, not only at close.
    live = moewatch.load(tmp_path).meta["problems"]
    assert [(p["kind"], p["router"]) for p in live] == [("silent_router", "toy.blocks.1.router")]
    watch.close()


def test_eval_forwards_do_not_count_as_training_steps(tmp_path):
    model = SometimesRouted()
    watch = moewatch.attach(model, tmp_path, silent_steps=1)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(torch.randn(2, 6, D))
        watch.step()
    watch.close()
    assert moewatch.load(tmp_path).meta["problems"] == []


class DictRouter(nn.Module):
    """Looks like a router (num_experts, top_k) but returns a dict moewatch cannot read."""

    def __init__(self):
        super().__init__()
        self.num_experts, self.top_k = E, 2
        self.proj = nn.Linear(D, E)

    def forward(self, x):
        return {"scores": self.proj(x)}


class DictBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = DictRouter()
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, x):
        w = self.router(x)["scores"].softmax(-1)
        return sum(w[..., e : e + 1] * f(x) for e, f in enumerate(self.experts))


def test_unreadable_output_warns_once_and_keeps_training(tmp_path):
    model = DictBlock()
    watch = moewatch.attach(model, tmp_path, silent_steps=0)
    with pytest.warns(RuntimeWarning, match=r"cannot read the routing of router 'router' \(DictRouter.*got|dict"):
        train(model, watch, 1)
    assert [p["kind"] for p in moewatch.load(tmp_path).meta["problems"]] == ["unreadable_output"]  # already on disk
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, watch, 2)
    watch.close()
    problems = moewatch.load(tmp_path).meta["problems"]
    assert [(p["kind"], p["router"]) for p in problems] == [("unreadable_output", "router")]


def test_failing_hook_is_recorded_as_a_problem(tmp_path):
    model = ToyMoE(d=D, num_experts=E, top_k=2, layers=1)
    watch = moewatch.attach(model, tmp_path)
    state = watch._layers["blocks.0.router"]
    spec_reader = state.spec.probes[0]

    def broken(*args):
        raise RuntimeError("boom")

    object.__setattr__(spec_reader, "read", broken)
    with pytest.warns(RuntimeWarning, match="stopped recording router 'blocks.0.router'.*boom"):
        train(model, watch, 1)
    watch.close()
    problems = moewatch.load(tmp_path).meta["problems"]
    assert [(p["kind"], p["router"]) for p in problems] == [("hook_error", "blocks.0.router")]


class ResearchGate(nn.Module):
    """Research-code spellings: ``num_gates`` experts and ``top_n`` per token; returns (logits, indices)."""

    def __init__(self):
        super().__init__()
        self.num_gates, self.top_n = E, 2
        self.w = nn.Linear(D, E)

    def forward(self, x):
        logits = self.w(x)
        return logits, logits.topk(self.top_n, dim=-1).indices


def test_hand_registration_accepts_research_spellings(tmp_path):
    gate = ResearchGate()
    model = nn.Sequential(gate)
    found = moewatch.inspect(model, routers={"gate": gate})
    assert found == ["gate"] and (found[0].num_experts, found[0].top_k) == (E, 2)
    with moewatch.attach(model, tmp_path, routers={"gate": gate}) as watch:
        train(lambda x: model(x)[0], watch, 2, params=model.parameters())
    run = moewatch.load(tmp_path)
    assert run.layers.tokens.tolist() == [12, 12]
