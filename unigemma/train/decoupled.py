"""Decoupled DiLoCo: learners on their own clocks push parameter fragments to a syncer that merges by quorum.

    learner i (its own process and speed)                    syncer (one process: a TCPStore + one gloo pair each)
    ──────────────────────────────────────                   ─────────────────────────────────────────────────────
    inner steps (AdamW) on its own data shard                 per fragment f: θ_f (fp32), Nesterov momentum, version
    at local step ≡ offset_f (mod H):                         contributions C_f = {i: (Δ_i, t_i)}
      Δ_i = θ_f(base) − θ_f(local), t_i = tokens since        quorum: |C_f| ≥ K' = min(K, learners alive)
      its last push of f                                      grace: wait for the learners expected to arrive soon
      ── PUSH(f, t_i, Δ_i) ──────────────────────────────▶    merge: Δ̄ = Σ t_i·Δ_i / Σ t_i
      compute goes on, never waiting                                   θ_f ← θ_f − lr·(Δ̄ + μ·m),  m ← μ·m + Δ̄
      ◀──────────────────────────── REPLY(f, v_f, θ_f) ──     reply to each contributor, v_f ← v_f + 1
    at the next step: local_f ← θ_f + (local_f − local_f at the push), base_f ← θ_f   (rebased: no step is lost)

Nobody waits for anybody: a learner goes on training while its push waits for a quorum (one push per fragment in
flight; a push that falls due meanwhile goes out when the reply comes); the syncer merges fragment f as soon as K'
learners have pushed it and the grace window has passed. (`blocking=True` instead applies a reply overlap_steps
after its push, waiting if it is late, with local_f ← mix·local + (1−mix)·θ_f, or θ_f without overlap.) The window is
measured, not configured in seconds: each learner's push interval per fragment is tracked (an exponential mean:
step time × H plus its link time), and when the quorum is reached the syncer waits only for learners whose next push
is predicted within `grace_fraction` × the quorum members' median interval (a learner 3× slower is not waited for),
plus the measured time a merge takes. A late push is not wasted: it joins the next merge of that fragment (its Δ is
stale by some versions; it still carries its tokens). Blocking, with K = every learner and no overlap, each merge
takes every learner's push of the same round and the result equals synchronous DiLoCo (`diloco.DiLoCo`).

Failures. Each learner talks to the syncer over its own two-rank gloo group (no global process group), so a dead
learner breaks only its own pair: the syncer sees "connection closed" (SIGKILL included), drops it from the live
set and its pending pushes stay (they are valid work). A restarted learner registers again (a new incarnation, a
new pair), receives the current global weights of every fragment and the step it had reached, and goes on. The
syncer checkpoints every `checkpoint_every` merges into `syncer-NNNNNNNN/` (written to a `.tmp` folder and renamed:
a crash while writing leaves the previous one whole); killed, its learners stop with a clear message, and a syncer
started with `resume` continues from the last checkpoint — learners started again rejoin it.

Transport: the syncer hosts a `torch.distributed.TCPStore`; learner i registers under `learner/i/incarnation`
and both sides build `ProcessGroupGloo(PrefixStore("pair/i/n/", store), rank, 2)`. Messages are an int64 header of
8 numbers and an fp32 payload. A `diloco.Link` per learner simulates a WAN link (both directions share it).
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import queue
import shutil
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .diloco import Link, split_fragments

# message kinds (header[0])
HELLO, PUSH, BYE, REPLY, WELCOME, REFUSE = 1, 2, 3, 4, 5, 6
_HEADER = 8
_UP, _DOWN = 1, 2  # gloo tags: learner → syncer, syncer → learner
_PPM = 1_000_000


def _header(*values: int) -> torch.Tensor:
    h = torch.zeros(_HEADER, dtype=torch.int64)
    h[: len(values)] = torch.tensor(values, dtype=torch.int64)
    return h


def parse_address(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"syncer address {addr!r}: expected HOST:PORT, e.g. 10.0.0.5:29600")
    return host, int(port)


# --- the merge rule (no I/O) ---------------------------------------------------------------------------------

@dataclass
class Contribution:
    delta: torch.Tensor        # fp32 (n_f,): θ_f(base) − θ_f(local)
    tokens: int                # tokens the learner trained on since its previous push of this fragment
    steps: int                 # its inner steps in that span
    base_version: int          # the version of θ_f its local weights started from
    arrived: float


class FragmentMerger:
    """Global fragments and the quorum / token-weighted merge / outer Nesterov step; pure, thread-unsafe.

        merger = FragmentMerger([θ_0, θ_1], outer_lr=0.7, momentum=0.9)
        merger.contribute(0, learner=2, delta=Δ, tokens=4096)
        if merger.has_quorum(0, quorum=2, live=3): merger.merge(0) -> contributors
    """

    def __init__(self, fragments: list[torch.Tensor], *, outer_lr: float = 0.7, momentum: float = 0.9,
                 nesterov: bool = True):
        self.theta = [f.detach().float().clone() for f in fragments]
        self.opts = [torch.optim.SGD([t], lr=outer_lr, momentum=momentum, nesterov=nesterov and momentum > 0)
                     for t in self.theta]
        self.version = [0] * len(self.theta)
        self.pending: list[dict[int, Contribution]] = [{} for _ in self.theta]
        self.tokens = [0] * len(self.theta)   # tokens merged into each fragment
        self.steps = [0] * len(self.theta)    # learner steps merged into each fragment
        self.merges = 0

    @property
    def tokens_merged(self) -> float:
        """Tokens of training merged, averaged over fragments (each fragment carries every token once)."""
        return sum(self.tokens) / len(self.tokens)

    @property
    def steps_merged(self) -> float:
        return sum(self.steps) / len(self.steps)

    def contribute(self, f: int, learner: int, delta: torch.Tensor, tokens: int, steps: int = 0,
                   base_version: int = 0, now: float | None = None) -> None:
        if delta.shape != self.theta[f].shape:
            raise ValueError(f"fragment {f}: a push of {tuple(delta.shape)} elements, expected "
                             f"{tuple(self.theta[f].shape)}")
        prev = self.pending[f].get(learner)
        if prev is not None:  # a second push before the merge: both spans of work count, tokens add up
            tot = prev.tokens + tokens
            w = tokens / tot if tot else 0.5
            delta = (1 - w) * prev.delta + w * delta
            tokens, steps = tot, prev.steps + steps
        self.pending[f][learner] = Contribution(delta.float(), int(tokens), int(steps), base_version,
                                                time.perf_counter() if now is None else now)

    def has_quorum(self, f: int, quorum: int, live: int) -> bool:
        """K' = min(K, learners alive), at least 1: a dead learner never holds a merge back."""
        return len(self.pending[f]) >= max(1, min(quorum, live))

    def merge(self, f: int) -> list[int]:
        """Δ̄ = Σ t_i Δ_i / Σ t_i over the pending pushes; one outer SGD (Nesterov) step on θ_f; returns who
        contributed. Zero tokens everywhere weighs the pushes equally."""
        pend = self.pending[f]
        if not pend:
            return []
        who = sorted(pend)
        total = sum(pend[i].tokens for i in who)
        if total > 0:
            avg = sum(pend[i].delta * (pend[i].tokens / total) for i in who)
        else:
            avg = sum(pend[i].delta for i in who) / len(who)
        theta = self.theta[f]
        theta.grad = avg.to(theta.dtype)
        self.opts[f].step()
        theta.grad = None
        self.version[f] += 1
        self.tokens[f] += total
        self.steps[f] += sum(pend[i].steps for i in who)
        self.merges += 1
        self.pending[f] = {}
        return who

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for f, (t, o) in enumerate(zip(self.theta, self.opts)):
            out[f"theta.{f}"] = t.detach().clone()
            buf = o.state.get(t, {}).get("momentum_buffer")
            if buf is not None:
                out[f"momentum.{f}"] = buf.detach().clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], meta: dict) -> None:
        with torch.no_grad():
            for f, (t, o) in enumerate(zip(self.theta, self.opts)):
                if state[f"theta.{f}"].shape != t.shape:
                    raise ValueError(f"syncer checkpoint: fragment {f} has {tuple(state[f'theta.{f}'].shape)} "
                                     f"elements, the model {tuple(t.shape)}")
                t.copy_(state[f"theta.{f}"])
                if f"momentum.{f}" in state:
                    o.state[t]["momentum_buffer"] = state[f"momentum.{f}"].clone()
        self.version = list(meta["version"])
        self.tokens, self.steps, self.merges = list(meta["tokens"]), list(meta["steps"]), meta["merges"]


