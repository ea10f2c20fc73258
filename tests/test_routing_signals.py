"""The routing diagnostics (issue #14, signals 1-3): routing margin, gate mass, balancer override.

Each is checked against `reference`, an independent float64 numpy computation from the raw router outputs: on
hand-built routings (ties, masked experts, sentinel slots, padding, capacity drops, NaN scores, biased group-limited
selection), through the writer and loader (schema 2, and parts written before it), on real transformers models
(Mixtral and Qwen3-MoE: margins in logit space; DeepSeek-V3: a correction bias that changes choices inside its groups)
and on the reference model's aux-free mode. Rank sums are checked on real process groups in test_ranks_capture.py.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

import moewatch
from moewatch import metrics
from moewatch.capture.readers import deepseek_v3_selection
from moewatch.store.reader import hist_matrix
from moewatch.store.schema import EXPERTS, LAYERS, SCHEMAS

H = metrics.MARGIN_BINS
EDGES = np.array([0.05 * 2 ** (i / 2) for i in range(H - 1)])  # as docs/format.md states them


# ---------------------------------------------------------------------------------------------- float64 reference


def reference(E: int, ids, *, select=None, space: str = "logits", unbiased=None, weights=None, dropped=None,
              mask=None) -> dict[str, np.ndarray | float]:
    """The per-call sums behind the columns, token by token in float64 (no torch).

    margin: weakest chosen score - strongest unchosen score (x4 for sigmoid scores), clamped at 0; a token has one
    when it chose an expert, has no NaN score and has a finite unchosen score. override: a chosen expert whose
    unbiased score is below the k-th largest unbiased score. gate mass: weights of assignments received (in range,
    not dropped, not padding)."""
    ids = np.asarray(ids)
    T, K = ids.shape
    mask = np.ones(T, bool) if mask is None else np.asarray(mask)
    out: dict[str, np.ndarray | float] = dict(gate_mass=np.zeros(E), margin_sum=0.0, margin_tokens=0,
                                              hist=np.zeros(H), overridden=0, override_slots=0)
    for t in range(T):
        if not mask[t]:
            continue
        chosen = [int(e) for e in ids[t] if 0 <= e < E]
        for k in range(K):
            e = int(ids[t, k])
            if weights is not None and 0 <= e < E and not (dropped is not None and dropped[t, k]):
                w = float(weights[t, k])
                out["gate_mass"][e] += w if math.isfinite(w) else 0.0
        if select is not None and chosen:
            x = np.asarray(select[t], dtype=np.float64)
            unchosen = [x[e] for e in range(E) if e not in chosen]
            weakest, strongest = min(x[e] for e in chosen), max(unchosen, default=-math.inf)
            gap = (weakest - strongest) * (4.0 if space == "sigmoid" else 1.0)
            if not np.isnan(x).any() and math.isfinite(gap):
                gap = max(gap, 0.0)
                out["margin_sum"] += gap
                out["margin_tokens"] += 1
                out["hist"][int(np.searchsorted(EDGES, gap, side="right"))] += 1
        if unbiased is not None:
            u = np.asarray(unbiased[t], dtype=np.float64)
            if np.isnan(u).any():
                continue
            kth = np.sort(u)[::-1][K - 1]
            for e in chosen:
                out["override_slots"] += 1
                out["overridden"] += int(u[e] < kth)
    return out


def add(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def signal_vector(ref: dict | None, E: int) -> list[float]:
    """A reference as one row: gate_mass [E], margin_sum, margin_tokens, hist [H], overridden, override_slots."""
    if ref is None:
        return [0.0] * (E + 4 + H)
    return [*map(float, ref["gate_mass"]), float(ref["margin_sum"]), float(ref["margin_tokens"]),
            *map(float, ref["hist"]), float(ref["overridden"]), float(ref["override_slots"])]


def observed(E: int, K: int, calls: list[dict], has_bias: bool = False) -> tuple[dict, dict]:
    """(layer, experts) columns of one step made of `calls` (kwargs of metrics.observe), as the writer computes."""
    state = torch.zeros(metrics.state_size(E), dtype=torch.float64)
    for c in calls:
        metrics.observe(state, E, **c)
    out = metrics.finalize_layers(state.unsqueeze(0), E, K, has_bias)
    return ({k: v[0].numpy() for k, v in out["layer"].items()}, {k: v[0].numpy() for k, v in out["experts"].items()})


def assert_columns(layer: dict, experts: dict, ref: dict, gate: bool = True, margin: bool = True,
                   override: bool = True) -> None:
    """The recorded columns equal the reference sums (counts exactly, float sums to float64 rounding)."""
    if gate:
        np.testing.assert_allclose(experts["gate_mass"], ref["gate_mass"], rtol=1e-12, atol=1e-12)
    else:
        assert np.isnan(experts["gate_mass"]).all()
    n = ref["margin_tokens"]
    if margin and n:
        assert layer["margin_tokens"] == n
        np.testing.assert_array_equal(layer["margin_hist"], ref["hist"])
        np.testing.assert_allclose(layer["margin_mean"], ref["margin_sum"] / n, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(layer["near_tie_frac"], ref["hist"][0] / n, rtol=1e-12)
    else:
        assert np.isnan(layer["margin_mean"]) and np.isnan(layer["margin_tokens"]) and np.isnan(layer["margin_hist"]).all()
    if override and ref["override_slots"]:
        assert (layer["overridden"], layer["override_slots"]) == (ref["overridden"], ref["override_slots"])
        np.testing.assert_allclose(layer["override_frac"], ref["overridden"] / ref["override_slots"], rtol=1e-12)
    else:
        assert np.isnan(layer["override_frac"]) and np.isnan(layer["override_slots"])


# ---------------------------------------------------------------------------------------------- hand-built routings


def test_histogram_edges_are_the_documented_ones():
    np.testing.assert_allclose(metrics.margin_edges(), EDGES, rtol=1e-15)
    assert metrics.margin_edges()[0] == metrics.MARGIN_EPS == 0.05 and len(EDGES) == H - 1 == 15
    on_device = metrics._edges_on(torch.device("cpu"), torch.float64).numpy()
    np.testing.assert_allclose(on_device, EDGES, rtol=1e-15)


def test_ties_masked_experts_sentinels_padding_and_drops():
    E, K = 5, 2
    inf = math.inf
    select = torch.tensor([
        [2.0, 1.0, 1.0, 0.0, -1.0],      # a tie between the 2nd chosen and the best unchosen: margin 0
        [3.0, 2.5, 0.5, 0.4, 0.0],       # a clear margin (2.0)
        [1.0, 0.9, -inf, -inf, -inf],    # only K selectable experts: no margin
        [1.0, 0.98, 0.2, -inf, 0.1],     # masked expert 3 is no competitor: margin 0.78
        [0.5, 0.4, 0.3, 0.2, 0.1],       # a sentinel slot: the weakest *chosen* is expert 0 alone, margin 0.1
        [9.0, 8.0, 7.0, 6.0, 5.0],       # padding: nothing counts
        [float("nan"), 1.0, 0.5, 0.0, 0.0],  # NaN scores: no margin, no override check
        [0.3, 0.2, 0.1, 0.0, -0.1],      # the chosen set is not the top-k of these scores: margin clamped to 0
    ], dtype=torch.float64)
    ids = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1], [0, E], [0, 1], [1, 2], [0, 2]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.55, 0.45], [0.9, 0.1], [0.5, 0.5],
                            [0.5, float("nan")], [0.8, 0.2]], dtype=torch.float64)
    dropped = torch.zeros(8, K, dtype=torch.bool)
    dropped[1, 1] = True  # refused by capacity: no gate mass, still a choice for margin and override
    mask = torch.ones(8, dtype=torch.bool)
    mask[5] = False
    unbiased = select.flip(-1)  # a bias that overrode most choices
    kw = dict(weights_TK=weights, select_TE=select, unbiased_TE=unbiased)
    layer, experts = observed(E, K, [dict(indices_TK=ids, dropped_TK=dropped, token_mask_T=mask, **kw)])
    ref = reference(E, ids.numpy(), select=select.numpy(), unbiased=unbiased.numpy(), weights=weights.numpy(),
                    dropped=dropped.numpy(), mask=mask.numpy())
    assert ref["margin_tokens"] == 5 and ref["hist"][0] == 2  # rows 0 and 7 tie (7 clamped), 1, 3, 4 have margins
    assert_columns(layer, experts, ref)
    assert experts["gate_mass"][2] == 0.2  # its NaN weight counts 0; the dropped slot of expert 1 counts nothing
    np.testing.assert_allclose(layer["margin_mean"], (0 + 2.0 + 0.78 + 0.1 + 0) / 5, rtol=1e-12)


def test_sigmoid_space_is_in_logit_units_and_calls_add_up():
    g = torch.Generator().manual_seed(0)
    E, K, T = 8, 2, 60
    scores = torch.rand(T, E, generator=g)
    scores[::7, 3] = scores[::7, 4]  # exact ties
    bias = torch.randn(E, generator=g) * 0.05
    select = scores + bias
    ids = torch.topk(select, K).indices
    weights = scores.gather(1, ids)
    calls = [dict(indices_TK=ids[s], weights_TK=weights[s], select_TE=select[s], select_space="sigmoid",
                  unbiased_TE=scores[s]) for s in (slice(0, 13), slice(13, 40), slice(40, T))]
    layer, experts = observed(E, K, calls)
    ref = reference(E, ids.numpy(), select=select.numpy(), space="sigmoid", unbiased=scores.numpy(),
                    weights=weights.numpy())
    assert_columns(layer, experts, ref)
    assert 0 < ref["overridden"] < ref["override_slots"] and ref["margin_tokens"] == T
    whole, _ = observed(E, K, [dict(indices_TK=ids, weights_TK=weights, select_TE=select, select_space="sigmoid",
                                    unbiased_TE=scores)])
    np.testing.assert_array_equal(whole["margin_hist"], layer["margin_hist"])


def test_unrecorded_signals_stay_null_and_bf16_scores_are_read():
    E, K = 4, 2
    ids = torch.tensor([[0, 1], [2, 3]])
    layer, experts = observed(E, K, [dict(indices_TK=ids, logits_TE=torch.randn(2, E))])
    assert_columns(layer, experts, reference(E, ids.numpy()), gate=False, margin=False, override=False)
    select = torch.tensor([[1.0, 0.5, 0.25, 0.0], [0.0, 0.0, 2.0, 1.0]], dtype=torch.bfloat16)
    layer, experts = observed(E, K, [dict(indices_TK=ids, select_TE=select)])
    assert_columns(layer, experts, reference(E, ids.numpy(), select=select.float().numpy()), gate=False,
                   override=False)


def _group_select(scores: np.ndarray, bias: np.ndarray, G: int, k: int, fill: float = -np.inf,
                  per_group: int = 2) -> np.ndarray:
    """DeepSeek-V3's group-limited scores in float64: groups ranked by the sum of their `per_group` best biased
    scores, the experts of the other groups set to `fill` (-inf; LitGPT ranks them at 0.0)."""
    x = scores + bias
    T, E = x.shape
    out = np.full_like(x, fill)
    for t in range(T):
        grp = x[t].reshape(G, E // G)
        best = np.argsort(-np.sort(grp, axis=1)[:, -per_group:].sum(1), kind="stable")[:k]
        for gi in best:
            out[t, gi * (E // G):(gi + 1) * (E // G)] = x[t, gi * (E // G):(gi + 1) * (E // G)]
    return out


def test_biased_group_limited_selection_matches_a_float64_recomputation():
    g = torch.Generator().manual_seed(3)
    E, K, G, kg, T = 16, 4, 4, 2, 200
    logits = torch.randn(T, E, generator=g)
    router = SimpleNamespace(num_group=G, topk_group=kg, e_score_correction_bias=torch.randn(E, generator=g) * 0.3)
    select, space, unbiased = deepseek_v3_selection(router, logits)
    ids = torch.topk(select, K, sorted=False).indices  # the router's own last step
    layer, experts = observed(E, K, [dict(indices_TK=ids, select_TE=select, select_space=space,
                                         unbiased_TE=unbiased, weights_TK=torch.ones(T, K))])
    s64 = 1 / (1 + np.exp(-logits.double().numpy()))
    ref = reference(E, ids.numpy(), select=_group_select(s64, router.e_score_correction_bias.double().numpy(), G, kg),
                    space="sigmoid", unbiased=_group_select(s64, np.zeros(E), G, kg))
    assert layer["margin_tokens"] == ref["margin_tokens"] == T
    np.testing.assert_array_equal(layer["margin_hist"], ref["hist"])
    np.testing.assert_allclose(layer["margin_mean"], ref["margin_sum"] / T, rtol=1e-6)  # float32 vs float64 sigmoid
    assert (layer["overridden"], layer["override_slots"]) == (ref["overridden"], ref["override_slots"]) == (
        ref["overridden"], T * K)
    assert 0.05 < layer["override_frac"] < 0.95  # the bias (and the groups it picks) changed many choices
    assert np.isinf(select.numpy()).sum() == T * (G - kg) * (E // G)  # outside the allowed groups


# ---------------------------------------------------------------------------------------------- storage


def test_parts_written_before_schema_2_read_as_null_everywhere(tmp_path):
    """A resumed run whose old parts lack the columns: moewatch.load, pandas, pyarrow and duckdb read them as null."""
    from moewatch.reference import MoEConfig, MoEGPT

    cfg = MoEConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, d_model=16, n_experts=4, top_k=2, d_expert=8,
                    bias_update_rate=0.01)
    model = MoEGPT(cfg).train()
    x = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    with moewatch.attach(model, tmp_path, flush_steps=1) as watch:
        for _ in range(2):
            model(x).logits.sum().backward()
            watch.step()
    for table in (EXPERTS, LAYERS):  # make the first part of each table an old one: the v2 columns dropped
        first = sorted((tmp_path / table).glob("r*.parquet"))[0]
        t = pq.read_table(first)
        pq.write_table(t.drop([c for c in t.column_names if c in ("gate_mass", "margin_mean", "near_tie_frac",
                                                                 "margin_tokens", "margin_hist", "override_frac",
                                                                 "overridden", "override_slots")]), first)
    run = moewatch.load(tmp_path)
    ly = run.layers.sort_values("step")
    assert ly["margin_mean"].isna().tolist() == [True, False] and ly["margin_hist"].isna().tolist() == [True, False]
    assert ly["override_frac"].notna().tolist() == [False, True]
    ex = run.experts.sort_values("step")
    assert ex.groupby("step")["gate_mass"].count().tolist() == [0, 4]
    np.testing.assert_allclose(ex[ex.step == 1]["gate_mass"].sum(), 16.0)  # normalized top-2 weights, 16 tokens
    assert hist_matrix(ly["margin_hist"])[1].sum() == ly["margin_tokens"].iloc[1] == 16
    # pandas and pyarrow: the run's schema makes the columns the first (old) part lacks appear
    pdf = pd.read_parquet(tmp_path / LAYERS, schema=SCHEMAS[LAYERS]).sort_values("step")
    assert pdf["margin_tokens"].isna().tolist() == [True, False]
    pat = ds.dataset(tmp_path / LAYERS, schema=SCHEMAS[LAYERS]).to_table(columns=["step", "override_frac"])
    assert sorted(pat.to_pydict()["override_frac"], key=lambda v: v is not None)[0] is None
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(f"SELECT step, margin_hist FROM read_parquet('{tmp_path}/layers/r*.parquet', "
                      "union_by_name=true) ORDER BY step").fetchall()
    assert rows[0][1] is None and sum(rows[1][1]) == 16


def test_count_list_writer_round_trip():
    from moewatch.store.writer import count_lists

    m = np.array([[1.0, 2.0, 0.0], [np.nan, np.nan, np.nan], [3.0, 0.0, 5.0]])
    arr = count_lists(m)
    assert arr.type == pa.list_(pa.int64()) and arr.to_pylist() == [[1, 2, 0], None, [3, 0, 5]]


# ---------------------------------------------------------------------------------------------- real models


def _hook_outputs(routers: dict[str, torch.nn.Module]) -> tuple[dict[str, list], list]:
    calls: dict[str, list] = {n: [] for n in routers}
    def keep(mod, args, out, name):
        bias = getattr(mod, "e_score_correction_bias", None)  # as it was at this call (a balancer moves it later)
        calls[name].append((tuple(t.detach().clone() for t in out), None if bias is None else bias.detach().clone()))

    handles = [m.register_forward_hook(lambda mod, a, out, n=n: keep(mod, a, out, n)) for n, m in routers.items()]
    return calls, handles


def _run_and_compare(model, routers, inputs, tmp_path, ref_of, steps: int = 2, tol: float = 1e-12) -> pd.DataFrame:
    """Train `steps` steps under moewatch, hooking each router's raw outputs; compare every recorded step with the
    float64 reference `ref_of(name, output, bias)` summed over the step's calls."""
    calls, handles = _hook_outputs(routers)
    refs: dict[tuple[int, str], dict] = {}
    with moewatch.attach(model, tmp_path, flush_steps=100) as watch:
        for step in range(steps):
            model(**inputs).logits.float().square().mean().backward()
            for name, seen in calls.items():
                for out, bias in seen:
                    r = ref_of(name, out, None if bias is None else bias.double().numpy())
                    refs[(step, name)] = add(refs[(step, name)], r) if (step, name) in refs else r
                seen.clear()
            watch.step()
    for h in handles:
        h.remove()
    run = moewatch.load(tmp_path)
    assert_recorded(run, refs, tol)
    return run.layers


