"""Per-expert gradient norms of Megatron-Core's experts (0.16.x) against float64 references taken by hand.

Real ``MoELayer``s (router, allgather token dispatcher, experts, shared experts) are built tiny on CPU and trained a
few steps: forward through Megatron's own code, a real backward and ``optimizer.step()``. The references never go
through `ExpertParams`: they read each expert's gradients from the layer's own structure, sliced as Megatron's
forward slices its weights. Layouts:

- ``SequentialMLP``: the real class; expert e is ``local_experts[e]`` (``linear_fc1``, ``linear_fc2``).
- ``GroupedMLP`` (legacy grouped GEMM): the real class, its real ``__init__`` and ``forward``. It needs the
  ``grouped_gemm`` package (a CUDA kernel), which is not installed: the test lifts its import assert and stands in
  ``grouped_gemm.ops.gmm`` with that kernel's documented semantics in plain torch (per group g, the next
  ``batch_sizes[g]`` rows of ``a`` times ``b[g]``); its forward asserts ``config.bf16``, set as a flag only (the
  parameters stay float32); its activation is not compiled (``jit_fuser`` is Megatron's ``noop_decorator``). Expert e is ``weight1.view(E, H, -1)[e]`` and ``weight2.view(E, -1, H)[e]``, as its
  forward views them; H is chosen not divisible by E, so neither dim-0 rows nor dim-1 columns would do.
- ``TEGroupedMLP``: the real class and its real forward, but Transformer Engine is not installed, so its
  ``linear_fc1``/``linear_fc2`` are a stand-in for TE's ``GroupedLinear`` that imitates only its parameter names and
  shapes (``weight{i}`` ``[out, in]``, ``bias{i}`` ``[out]``, one per local expert) and the call ``TEGroupedMLP``
  makes (``forward(x, m_splits)``, the fc2 bias handed back per expert); expert e is ``weight{e}``/``bias{e}`` of
  both; fc1's ``weight{i}`` is ``[2F, H]`` with 2F = E, which the fused rule must not split. With biases (``te_grouped_bias``) Megatron builds no shared experts (they take no bias).

Shared experts are built beside the routed ones (all but ``te_grouped_bias``) and must be left out. Expert parallelism (a stand-in EP group of
size 2, rank 1: the layer holds global experts 4..7) and expert tensor parallelism (a stand-in expert-TP group of
size 2) are not read, with their reasons. The CPU shims are those of tests/test_stacks_megatron.py: a one-process
gloo group, ``torch.cuda.current_device`` pointed at the CPU while building, the router's ``gating`` minus its move
to CUDA, and ``te_general_gemm`` defined as None.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moewatch
from tests.stack_import import import_stack
from tests.stack_truth import one_process_group

import_stack("megatron.core.transformer.moe.experts", "Megatron-Core")

from megatron.core.jit import noop_decorator  # noqa: E402
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec  # noqa: E402
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.transformer.mlp import MLPSubmodules  # noqa: E402
from megatron.core.transformer.moe import experts as megatron_experts  # noqa: E402
from megatron.core.transformer.moe import grouped_gemm_util, moe_utils  # noqa: E402
from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP, TEGroupedMLP  # noqa: E402
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec, build_module  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from moewatch.capture.discovery import discover  # noqa: E402
from moewatch.capture.grads import GradTracker, find_expert_params  # noqa: E402

H, E, K, FFN, VOCAB, SEQ, BATCH, LAYERS, STEPS = 12, 8, 2, 4, 64, 16, 4, 2, 2
RTOL = 2e-5  # float32 squares summed on the device vs float64
LAYOUTS = ("sequential", "grouped", "te_grouped")


@pytest.fixture(scope="module")
def group():
    """A one-process gloo group (Megatron's modules take their process groups explicitly)."""
    with one_process_group() as g:
        yield g


@pytest.fixture
def cpu_megatron(monkeypatch):
    """Megatron on CPU: plain-torch router gating, `grouped_gemm`'s kernel stood in by its semantics, and
    GroupedMLP's activation not compiled (Megatron's own `disable_jit_fuser` choice; torch.compile takes seconds)."""
    if getattr(moe_utils, "te_general_gemm", None) is None:
        monkeypatch.setattr(moe_utils, "te_general_gemm", None, raising=False)
    monkeypatch.setattr(megatron_experts, "jit_fuser", noop_decorator)
    monkeypatch.setattr(grouped_gemm_util, "assert_grouped_gemm_is_available", lambda: None)
    monkeypatch.setattr(grouped_gemm_util, "ops", types.SimpleNamespace(gmm=gmm))
    return monkeypatch


def gmm(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
    """``grouped_gemm.ops.gmm``: group g's rows of `a` (``batch_sizes[g]`` of them, in order) times ``b[g]``."""
    rows = torch.split(a, batch_sizes.tolist())
    return torch.cat([x @ (w.t() if trans_b else w) for x, w in zip(rows, b, strict=True)])


class GroupedLinear(nn.Module):
    """Stand-in for Transformer Engine's ``GroupedLinear`` as Megatron's ``TEGroupedLinear`` wraps it: only its
    parameter names and shapes (``weight{i}`` ``[out, in]``, ``bias{i}`` ``[out]``) and the call TEGroupedMLP makes."""

    def __init__(self, num_gemms: int, input_size: int, output_size: int, *, config, init_method, bias: bool,
                 skip_bias_add: bool, is_expert: bool = False, tp_comm_buffer_name=None, pg_collection=None):
        super().__init__()
        self.num_gemms, self.use_bias, self.return_bias = num_gemms, bias, bias and skip_bias_add
        for i in range(num_gemms):
            self.register_parameter(f"weight{i}", nn.Parameter(torch.empty(output_size, input_size)))
            init_method(getattr(self, f"weight{i}"))
            if bias:
                self.register_parameter(f"bias{i}", nn.Parameter(torch.randn(output_size) * 0.1))

    def forward(self, x: torch.Tensor, m_splits: list[int]):
        biases = [getattr(self, f"bias{i}") if self.use_bias else None for i in range(self.num_gemms)]
        outs = []
        for i, xi in enumerate(torch.split(x, m_splits)):
            y = xi @ getattr(self, f"weight{i}").t()
            outs.append(y + biases[i] if self.use_bias and not self.return_bias else y)
        return torch.cat(outs), (biases if self.return_bias else None)


class StandInGroup:
    """A process group object that only reports a size and rank (Megatron asks nothing else while building)."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def make_layer(g, monkeypatch, layout: str, *, ep=None, expt_tp=None) -> MoELayer:
    """A real MoELayer with `layout`'s experts and shared experts."""
    grouped, te, bias = layout == "grouped", layout.startswith("te_grouped"), layout.endswith("_bias")
    cfg = TransformerConfig(  # Megatron's shared experts take no bias: the layout with biases has none
        num_layers=1, hidden_size=H, num_attention_heads=4, num_moe_experts=E, moe_router_topk=K,
        moe_ffn_hidden_size=FFN, ffn_hidden_size=FFN, moe_shared_expert_intermediate_size=None if bias else FFN,
        moe_token_dispatcher_type="allgather", moe_aux_loss_coeff=0.0, moe_router_dtype="fp32",
        use_cpu_initialization=True, init_method_std=0.3, add_bias_linear=bias, bias_dropout_fusion=False,
        gated_linear_unit=layout != "sequential", activation_func=F.silu, bf16=grouped, moe_grouped_gemm=grouped,
        expert_model_parallel_size=1 if ep is None else ep.size(),
        expert_tensor_parallel_size=1 if expt_tp is None else expt_tp.size())
    pgc = ProcessGroupCollection(tp=g, cp=g, tp_cp=g, tp_dp_cp=g, pp=g, dp=g, dp_cp=g, tp_ep=g, expt_dp=g,
                                 ep=g if ep is None else ep, expt_tp=g if expt_tp is None else expt_tp)
    spec = get_moe_module_spec(use_te=False, num_experts=E, moe_grouped_gemm=grouped,
                               moe_use_legacy_grouped_gemm=grouped)
    if te:  # TEGroupedMLP with stand-in TE GroupedLinears
        spec.submodules = MoESubmodules(
            experts=ModuleSpec(module=TEGroupedMLP, submodules=MLPSubmodules(linear_fc1=GroupedLinear,
                                                                             linear_fc2=GroupedLinear)),
            shared_experts=spec.submodules.shared_experts)
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "current_device", lambda: "cpu")
        layer = build_module(spec, config=cfg, pg_collection=pgc)
    router = layer.router
    monkeypatch.setattr(router, "gating", lambda x: moe_utils.router_gating_linear(x, router.weight, router.bias,
                                                                                   torch.float32))
    return layer


class Block(nn.Module):
    def __init__(self, mlp: MoELayer) -> None:
        super().__init__()
        self.mlp = mlp


class MegatronMoE(nn.Module):
    """Embeddings, Megatron MoE layers (residual) and a head, in Megatron's [sequence, batch, hidden] layout."""

    def __init__(self, layers: list[MoELayer]) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, H)
        self.layers = nn.ModuleList(Block(m) for m in layers)
        self.head = nn.Linear(H, VOCAB)

    def forward(self, ids_SB: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids_SB)
        for block in self.layers:
            out, _ = block.mlp(h)
            h = h + out
        return self.head(h)


