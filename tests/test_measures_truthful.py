"""`moewatch.inspect`'s ``measures`` are true of what a run then records, router family by router family.

Each case builds a real tiny model on CPU, asks `inspect` what each router measures, trains two steps under
`moewatch.attach` (forward, backward, optimizer step, `watch.step()`), loads the run and checks, per router, that a
measure is listed iff its columns hold values: ``gate_mass`` (experts), ``margin`` (``margin_mean`` and
``near_tie_frac``), ``override`` (``override_frac``), ``grad_norm`` (experts), and ``distribution`` and ``logits``
(`tests.stack_truth.MEASURE_COLUMNS`). The lists are also pinned per case, so a change in what a family exposes is a
visible change here. Every transformers architecture is checked the same way, reader by reader, in
test_hf_models.py (`check_routing_signals`), and every training stack in its test_stacks_*.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import moewatch
from tests.stack_truth import assert_measures_recorded

BASE = ("counts", "distribution", "logits")


def train_and_check(model: nn.Module, loss_of, tmp_path, steps: int = 2) -> moewatch.capture.summary.Inspection:
    """Inspect `model`, train it `steps` steps under attach, and check every router's measures against the run."""
    info = moewatch.inspect(model)
    assert len(info) and not info.error
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # experts not found: inspect says it too (checked)
        with moewatch.attach(model, tmp_path) as watch:
            for _ in range(steps):
                loss_of().backward()
                opt.step()
                opt.zero_grad()
                watch.step()
    run = moewatch.load(tmp_path)
    assert_measures_recorded(info, run)
    # The run's manifest lists the same measures, grad_norm included (attach looks for the experts as inspect does).
    listed = {r["name"]: r["measures"] for r in run.meta["routers"]}
    assert listed == {str(i): list(i.measures) for i in info}
    assert {r["name"]: r.get("no_grad_norm") for r in run.meta["routers"]} == {str(i): i.no_grad_norm for i in info}
    return info


# ---------------------------------------------------------------------------------------------- the reference model


def reference_model(**kw) -> nn.Module:
    from moewatch.reference import MoEConfig, MoEGPT

    cfg = MoEConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, d_model=16, n_experts=4, top_k=2, d_expert=8,
                    **kw)
    torch.manual_seed(0)
    return MoEGPT(cfg).train()


@pytest.mark.parametrize("mode,config,expected", [
    ("plain", {}, ("gate_mass", "margin", "override", "grad_norm")),  # override 0 while the bias stays zero
    ("aux_free", dict(bias_update_rate=0.1, capacity_factor=1.0), ("gate_mass", "margin", "override", "grad_norm")),
    ("noisy_topk", dict(router_noise="noisy_topk"), ("gate_mass", "grad_norm")),  # it ranks noisy logits it keeps not
])
def test_reference_model(tmp_path, mode, config, expected):
    model = reference_model(**config)
    x = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))

    def loss():
        out = model(x).logits.square().mean()
        if mode == "aux_free":
            model.update_router_biases()
        return out

    info = train_and_check(model, loss, tmp_path)
    drops = ("drops",) if "capacity_factor" in config else ()
    assert info[0].measures == ("counts", *drops, "distribution", "logits", "bias", *expected)
    assert info[0].no_grad_norm is None and "fused" in info[0].expert_params


def test_reference_model_eval_mode_still_describes_training(tmp_path):
    """What is listed is what a training forward records, whatever mode the model is in when inspected."""
    model = reference_model(router_noise="noisy_topk").eval()
    assert "margin" not in moewatch.inspect(model)[0].measures and not model.training
    assert "margin" in moewatch.inspect(reference_model().eval())[0].measures


def test_frozen_experts_have_no_grad_norm(tmp_path):
    model = reference_model()
    for n, p in model.named_parameters():
        if n.endswith(("w_in_EDH", "w_out_EHD")):
            p.requires_grad_(False)
    x = torch.randint(0, 32, (2, 8))
    info = train_and_check(model, lambda: model(x).logits.square().mean(), tmp_path)
    assert "grad_norm" not in info[0].measures and "frozen" in info[0].no_grad_norm
    assert "no grad_norm: the experts' parameters (in blocks.0.moe) are frozen" in info[0].describe()


