"""Router discovery and reading on real transformers MoE models, built tiny from configs (no downloads).

For every architecture in `hf_tiny.CASES`: discovery finds exactly the modules of the architecture's router class
(looked up by class name here, independently), with the right E and K, and the counts moewatch's probes read over
one training forward equal the counts taken independently from the router's own outputs (a separate forward hook
per router, counted with bincount or by re-running the router's own selection algorithm: Switch and NLLB capacity,
ZAYA's skip class). A subset also runs end to end through `moewatch.attach` / `moewatch.load`.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import CASES, Case, build, inputs  # noqa: E402

import moewatch  # noqa: E402
from moewatch import metrics  # noqa: E402
from moewatch.capture.discovery import discover  # noqa: E402

BY_ID = {c.id: c for c in CASES}


# The architectures the issue names, plus the odd routers (capacity, product keys, skip class, hash routing).
END_TO_END = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "switch_transformers", "dbrx",
              "llama4", "jetmoe", "nllb_moe", "doge", "zaya", "deepseek_v4", "gemma4"]


def router_modules(model: torch.nn.Module, case: Case) -> dict[str, torch.nn.Module]:
    """The architecture's routers, found by class name or name suffix (independently of moewatch)."""
    names = (case.router,) if isinstance(case.router, str) else case.router
    return {n: m for n, m in model.named_modules()
            if type(m).__name__ in names or any(x.startswith(".") and n.endswith(x) for x in names)}


def capture(case: Case, model: torch.nn.Module) -> tuple[dict[str, list], list]:
    """Hooks that keep each router's raw (args, output) per call (DBRX: its experts'; Doge: its embedding lookup)."""
    calls: dict[str, list] = defaultdict(list)
    handles = []
    named = dict(model.named_modules())
    for name, m in router_modules(model, case).items():
        target = m
        parent = named[name.rpartition(".")[0]]
        if case.truth == "experts_input":  # DBRX: the choice is only visible where the experts receive it
            target = parent.experts
        elif case.truth == "embed_input":  # Doge: the chosen experts' embeddings are looked up
            target = parent.down_embed

        def hook(mod, args, out, name=name):
            calls[name].append((args, out))

        handles.append(target.register_forward_hook(hook))
    return calls, handles


def _bincount(ids: torch.Tensor, E: int) -> torch.Tensor:
    ids = ids.reshape(-1).long()
    return torch.bincount(ids[(ids >= 0) & (ids < E)], minlength=E)


def _nllb_truth(router, out, real=None) -> tuple[torch.Tensor, torch.Tensor]:
    """NLLB-MoE's top-2 routing with capacity, recomputed from its logits ("all" policy, no batch priority).

    `real` (bool [T]) marks non-padding tokens: NLLB zeroes the dispatch of padding before capacity.
    """
    top1_mask, combine, logits = out
    E = logits.shape[-1]
    top1 = torch.softmax(logits.float(), -1).argmax(-1)
    top2 = logits.masked_fill(torch.nn.functional.one_hot(top1, E).bool(), float("-inf")).argmax(-1)
    m1, m2 = torch.nn.functional.one_hot(top1, E), torch.nn.functional.one_hot(top2, E)
    if real is not None:
        m1, m2 = m1 * real.unsqueeze(-1), m2 * real.unsqueeze(-1)
    loc1 = torch.cumsum(m1, 0) - 1
    loc2 = torch.cumsum(m2, 0) - 1 + m1.sum(0, keepdim=True)
    kept1 = m1.bool() & (loc1 < router.expert_capacity)
    kept2 = m2.bool() & (loc2 < router.expert_capacity)
    assert torch.equal(kept1.long(), top1_mask.long()), "recomputed NLLB dispatch differs from the router's"
    assert torch.equal(kept2, (combine != 0) & m2.bool())
    tokens = (kept1 | kept2).sum(0)
    dropped = ((m1.bool() & ~kept1) | (m2.bool() & ~kept2)).sum(0)
    return tokens, dropped


