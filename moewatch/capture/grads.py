"""Expert learning: per-expert gradient norms each optimizer step and parameter norms at each flush.

This module owns two things, both standalone (the Watch wires them in):

1. **Discovery of the experts' parameters** (`find_expert_params`): from a router (its qualified name, as
   `RouterSpec.name` holds it) and its expert count E, the parameter tensors of each routed expert, found in the
   router's MoE block (its parent, or the nearest ancestor holding the experts, never past a block holding another
   router). Layouts, each read by a rule, never guessed:

   - **experts as modules**: an `nn.ModuleList`/`Sequential` of E experts (LitGPT, DeepSpeed, transformers 4.x,
     research code, Megatron-Core's ``SequentialMLP.local_experts``), or children named ``expert_0 .. expert_{E-1}``
     (Switch-Transformers, NLLB-MoE); the index is the list position or the name's number, never the order of
     attributes;
   - **indexed tensors**: parameters of one module named ``<stem>0 .. <stem>{E-1}`` (one stem covering exactly
     0..E-1; Transformer Engine's ``GroupedLinear`` ``weight{i}``/``bias{i}``, one per local expert, as Megatron-Core's
     ``TEGroupedMLP.linear_fc1``/``linear_fc2`` hold them): expert i is the tensor with number i; read before the
     fused rule, so that a ``weight{i}`` whose dim 0 happens to equal E is never split;
   - **fused** ``[E, ...]`` tensors with ndim >= 2 (transformers 5.x ``gate_up_proj``/``down_proj`` incl. GPT-OSS'
     2-D biases, torchtitan's ``w1/w2/w3``, NeMo's grouped experts, JetMoE's parallel experts, grouped-GEMM kernels,
     moewatch's reference model ``w_in_EDH``/``w_out_EHD`` held by the block itself): dim 0 indexes the expert;
   - **flat** ``[E*H, D]`` tensors of classes known to lay experts out as E contiguous blocks of dim 0
     (transformers' DBRX ``DbrxExpertGLU``, OLMo-core's ``MoEMLP``/``DroplessMoEMLP``), and tensors of classes known
     to view their elements, in row-major order, as E contiguous blocks (`ExpertTensor.chunks`): Megatron-Core's
     legacy grouped-GEMM ``GroupedMLP``, whose forward (and checkpoint) reads ``weight1`` ``[H, E*F]`` (``F`` = the
     expert FFN width, doubled when gated) as ``weight1.view(E, H, F)`` and ``weight2`` ``[E*F, H]`` as
     ``view(E, F, H)``: expert e owns elements ``[e*H*F, (e+1)*H*F)`` of ``weight1``, which are *not* columns
     ``e*F .. (e+1)*F`` and not, unless E divides H, whole rows; read before the fused rule (``weight1``'s dim 0 is
     H, which may equal E);
   - **product keys** (Doge): expert e is row e of ``down_embed`` and ``up_embed``.

   The experts' module is a child named ``experts`` or ``*experts`` (``routed_experts``), or a child whose class
   name ends in ``Experts``; a child whose name contains ``shared`` is a shared expert, always on, and is never
   counted as a routed expert (DeepSeek-V3 ``shared_experts``, Qwen2-MoE ``shared_expert``, Llama-4, ...). Parameters
   inside the experts' module that belong to no single expert (MuseSpark's ``post_expert_norm``; 1-D ``[E]``
   vectors, which cannot be told from a width that happens to equal E) are listed as ``unattributed`` and not
   counted. A router with more classes than the experts' module declares (ZAYA's skip class, LongCat's
   zero-compute experts: the module's ``num_experts``/``num_routed_experts`` is smaller than E) has parameter-free
   experts at the tail indices; their norms are NaN, not 0, so that they never read as "stopped learning". A module
   declaring ``num_local_experts`` below the global count is expert-parallel and is not found (None, with the
   reason): which global experts it holds is usually not known from the module, and where it is (Megatron-Core's
   ``MoELayer.local_expert_indices``) the per-rank squares still do not combine by the rules below (a rank holding
   some experts is neither a replica of the other ranks nor a shard of one tensor, and a sum over all ranks counts
   each expert once per expert-data-parallel replica). Megatron-Core experts split by expert tensor parallelism
   (their ``tp_group``, the expert-TP group, larger than 1) hold a slice of every expert on each rank, with
   replicas beside them: not found either. None always comes with a reason string for run.json's problems
   ("expert params not found").

2. **`GradTracker`**: a global optimizer step pre-hook (`torch.optim.optimizer.register_optimizer_step_pre_hook`,
   fired by every optimizer right before its update) that adds each expert's sum of squared gradients into a
   preallocated float32 accumulator on the device. The grads are read there because that is the one moment they are
   complete: every micro-batch's backward has accumulated into them and no ``zero_grad`` (which a loop may call
   before ``watch.step()``) has run. No host sync: only Python checks of ``p.grad is None``, dtypes, shapes and
   placements; ``torch._foreach_norm`` over the experts-as-modules tensors (a few fused launches on CUDA), one
   ``linalg.vector_norm(dim=1)`` per fused tensor, then ``index_add_`` with index tensors built at attach.

What is measured, exactly:

- ``take().sq_E`` per layer: ``sum over the expert's parameters of sum(grad**2)``, float32 ``[E]``, summed over the
  optimizer steps since the last take (``take().steps`` of them, normally 1). A parameter whose ``.grad`` is None
  (an expert module that received no token) contributes 0; a layer none of whose expert parameters had a grad is
  left out of ``take()`` (no information: frozen, unused this step, or grads kept elsewhere, e.g. DeepSpeed ZeRO's
  flat partitions). Each optimizer's hook counts only the parameters that optimizer holds, so with several
  optimizers each parameter is counted once per step; a wrapper optimizer whose ``step`` calls an inner one's (both
  firing the hook) is counted once (a step that starts inside another counted step is skipped).
- Gradient scaling (AMP): ``GradScaler.step`` unscales the grads (``unscale_``) before it calls
  ``optimizer.step()``, so the hook sees true grads whether or not the loop calls ``scaler.unscale_`` itself; a step
  the scaler skips (inf/NaN) never calls ``optimizer.step()``, the hook does not fire and the step has no grad norm
  (``steps == 0``). Optimizers that unscale inside their own fused kernel (``_step_supports_amp_scaling``, e.g.
  ``Adam(fused=True)``) get scaled grads plus ``optimizer.grad_scale``/``found_inf`` tensors: the squares are
  divided by ``grad_scale**2`` on the device, and a step with ``found_inf`` reads NaN (the optimizer skips it).
- Closure optimizers (LBFGS) compute their grads inside ``step``: the pre-hook sees the previous grads.
- FSDP2 / DTensor grads: the *local shard's* squares, placed at the right experts (a dim-0 shard of a fused tensor
  lands at its global rows; other dims give partial sums), divided by the number of replicas of any ``Replicate``
  mesh dimension (HSDP), so that summing the values of *all* ranks gives the full squares. ``full_tensor()`` is
  never called (it would communicate). ``Partial`` placements and strided shards are not read (the layer is dropped
  with a warning). FSDP1 (``FullyShardedDataParallel``: flat parameters, or flat shard views of them with
  ``use_orig_params``) is not read: its routers are not found, with that reason; use FSDP2 (``fully_shard``).
  `ExpertParams.sharded` says which layers hold DTensors. Attach after wrapping the model (FSDP2 replaces the
  parameters; DDP and ``torch.compile`` do not).

Storage and aggregation (what the Watch should store, per step, layer and expert):

- ``grad_norm = sqrt(sq_E / steps)`` when ``steps >= 1`` (``sqrt(sq_E)`` in the usual one optimizer step per
  ``watch.step()``; the root mean square of the per-step norms when a watch step spans several optimizer steps),
  null when ``steps == 0`` or for a layer missing from ``take()``; ``param_norm`` at each flush from
  `GradTracker.param_norms` (sqrt of the sum of squares of the expert's parameters).
- Across ranks, norms are never summed: (a) data parallel (DDP, or any replica): grads are all-reduced before the
  step and identical on every rank, so keep one rank's value; (b) sharded (FSDP2/DTensor, `ExpertParams.sharded`):
  sum the squares over all ranks, then take the root. `combine_sq` does both (``sharded=False``: the first rank's;
  ``sharded=True``: the sum). Mixed setups follow the flag per layer.

A hook that raises warns once and disables the tracker (never raises into training). A layer whose grads cannot be
read as planned (shape, device or placement changed after attach) warns once and is dropped; both are kept in
`GradTracker.problems`.
"""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from moewatch.capture.discovery import int_attr
from moewatch.capture.types import RouterSpec