def assert_recorded(run, refs: dict[tuple[int, str], dict], tol: float = 1e-12) -> None:
    """Every (step, layer) of `refs` recorded as its reference says (see `reference`)."""
    ly, ex = run.layers, run.experts
    for (step, name), ref in refs.items():
        row = ly[(ly.step == step) & (ly.layer == name)].iloc[0]
        e = ex[(ex.step == step) & (ex.layer == name)].sort_values("expert")
        np.testing.assert_allclose(e["gate_mass"].to_numpy(float), ref["gate_mass"], rtol=tol, atol=1e-9)
        assert row.margin_tokens == ref["margin_tokens"] > 0
        np.testing.assert_array_equal(np.asarray(row.margin_hist), ref["hist"])
        np.testing.assert_allclose(row.margin_mean, ref["margin_sum"] / ref["margin_tokens"], rtol=tol)
        if ref["override_slots"]:
            assert (row.overridden, row.override_slots) == (ref["overridden"], ref["override_slots"])
        else:
            assert math.isnan(row.override_frac)


@pytest.mark.parametrize("case_id", ["mixtral", "qwen3_moe"])
def test_softmax_routers_margin_in_logit_space(case_id, tmp_path):
    pytest.importorskip("transformers")
    from hf_tiny import CASES, build, inputs
    from test_hf_models import router_modules

    case = next(c for c in CASES if c.id == case_id)
    model = build(case)
    routers = router_modules(model, case)

    def ref_of(name, out, bias):
        logits, weights, ids = out
        return reference(case.experts, ids.numpy(), select=logits.double().numpy(), weights=weights.double().numpy())

    ly = _run_and_compare(model, routers, inputs(case), tmp_path, ref_of)
    assert ly["override_frac"].isna().all()  # no correction bias: null, not 0