def truth_counts(case: Case, model: torch.nn.Module, calls: dict[str, list]) -> dict[str, tuple]:
    """Per router: (assignments per expert, capacity drops per expert), counted from its captured outputs."""
    E = case.experts
    routers = router_modules(model, case)
    result = {}
    for name, outs in calls.items():
        tokens = torch.zeros(E, dtype=torch.long)
        dropped = torch.zeros(E, dtype=torch.long)
        for args, out in outs:
            if case.truth == "indices":
                tokens += _bincount(out[2], E)
            elif case.truth in ("experts_input", "embed_input"):
                tokens += _bincount(args[1] if case.truth == "experts_input" else args[0], E)
            elif case.truth == "nonzero_scores":
                tokens += (out[0] != 0).sum(dim=0)
            elif case.truth == "expert_size":
                tokens += torch.tensor(out[3])
            elif case.truth == "switch":
                # Switch's algorithm, recomputed: argmax of the softmax, then per-sequence capacity.
                mask, logits = out[0], out[2]
                choice = torch.softmax(logits.float(), dim=-1).argmax(dim=-1)
                onehot = torch.nn.functional.one_hot(choice, E)
                kept = (torch.cumsum(onehot, dim=-2) <= routers[name].expert_capacity) & onehot.bool()
                assert torch.equal(kept.long(), mask.long()), "recomputed Switch dispatch differs from the router's"
                tokens += kept.reshape(-1, E).sum(dim=0)
                dropped += (onehot.bool() & ~kept).reshape(-1, E).sum(dim=0)
            elif case.truth == "nllb":
                t, d = _nllb_truth(routers[name], out)
                tokens, dropped = tokens + t, dropped + d
            elif case.truth == "zaya":
                # ZAYA's choice, recomputed: top-k of softmax + balancing biases over E experts + 1 skip class.
                logits, weights, ids = out[0], out[1], out[2]
                choice = torch.topk(torch.softmax(logits, -1) + routers[name].balancing_biases, case.top_k).indices
                skip = choice == E - 1
                assert torch.equal(ids[~skip], choice[~skip]) and bool((weights[skip] == 0).all())
                tokens += _bincount(choice, E)
            else:
                raise AssertionError(case.truth)
        result[name] = (tokens, dropped)
    return result