# Expert counts an experts module may declare about itself, in the order they are read. `num_routed_experts`
# (LongCat) and `num_experts` (ZAYA) may be below the router's E: the rest are parameter-free classes.
DECLARED_ATTRS = ("num_routed_experts", "n_routed_experts", "num_experts", "moe_num_experts", "n_experts")
# Expert-parallel modules declare how many of the global experts they hold locally.
LOCAL_ATTRS = ("num_local_experts",)
# Classes known to keep experts as E contiguous blocks of dim 0 of a flat [E*H, ...] tensor: (package, class).
FLAT_CLASSES = (("transformers", "DbrxExpertGLU"), ("olmo_core", "MoEMLPBase"))
# Classes known to view each weight's elements, in row-major order, as E contiguous blocks: (package, class).
# Megatron-Core's legacy GroupedMLP: weight1 [H, E*F] is `weight1.view(E, H, F)` in its forward and checkpoint.
CHUNK_CLASSES = (("megatron.core", "GroupedMLP"),)
# Megatron-Core modules: their experts' `tp_group` is the expert tensor-parallel group.
MEGATRON_CLASSES = (("megatron.core", "MegatronModule"),)
CLIMB = 3  # ancestors looked at above the router (parent first)
_INDEXED = re.compile(r"(\d+)$")  # "3", "expert_3": the expert's index


# ---------------------------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class ExpertTensor:
    """One parameter tensor holding expert weights.

    ``expert`` set: the whole tensor is that expert's (experts as modules, indexed tensors). ``expert`` None: dim 0
    splits into ``groups`` equal contiguous blocks and block g belongs to expert g (fused ``[E, ...]``: ``groups`` =
    dim 0; flat ``[E*H, D]``: ``groups`` = E); blocks past the experts with parameters are ignored (LongCat's unused
    rows). ``chunks``: the tensor's elements in row-major order, not its dim 0, split into the ``groups`` blocks
    (Megatron's ``GroupedMLP.weight1`` ``[H, E*F]``, viewed as ``[E, H, F]``); read as ``reshape(groups, -1)``.
    """

    name: str  # qualified parameter name in the model
    expert: int | None = None
    groups: int = 1
    chunks: bool = False


