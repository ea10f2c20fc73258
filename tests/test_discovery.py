"""Router discovery on hand-written MoE modules: the moewatch router protocol, classic blocks, explicit routers,
the no-router error, and the readers' handling of each output shape. transformers models: test_hf_models.py."""

from __future__ import annotations

import subprocess
import sys
from typing import NamedTuple

import pytest
import torch
from torch import nn

import moewatch
from moewatch.capture.discovery import NoRouterFoundError, discover
from moewatch.capture.readers import RouterReader, dispatch_choice
from moewatch.capture.types import Probe, RouterSpec, Routing

D, E, K, T = 8, 4, 2, 12


# ---------------------------------------------------------------------------------------------- tiny modules


class ProtocolOut(NamedTuple):
    logits: torch.Tensor
    probs: torch.Tensor
    indices: torch.Tensor
    dropped: torch.Tensor


class ProtocolRouter(nn.Module):
    """moewatch router protocol. Picks the *bottom*-k experts, so a top-k recomputed on the logits would differ."""

    def __init__(self):
        super().__init__()
        self.num_experts, self.top_k = E, K
        self.proj = nn.Linear(D, E, bias=False)
        self.register_buffer("e_score_correction_bias", torch.arange(E, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor) -> ProtocolOut:
        logits_TE = self.proj(x_TD)
        ids_TK = torch.topk(-logits_TE, K, dim=-1).indices
        dropped_TK = torch.zeros_like(ids_TK, dtype=torch.bool)
        dropped_TK[: T // 3, 0] = True  # a fixed pattern of capacity refusals
        return ProtocolOut(logits_TE, logits_TE.softmax(-1), ids_TK, dropped_TK)


class ProtocolBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = ProtocolRouter()
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))
        self.top_k = K  # a block-level top_k must not make the block a router too

    def forward(self, x):
        out = self.router(x)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            y = y + expert(x) * (out.indices == e).any(-1, keepdim=True)
        return x + y


class ClassicBlock(nn.Module):
    """transformers 4.x / research-code style: a gate Linear and a ModuleList of experts in one block."""

    def __init__(self, gate_name: str = "gate", k_attr: str = "top_k"):
        super().__init__()
        setattr(self, gate_name, nn.Linear(D, E, bias=False))
        self.gate_name = gate_name
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))
        setattr(self, k_attr, K)

    def forward(self, x):
        logits = getattr(self, self.gate_name)(x)
        w, ids = torch.topk(logits.softmax(-1), K, dim=-1)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            y = y + expert(x) * (w * (ids == e)).sum(-1, keepdim=True)
        return x + y


