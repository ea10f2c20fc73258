"""Metric math against float64 references computed independently with numpy."""

import math

import numpy as np
import pytest
import torch

from moewatch import metrics


def _ref_softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _reference(logits, ids, dropped, E, K, scoring="softmax", mask=None):
    """Everything the recorded columns should hold, in float64 numpy, from the raw router outputs."""
    x = logits.astype(np.float64)
    T = x.shape[0]
    mask = np.ones(T, bool) if mask is None else mask
    p = _ref_softmax(x) if scoring == "softmax" else (1 / (1 + np.exp(-x)))
    p = p / p.sum(-1, keepdims=True)
    pm = p[mask]
    counts = np.zeros(E)
    drops = np.zeros(E)
    sentinel = 0
    for t in range(T):
        if not mask[t]:
            continue
        for k in range(ids.shape[1]):
            e = ids[t, k]
            if e < 0 or e >= E:
                sentinel += 1
            elif dropped is not None and dropped[t, k]:
                drops[e] += 1
            else:
                counts[e] += 1
    lse = np.log(np.exp(x).sum(-1))
    ent = -(pm * np.log(np.clip(pm, 1e-300, None))).sum(-1)
    f = counts / counts.sum()
    prob_mean = pm.mean(0)
    slots = mask.sum() * K
    return dict(
        tokens_E=counts, dropped_E=drops, prob_mean=prob_mean, tokens=mask.sum(),
        entropy=ent.mean(), entropy_norm=ent.mean() / math.log(E),
        cv=counts.std() / counts.mean(), max_share=counts.max() / counts.sum(), dead=(counts == 0).sum(),
        drop_rate=(drops.sum() + sentinel) / slots, dropped=drops.sum() + sentinel,
        logit_abs_max=np.abs(x).max(), logit_mean=x.mean(), logit_std=x.std(),
        z_loss=(lse[mask] ** 2).mean(), aux_loss=E * (f * prob_mean).sum(),
    )


