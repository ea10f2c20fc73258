"""`attach()` and `Watch`: forward hooks on every router, per-step accumulation on the device, flushing to disk.

The training thread only ever launches small device ops (moewatch.metrics.observe into per-layer accumulators,
one cat + zero per device at `step()`, one non-blocking device->host copy at a flush). Everything that needs the
values — metrics, Arrow, Parquet, the heartbeat — runs in the writer thread (moewatch.store.writer.FlushWorker).

Across ranks (`attach(..., group=)`, torch.distributed initialized): the ranks of the group sum their steps in a
background thread (moewatch.capture.reduce) and the group's first rank writes them; the training thread only hands
over each flush. Every rank keeps a rank manifest `ranks/r<rank>.json` (its routers, its group, a fallback if the
sum failed); rank 0 merges them into run.json.

Expert learning (`attach(..., grads=True)`, the default): a `moewatch.capture.grads.GradTracker` reads each routed
expert's gradient squares in a global optimizer step pre-hook; `step()` adds what it took into the layer's training
accumulator (`grad_sq`, `grad_steps`) and, at a step that flushes, the experts' parameter squares (`param_sq`,
`param_share`); see moewatch.metrics for how those stay exact through the rank sum. All on the device, no host sync.

Never silent: `attach` logs one line saying what it found (`moewatch.capture.summary`) and warns about modules that
look like MoE blocks but hold no router; during training a router that records nothing in its first
``silent_steps`` training steps, a reader that cannot parse an output, and a hook that fails each warn once. Every
such problem is also kept in run.json under ``problems`` (see `PROBLEM_KINDS`).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moewatch import metrics
from moewatch.capture.summary import RouterInfo, expert_result, summary_line
from moewatch.capture.types import Probe, RouterSpec, Routing, UnreadableOutput
from moewatch.store.manifest import atomic_write_bytes, new_manifest, read_manifest, write_manifest
from moewatch.store.schema import EXPERTS, LAYERS, MANIFEST, RANKS_DIR, TABLES
from moewatch.store.writer import Chunk, FlushWorker, LayerSlot, PartWriter

log = logging.getLogger("moewatch")

PHASES = ("train", "eval")

# run.json ``problems``: a list of {"kind", "router", "message", "step", "session", "time"}, one per problem, in the
# order they happened. "router" is the layer name (null for a model-level problem); "step" the step being recorded.
PROBLEM_KINDS = {
    "unrouted_moe": "a module looks like an MoE block but moewatch found no router in it (at attach)",
    "silent_router": "a router recorded nothing in the first training steps",
    "unreadable_output": "a router's reader could not find the routing in its output",
    "hook_error": "a router's hook raised; recording of that router stopped",
    "replicated_ranks": "ranks of a process group recorded identical routing (tensor-parallel replicas summed)",
    "expert_params_not_found": "a router's expert parameters were not found (at attach): no grad_norm/param_norm",
    "expert_grads_stopped": "expert gradient tracking stopped for a router (its grads changed layout) or for all "
                            "(the optimizer hook failed); training continues",
    "expert_grads_unseen": "no optimizer step showed a router's expert gradients (the optimizer steps copies of the "
                           "parameters, or they never had a .grad): no grad_norm",
}
# Training steps after which expert gradients never seen are reported: longer than silent_steps, since one optimizer
# step may span several watch steps (gradient accumulation stepped per micro-batch).
GRADS_SILENT_STEPS = 50


# `stop_on` -> the alert statuses (moewatch.detect.alerts: Alert.status) that set Watch.should_stop.
STOP_ON = {"critical": ("critical", "collapsed"), "collapsed": ("collapsed",)}


@dataclass(frozen=True)
class WatchConfig:
    """How a Watch records and flushes. Validated on construction."""

    flush_steps: int = 100
    flush_seconds: float = 30.0
    record_eval: bool = False
    silent_steps: int = 3  # warn about a router that recorded nothing in this many training steps (0: never)
    per_rank: bool = False  # with a process group: also keep each rank's own rows (under ranks/)
    reduce_timeout: float = 60.0  # seconds a collective of the rank sum may take before the ranks fall back
    ep_size: int | None = None  # expert-parallel degree (contiguous placement), recorded in run.json
    expert_placement: Any = None  # device of each expert (a list, or {layer: list}), recorded in run.json
    stop_on: str | None = None  # "critical" or "collapsed": set Watch.should_stop when such a live alert is raised
    grads: bool = True  # record per-expert gradient norms (an optimizer step pre-hook) and parameter norms

    def __post_init__(self) -> None:
        if not isinstance(self.flush_steps, int) or self.flush_steps < 1:
            raise ValueError(f"flush_steps must be an integer >= 1, got {self.flush_steps!r}")
        if not isinstance(self.silent_steps, int) or self.silent_steps < 0:
            raise ValueError(f"silent_steps must be an integer >= 0, got {self.silent_steps!r}")
        if not self.flush_seconds > 0:
            raise ValueError(f"flush_seconds must be > 0, got {self.flush_seconds!r}")
        if not self.reduce_timeout > 0:
            raise ValueError(f"reduce_timeout must be > 0, got {self.reduce_timeout!r}")
        if not isinstance(self.per_rank, bool):
            raise TypeError(f"per_rank must be True or False, got {self.per_rank!r}")
        if not isinstance(self.grads, bool):
            raise TypeError(f"grads must be True (record expert gradient norms) or False, got {self.grads!r}")
        from moewatch.store.placement import check_placement

        ep_size, placement = check_placement(self.ep_size, self.expert_placement)
        object.__setattr__(self, "expert_placement", placement)
        if self.stop_on is not None and self.stop_on not in STOP_ON:
            raise ValueError(f"stop_on must be 'critical' (stop on a critical or collapsed alert), 'collapsed' (stop on "
                             f"a collapse alert only) or None (never stop), got {self.stop_on!r}")


def _in_backward() -> bool:
    # Activation checkpointing re-runs forwards inside the autograd engine; those must not count twice.
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _group_members(group: Any, rank: int) -> tuple[int, ...]:
    """The global ranks of `group` in group order (its first one writes); this rank must be one of them."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("attach(..., group=...) needs torch.distributed to be initialized (init_process_group)")
    try:
        members = tuple(int(r) for r in dist.get_process_group_ranks(group))
    except Exception as e:
        raise ValueError(f"attach(..., group=...): not a process group of this job ({e})") from None
    if rank not in members:
        raise ValueError(f"attach(..., group=...): rank {rank} is not in the group {list(members)}; pass the group "
                         "this rank belongs to (e.g. its data-parallel group)")
    return members


