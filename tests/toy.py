"""A tiny hand-written MoE for capture tests: a router returning (logits, probs, indices, dropped) and a block."""

from __future__ import annotations

import torch
from torch import nn

from moewatch.capture.types import Probe, RouterSpec, Routing


class ToyRouter(nn.Module):
    def __init__(self, d: int, num_experts: int, top_k: int, capacity: int | None = None):
        super().__init__()
        self.num_experts, self.top_k, self.capacity = num_experts, top_k, capacity
        self.proj = nn.Linear(d, num_experts, bias=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))

    def forward(self, x_TD: torch.Tensor):
        logits_TE = self.proj(x_TD).float()
        probs_TE = logits_TE.softmax(-1)
        ids_TK = torch.topk(probs_TE + self.e_score_correction_bias, self.top_k, dim=-1).indices
        dropped_TK = torch.zeros_like(ids_TK, dtype=torch.bool)
        if self.capacity is not None:
            onehot_TKE = torch.nn.functional.one_hot(ids_TK, self.num_experts)
            position_TKE = onehot_TKE.reshape(-1, self.num_experts).cumsum(0).reshape(onehot_TKE.shape)
            dropped_TK = ((position_TKE * onehot_TKE).sum(-1) > self.capacity)
        return logits_TE, probs_TE, ids_TK, dropped_TK


class ToyBlock(nn.Module):
    def __init__(self, d: int, num_experts: int, top_k: int, capacity: int | None = None):
        super().__init__()
        self.router = ToyRouter(d, num_experts, top_k, capacity)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(num_experts))

    def forward(self, x):
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        _, probs_TE, ids_TK, dropped_TK = self.router(x_TD)
        out = torch.zeros_like(x_TD)
        w_TK = probs_TE.gather(-1, ids_TK) * (~dropped_TK)
        for e, expert in enumerate(self.experts):
            sel_TK = (ids_TK == e).float() * w_TK
            out = out + expert(x_TD) * sel_TK.sum(-1, keepdim=True)
        return (x_TD + out).reshape(shape)


class ToyMoE(nn.Module):
    def __init__(self, d: int = 8, num_experts: int = 4, top_k: int = 2, layers: int = 2, capacity: int | None = None,
                 checkpoint: str | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(ToyBlock(d, num_experts, top_k, capacity) for _ in range(layers))
        self.checkpoint = checkpoint

    def forward(self, x):
        for b in self.blocks:
            if self.checkpoint is None:
                x = b(x)
            else:
                x = torch.utils.checkpoint.checkpoint(b, x, use_reentrant=self.checkpoint == "reentrant")
        return x


def read_toy(module, args, kwargs, output) -> Routing:
    logits, probs, ids, dropped = output
    return Routing(logits_TE=logits, indices_TK=ids, dropped_TK=dropped)


def toy_specs(model: ToyMoE) -> list[RouterSpec]:
    specs = []
    for i, b in enumerate(model.blocks):
        r = b.router
        specs.append(RouterSpec(name=f"blocks.{i}.router", num_experts=r.num_experts, top_k=r.top_k,
                                probes=[Probe(r, read_toy)], capacity=r.capacity,
                                bias=(lambda r=r: r.e_score_correction_bias)))
    return specs