def test_deepseek_v3_override_with_a_bias_that_changes_choices(tmp_path):
    pytest.importorskip("transformers")
    from hf_tiny import CASES, build, inputs
    from test_hf_models import router_modules

    case = next(c for c in CASES if c.id == "deepseek_v3")
    model = build(case)  # 8 experts in 4 groups, 2 groups allowed, top-2
    routers = router_modules(model, case)
    g = torch.Generator().manual_seed(7)
    for r in routers.values():
        torch.nn.init.normal_(r.weight, std=0.5, generator=g)  # the zero init would tie every score
        r.e_score_correction_bias.copy_(torch.randn(r.num_experts, generator=g) * 0.3)
    G, kg = routers[next(iter(routers))].num_group, routers[next(iter(routers))].topk_group

    def ref_of(name, out, bias):
        logits, weights, ids = out
        s = 1 / (1 + np.exp(-logits.double().numpy()))
        return reference(case.experts, ids.numpy(), select=_group_select(s, bias, G, kg), space="sigmoid",
                         unbiased=_group_select(s, np.zeros_like(bias), G, kg), weights=weights.double().numpy())

    # The float32 router and the float64 reference agree on every choice, group and bin here; margins to 1e-6.
    ly = _run_and_compare(model, routers, inputs(case), tmp_path, ref_of, tol=1e-6)
    assert (ly["override_frac"] > 0.1).all() and (ly["override_frac"] < 1).all()