def _run(chunks, E, K, scoring="softmax"):
    state = torch.zeros(metrics.state_size(E), dtype=torch.float64)
    for c in chunks:
        metrics.observe(state, E, scoring=scoring, **c)
    return metrics.finalize_layers(state.unsqueeze(0), E, K, has_bias=False)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_observe_matches_float64_reference_over_several_calls(scoring):
    g = torch.Generator().manual_seed(0)
    E, K, T = 6, 2, 50
    logits = torch.randn(T, E, generator=g) * 3
    ids = torch.topk(logits + torch.randn(T, E, generator=g), K, dim=-1).indices  # a choice not equal to top-k
    dropped = torch.rand(T, K, generator=g) < 0.2
    ids[3, 1] = E  # the index-equals-E sentinel
    # split the tokens over three calls, as gradient accumulation or several forwards would
    parts = [slice(0, 10), slice(10, 31), slice(31, T)]
    out = _run([dict(logits_TE=logits[s], indices_TK=ids[s], dropped_TK=dropped[s]) for s in parts], E, K, scoring)
    ref = _reference(logits.numpy(), ids.numpy(), dropped.numpy(), E, K, scoring)
    ly, ex = out["layer"], out["experts"]
    np.testing.assert_allclose(ex["tokens"][0].numpy(), ref["tokens_E"])
    np.testing.assert_allclose(ex["dropped"][0].numpy(), ref["dropped_E"])
    np.testing.assert_allclose(ex["prob_mean"][0].numpy(), ref["prob_mean"], rtol=1e-5)
    for key in ("entropy", "entropy_norm", "cv", "max_share", "drop_rate", "logit_abs_max", "logit_mean",
                "logit_std", "z_loss", "aux_loss", "dropped", "dead", "tokens"):
        np.testing.assert_allclose(ly[key][0].item(), ref[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_probs_given_are_used_instead_of_logits():
    g = torch.Generator().manual_seed(1)
    E, K, T = 4, 1, 20
    logits = torch.randn(T, E, generator=g)
    scores = torch.sigmoid(torch.randn(T, E, generator=g))  # un-normalized, as a sigmoid router gives
    ids = scores.argmax(-1, keepdim=True)
    out = _run([dict(logits_TE=logits, probs_TE=scores, indices_TK=ids)], E, K)
    p = (scores / scores.sum(-1, keepdim=True)).double()
    np.testing.assert_allclose(out["experts"]["prob_mean"][0].numpy(), p.mean(0).numpy(), rtol=1e-5)
    ent = -(p * p.log()).sum(-1).mean().item()
    assert out["layer"]["entropy"][0].item() == pytest.approx(ent, rel=1e-5)


def test_token_mask_excludes_padding_everywhere():
    g = torch.Generator().manual_seed(2)
    E, K, T = 5, 2, 16
    logits = torch.randn(T, E, generator=g)
    ids = torch.topk(logits, K).indices
    mask = torch.arange(T) < 11
    out = _run([dict(logits_TE=logits, indices_TK=ids, token_mask_T=mask)], E, K)
    ref = _reference(logits.numpy(), ids.numpy(), None, E, K, mask=mask.numpy())
    np.testing.assert_allclose(out["experts"]["tokens"][0].numpy(), ref["tokens_E"])
    assert out["layer"]["tokens"][0].item() == 11
    assert out["layer"]["entropy"][0].item() == pytest.approx(ref["entropy"], rel=1e-5)
    assert out["layer"]["z_loss"][0].item() == pytest.approx(ref["z_loss"], rel=1e-5)


def test_nonfinite_logits_are_counted_and_do_not_poison_the_rest():
    E, K = 4, 1
    logits = torch.tensor([[1.0, 2.0, 0.5, 0.0], [float("nan"), 1.0, 0.0, 0.0], [0.0, float("inf"), 1.0, 2.0]])
    ids = torch.tensor([[1], [1], [3]])
    out = _run([dict(logits_TE=logits, indices_TK=ids)], E, K)
    ly = out["layer"]
    assert ly["nonfinite"][0].item() == 2
    assert ly["tokens"][0].item() == 3  # all three tokens were routed
    clean = logits[:1].double()
    p = clean.softmax(-1)
    assert ly["entropy"][0].item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-6)  # only the finite row
    assert math.isfinite(ly["logit_std"][0].item())
    assert ly["logit_abs_max"][0].item() == 2.0


def test_count_metrics_known_values():
    counts = torch.tensor([[10.0, 10.0, 10.0, 10.0], [40.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert metrics.cv(counts)[0].item() == 0.0
    assert metrics.cv(counts)[1].item() == pytest.approx(math.sqrt(3))
    assert math.isnan(metrics.cv(counts)[2].item())
    assert metrics.max_share(counts)[1].item() == 1.0
    assert metrics.dead(counts).tolist() == [0, 3, 4]
    uniform = torch.full((3, 4), 0.25)
    assert metrics.aux_loss(counts, uniform)[0].item() == pytest.approx(1.0)
    # collapsed routing with a confident router: E * 1 * 1
    assert metrics.aux_loss(counts[1:2], torch.tensor([[1.0, 0, 0, 0]]))[0].item() == pytest.approx(4.0)


def test_aux_loss_relates_to_transformers_definition():
    """transformers' load_balancing_loss_func (f_i = assignments/tokens) equals top_k times ours."""
    g = torch.Generator().manual_seed(3)
    E, K, T = 8, 2, 64
    logits = torch.randn(T, E, generator=g)
    probs = logits.softmax(-1)
    ids = torch.topk(probs, K).indices
    mask = torch.nn.functional.one_hot(ids, E).double()  # [T, K, E]
    hf = (mask.mean(0) * probs.double().mean(0).unsqueeze(0)).sum() * E
    counts = mask.sum((0, 1)).unsqueeze(0)
    ours = metrics.aux_loss(counts, probs.double().mean(0, keepdim=True))[0]
    assert hf.item() == pytest.approx(K * ours.item(), rel=1e-9)


def test_z_loss_reference():
    x = torch.randn(7, 5, dtype=torch.float64)
    ref = np.mean(np.log(np.exp(x.numpy()).sum(-1)) ** 2)
    assert metrics.z_loss(x).item() == pytest.approx(ref, rel=1e-12)


def test_bias_slot_and_empty_call():
    E = 3
    state = torch.zeros(metrics.state_size(E), dtype=torch.float64)
    metrics.observe(state, E, logits_TE=torch.zeros(0, E), indices_TK=torch.zeros(0, 1, dtype=torch.long))
    state[metrics.bias_slice(E)] = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    out = metrics.finalize_layers(state.unsqueeze(0), E, 1, has_bias=True)
    assert out["experts"]["bias"][0].tolist() == pytest.approx([0.1, -0.2, 0.3])
    assert out["layer"]["tokens"][0].item() == 0
    assert math.isnan(out["layer"]["cv"][0].item())


def test_minus_inf_marks_a_masked_expert_not_a_bad_logit():
    E = 4
    logits = torch.tensor([[1.0, float("-inf"), 0.0, 2.0], [0.5, 0.5, float("-inf"), float("-inf")]])
    out = _run([dict(logits_TE=logits, indices_TK=torch.tensor([[3], [0]]))], E, 1)
    ly = out["layer"]
    assert ly["nonfinite"][0].item() == 0
    p = torch.softmax(logits.double(), -1)
    ent = -torch.special.xlogy(p, p).sum(-1).mean().item()
    assert ly["entropy"][0].item() == pytest.approx(ent, rel=1e-6)
    assert ly["logit_abs_max"][0].item() == 2.0
    np.testing.assert_allclose(out["experts"]["prob_mean"][0].numpy(), p.mean(0).numpy(), rtol=1e-6)


def test_grad_and_param_norm_slots_stay_exact_through_rank_sums():
    """grad_norm = sqrt(grad_sq / grad_steps), param_norm = sqrt(param_sq / param_share): one rank's own values,
    R data-parallel replicas summed (weight 1 each) and R shards summed (weight 1/R each) all give the full norm;
    no weight (no optimizer step, not a flush step) is null; NaN squares (parameter-free experts) stay null."""
    E, R = 3, 4
    rng = np.random.default_rng(0)
    full = rng.uniform(0.1, 2.0, E)  # the experts' summed squares over 2 optimizer steps
    parts = rng.dirichlet(np.ones(R), size=E).T * full  # [R, E] the shards' squares

    def state(grad_sq, steps, param_sq=None, share=0.0):
        s = torch.zeros(metrics.state_size(E), dtype=torch.float64)
        metrics.put_norms(s, metrics.grad_slice(E), torch.tensor(grad_sq, dtype=torch.float32), steps)
        if param_sq is not None:
            metrics.put_norms(s, metrics.param_slice(E), torch.tensor(param_sq, dtype=torch.float32), share)
        return s

    one = state(full, 2, full * 7, 1.0)
    replicas = sum(state(full, 2, full * 7, 1.0) for _ in range(R))
    shards = sum(state(parts[r], 2 / R, parts[r] * 7, 1 / R) for r in range(R))
    nothing = state(np.zeros(E), 0)
    free = state(np.array([1.0, np.nan, 4.0]), 1, np.array([1.0, np.nan, 4.0]), 1.0)
    ex = metrics.finalize_layers(torch.stack([one, replicas, shards, nothing, free]), E, 1, has_bias=False)["experts"]
    for i in range(3):
        np.testing.assert_allclose(ex["grad_norm"][i].numpy(), np.sqrt(full / 2), rtol=1e-6)
        np.testing.assert_allclose(ex["param_norm"][i].numpy(), np.sqrt(full * 7), rtol=1e-6)
    assert ex["grad_norm"][3].isnan().all() and ex["param_norm"][3].isnan().all()
    assert ex["grad_norm"][4].tolist()[::2] == [1.0, 2.0] and ex["grad_norm"][4][1].isnan()
    assert ex["param_norm"][4][1].isnan()
    # the new slots sit between the margin histogram and the bias, which stays last
    off = metrics._offsets(E)
    assert off["grad_sq"] == off["margin_hist"] + metrics.MARGIN_BINS
    assert metrics.bias_slice(E).stop == metrics.state_size(E) == metrics.param_slice(E).stop + E
