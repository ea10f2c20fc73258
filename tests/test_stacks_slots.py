"""The stack readers' building blocks on hand-made tensors: per-expert counts turned into slots (`count_slots`), kept
(token, expert) cells, drop-only slots, and that they add up to the right per-expert tokens and drops in a run. The
``gpu`` test checks they issue no host sync. No training stack needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moewatch import metrics
from moewatch.capture.stack_readers import count_slots, drops_only, kept_cells
from moewatch.capture.types import Routing

E = 4


def observe(*routings: Routing, num_experts: int = E) -> dict[str, np.ndarray]:
    state = torch.zeros(metrics.state_size(num_experts), dtype=torch.float64)
    for r in routings:
        metrics.observe(state, num_experts, indices_TK=r.indices_TK, dropped_TK=r.dropped_TK,
                        token_mask_T=r.token_mask_T)
    off = metrics._offsets(num_experts)
    return {"tokens": state[:num_experts].numpy(), "dropped": state[num_experts : 2 * num_experts].numpy(),
            "sentinel": state[off["sentinel"]].item(), "slots": (state[: 2 * num_experts].sum()
                                                                 + state[off["sentinel"]]).item()}


def test_count_slots_gives_exact_per_expert_tokens_and_drops():
    routed = torch.tensor([5, 0, 7, 4])
    kept = torch.tensor([3, 0, 7, 1])
    r = count_slots(routed, kept, 16)
    got = observe(r)
    np.testing.assert_array_equal(got["tokens"], [3, 0, 7, 1])
    np.testing.assert_array_equal(got["dropped"], [2, 0, 0, 3])
    assert got["sentinel"] == 0 and got["slots"] == 16


def test_count_slots_masks_slots_past_the_routed_total():
    """Fewer routed assignments than slots (DeepSpeed's used_token): the rest are neither tokens nor drops."""
    r = count_slots(torch.tensor([2, 1, 0, 3]), torch.tensor([2, 1, 0, 2]), 10)
    got = observe(r)
    np.testing.assert_array_equal(got["tokens"], [2, 1, 0, 2])
    np.testing.assert_array_equal(got["dropped"], [0, 0, 0, 1])
    assert got["slots"] == 6


def test_kept_cells_and_drops_only():
    kept_TE = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    first_T = torch.tensor([0, 3, 1])
    got = observe(kept_cells(kept_TE), drops_only(first_T, torch.tensor([False, True, False])))
    np.testing.assert_array_equal(got["tokens"], [1, 1, 1, 0])
    np.testing.assert_array_equal(got["dropped"], [0, 0, 0, 1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_slot_builders_never_sync():
    routed = torch.tensor([5, 0, 7, 4], device="cuda")
    kept = torch.tensor([3, 0, 7, 1], device="cuda")
    kept_TE = torch.rand(64, E, device="cuda") > 0.5
    first_T = torch.randint(0, E, (64,), device="cuda")
    state = torch.zeros(metrics.state_size(E), dtype=torch.float64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for r in (count_slots(routed, kept, 16), kept_cells(kept_TE), drops_only(first_T, kept_TE[:, 0])):
            metrics.observe(state, E, indices_TK=r.indices_TK, dropped_TK=r.dropped_TK, token_mask_T=r.token_mask_T)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert state[:E].sum().item() == 11 + kept_TE.sum().item()