def test_reference_model_aux_free_mode(tmp_path):
    from moewatch.reference import MoEConfig, MoEGPT
    from moewatch.reference.model import Router

    cfg = MoEConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, d_model=16, n_experts=6, top_k=2, d_expert=8,
                    bias_update_rate=0.05, capacity_factor=1.0, router_init_std=0.5)
    model = MoEGPT(cfg).train()
    routers = {n: m for n, m in model.named_modules() if isinstance(m, Router)}
    calls, handles = _hook_outputs(routers)
    x = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(0))
    refs: dict[tuple[int, str], dict] = {}
    weights_seen: dict[str, list] = {n: [] for n in routers}
    for n in routers:  # the weights the MoE layer really combines with: its experts' input
        moe = dict(model.named_modules())[n.rpartition(".")[0]]
        orig = moe.experts
        moe.experts = (lambda x_TD, ids, w, orig=orig, n=n: (weights_seen[n].append(w.detach().clone()),
                                                              orig(x_TD, ids, w))[1])
    with moewatch.attach(model, tmp_path) as watch:
        for step in range(4):
            model(x).logits.square().mean().backward()
            for r in routers.values():
                r.update_bias()  # the aux-free balancer moves the bias between steps
            for name, seen in calls.items():
                for ((logits, _, ids, dropped), bias), w in zip(seen, weights_seen[name], strict=True):
                    # the router ranks logits + bias summed in float32: that sum, exactly, in float64
                    refs[(step, name)] = reference(6, ids.numpy(), select=(logits + bias).double().numpy(),
                                                   unbiased=logits.double().numpy(), weights=w.double().numpy(),
                                                   dropped=dropped.numpy())
                seen.clear()
                weights_seen[name].clear()
            watch.step()
    for h in handles:
        h.remove()
    run = moewatch.load(tmp_path)
    for (step, name), ref in refs.items():
        row = run.layers[(run.layers.step == step) & (run.layers.layer == name)].iloc[0]
        e = run.experts[(run.experts.step == step) & (run.experts.layer == name)].sort_values("expert")
        np.testing.assert_allclose(e["gate_mass"].to_numpy(float), ref["gate_mass"], rtol=1e-12)
        assert (row.overridden, row.override_slots) == (ref["overridden"], ref["override_slots"]) and row.margin_tokens == 64
        np.testing.assert_array_equal(np.asarray(row.margin_hist), ref["hist"])
        np.testing.assert_allclose(row.margin_mean, ref["margin_sum"] / 64, rtol=1e-12)
    last = run.layers[run.layers.step == 3]
    assert (last["override_frac"] > 0).all()  # the bias moved and overrides choices by step 3
    assert (run.layers[run.layers.step == 0]["override_frac"] == 0).all()  # a zero bias overrides nothing
    # the report's per-layer table and JSON carry the last window's values
    from moewatch.detect import DetectorConfig
    from moewatch.report import build_report, render_json, render_text

    rep = build_report(tmp_path, DetectorConfig(window_steps=2, warmup_steps=0, min_window_load=1.0))
    layer = json.loads(render_json([rep]))["runs"][0]["layers"][0]
    assert {"margin_mean", "near_tie_frac", "override_frac"} <= set(layer) and layer["override_frac"] > 0
    assert "margin" in render_text([rep]) and "—" not in render_text([rep]).split("Alerts")[0]