def make_model(g, monkeypatch, layout: str) -> MegatronMoE:
    torch.manual_seed(0)
    model = MegatronMoE([make_layer(g, monkeypatch, layout) for _ in range(LAYERS)]).train()
    kind = {"sequential": SequentialMLP, "grouped": GroupedMLP}.get(layout, TEGroupedMLP)
    assert all(type(b.mlp.experts) is kind for b in model.layers)
    return model


def loss_of(model: MegatronMoE, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (SEQ, BATCH), generator=g)
    return F.cross_entropy(model(ids).flatten(0, 1), torch.roll(ids, -1, 0).flatten())


def sq(*tensors: torch.Tensor | None) -> torch.Tensor:
    """float64 sum of squares (None counts 0)."""
    return sum((t.double().square().sum() for t in tensors if t is not None), torch.zeros((), dtype=torch.float64))


def expert_tensors(experts: nn.Module, layout: str, e: int, grad: bool) -> list[torch.Tensor | None]:
    """Expert e's tensors (grads or values) as Megatron's forward slices them, from the module's own structure."""
    def get(p: nn.Parameter) -> torch.Tensor | None:
        return p.grad if grad else p.detach()

    if layout == "sequential":
        mlp = experts.local_experts[e]
        return [get(mlp.linear_fc1.weight), get(mlp.linear_fc2.weight)]
    if layout == "grouped":  # GroupedMLP.forward: weight1.view(E, hidden, -1), weight2.view(E, -1, hidden)
        w1, w2 = get(experts.weight1), get(experts.weight2)
        return [None if w1 is None else w1.reshape(E, H, -1)[e], None if w2 is None else w2.reshape(E, -1, H)[e]]
    return [get(getattr(lin, f"{kind}{e}")) for lin in (experts.linear_fc1, experts.linear_fc2)
            for kind in ("weight", "bias") if hasattr(lin, f"{kind}{e}")]


