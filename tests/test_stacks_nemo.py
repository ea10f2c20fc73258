"""NeMo Automodel (0.7.x): its ``MoE`` layer (``Gate`` + torch ``GroupedExperts``) with DeepSeek-V3-style sigmoid
routing (group-limited, ``e_score_correction_bias`` updated by the gate's own ``update_bias``), Qwen3-style softmax
and DeepSeek-V4-style ``sqrtsoftplus``, trained a few steps on CPU with padding in the batch.

The gate returns only (weights, indices, aux_loss) and names its top-k ``topk``: counts from the indices, padding
left out as the gate's ``token_mask`` says, logits from its projection. (Its full model classes call
``torch.cuda.current_device()``, so the layers are used directly.)
"""

from __future__ import annotations

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

import_stack("nemo_automodel.components.moe.layers", "NeMo Automodel")

from nemo_automodel.components.models.common.utils import BackendConfig  # noqa: E402
from nemo_automodel.components.moe.config import MoEConfig  # noqa: E402
from nemo_automodel.components.moe.layers import Gate, MoE  # noqa: E402

D, E, K, VOCAB, STEPS = 16, 8, 2, 64, 3


def nemo_moe(score_func: str) -> MoE:
    grouped = score_func == "sigmoid_with_bias"
    cfg = MoEConfig(n_routed_experts=E, n_shared_experts=0, n_activated_experts=K,
                    n_expert_groups=4 if grouped else 1, n_limited_groups=2 if grouped else 1, train_gate=True,
                    gate_bias_update_factor=0.01 if grouped else 0.0, aux_loss_coeff=0.0, score_func=score_func,
                    route_scale=1.0, dim=D, inter_dim=32, moe_inter_dim=8, norm_topk_prob=True, dtype=torch.float32)
    moe = MoE(cfg, BackendConfig(linear="torch", rms_norm="torch", experts="torch", dispatcher="torch",
                                 enable_hf_state_dict_adapter=False))
    with torch.no_grad():
        moe.init_weights(torch.device("cpu"), init_std=0.3)
    return moe


class NemoLM(nn.Module):
    def __init__(self, score_func: str, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.moes = nn.ModuleList(nemo_moe(score_func) for _ in range(layers))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids, padding_mask):
        h = self.embed(ids)
        for moe in self.moes:
            h = h + moe(h, padding_mask=padding_mask)
        return self.head(h)


@pytest.mark.parametrize("score_func", ["sigmoid_with_bias", "softmax", "sqrtsoftplus"])
def test_nemo_automodel_moe_exact_counts_and_distribution(tmp_path, monkeypatch, score_func):
    torch.manual_seed(0)
    model = NemoLM(score_func).train()
    names = {m: n for n, m in model.named_modules()}
    truth = StackTruth(E)
    logits_seen: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, Gate):
            inner = m._route_scores

            def recorded(scores, _inner=inner, _name=name):  # the logits the gate routes on
                logits_seen[_name] = scores.detach()
                return _inner(scores)

            monkeypatch.setattr(m, "_route_scores", recorded)

    def on_gate(mod, args, out):
        layer = names[mod]
        logits, (_, ids, _), real = logits_seen.pop(layer), out, args[1]
        scores = {"softmax": logits.softmax(-1), "sqrtsoftplus": nn.functional.softplus(logits).sqrt()}.get(
            score_func, torch.sigmoid(logits))
        truth.add(layer, kept_E=bincount(ids[real], E), dist_TE=scores, logits_TE=logits, token_mask_T=real)

    for m in model.modules():
        if isinstance(m, Gate):
            m.register_forward_hook(on_gate)
    info = moewatch.inspect(model)
    assert [str(i) for i in info] == ["moes.0.gate", "moes.1.gate"] and not info.unrouted
    assert info[0].kind == "nemo_automodel" and (info[0].num_experts, info[0].top_k) == (E, K)
    assert ("bias" in info[0].measures) == (score_func == "sigmoid_with_bias")
    assert [i.kind for i in moewatch.inspect(model, routers={"mine": model.moes[0].gate})] == ["nemo_automodel"]  # by hand

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    biases = {}
    with moewatch.attach(model, tmp_path) as watch:
        for step in range(STEPS):
            ids = torch.randint(0, VOCAB, (2, 12))
            pad = torch.zeros(2, 12, dtype=torch.bool)
            pad[1, 9:] = True  # the second sequence ends with 3 padding tokens
            nn.functional.cross_entropy(model(ids, pad).flatten(0, 1), ids.flatten()).backward()
            opt.step()
            opt.zero_grad()
            for i, moe in enumerate(model.moes):
                if moe.gate.bias_update_factor > 0:
                    moe.gate.update_bias()  # NeMo's own auxiliary-loss-free bias update
                    biases[(step, f"moes.{i}.gate")] = moe.gate.e_score_correction_bias.clone()
            truth.cut(step)
            watch.step()
    run = moewatch.load(tmp_path)
    assert_run_matches(run, truth, tokens_per_step={s: 21 for s in range(STEPS)})
    assert_bias_matches(run, biases)
    assert_measures_recorded(info, run)
    if biases:
        assert run.experts.bias.abs().max() > 0
    assert run.meta["problems"] == []
