"""DDP vs synchronous DiLoCo vs decoupled DiLoCo with one learner 3× slower, over a simulated WAN link.

    python benchmarks/diloco.py --scenario straggler                 # 4 learners, 50 Mbit/s + 25 ms, learner 3 slow
    python benchmarks/diloco.py --scenario straggler --impls decoupled,decoupled-kill --steps 300

Every implementation trains the tiny Gemma 4 text model of benchmarks/diloco.py on the same Markov source for the
same number of tokens (`--steps` × workers × batch × seq): DDP and synchronous DiLoCo run `--steps` steps on every
worker; decoupled learners run until the syncer has that many tokens pushed (the fast ones do more steps, the slow
one fewer). Emulated hardware: this machine's 2 cores are shared by all learners, so learners would otherwise slow
each other down and an idle one would lend its CPU to the rest — unlike learners on machines of their own. So each
learner's step is paced like a device of fixed speed: first every worker trains a few steps at once (no
communication) and the median step time is c; then every step (data, forward, backward, optimizer step — and under
DDP the all-reduce inside backward) is padded with a sleep to last at least T = `--pace` × c (headroom, so that
the CPU is not what limits the fast learners), and the last learner's at least `--slow` × T, in every
implementation. Each learner has its own simulated link (`diloco.Link`: latency + bytes / bandwidth per
transfer; DDP's per-step all-reduce, DiLoCo's fragment all-reduce, decoupled pushes and replies).

Evaluation: snapshots of the global weights (DDP: the model; DiLoCo: the global parameters; decoupled: the
syncer's fragments after merges) with their wall-clock time and tokens, evaluated after training on held-out
sequences. Target loss = 1.01 × the highest final loss of ddp / diloco / decoupled (a loss every run reaches);
time_to_target is where the loss curve first crosses it (linear between the two snapshots around the crossing). Wall clock starts when every worker is ready.

decoupled-kill: the same decoupled run, learner 0 SIGKILLed when 30% of the budget is pushed and started again at
60% (it rejoins with the global weights and its step). Reported: the longest any learner waited for the reply to
a push while it was away (a learner blocks only there; a global stall would show as long waits), the longest gap
between two merges then and in the no-failure run, the grace-window bound (grace_fraction × median push interval),
and the final loss against the no-failure run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diloco import LMLoss, MarkovSource, model_config
from unigemma.model.unified import Gemma4Unified
from unigemma.train.decoupled import DecoupledLearner, Syncer, SyncerGone
from unigemma.train.diloco import DiLoCo, Link, ddp_comm_hook
from unigemma.train.loop import init_weights, lr_at


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(args) -> torch.nn.Module:
    torch.manual_seed(0)
    m = Gemma4Unified(model_config(args.vocab, args.hidden, args.layers))
    init_weights(m, 0.02)
    return m


def _sync_worker(rank: int, world: int, port: int, args, impl: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        src = MarkovSource(args.vocab, order=args.order)
        g = torch.Generator().manual_seed(10_000 + rank)
        model = _model(args)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
        link = Link(args.link_mbps, args.link_latency_ms)
        loss_mod: torch.nn.Module = LMLoss(model)
        diloco = None
        if impl == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            loss_mod = DDP(loss_mod)
            loss_mod.register_comm_hook(None, ddp_comm_hook(link))
        else:
            diloco = DiLoCo(model, inner_steps=args.H, fragments=args.fragments, link=link)
        slow = rank == world - 1
        per_step_tokens = world * args.batch * args.seq
        snaps = []
        dist.barrier()
        t0 = time.perf_counter()
        for step in range(args.steps):
            for grp in opt.param_groups:
                grp["lr"] = lr_at(step, args.lr, args.steps, args.warmup, "cosine", 0.1)
            tc = time.perf_counter()
            x = src.sample(args.batch, args.seq + 1, g)
            loss = loss_mod(x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            time.sleep(max(0.0, (args.slow if slow else 1.0) * args.step_ref - (time.perf_counter() - tc)))
            if diloco is not None:
                diloco.after_inner_step()
            if rank == 0 and ((step + 1) % args.snap_every == 0 or step + 1 == args.steps):
                weights = diloco.global_params if diloco is not None else list(model.parameters())
                snaps.append((time.perf_counter() - t0, (step + 1) * per_step_tokens,
                              [w.detach().float().clone() for w in weights]))
        if diloco is not None:
            diloco.flush()
        dist.barrier()
        if rank == 0:
            torch.save({"snaps": snaps, "wall": time.perf_counter() - t0, "bytes": link.bytes_sent}, out)
    finally:
        dist.destroy_process_group()


def _learner(lid: int, addr: str, args, world: int, waits_dir: str) -> None:
    torch.set_num_threads(1)
    src = MarkovSource(args.vocab, order=args.order)
    model = _model(args)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    link = Link(args.link_mbps, args.link_latency_ms)
    learner = DecoupledLearner(model, syncer=addr, learner_id=lid, inner_steps=args.H, fragments=args.fragments,
                               overlap_steps=args.overlap, blocking=args.blocking, link=link, timeout_s=120)
    step = learner.join()
    g = torch.Generator().manual_seed(10_000 + lid + 1000 * step)  # a rejoining learner: a fresh stream
    while not learner.store.check(["go"]):
        time.sleep(0.01)
    loss_mod = LMLoss(model)
    slow = lid == world - 1
    try:
        while not learner.should_stop():
            for grp in opt.param_groups:
                grp["lr"] = lr_at(int(learner.progress * args.steps), args.lr, args.steps, args.warmup, "cosine",
                                  0.1)
            tc = time.perf_counter()
            loss = loss_mod(src.sample(args.batch, args.seq + 1, g))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            time.sleep(max(0.0, (args.slow if slow else 1.0) * args.step_ref - (time.perf_counter() - tc)))
            learner.after_inner_step(tokens=args.batch * args.seq)
    except SyncerGone:
        os._exit(3)
    learner.close()
    with open(os.path.join(waits_dir, f"{lid}-{os.getpid()}.json"), "w") as fh:
        json.dump(learner.waits, fh)


def _calibrate_worker(rank: int, args, out: str) -> None:
    torch.set_num_threads(1)
    src = MarkovSource(args.vocab, order=args.order)
    g = torch.Generator().manual_seed(rank)
    model = _model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loss_mod = LMLoss(model)
    times = []
    for _ in range(args.calibration_steps):
        tc = time.perf_counter()
        loss_mod(src.sample(args.batch, args.seq + 1, g)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - tc)
    torch.save(times[len(times) // 3:], f"{out}.{rank}")


def _calibrate(args) -> float:
    """The median step time with every worker training at once (the machine as loaded as in the runs)."""
    out = f"/tmp/unigemma-straggler-{os.getpid()}-calib"
    mp.spawn(_calibrate_worker, args=(args, out), nprocs=args.workers, join=True)
    times = []
    for r in range(args.workers):
        times += torch.load(f"{out}.{r}")
        os.unlink(f"{out}.{r}")
    return statistics.median(times)


def _run_decoupled(args, kill: bool) -> dict:
    world = args.workers
    model = _model(args)
    names = [n for n, _ in model.named_parameters()]
    port = _port()
    snaps, t0 = [], [None]

    def on_merge(f, syncer):
        if t0[0] is not None and syncer.merger.merges % args.snap_merges == 0:
            snaps.append((time.perf_counter() - t0[0], sum(syncer.learner_tokens.values()),
                          [t.clone() for t in syncer.global_tensors().values()]))

    budget = args.steps * world * args.batch * args.seq
    syncer = Syncer(list(model.parameters()), names, host="127.0.0.1", port=port, learners=world,
                    quorum=args.quorum, fragments=args.fragments, token_budget=budget,
                    grace_fraction=args.grace_fraction, timeout_s=120, on_merge=on_merge)
    th = threading.Thread(target=syncer.run, daemon=True)
    th.start()
    addr = f"127.0.0.1:{port}"
    ctx = mp.get_context("spawn")
    waits_dir = tempfile.mkdtemp(prefix="unigemma-straggler-waits-")
    procs = {i: ctx.Process(target=_learner, args=(i, addr, args, world, waits_dir)) for i in range(world)}
    for p in procs.values():
        p.start()
    while len({lid for _, lid, _ in syncer.stats.joins}) < world:
        time.sleep(0.01)
    t0[0] = time.perf_counter()
    syncer.store.set("go", "1")
    killed_at = restarted_at = None
    while th.is_alive():
        if kill and killed_at is None and syncer.progress >= args.kill_at:
            os.kill(procs[0].pid, signal.SIGKILL)
            procs[0].join()
            killed_at = time.perf_counter()
        if kill and killed_at is not None and restarted_at is None and syncer.progress >= args.restart_at:
            procs[0] = ctx.Process(target=_learner, args=(0, addr, args, world, waits_dir))
            procs[0].start()
            restarted_at = time.perf_counter()
        time.sleep(0.01)
    for p in procs.values():
        p.join(timeout=60)
    end = syncer.stats.merges[-1][0]
    snaps.append((end - t0[0], sum(syncer.learner_tokens.values()),
                  [t.clone() for t in syncer.global_tensors().values()]))
    times = [m[0] for m in syncer.stats.merges if m[0] >= t0[0]]
    gaps = [b - a for a, b in zip(times, times[1:])]
    intervals = list(syncer.grace.interval.values())
    waits = []
    for f in Path(waits_dir).glob("*.json"):
        waits += json.loads(f.read_text())
    shutil.rmtree(waits_dir, ignore_errors=True)
    out = {"snaps": snaps, "wall": end - t0[0], "merges": syncer.merger.merges,
           "median_gap": statistics.median(gaps) if gaps else 0.0, "max_gap": max(gaps, default=0.0),
           "max_wait": max((w for _, w in waits), default=0.0),
           "grace_bound": args.grace_fraction * statistics.median(intervals) if intervals else 0.0,
           "merged_by": statistics.mean(n for _, _, n, _ in syncer.stats.merges),
           "steps": dict(syncer.learner_steps)}
    if kill and killed_at is not None:
        out["killed_at"], out["restarted_at"] = killed_at - t0[0], (restarted_at or end) - t0[0]
        out["rejoined"] = any(lid == 0 and inc == 2 for _, lid, inc in syncer.stats.joins)
        during = [t for t in times if killed_at <= t <= (restarted_at or end)]
        edges = [killed_at] + during + [restarted_at or end]
        out["max_gap_away"] = max(b - a for a, b in zip(edges, edges[1:]))
        out["merges_away"] = len(during)
        away = [w for t, w in waits if killed_at <= t <= (restarted_at or end)]
        out["max_wait_away"] = max(away, default=0.0)
    return out


def _evaluate(args, snaps) -> list[tuple[float, int, float]]:
    src = MarkovSource(args.vocab, order=args.order)
    ev = src.sample(args.eval_batches * args.batch, args.seq + 1, torch.Generator().manual_seed(99))
    model = _model(args)
    loss_mod = LMLoss(model).eval()
    params = list(model.parameters())
    curve = []
    for t, tokens, weights in snaps:
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w.view_as(p))
            losses = [float(loss_mod(ev[i:i + args.batch])) for i in range(0, ev.shape[0], args.batch)]
        curve.append((t, tokens, sum(losses) / len(losses)))
    return curve


def straggler_main(argv) -> None:
    p = argparse.ArgumentParser(prog="benchmarks/diloco.py --scenario straggler", description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--impls", default="ddp,diloco,decoupled,decoupled-kill")
    p.add_argument("--steps", type=int, default=600, help="steps per worker of DDP / DiLoCo (sets the token budget)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--order", type=int, default=1, choices=[1, 2])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--H", type=int, default=20, help="inner steps between two syncs of a fragment")
    p.add_argument("--fragments", type=int, default=2)
    p.add_argument("--blocking", action="store_true", help="decoupled learners wait for each merge")
    p.add_argument("--overlap", type=int, default=1, help="decoupled, blocking: inner steps a reply may come late")
    p.add_argument("--quorum", type=int, default=2)
    p.add_argument("--grace-fraction", type=float, default=0.5)
    p.add_argument("--slow", type=float, default=3.0, help="the last learner is this many times slower")
    p.add_argument("--link-mbps", type=float, default=50.0)
    p.add_argument("--link-latency-ms", type=float, default=25.0)
    p.add_argument("--kill-at", type=float, default=0.3)
    p.add_argument("--restart-at", type=float, default=0.6)
    p.add_argument("--snap-every", type=int, default=5, help="DDP / DiLoCo: snapshot every N steps")
    p.add_argument("--snap-merges", type=int, default=1, help="decoupled: snapshot every N merges")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--calibration-steps", type=int, default=30)
    p.add_argument("--pace", type=float, default=2.0, help="a fast learner's step lasts ≥ this × the calibrated one")
    args = p.parse_args(argv)
    args.step_ref = args.pace * _calibrate(args)
    world = args.workers
    tokens = args.steps * world * args.batch * args.seq
    common = {"bench": "diloco-straggler", "device": "cpu", "workers": world, "tokens": tokens,
              "config": {k: v for k, v in vars(args).items() if k not in ("impls",)}}

    def emit(impl, metric, value, unit, **extra):
        print(json.dumps({**common, "impl": impl, "metric": metric, "value": value, "unit": unit, **extra}),
              flush=True)

    emit("calibration", "paced_step_time", round(args.step_ref, 4), "s",
         note=f"{args.pace:g} × the median step with {world} workers training at once: every step lasts ≥ this, "
              f"the straggler's ≥ {args.slow:g}× this")
    emit("limit", "eval_loss", round(MarkovSource(args.vocab, order=args.order).entropy(), 4), "nats/token",
         note="entropy of the data source")
    runs: dict[str, dict] = {}
    for impl in args.impls.split(","):
        if impl in ("ddp", "diloco"):
            out = f"/tmp/unigemma-straggler-{os.getpid()}-{impl}.pt"
            mp.spawn(_sync_worker, args=(world, _port(), args, impl, out), nprocs=world, join=True)
            r = torch.load(out)
            os.unlink(out)
        elif impl in ("decoupled", "decoupled-kill"):
            r = _run_decoupled(args, kill=impl == "decoupled-kill")
        else:
            raise SystemExit(f"--impls: unknown {impl!r} (ddp, diloco, decoupled, decoupled-kill)")
        r["curve"] = _evaluate(args, r.pop("snaps"))
        runs[impl] = r
        final = r["curve"][-1][2]
        emit(impl, "eval_loss", round(final, 4), "nats/token", tokens_trained=r["curve"][-1][1])
        emit(impl, "wall_clock", round(r["wall"], 2), "s")
        if "merges" in r:
            emit(impl, "merges", r["merges"], "count", mean_contributors=round(r["merged_by"], 2),
                 learner_steps=r["steps"], median_merge_gap_s=round(r["median_gap"], 3),
                 max_merge_gap_s=round(r["max_gap"], 3), grace_bound_s=round(r["grace_bound"], 3))
            emit(impl, "longest_learner_wait", round(r["max_wait"], 3), "s",
                 note="the longest a learner waited for the reply to one of its pushes")
        if "max_gap_away" in r:
            emit(impl, "longest_learner_wait_while_killed", round(r["max_wait_away"], 3), "s",
                 grace_bound_s=round(r["grace_bound"], 3),
                 note="the longest any learner waited for a reply while learner 0 was away")
            emit(impl, "max_merge_gap_while_killed", round(r["max_gap_away"], 3), "s",
                 merges_while_killed=r["merges_away"], killed_at_s=round(r["killed_at"], 2),
                 restarted_at_s=round(r["restarted_at"], 2), rejoined=r["rejoined"],
                 grace_bound_s=round(r["grace_bound"], 3), median_merge_gap_s=round(r["median_gap"], 3))
    base = [runs[k]["curve"][-1][2] for k in ("ddp", "diloco", "decoupled") if k in runs]
    if not base:
        return
    target = 1.01 * max(base)
    reach = {}
    for impl, r in runs.items():
        hit, prev = None, (0.0, None)
        for t, _, loss in r["curve"]:  # the first crossing, interpolated linearly between two snapshots
            if loss <= target:
                t0, l0 = prev
                hit = t if l0 is None else t0 + (t - t0) * (l0 - target) / max(l0 - loss, 1e-12)
                break
            prev = (t, loss)
        reach[impl] = hit
        emit(impl, "time_to_target", None if hit is None else round(hit, 2), "s", target_loss=round(target, 4))
    if reach.get("diloco") and reach.get("decoupled"):
        emit("decoupled", "speedup_to_target_vs_diloco", round(reach["diloco"] / reach["decoupled"], 2), "x")
    if reach.get("ddp") and reach.get("decoupled"):
        emit("decoupled", "speedup_to_target_vs_ddp", round(reach["ddp"] / reach["decoupled"], 2), "x")
    if "ddp" in runs and "decoupled" in runs:
        d, c = runs["ddp"]["curve"][-1][2], runs["decoupled"]["curve"][-1][2]
        emit("decoupled", "final_loss_vs_ddp", round(100 * (c - d) / d, 2), "%")
    if "decoupled" in runs and "decoupled-kill" in runs:
        d, c = runs["decoupled"]["curve"][-1][2], runs["decoupled-kill"]["curve"][-1][2]
        emit("decoupled-kill", "final_loss_vs_no_failure", round(100 * (c - d) / d, 2), "%")