def reference(model: MegatronMoE, layout: str, grad: bool = True) -> dict[str, torch.Tensor]:
    return {f"layers.{i}.mlp.router": torch.stack([sq(*expert_tensors(b.mlp.experts, layout, e, grad))
                                                   for e in range(E)])
            for i, b in enumerate(model.layers)}


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    np.testing.assert_allclose(got.detach().double().numpy(), want.numpy(), rtol=RTOL, atol=1e-30)


@pytest.mark.parametrize("layout", [*LAYOUTS, "te_grouped_bias"])
def test_megatron_experts_match_float64_and_shared_experts_are_left_out(group, cpu_megatron, layout):
    model = make_model(group, cpu_megatron, layout)
    tracker = GradTracker.attach(model, discover(model))
    try:
        assert list(tracker.found) == [f"layers.{i}.mlp.router" for i in range(LAYERS)] and not tracker.problems
        ep = tracker.found["layers.0.mlp.router"]
        names = {t.name for t in ep.tensors}
        want = {n for n, _ in model.layers[0].mlp.experts.named_parameters(prefix="layers.0.mlp.experts")}
        assert names == want and ep.block == "layers.0.mlp" and not ep.unattributed and not ep.param_free
        assert not any("shared" in n for n in names)
        assert any("shared_experts" in n for n, _ in model.named_parameters()) != layout.endswith("_bias")
        assert any(n.rpartition(".")[2].startswith("bias") for n in names) == layout.endswith("_bias")
        assert ep.layout == {"sequential": "modules", "grouped": "flat"}.get(layout, "indexed")
        if layout.startswith("te_grouped"):  # gated fc1: weight{i} is [2F, H] = [E, H], yet never split as fused
            assert model.layers[0].mlp.experts.linear_fc1.weight0.shape[0] == E
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(STEPS):
            loss_of(model, step).backward()
            opt.step()  # SGD leaves the grads as they were: the reference reads them after the step
            want_sq = reference(model, layout)
            took = tracker.take()
            assert took.steps == 1 and set(took.sq_E) == set(want_sq)
            for layer, v in want_sq.items():
                assert (v > 0).all(), f"every expert should have a gradient in this test ({layer}: {v})"
                close(took.sq_E[layer], v)
            opt.zero_grad()
        for layer, v in reference(model, layout, grad=False).items():
            close(tracker.param_norms(squared=True)[layer], v)
    finally:
        tracker.remove()


