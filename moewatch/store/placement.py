"""Expert-parallel placement: which device holds each expert, and the per-device load it implies.

With expert parallelism (EP) each device computes the experts it holds, so a step waits on the device whose experts
received the most assignments: the busiest device sets the pace. A run records its placement in ``run.json``
(``attach(..., ep_size=N)`` for the usual contiguous placement, where device ``d`` holds experts
``d*E/N .. (d+1)*E/N - 1``, or ``expert_placement=`` for an explicit map); everything here derives the device load
from the recorded expert counts at read time, so rank sums and rollups stay exact.

Shape legend: S steps (or windows), E experts, D devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def contiguous(num_experts: int, ep_size: int) -> np.ndarray:
    """Device of each expert when ``ep_size`` devices hold ``num_experts / ep_size`` consecutive experts each."""
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the layer's {num_experts} experts")
    return np.arange(num_experts, dtype=np.int64) // (num_experts // ep_size)


def check_placement(ep_size: Any, placement: Any) -> tuple[int | None, Any]:
    """Validate ``attach``'s ``ep_size`` / ``expert_placement`` and return them JSON-ready for run.json.

    ``placement`` is a list (the device of each expert, the same for every layer) or a mapping of layer name to
    such a list. Raises ValueError/TypeError with what to pass instead.
    """
    if ep_size is not None:
        if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
            raise ValueError(f"ep_size must be a positive integer (the expert-parallel degree), got {ep_size!r}")
    if placement is None:
        return ep_size, None

    def one(devices: Any, where: str) -> list[int]:
        if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence | np.ndarray):
            raise TypeError(f"expert_placement{where} must be a list of device indices, one per expert")
        out = [int(d) for d in devices]
        if not out or min(out) < 0:
            raise ValueError(f"expert_placement{where} must list a device index >= 0 for every expert")
        if ep_size is not None and max(out) >= ep_size:
            raise ValueError(f"expert_placement{where} names device {max(out)}, but ep_size is {ep_size}")
        return out

    if isinstance(placement, Mapping):
        return ep_size, {str(k): one(v, f"[{k!r}]") for k, v in placement.items()}
    return ep_size, one(placement, "")


def placement_for(manifest: Mapping[str, Any] | None, layer: str, num_experts: int) -> np.ndarray | None:
    """The device of each of ``layer``'s experts from a run's manifest, or None when the run records none (or it
    does not fit the layer: a wrong map must not invent a straggler)."""
    if not manifest:
        return None
    explicit = manifest.get("expert_placement")
    if isinstance(explicit, Mapping):
        explicit = explicit.get(layer)
    if explicit is not None:
        devices = np.asarray(explicit, dtype=np.int64)
        return devices if len(devices) == num_experts and (devices >= 0).all() else None
    ep = manifest.get("ep_size")
    if isinstance(ep, int) and ep > 1 and num_experts % ep == 0:
        return contiguous(num_experts, ep)
    return None


def device_load(counts_SE: np.ndarray, placement_E: np.ndarray) -> np.ndarray:
    """Assignments per device ``[S, D]`` (``D`` = highest device index + 1)."""
    D = int(placement_E.max()) + 1
    out_SD = np.zeros((counts_SE.shape[0], D), dtype=np.float64)
    for d in range(D):
        out_SD[:, d] = counts_SE[:, placement_E == d].sum(axis=1)
    return out_SD


def straggler_ratio(load_SD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(busiest device's load / the mean device load, the busiest device) per row; NaN where nothing was routed.

    A step of an expert-parallel layer lasts about as long as its busiest device, so the throughput lost to the
    imbalance is ``1 - 1 / ratio``.
    """
    mean_S = load_SD.mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio_S = np.where(mean_S > 0, load_SD.max(axis=1) / np.where(mean_S > 0, mean_S, 1.0), np.nan)
    return ratio_S, load_SD.argmax(axis=1)


def detect_ep_size(experts_params: Sequence[Any]) -> int | None:
    """The expert-parallel degree of DTensor expert weights sharded over a DeviceMesh dimension named like ``ep``
    (torchtitan's ``ep`` / ``dp_shard_in_ep`` meshes), else None. Best effort: reads only the tensors' metadata."""
    for p in experts_params:
        mesh = getattr(p, "device_mesh", None)
        placements = getattr(p, "placements", None)
        names = getattr(mesh, "mesh_dim_names", None) if mesh is not None else None
        if not names or placements is None:
            continue
        for i, (name, pl) in enumerate(zip(names, placements, strict=False)):
            if "ep" in str(name).split("_") and getattr(pl, "dim", None) == 0:
                size = int(mesh.size(i))
                return size if size > 1 else None
    return None