class GraceWindow:
    """How long to wait for stragglers once a fragment has its quorum, from measured times.

    Each learner's push interval per fragment is an exponential mean of the time between its pushes (its step
    time × H, its link time and its own waits). Once K' pushes are in, learner j (alive, not yet in) is waited for
    when its predicted next push, last_j + interval_j, falls within `fraction` × the median interval of the learners
    already in; the window ends at the latest such prediction plus the measured merge time, and never later than
    now + that bound. With no prediction yet (a learner's first push), nobody is waited for.
    """

    def __init__(self, fraction: float = 0.25, alpha: float = 0.3):
        self.fraction = fraction
        self.alpha = alpha
        self.last: dict[tuple[int, int], float] = {}
        self.interval: dict[tuple[int, int], float] = {}
        self.merge_time = 0.0

    def observe_push(self, f: int, learner: int, now: float) -> None:
        key = (f, learner)
        if key in self.last:
            dt = now - self.last[key]
            old = self.interval.get(key)
            self.interval[key] = dt if old is None else (1 - self.alpha) * old + self.alpha * dt
        self.last[key] = now

    def forget(self, learner: int) -> None:
        """A learner that died or rejoined: its timings start over."""
        for key in [k for k in self.last if k[1] == learner]:
            self.last.pop(key, None)
            self.interval.pop(key, None)

    def observe_merge(self, seconds: float) -> None:
        self.merge_time = seconds if self.merge_time == 0 else 0.7 * self.merge_time + 0.3 * seconds

    def deadline(self, f: int, contributors: list[int], waiting: list[int], quorum_at: float) -> float:
        """The time until which the merge of f may wait for `waiting` (quorum reached at `quorum_at`)."""
        known = [self.interval[(f, i)] for i in contributors if (f, i) in self.interval]
        if not known or not waiting:
            return quorum_at
        bound = self.fraction * statistics.median(known)
        latest = quorum_at
        for j in waiting:
            if (f, j) in self.interval and (f, j) in self.last:
                eta = self.last[(f, j)] + self.interval[(f, j)]
                if eta - quorum_at <= bound:
                    latest = max(latest, eta + self.merge_time)
        return min(latest, quorum_at + bound)


