"""Rank aggregation at capture: the ranks of a process group sum their steps and the group's first rank writes them.

Everything here runs in one background thread per rank (`GroupReducer`); the training thread only hands it a
`StepBatch` at each flush (a queue put). The reducer owns a side gloo process group built straight on the default
group's store under its own key prefix (no `dist.new_group`, so nothing in torch's group registry changes and no
other rank has to take part), and runs a small protocol on it:

- **rounds.** Every rank enters a round when it holds unreduced steps, when it is closing, or at least every
  `keepalive` seconds. A round starts with a header (one tiny MAX all-reduce) that tells every rank the fewest
  steps any rank holds (`n`), whether they share one layout, and who is closing. If `n > 0` the first `n` steps of
  every rank are summed (one SUM and one MAX all-reduce over float64: counts and sums add, `logit_abs_max` takes the
  max, the correction bias is averaged). The experts' gradient and parameter squares add with their weights
  (moewatch.metrics: a data-parallel replica adds its full squares with weight 1, a DTensor shard its partial ones
  with weight 1/R), so squares / weight, hence the recorded norm, is exact after the sum with nothing done here:
  replicas are never counted R times, and a rank that flushed (took parameter norms) at another step than the
  others still counts right. Ranks need not flush at the same steps (time-based flushes may differ):
  the rounds line the steps up by their order, and the step numbers are checked.
- **one writer.** The group's first rank writes the sums; the others write nothing. The writer makes a round's
  part files durable before it enters the next header, so a rank that sees the next header complete knows the
  previous round is on disk.
- **fallback.** A failed or timed-out collective (a rank died or stalled), a step-number or layout mismatch, or a
  rank that closed while others kept stepping ends the group. From then on each rank writes its own rows, marked in
  its rank manifest (`ranks/r<rank>.json`, `fallback`) before the first of them is written. A rank other than the
  writer also writes its own rows of the last round it could not confirm; where the writer did write that round,
  `moewatch.load` drops them (the rule is in `moewatch.store.reader.superseded_rows`), so nothing counts twice.
- **replicas.** Until the first round in which every rank routed something, the ranks also compare a checksum of
  their accumulators: two ranks with identical routing are tensor-parallel replicas (they route the same tokens),
  which the group would count twice. That is reported once (`on_problem`), not corrected.
- **never hurts training.** The training thread never waits on a collective; a failure warns once and falls back;
  every collective has a timeout, so `close()` of a surviving rank returns in bounded time.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import queue
import threading
import time
import warnings
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moewatch import metrics
from moewatch.store.writer import Chunk, FlushWorker, LayerSlot

log = logging.getLogger("moewatch")

LayerKey = tuple[str, int, int, bool]  # name, num_experts, top_k, has_bias
PHASES = ("train", "eval")

_prefix_counts: dict[tuple[int, ...], int] = {}
_prefix_lock = threading.Lock()


def side_group_prefix(members: tuple[int, ...]) -> str:
    """A store key prefix for a new side group over `members`, the same on every member if they attach in order."""
    with _prefix_lock:
        n = _prefix_counts.get(members, 0)
        _prefix_counts[members] = n + 1
    digest = hashlib.sha1("_".join(map(str, members)).encode()).hexdigest()[:16]
    return f"moewatch/{digest}/{n}/"


def stable_hash(value: Any) -> int:
    """A 56-bit hash that is the same in every process (Python's hash() of a str is not)."""
    return int.from_bytes(hashlib.sha1(repr(value).encode()).digest()[:7], "big")


@dataclass
class StepBatch:
    """One flush of one rank: every step() since the previous flush, and the chunks holding their sums."""

    steps: list[tuple[int, int, float, int]]  # (seq, step, time, routers registered at that step)
    chunks: list[Chunk]
    registry: tuple[LayerKey, ...]  # routers in registration order (only grows)
    closing: bool = False


@dataclass
class _Step:
    seq: int
    step: int
    time: float
    nreg: int
    blocks: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (phase, layer) -> accumulator
    calls: dict[tuple[str, str], int] = field(default_factory=dict)

    def phases(self) -> set[str]:
        return {p for p, _ in self.blocks}


class _Layout:
    """Where each (phase, router) accumulator sits in a round's row, for a registry prefix and a set of phases."""

    def __init__(self, registry: tuple[LayerKey, ...], phases: tuple[str, ...]):
        self.entries: list[tuple[str, LayerKey, int, int]] = []
        self.phase_spans: dict[str, tuple[int, int]] = {}
        start = 0
        for phase in phases:
            first = start
            for key in registry:
                n = metrics.state_size(key[1])
                self.entries.append((phase, key, start, start + n))
                start += n
            self.phase_spans[phase] = (first, start)
        self.width = start

    def matrix(self, steps: list[_Step]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(states [n, width], calls [n, L], present [n, L]) of `steps`; absent accumulators are zeros."""
        n, L = len(steps), len(self.entries)
        states = np.zeros((n, self.width), dtype=np.float64)
        calls = np.zeros((n, L), dtype=np.float64)
        present = np.zeros((n, L), dtype=np.float64)
        for i, s in enumerate(steps):
            for j, (phase, key, a, b) in enumerate(self.entries):
                block = s.blocks.get((phase, key[0]))
                if block is not None:
                    states[i, a:b] = block
                    present[i, j] = 1.0
                    calls[i, j] = s.calls.get((phase, key[0]), 0)
        return states, calls, present

    def absmax_columns(self) -> np.ndarray:
        return np.asarray([a + metrics._offsets(key[1])["logit_abs_max"] for _, key, a, _ in self.entries],
                          dtype=np.int64)

    def chunks(self, steps: list[_Step], states: np.ndarray, calls: np.ndarray, times: list[float],
               rank: int | None, dest: str) -> list[Chunk]:
        """One Chunk per phase (the writer's format) over `states`; routers with no calls get no rows."""
        out = []
        for phase, (lo, hi) in self.phase_spans.items():
            idx = [j for j, e in enumerate(self.entries) if e[0] == phase]
            if hi == lo or not idx or not calls[:, idx].any():
                continue
            layout = tuple(LayerSlot(key[0], key[1], key[2], key[3], a - lo, b - lo)
                           for (_, key, a, b) in (self.entries[j] for j in idx))
            per_step = [{self.entries[j][1][0]: int(round(calls[i, j])) for j in idx} for i in range(len(steps))]
            out.append(Chunk(torch.from_numpy(np.ascontiguousarray(states[:, lo:hi])), None, layout,
                             steps=[s.step for s in steps], seqs=[s.seq for s in steps], times=list(times),
                             calls=per_step, phase=phase, rank=rank, dest=dest))
        return out


class GroupFailed(Exception):
    """The group protocol ended for every rank alike (a mismatch, or a rank closed while others stepped)."""


class GroupReducer(threading.Thread):
    """Sums a process group's steps in a background thread; see the module docstring for the protocol."""

    def __init__(
        self,
        *,
        members: tuple[int, ...],
        rank: int,
        worker: FlushWorker,
        phases: tuple[str, ...],
        timeout: float,
        session: int,
        per_rank: bool,
        on_session: Callable[[int, bool], None],
        on_fallback: Callable[[dict[str, Any]], None],
        on_problem: Callable[[str, str], None] | None = None,
        make_group: Callable[[str, int, int, float], Any] | None = None,
    ):
        super().__init__(name="moewatch-reduce", daemon=True)
        self.members = members
        self.rank = rank
        self.group_rank = members.index(rank)
        self.writer_rank = members[0]
        self.is_writer = self.group_rank == 0
        self.worker = worker
        self.phases = phases
        self.timeout = float(timeout)
        self.keepalive = max(0.05, min(1.0, self.timeout / 10))
        self.session = session
        self.per_rank = per_rank
        self.on_session = on_session
        self.on_fallback = on_fallback
        self.on_problem = on_problem
        self.replicas_checked = False
        self.make_group = make_group or _gloo_group
        self.prefix = side_group_prefix(members)
        self.jobs: queue.Queue[StepBatch] = queue.Queue()
        self.buffer: deque[_Step] = deque()
        self.unconfirmed: list[_Step] = []  # a non-writer's last summed round, until the next header proves it on disk
        self.registry: tuple[LayerKey, ...] = ()
        self.closing = False
        self.closing_since = 0.0
        self.mode = "starting"  # starting -> group -> fallback | closed
        self.fallback: dict[str, Any] | None = None
        # for benchmarks/group_overhead.py: header rounds, rounds that summed steps, and where their time went
        self.rounds = 0
        self.data_rounds = 0
        self.reduced_steps = 0
        self.assemble_seconds = 0.0
        self.reduce_seconds = 0.0
        self.write_seconds = 0.0
        self.cpu_seconds = 0.0  # CPU time of this thread, set when it ends
        self.last_seq = -1
        self.handled_seq = -1
        self._handled = threading.Condition()
        self._pg: Any = None

    # -- training thread
    def submit(self, batch: StepBatch) -> None:
        self.jobs.put(batch)

    def wait_handled(self, seq: int, timeout: float | None) -> bool:
        """Block until every step up to `seq` is summed or written (or the reducer ended)."""
        with self._handled:
            return self._handled.wait_for(lambda: self.handled_seq >= seq or not self.is_alive(), timeout)

    # -- the thread
    def run(self) -> None:
        try:
            try:
                self._setup()
            except Exception as e:
                self._fall_back(f"could not set up the side process group ({type(e).__name__}: {e})")
            if self.mode == "group":
                try:
                    self._group_loop()
                except GroupFailed as e:
                    self._fall_back(str(e))
                except Exception as e:
                    self._fall_back(f"a collective failed ({type(e).__name__}: {_short(e)})")
            self._release()
            while not (self.closing and self.jobs.empty()):
                self._own_rows(self._take(block=True))
        except Exception as e:  # the last line of defence: never die silently with steps unwritten
            warnings.warn(f"moewatch: the rank reducer stopped ({type(e).__name__}: {e}); steps after this are "
                          "not recorded on this rank", RuntimeWarning, stacklevel=1)
        finally:
            self._release()
            self.cpu_seconds = time.thread_time()
            self.mode = "closed" if self.mode == "group" else self.mode
            with self._handled:
                self.handled_seq = max(self.handled_seq, self.last_seq)
                self._handled.notify_all()

    def _setup(self) -> None:
        self._pg = self.make_group(self.prefix, self.group_rank, len(self.members), self.timeout)
        hdr = torch.tensor([self.session, stable_hash(self.phases), -stable_hash(self.phases)], dtype=torch.int64)
        self._allreduce(hdr, max_op=True)
        if int(hdr[1]) != -int(hdr[2]):
            self.on_session(self.session, False)
            raise GroupFailed("the ranks record different phases (record_eval differs)")
        self.session = int(hdr[0])
        self.on_session(self.session, True)
        self.mode = "group"

    def _group_loop(self) -> None:
        idle = False
        while True:
            # Wait (up to `keepalive`, less if a batch comes) when there is nothing to offer or the last round was
            # empty; peers that have steps wait in the header meanwhile.
            self._pull(block=idle or (not self.buffer and not self.closing))
            run, sig, present = self._head()
            want_end = self.closing and time.monotonic() - self.closing_since > self.timeout
            hdr = torch.tensor([-len(run), len(self.buffer), int(self.closing), -int(self.closing), int(want_end),
                                sig, -sig, int("train" in present), int("eval" in present)], dtype=torch.int64)
            self._allreduce(hdr, max_op=True)
            self.rounds += 1
            if self.unconfirmed:  # every rank got here, so the writer finished the previous round's writes
                self._mark_handled(self.unconfirmed[-1].seq)
                self.unconfirmed = []
            n, most, any_closing, all_closing, end = -int(hdr[0]), int(hdr[1]), int(hdr[2]), -int(hdr[3]), int(hdr[4])
            if end:
                raise GroupFailed("a rank closed while others kept stepping (close() was not called at the same "
                                  "step on every rank)")
            if n > 0:
                if int(hdr[5]) != -int(hdr[6]):
                    raise GroupFailed("the ranks' routers differ at the same step")
                phases = tuple(p for p, bit in zip(PHASES, (hdr[7], hdr[8]), strict=True) if int(bit))
                self._reduce([self.buffer[i] for i in range(n)], phases)
                idle = False
                continue
            idle = True
            if all_closing and any_closing:
                if most > 0:
                    raise GroupFailed("the ranks recorded different numbers of steps; the unmatched ones are "
                                      "written per rank")
                return

    def _head(self) -> tuple[list[_Step], int, set[str]]:
        """The longest run of buffered steps at the front that share one router registry."""
        if not self.buffer:
            return [], 0, set()
        nreg = self.buffer[0].nreg
        run: list[_Step] = []
        present: set[str] = set()
        for s in self.buffer:
            if s.nreg != nreg:
                break
            run.append(s)
            present |= s.phases()
        return run, stable_hash((self.phases, self.registry[:nreg])), present

    def _reduce(self, steps: list[_Step], phases: tuple[str, ...]) -> None:
        t0 = time.perf_counter()
        layout = _Layout(self.registry[: steps[0].nreg], phases)
        states, calls, present = layout.matrix(steps)
        cols = layout.absmax_columns()
        n = len(steps)
        step_no = np.asarray([s.step for s in steps], dtype=np.float64)
        times = np.asarray([s.time for s in steps], dtype=np.float64)
        maxes = np.concatenate([states[:, cols], times[:, None], step_no[:, None], -step_no[:, None],
                                self._fingerprints(states, calls)[None, :].repeat(n, axis=0)], axis=1)
        sums = np.concatenate([states, calls, present], axis=1)
        t1 = time.perf_counter()
        sum_t, max_t = torch.from_numpy(sums), torch.from_numpy(np.ascontiguousarray(maxes))
        self._allreduce(sum_t, max_op=False)
        self._allreduce(max_t, max_op=True)
        t2 = time.perf_counter()
        self.assemble_seconds += t1 - t0
        self.reduce_seconds += t2 - t1
        self.data_rounds += 1
        sums, maxes = sum_t.numpy(), max_t.numpy()
        L = len(layout.entries)
        if not (np.array_equal(maxes[:, L + 1], step_no) and np.array_equal(-maxes[:, L + 2], step_no)):
            raise GroupFailed("the ranks numbered the same step differently (watch.step(n) with different n)")
        if not self.replicas_checked:
            self._check_replicas(maxes[0, L + 3:], steps[0].step)
        for _ in range(n):
            self.buffer.popleft()
        self.reduced_steps += n
        if self.per_rank:
            for c in layout.chunks(steps, states, calls, [s.time for s in steps], None, "ranks"):
                self.worker.submit(c)
        if self.is_writer:
            total = sums[:, : layout.width].copy()
            total[:, cols] = maxes[:, :L]
            ranks_present = np.maximum(sums[:, layout.width + L:], 1.0)
            for j, (_, key, a, _b) in enumerate(layout.entries):
                if key[3]:
                    bias = slice(a + metrics.bias_slice(key[1]).start, a + metrics.bias_slice(key[1]).stop)
                    total[:, bias] /= ranks_present[:, j : j + 1]
            for c in layout.chunks(steps, total, sums[:, layout.width : layout.width + L], list(maxes[:, L]),
                                   None, "main"):
                self.worker.submit(c)
            self.worker.drain()  # durable before the next header: that is what lets the others drop their copy
            self.write_seconds += time.perf_counter() - t2
            self._mark_handled(steps[-1].seq)
        else:
            self.unconfirmed = steps

    def _fingerprints(self, states: np.ndarray, calls: np.ndarray) -> np.ndarray:
        """This rank's checksum in its slot (0 elsewhere, and 0 when it routed nothing): MAX-reduced, all of them."""
        out = np.zeros(len(self.members), dtype=np.float64)
        if not self.replicas_checked and calls.any():
            out[self.group_rank] = 1 + zlib.crc32(np.ascontiguousarray(states).tobytes())  # < 2**53: exact
        return out

    def _check_replicas(self, prints: np.ndarray, step: int) -> None:
        if not (prints > 0).all():
            return  # a rank routed nothing yet; look again next round
        self.replicas_checked = True
        values, counts = np.unique(prints, return_counts=True)
        if (counts == 1).all():
            return
        # In rank order (not checksum order), so the message does not depend on what was routed.
        same = sorted([self.members[i] for i in np.nonzero(prints == v)[0]] for v in values[counts > 1])
        sets = " and ".join("{" + ", ".join(map(str, g)) + "}" for g in same)
        message = (f"moewatch: ranks {sets} of the group {list(self.members)} recorded "
                   f"exactly the same routing (steps from {step}): they look like tensor-parallel replicas, which "
                   "route the same tokens, and the sum counts them more than once. Attach on one rank per "
                   "tensor-parallel group, with group= its data-parallel group (docs/integrations.md)")
        if self.on_problem is not None:
            try:
                self.on_problem("replicated_ranks", message)
                return
            except Exception:
                pass
        warnings.warn(message, RuntimeWarning, stacklevel=1)

    # -- fallback: own rows
    def _fall_back(self, reason: str) -> None:
        self._release()
        pending = [*self.unconfirmed, *self.buffer]
        first = pending[0] if pending else None
        self.fallback = {
            "session": self.session, "seq": first.seq if first else self.last_seq + 1,
            "step": first.step if first else None, "reason": reason, "time": time.time(),
        }
        self.mode = "fallback"
        try:
            self.on_fallback(dict(self.fallback))  # marked before the first own row is written
        except Exception as e:
            log.warning("moewatch: could not record the fallback in the rank manifest: %s", e)
        message = (f"moewatch: rank {self.rank}: summing over the process group {list(self.members)} stopped: "
                   f"{reason}. This rank now writes its own rows (marked in run.json 'fallbacks'); "
                   "moewatch.load(run).global_view() still sums them")
        warnings.warn(message, RuntimeWarning, stacklevel=1)
        # A non-writer's last round was summed, maybe written: its rows were already kept per rank.
        unconfirmed, self.unconfirmed = self.unconfirmed, []
        if unconfirmed:
            self._write_own(unconfirmed, per_rank=False)
        if self.buffer:
            self._write_own(list(self.buffer))
            self.buffer.clear()

    def _own_rows(self, batch: StepBatch | None) -> None:
        if batch is None:
            return
        steps = self._absorb(batch)
        if steps:
            self._write_own(steps)

    def _write_own(self, steps: list[_Step], per_rank: bool = True) -> None:
        start = 0
        while start < len(steps):  # one layout per run of equal registries
            stop = start
            while stop < len(steps) and steps[stop].nreg == steps[start].nreg:
                stop += 1
            part = steps[start:stop]
            phases = tuple(p for p in self.phases if any(p in s.phases() for s in part))
            layout = _Layout(self.registry[: part[0].nreg], phases)
            states, calls, _ = layout.matrix(part)
            for c in layout.chunks(part, states, calls, [s.time for s in part], None, "main"):
                self.worker.submit(c)
            if self.per_rank and per_rank:
                for c in layout.chunks(part, states, calls, [s.time for s in part], None, "ranks"):
                    self.worker.submit(c)
            start = stop
        self._mark_handled(steps[-1].seq)

    # -- plumbing
    def _pull(self, block: bool) -> None:
        batch = self._take(block=block, timeout=self.keepalive)
        while batch is not None:
            self.buffer.extend(self._absorb(batch))
            batch = self._take(block=False)

    def _take(self, block: bool, timeout: float | None = None) -> StepBatch | None:
        try:
            return self.jobs.get(block=block, timeout=timeout if block else None)
        except queue.Empty:
            return None

    def _absorb(self, batch: StepBatch) -> list[_Step]:
        """A batch's steps, each with its routers' accumulators (copied off the device by now)."""
        if len(batch.registry) >= len(self.registry):
            self.registry = batch.registry
        if batch.closing and not self.closing:
            self.closing = True
            self.closing_since = time.monotonic()
        steps = {seq: _Step(seq, step, t, nreg) for seq, step, t, nreg in batch.steps}
        for chunk in batch.chunks:
            if chunk.ready is not None:
                chunk.ready.synchronize()
            states = chunk.states_SX.double().numpy()
            for i, seq in enumerate(chunk.seqs):
                s = steps.get(seq)
                if s is None:
                    continue
                for slot in chunk.layout:
                    s.blocks[(chunk.phase, slot.name)] = states[i, slot.start : slot.stop]
                    s.calls[(chunk.phase, slot.name)] = int(chunk.calls[i].get(slot.name, 0))
        out = sorted(steps.values(), key=lambda s: s.seq)
        if out:
            self.last_seq = max(self.last_seq, out[-1].seq)
        return out

    def _allreduce(self, tensor: torch.Tensor, max_op: bool) -> None:
        import torch.distributed as dist

        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX if max_op else dist.ReduceOp.SUM
        self._pg.allreduce([tensor], opts).wait()

    def _mark_handled(self, seq: int) -> None:
        with self._handled:
            self.handled_seq = max(self.handled_seq, seq)
            self._handled.notify_all()

    def _release(self) -> None:
        pg, self._pg = self._pg, None
        if pg is not None:
            try:
                pg.abort()
            except Exception:
                pass


def _gloo_group(prefix: str, group_rank: int, size: int, timeout: float) -> Any:
    """A gloo process group over the default group's store under `prefix`; not registered with torch.distributed."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_store

    store = dist.PrefixStore(prefix, _get_default_store())
    return dist.ProcessGroupGloo(store, group_rank, size, datetime.timedelta(seconds=timeout))


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text[:200]