def probe_counts(specs, model, run, states: dict | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Counts from moewatch's own probes, accumulated with `metrics.observe` as the Watch does (without its I/O);
    the accumulators are left in `states` when given."""
    states = {} if states is None else states
    handles = []
    for s in specs:
        state = states[s.name] = torch.zeros(metrics.state_size(s.num_experts), dtype=torch.float64)
        for p in s.probes:
            def hook(mod, args, kwargs, out, p=p, s=s, state=state):
                with torch.no_grad():
                    r = p.read(mod, args, kwargs, out)
                    if r is not None:
                        metrics.observe(state, s.num_experts, logits_TE=r.logits_TE, probs_TE=r.probs_TE,
                                        indices_TK=r.indices_TK, dropped_TK=r.dropped_TK, scoring=r.scoring,
                                        token_mask_T=r.token_mask_T, weights_TK=r.weights_TK, select_TE=r.select_TE,
                                        select_space=r.select_space, unbiased_TE=r.unbiased_TE)

            handles.append(p.module.register_forward_hook(hook, with_kwargs=True))
    run()
    for h in handles:
        h.remove()
    E = {s.name: s.num_experts for s in specs}
    return {n: (st[: E[n]].long(), st[E[n] : 2 * E[n]].long()) for n, st in states.items()}


def check_discovery(case: Case, model: torch.nn.Module):
    expected = router_modules(model, case)
    assert len(expected) == case.routers, f"the tiny {case.id} should have {case.routers} routers"
    specs = discover(model)
    assert sorted(s.name for s in specs) == sorted(expected)
    for s in specs:
        assert (s.num_experts, s.top_k) == (case.experts, case.top_k), s.name
        assert s.probes[0].module is expected[s.name]
    return specs


def recorded_forward(case: Case, model, run_dir):
    """One training forward seen by moewatch and by independent hooks: (watch, raw router calls, recorded rows)."""
    watch = moewatch.attach(model, run_dir)
    calls, handles = capture(case, model)
    model(**inputs(case))
    watch.step()
    watch.close()
    for h in handles:
        h.remove()
    return watch, calls, moewatch.load(run_dir).experts


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_discovery_and_counts(case: Case):
    model = build(case)
    specs = check_discovery(case, model)

    calls, handles = capture(case, model)
    combined = combine_weights(case, model)
    states: dict[str, torch.Tensor] = {}
    got = probe_counts(specs, model, lambda: model(**inputs(case)), states)
    for h in handles:
        h.remove()
    truth = truth_counts(case, model, calls)
    assert sum(int(t.sum()) for t, _ in truth.values()) > 0
    if case.truth in ("switch", "nllb"):  # the tiny capacity must actually drop tokens for this test to mean much
        assert sum(int(d.sum()) for _, d in truth.values()) > 0
    for name, (tokens, dropped) in truth.items():
        assert got[name][0].tolist() == tokens.tolist(), name
        assert got[name][1].tolist() == dropped.tolist(), name
    check_routing_signals(case, model, specs, states, calls, combined)


def combine_weights(case: Case, model: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """Per router, the float [.., K] weights its sibling experts module receives (the weights it combines with)."""
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)
    named = dict(model.named_modules())
    for name in router_modules(model, case):
        experts = getattr(named[name.rpartition(".")[0]], "experts", None)
        if case.truth == "indices" and isinstance(experts, torch.nn.Module):
            def hook(mod, args, kwargs, out, name=name):
                for x in (*args, *kwargs.values()):
                    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 2 and \
                            x.shape[-1] == case.top_k:
                        seen[name].append(x.detach().clone())
            experts.register_forward_hook(hook, with_kwargs=True)
    return seen


def check_routing_signals(case: Case, model, specs, states, calls, combined) -> None:
    """Gate mass where the router hands its combine weights over (the [.., K] weights output, equal to what its
    experts receive), margin where its selection recipe is known exactly (`hf.selection_recipe`), override where
    that recipe has a correction bias; null everywhere else."""
    from moewatch.capture.hf import selection_recipe

    routers = router_modules(model, case)
    for s in specs:
        E, K = s.num_experts, s.top_k
        out = metrics.finalize_layers(states[s.name].unsqueeze(0), E, K, has_bias=False)
        layer, gate = out["layer"], out["experts"]["gate_mass"][0]
        recipe = selection_recipe(type(routers[s.name]))
        outs = [o for _, o in calls[s.name]]
        if not outs:  # a router this input never reaches (Ernie-VL's vision experts): nothing recorded
            assert torch.isnan(gate).all() and torch.isnan(layer["margin_tokens"]).all()
            continue
        if case.truth == "indices":
            w = torch.cat([o[1].reshape(-1, K).double() for o in outs])
            ids = torch.cat([o[2].reshape(-1, K) for o in outs])
            if combined.get(s.name):  # the router's weights are exactly what its experts combine with
                assert torch.equal(torch.cat([c.reshape(-1, K) for c in combined[s.name]]).double(), w), s.name
            expected = torch.zeros(E, dtype=torch.float64).index_add_(0, ids.reshape(-1), w.reshape(-1))
            torch.testing.assert_close(gate, expected, rtol=1e-12, atol=1e-12)
        r = routers[s.name]
        # A group limit that leaves exactly K selectable experts leaves no unchosen competitor: no margin (by design).
        competitors = recipe is not None and (recipe != "deepseek_v3" or r.topk_group * E // r.num_group > K)
        assert (layer["margin_tokens"][0] > 0).item() == competitors, s.name
        assert (layer["override_slots"][0] > 0).item() == (recipe == "deepseek_v3"), s.name
        # What the spec declares (`moewatch.inspect`'s measures) is what was recorded: each signal iff its column.
        recorded = {"gate_mass": not torch.isnan(gate).all().item(), "margin": not layer["margin_mean"].isnan().all(),
                    "override": not layer["override_frac"].isnan().all(),
                    "logits": not layer["z_loss"].isnan().all()}  # the logits' z-loss: none from probabilities
        assert {m for m in s.measures if m in recorded} == {m for m, v in recorded.items() if v}, s.name


@pytest.mark.parametrize("case_id", END_TO_END)
def test_attach_records_actual_choice(case_id: str, tmp_path):
    case = BY_ID[case_id]
    model = build(case)
    # One training forward seen by both moewatch and the independent hooks (jitter noise differs between forwards).
    watch, calls, rows = recorded_forward(case, model, tmp_path / "run")
    assert sorted(watch.routers) == sorted(router_modules(model, case))
    truth = truth_counts(case, model, calls)
    for name, (tokens, dropped) in truth.items():
        got = rows[rows.layer == name].sort_values("expert")
        assert got.expert.tolist() == list(range(case.experts))
        assert got.tokens.tolist() == tokens.tolist(), name
        assert got.dropped.tolist() == dropped.tolist(), name


def test_nllb_padding_is_not_counted_as_drops():
    """NLLB's router zeroes the dispatch of padding tokens; moewatch masks them out instead of recording drops."""
    case = BY_ID["nllb_moe"]
    model = build(case)
    kw = inputs(case)
    attention_mask = torch.ones_like(kw["input_ids"])
    attention_mask[0, -3:] = 0
    specs = discover(model)
    calls, handles = capture(case, model)
    got = probe_counts(specs, model, lambda: model(**kw, attention_mask=attention_mask))
    for h in handles:
        h.remove()
    routers = router_modules(model, case)
    encoder = [n for n in routers if n.startswith("encoder.")]
    assert len(encoder) == 2
    real = attention_mask.reshape(-1).bool()
    for name in encoder:
        ((_, out),) = calls[name]
        tokens, dropped = _nllb_truth(routers[name], out, real)
        assert got[name][0].tolist() == tokens.tolist(), name
        assert got[name][1].tolist() == dropped.tolist(), name
        assert int(tokens.sum() + dropped.sum()) == int(real.sum()) * case.top_k


def _set_biases(model, cls_name: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    biases = {}
    for name, m in model.named_modules():
        if type(m).__name__ == cls_name:
            m.e_score_correction_bias.copy_(torch.randn(m.e_score_correction_bias.shape, generator=g) * 2)
            biases[name] = m.e_score_correction_bias.clone()
    return biases


def test_deepseek_v3_counts_bias_corrected_group_limited_choice(tmp_path):
    case = BY_ID["deepseek_v3"]
    model = build(case)
    biases = _set_biases(model, case.router, seed=3)
    _, calls, rows = recorded_forward(case, model, tmp_path / "run")
    truth = truth_counts(case, model, calls)
    naive_differs = False
    for name, (tokens, _) in truth.items():
        got = rows[rows.layer == name].sort_values("expert")
        assert got.tokens.tolist() == tokens.tolist(), name
        assert got.bias.tolist() == pytest.approx(biases[name].tolist())
        logits = calls[name][0][1][0]
        naive = _bincount(torch.topk(logits, case.top_k).indices, case.experts)
        naive_differs |= naive.tolist() != tokens.tolist()
    assert naive_differs, "the bias should change the choice, else this test cannot tell the two apart"


@pytest.mark.parametrize("case_id, scoring", [("mixtral", "softmax"), ("deepseek_v3", "sigmoid"),
                                               ("glm4_moe", "sigmoid"), ("afmoe", "sigmoid"),
                                               ("laguna", "sigmoid"), ("qwen3_moe", "softmax")])
def test_router_distribution_follows_scoring(case_id: str, scoring: str, tmp_path):
    """prob_mean is the mean of softmax(logits), or of sigmoid(logits) normalized per token for sigmoid routers."""
    case = BY_ID[case_id]
    model = build(case)
    _, calls, rows = recorded_forward(case, model, tmp_path / "run")
    for name, outs in calls.items():
        logits = torch.cat([out[0].reshape(-1, case.experts) for _, out in outs]).double()
        if scoring == "softmax":
            p = torch.softmax(logits, -1)
        else:
            p = torch.sigmoid(logits)
            p = p / p.sum(-1, keepdim=True)
        got = rows[rows.layer == name].sort_values("expert").prob_mean.tolist()
        assert got == pytest.approx(p.mean(0).tolist(), abs=1e-5), name


def test_llama4_reads_choice_from_nonzero_scores():
    """Llama-4's router returns (scores, logits): the layer is the router, the choice its non-zero scores."""
    case = BY_ID["llama4"]
    model = build(case)
    specs = discover(model)
    assert all(s.kind == "transformers" and len(s.probes) == 1 for s in specs)
    p = specs[0].probes[0]
    seen = {}

    def hook(m, a, kw, o):
        seen["out"], seen["r"] = o, p.read(m, a, kw, o)

    h = p.module.register_forward_hook(hook, with_kwargs=True)
    model(**inputs(case))
    h.remove()
    (scores, logits), r = seen["out"], seen["r"]
    assert r.scoring == "sigmoid"
    assert torch.equal(r.logits_TE, logits)
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, r.indices_TK, True)
    assert torch.equal(chosen, scores != 0)


def test_dbrx_layer_is_the_router_choice_from_experts_input():
    case = BY_ID["dbrx"]
    model = build(case)
    specs = discover(model)
    for s in specs:
        assert s.name.endswith("ffn.router")
        assert [type(p.module).__name__ for p in s.probes] == ["DbrxRouter", "DbrxExperts"]


def test_output_router_logits_agree_with_probes():
    """transformers' own OutputRecorder view of the logits is what moewatch reads as logits."""
    case = BY_ID["qwen3_moe"]
    model = build(case)
    specs = discover(model)
    seen = {}

    def keep(name, read):
        def hook(m, a, kw, o):
            seen[name] = read(m, a, kw, o)  # returns None: a hook's return value would replace the output

        return hook

    handles = [s.probes[0].module.register_forward_hook(keep(s.name, s.probes[0].read), with_kwargs=True)
               for s in specs]
    out = model(**inputs(case), output_router_logits=True)
    for h in handles:
        h.remove()
    assert len(out.router_logits) == len(specs)
    for s, logits in zip(specs, out.router_logits, strict=True):
        assert torch.equal(seen[s.name].logits_TE, logits.reshape(-1, case.experts))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case_id", ["mixtral", "deepseek_v3", "switch_transformers", "dbrx", "llama4", "jetmoe",
                                     "nllb_moe", "doge", "zaya", "gemma4", "deepseek_v4"])
