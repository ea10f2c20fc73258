"""LitGPT (0.5.x): a tiny ``GPT`` with ``LLaMAMoE`` blocks, Mixtral-style (a plain ``gate`` Linear, top-k of its
logits) and DeepSeek-V3-style (``GroupedTopkRouter``: sigmoid, group-limited, ``e_score_correction_bias``), trained a
few steps on CPU. Its top-k lives in ``config.n_expert_per_token``; the reference counts are the batch sizes each
expert MLP actually received.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import moewatch
from tests.stack_import import import_stack
from tests.stack_truth import StackTruth, assert_measures_recorded, assert_run_matches

import_stack("litgpt.model", "LitGPT")

from litgpt.config import Config  # noqa: E402
from litgpt.model import GPT, GroupedTopkRouter, LLaMAMoE  # noqa: E402

E, K, VOCAB, STEPS = 4, 2, 64, 3


def tiny_gpt(grouped: bool) -> GPT:
    kw = dict(n_expert_groups=2, n_topk_groups=1, n_topk_scores_per_group=2, norm_topk_prob=True) if grouped else {}
    cfg = Config(block_size=32, vocab_size=VOCAB, padded_vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=16,
                 n_query_groups=4, mlp_class_name="LLaMAMoE", moe_intermediate_size=8, intermediate_size=32,
                 n_expert=E, n_expert_per_token=K, norm_class_name="RMSNorm", bias=False, **kw)
    model = GPT(cfg)
    for m in model.modules():
        if isinstance(m, GroupedTopkRouter):
            nn.init.normal_(m.weight, std=0.3)
            m.e_score_correction_bias.copy_(torch.randn(E) * 0.1)
    return model


@pytest.mark.parametrize("grouped", [False, True], ids=["mixtral", "deepseek_v3"])
def test_litgpt_moe_exact_counts_and_distribution(tmp_path, grouped):
    torch.manual_seed(0)
    model = tiny_gpt(grouped).train()
    truth = StackTruth(E)
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, LLaMAMoE)}

    for name, block in blocks.items():
        layer = f"{name}.gate"

        def on_gate(mod, args, out, _layer=layer):
            if grouped:  # float64 reference of the router's logits, from its own input and weight
                logits = nn.functional.linear(args[0].double(), mod.weight.double())
                truth.add(_layer, dist_TE=torch.sigmoid(logits), logits_TE=logits)
            else:
                truth.add(_layer, dist_TE=out.double().softmax(-1), logits_TE=out)

        block.gate.register_forward_hook(on_gate)
        for e, expert in enumerate(block.experts):
            def on_expert(mod, args, out, _layer=layer, _e=e):  # tokens that expert e actually processed
                counts = np.zeros(E, np.int64)
                counts[_e] = args[0].shape[0]
                truth.add(_layer, kept_E=counts, call=False)

            expert.register_forward_hook(on_expert)

    info = moewatch.inspect(model)
    assert [str(i) for i in info] == ["transformer.h.0.mlp.gate", "transformer.h.1.mlp.gate"] and not info.unrouted
    assert info[0].kind == "litgpt" and (info[0].num_experts, info[0].top_k) == (E, K)
    assert ("bias" in info[0].measures) == grouped
    assert [i.kind for i in moewatch.inspect(model, routers={"mine": blocks['transformer.h.0.mlp'].gate})] == ["litgpt"]  # by hand

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with moewatch.attach(model, tmp_path) as watch:
        for step in range(STEPS):
            ids = torch.randint(0, VOCAB, (2, 12))
            nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
            opt.step()
            opt.zero_grad()
            truth.cut(step)
            watch.step()
    run = moewatch.load(tmp_path)
    assert_run_matches(run, truth, tokens_per_step={s: 24 for s in range(STEPS)})
    assert_measures_recorded(info, run)
    if grouped:
        for name, block in blocks.items():
            rows = run.experts[(run.experts.layer == f"{name}.gate") & (run.experts.step == STEPS - 1)]
            np.testing.assert_allclose(rows.sort_values("expert").bias.to_numpy(),
                                       block.gate.e_score_correction_bias.numpy(), rtol=1e-6)
    assert run.meta["problems"] == []