def test_reference_model_noisy_topk_leaves_margin_and_override_null(tmp_path):
    from moewatch.reference import MoEConfig, MoEGPT

    cfg = MoEConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, d_model=16, n_experts=4, top_k=2, d_expert=8,
                    router_noise="noisy_topk")
    model = MoEGPT(cfg).train()
    with moewatch.attach(model, tmp_path) as watch:
        model(torch.randint(0, 32, (2, 8))).logits.sum().backward()
        watch.step()
    run = moewatch.load(tmp_path)
    assert run.layers["margin_mean"].isna().all() and run.layers["override_frac"].isna().all()
    assert run.experts["gate_mass"].notna().all()  # the gate weights are still the router's own


# ---------------------------------------------------------------------------------------------- training stacks


def _stack_run(model, router_cls, tmp_path, ref_of, batch, steps: int = 2, before_step=None) -> None:
    """Train `steps` steps of a stack model under moewatch; each router call's (args, kwargs, output) gives its
    float64 reference through `ref_of`; compare every recorded step."""
    names = {m: n for n, m in model.named_modules()}
    seen: list[tuple[str, dict]] = []

    def hook(mod, args, kwargs, out):
        seen.append((names[mod], ref_of(mod, args, kwargs, out)))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules() if isinstance(m, router_cls)]
    refs: dict[tuple[int, str], dict] = {}
    with moewatch.attach(model, tmp_path) as watch:
        for step in range(steps):
            if before_step is not None:
                before_step(step)
            model(batch).float().square().mean().backward()
            for name, r in seen:
                refs[(step, name)] = add(refs[(step, name)], r) if (step, name) in refs else r
            seen.clear()
            watch.step()
    for h in handles:
        h.remove()
    run = moewatch.load(tmp_path)
    assert_recorded(run, refs)
    assert run.layers["override_frac"].between(0.05, 0.95).all()


