"""GPU checks (skipped without CUDA): moewatch adds no host sync to a training step."""

import pytest
import torch

import moewatch
from moewatch.capture.watch import Watch, WatchConfig
from tests.toy import ToyMoE, toy_specs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_training_steps_with_moewatch_never_sync(tmp_path):
    torch.manual_seed(0)
    model = ToyMoE(d=32, num_experts=8, capacity=8).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = Watch(model, tmp_path, toy_specs(model), WatchConfig(flush_steps=3))
    x = torch.randn(4, 16, 32, device="cuda")
    model(x).sum().backward()  # warm-up outside the check (lazy CUDA init allocates and syncs)
    opt.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(7):  # includes two flushes (pinned copy + event)
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
            watch.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    watch.close()
    run = moewatch.load(tmp_path)
    assert run.layers.step.nunique() == 8  # the warm-up forward is closed as a final step
    assert (run.experts.groupby(["step", "layer"])["tokens"].sum() > 0).all()


def test_hf_mixtral_hooks_and_step_never_sync(tmp_path):
    """transformers' own expert loop syncs, so the check is switched on around moewatch's code only."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, num_local_experts=8,
                                        num_experts_per_tok=2)
    model = transformers.MixtralForCausalLM(config).cuda().train()
    watch = moewatch.attach(model, tmp_path, flush_steps=2)
    inner_observe, inner_step = watch._observe, watch.step

    def checked(fn):
        def run(*a, **k):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return run

    ids = torch.randint(0, 128, (2, 16), device="cuda")
    model(input_ids=ids, labels=ids).loss.backward()
    watch.step()
    watch._observe, watch.step = checked(inner_observe), checked(inner_step)
    for state in watch._layers.values():
        for probe in state.spec.probes:  # the readers run in the hooks, before _observe
            object.__setattr__(probe, "read", checked(probe.read))
    for _ in range(4):
        model(input_ids=ids, labels=ids).loss.backward()
        watch.step()
    watch.close()
    assert moewatch.load(tmp_path).layers.step.nunique() == 5