@dataclass(frozen=True)
class ExpertParams:
    """Where one router's experts keep their parameters."""

    layer: str  # the router's qualified name (the run's `layer`)
    block: str  # qualified name of the module the experts were found in
    num_experts: int  # E, the router's
    layout: str  # "modules", "indexed", "fused", "flat", "product_key" or a "+"-joined mix
    tensors: tuple[ExpertTensor, ...]
    param_free: tuple[int, ...] = ()  # experts without parameters (skip / zero-compute classes): NaN norms
    unattributed: tuple[str, ...] = ()  # parameters in the experts' module that belong to no single expert
    sharded: bool = False  # parameters are DTensors: per-rank squares are partial, sum them over ranks

    def describe(self) -> str:
        """One line for logs and run.json."""
        free = f", {len(self.param_free)} parameter-free" if self.param_free else ""
        left = f", {len(self.unattributed)} unattributed" if self.unattributed else ""
        return (f"{self.layer}: {self.num_experts} experts, {self.layout} in {self.block or '<model>'} "
                f"({len(self.tensors)} tensors{free}{left})")


def _is_class(module: nn.Module, known: tuple[tuple[str, str], ...]) -> bool:
    for c in type(module).__mro__:
        for package, name in known:
            if c.__name__ == name and (c.__module__ == package or c.__module__.startswith(package + ".")):
                return True
    return False


def _shared(name: str) -> bool:
    # By the attribute's name only: class names mislead (GraniteMoeShared's routed `GraniteMoeSharedExperts`).
    return "shared" in name.lower()


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _holders(block: nn.Module, router: nn.Module) -> list[tuple[str, nn.Module]]:
    """The block's children that hold routed experts: named ``experts``/``*experts`` or classed ``*Experts``.

    The child on the way to the router (the router itself, or the module climbed from) is never one."""
    out = []
    for name, child in block.named_children():
        if _shared(name) or any(m is router for m in child.modules()):
            continue
        if name == "experts" or name.endswith("experts") or type(child).__name__.endswith("Experts"):
            out.append((name, child))
    return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _product_key(block: nn.Module, num_experts: int) -> tuple[ExpertTensor, ...] | None:
    """Doge's CDMoE: expert e is row e of `down_embed` and `up_embed` (num_keys**2 rows)."""
    keys = getattr(block, "num_keys", None)
    embeds = [getattr(block, n, None) for n in ("down_embed", "up_embed")]
    if not isinstance(keys, int) or not all(isinstance(e, nn.Embedding) for e in embeds):
        return None
    if keys * keys != num_experts or any(e.weight.shape[0] != num_experts for e in embeds):
        return None
    return tuple(ExpertTensor(f"{n}.weight", None, num_experts) for n in ("down_embed", "up_embed"))


class _Scan:
    """Walks an experts module, attributing each parameter to an expert or to `unattributed`."""

    def __init__(self, num_experts: int, with_params: int, skip: set[int]) -> None:
        self.E = num_experts
        self.n = with_params  # experts 0..n-1 have parameters; n..E-1 are parameter-free
        self.skip = skip  # ids of the router's parameters (never an expert's)
        self.tensors: list[ExpertTensor] = []
        self.unattributed: list[str] = []
        self.layouts: set[str] = set()
        self.empty: set[int] = set()  # expert modules without parameters

    def module(self, module: nn.Module, prefix: str) -> None:
        flat = _is_class(module, FLAT_CLASSES)
        chunked = _is_class(module, CHUNK_CLASSES)
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in self.skip]
        numbered = self._numbered(own)
        for name, p in own:
            full = _join(prefix, name)
            if name in numbered:
                self.tensors.append(ExpertTensor(full, numbered[name]))
                self.layouts.add("indexed")
            elif chunked and p.dim() >= 2 and p.numel() % self.n == 0:
                self.tensors.append(ExpertTensor(full, None, self.n, chunks=True))
                self.layouts.add("flat")
            elif p.dim() >= 2 and p.shape[0] in (self.E, self.n):
                self.tensors.append(ExpertTensor(full, None, int(p.shape[0])))
                self.layouts.add("fused")
            elif flat and p.dim() >= 1 and p.shape[0] % self.n == 0 and p.shape[0] > self.n:
                self.tensors.append(ExpertTensor(full, None, self.n))
                self.layouts.add("flat")
            else:
                self.unattributed.append(full)
        children = [(n, c) for n, c in module.named_children() if id(c) not in self.skip]
        indexed = self._indexed(module, children)
        for e, (name, child) in (indexed or {}).items():
            names = [_join(_join(prefix, name), n) for n, p in child.named_parameters() if id(p) not in self.skip]
            if not names:
                self.empty.add(e)
            self.tensors.extend(ExpertTensor(n, e) for n in names)
            self.layouts.add("modules")
        taken = {id(c) for _, c in (indexed or {}).values()}
        for name, child in children:
            if id(child) not in taken and _has_params(child):
                self.module(child, _join(prefix, name))

    def _numbered(self, params: list[tuple[str, nn.Parameter]]) -> dict[str, int]:
        """The module's own parameters that are the n experts' by name: per stem (``weight``, ``bias``), names
        ``<stem>0 .. <stem>{n-1}`` covering exactly 0..n-1 (Transformer Engine's GroupedLinear); name -> expert."""
        stems: dict[str, dict[int, str]] = {}
        for name, _ in params:
            m = _INDEXED.search(name)
            if m is not None and (m.group(1) == "0" or not m.group(1).startswith("0")):
                stems.setdefault(name[:m.start()], {})[int(m.group(1))] = name
        out: dict[str, int] = {}
        for by_index in stems.values():
            if self.n >= 2 and set(by_index) == set(range(self.n)):
                out.update({name: e for e, name in by_index.items()})
        return out

    def _indexed(self, module: nn.Module, children: list[tuple[str, nn.Module]]) -> dict[int, tuple] | None:
        """The children that are the n experts by index: a list's positions, or names ending in the expert's number
        with one common prefix (``expert_0``, ``expert_1``, ...), covering exactly 0..n-1."""
        # Other children (NLLB's `token_dropout` beside expert_0..expert_3, an activation) are not experts.
        children = [(n, c) for n, c in children if _INDEXED.search(n)]
        if len({n.rstrip("0123456789") for n, _ in children}) != 1:
            return None
        if len(children) != self.n or self.n < 2:
            return None
        index: dict[int, tuple[str, nn.Module]] = {}
        for name, child in children:
            m = _INDEXED.search(name)
            if m is None:
                return None
            index[int(m.group(1))] = (name, child)
        return index if set(index) == set(range(self.n)) else None