class RouterOnly(nn.Module):
    """A research-code router (a tuple of logits, probs, indices, drops) whose experts are not beside it."""

    def __init__(self):
        super().__init__()
        from tests.toy import ToyRouter

        self.router = ToyRouter(8, 4, 2)
        self.mix = nn.Linear(8, 8)

    def forward(self, x):
        _, probs, ids, _ = self.router(x)
        return self.mix(x) * probs.gather(-1, ids).sum(-1, keepdim=True)


def test_experts_not_found_say_why(tmp_path):
    model = RouterOnly()
    x = torch.randn(6, 8)
    info = train_and_check(model, lambda: model(x).square().mean(), tmp_path)
    assert info[0].measures == (*BASE, "bias") and info[0].expert_params is None
    assert info[0].no_grad_norm.startswith("the experts were not found: no experts found around router 'router'")
    assert "(no grad_norm: the experts were not found" in str(info)


# ---------------------------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("case_id,expected", [
    ("mixtral", ("gate_mass", "margin")),  # softmax top-k: margins in logit space, no correction bias
    ("deepseek_v3", ("bias", "gate_mass", "margin", "override")),  # sigmoid + bias in 2 of 4 groups of 2
    ("switch_transformers", ("drops",)),  # a capacity dispatch mask: no weights beside indices, no recipe
])
def test_transformers(tmp_path, case_id, expected):
    pytest.importorskip("transformers")
    from tests.hf_tiny import CASES, build, inputs

    case = next(c for c in CASES if c.id == case_id)
    model = build(case)
    kw = inputs(case)
    info = train_and_check(model, lambda: model(**kw)[0].float().square().mean(), tmp_path)
    drops = tuple(m for m in expected if m == "drops")
    rest = tuple(m for m in expected if m != "drops")
    assert {i.measures for i in info} == {("counts", *drops, "distribution", "logits", *rest, "grad_norm")}


# ---------------------------------------------------------------------------------------------- training stacks


@pytest.mark.parametrize("score_func,groups,bias,expected", [
    ("softmax", None, False, ("gate_mass", "margin")),  # no bias, no groups: it ranks its logits
    ("softmax", None, True, ("bias", "gate_mass", "override")),  # softmax + bias ranks neither logits nor scores
    ("sigmoid", 4, True, ("bias", "gate_mass", "margin", "override")),
], ids=["softmax", "softmax-bias", "sigmoid-groups-bias"])
def test_torchtitan(tmp_path, score_func, groups, bias, expected):
    from tests.test_stacks_torchtitan import VOCAB, TitanLM

    torch.manual_seed(0)
    model = TitanLM(score_func, groups).train()
    if not bias:
        for moe in model.layers:
            moe.expert_bias_E = None  # as torchtitan leaves it without load_balance_coeff
    x = torch.randint(0, VOCAB, (2, 12))
    info = train_and_check(model, lambda: model(x).square().mean(), tmp_path)
    assert {i.measures for i in info} == {(*BASE, *expected, "grad_norm")}


@pytest.mark.parametrize("grouped,expected", [
    (False, ("margin",)),  # LLaMAMoE.gate: its logits are what it ranks; its block rescales the weights after
    (True, ("bias", "gate_mass", "margin", "override")),
], ids=["gate", "grouped"])
def test_litgpt(tmp_path, grouped, expected):
    from tests.test_stacks_litgpt import VOCAB, tiny_gpt

    torch.manual_seed(0)
    model = tiny_gpt(grouped).train()
    x = torch.randint(0, VOCAB, (2, 12))
    info = train_and_check(model, lambda: model(x).square().mean(), tmp_path)
    assert {i.measures for i in info} == {(*BASE, *expected, "grad_norm")}
