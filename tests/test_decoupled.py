"""Decoupled DiLoCo (unigemma/train/decoupled.py): the merge rule on a written-out example, the grace window, the
equality with synchronous DiLoCo at K = all, and real failures — a learner SIGKILLed and restarted, the syncer
SIGKILLed and resumed from its checkpoint. Learners are processes (torch.multiprocessing, spawn); bounded in time.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unigemma.train.decoupled import (DecoupledLearner, FragmentMerger, GraceWindow, Syncer, SyncerGone,
                                      latest_syncer_checkpoint)
from unigemma.train.diloco import DiLoCo

from test_diloco import _batch, _free_port, _mlp  # the same tiny model and data as the synchronous tests


def _inner_step(model, opt, lid: int, step: int) -> None:
    x, y = _batch(lid, step)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# --- the merge rule ---------------------------------------------------------------------------------------------

def test_merge_rule_quorum_and_token_weighting_written_out():
    m = FragmentMerger([torch.tensor([1.0, 2.0]), torch.tensor([5.0])], outer_lr=0.5, momentum=0.9)
    m.contribute(0, learner=0, delta=torch.tensor([1.0, 0.0]), tokens=100, now=0.0)
    assert not m.has_quorum(0, quorum=2, live=3)
    assert m.has_quorum(0, quorum=2, live=1)          # one learner left alive: K' = min(K, alive)
    m.contribute(0, learner=2, delta=torch.tensor([0.0, 1.0]), tokens=300, now=0.1)
    assert m.has_quorum(0, quorum=2, live=3)
    assert m.merge(0) == [0, 2]
    # Δ̄ = (100·[1, 0] + 300·[0, 1]) / 400 = [0.25, 0.75]; Nesterov: m = Δ̄, step = Δ̄ + 0.9·m = 1.9·Δ̄
    # θ = [1, 2] − 0.5 · 1.9 · [0.25, 0.75] = [0.7625, 1.2875]
    assert torch.allclose(m.theta[0], torch.tensor([0.7625, 1.2875]), atol=1e-6)
    assert m.version == [1, 0] and m.theta[1].item() == 5.0 and m.tokens == [400, 0]
    # second merge, one push: m = 0.9·[0.25, 0.75] + [1, 1] = [1.225, 1.675]; step = [1, 1] + 0.9·m
    m.contribute(0, learner=1, delta=torch.tensor([1.0, 1.0]), tokens=50)
    assert m.merge(0) == [1]
    mom = torch.tensor([1.225, 1.675])
    want = torch.tensor([0.7625, 1.2875]) - 0.5 * (torch.tensor([1.0, 1.0]) + 0.9 * mom)
    assert torch.allclose(m.theta[0], want, atol=1e-6)
    # two pushes of one learner before a merge: their tokens add up and the deltas are token-weighted
    m.contribute(1, learner=0, delta=torch.tensor([2.0]), tokens=10)
    m.contribute(1, learner=0, delta=torch.tensor([4.0]), tokens=30)
    c = m.pending[1][0]
    assert c.tokens == 40 and c.delta.item() == pytest.approx(3.5)
    with pytest.raises(ValueError, match="fragment 1"):
        m.contribute(1, learner=1, delta=torch.zeros(3), tokens=1)


def test_grace_window_waits_for_the_near_and_not_for_the_straggler():
    g = GraceWindow(fraction=0.25)
    for t in (0.0, 1.0, 2.0):  # learners 0, 1, 2 push every 1.0 s (1 a little later); learner 3 every 3.0 s
        g.observe_push(0, 0, t)
        g.observe_push(0, 1, t + 0.1)
        g.observe_push(0, 2, t + 0.15)
    g.observe_push(0, 3, 0.5)
    g.observe_push(0, 3, 3.5)
    # quorum (0, 1) at 3.1: learner 2 is expected at 3.15 (within 0.25 of the median interval 1.0), learner 3 at 6.5
    assert g.deadline(0, [0, 1], [2, 3], quorum_at=3.1) == pytest.approx(3.15)
    assert g.deadline(0, [0, 1], [3], quorum_at=3.1) == 3.1              # nobody near: merge now
    g.observe_merge(0.05)
    assert g.deadline(0, [0, 1], [2], quorum_at=3.1) == pytest.approx(3.2)
    assert g.deadline(0, [0, 1], [2], quorum_at=3.0) == pytest.approx(3.2)  # bounded by 0.25 × 1.0... from 3.0: 3.2
    g.forget(2)
    assert g.deadline(0, [0, 1], [2], quorum_at=3.1) == 3.1              # no timings: not waited for


def test_nonblocking_learner_rebases_a_late_reply_and_defers_its_next_push():
    """The learner's bookkeeping without a syncer: a reply that comes late is rebased on the steps taken since the
    push (none lost), the push that fell due meanwhile goes out right after it, with only the newer steps."""
    model = torch.nn.Linear(2, 1, bias=False)
    learner = DecoupledLearner(model, syncer="127.0.0.1:1", learner_id=0, inner_steps=2)
    learner.base = [learner._flat_local(0)]           # as after join: the global weights are the local ones
    w0 = learner.base[0].clone()

    def step(change: float):
        with torch.no_grad():
            model.weight.add_(change)
        return learner.after_inner_step(tokens=5)

    assert step(1.0) == [] and learner.outbox.empty()   # step 1: nothing due
    assert step(1.0) == []                               # step 2: fragment 0 pushed, Δ = base − local = −2
    head, delta = learner.outbox.get_nowait()
    assert head[:6].tolist() == [2, 0, 10, 2, 0, 2] and torch.allclose(delta, torch.full((2,), -2.0))
    assert step(0.5) == []                               # step 3: in flight, training goes on
    assert step(0.5) == [] and learner.outbox.empty()   # step 4: due again, but deferred (one in flight)
    theta = w0 + 3.0                                     # the merged fragment the syncer sends back
    learner.replies.put((0, 7, theta))
    assert step(0.25) == [0]                             # step 5: rebased, then the deferred push goes out
    assert torch.allclose(learner._flat_local(0), theta + 1.25)
    assert torch.equal(learner.base[0], theta) and learner.version == [7]
    head, delta = learner.outbox.get_nowait()
    assert head[2].item() == 15 and torch.allclose(delta, torch.full((2,), -1.25))


# --- K = all, equal speeds, no failures == synchronous DiLoCo -----------------------------------------------

def _sync_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _mlp(seed=rank)  # DiLoCo starts everyone from rank 0's weights
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        di = DiLoCo(model, inner_steps=4, fragments=2)
        for step in range(12):
            _inner_step(model, opt, rank, step)
            di.after_inner_step()
        if rank == 0:
            torch.save([g.clone() for g in di.global_params], out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _learner(lid: int, addr: str, steps: int, kw: dict, delay: float = 0.0, out: str | None = None) -> None:
    import faulthandler

    faulthandler.enable()  # a native abort prints every thread's Python stack
    torch.set_num_threads(1)
    model = _mlp(seed=100 + lid)  # overwritten by the syncer's weights at join
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    learner = DecoupledLearner(model, syncer=addr, learner_id=lid, **kw)
    step = learner.join()
    try:
        while step < steps and not learner.should_stop():
            _inner_step(model, opt, lid, step)
            step += 1
            learner.after_inner_step(tokens=6)
            if delay:
                time.sleep(delay)
    except SyncerGone:
        os._exit(3)
    learner.close()
    if out is not None:
        torch.save(step, out)
    # Its work is done and checked on the syncer's side. Interpreter teardown of a spawned learner aborted once in a
    # full-suite run (−6, "terminate called without an active exception"; not reproduced in 40 runs since, the pair
    # and store are dropped in close()): leave without it, so that the test checks the algorithm, not teardown.
    os._exit(0)


def _start_syncer(**kw) -> tuple[Syncer, threading.Thread, str]:
    port = _free_port()
    model = _mlp(seed=0)
    syncer = Syncer(list(model.parameters()), [n for n, _ in model.named_parameters()], host="127.0.0.1",
                    port=port, timeout_s=60, stop_timeout_s=20, **kw)
    t = threading.Thread(target=syncer.run, daemon=True)
    t.start()
    return syncer, t, f"127.0.0.1:{port}"


def test_quorum_of_all_equal_speeds_equals_synchronous_diloco(tmp_path):
    out = str(tmp_path / "sync.pt")
    mp.spawn(_sync_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    want = torch.cat([g.reshape(-1) for g in torch.load(out)])

    syncer, t, addr = _start_syncer(learners=2, quorum=2, fragments=2, step_budget=24)
    ctx = mp.get_context("spawn")
    kw = {"inner_steps": 4, "fragments": 2, "blocking": True}
    procs = [ctx.Process(target=_learner, args=(i, addr, 12, kw)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    t.join(timeout=30)
    assert not t.is_alive()
    got = torch.cat([v.reshape(-1) for v in syncer.global_tensors().values()])
    assert syncer.merger.merges == 6 and all(n == 2 for _, _, n, _ in syncer.stats.merges)
    assert torch.equal(got, want), (got - want).abs().max()


# --- failures ------------------------------------------------------------------------------------------------

def test_sigkilled_learner_does_not_stall_the_others_and_rejoins(tmp_path):
    """3 learners, K = 2: learner 1 is SIGKILLed, the merges go on without it (no gap longer than a grace window
    plus a round), it is restarted, rejoins with the current global weights and its step, and pushes again."""
    syncer, t, addr = _start_syncer(learners=3, quorum=2, fragments=2, step_budget=3 * 1000)
    ctx = mp.get_context("spawn")
    kw = {"inner_steps": 4, "fragments": 2}

    def start(i):
        p = ctx.Process(target=_learner, args=(i, addr, 10**6, kw, 0.01, str(tmp_path / f"steps{i}.pt")))
        p.start()
        return p

    procs = {i: start(i) for i in range(3)}
    deadline = time.time() + 120

    def wait_for(cond):
        while not cond():
            assert time.time() < deadline, "timed out"
            time.sleep(0.05)

    wait_for(lambda: {lid for _, lid, _ in syncer.stats.joins} == {0, 1, 2})  # everyone is in (start-up varies)
    wait_for(lambda: syncer.progress > 0.1 and syncer.learner_steps.get(1, 0) > 0)
    os.kill(procs[1].pid, signal.SIGKILL)
    procs[1].join()
    killed_at = time.perf_counter()
    wait_for(lambda: any(lid == 1 for _, lid in syncer.stats.deaths))
    merges_at_death = syncer.merger.merges
    wait_for(lambda: syncer.progress > 0.3)  # time left for the restart to join
    assert syncer.merger.merges > merges_at_death + 10  # progress went on without learner 1
    restarted_at = time.perf_counter()
    procs[1] = start(1)
    wait_for(lambda: any(lid == 1 and inc == 2 for _, lid, inc in syncer.stats.joins))
    for p in procs.values():
        p.join(timeout=max(1, deadline - time.time()))
        assert p.exitcode == 0
    t.join(timeout=30)
    assert syncer.progress >= 1.0
    # no stall while learner 1 was away: the longest gap between merges stays a fraction of a second
    times = [m[0] for m in syncer.stats.merges if killed_at <= m[0] <= restarted_at]
    assert len(times) > 10 and max(b - a for a, b in zip(times, times[1:])) < 2.0
    # after rejoining it contributed again: merges with 3 contributors happened after the restart
    assert any(n == 3 for tm, _, n, _ in syncer.stats.merges if tm > restarted_at)
    # it resumed from the step it had reached, not from 0
    join2 = [tm for tm, lid, inc in syncer.stats.joins if lid == 1 and inc == 2][0]
    assert syncer.learner_steps[1] > 0 and join2 > restarted_at


def _syncer_proc(port: int, root: str, resume: bool) -> None:
    torch.set_num_threads(1)
    model = _mlp(seed=0)
    s = Syncer(list(model.parameters()), [n for n, _ in model.named_parameters()], host="127.0.0.1", port=port,
               learners=2, quorum=2, fragments=1, step_budget=2 * 300, checkpoint_dir=root, checkpoint_every=1,
               resume=resume, timeout_s=30, stop_timeout_s=20)
    s.run()
    torch.save({"merges": s.merger.merges, "resumed_from": str(s.resumed_from),
                "theta": s.merger.theta[0].clone()}, os.path.join(root, "done.pt"))


def test_sigkilled_syncer_stops_the_learners_and_resumes_from_its_checkpoint(tmp_path):
    ctx = mp.get_context("spawn")
    port = _free_port()
    addr = f"127.0.0.1:{port}"
    kw = {"inner_steps": 4}
    syncer = ctx.Process(target=_syncer_proc, args=(port, str(tmp_path), False))
    syncer.start()
    learners = [ctx.Process(target=_learner, args=(i, addr, 10**6, kw, 0.01)) for i in range(2)]
    for p in learners:
        p.start()
    deadline = time.time() + 90
    while latest_syncer_checkpoint(tmp_path) is None or int(latest_syncer_checkpoint(tmp_path).name[7:]) < 20:
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(syncer.pid, signal.SIGKILL)
    syncer.join()
    for p in learners:  # the learners notice and stop with status 3 (SyncerGone), no hang
        p.join(timeout=60)
        assert p.exitcode == 3
    last = latest_syncer_checkpoint(tmp_path)
    merges_saved = int(last.name[len("syncer-"):])
    # a write that did not finish is never taken for a checkpoint
    (tmp_path / "syncer-99999999.tmp").mkdir()
    assert latest_syncer_checkpoint(tmp_path) == last

    syncer = ctx.Process(target=_syncer_proc, args=(port, str(tmp_path), True))
    syncer.start()
    learners = [ctx.Process(target=_learner, args=(i, addr, 10**6, kw)) for i in range(2)]
    for p in learners:
        p.start()
    for p in learners + [syncer]:
        p.join(timeout=90)
    assert [p.exitcode for p in learners + [syncer]] == [0, 0, 0]
    done = torch.load(tmp_path / "done.pt")
    assert done["resumed_from"] == str(last)
    assert done["merges"] >= merges_saved + 1 and math.isfinite(float(done["theta"].sum()))


# --- `unigemma train` with distributed.strategy: decoupled ------------------------------------------------------

def test_unigemma_train_decoupled_syncer_and_learners(tmp_path):
    """The CLI: a syncer and two learners as separate processes (as on separate machines), learner 1 with another
    batch size; the syncer writes `final/` (a loadable model) and its checkpoints; the learners stop on their own."""
    import subprocess
    import sys

    from test_train import arithmetic_jsonl, make_checkpoint, tiny_config

    from unigemma.train.config import TrainConfigError, from_dict

    make_checkpoint(tmp_path / "base", tiny_config())
    arithmetic_jsonl(tmp_path / "train.jsonl", 16)
    cfg = {"output_dir": str(tmp_path / "run"), "model": {"checkpoint": str(tmp_path / "base")},
           "data": {"train": str(tmp_path / "train.jsonl"), "batch_size": 2, "num_workers": 0},
           "optim": {"steps": 12, "lr": 3e-3}, "log": {"every": 4}, "checkpoint": {"every": 4},
           "distributed": {"strategy": "decoupled", "inner_steps": 4, "fragments": 2, "learners": 2, "quorum": 1,
                           "syncer": f"127.0.0.1:{_free_port()}"}}
    with pytest.raises(TrainConfigError, match="quorum"):
        from_dict({**cfg, "distributed": {**cfg["distributed"], "quorum": 3}})
    (tmp_path / "run.json").write_text(__import__("json").dumps(cfg))
    cmd = [sys.executable, "-m", "unigemma.train.cli", str(tmp_path / "run.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    syncer = subprocess.Popen(cmd + ["--set", "distributed.role=syncer"], env=env, stderr=subprocess.PIPE, text=True)
    learners = [subprocess.Popen(cmd + ["--set", "distributed.role=learner", "--set", f"distributed.learner_id={i}"]
                                 + (["--set", "data.batch_size=1"] if i == 1 else []),
                                 env=env, stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = []
    for p in learners + [syncer]:
        _, err = p.communicate(timeout=240)
        errs.append(err)
        assert p.returncode == 0, err[-3000:]
    assert "joined" in errs[0] and "the run's budget is merged" in errs[0]
    final = tmp_path / "run" / "final"
    report = __import__("json").loads((final / "train_report.json").read_text())
    assert report["merges"] >= 4 and sum(report["learner_steps"].values()) >= 24
    assert latest_syncer_checkpoint(tmp_path / "run") is not None
    import unigemma

    llm = unigemma.load(str(final))
    assert llm.generate("1+1=", max_tokens=2).token_ids


def test_torchrun_one_command_rank0_is_the_syncer(tmp_path):
    """`torchrun --nproc-per-node 3 -m unigemma.train.cli run.json` with strategy decoupled: rank 0 serves as the
    syncer, ranks 1 and 2 as learners 0 and 1; all exit 0 and `final/` is written."""
    import json
    import subprocess
    import sys

    from test_train import arithmetic_jsonl, make_checkpoint, tiny_config

    make_checkpoint(tmp_path / "base", tiny_config())
    arithmetic_jsonl(tmp_path / "train.jsonl", 16)
    cfg = {"output_dir": str(tmp_path / "run"), "model": {"checkpoint": str(tmp_path / "base")},
           "data": {"train": str(tmp_path / "train.jsonl"), "batch_size": 2, "num_workers": 0},
           "optim": {"steps": 8, "lr": 3e-3}, "log": {"every": 4},
           "distributed": {"strategy": "decoupled", "inner_steps": 4, "syncer": f"127.0.0.1:{_free_port()}"}}
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", "-m",
                        "unigemma.train.cli", str(tmp_path / "run.json")], env=env, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "syncer on 127.0.0.1" in p.stderr and "learner 1 of 2: joined" in p.stderr
    report = json.loads((tmp_path / "run" / "final" / "train_report.json").read_text())
    assert sum(report["learner_steps"].values()) >= 16