def test_torchtitan_sigmoid_router_with_expert_bias_and_node_limit(tmp_path):
    """torchtitan ranks scores + expert_bias within its num_limited_groups best groups (DeepSeek-V3 style)."""
    pytest.importorskip("torchtitan")
    from tests.test_stacks_torchtitan import VOCAB, TitanLM, TokenChoiceTopKRouter

    torch.manual_seed(0)
    model = TitanLM("sigmoid", 4).train()
    E = 8

    def ref_of(mod, args, kwargs, out):
        top, ids, scores = (t.detach().reshape(-1, t.shape[-1]) for t in out)
        bias = args[1] if len(args) > 1 else kwargs["expert_bias_E"]
        chosen = (scores + bias).double().numpy()  # the router's own float32 sum, then its group rule in float64
        s64 = scores.double().numpy()
        return reference(E, ids.numpy(), select=_group_select(chosen, 0.0, 4, 2), space="sigmoid",
                         unbiased=_group_select(s64, 0.0, 4, 2), weights=top.double().numpy())

    def set_bias(step):
        for moe in model.layers:
            moe.expert_bias_E.copy_(torch.randn(E, generator=torch.Generator().manual_seed(step)) * 0.2)

    _stack_run(model, TokenChoiceTopKRouter, tmp_path, ref_of, torch.randint(0, VOCAB, (2, 12)),
               before_step=set_bias)


def test_litgpt_grouped_router_ranks_masked_groups_at_zero(tmp_path):
    pytest.importorskip("litgpt")
    from tests.test_stacks_litgpt import VOCAB, GroupedTopkRouter, tiny_gpt

    torch.manual_seed(0)
    model = tiny_gpt(grouped=True).train()
    E = 4

    def ref_of(mod, args, kwargs, out):
        with torch.no_grad():  # the router's own op, on its input
            logits = torch.nn.functional.linear(args[0].float(), mod.weight.float()).reshape(-1, E)
        scores = logits.sigmoid()
        biased = (scores + mod.e_score_correction_bias.unsqueeze(0)).double().numpy()
        cfg = mod.config
        group = dict(G=cfg.n_expert_groups, k=cfg.n_topk_groups, fill=0.0, per_group=cfg.n_topk_scores_per_group)
        return reference(E, out[1].reshape(-1, 2).numpy(), select=_group_select(biased, 0.0, **group),
                         space="sigmoid", unbiased=_group_select(scores.double().numpy(), 0.0, **group),
                         weights=out[0].detach().reshape(-1, 2).double().numpy())

    _stack_run(model, GroupedTopkRouter, tmp_path, ref_of, torch.randint(0, VOCAB, (2, 12)))