class _LayerState:
    __slots__ = ("spec", "tensors", "calls", "disabled", "handles", "recorded", "warned")

    def __init__(self, spec: RouterSpec):
        self.spec = spec
        self.tensors: dict[str, torch.Tensor] = {}  # phase -> accumulator
        self.calls = {p: 0 for p in PHASES}
        self.disabled = False
        self.handles: list[Any] = []
        self.recorded = False  # whether a training call was ever observed
        self.warned: set[str] = set()  # problem kinds already warned about


class Watch:
    """Records router health for one model into one run directory. Create with `moewatch.attach`.

    `should_stop` turns True (and `stop_alert` holds the alert) once a live alert whose status `stop_on` names is
    raised; a training loop checks it after `step()`. It is set in the writer thread when the flush that raised the
    alert is evaluated, so it follows the alert's step by up to `flush_steps` steps (and the writer's lag).
    """

    def __init__(
        self,
        model: nn.Module | None,
        run_dir: str | os.PathLike,
        specs: list[RouterSpec],
        config: WatchConfig,
        meta: Mapping[str, Any] | None = None,
        on_tables: Callable | None = None,
        problems: list[dict[str, Any]] | None = None,
        group: Any = None,
    ):
        self.run_dir = Path(run_dir)
        self.config = config
        self.rank, self.world_size = _dist_rank_world()
        # The process group whose ranks are summed (None: this rank's rows are its own, summed when loading).
        self._members = _group_members(group, self.rank) if group is not None and self.world_size > 1 else None
        self._reducer: Any = None
        self._registry: list[tuple[str, int, int, bool]] = []  # routers in registration order (the sum's layout)
        self._step_log: list[tuple[int, int, float, int]] = []  # group mode: every step() since the last flush
        self._held: list[Chunk] = []  # group mode: chunks closed early (a router joined), sent at the next flush
        self._rank_lock = threading.Lock()
        self._rank_routers = 0  # routers in the rank manifest on disk
        self._layers: dict[str, _LayerState] = {}
        self._root_depth = 0
        self._root_mode = (False, False)
        self._closed = False
        self._model_ref = weakref.ref(model) if model is not None else None
        self._handles: list[Any] = []
        self._pending: dict[tuple[str, str], list[torch.Tensor]] = {}  # (phase, device) -> per-step snapshots
        self._pending_layout: dict[tuple[str, str], tuple[LayerSlot, ...]] = {}
        self._pending_meta: dict[tuple[str, str], list[tuple[int, int, float, dict[str, int]]]] = {}
        self._seq = 0
        self._since_flush = 0
        self._last_flush = time.monotonic()
        self._manifest_lock = threading.Lock()  # the heartbeat (writer thread) and problems (here) both write run.json
        self._trained = False  # a training forward of the model ran since the last step()
        self._train_steps = 0  # steps that had a training forward
        self.should_stop = False  # set by a live alert that config.stop_on names (see _on_live_alert)
        self.stop_alert: Any = None  # the alert that set should_stop
        self._grads: Any = None  # the GradTracker (None: grads=False, no model, or nothing found)
        self._grad_share: dict[str, float] = {}  # layer -> this rank's share (moewatch.metrics: 1, or 1/R sharded)
        self._grad_reported: set[str] = set()  # tracker problems already in run.json
        self._grads_checked = False  # expert_grads_unseen was looked for (once per watch)
        # router -> (where its expert parameters are, None) or (None, why no grad_norm): what RouterInfo lists
        self._experts: dict[str, tuple[str | None, str | None]] = {}
        self._final = False  # close()'s last step: it flushes, so it gets the parameter norms

        self._prepare_dir()
        self._next_step = self._resume_step()
        self._manifest = self._initial_manifest(model, meta)
        self._rank_manifest = self._initial_rank_manifest()
        for spec in specs:
            self._add_layer(spec)
        for problem in problems or []:
            extra = {k: v for k, v in problem.items() if k not in ("kind", "router", "message")}
            self._problem(problem["kind"], problem.get("router"), problem["message"], warn=False, **extra)
        if config.grads and model is not None and specs:
            self._attach_grads(model, specs)
        elif specs:
            why = "attach(grads=False)" if not config.grads else "no model to find expert parameters in"
            self._experts = {spec.name: (None, why) for spec in specs}
        if self._experts:  # the routers' entries again, now that grad_norm is known for each
            infos = {name: self._info(state).as_dict() for name, state in self._layers.items()}
            self._manifest["routers"] = [infos.get(r.get("name"), r) for r in self._manifest["routers"]]
        self._write_rank_manifest()
        self._write_manifest_now()
        self._worker = FlushWorker(
            PartWriter(self.run_dir, self.rank, self._session),
            heartbeat=self._heartbeat if self.rank == 0 or self.world_size > 1 else None,
            heartbeat_seconds=max(1.0, min(config.flush_seconds, 30.0)),
            on_tables=on_tables,
        )
        self._worker.start()
        if self._members is not None and len(self._members) > 1:
            from moewatch.capture.reduce import GroupReducer

            self._reducer = GroupReducer(
                members=self._members, rank=self.rank, worker=self._worker,
                phases=PHASES if config.record_eval else ("train",), timeout=config.reduce_timeout,
                session=self._session, per_rank=config.per_rank, on_session=self._on_session,
                on_fallback=self._on_fallback, on_problem=lambda kind, message: self._problem(kind, None, message))
            self._reducer.start()
        if model is not None:
            self._handles.append(model.register_forward_pre_hook(self._root_pre))
            self._handles.append(model.register_forward_hook(self._root_post, always_call=True))
        _track(self)

    def _attach_grads(self, model: nn.Module, specs: list[RouterSpec]) -> None:
        """Hook the optimizers for the experts' gradient norms; routers whose experts are not found are problems."""
        from moewatch.capture.grads import GradTracker

        try:
            tracker = GradTracker.attach(model, specs)
        except Exception as e:  # discovery must never stop training: no grad norms, said once
            self._experts = {spec.name: (None, f"the search failed ({type(e).__name__})") for spec in specs}
            self._problem("expert_params_not_found", None, (
                f"moewatch: could not look for the experts' parameters ({type(e).__name__}: {e}); grad_norm and "
                f"param_norm are not recorded"))
            return
        # Data-parallel replicas each add their (identical) full squares with share 1; DTensor shards add partial
        # squares with share 1/R, so the group's sum is exact either way (moewatch.metrics).
        ranks = len(self._members) if self._members is not None else 1
        self._grad_share = {layer: 1.0 / ranks if ep.sharded else 1.0 for layer, ep in tracker.found.items()}
        missing = dict(tracker.problems)
        self._experts = {**{layer: expert_result(model, None, reason) for layer, reason in missing.items()},
                         **{layer: expert_result(model, ep, None) for layer, ep in tracker.found.items()}}
        for layer, reason in missing.items():
            self._grad_reported.add(layer)
            self._problem("expert_params_not_found", layer, (
                f"moewatch: the experts of router {layer!r} were not found: {reason}. Its grad_norm and param_norm "
                f"are not recorded"), warn=False, write=False)
        if missing:
            shown = ", ".join(repr(n) for n in list(missing)[:4]) + (f" and {len(missing) - 4} more"
                                                                      if len(missing) > 4 else "")
            warnings.warn(f"moewatch: the expert parameters of {len(missing)} of {len(specs)} router(s) were not "
                          f"found ({shown}): no gradient norms for them; the reasons are in run.json problems",
                          RuntimeWarning, stacklevel=4)
        if tracker.found:
            self._grads = tracker
            # debug, not info: attach logs one line (what it found), and a router left out already warned
            log.debug("moewatch: expert gradient norms for %d of %d routers: %s", len(tracker.found), len(specs),
                      "; ".join(ep.describe() for ep in tracker.found.values()))
        else:
            tracker.remove()

    def _put_grads(self, flushing: bool) -> None:
        """At step(): the gradient squares the optimizer steps since the last step() saw, and at a flush the
        parameter squares, into the layers' training accumulators (device ops only)."""
        tracker = self._grads
        if tracker is None:
            return
        try:
            took = tracker.take()
            if took.steps > 0:
                for layer, sq_E in took.sq_E.items():
                    acc = self._train_acc(layer)
                    if acc is not None:
                        share = self._grad_share.get(layer, 1.0)
                        metrics.put_norms(acc, metrics.grad_slice(sq_E.shape[0]), sq_E, took.steps * share)
            if flushing:
                for layer, sq_E in tracker.param_norms(squared=True).items():
                    acc = self._train_acc(layer)
                    if acc is not None:
                        metrics.put_norms(acc, metrics.param_slice(sq_E.shape[0]), sq_E,
                                          self._grad_share.get(layer, 1.0))
        except Exception as e:  # never into training: stop tracking, say so once (the hook's own failure warned)
            tracker.error = tracker.error or f"{type(e).__name__}: {e}"
            tracker.remove()
            warnings.warn(f"moewatch: expert gradient tracking failed and is disabled ({tracker.error}); training "
                          f"continues without grad_norm", RuntimeWarning, stacklevel=3)
        if tracker.error is not None or len(tracker.problems) > len(self._grad_reported):
            self._grad_problems(tracker)

    def _train_acc(self, layer: str) -> torch.Tensor | None:
        """The layer's training accumulator if this step writes a row for it (it routed in a training forward)."""
        s = self._layers.get(layer)
        return s.tensors.get("train") if s is not None and s.calls["train"] else None

    def _grad_problems(self, tracker: Any) -> None:
        for layer, reason in tracker.problems.items():
            if layer not in self._grad_reported:  # grads.py already warned
                self._grad_reported.add(layer)
                self._problem("expert_grads_stopped", layer, (
                    f"moewatch: expert gradients of router {layer!r} are no longer tracked: {reason}"), warn=False)
        if tracker.error is not None:
            self._grads = None
            self._problem("expert_grads_stopped", None, (
                f"moewatch: expert gradient tracking failed and is off ({tracker.error}); training continues "
                f"without grad_norm and param_norm"), warn=False)

    def _on_live_alert(self, alert: Any) -> None:
        """Each new live alert, in the writer thread, before the user's on_alert: the first one whose status
        `stop_on` names sets `should_stop` (it stays set) and logs why."""
        stop_on = self.config.stop_on
        if stop_on is None or self.should_stop or alert.status not in STOP_ON[stop_on]:
            return
        self.stop_alert = alert
        self.should_stop = True
        log.error("moewatch: stop_on=%r: a %s alert (%s) on %s was raised at step %d; watch.should_stop is set: %s",
                  stop_on, alert.status, alert.kind, alert.layer, alert.detected_step, alert.message)

    # ------------------------------------------------------------------ set-up
    def _prepare_dir(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".moewatch-write-test-{os.getpid()}-{self.rank}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise OSError(f"moewatch: cannot write to run directory {self.run_dir} ({e}); "
                          "pick a writable path for attach(model, run_dir)") from None
        # Plain parts and compacted ones (r<rank>-s<session>-c<first>-<last>): a session whose parts were all
        # compacted still counts, or a resume would reuse its number and its part names.
        pattern = re.compile(rf"^r{self.rank:04d}-s(\d+)-(?:c\d+-)?\d+\.parquet$")
        sessions = [0]
        for table in TABLES:
            for folder in (self.run_dir / table, self.run_dir / RANKS_DIR / table):
                if folder.is_dir():
                    sessions += [int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(f))]
        if self.world_size > 1:  # a rank of a group may have written no rows itself: its rank manifest knows
            sessions += [int(k) for k in self._read_rank_manifest().get("sessions", {}) if str(k).isdigit()]
        self._session = max(sessions) + 1

    def _resume_step(self) -> int:
        """The step after the last one recorded, in the experts and the layers tables: a crash between a flush's
        experts part and its layers part leaves expert rows whose steps must not be recorded again."""
        folders = [self.run_dir / t for t in (EXPERTS, LAYERS) if (self.run_dir / t).is_dir()]
        # In a group only the first rank writes, so every member resumes after the group's rows.
        if (self._session == 1 and self._members is None) or not folders:
            return 0
        import pyarrow.parquet as pq

        from moewatch.store.dense import column_stats

        last = -1
        for folder in folders:
            try:
                owners = self._members or (self.rank,)
                prefixes = tuple(f"r{r:04d}-" for r in owners)
                for name in os.listdir(folder):
                    if not (name.endswith(".parquet") and name.startswith(prefixes)):
                        continue
                    f = folder / name
                    stats = column_stats(pq.read_metadata(f), "step") or []
                    if all(st is not None and st.has_min_max for st in stats):  # the footer says: no data read
                        last = max([last, *(int(st.max) for st in stats)])
                    else:
                        last = max(last, int(pq.read_table(f, columns=["step"])["step"].to_numpy().max(initial=-1)))
            except Exception as e:  # a corrupt part must not stop training; numbering goes on after what we read
                warnings.warn(f"moewatch: could not read previous steps in {folder} ({e}); numbering steps after "
                              "the ones it could read", RuntimeWarning, stacklevel=3)
        return last + 1

    def _initial_manifest(self, model: nn.Module | None, meta: Mapping[str, Any] | None) -> dict[str, Any]:
        base: dict[str, Any] = {}
        if (self.run_dir / MANIFEST).exists():
            try:
                base = read_manifest(self.run_dir)
            except (OSError, ValueError) as e:
                warnings.warn(f"moewatch: starting a new manifest: {e}", RuntimeWarning, stacklevel=3)
        fields = {
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}" if model is not None else None,
            "world_size": self.world_size,
            "flush_steps": self.config.flush_steps,
            "flush_seconds": self.config.flush_seconds,
            "record_eval": self.config.record_eval,
        }
        if base:
            manifest = {**base, **fields, "status": "running", "sessions": self._session}
            manifest.setdefault("routers", [])
        else:
            manifest = new_manifest(**fields, routers=[])
            manifest["sessions"] = self._session
        manifest["problems"] = list(manifest.get("problems") or [])
        if meta:
            manifest["meta"] = {**manifest.get("meta", {}), **dict(meta)}
        manifest.setdefault("meta", {})
        if self.config.ep_size is not None:
            manifest["ep_size"] = self.config.ep_size
        if self.config.expert_placement is not None:
            manifest["expert_placement"] = self.config.expert_placement
        if self.world_size > 1:
            manifest.update({
                "aggregation": "group" if self._members is not None else "rank",
                "per_rank": self.config.per_rank,
                "reduce_timeout": self.config.reduce_timeout,
            })
        return manifest

    # ------------------------------------------------------------------ rank manifests (ranks/r<rank>.json)
    def _rank_manifest_path(self) -> Path:
        return self.run_dir / RANKS_DIR / f"r{self.rank:04d}.json"

    def _read_rank_manifest(self) -> dict[str, Any]:
        import json

        try:
            data = json.loads(self._rank_manifest_path().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) and isinstance(data.get("sessions"), dict) else {}

    def _initial_rank_manifest(self) -> dict[str, Any] | None:
        if self.world_size <= 1:
            return None
        sessions = self._read_rank_manifest().get("sessions", {})
        members = self._members
        sessions[str(self._session)] = {
            "aggregation": "group" if members is not None else "rank",
            "group": list(members) if members is not None else None,
            "writer": members[0] if members is not None else self.rank,
            "agreed": members is not None and len(members) == 1,  # a group of one needs no agreement
            "per_rank": self.config.per_rank, "fallback": None, "started": time.time(),
        }
        return {"rank": self.rank, "world_size": self.world_size, "routers": [], "sessions": sessions,
                "status": "running", "heartbeat": time.time()}

    def _write_rank_manifest(self) -> None:
        if self._rank_manifest is None:
            return
        import json

        with self._rank_lock:
            self._rank_routers = len(self._layers)
            self._rank_manifest["routers"] = [self._info(s).as_dict() for s in self._layers.values()]
            self._rank_manifest["heartbeat"] = time.time()
            data = json.dumps(self._rank_manifest, indent=1, default=str).encode("utf-8")
            try:
                path = self._rank_manifest_path()
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, data)
            except OSError as e:
                if not hasattr(self, "_worker"):
                    raise
                log.warning("moewatch: could not update %s: %s", self._rank_manifest_path(), e)

    def _on_session(self, session: int, agreed: bool) -> None:
        """From the reducer: the group agreed on a session number (the largest any member proposed)."""
        if agreed and session != self._session:
            self._worker.set_session(session)
            with self._rank_lock:
                entries = self._rank_manifest["sessions"]
                entries[str(session)] = entries.pop(str(self._session))
            self._session = session
            self._manifest["sessions"] = max(int(self._manifest.get("sessions") or 0), session)
        with self._rank_lock:
            self._rank_manifest["sessions"][str(self._session)]["agreed"] = agreed
        self._write_rank_manifest()

    def _on_fallback(self, info: dict[str, Any]) -> None:
        """From the reducer, before this rank writes its own rows: mark them (the loader needs it, run.json shows it)."""
        with self._rank_lock:
            self._rank_manifest["sessions"][str(self._session)]["fallback"] = info
        self._write_rank_manifest()
        self._write_manifest_now()

    def _merge_rank_manifests(self) -> None:
        """Rank 0: routers of every rank (pipeline stages record different ones), groups and fallbacks into run.json."""
        from moewatch.store.reader import read_rank_manifests

        ranks = read_rank_manifests(self.run_dir)
        if not ranks:
            return
        names = {r.get("name") for r in self._manifest["routers"]}
        routers = list(self._manifest["routers"])
        groups: dict[int, dict[str, Any]] = {}
        fallbacks = []
        for rank, rm in sorted(ranks.items()):
            for info in rm.get("routers") or []:
                if info.get("name") not in names:
                    names.add(info.get("name"))
                    routers.append(info)
            sessions = rm.get("sessions") or {}
            for key in sorted(sessions, key=lambda k: int(k) if str(k).isdigit() else 0):
                entry = sessions[key] or {}
                if entry.get("fallback"):
                    fallbacks.append({"rank": rank, **entry["fallback"]})
            latest = sessions[max(sessions, key=lambda k: int(k) if str(k).isdigit() else 0)] if sessions else {}
            if latest.get("aggregation") == "group" and latest.get("group"):
                g = groups.setdefault(int(latest["writer"]), {"writer": int(latest["writer"]),
                                                              "ranks": list(latest["group"]), "routers": []})
                g["routers"] += [i.get("name") for i in rm.get("routers") or [] if i.get("name") not in g["routers"]]
        self._manifest["routers"] = routers
        self._manifest["groups"] = [groups[w] for w in sorted(groups)]
        self._manifest["fallbacks"] = fallbacks

    def _add_layer(self, spec: RouterSpec) -> _LayerState:
        if spec.name in self._layers:
            raise ValueError(f"router {spec.name!r} is registered twice")
        state = _LayerState(spec)
        self._layers[spec.name] = state
        for probe in spec.probes:
            state.handles.append(probe.module.register_forward_hook(self._make_hook(state, probe), with_kwargs=True))
        routers = [r for r in self._manifest["routers"] if r.get("name") != spec.name]
        self._manifest["routers"] = [*routers, RouterInfo(spec).as_dict()]
        self._registry.append((spec.name, spec.num_experts, spec.top_k, spec.bias is not None))
        return state

    @property
    def routers(self) -> list[RouterInfo]:
        """The routers being recorded: each a `RouterInfo`, i.e. its layer name (a str) with ``kind``,
        ``num_experts``, ``top_k``, ``measures`` and ``note`` (see `moewatch.inspect`)."""
        return [self._info(s) for s in self._layers.values()]

    def _info(self, state: _LayerState) -> RouterInfo:
        return RouterInfo(state.spec, self._experts.get(state.spec.name))

    @property
    def problems(self) -> list[dict[str, Any]]:
        """Problems found so far (also in run.json under ``problems``); see `PROBLEM_KINDS`."""
        return list(self._manifest["problems"])

    def _problem(self, kind: str, router: str | None, message: str, *, warn: bool = True, write: bool = True,
                 **extra: Any) -> None:
        """Record a problem in run.json (rewritten now unless `write` is False: problems are rare) and warn."""
        self._manifest["problems"] = [*self._manifest["problems"], {
            "kind": kind, "router": router, "message": message, "step": self._next_step, "session": self._session,
            "time": time.time(), **extra}]
        if warn:
            warnings.warn(message, RuntimeWarning, stacklevel=4)
        if write and hasattr(self, "_worker"):
            self._write_manifest_now()

    # ------------------------------------------------------------------ hooks (training thread, no host sync)
    def _root_pre(self, module: nn.Module, args: tuple) -> None:
        if self._root_depth == 0:
            self._root_mode = (module.training, torch.is_grad_enabled())
            if module.training and torch.is_grad_enabled() and not _in_backward():
                self._trained = True
        self._root_depth += 1

    def _root_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._root_depth = max(0, self._root_depth - 1)

    def _phase(self, module: nn.Module) -> str | None:
        if _in_backward():
            return None
        training, grad = self._root_mode if self._root_depth else (module.training, torch.is_grad_enabled())
        if training and grad:
            return "train"
        return "eval" if self.config.record_eval else None

    def _make_hook(self, state: _LayerState, probe: Probe) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if state.disabled or self._closed:
                return
            phase = self._phase(module)
            if phase is None:
                return
            try:
                with torch.no_grad():
                    result = probe.read(module, args, kwargs, output)
                    for routing in (result,) if isinstance(result, Routing) else result or ():
                        self._observe(state, phase, routing)
            except UnreadableOutput as e:
                self._unreadable(state, module, e)
            except Exception as e:
                self._disable(state, e)

        return hook

    def _unreadable(self, state: _LayerState, module: nn.Module, error: UnreadableOutput) -> None:
        if "unreadable_output" in state.warned:
            return
        state.warned.add("unreadable_output")
        name = state.spec.name
        self._problem("unreadable_output", name, (
            f"moewatch: cannot read the routing of router {name!r} ({type(module).__name__}, kind "
            f"{state.spec.kind!r}): {error}. Nothing is recorded for its calls like this one. Register it by hand "
            f"with attach(model, run_dir, routers={{{name!r}: RouterSpec(name={name!r}, num_experts=..., top_k=..., "
            f"probes=[Probe(module, reader)]) }}) or record it with watch.record({name!r}, logits=..., indices=...)"))

    def _disable(self, state: _LayerState, error: Exception) -> None:
        state.disabled = True
        for h in state.handles:
            h.remove()
        self._problem("hook_error", state.spec.name, (
            f"moewatch: stopped recording router {state.spec.name!r} after an error in its hook "
            f"({type(error).__name__}: {error}); training continues"))

    def _observe(self, state: _LayerState, phase: str, r: Routing) -> None:
        acc = state.tensors.get(phase)
        if acc is None:
            ref = next(t for t in (r.logits_TE, r.probs_TE, r.indices_TK) if t is not None)
            acc = torch.zeros(metrics.state_size(state.spec.num_experts), dtype=torch.float64, device=ref.device)
            state.tensors[phase] = acc
        metrics.observe(acc, state.spec.num_experts, logits_TE=r.logits_TE, probs_TE=r.probs_TE,
                        indices_TK=r.indices_TK, dropped_TK=r.dropped_TK, scoring=r.scoring,
                        token_mask_T=r.token_mask_T, weights_TK=r.weights_TK, select_TE=r.select_TE,
                        select_space=r.select_space, unbiased_TE=r.unbiased_TE)
        state.calls[phase] += 1
        if phase == "train":
            state.recorded = True

    # ------------------------------------------------------------------ public API
    def record(
        self,
        layer: str,
        *,
        logits: torch.Tensor | None = None,
        probs: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
        dropped: torch.Tensor | None = None,
        scoring: str = "softmax",
        token_mask: torch.Tensor | None = None,
        num_experts: int | None = None,
        top_k: int | None = None,
        phase: str = "train",
        weights: torch.Tensor | None = None,
        select_scores: torch.Tensor | None = None,
        select_space: str = "logits",
        unbiased_scores: torch.Tensor | None = None,
    ) -> None:
        """Record one router call by hand (fused kernels that hide the router). Same meaning as `Routing`'s fields;
        the routing diagnostics (docs/format.md) need `indices` and: `weights` (the chosen slots' combine weights)
        for gate mass, `select_scores` (what the router ranks, in `select_space` "logits" or "sigmoid") for the
        routing margin, and `unbiased_scores` (the same without a selection-only correction bias) for the override.

        An unknown `layer` is registered on first use; its expert count comes from `num_experts` or the last dim of
        `logits`/`probs`, its top-k from `top_k` or the last dim of `indices`.
        """
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if logits is None and probs is None and indices is None:
            raise ValueError("record() needs at least one of logits, probs or indices")
        state = self._layers.get(layer)
        if state is None:
            E = num_experts or next((t.shape[-1] for t in (logits, probs) if t is not None), None)
            if E is None:
                raise ValueError(f"record(): unknown layer {layer!r}: pass num_experts= (or logits/probs) to register it")
            K = top_k or (indices.shape[-1] if indices is not None and indices.dim() > 1 else 1)
            state = self._add_layer(RouterSpec(name=layer, num_experts=int(E), top_k=int(K), kind="manual"))
        if state.disabled:
            return
        with torch.no_grad():
            self._observe(state, phase, Routing(logits_TE=logits, probs_TE=probs, indices_TK=indices,
                                                dropped_TK=dropped, scoring=scoring, token_mask_T=token_mask,
                                                weights_TK=weights, select_TE=select_scores,
                                                select_space=select_space, unbiased_TE=unbiased_scores))

    def step(self, step: int | None = None) -> int:
        """End one training step; everything routed since the previous call belongs to it. Returns its number."""
        if self._closed:
            raise RuntimeError("moewatch: step() after close()")
        number = self._next_step if step is None else int(step)
        self._next_step = number + 1
        now = time.time()
        if self._reducer is not None:
            self._step_log.append((self._seq, number, now, len(self._registry)))
        flushing = (self._final or self._since_flush + 1 >= self.config.flush_steps
                    or time.monotonic() - self._last_flush >= self.config.flush_seconds)
        self._put_grads(flushing)
        for phase in PHASES:
            self._snapshot(phase, number, now)
        if self._trained:
            self._trained = False
            self._train_steps += 1
            if self._train_steps == self.config.silent_steps:
                self._check_silent()
            if self._train_steps == GRADS_SILENT_STEPS:
                self._check_grads_seen()
        self._seq += 1
        self._since_flush += 1
        if flushing:
            self.flush()
        return number

    def _check_silent(self) -> None:
        """Warn once about each router that recorded nothing in the first `silent_steps` training steps."""
        n = self.config.silent_steps
        for name, s in self._layers.items():
            if s.recorded or s.disabled or s.spec.kind == "manual" or "silent_router" in s.warned:
                continue
            s.warned.add("silent_router")
            modules = ", ".join(sorted({type(p.module).__name__ for p in s.spec.probes})) or "no probe"
            self._problem("silent_router", name, (
                f"moewatch: router {name!r} ({s.spec.kind}, hooked on {modules}) recorded nothing in the first {n} "
                f"training steps: the module was not called in a training forward, or its output showed no routing. "
                f"If it is a router, register it by hand: attach(model, run_dir, routers={{{name!r}: "
                f"RouterSpec(name={name!r}, num_experts=..., top_k=..., probes=[Probe(module, reader)])}}) or "
                f"watch.record({name!r}, logits=..., indices=...) in your training step"), write=False)
        self._write_manifest_now()

    def _check_grads_seen(self) -> None:
        """Say once when the expert gradients of found routers never showed at an optimizer step: no grad_norm would
        otherwise be a silent gap (Megatron's mixed-precision or distributed optimizer and DeepSpeed ZeRO step fp32
        copies or flat shards of the parameters, not the model's; an optimizer that is not a torch.optim one never
        fires the hook)."""
        tracker = self._grads
        if tracker is None or self._grads_checked or not self._train_steps:
            return
        self._grads_checked = True
        n = self._train_steps
        if tracker.optimizer_steps == 0:
            held = (f"{tracker.any_steps} torch.optim optimizer steps ran but none held the experts' parameters: "
                    f"the optimizer steps copies of them (fp32 master weights: Megatron's mixed-precision or "
                    f"distributed optimizer, DeepSpeed ZeRO)") if tracker.any_steps else (
                    "no torch.optim optimizer step ran (expert gradient norms are read at optimizer steps; an "
                    "optimizer that is not a torch.optim.Optimizer is not seen)")
            self._problem("expert_grads_unseen", None, (
                f"moewatch: in {n} training steps {held}, so grad_norm is not recorded; attach(..., grads=False) "
                f"turns expert gradients off"))
            return
        unseen = [layer for layer in tracker.found if layer not in tracker.ever_seen and layer not in tracker.problems]
        for layer in unseen:
            self._problem("expert_grads_unseen", layer, (
                f"moewatch: the expert parameters of router {layer!r} had no .grad at any of {tracker.optimizer_steps} "
                f"optimizer steps in {n} training steps (frozen, or their gradients are kept elsewhere, e.g. "
                f"Megatron's main_grad): no grad_norm for it"), warn=False, write=False)
        if unseen:
            warnings.warn(f"moewatch: {len(unseen)} router(s) never showed expert gradients at an optimizer step "
                          f"({unseen[0]!r}{' and more' if len(unseen) > 1 else ''}): no grad_norm for them; see "
                          f"run.json problems", RuntimeWarning, stacklevel=3)
            self._write_manifest_now()

    def _snapshot(self, phase: str, number: int, now: float) -> None:
        calls = {name: s.calls[phase] for name, s in self._layers.items() if s.calls[phase] and phase in s.tensors}
        if not calls:
            return
        groups: dict[str, list[_LayerState]] = {}
        for s in self._layers.values():
            if phase in s.tensors:
                groups.setdefault(str(s.tensors[phase].device), []).append(s)
        for device, states in groups.items():
            for s in states:
                if s.spec.bias is not None:
                    b = s.spec.bias()
                    if b is not None:
                        s.tensors[phase][metrics.bias_slice(s.spec.num_experts)].copy_(b.detach().reshape(-1))
            layout, start = [], 0
            for s in states:
                n = s.tensors[phase].numel()
                layout.append(LayerSlot(s.spec.name, s.spec.num_experts, s.spec.top_k, s.spec.bias is not None,
                                        start, start + n))
                start += n
            key = (phase, device)
            if self._pending_layout.get(key) not in (None, tuple(layout)):
                self._flush_group(key)  # a router joined: close the block with the old layout first
            self._pending_layout[key] = tuple(layout)
            tensors = [s.tensors[phase] for s in states]
            self._pending.setdefault(key, []).append(torch.cat(tensors))
            torch._foreach_zero_(tensors)
            group_calls = {s.spec.name: calls.get(s.spec.name, 0) for s in states}
            self._pending_meta.setdefault(key, []).append((number, self._seq, now, group_calls))
        for s in self._layers.values():
            s.calls[phase] = 0

    def flush(self) -> None:
        """Hand every finished step to the writer thread (non-blocking; `close()` waits for the writes)."""
        self._flush()

    def _flush(self, closing: bool = False) -> None:
        for key in list(self._pending):
            self._flush_group(key)
        if self._reducer is not None and (self._step_log or self._held or closing):
            from moewatch.capture.reduce import StepBatch

            self._reducer.submit(StepBatch(self._step_log, self._held, tuple(self._registry), closing))
            self._step_log, self._held = [], []
        self._since_flush = 0
        self._last_flush = time.monotonic()

    def _flush_group(self, key: tuple[str, str]) -> None:
        snaps = self._pending.pop(key, [])
        info = self._pending_meta.pop(key, [])
        layout = self._pending_layout.pop(key, ())
        if not snaps:
            return
        states_SX = torch.stack(snaps)
        ready = None
        if states_SX.device.type == "cuda":
            host = torch.empty(states_SX.shape, dtype=states_SX.dtype, pin_memory=True)
            host.copy_(states_SX, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            states_SX = host
        elif states_SX.device.type != "cpu":
            states_SX = states_SX.to("cpu")
        chunk = Chunk(states_SX, ready, layout, steps=[i[0] for i in info], seqs=[i[1] for i in info],
                      times=[i[2] for i in info], calls=[i[3] for i in info], phase=key[0])
        if self._reducer is not None:
            self._held.append(chunk)
        else:
            self._worker.submit(chunk)

    def wait(self, timeout: float | None = None) -> bool:
        """Flush and block until everything recorded so far is on disk (for tests and checkpoints).

        With a process group, the steps are on disk once every rank of the group has flushed them too (call it on
        every rank); `timeout=None` then waits at most `reduce_timeout` for the group.
        """
        self.flush()
        if self._reducer is not None:
            start = time.monotonic()
            if not self._reducer.wait_handled(self._seq - 1, self.config.reduce_timeout if timeout is None
                                              else timeout):
                return False
            if timeout is not None:
                timeout = max(0.0, timeout - (time.monotonic() - start))
        return self._worker.drain(timeout)

    def close(self, status: str = "finished") -> None:
        """Write routing recorded since the last step() as a final step, flush, wait for the writes, remove hooks."""
        if self._closed:
            return
        if any(s.calls[p] for s in self._layers.values() for p in PHASES):
            self._final = True
            self.step()
        self._closed = True
        if self._grads is not None and self._train_steps >= max(1, self.config.silent_steps):
            self._check_grads_seen()  # a run shorter than GRADS_SILENT_STEPS hears it at close
        self._flush(closing=True)
        if self._grads is not None:
            self._grads.remove()
        for h in self._handles:
            h.remove()
        for s in self._layers.values():
            for h in s.handles:
                h.remove()
        if self._reducer is not None:
            # Bounded: every collective has a timeout, and a rank closing alone ends the group after one more.
            self._reducer.join(3 * self.config.reduce_timeout + 10.0)
            if self._reducer.is_alive():
                warnings.warn("moewatch: the rank reducer did not finish in time; steps it still held are not "
                              "written", RuntimeWarning, stacklevel=2)
        self._worker.drain()
        self._worker.stop()
        if self._rank_manifest is not None:
            self._rank_manifest["status"] = status
            self._write_rank_manifest()
        if self.rank == 0:
            self._manifest["status"] = status
            self._manifest["closed"] = time.time()
            self._write_manifest_now()
        _untrack(self)

    def _heartbeat(self) -> None:
        if self._rank_manifest is not None and self._rank_routers != len(self._layers):
            self._write_rank_manifest()  # a router registered later by record(); no write otherwise (1000s of ranks)
        self._write_manifest_now()

    def _write_manifest_now(self) -> None:
        if self.rank != 0:
            return
        try:
            with self._manifest_lock:
                if self.world_size > 1:
                    try:
                        self._merge_rank_manifests()
                    except Exception as e:  # a damaged rank manifest must not stop run.json (or training)
                        log.warning("moewatch: could not merge the rank manifests: %s", e)
                write_manifest(self.run_dir, self._manifest)
        except OSError as e:
            if self._closed or not hasattr(self, "_worker"):
                raise
            log.warning("moewatch: could not update %s: %s", self.run_dir / MANIFEST, e)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(status="crashed" if exc_type is not None else "finished")

    def __repr__(self) -> str:
        return f"Watch({str(self.run_dir)!r}, routers={len(self._layers)}, next_step={self._next_step})"


# ---------------------------------------------------------------------- interpreter exit
_open: weakref.WeakSet[Watch] = weakref.WeakSet()
_crashed = False
_prev_excepthook = sys.excepthook


def _excepthook(exc_type, exc, tb):
    global _crashed
    _crashed = True
    _prev_excepthook(exc_type, exc, tb)


def _track(w: Watch) -> None:
    global _prev_excepthook
    if not _open and sys.excepthook is not _excepthook:
        _prev_excepthook = sys.excepthook
        sys.excepthook = _excepthook
    _open.add(w)


def _untrack(w: Watch) -> None:
    _open.discard(w)


@atexit.register
def _close_all() -> None:
    for w in list(_open):
        try:
            w.close(status="crashed" if _crashed else "finished")
        except Exception as e:  # at exit, a warning is all that is useful
            print(f"moewatch: could not close {w.run_dir}: {e}", file=sys.stderr)


def attach(
    model: nn.Module | None,
    run_dir: str | os.PathLike,
    *,
    routers: Mapping[str, nn.Module | RouterSpec] | None = None,
    group: Any = None,
    per_rank: bool = False,
    reduce_timeout: float = 60.0,
    flush_steps: int = 100,
    flush_seconds: float = 30.0,
    record_eval: bool = False,
    silent_steps: int = 3,
    meta: Mapping[str, Any] | None = None,
    alerts: bool = False,
    on_alert: Callable[[Any], None] | None = None,
    detector_config: Any = None,
    on_tables: Callable[[Any, Any], None] | None = None,
    stop_on: str | None = None,
    ep_size: int | None = None,
    expert_placement: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    grads: bool = True,
) -> Watch:
    """Find every router in `model` and start recording into `run_dir` (created; resumed if it holds a run).

    `routers={name: module_or_RouterSpec}` replaces automatic discovery (an empty dict: record by hand with
    `watch.record`). Only training forwards (model in train mode, grad enabled at the model's call) are counted;
    `record_eval=True` records the others into the eval tables. `alerts=True` evaluates the collapse detector at
    each flush in the writer thread, logs each new alert once and calls `on_alert(alert)`. `on_tables(experts, layers)`
    is called in the writer thread with each flushed block of rows as pyarrow Tables (e.g. the TensorBoard bridge).
    `stop_on="collapsed"` (a collapse alert) or `"critical"` (a critical or collapsed one) turns live alerts on and
    sets `watch.should_stop` when such an alert is raised, for the training loop to stop on; nothing stops by default.

    Under torch.distributed (world size > 1) the ranks of `group` (a ProcessGroup, e.g. the data-parallel group;
    default: the world) sum their counts and statistics in a background thread and the group's first rank writes
    them, once; `group=False` turns the sum off (each rank writes its own rows, summed when loading). Call `attach`,
    `step()` and `close()` on every rank of the group, at the same steps; ranks that see the same tokens
    (tensor-parallel replicas) must not both be in it: attach on one of them. `per_rank=True` also
    keeps each rank's own rows under `ranks/`. A rank that dies or stalls for `reduce_timeout` seconds ends the sum:
    the others warn once and write their own rows (marked in run.json `fallbacks`), which `moewatch.load` still
    sums exactly. Recipes for DDP, FSDP2, DeviceMesh, Megatron-Core and DeepSpeed: docs/integrations.md.

    Never silent: logs one line (logger ``moewatch``, INFO) naming what it found; warns about modules that look like
    MoE blocks but hold no router, and, during training, about a router that recorded nothing in its first
    `silent_steps` training steps (0 turns that off) or whose output cannot be read. Each problem also goes to
    run.json under ``problems``. `moewatch.inspect(model)` lists the routers without attaching.

    Expert parallelism: `ep_size=N` records that N devices hold each layer's experts contiguously (device d holds
    experts d*E/N ... (d+1)*E/N - 1), or `expert_placement` the device of each expert (a list, or {layer: list});
    with neither, expert weights sharded as DTensors over a DeviceMesh dimension named like "ep" (torchtitan) give
    `ep_size`. The detector then judges the busiest device's load (`ep_straggler`) and
    `moewatch.load(run_dir).device_load(layer)` gives the per-device shares.

    Expert learning: `grads=True` (default) hooks every optimizer's step (a global pre-hook, removed by `close()`)
    and records per step and expert ``grad_norm``, the L2 norm of the expert's gradients as the optimizer saw them
    (all micro-batches accumulated; null in a step without an optimizer step), and, at each flush, ``param_norm``
    (moewatch.capture.grads). Call `step()` after `optimizer.step()`; attach after wrapping the model (FSDP2). A
    router whose experts' parameters are not found warns and is a run.json problem; `grads=False` turns it off.
    """
    from moewatch.capture.discovery import discover
    from moewatch.store.placement import detect_ep_size

    if ep_size is None and expert_placement is None and model is not None:
        ep_size = detect_ep_size(list(model.parameters()))
    config = WatchConfig(flush_steps=flush_steps, flush_seconds=flush_seconds, record_eval=record_eval,
                         silent_steps=silent_steps, per_rank=per_rank, reduce_timeout=reduce_timeout,
                         stop_on=stop_on, ep_size=ep_size, expert_placement=expert_placement, grads=grads)
    if group is False:
        group = None
    elif group is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            group = dist.group.WORLD
    problems: list[dict[str, Any]] = []
    if model is None:
        specs = list(discover(nn.Module(), routers)) if routers else []
    else:
        specs = discover(model, routers)
        if routers is None or routers:
            problems = _unrouted_problems(model, specs)
    for problem in problems:
        warnings.warn(problem["message"], RuntimeWarning, stacklevel=2)
    sinks = [on_tables] if on_tables is not None else []
    created: list[Watch] = []  # the Watch, once built: alerts are raised only at flushes, after attach returns
    if alerts or on_alert is not None or stop_on is not None:
        from moewatch.detect.live import live_alerts

        def raised(alert: Any) -> None:
            if created:
                created[0]._on_live_alert(alert)
            if on_alert is not None:
                on_alert(alert)

        ep = {"ep_size": config.ep_size, "expert_placement": config.expert_placement}
        sinks.append(live_alerts(detector_config, raised if on_alert is not None or stop_on is not None else None,
                                 manifest=ep))
    watch = Watch(model, run_dir, specs, config, meta=meta, on_tables=_fan_out(sinks) if sinks else None,
                  problems=problems, group=group)
    created.append(watch)
    # After the Watch is built: its routers know whether their expert gradients will be recorded.
    log.info("%s; recording into %s", summary_line(watch.routers, type(model).__name__ if model is not None else None),
             run_dir)
    return watch


def _unrouted_problems(model: nn.Module, specs: list[RouterSpec]) -> list[dict[str, Any]]:
    from moewatch.capture.discovery import moe_looking_modules

    unrouted = moe_looking_modules(model, specs)
    if not unrouted:
        return []
    named = dict(model.named_modules())
    shown = ", ".join(f"{n!r} ({type(named[n]).__name__})" for n in unrouted[:8])
    more = f" and {len(unrouted) - 8} more" if len(unrouted) > 8 else ""
    first = unrouted[0]
    message = (f"moewatch: {len(unrouted)} module(s) look like MoE blocks but hold no router moewatch can read: "
               f"{shown}{more}. Their routing is NOT recorded. Register each router by hand: attach(model, run_dir, "
               f"routers={{'{first}.gate': module_or_RouterSpec, ...}}) (with every other router too), or record it "
               f"with watch.record(layer, logits=..., indices=...); moewatch.inspect(model) lists what was found")
    return [{"kind": "unrouted_moe", "router": None, "message": message, "modules": unrouted}]


def _fan_out(sinks: list[Callable[[Any, Any], None]]) -> Callable[[Any, Any], None]:
    def call_all(experts: Any, layers: Any) -> None:
        for sink in sinks:
            try:
                sink(experts, layers)
            except Exception as e:  # one failing consumer must not starve the others
                warnings.warn(f"moewatch: {getattr(sink, '__name__', type(sink).__name__)} failed on flushed rows "
                              f"({type(e).__name__}: {e})", RuntimeWarning, stacklevel=1)

    return call_all