def _counts(holders: list[nn.Module], block: nn.Module, num_experts: int) -> tuple[int, str]:
    """(experts with parameters, reason if not readable: expert parallel, expert tensor parallel) from what the
    experts' modules declare about themselves."""
    for m in (*holders, block):
        local = int_attr(m, LOCAL_ATTRS)
        total = int_attr(m, DECLARED_ATTRS) or num_experts
        if local is not None and local < total:
            which = _local_indices(block, local)
            if which is None:
                return 0, (f"{type(m).__name__} holds {local} local experts of {total} (expert parallel): which "
                           f"global experts are local is not known from the module")
            return 0, (f"{type(m).__name__} holds {local} local experts of {total} (expert parallel; global experts "
                       f"{which[0]}..{which[-1]} by local_expert_indices): the ranks' squares do not combine into "
                       f"per-expert norms, as each expert's gradients live on its expert-parallel rank only, "
                       f"replicated over the expert-data-parallel group")
    for m in holders:
        tp = _group_size(getattr(m, "tp_group", None)) if _is_class(m, MEGATRON_CLASSES) else 1
        if tp > 1:
            return 0, (f"{type(m).__name__} is split by expert tensor parallelism ({tp} ranks in its tp_group): each "
                       f"rank holds a slice of every expert's weights, so one rank's squares are partial and the "
                       f"ranks' squares do not combine as replicas")
    for m in holders:
        declared = int_attr(m, DECLARED_ATTRS)
        if declared is not None and declared < num_experts:
            return declared, ""
    return num_experts, ""


def _local_indices(block: nn.Module, local: int) -> list[int] | None:
    """Megatron's ``local_expert_indices``: the global experts this rank holds, if the block says so exactly."""
    which = getattr(block, "local_expert_indices", None)
    if isinstance(which, (list, tuple)) and len(which) == local and all(isinstance(i, int) for i in which):
        return list(which)
    return None


def _group_size(group: Any) -> int:
    """A process group's size (a local query, no communication); 1 when there is none or it cannot say."""
    size = getattr(group, "size", None)
    try:
        n = size() if callable(size) else 1
    except Exception:  # a group this process is not part of, a destroyed one
        return 1
    return n if isinstance(n, int) and n > 0 else 1


def _from_block(model: nn.Module, block_name: str, block: nn.Module, router: nn.Module, layer: str,
                num_experts: int) -> tuple[ExpertParams | None, str] | None:
    """The experts found in `block` (or None with a reason), or None if the block holds no experts at all."""
    skip = {id(router)} | {id(p) for p in router.parameters()}
    if (rows := _product_key(block, num_experts)) is not None:
        tensors = tuple(ExpertTensor(_join(block_name, t.name), None, t.groups) for t in rows)
        return _made(model, layer, block_name, num_experts, "product_key", tensors, (), ()), ""
    holders = _holders(block, router)
    own = [n for n, p in block.named_parameters(recurse=False)
           if id(p) not in skip and p.dim() >= 2 and p.shape[0] == num_experts]
    if not holders and not own:
        return None
    n, ep = _counts([h for _, h in holders], block, num_experts)
    if ep:
        return None, ep
    scan = _Scan(num_experts, n, skip)
    for name in own:  # reference model: the block itself holds the fused experts
        scan.tensors.append(ExpertTensor(_join(block_name, name), None, num_experts))
        scan.layouts.add("fused")
    for name, holder in holders:
        scan.module(holder, _join(block_name, name))
    if not scan.tensors:
        shapes = ", ".join(f"{p}" for p in scan.unattributed[:4]) or "no parameters"
        where = ", ".join(_join(block_name, h) for h, _ in holders)
        return None, (f"experts module {where} holds no parameter attributable to one of the {n} experts "
                      f"(neither {n} indexed expert modules nor tensors with leading dimension {n}): {shapes}")
    covered = {t.expert for t in scan.tensors if t.expert is not None} | (
        set(range(n)) if any(t.expert is None for t in scan.tensors) else set())
    missing = sorted(set(range(n)) - covered - scan.empty)
    if missing:
        return None, f"experts {missing[:8]} of {n} have no parameter found in {block_name or '<model>'}"
    free = tuple(sorted(scan.empty | set(range(n, num_experts))))
    layout = "+".join(sorted(scan.layouts))
    return _made(model, layer, block_name, num_experts, layout, tuple(scan.tensors), free,
                 tuple(scan.unattributed)), ""


def _made(model: nn.Module, layer: str, block: str, num_experts: int, layout: str, tensors: tuple[ExpertTensor, ...],
          free: tuple[int, ...], unattributed: tuple[str, ...]) -> ExpertParams:
    seen: set[int] = set()
    unique = []
    for t in tensors:  # a parameter shared by two experts' modules is counted once, for the first
        p = model.get_parameter(t.name)
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(t)
    sharded = any(_is_dtensor(model.get_parameter(t.name)) for t in unique)
    return ExpertParams(layer, block, num_experts, layout, tuple(unique), free, unattributed, sharded)