def test_grouped_mlp_experts_are_blocks_of_elements_not_columns_nor_rows(group, cpu_megatron):
    """GroupedMLP's weight1 ``[H, E*2F]``: expert e is ``view(E, H, 2F)[e]`` (its forward's view), which is neither
    columns ``e*2F .. (e+1)*2F`` nor dim-0 rows (E does not divide H here); the readings differ, so the float64 test
    above tells them apart."""
    model = make_model(group, cpu_megatron, "grouped")
    experts = model.layers[0].mlp.experts
    assert tuple(experts.weight1.shape) == (H, E * 2 * FFN) and tuple(experts.weight2.shape) == (E * FFN, H)
    assert H % E != 0
    loss_of(model, 0).backward()
    g1 = experts.weight1.grad
    truth = torch.stack([sq(g1.reshape(E, H, -1)[e]) for e in range(E)])
    columns = torch.stack([sq(g1.reshape(H, E, -1)[:, e]) for e in range(E)])
    assert not torch.allclose(truth, columns, rtol=1e-3)
    ep, reason = find_expert_params(model, "layers.0.mlp.router", E)
    assert ep is not None, reason
    assert all(t.chunks and t.groups == E for t in ep.tensors)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_megatron_grad_norms_through_attach(group, cpu_megatron, tmp_path, layout):
    """The experts table's grad_norm, through `moewatch.attach` and a real training loop."""
    model = make_model(group, cpu_megatron, layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    want: list[dict[str, torch.Tensor]] = []
    with moewatch.attach(model, tmp_path) as watch:
        for step in range(STEPS):
            loss_of(model, step).backward()
            opt.step()
            want.append(reference(model, layout))
            opt.zero_grad()
            watch.step()
    run = moewatch.load(tmp_path)
    assert not [p for p in run.meta["problems"] if p["kind"].startswith("expert")], run.meta["problems"]
    for step, per_layer in enumerate(want):
        for layer, v in per_layer.items():
            rows = run.experts[(run.experts.layer == layer) & (run.experts.step == step)].sort_values("expert")
            np.testing.assert_allclose(rows.grad_norm.to_numpy(), v.sqrt().numpy(), rtol=RTOL)


@pytest.mark.parametrize("layout", ["sequential", "grouped"])
def test_expert_parallel_layer_is_not_read_and_says_why(group, cpu_megatron, layout):
    """EP 2, rank 1 (a stand-in EP group): the layer holds global experts 4..7, which its `local_expert_indices`
    says; the per-rank squares would still not combine into per-expert norms, so it is not found, with the reason."""
    layer = make_layer(group, cpu_megatron, layout, ep=StandInGroup(2, 1))
    assert layer.num_local_experts == E // 2 and layer.local_expert_indices == [4, 5, 6, 7]
    model = MegatronMoE([layer])
    ep, reason = find_expert_params(model, "layers.0.mlp.router", E)
    assert ep is None
    assert "4 local experts of 8 (expert parallel" in reason and "global experts 4..7" in reason, reason


def test_expert_tensor_parallel_layer_is_not_read_and_says_why(group, cpu_megatron):
    """Expert TP 2 (a stand-in expert-TP group): each rank holds half of every expert's FFN width."""
    layer = make_layer(group, cpu_megatron, "sequential", expt_tp=StandInGroup(2, 0))
    assert tuple(layer.experts.local_experts[0].linear_fc1.weight.shape) == (FFN // 2, H)
    ep, reason = find_expert_params(MegatronMoE([layer]), "layers.0.mlp.router", E)
    assert ep is None and "expert tensor parallelism (2 ranks" in reason, reason