class Stack(nn.Module):
    def __init__(self, *blocks: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def observe(specs, model, x) -> dict[str, list[Routing]]:
    """Run `model(x)` with every probe hooked; the Routings each spec's probes produced, in call order."""
    seen: dict[str, list[Routing]] = {s.name: [] for s in specs}
    handles = []
    for s in specs:
        for p in s.probes:
            def hook(m, a, kw, o, p=p, s=s):
                r = p.read(m, a, kw, o)
                if r is not None:
                    seen[s.name].append(r)

            handles.append(p.module.register_forward_hook(hook, with_kwargs=True))
    model(x)
    for h in handles:
        h.remove()
    return seen


def x_TD(seed: int = 0) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- protocol routers


def test_protocol_router_is_found_and_read_as_returned():
    torch.manual_seed(0)
    model = Stack(ProtocolBlock(), ProtocolBlock())
    specs = discover(model)
    assert [s.name for s in specs] == ["blocks.0.router", "blocks.1.router"]
    assert all((s.num_experts, s.top_k, s.kind) == (E, K, "moewatch") for s in specs)
    assert torch.equal(specs[0].bias(), torch.arange(E, dtype=torch.float32))

    x = x_TD()
    seen = observe(specs, model, x)
    (r,) = seen["blocks.0.router"]
    out = model.blocks[0].router(x)
    assert torch.equal(r.indices_TK, out.indices)  # the router's choice (bottom-k), not a top-k of the logits
    assert not torch.equal(r.indices_TK.sort(-1).values, torch.topk(out.logits, K).indices.sort(-1).values)
    assert torch.equal(r.dropped_TK, out.dropped) and int(r.dropped_TK.sum()) == T // 3
    assert torch.equal(r.logits_TE, out.logits) and torch.equal(r.probs_TE, out.probs)


def test_bias_getter_sees_later_updates():
    model = Stack(ProtocolBlock())
    (spec,) = discover(model)
    model.blocks[0].router.e_score_correction_bias.add_(1.0)
    assert spec.bias().tolist() == [1.0, 2.0, 3.0, 4.0]


def test_tuple_router_with_bool_drops():
    """A duck-typed router returning (logits, probs, indices, dropped) as a plain tuple (research code)."""

    class TupleRouter(ProtocolRouter):
        def forward(self, x_TD):
            out = super().forward(x_TD)
            return out.logits, out.probs, out.indices, out.dropped

    router = TupleRouter()
    parent = nn.Module()
    parent.router = router
    (spec,) = discover(parent)
    assert spec.kind == "router"
    seen = observe([spec], router, x_TD())
    (r,) = seen["router"]
    assert r.indices_TK.shape == (T, K) and int(r.dropped_TK.sum()) == T // 3 and r.logits_TE.shape == (T, E)


def test_readers_accept_eval_and_no_grad_calls():
    model = Stack(ProtocolBlock()).eval()
    specs = discover(model)
    with torch.no_grad():
        seen = observe(specs, model, x_TD())
    assert len(seen["blocks.0.router"]) == 1


# ---------------------------------------------------------------------------------------------- classic blocks


@pytest.mark.parametrize("gate_name, k_attr", [("gate", "top_k"), ("router", "k"), ("wg", "num_experts_per_tok")])
def test_classic_block(gate_name: str, k_attr: str):
    torch.manual_seed(0)
    model = Stack(ClassicBlock(gate_name, k_attr), ClassicBlock(gate_name, k_attr))
    specs = discover(model)
    assert [s.name for s in specs] == [f"blocks.0.{gate_name}", f"blocks.1.{gate_name}"]
    assert all((s.num_experts, s.top_k, s.kind) == (E, K, "classic") for s in specs)
    x = x_TD()
    seen = observe(specs, model, x)
    (r,) = seen[f"blocks.0.{gate_name}"]
    logits = getattr(model.blocks[0], gate_name)(x)
    assert torch.equal(r.logits_TE, logits)
    # The block's own choice (top-k of its softmax) is what a classic reader can only recompute.
    assert torch.equal(r.indices_TK.sort(-1).values, torch.topk(logits.softmax(-1), K).indices.sort(-1).values)


def test_classic_gate_needs_experts_and_top_k():
    no_experts = nn.Module()
    no_experts.gate = nn.Linear(D, E)
    no_experts.top_k = K
    no_k = nn.Module()
    no_k.gate = nn.Linear(D, E)
    no_k.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))
    for block in (no_experts, no_k):
        with pytest.raises(NoRouterFoundError):
            discover(Stack(block))


def test_router_inside_block_is_found_once():
    """A protocol router whose block also carries a `gate`-named Linear elsewhere is not double counted."""
    block = ProtocolBlock()
    block.router.gate = nn.Linear(D, E)  # a Linear named gate inside the router: part of the router
    specs = discover(Stack(block))
    assert [s.name for s in specs] == ["blocks.0.router"]


def test_shared_expert_gate_is_not_a_router():
    block = ClassicBlock()
    block.shared_expert_gate = nn.Linear(D, 1)
    block.shared_experts = nn.Linear(D, D)
    specs = discover(Stack(block))
    assert [s.name for s in specs] == ["blocks.0.gate"]


# ---------------------------------------------------------------------------------------------- explicit routers


def test_explicit_module_replaces_discovery():
    model = Stack(ClassicBlock(), ProtocolBlock())
    specs = discover(model, routers={"blocks.0.gate": model.blocks[0].gate})
    assert [(s.name, s.num_experts, s.top_k, s.kind) for s in specs] == [("blocks.0.gate", E, K, "custom")]
    seen = observe(specs, model, x_TD())
    (r,) = seen["blocks.0.gate"]
    assert r.logits_TE.shape == (T, E) and r.indices_TK.shape == (T, K)