def find_expert_params(model: nn.Module, layer: str, num_experts: int,
                       others: Sequence[str] = ()) -> tuple[ExpertParams | None, str]:
    """The parameters of router `layer`'s E experts, or ``(None, reason)``; see the module docstring for the rules.

    `others` are the other routers' names: the search never climbs into a block that holds one of them.
    """
    named = dict(model.named_modules())
    router = named.get(layer)
    if router is None:
        return None, f"router {layer!r} is not a module of the model"
    parts = layer.split(".")
    for up in (".".join(parts[:i]) for i in range(len(parts))):
        if _is_class(named[up], (("torch.distributed.fsdp", "FullyShardedDataParallel"),)):
            return None, (f"router {layer!r} is inside FSDP1 ({up or '<model>'}): its flat parameters do not show "
                          f"which expert a gradient belongs to; use FSDP2 (fully_shard)")
    name = layer
    for _ in range(CLIMB):
        if not name:
            break
        name = name.rpartition(".")[0]
        block = named[name]
        prefix = f"{name}." if name else ""
        if any(o != layer and (not name or o.startswith(prefix)) for o in others):
            break
        found = _from_block(model, name, block, router, layer, num_experts)
        if found is not None:
            return found
    return None, (f"no experts found around router {layer!r}: no child named `experts`/`*experts` or classed "
                  f"`*Experts` (shared experts excluded) and no parameter with leading dimension {num_experts} in "
                  f"its parent or the {CLIMB - 1} ancestors above it")


# ---------------------------------------------------------------------------------------------- tensors


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "placements")


@dataclass(frozen=True)
class _Local:
    """How a (possibly DTensor) tensor's local piece maps onto its global rows."""

    rows: int  # local rows read: of dim 0 (1 for a 0-d tensor), or one per expert (`ExpertTensor.chunks`)
    offset: int  # global index of the first local row
    scale: float  # 1 / replicas: summing the squares of all ranks gives the full squares
    placements: tuple | None  # DTensor placements planned for, None for a plain tensor
    shape: tuple[int, ...]  # local shape


def _local_plan(t: torch.Tensor) -> _Local | str:
    """The local piece's rows, or a reason why it cannot be read (Partial, strided shard)."""
    if not _is_dtensor(t):
        return _Local(int(t.shape[0]) if t.dim() else 1, 0, 1.0, None, tuple(t.shape))
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = t.device_mesh, tuple(t.placements)
    replicas = 1
    for i, pl in enumerate(placements):
        if pl.is_partial():
            return f"a Partial placement ({pl}) holds unreduced partial values"
        if pl.is_replicate():
            replicas *= mesh.size(i)
        elif type(pl) is not Shard:
            return f"placement {pl} is not read (its local rows are not contiguous)"
    shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    rows = int(shape[0]) if len(shape) else 1
    return _Local(rows, int(offset[0]) if len(offset) else 0, 1.0 / replicas, placements, tuple(shape))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


# ---------------------------------------------------------------------------------------------- tracker


@dataclass(frozen=True)
class GradTake:
    """What the optimizer steps since the last `GradTracker.take` saw.

    ``sq_E``: per layer, float32 ``[E]`` on the device: the experts' summed squared gradients over ``steps`` optimizer
    steps (NaN for parameter-free experts). Only layers with at least one expert gradient are present. ``steps``:
    the most optimizer steps any one optimizer holding expert parameters took (0: none, e.g. skipped by GradScaler).
    """

    sq_E: dict[str, torch.Tensor]
    steps: int

    def norms(self) -> dict[str, torch.Tensor]:
        """``sqrt(sq_E / steps)`` per layer (for one rank; across ranks use `combine_sq`)."""
        return {k: (v / max(self.steps, 1)).sqrt() for k, v in self.sq_E.items()}


@dataclass
class _Item:
    """One tracked tensor: its parameter, its layer and how its local piece maps onto global rows."""

    param: nn.Parameter
    layer: str
    local: _Local


@dataclass
class _Device:
    """The tracked tensors on one device, their slots in the flat accumulator and the accumulator itself.

    Slots: layer l's expert e is ``base_l + e``; the last slot collects rows that belong to no expert. The index
    tensors are built once at attach, so the hook never copies host data to the device (that would sync).
    """

    device: torch.device
    modules: list[_Item] = field(default_factory=list)  # experts as modules: whole tensors
    fused: list[_Item] = field(default_factory=list)  # fused/flat/product-key: per-row sums
    acc: torch.Tensor | None = None
    mod_index: torch.Tensor | None = None  # [P] slot per experts-as-modules tensor
    mod_scale: torch.Tensor | None = None  # [P] 1/replicas; None when all 1
    fused_index: torch.Tensor | None = None  # [R] slot per fused row
    fused_scale: torch.Tensor | None = None  # [R] 1/replicas; None when all 1
    zero: torch.Tensor | None = None  # [max rows] float32 zeros: a missing grad's row norms (fixed layout)
    mod_zero: list[torch.Tensor] = field(default_factory=list)  # per module tensor: a [1] zero of its dtype
    mod_params: list[nn.Parameter] = field(default_factory=list)  # `modules`' parameters, for the fast path
    mod_plain: bool = True  # no DTensor among `modules`: their grads are read without per-tensor checks
    mod_spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer -> its range in `modules`