# --- the syncer -------------------------------------------------------------------------------------------

@dataclass
class _Learner:
    lid: int
    incarnation: int
    pg: object
    alive: bool = True
    steps: int = 0             # inner steps it has reported (its data position on rejoin)
    tokens: int = 0
    send_lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class SyncerStats:
    merges: list[tuple[float, int, int, float]] = field(default_factory=list)  # (time, fragment, n, progress)
    joins: list[tuple[float, int, int]] = field(default_factory=list)          # (time, learner, incarnation)
    deaths: list[tuple[float, int]] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)


class Syncer:
    """Holds the global fragments; serves learners until the budget is merged; checkpoints on the way.

        syncer = Syncer(list(model.parameters()), names, port=29600, learners=4, quorum=2, token_budget=N,
                        checkpoint_dir="runs/x")
        syncer.run()                 # returns when the budget is merged (or `stop()` is called)
        syncer.global_tensors()      # {name: fp32 tensor}: the model to save

    Budget: `token_budget` tokens merged, or `step_budget` learner steps merged (whichever is set; progress
    ∈ [0, 1] is reported to learners, whose learning-rate schedule follows it). `on_merge(fragment, syncer)` is
    called after each merge (under the lock: keep it short).
    """

    def __init__(self, params: list[torch.Tensor], names: list[str], *, host: str = "0.0.0.0", port: int = 29600,
                 learners: int, quorum: int | None = None, fragments: int = 1, outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, nesterov: bool = True, token_budget: int | None = None,
                 step_budget: int | None = None, grace_fraction: float = 0.25, checkpoint_dir: str | Path | None = None,
                 checkpoint_every: int = 0, keep: int = 2, resume: bool = False, timeout_s: float = 600.0,
                 stop_timeout_s: float = 60.0, on_merge=None, log=None):
        if (token_budget is None) == (step_budget is None):
            raise ValueError("Syncer: set exactly one of token_budget and step_budget")
        if learners < 1:
            raise ValueError(f"Syncer: learners must be ≥ 1, got {learners}")
        self.quorum = learners if quorum is None else quorum
        if not 1 <= self.quorum <= learners:
            raise ValueError(f"distributed.quorum must be in [1, learners={learners}], got {self.quorum}")
        self.names = list(names)
        self.shapes = [tuple(p.shape) for p in params]
        self.groups = split_fragments(list(params), fragments)
        flat = [torch.cat([params[i].detach().float().reshape(-1) for i in g]) for g in self.groups]
        self.sizes = [t.numel() for t in flat]
        self.merger = FragmentMerger(flat, outer_lr=outer_lr, momentum=outer_momentum, nesterov=nesterov)
        self.grace = GraceWindow(grace_fraction)
        self.n_learners = learners
        self.token_budget, self.step_budget = token_budget, step_budget
        self.host, self.port = host, port
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.stop_timeout = stop_timeout_s
        self.dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every, self.keep = checkpoint_every, keep
        self.on_merge = on_merge
        self.log = log or (lambda msg: None)
        self.learners: dict[int, _Learner] = {}
        self.learner_steps: dict[int, int] = {}   # each learner's last pushed step (its data position)
        self.learner_tokens: dict[int, int] = {}  # the tokens it had trained on then
        self.lock = threading.Condition()
        self.quorum_at: dict[int, float] = {}
        self.stats = SyncerStats()
        self.stopping = False             # no more merges
        self.closing = False              # no more joins
        self.threads: list[threading.Thread] = []
        self.store = None
        self.resumed_from: Path | None = None
        if resume and self.dir is not None:
            last = latest_syncer_checkpoint(self.dir)
            if last is not None:
                self._load(last)

    # -- progress -----------------------------------------------------------------------------------------
    @property
    def progress(self) -> float:
        """Steps (or tokens) the learners have trained and pushed, over the budget. Checked at each merge."""
        if self.token_budget is not None:
            return min(1.0, sum(self.learner_tokens.values()) / max(1, self.token_budget))
        return min(1.0, sum(self.learner_steps.values()) / max(1, self.step_budget))

    def live(self) -> int:
        return sum(1 for lr in self.learners.values() if lr.alive)

    def pool(self) -> int:
        """Learners a quorum can count on: the ones alive and the ones not started yet (a learner that joined and
        died is not counted: it never holds a merge back)."""
        return self.live() + sum(1 for i in range(self.n_learners) if i not in self.learners)

    def global_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for g, theta in zip(self.groups, self.merger.theta):
            off = 0
            for i in g:
                n = math.prod(self.shapes[i])
                out[self.names[i]] = theta[off:off + n].view(self.shapes[i]).clone()
                off += n
        return out

    # -- serving --------------------------------------------------------------------------------------------
    def run(self) -> None:
        self.store = dist.TCPStore(self.host, self.port, is_master=True, wait_for_workers=False,
                                   timeout=self.timeout)
        self.store.set("syncer/fragments", json.dumps(self.sizes))
        if self.progress >= 1.0:
            self.store.set("stop", "1")
            return
        self.log(f"syncer on {self.host}:{self.port}: {self.n_learners} learners, quorum {self.quorum}, "
                 f"{len(self.sizes)} fragments ({sum(self.sizes):,} parameters)")
        watcher = threading.Thread(target=self._watch_joins, daemon=True, name="syncer-joins")
        watcher.start()
        self.threads.append(watcher)
        try:
            self._merge_loop()
        finally:
            self.stopping = True
            self.store.set("stop", "1")
        self._answer_pending_with_stop()
        t0 = time.perf_counter()
        with self.lock:  # let the learners see the stop and leave (BYE or a closed connection); one that has not
            # joined yet gets a little while to, so that it hears "finished" rather than finding nobody there
            while time.perf_counter() < t0 + self.stop_timeout and (
                    self.live() or (len(self.learners) < self.n_learners
                                    and time.perf_counter() < t0 + min(10.0, self.stop_timeout))):
                self.lock.wait(timeout=0.2)
        self.closing = True
        if self.dir is not None:
            self.checkpoint()
        self._close()

    def _close(self) -> None:
        """Let the serving threads end and drop the pairs now, not in interpreter teardown (where a gloo pair
        destroyed with its threads frozen aborts the process)."""
        for t in list(self.threads):
            t.join(timeout=2)
        with self.lock:
            for lr in self.learners.values():
                lr.pg = None
        gc.collect()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify_all()

    def _watch_joins(self) -> None:
        seen = 0
        while not self.closing:
            try:
                n = self.store.add("joins", 0)
            except Exception:
                return
            while seen < n:
                seen += 1
                lid, inc = (int(x) for x in self.store.get(f"join/{seen}").decode().split(":"))
                t = threading.Thread(target=self._serve, args=(lid, inc), daemon=True, name=f"syncer-learner{lid}")
                t.start()
                self.threads.append(t)
            time.sleep(0.02)

    def _serve(self, lid: int, inc: int) -> None:
        try:
            pg = dist.ProcessGroupGloo(dist.PrefixStore(f"pair/{lid}/{inc}/", self.store), 0, 2, self.timeout)
        except Exception as e:  # the learner died before its pair was up
            self.log(f"learner {lid} (incarnation {inc}) did not connect: {e}")
            return
        me = _Learner(lid, inc, pg)
        hello = torch.empty(_HEADER, dtype=torch.int64)
        try:
            pg.recv([hello], 1, _UP).wait()
            if int(hello[0]) != HELLO or int(hello[3]) != sum(self.sizes) or int(hello[4]) != len(self.sizes) \
                    or not 0 <= lid < self.n_learners:
                pg.send([_header(REFUSE, sum(self.sizes), len(self.sizes))], 1, _DOWN).wait()
                self.log(f"learner {lid} refused: it has {int(hello[3]):,} parameters in {int(hello[4])} fragments, "
                         f"the syncer {sum(self.sizes):,} in {len(self.sizes)} for learners 0..{self.n_learners - 1}")
                return
            with self.lock:
                old = self.learners.get(lid)
                if old is not None and old.alive and old.incarnation < inc:
                    old.alive = False  # superseded by its restart
                me.steps = self.learner_steps.get(lid, 0)
                me.tokens = self.learner_tokens.get(lid, 0)
                self.learners[lid] = me
                self.grace.forget(lid)
                snapshot = torch.cat(self.merger.theta)
                versions = list(self.merger.version)
                head = _header(WELCOME, me.steps, int(self.progress * _PPM), int(self.stopping), me.tokens)
                self.stats.joins.append((time.perf_counter(), lid, inc))
                self.lock.notify_all()
            with me.send_lock:
                pg.send([head], 1, _DOWN).wait()
                pg.send([snapshot], 1, _DOWN).wait()
                pg.send([torch.tensor(versions, dtype=torch.int64)], 1, _DOWN).wait()
            self.log(f"learner {lid} joined (incarnation {inc}) at its step {me.steps}, progress "
                     f"{self.progress:.1%}")
            while True:
                head = torch.empty(_HEADER, dtype=torch.int64)
                pg.recv([head], 1, _UP).wait()
                kind = int(head[0])
                if kind == BYE:  # answered, so that the learner's receiver ends before its process does
                    with me.send_lock:
                        pg.send([_header(BYE)], 1, _DOWN).wait()
                    break
                if kind != PUSH:
                    raise RuntimeError(f"learner {lid}: unexpected message kind {kind}")
                f, tokens, steps, base, at_step, total = (int(x) for x in head[1:7])
                delta = torch.empty(self.sizes[f], dtype=torch.float32)
                pg.recv([delta], 1, _UP).wait()
                now = time.perf_counter()
                with self.lock:
                    if self.stopping:
                        self._send_reply(me, f, stop=True)
                        continue
                    self.merger.contribute(f, lid, delta, tokens, steps, base, now)
                    self.grace.observe_push(f, lid, now)
                    me.steps, me.tokens = max(me.steps, at_step), max(me.tokens, total)
                    self.learner_steps[lid], self.learner_tokens[lid] = me.steps, me.tokens
                    if f not in self.quorum_at and self.merger.has_quorum(f, self.quorum, self.pool()):
                        self.quorum_at[f] = now
                    self.lock.notify_all()
        except Exception as e:
            if not self.stopping:
                self.log(f"learner {lid} lost: {str(e).splitlines()[0][:160]}")
        finally:
            with self.lock:
                if self.learners.get(lid) is me and me.alive:
                    me.alive = False
                    self.stats.deaths.append((time.perf_counter(), lid))
                    # a smaller live set may complete a quorum now
                    for f in range(len(self.sizes)):
                        if f not in self.quorum_at and self.merger.pending[f] and \
                                self.merger.has_quorum(f, self.quorum, self.pool()):
                            self.quorum_at[f] = time.perf_counter()
                self.lock.notify_all()

    def _send_reply(self, lr: _Learner, f: int, stop: bool) -> None:
        """Send θ_f to one learner (called with self.lock held; a dead peer only marks it dead)."""
        head = _header(REPLY, f, self.merger.version[f], int(self.progress * _PPM), int(stop))
        try:
            with lr.send_lock:
                lr.pg.send([head], 1, _DOWN).wait()
                lr.pg.send([self.merger.theta[f]], 1, _DOWN).wait()
        except Exception:
            if lr.alive:  # the merge found it dead before its own thread did: record it here
                lr.alive = False
                self.stats.deaths.append((time.perf_counter(), lr.lid))

    def _merge_loop(self) -> None:
        with self.lock:
            while not self.stopping:
                now = time.perf_counter()
                wake = now + 0.5
                for f in sorted(self.quorum_at):
                    pend = self.merger.pending[f]
                    alive = [i for i, lr in self.learners.items() if lr.alive]
                    waiting = [i for i in alive if i not in pend]
                    due = self.grace.deadline(f, list(pend), waiting, self.quorum_at[f])
                    if waiting and now < due:
                        wake = min(wake, due)
                        continue
                    t0 = time.perf_counter()
                    who = self.merger.merge(f)
                    del self.quorum_at[f]
                    done = self.progress >= 1.0
                    for i in who:
                        lr = self.learners.get(i)
                        if lr is not None and lr.alive:
                            self._send_reply(lr, f, stop=done)
                    self.grace.observe_merge(time.perf_counter() - t0)
                    self.stats.merges.append((time.perf_counter(), f, len(who), self.progress))
                    if self.on_merge is not None:
                        self.on_merge(f, self)
                    if self.dir is not None and self.checkpoint_every and \
                            self.merger.merges % self.checkpoint_every == 0:
                        self.checkpoint()
                    if done:
                        self.stopping = True
                        self.log(f"budget merged ({self.merger.merges} merges): stopping the learners")
                        return
                    wake = now
                if wake > now:
                    self.lock.wait(timeout=wake - now)

    def _answer_pending_with_stop(self) -> None:
        with self.lock:
            for f, pend in enumerate(self.merger.pending):
                for i in pend:
                    lr = self.learners.get(i)
                    if lr is not None and lr.alive:
                        self._send_reply(lr, f, stop=True)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def checkpoint(self) -> Path:
        """Write `syncer-NNNNNNNN/` atomically (a `.tmp` folder renamed when complete); keep the last `keep`."""
        from safetensors.torch import save_file

        assert self.dir is not None
        name = f"syncer-{self.merger.merges:08d}"
        path, tmp = self.dir / name, self.dir / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(self.merger.state_dict(), str(tmp / "state.safetensors"))
        meta = {"version": self.merger.version, "tokens": self.merger.tokens, "steps": self.merger.steps,
                "merges": self.merger.merges,
                "learner_steps": {str(k): v for k, v in self.learner_steps.items()},
                "learner_tokens": {str(k): v for k, v in self.learner_tokens.items()}, "sizes": self.sizes,
                "names": self.names, "progress": self.progress}
        (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        for old in sorted(p for p in self.dir.glob("syncer-*") if p.is_dir() and not p.name.endswith(".tmp"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        self.stats.checkpoints.append(str(path))
        return path

    def _load(self, path: Path) -> None:
        from safetensors.torch import load_file

        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if meta["sizes"] != self.sizes:
            raise ValueError(f"{path}: fragments of {meta['sizes']} elements, this model and distributed.fragments "
                             f"make {self.sizes}")
        self.merger.load_state_dict(load_file(str(path / "state.safetensors")), meta)
        self.learner_steps = {int(k): v for k, v in meta["learner_steps"].items()}
        self.learner_tokens = {int(k): v for k, v in meta["learner_tokens"].items()}
        self.resumed_from = path
        self.log(f"syncer resuming from {path} ({self.merger.merges} merges, progress {self.progress:.1%})")


def latest_syncer_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete `syncer-*` folder (a `.tmp` one is a write that did not finish)."""
    done = sorted(p for p in Path(directory).glob("syncer-*")
                  if p.is_dir() and not p.name.endswith(".tmp") and (p / "state.json").exists())
    return done[-1] if done else None


# --- the learner --------------------------------------------------------------------------------------------

class SyncerGone(RuntimeError):
    """The syncer stopped answering: the run stops here (start the syncer again with resume, then the learners)."""


@dataclass
class _Exchange:
    fragment: int
    due: int                   # local step at which its reply is applied (blocking mode)
    reply: torch.Tensor | None = None
    pushed: torch.Tensor | None = None  # the local fragment when it was pushed (non-blocking mode)


class DecoupledLearner:
    """One learner: its model trains locally; fragments are pushed on its own schedule, replies applied later.

        learner = DecoupledLearner(model, syncer="10.0.0.5:29600", learner_id=1, inner_steps=50, fragments=2)
        start_step = learner.join()             # global weights loaded; the step this learner had reached
        while not learner.should_stop():
            loss(batch).backward(); opt.step(); opt.zero_grad()
            learner.after_inner_step(tokens=batch_tokens)
        learner.close()
    """

    def __init__(self, model: nn.Module, *, syncer: str, learner_id: int, inner_steps: int = 50, fragments: int = 1,
                 overlap_steps: int = 0, mix: float = 0.5, blocking: bool = False, link: Link | None = None,
                 timeout_s: float = 600.0):
        if not 0 <= overlap_steps < inner_steps:
            raise ValueError(f"overlap_steps must be in [0, inner_steps={inner_steps}), got {overlap_steps}")
        self.host, self.port = parse_address(syncer)
        self.lid = learner_id
        self.H, self.overlap, self.mix, self.blocking = inner_steps, overlap_steps, mix, blocking
        self.deferred: set[int] = set()
        self.link = link or Link()
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.groups = split_fragments(self.params, fragments)
        F = len(self.groups)
        self.offsets = [((f + 1) * self.H // F) % self.H for f in range(F)]
        self.sizes = [sum(self.params[i].numel() for i in g) for g in self.groups]
        self.base: list[torch.Tensor] = []
        self.version = [0] * F
        self.tokens = [0] * F
        self.steps_since = [0] * F
        self.step = 0
        self.total_tokens = 0
        self.progress = 0.0
        self.stop_flag = False
        self.pushes = 0
        self.blocked_s = 0.0
        self.waits: list[tuple[float, float]] = []  # (perf_counter at start, seconds) of each wait for a reply
        self.inflight: list[_Exchange] = []
        self.replies: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.said_bye = threading.Event()
        self.sender: threading.Thread | None = None
        self.receiver: threading.Thread | None = None
        self.store = None
        self.pg = None

    # -- connection -------------------------------------------------------------------------------------------
    def join(self) -> int:
        """Register with the syncer (waiting for it up to the timeout), load the global weights; returns the step
        this learner had reached in the run (0 the first time, more after a restart)."""
        try:
            self.store = dist.TCPStore(self.host, self.port, is_master=False, timeout=self.timeout)
            inc = self.store.add(f"learner/{self.lid}/incarnation", 1)
            slot = self.store.add("joins", 1)
            self.store.set(f"join/{slot}", f"{self.lid}:{inc}")
            self.pg = dist.ProcessGroupGloo(dist.PrefixStore(f"pair/{self.lid}/{inc}/", self.store), 1, 2,
                                            self.timeout)
            self.pg.send([_header(HELLO, self.lid, inc, sum(self.sizes), len(self.sizes))], 0, _UP).wait()
            head = torch.empty(_HEADER, dtype=torch.int64)
            self.pg.recv([head], 0, _DOWN).wait()
        except Exception as e:
            raise SyncerGone(f"cannot reach the syncer at {self.host}:{self.port}: {str(e).splitlines()[0]}") from e
        if int(head[0]) == REFUSE:
            raise ValueError(f"the syncer at {self.host}:{self.port} has {int(head[1]):,} parameters in "
                             f"{int(head[2])} fragments; this learner {sum(self.sizes):,} in {len(self.sizes)}: "
                             "start every learner with the syncer's model and distributed.fragments")
        start, self.progress, self.stop_flag = int(head[1]), int(head[2]) / _PPM, bool(head[3])
        self.total_tokens = int(head[4])
        flat = torch.empty(sum(self.sizes), dtype=torch.float32)
        versions = torch.empty(len(self.sizes), dtype=torch.int64)
        self.pg.recv([flat], 0, _DOWN).wait()
        self.pg.recv([versions], 0, _DOWN).wait()
        self.version = versions.tolist()
        self.link.wait_until(self.link.charge(flat.numel() * 4))
        self.base = list(torch.split(flat, self.sizes))
        for f in range(len(self.sizes)):
            self._load_fragment(f, self.base[f], mix=0.0)
        self.step = start
        self.sender = threading.Thread(target=self._sender, daemon=True, name="learner-send")
        self.receiver = threading.Thread(target=self._receiver, daemon=True, name="learner-recv")
        self.sender.start()
        self.receiver.start()
        return start

    def should_stop(self) -> bool:
        """The run's budget is merged (or the syncer is gone: then `after_inner_step` raised already)."""
        if self.stop_flag:
            return True
        if self.error is not None:
            raise SyncerGone(f"the syncer at {self.host}:{self.port} is gone ({str(self.error).splitlines()[0]}); "
                             "the run stops: start the syncer again with resume, then the learners")
        try:
            self.stop_flag = self.store.check(["stop"])
        except Exception as e:
            self.error = e
            return self.should_stop()
        return self.stop_flag

    def close(self) -> None:
        """Leave: tell the syncer (its pushes still in flight are dropped), close the pair."""
        if self.pg is not None and self.error is None:
            self.outbox.put(None)
            self.said_bye.wait(timeout=10)
            self.receiver.join(timeout=10)
        if not any(t is not None and t.is_alive() for t in (self.sender, self.receiver)):
            self.pg = None  # dropped now, not in interpreter teardown (a gloo pair destroyed there can abort)
            self.store = None
            gc.collect()

    # -- the schedule -------------------------------------------------------------------------------------------
    def after_inner_step(self, tokens: int = 0) -> list[int]:
        """Count one inner step of `tokens` tokens, take in the replies that have come, push the fragments
        scheduled now. Returns the fragments whose weights were replaced.

        Non-blocking (the default): the learner never waits. A reply is taken in at the first step after it
        arrives and rebased: local_f ← θ_f + (local_f − local_f at the push), so the steps taken while the push was
        in flight are kept, and base_f ← θ_f. One push per fragment is in flight; a push that falls due before its
        reply has come goes out right after the reply. Blocking (`blocking=True`): a reply is applied at the push
        step + overlap_steps, waiting for it if needed — with K = every learner that is synchronous DiLoCo."""
        self.step += 1
        self.total_tokens += int(tokens)
        for f in range(len(self.sizes)):
            self.tokens[f] += int(tokens)
            self.steps_since[f] += 1
        if self.blocking:
            return self._blocking_step()
        applied = []
        while True:
            try:
                item = self.replies.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, BaseException):
                self.error = item
                self.should_stop()
                continue
            f, version, theta = item
            ex = next(e for e in self.inflight if e.fragment == f)
            self.inflight.remove(ex)
            self._load_fragment(f, theta + (self._flat_local(f) - ex.pushed), mix=0.0)
            self.base[f], self.version[f] = theta, version
            applied.append(f)
            if f in self.deferred:
                self.deferred.discard(f)
                self._push_nonblocking(f)
        for f, off in enumerate(self.offsets):
            if self.step % self.H == off and not self.stop_flag:
                if any(e.fragment == f for e in self.inflight):
                    self.deferred.add(f)
                else:
                    self._push_nonblocking(f)
        return applied

    def _push_nonblocking(self, f: int) -> None:
        pushed = self._flat_local(f)
        self._push(f)
        self.inflight.append(_Exchange(f, self.step, pushed=pushed))

    def _blocking_step(self) -> list[int]:
        applied = []
        for ex in [e for e in self.inflight if e.due <= self.step]:
            if self._await(ex):
                self._apply(ex, mix=self.mix if self.overlap > 0 else 0.0)
                applied.append(ex.fragment)
            self.inflight.remove(ex)
        for f, off in enumerate(self.offsets):
            if self.step % self.H == off and not self.stop_flag and not any(e.fragment == f for e in self.inflight):
                self._push(f)
                ex = _Exchange(f, self.step + self.overlap)
                self.inflight.append(ex)
                if self.overlap == 0:
                    if self._await(ex):
                        self._apply(ex, mix=0.0)
                        applied.append(f)
                    self.inflight.remove(ex)
        return applied

    def _apply(self, ex: _Exchange, mix: float) -> None:
        self._load_fragment(ex.fragment, ex.reply, mix)
        self.base[ex.fragment] = ex.reply

    def _flat_local(self, f: int) -> torch.Tensor:
        return torch.cat([self.params[i].detach().float().reshape(-1) for i in self.groups[f]])

    def _load_fragment(self, f: int, theta: torch.Tensor, mix: float) -> None:
        off = 0
        with torch.no_grad():
            for i in self.groups[f]:
                p = self.params[i]
                g = theta[off:off + p.numel()].view_as(p)
                p.copy_((mix * p.float() + (1 - mix) * g).to(p.dtype) if mix > 0 else g.to(p.dtype))
                off += p.numel()

    def _push(self, f: int) -> None:
        if self.error is not None:
            self.should_stop()
        delta = self.base[f] - self._flat_local(f)
        self.outbox.put((_header(PUSH, f, self.tokens[f], self.steps_since[f], self.version[f], self.step,
                                 self.total_tokens), delta))
        self.tokens[f] = 0
        self.steps_since[f] = 0
        self.pushes += 1

    def _await(self, ex: _Exchange) -> bool:
        """Wait for the reply to `ex`; False when the run stopped before it came (nothing to apply)."""
        t0 = time.perf_counter()
        try:
            while ex.reply is None:
                try:
                    item = self.replies.get(timeout=0.5)
                except queue.Empty:
                    if self.should_stop() and self.replies.empty():
                        return False
                    continue
                if isinstance(item, BaseException):
                    self.error = item
                    if self.should_stop():
                        return False
                    continue
                f, version, theta = item
                for e in self.inflight:
                    if e.fragment == f and e.reply is None:
                        e.reply = theta
                        self.version[f] = version
                        break
            return True
        finally:
            t1 = time.perf_counter()
            self.blocked_s += t1 - t0
            if t1 - t0 > 0.001:
                self.waits.append((t0, t1 - t0))

    # -- background I/O (the simulated link sleeps here, not in compute) ---------------------------------------
    def _sender(self) -> None:
        try:
            while True:
                item = self.outbox.get()
                if item is None:
                    self.pg.send([_header(BYE)], 0, _UP).wait()
                    self.said_bye.set()
                    return
                head, payload = item
                self.link.wait_until(self.link.charge(payload.numel() * payload.element_size()))
                self.pg.send([head], 0, _UP).wait()
                self.pg.send([payload], 0, _UP).wait()
        except Exception as e:
            self.error = e
            self.replies.put(e)

    def _receiver(self) -> None:
        try:
            while True:
                head = torch.empty(_HEADER, dtype=torch.int64)
                self.pg.recv([head], 0, _DOWN).wait()
                if int(head[0]) == BYE:
                    return
                f = int(head[1])
                theta = torch.empty(self.sizes[f], dtype=torch.float32)
                self.pg.recv([theta], 0, _DOWN).wait()
                self.link.wait_until(self.link.charge(theta.numel() * 4))
                self.progress = int(head[3]) / _PPM
                if int(head[4]):
                    self.stop_flag = True
                self.replies.put((f, int(head[2]), theta))
        except Exception as e:
            self.error = e
            self.replies.put(e)