def test_explicit_router_spec_and_empty_mapping():
    model = Stack(ProtocolBlock())
    spec = RouterSpec(name="mine", num_experts=E, top_k=K,
                      probes=[Probe(model.blocks[0].router, lambda m, a, kw, o: Routing(indices_TK=o.indices))])
    (got,) = discover(model, routers={"mine": spec})
    assert got is spec
    (renamed,) = discover(model, routers={"blocks.0.router": spec})
    assert renamed.name == "blocks.0.router" and renamed.probes == spec.probes
    assert discover(model, routers={}) == []


def test_explicit_router_without_inferable_top_k_names_it():
    model = nn.Sequential(nn.Linear(D, E))
    with pytest.raises(ValueError, match=r"'my\.router'.*top_k"):
        discover(model, routers={"my.router": model[0]})
    with pytest.raises(TypeError, match="my.router"):
        discover(model, routers={"my.router": "not a module"})  # type: ignore[dict-item]


def test_explicit_routers_through_attach(tmp_path):
    model = Stack(ClassicBlock(), ClassicBlock())
    watch = moewatch.attach(model, tmp_path / "run", routers={"blocks.1.gate": model.blocks[1].gate})
    assert watch.routers == ["blocks.1.gate"]
    model(x_TD())
    watch.close()
    rows = moewatch.load(tmp_path / "run").experts
    assert set(rows.layer) == {"blocks.1.gate"} and int(rows.tokens.sum()) == T * K


# ---------------------------------------------------------------------------------------------- errors


def test_no_router_error_says_what_was_searched_and_how_to_register():
    with pytest.raises(NoRouterFoundError) as err:
        discover(nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D)))
    msg = str(err.value)
    for needle in ("'gate'", "'router'", "'wg'", "experts", "top_k", "num_experts", "logits", "indices",
                   "_can_record_outputs", "routers={", "watch.record("):
        assert needle in msg, needle
    assert isinstance(err.value, RuntimeError)


def test_import_moewatch_does_not_import_transformers():
    code = "import sys, moewatch, moewatch.capture.discovery; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------- readers


def test_dispatch_choice_switch_style():
    logits_TE = torch.tensor([[3.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 5.0, 0, 0], [1.0, 0, 0, 0]])
    mask_TE = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])  # capacity 2 for expert 0
    ids_TK, dropped_TK = dispatch_choice(mask_TE, logits_TE, 1)
    assert ids_TK.flatten().tolist() == [0, 0, 1, 0]
    assert dropped_TK.flatten().tolist() == [False, False, False, True]


def test_dispatch_choice_top2_with_combine_weights():
    logits_TE = torch.tensor([[3.0, 2.0, 0, 0], [3.0, 2.0, 0, 0]])
    top1_TE = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]])  # token 1 lost its first choice
    combine_TE = torch.tensor([[0.6, 0.4, 0, 0], [0, 0.4, 0, 0]])
    ids_TK, dropped_TK = dispatch_choice(top1_TE, logits_TE, 2, combine_TE)
    assert ids_TK.tolist() == [[0, 1], [0, 1]]
    assert dropped_TK.tolist() == [[False, False], [True, False]]


def test_router_reader_bare_logits_and_sentinel_indices():
    reader = RouterReader(E, K)
    logits = torch.randn(2, 3, E)
    r = reader(nn.Identity(), (), {}, logits)
    assert reader.has_choice is False and r.logits_TE.shape == (6, E) and r.indices_TK.shape == (6, K)
    ids = torch.full((6, K), E)  # transformers' index-equals-E sentinel passes through untouched
    r = reader(nn.Identity(), (), {}, (logits, torch.ones(6, K), ids))
    assert reader.has_choice is True and torch.equal(r.indices_TK, ids)


def test_router_reader_probabilities_by_return_name():
    r = RouterReader(E, K, names=("router_probabilities", "top_k_weights", "top_k_index"))(
        nn.Identity(), (), {}, (torch.softmax(torch.randn(5, E), -1), torch.rand(5, K), torch.zeros(5, K, dtype=int)))
    assert r.logits_TE is None and r.probs_TE is not None