@dataclass
class _Plan:
    """Which tracked tensors one optimizer holds, per device (flags in `_Device.modules` / `.fused` order)."""

    signature: tuple[int, ...]
    modules: dict[torch.device, list[bool]]
    fused: dict[torch.device, list[bool]]
    any: bool
    all_modules: dict[torch.device, bool]  # holds every experts-as-modules tensor of the device


class GradTracker:
    """Per-expert gradient squares at each optimizer step (a global pre-hook) and parameter norms on demand.

    Build with `GradTracker.attach(model, routers)`; `take()` once per training step; `param_norms()` at a flush;
    `remove()` at the end. `found` holds what was found per layer; layers not found (and layers dropped later) are in
    `problems` with the reason, and are not tracked.
    """

    def __init__(self, model: nn.Module, found: Mapping[str, ExpertParams], problems: Mapping[str, str]) -> None:
        self.found: dict[str, ExpertParams] = dict(found)
        self.problems: dict[str, str] = dict(problems)
        self.error: str | None = None  # set when the hook failed: the tracker is off
        self._dropped: set[str] = set()
        self._base: dict[str, int] = {}
        slots = 0
        for layer, ep in self.found.items():
            self._base[layer] = slots
            slots += ep.num_experts
        self._dump = slots
        self._devices: dict[torch.device, _Device] = {}
        self._home: dict[str, torch.device] = {}  # the device a layer's values are returned on
        self._nan: dict[str, torch.Tensor] = {}  # [E] NaN at parameter-free experts, 0 elsewhere
        self._steps: dict[int, int] = {}  # optimizer id -> steps since the last take
        self._seen: set[str] = set()  # layers with at least one expert grad since the last take
        self.ever_seen: set[str] = set()  # layers that ever had one (what a "no gradient seen" check reads)
        self.optimizer_steps = 0  # optimizer steps that held some expert parameter, since attach
        self.any_steps = 0  # optimizer steps of any torch.optim optimizer seen, since attach
        self._plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._active: set[int] = set()  # optimizers (ids) inside a counted step now
        self._handle: Any = None
        self._post: Any = None
        with torch.no_grad():
            self._build(model)
        self._handle = register_optimizer_step_pre_hook(self._hook)
        self._post = register_optimizer_step_post_hook(self._hook_after)

    @classmethod
    def attach(cls, model: nn.Module, routers: Sequence[RouterSpec] | Mapping[str, int]) -> GradTracker:
        """Find every router's expert parameters and hook all optimizers.

        `routers`: the Watch's specs, or ``{layer: num_experts}``. Call after wrapping the model (FSDP2 replaces
        parameters; DDP and torch.compile do not).
        """
        counts = dict(routers) if isinstance(routers, Mapping) else {s.name: s.num_experts for s in routers}
        found: dict[str, ExpertParams] = {}
        problems: dict[str, str] = {}
        for layer, E in counts.items():
            ep, reason = find_expert_params(model, layer, E, others=list(counts))
            if ep is None:
                problems[layer] = reason
            else:
                found[layer] = ep
        return cls(model, found, problems)

    # ------------------------------------------------------------------ setup

    def _build(self, model: nn.Module) -> None:
        mod_slots: dict[torch.device, list[tuple[int, float]]] = {}
        row_slots: dict[torch.device, list[tuple[int, float]]] = {}
        for layer, ep in self.found.items():
            base, E, free = self._base[layer], ep.num_experts, set(ep.param_free)
            for t in ep.tensors:
                p = model.get_parameter(t.name)
                local = _local_plan(p)
                if isinstance(local, str) or (t.chunks and local.placements is not None):
                    why = local if isinstance(local, str) else ("its experts are blocks of its elements in row-major "
                                                                "order, which a sharded (DTensor) piece does not show")
                    self._drop(layer, f"parameter {t.name}: {why}")
                    break
                if t.chunks:  # one row per expert: `reshape(groups, -1)` is the module's own `view(E, ...)`
                    local = _Local(t.groups, 0, local.scale, None, local.shape)
                self._home.setdefault(layer, p.device)
                dev = self._devices.setdefault(p.device, _Device(p.device))
                item = _Item(p, layer, local)
                if t.expert is not None:
                    dev.modules.append(item)
                    mod_slots.setdefault(p.device, []).append((base + t.expert, local.scale))
                    continue
                dev.fused.append(item)
                per_group = 1 if t.chunks or not p.dim() else max(int(p.shape[0]) // t.groups, 1)  # rows per expert
                for r in range(local.offset, local.offset + local.rows):
                    g = r // per_group
                    # Rows past the experts with parameters (LongCat's zero experts) belong to no expert.
                    slot = base + g if g < E and g not in free else self._dump
                    row_slots.setdefault(p.device, []).append((slot, local.scale))
            if ep.param_free:
                nan = torch.zeros(E)
                nan[list(ep.param_free)] = float("nan")
                self._nan[layer] = nan.to(self._home.get(layer, torch.device("cpu")))
        for device, dev in self._devices.items():
            dev.acc = torch.zeros(self._dump + 1, dtype=torch.float32, device=device)
            if dev.modules:
                dev.mod_index, dev.mod_scale = _slots(mod_slots[device], device)
                dev.mod_params = [i.param for i in dev.modules]
                dev.mod_plain = not any(i.local.placements is not None for i in dev.modules)
                for k, i in enumerate(dev.modules):  # a layer's tensors are contiguous (built layer by layer)
                    first, _ = dev.mod_spans.get(i.layer, (k, k))
                    dev.mod_spans[i.layer] = (first, k + 1)
            if dev.fused:
                dev.fused_index, dev.fused_scale = _slots(row_slots[device], device)
            dev.zero = torch.zeros(max([1] + [i.local.rows for i in dev.fused]), dtype=torch.float32, device=device)
            # A stand-in of the grad's own dtype: one dtype in the list keeps `_foreach_norm` on its fused path.
            zeros = {i.param.dtype: torch.zeros(1, dtype=i.param.dtype, device=device) for i in dev.modules}
            dev.mod_zero = [zeros[i.param.dtype] for i in dev.modules]

    def _drop(self, layer: str, reason: str) -> None:
        if layer in self._dropped:
            return
        self._dropped.add(layer)
        self.problems[layer] = reason
        warnings.warn(f"moewatch: expert gradients of router {layer!r} are not tracked: {reason}", RuntimeWarning,
                      stacklevel=3)

    def _plan(self, optimizer: torch.optim.Optimizer) -> _Plan:
        signature = (len(optimizer.param_groups), *(len(g["params"]) for g in optimizer.param_groups))
        plan = self._plans.get(optimizer)
        if plan is not None and plan.signature == signature:
            return plan
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        modules = {d: [id(i.param) in held for i in dev.modules] for d, dev in self._devices.items()}
        fused = {d: [id(i.param) in held for i in dev.fused] for d, dev in self._devices.items()}
        plan = _Plan(signature, modules, fused, any(any(v) for v in (*modules.values(), *fused.values())),
                     {d: all(v) for d, v in modules.items()})
        self._plans[optimizer] = plan
        return plan

    # ------------------------------------------------------------------ the hook

    def _hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self.error is not None:
            return None
        try:
            self._observe(optimizer)
        except Exception as e:  # never raise into training: warn once, stop tracking
            self.error = f"{type(e).__name__}: {e}"
            self.remove()
            warnings.warn(f"moewatch: expert gradient tracking failed and is disabled ({self.error}); training "
                          f"continues without grad_norm", RuntimeWarning, stacklevel=2)
        return None

    def _hook_after(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._active.discard(id(optimizer))

    def _observe(self, optimizer: torch.optim.Optimizer) -> None:
        self.any_steps += 1
        plan = self._plan(optimizer)
        if not plan.any:
            return  # an optimizer of something else
        if self._active:
            return  # called from inside another optimizer's step: a wrapper delegating to an inner optimizer
        self._active.add(id(optimizer))
        self._steps[id(optimizer)] = self._steps.get(id(optimizer), 0) + 1
        self.optimizer_steps += 1
        factor = _amp_factor(optimizer)
        with torch.no_grad():
            for device, dev in self._devices.items():
                mods = self._module_grads(dev, plan)
                rows = [self._grad(i, device) if h else None for i, h in zip(dev.fused, plan.fused[device],
                                                                            strict=True)]
                _accumulate(dev, dev.acc, mods, rows, factor)

    def _module_grads(self, dev: _Device, plan: _Plan) -> list[torch.Tensor | None]:
        """The experts-as-modules grads (None: absent or not this optimizer's).

        Plain tensors take a fast path, since there can be thousands of them (64 experts x 3 weights x 48 layers):
        no per-tensor check, as a whole tensor is one expert's whatever its shape, and a grad that `_foreach_norm`
        cannot read (another device, sparse) fails the hook, which then warns and stops.
        """
        held = plan.modules[dev.device]
        if not dev.mod_plain:
            return [self._grad(i, dev.device) if h else None for i, h in zip(dev.modules, held, strict=True)]
        if plan.all_modules[dev.device]:
            grads = [p.grad for p in dev.mod_params]
        else:
            grads = [p.grad if h else None for p, h in zip(dev.mod_params, held, strict=True)]
        for layer, (a, b) in dev.mod_spans.items():
            if layer not in self._seen and any(g is not None for g in grads[a:b]):
                self._seen.add(layer)
        return grads

    def _grad(self, item: _Item, device: torch.device) -> torch.Tensor | None:
        """The item's local grad as planned, or None (absent; or unreadable: then its layer is dropped)."""
        if item.layer in self._dropped:
            return None
        g = item.param.grad
        if g is None:
            return None
        if g.device != device or g.is_sparse:
            self._drop(item.layer, "a gradient is sparse" if g.is_sparse else f"a gradient is on {g.device}, its "
                                                                              f"parameter on {device}")
            return None
        if item.local.placements is not None and (not _is_dtensor(g) or tuple(g.placements) !=
                                                  item.local.placements):
            self._drop(item.layer, f"gradient placements {getattr(g, 'placements', None)} differ from the "
                                   f"parameter's {item.local.placements}")
            return None
        local = _local(g)
        if tuple(local.shape) != item.local.shape:
            self._drop(item.layer, f"gradient shape {tuple(local.shape)} differs from the parameter's "
                                   f"{item.local.shape} (FSDP1 flat shards?)")
            return None
        self._seen.add(item.layer)
        return local

    # ------------------------------------------------------------------ reading

    def take(self) -> GradTake:
        """The squares accumulated since the last take (the step's) and how many optimizer steps they span."""
        if self.error is not None:
            return GradTake({}, 0)
        steps = max(self._steps.values(), default=0)
        layers = [layer for layer in self.found if layer in self._seen and layer not in self._dropped]
        self.ever_seen.update(self._seen)
        out = self._split(layers, [d.acc for d in self._devices.values()])
        for dev in self._devices.values():
            dev.acc = torch.zeros_like(dev.acc)  # the old buffer goes to the caller, untouched from now on
        self._steps.clear()
        self._seen = set()
        self._active.clear()  # a step that raised never ran its post hook
        return GradTake(out, steps)

    def param_norms(self, squared: bool = False) -> dict[str, torch.Tensor]:
        """Per layer, float32 ``[E]`` on the device: each expert's parameter norm (NaN for parameter-free experts).

        With sharded (DTensor) parameters these are this rank's local values: ask for ``squared=True`` and combine
        the ranks with `combine_sq`.
        """
        accs = []
        with torch.no_grad():
            for dev in self._devices.values():
                acc = torch.zeros_like(dev.acc)
                mods = [None if i.layer in self._dropped else _local(i.param.detach()) for i in dev.modules]
                rows = [None if i.layer in self._dropped else _local(i.param.detach()) for i in dev.fused]
                _accumulate(dev, acc, mods, rows, None)
                accs.append(acc)
        out = self._split([layer for layer in self.found if layer not in self._dropped], accs)
        return out if squared else {k: v.sqrt() for k, v in out.items()}

    def _split(self, layers: list[str], accs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for layer in layers:
            base, E, home = self._base[layer], self.found[layer].num_experts, self._home[layer]
            parts = [a[base:base + E] for a in accs]
            v = parts[0] if len(parts) == 1 else torch.stack([p.to(home) for p in parts]).sum(0)
            out[layer] = v + self._nan[layer] if layer in self._nan else v
        return out

    def remove(self) -> None:
        """Unhook from the optimizers (idempotent)."""
        for handle in (self._handle, self._post):
            if handle is not None:
                handle.remove()
        self._handle = self._post = None

    @property
    def layers(self) -> list[str]:
        """The layers tracked now (found and not dropped)."""
        return [layer for layer in self.found if layer not in self._dropped]


def _slots(slots: list[tuple[int, float]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    index = torch.tensor([s for s, _ in slots], dtype=torch.long, device=device)
    scales = [c for _, c in slots]
    return index, (torch.tensor(scales, dtype=torch.float32, device=device) if any(c != 1.0 for c in scales)
                   else None)


def _accumulate(dev: _Device, acc: torch.Tensor, mods: list[torch.Tensor | None], rows: list[torch.Tensor | None],
                factor: torch.Tensor | None) -> None:
    """Add the squares of `mods` (whole tensors) and of `rows` (per dim-0 row) into `acc` at their slots.

    A None stands in as zeros so that the layout, hence the index tensors, never changes.
    """
    if any(t is not None for t in mods):
        norms = torch._foreach_norm([z if t is None else t for z, t in zip(dev.mod_zero, mods, strict=True)], 2,
                                    dtype=torch.float32)
        _add_scaled(acc, dev.mod_index, torch.stack(norms).square(), dev.mod_scale, factor)
    if any(t is not None for t in rows):
        parts = [dev.zero[:i.local.rows] if t is None else
                 torch.linalg.vector_norm(t.reshape(i.local.rows, -1), 2, dim=1, dtype=torch.float32)
                 for i, t in zip(dev.fused, rows, strict=True)]
        _add_scaled(acc, dev.fused_index, torch.cat(parts).square(), dev.fused_scale, factor)


def _add_scaled(acc: torch.Tensor, index: torch.Tensor, sq: torch.Tensor, scale: torch.Tensor | None,
                factor: torch.Tensor | None) -> None:
    """``acc[index] += sq * scale * factor`` (each of those optional): the squares at their experts' slots, scaled by
    the shard share and the AMP unscale factor."""
    if scale is not None:
        sq = sq * scale
    if factor is not None:
        sq = sq * factor
    acc.index_add_(0, index, sq)


def _amp_factor(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """1/grad_scale**2 (NaN where found_inf) for optimizers that GradScaler lets unscale in their own kernel."""
    scale = getattr(optimizer, "grad_scale", None)
    found_inf = getattr(optimizer, "found_inf", None)
    if not isinstance(scale, torch.Tensor) and not isinstance(found_inf, torch.Tensor):
        return None
    factor = scale.float().reciprocal().square() if isinstance(scale, torch.Tensor) else None
    if isinstance(found_inf, torch.Tensor):
        nan = torch.where(found_inf.float() > 0, float("nan"), 1.0)
        factor = nan if factor is None else factor * nan
    return factor.reshape(())


# ---------------------------------------------------------------------------------------------- ranks


def combine_sq(sq_per_rank: Sequence[torch.Tensor | np.ndarray], sharded: bool) -> torch.Tensor | np.ndarray:
    """Norms ``[E]`` from each rank's sums of squares ``[E]`` (`GradTake.sq_E`, or `param_norms(squared=True)`).

    ``sharded=False`` (data parallel: grads are all-reduced before the step, identical on every rank; parameters
    too): the first rank's ``sqrt``. Never sum norms, nor squares, of replicas. ``sharded=True`` (FSDP2/DTensor,
    `ExpertParams.sharded`): ``sqrt`` of the sum over ranks; replicas are already divided out by the tracker.
    Divide by ``steps`` before if a take spans several optimizer steps.
    """
    if not sq_per_rank:
        raise ValueError("combine_sq needs at least one rank's values")
    first = sq_per_rank[0]
    if isinstance(first, torch.Tensor):
        total = torch.stack([torch.as_tensor(s, device=first.device) for s in sq_per_rank]).sum(0) if sharded else first
        return total.sqrt()
    arrays = [np.asarray(s, dtype=np.float64) for s in sq_per_rank]
    return np.sqrt(np.sum(arrays, axis=0) if sharded else arrays[0])


__all__ = [
    "ExpertParams",
    "ExpertTensor",
    "GradTake",
    "GradTracker",
    "combine_sq",
    "find_expert_params",
]