def test_readers_do_not_sync_on_cuda(case_id: str):
    """Every probe's read runs under CUDA sync-debug "error" (the models themselves may sync; only reads are checked)."""
    case = BY_ID[case_id]
    model = build(case).cuda()
    specs = discover(model)
    reads = []
    handles = []
    for s in specs:
        for p in s.probes:
            def hook(m, a, kw, o, p=p):
                torch.cuda.set_sync_debug_mode("error")
                try:
                    with torch.no_grad():
                        reads.append(p.read(m, a, kw, o))
                finally:
                    torch.cuda.set_sync_debug_mode("default")

            handles.append(p.module.register_forward_hook(hook, with_kwargs=True))
    model(**{k: v.cuda() for k, v in inputs(case).items()})
    for h in handles:
        h.remove()
    got = [r for r in reads if r is not None and r.indices_TK is not None]
    assert got and all(r.indices_TK.is_cuda for r in got)
    # and their accumulation, routing diagnostics included (margin, gate mass, override: deepseek_v3 has all three)
    state = torch.zeros(metrics.state_size(case.experts), dtype=torch.float64, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for r in got:
            metrics.observe(state, case.experts, logits_TE=r.logits_TE, probs_TE=r.probs_TE, indices_TK=r.indices_TK,
                            dropped_TK=r.dropped_TK, scoring=r.scoring, token_mask_T=r.token_mask_T,
                            weights_TK=r.weights_TK, select_TE=r.select_TE, select_space=r.select_space,
                            unbiased_TE=r.unbiased_TE)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("module, config, model_cls", [
    ("qwen3_vl_moe", "Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration"),
    ("llama4", "Llama4Config", "Llama4ForConditionalGeneration"),
    ("glm4v_moe", "Glm4vMoeConfig", "Glm4vMoeForConditionalGeneration"),
])
def test_vision_language_wrappers_expose_only_text_routers(module: str, config: str, model_cls: str):
    """Discovery on the full multimodal model finds the language model's routers and nothing in the vision tower."""
    import importlib

    cm = importlib.import_module(f"transformers.models.{module}.configuration_{module}")
    mm = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    Config = getattr(cm, config)
    text = build(BY_ID[module]).config
    vision_defaults = Config().vision_config.to_dict()
    small = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, out_hidden_size=32, num_hidden_layers=1,
                 num_attention_heads=2, projector_input_dim=32, projector_output_dim=32, vision_output_dim=32,
                 image_size=16, patch_size=8, deepstack_visual_indexes=[0])
    cfg = Config(text_config=text.to_dict(), vision_config={k: v for k, v in small.items() if k in vision_defaults})
    model = getattr(mm, model_cls)(cfg)
    specs = discover(model)
    routers = router_modules(model, BY_ID[module])
    assert len(routers) == 2 and sorted(s.name for s in specs) == sorted(routers)
