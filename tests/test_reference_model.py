"""The reference MoE model: each balancing method's mechanics, the router protocol, dispatch, and the data.

References are computed by hand in float64 with plain Python loops, independent of the tensor code under test.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moewatch.reference.data import BatchSampler, build_corpus, stdlib_files, synthetic_corpus
from moewatch.reference.model import (
    MoE,
    MoEConfig,
    MoEGPT,
    Router,
    RouterOutput,
    capacity_drops,
    expert_capacity,
    grouped_mm_supported,
    load_balancing_loss,
    router_z_loss,
)

TINY = MoEConfig(
    vocab_size=32, block_size=8, n_layer=2, n_head=2, d_model=16, n_experts=4, top_k=2, d_expert=8
)


def tokens(B: int = 2, S: int = 8, vocab: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(seed))


def router_calls(model: MoEGPT, *args) -> list[RouterOutput]:
    """Run the model once and return what each router returned (a forward hook, not a stand-in)."""
    seen: list[RouterOutput] = []
    handles = [r.register_forward_hook(lambda m, a, out: seen.append(out)) for r in model.routers()]
    try:
        model(*args)
    finally:
        for h in handles:
            h.remove()
    return seen


# ------------------------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_experts", 0),
        ("top_k", 0),
        ("d_model", -4),
        ("block_size", 2.5),
        ("capacity_factor", 0.0),
        ("capacity_factor", -1.0),
        ("aux_loss_coef", -0.1),
        ("z_loss_coef", float("nan")),
        ("bias_update_rate", -1e-3),
        ("router_noise", "gumbel"),
        ("dropout", 1.0),
        ("dispatch", "fast"),
        ("router_init_std", 0.0),
    ],
)
def test_config_rejects_bad_field_and_names_it(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"MoEConfig.{field}"):
        dataclasses.replace(TINY, **{field: value})


def test_config_cross_field_checks() -> None:
    with pytest.raises(ValueError, match="top_k"):
        dataclasses.replace(TINY, n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="d_model"):
        dataclasses.replace(TINY, d_model=18, n_head=4)
    with pytest.raises(ValueError, match="noise_std"):
        dataclasses.replace(TINY, router_noise="jitter", noise_std=0.0)
    with pytest.raises(ValueError, match="noise_std"):
        dataclasses.replace(TINY, router_noise="jitter", noise_std=1.5)


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.n_experts = 8  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------------------
# Router protocol


def test_router_output_contract() -> None:
    cfg = dataclasses.replace(TINY, n_experts=6, top_k=3)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    x_TD = torch.randn(10, cfg.d_model, generator=torch.Generator().manual_seed(1))
    out = router(x_TD)
    assert isinstance(out, RouterOutput) and out._fields == ("logits", "probs", "indices", "dropped")
    assert out.logits.shape == (10, 6) and out.logits.dtype == torch.float32
    assert out.probs.shape == (10, 6) and out.probs.dtype == torch.float32
    assert out.indices.shape == (10, 3) and out.indices.dtype == torch.int64
    assert out.dropped.shape == (10, 3) and out.dropped.dtype == torch.bool
    assert not out.dropped.any()  # no capacity factor: nothing is refused
    torch.testing.assert_close(out.probs, out.logits.softmax(-1))
    # The chosen experts are the k largest probabilities (bias zero), distinct per token.
    assert torch.equal(out.indices, out.probs.topk(3, dim=-1).indices)
    assert all(len(set(row)) == 3 for row in out.indices.tolist())
    # The attributes and the buffer moewatch discovers it by.
    assert type(router.num_experts) is int and router.num_experts == 6
    assert type(router.top_k) is int and router.top_k == 3
    buffers = dict(router.named_buffers())
    assert buffers["e_score_correction_bias"].shape == (6,)
    assert torch.equal(buffers["e_score_correction_bias"], torch.zeros(6))
    assert not isinstance(router, torch.nn.Linear)


def test_router_runs_in_fp32_under_bf16_autocast() -> None:
    router = Router(TINY)
    x_TD = torch.randn(5, TINY.d_model).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(x_TD)
    assert out.logits.dtype == torch.float32 and out.probs.dtype == torch.float32


def test_model_routers_are_one_per_layer() -> None:
    model = MoEGPT(TINY)
    names = [n for n, m in model.named_modules() if isinstance(m, Router)]
    assert names == ["blocks.0.moe.router", "blocks.1.moe.router"]


# ------------------------------------------------------------------------------------------------------------
# Auxiliary load-balancing loss and z-loss against float64 hand computation


def test_load_balancing_loss_matches_float64_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    T, E, K = 7, 5, 2
    probs_TE = torch.randn(T, E, generator=gen).softmax(-1)
    indices_TK = probs_TE.topk(K, dim=-1).indices
    p = probs_TE.double().tolist()
    counts = [0] * E
    for row in indices_TK.tolist():
        for e in row:
            counts[e] += 1
    f = [c / (T * K) for c in counts]
    P = [sum(p[t][e] for t in range(T)) / T for e in range(E)]
    expected = E * sum(f[e] * P[e] for e in range(E))
    assert load_balancing_loss(probs_TE, indices_TK).item() == pytest.approx(expected, rel=1e-6)


def test_load_balancing_loss_is_one_when_balanced_and_E_when_collapsed() -> None:
    E = 4
    uniform_TE = torch.full((8, E), 1 / E)
    balanced_TK = torch.arange(8).remainder(E).unsqueeze(1)
    assert load_balancing_loss(uniform_TE, balanced_TK).item() == pytest.approx(1.0)
    onehot_TE = torch.zeros(8, E)
    onehot_TE[:, 2] = 1.0
    assert load_balancing_loss(onehot_TE, torch.full((8, 1), 2)).item() == pytest.approx(float(E))


def test_load_balancing_loss_gradient_flows_through_probabilities_only() -> None:
    logits_TE = torch.randn(6, 3, generator=torch.Generator().manual_seed(4), requires_grad=True)
    probs_TE = logits_TE.softmax(-1)
    indices_TK = probs_TE.argmax(-1, keepdim=True)
    load_balancing_loss(probs_TE, indices_TK).backward()
    # d/dP_i of E * sum f_i P_i is E * f_i; chain through mean and softmax in float64 by hand.
    T, E = 6, 3
    f = [0.0] * E
    for (e,) in indices_TK.tolist():
        f[e] += 1 / T
    p = probs_TE.detach().double().tolist()
    expected = [
        [sum(E * f[i] / T * p[t][i] * ((i == j) - p[t][j]) for i in range(E)) for j in range(E)]
        for t in range(T)
    ]
    torch.testing.assert_close(
        logits_TE.grad.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=1e-5
    )


def test_z_loss_matches_float64_reference() -> None:
    logits_TE = torch.randn(9, 6, generator=torch.Generator().manual_seed(5)) * 4
    rows = logits_TE.double().tolist()
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in rows) / len(rows)
    assert router_z_loss(logits_TE).item() == pytest.approx(expected, rel=1e-6)


def test_model_loss_is_lm_plus_weighted_balancing_losses() -> None:
    cfg = dataclasses.replace(TINY, aux_loss_coef=0.3, z_loss_coef=0.02)
    model = MoEGPT(cfg)
    idx, tgt = tokens(seed=1), tokens(seed=2)
    calls = router_calls(model, idx, tgt)
    out = model(idx, tgt)  # same weights, no noise: the same routing again
    aux_ref = sum(load_balancing_loss(c.probs, c.indices).item() for c in calls) / len(calls)
    z_ref = sum(router_z_loss(c.logits).item() for c in calls) / len(calls)
    assert out.aux_loss.item() == pytest.approx(aux_ref, rel=1e-6)
    assert out.z_loss.item() == pytest.approx(z_ref, rel=1e-6)
    lm_ref = torch.nn.functional.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), tgt.reshape(-1)).item()
    assert out.lm_loss.item() == pytest.approx(lm_ref, rel=1e-6)
    assert out.loss.item() == pytest.approx(lm_ref + 0.3 * aux_ref + 0.02 * z_ref, rel=1e-6)
    # With both coefficients at 0 the losses are still reported but not added.
    plain = MoEGPT(TINY)
    out0 = plain(idx, tgt)
    assert out0.loss.item() == pytest.approx(out0.lm_loss.item(), rel=1e-7)
    assert out0.aux_loss.item() > 0 and out0.z_loss.item() > 0


def test_aux_loss_coefficient_pushes_router_towards_balance() -> None:
    # One gradient step on the aux loss alone must lower it: the gradient points the right way.
    cfg = dataclasses.replace(TINY, router_init_std=1.0)
    model = MoEGPT(cfg)
    idx = tokens(B=4, seed=3)
    router_params = [r.weight for r in model.routers()]
    before = model(idx).aux_loss
    before.backward()
    with torch.no_grad():
        for w in router_params:
            w -= 0.5 * w.grad
    after = model(idx).aux_loss
    assert after.item() < before.item()


# ------------------------------------------------------------------------------------------------------------
# Capacity factor


def test_expert_capacity_formula() -> None:
    assert expert_capacity(num_tokens=10, num_experts=4, top_k=2, capacity_factor=1.0) == 5  # ceil(5.0)
    assert expert_capacity(num_tokens=10, num_experts=4, top_k=1, capacity_factor=1.0) == 3  # ceil(2.5)
    assert expert_capacity(num_tokens=12, num_experts=3, top_k=2, capacity_factor=1.25) == 10  # ceil(10.0)
    assert expert_capacity(num_tokens=7, num_experts=8, top_k=1, capacity_factor=0.5) == 1  # ceil(0.4375)


def reference_drops(indices: list[list[int]], capacity: int) -> list[list[bool]]:
    """GShard priority: all first choices in token order, then all second choices, ..."""
    T, K = len(indices), len(indices[0])
    taken: dict[int, int] = {}
    dropped = [[False] * K for _ in range(T)]
    for k in range(K):
        for t in range(T):
            e = indices[t][k]
            taken[e] = taken.get(e, 0) + 1
            dropped[t][k] = taken[e] > capacity
    return dropped


def test_capacity_drops_by_hand() -> None:
    # T=5, K=2, E=3, capacity 2. First choices: 0,0,0,1,2 -> the third 0 (token 2) is dropped. Second choices:
    # 1,2,1,0,1 -> expert 1 already has 1 (token 3): tokens 0 keeps, token 2's 1 is its 3rd -> drop; expert 2
    # has 1 (token 4): token 1 keeps; expert 0 is full: token 3's second choice is dropped; token 4's 1 drops.
    indices_TK = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, 1]])
    expected = [[False, False], [False, False], [True, True], [False, True], [False, True]]
    assert capacity_drops(indices_TK, num_experts=3, capacity=2).tolist() == expected
    assert reference_drops(indices_TK.tolist(), 2) == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_capacity_drops_match_reference_on_random_routing(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    T, E, K = 40, 5, 2
    indices_TK = torch.rand(T, E, generator=gen).pow(3).topk(K, dim=-1).indices  # skewed, so drops happen
    capacity = expert_capacity(T, E, K, 0.8)
    got = capacity_drops(indices_TK, E, capacity)
    assert got.tolist() == reference_drops(indices_TK.tolist(), capacity)
    counts = torch.bincount(indices_TK.reshape(-1), minlength=E)
    assert int(got.sum()) == int((counts - capacity).clamp(min=0).sum())


def test_router_capacity_drop_count_and_residual_pass_through() -> None:
    cfg = dataclasses.replace(TINY, n_experts=4, top_k=1, capacity_factor=1.0)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[1, 0] = 10.0  # every token with x[:, 0] > 0 goes to expert 1
        torch.nn.init.normal_(moe.w_in_EDH, generator=torch.Generator().manual_seed(0))
        torch.nn.init.normal_(moe.w_out_EHD, generator=torch.Generator().manual_seed(1))
    x_TD = torch.randn(12, cfg.d_model, generator=torch.Generator().manual_seed(2))
    x_TD[:, 0] = x_TD[:, 0].abs() + 1.0  # all 12 tokens prefer expert 1
    out = moe.router(x_TD)
    capacity = math.ceil(1.0 * 12 * 1 / 4)  # 3
    assert (out.indices == 1).all()
    assert int(out.dropped.sum()) == 12 - capacity
    assert out.dropped[:, 0].tolist() == [False] * 3 + [True] * 9  # token order: the first three are served
    y_BSD, _, _ = moe(x_TD.view(1, 12, cfg.d_model))
    y_TD = y_BSD.view(12, cfg.d_model)
    assert torch.equal(y_TD[3:], torch.zeros(9, cfg.d_model))  # dropped tokens keep only the residual
    assert (y_TD[:3].abs().sum(-1) > 0).all()


def test_capacity_drops_reach_the_model_counters() -> None:
    cfg = dataclasses.replace(TINY, top_k=2, capacity_factor=0.5)
    model = MoEGPT(cfg)
    calls = router_calls(model, tokens(B=4))
    tokens_LE, dropped_LE = model.pop_router_stats()
    for layer, call in enumerate(calls):
        kept = torch.bincount(call.indices[~call.dropped], minlength=cfg.n_experts).float()
        dropped = torch.bincount(call.indices[call.dropped], minlength=cfg.n_experts).float()
        assert torch.equal(tokens_LE[layer], kept) and torch.equal(dropped_LE[layer], dropped)
        # C = 0.5 guarantees at least half of the T*K assignments are refused.
        assert int(call.dropped.sum()) >= call.indices.numel() // 2


# ------------------------------------------------------------------------------------------------------------
# DeepSeek-V3 auxiliary-loss-free bias


def overloaded_router(rate: float) -> tuple[Router, torch.Tensor]:
    cfg = dataclasses.replace(TINY, n_experts=4, top_k=1, bias_update_rate=rate)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[2, 0] = 5.0
    x_TD = torch.randn(8, cfg.d_model, generator=torch.Generator().manual_seed(0))
    x_TD[:, 0] = x_TD[:, 0].abs() + 1.0  # expert 2 wins every token
    return router, x_TD


def test_bias_update_lowers_overloaded_expert_and_raises_the_rest() -> None:
    router, x_TD = overloaded_router(rate=0.01)
    router.train()
    out = router(x_TD)
    assert (out.indices == 2).all()
    assert router.load_E.tolist() == [0.0, 0.0, 8.0, 0.0]
    router.update_bias()
    # mean load 2: sign(2 - 8) = -1 for expert 2, sign(2 - 0) = +1 for the others.
    assert router.e_score_correction_bias.tolist() == pytest.approx([0.01, 0.01, -0.01, 0.01])
    assert router.load_E.tolist() == [0.0, 0.0, 0.0, 0.0]  # the load is forgotten after each update
    router.update_bias()  # nothing routed since: no change
    assert router.e_score_correction_bias.tolist() == pytest.approx([0.01, 0.01, -0.01, 0.01])


def test_bias_is_untouched_at_rate_zero_and_by_eval_forwards() -> None:
    router, x_TD = overloaded_router(rate=0.0)
    router(x_TD)
    router.update_bias()
    assert torch.equal(router.e_score_correction_bias, torch.zeros(4))
    router, x_TD = overloaded_router(rate=0.01)
    router.eval()
    router(x_TD)
    assert torch.equal(router.load_E, torch.zeros(4))


def test_bias_changes_selection_but_not_gate_weights() -> None:
    cfg = dataclasses.replace(TINY, n_experts=4, top_k=2, norm_topk_prob=False, bias_update_rate=0.01)
    moe = MoE(cfg)
    x_TD = torch.randn(6, cfg.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        moe.router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]))  # expert 3 always picked
    out = moe.router(x_TD)
    assert (out.indices == 3).any(dim=1).all()
    torch.testing.assert_close(out.probs, out.logits.softmax(-1))  # the bias never enters the probabilities
    # The MoE output is built from the unbiased probabilities of the chosen experts.
    y_BSD, _, _ = moe(x_TD.view(1, 6, -1))
    expected = torch.zeros(6, cfg.d_model, dtype=torch.float64)
    for t in range(6):
        for k in range(2):
            e = int(out.indices[t, k])
            h = torch.nn.functional.gelu(x_TD[t].double() @ moe.w_in_EDH[e].double())
            expected[t] += out.probs[t, e].double() * (h @ moe.w_out_EHD[e].double())
    torch.testing.assert_close(y_BSD.view(6, -1).double(), expected, atol=1e-5, rtol=1e-4)


def test_bias_gets_no_gradient() -> None:
    cfg = dataclasses.replace(TINY, bias_update_rate=0.01, aux_loss_coef=0.1, z_loss_coef=0.1)
    model = MoEGPT(cfg)
    names = {n for n, _ in model.named_parameters()}
    assert not any("e_score_correction_bias" in n for n in names)  # not optimized
    biases = [r.e_score_correction_bias for r in model.routers()]
    for b in biases:
        b.normal_(0, 0.1)
        b.requires_grad_(True)  # if any path reached it, autograd would now fill .grad
    model(tokens(), tokens(seed=1)).loss.backward()
    assert all(b.grad is None for b in biases)
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in model.routers())


def test_bias_load_sums_gradient_accumulation_micro_batches() -> None:
    cfg = dataclasses.replace(TINY, bias_update_rate=0.01)
    model = MoEGPT(cfg)
    model(tokens(B=2))
    model(tokens(B=3, seed=1))
    for r in model.routers():
        assert r.load_E.sum().item() == (2 + 3) * 8 * cfg.top_k


# ------------------------------------------------------------------------------------------------------------
# Router noise


def test_jitter_scales_router_input_in_training_only() -> None:
    cfg = dataclasses.replace(TINY, router_noise="jitter", noise_std=0.1)
    router = Router(cfg)
    x_TD = torch.randn(20, cfg.d_model, generator=torch.Generator().manual_seed(0))
    clean = x_TD @ router.weight.t()
    router.eval()
    torch.testing.assert_close(router(x_TD).logits, clean)
    router.train()
    noisy = router(x_TD).logits
    assert not torch.allclose(noisy, clean)
    # Each input is scaled by a factor in [0.9, 1.1], so every logit stays within 10% of sum |x_d w_ed|.
    bound = (x_TD.abs() @ router.weight.abs().t()) * 0.1
    assert ((noisy - clean).abs() <= bound + 1e-6).all()


def test_noisy_topk_adds_learned_noise_to_routing_not_to_logits() -> None:
    cfg = dataclasses.replace(TINY, router_noise="noisy_topk", noise_std=0.5)
    router = Router(cfg)
    x_TD = torch.randn(30, cfg.d_model, generator=torch.Generator().manual_seed(0))
    # Initial noise std is noise_std exactly: softplus(0 + b) = 0.5.
    assert torch.nn.functional.softplus(router.noise_bias).tolist() == pytest.approx([0.5] * cfg.n_experts)
    router.train()
    out = router(x_TD)
    clean = x_TD @ router.weight.t()
    torch.testing.assert_close(out.logits, clean)  # logits are reported before the noise
    assert not torch.allclose(out.probs, clean.softmax(-1))  # the choice was made from noisy logits
    out.probs.sum(0)[0].backward()
    assert router.noise_weight.grad is not None and router.noise_bias.grad.abs().sum() > 0
    router.eval()
    torch.testing.assert_close(router(x_TD).probs, clean.softmax(-1))


# ------------------------------------------------------------------------------------------------------------
# Expert dispatch: grouped_mm path, loop path, float64 reference


def dense_reference(
    moe: MoE, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor
) -> torch.Tensor:
    out = torch.zeros(x_TD.shape, dtype=torch.float64)
    for t in range(x_TD.shape[0]):
        for k in range(indices_TK.shape[1]):
            e = int(indices_TK[t, k])
            h = torch.nn.functional.gelu(x_TD[t].double() @ moe.w_in_EDH[e].double())
            out[t] += weights_TK[t, k].double() * (h @ moe.w_out_EHD[e].double())
    return out


@pytest.mark.skipif(
    not grouped_mm_supported(torch.device("cpu"), torch.float32), reason="no grouped_mm on CPU"
)
def test_grouped_mm_path_equals_loop_path_and_reference() -> None:
    cfg = dataclasses.replace(TINY, n_experts=5, top_k=2, d_model=16, d_expert=24)
    moe = MoE(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        moe.w_in_EDH.normal_(0, 0.3, generator=gen)
        moe.w_out_EHD.normal_(0, 0.3, generator=gen)
    x_TD = torch.randn(23, 16, generator=gen)
    indices_TK = torch.rand(23, 5, generator=gen).topk(2, dim=-1).indices
    indices_TK[:, 0] = indices_TK[:, 0].clamp(max=3)  # leaves expert 4 with few rows
    indices_TK[indices_TK[:, 1] == indices_TK[:, 0], 1] = 4
    weights_TK = torch.rand(23, 2, generator=gen)

    results = {}
    for path in ("grouped_mm", "loop"):
        moe.dispatch = path
        x = x_TD.clone().requires_grad_(True)
        w = weights_TK.clone().requires_grad_(True)
        moe.zero_grad()
        y = moe.experts(x, indices_TK, w)
        y.backward(torch.ones_like(y))
        results[path] = (y.detach(), x.grad, w.grad, moe.w_in_EDH.grad.clone(), moe.w_out_EHD.grad.clone())
    for a, b in zip(results["grouped_mm"], results["loop"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        results["grouped_mm"][0].double(),
        dense_reference(moe, x_TD, indices_TK, weights_TK),
        atol=1e-5,
        rtol=1e-5,
    )


def test_grouped_mm_handles_an_expert_with_no_tokens() -> None:
    cfg = dataclasses.replace(TINY, n_experts=4, top_k=1)
    moe = MoE(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        moe.w_in_EDH.normal_(0, 0.3, generator=gen)
        moe.w_out_EHD.normal_(0, 0.3, generator=gen)
    x_TD = torch.randn(6, cfg.d_model, generator=gen)
    indices_TK = torch.tensor([[0], [0], [3], [3], [3], [0]])  # experts 1 and 2 idle
    weights_TK = torch.rand(6, 1, generator=gen)
    for path in ("grouped_mm", "loop"):
        if path == "grouped_mm" and not grouped_mm_supported(x_TD.device, x_TD.dtype):
            continue
        moe.dispatch = path
        y = moe.experts(x_TD, indices_TK, weights_TK)
        torch.testing.assert_close(
            y.double(), dense_reference(moe, x_TD, indices_TK, weights_TK), atol=1e-5, rtol=1e-5
        )


def test_whole_model_same_under_both_dispatch_paths() -> None:
    idx, tgt = tokens(B=3), tokens(B=3, seed=1)
    a = MoEGPT(dataclasses.replace(TINY, dispatch="loop"))
    b = MoEGPT(dataclasses.replace(TINY, dispatch="auto"))
    out_a, out_b = a(idx, tgt), b(idx, tgt)
    torch.testing.assert_close(out_a.logits, out_b.logits, atol=1e-5, rtol=1e-5)
    out_a.loss.backward()
    out_b.loss.backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------------------------
# The model as a whole


def test_forward_shapes_and_losses() -> None:
    model = MoEGPT(dataclasses.replace(TINY, shared_expert=True))
    out = model(tokens(B=3))
    assert out.logits.shape == (3, 8, 32) and out.loss is None and out.lm_loss is None
    out = model(tokens(B=3), tokens(B=3, seed=1))
    assert out.loss.ndim == 0 and math.isfinite(out.loss.item())
    # An untrained byte model predicts roughly uniformly: loss near ln(vocab).
    assert abs(out.lm_loss.item() - math.log(32)) < 0.5
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(S=9))


def test_shared_expert_contributes() -> None:
    cfg = dataclasses.replace(TINY, shared_expert=True)
    moe = MoE(cfg)
    x = torch.randn(1, 5, cfg.d_model, generator=torch.Generator().manual_seed(0))
    with_shared, _, _ = moe(x)
    shared_out = moe.shared(x.view(5, -1))
    moe.shared = None
    without, _, _ = moe(x)
    torch.testing.assert_close(with_shared.view(5, -1), without.view(5, -1) + shared_out)


def test_init_is_deterministic_by_seed() -> None:
    a, b, c = MoEGPT(TINY), MoEGPT(TINY), MoEGPT(dataclasses.replace(TINY, seed=1))
    torch.manual_seed(123)  # the global RNG must not matter
    d = MoEGPT(TINY)
    for (_, pa), (_, pb), (_, pd) in zip(
        a.named_parameters(), b.named_parameters(), d.named_parameters(), strict=True
    ):
        assert torch.equal(pa, pb) and torch.equal(pa, pd)
    assert not torch.equal(a.routers()[0].weight, c.routers()[0].weight)
    assert a.routers()[0].weight.std().item() == pytest.approx(TINY.router_init_std, rel=0.5)


def test_router_counters_count_training_forwards_and_pop_resets() -> None:
    model = MoEGPT(TINY)
    model(tokens(B=2))
    model(tokens(B=2, seed=1))
    model.eval()
    model(tokens(B=2, seed=2))  # not counted
    tokens_LE, dropped_LE = model.pop_router_stats()
    assert tokens_LE.shape == (2, 4)
    assert tokens_LE.sum(dim=1).tolist() == [2 * 2 * 8 * 2] * 2  # two forwards of B*S tokens, k=2 each
    assert dropped_LE.sum().item() == 0
    again, _ = model.pop_router_stats()
    assert again.sum().item() == 0


def test_update_router_biases_is_noop_without_rate() -> None:
    model = MoEGPT(TINY)
    model(tokens())
    model.update_router_biases()
    assert all(torch.equal(r.e_score_correction_bias, torch.zeros(4)) for r in model.routers())
    model = MoEGPT(dataclasses.replace(TINY, bias_update_rate=0.05))
    model(tokens())
    model.update_router_biases()
    assert all(r.e_score_correction_bias.abs().max().item() == pytest.approx(0.05) for r in model.routers())


def test_a_few_training_steps_reduce_loss() -> None:
    cfg = dataclasses.replace(
        TINY, aux_loss_coef=0.01, z_loss_coef=1e-3, bias_update_rate=1e-3, capacity_factor=1.5
    )
    model = MoEGPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx, tgt = tokens(B=4), tokens(B=4, seed=1)
    first = None
    for _ in range(30):
        out = model(idx, tgt)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        model.update_router_biases()
        first = first if first is not None else out.lm_loss.item()
    assert out.lm_loss.item() < first - 0.5


@pytest.mark.slow
def test_torch_compile_matches_eager() -> None:
    # 10-20 s on a CPU. In fp32 the experts take the loop path under compile (grouped_mm's tracing kernel is
    # bf16-only), whose data-dependent torch.where splits the graph at every expert.
    cfg = dataclasses.replace(TINY, capacity_factor=1.0, bias_update_rate=0.01)
    model = MoEGPT(cfg)
    idx, tgt = tokens(B=2), tokens(B=2, seed=1)
    eager = model(idx, tgt)
    compiled = torch.compile(model)(idx, tgt)
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled.loss, eager.loss, atol=1e-4, rtol=1e-4)
    compiled.loss.backward()


@pytest.mark.slow
def test_torch_compile_under_bf16_autocast() -> None:
    # In bf16 the experts take the grouped_mm path inside the compiled graph (as on a GPU).
    model = MoEGPT(TINY)
    idx, tgt = tokens(B=2), tokens(B=2, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(idx, tgt)
        compiled = torch.compile(model)(idx, tgt)
    torch.testing.assert_close(compiled.loss, eager.loss, atol=2e-2, rtol=2e-2)
    compiled.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------------------------------------------
# Data


def test_stdlib_corpus_is_deterministic_by_seed() -> None:
    if len(stdlib_files()) < 10:
        pytest.skip("this Python ships no standard-library sources")
    a, b, c = build_corpus(20_000, seed=0), build_corpus(20_000, seed=0), build_corpus(20_000, seed=1)
    assert a.source == "stdlib"
    assert len(a.train_N) + len(a.val_N) == 20_000 and len(a.val_N) == 2_000
    assert torch.equal(a.train_N, b.train_N) and torch.equal(a.val_N, b.val_N)
    assert not torch.equal(a.train_N, c.train_N)
    text = bytes(a.train_N.tolist()).decode("utf-8", errors="replace")
    assert "def " in text or "class " in text or "import " in text


def test_stdlib_files_skip_installed_packages_and_tests() -> None:
    for path in stdlib_files():
        parts = set(path.parts)
        assert "site-packages" not in parts and "test" not in parts and path.suffix == ".py"


def test_synthetic_corpus_is_deterministic_and_mixed() -> None:
    a = synthetic_corpus(5_000, seed=0)
    assert a == synthetic_corpus(5_000, seed=0) and a != synthetic_corpus(5_000, seed=1)
    assert len(a) == 5_000 and all(32 <= v <= 126 for v in a)
    assert len(set(a)) > 48  # several sources' alphabets appear, not one
    corpus = build_corpus(5_000, seed=0, source="synthetic")
    assert corpus.source == "synthetic" and bytes(corpus.train_N.tolist()) == a[:4_500]


def test_corpus_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="source"):
        build_corpus(5_000, source="web")
    with pytest.raises(ValueError, match="n_bytes"):
        build_corpus(10)


def test_batch_sampler_windows_and_targets() -> None:
    corpus = build_corpus(5_000, seed=0, source="synthetic")
    sampler = BatchSampler(corpus, batch_size=3, block_size=16, seed=7)
    x_BS, y_BS = sampler.next()
    assert x_BS.shape == (3, 16) and y_BS.shape == (3, 16) and x_BS.dtype == torch.int64
    assert torch.equal(x_BS[:, 1:], y_BS[:, :-1])  # targets are the next byte
    data = corpus.train_N.long()
    for row in x_BS:  # every window is a real slice of the corpus
        starts = [s for s in range(len(data) - 16) if torch.equal(data[s : s + 16], row)]
        assert starts
    again = BatchSampler(corpus, batch_size=3, block_size=16, seed=7).next()
    assert torch.equal(again[0], x_BS)
    with pytest.raises(ValueError, match="block_size"):
        BatchSampler(corpus, batch_size=1, block_size=10_000)
