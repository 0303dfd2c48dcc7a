"""`unigemma train` with `distributed.strategy: decoupled`: the syncer's run and a learner's run.

    one machine, one command (rank 0 = syncer, rank r = learner r − 1; torchrun stops all if one dies):
      torchrun --nproc-per-node 5 -m unigemma.train.cli run.yaml --set distributed.strategy=decoupled
    resilient (each process on its own; a learner that dies is restarted by its torchrun and rejoins):
      unigemma train run.yaml --set distributed.role=syncer --set distributed.learners=4 \\
          --set distributed.syncer=0.0.0.0:29600
      torchrun --nproc-per-node 1 --max-restarts 100 -m unigemma.train.cli run.yaml \\
          --set distributed.role=learner --set distributed.learner_id=I --set distributed.learners=4 \\
          --set distributed.syncer=SYNCER_HOST:29600           (one per learner, on any machine)

The syncer holds the global model (train/decoupled.py), writes `syncer-NNNNNNNN/` checkpoints every
`checkpoint.every` merges and `final/` (the model, as any run's) when the budget is merged; started again on the
same output_dir it resumes from its last checkpoint (`--overwrite` starts over). A learner owns nothing that must
survive: its optimizer state is local, its data position comes back from the syncer when it rejoins. SIGTERM /
SIGINT stop a learner (the others go on) or the syncer (it checkpoints, the learners stop).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

from .config import TrainConfig
from .data import ChatDataset, LengthGroupedBatchSampler, make_loader, to_device
from .decoupled import DecoupledLearner, Syncer, SyncerGone, latest_syncer_checkpoint
from .diloco import Link


def resolve_role(cfg: TrainConfig) -> tuple[str, int, int | None, str]:
    """(role, learners, learner_id, syncer address) from the config and torchrun's environment."""
    ds = cfg.distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    role = ds.role
    if role == "auto":
        if world < 2:
            raise ValueError("distributed.strategy decoupled: set distributed.role (syncer or learner), or launch "
                             "under torchrun with ≥ 2 processes (rank 0 becomes the syncer)")
        role = "syncer" if rank == 0 else "learner"
    learners = ds.learners if ds.learners is not None else (world - 1 if world > 1 else None)
    if learners is None or learners < 1:
        raise ValueError("distributed.learners: how many learners the run has (needed by the syncer and by every "
                         "learner to shard the data)")
    lid = ds.learner_id if ds.learner_id is not None else (rank - 1 if ds.role == "auto" and world > 1 else None)
    if role == "learner" and (lid is None or not 0 <= lid < learners):
        raise ValueError(f"distributed.learner_id must be in [0, {learners}) for a learner, got {lid}")
    addr = ds.syncer or f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:29600"
    return role, learners, lid, addr


def train_decoupled(cfg: TrainConfig, stopper, result):
    role, learners, lid, addr = resolve_role(cfg)
    if role == "syncer":
        return _syncer(cfg, learners, addr, stopper, result)
    return _learner(cfg, learners, lid, addr, stopper, result)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _syncer(cfg: TrainConfig, learners: int, addr: str, stopper, result):
    from .loop import clear_run, evaluate, make_task

    ds, o = cfg.distributed, cfg.optim
    out = Path(cfg.output_dir)
    if cfg.checkpoint.overwrite:
        clear_run(out)
    elif (out / "final").exists():
        raise ValueError(f"{out / 'final'} exists: this run is finished; start over with --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    task = make_task(cfg, torch.device("cpu"))
    names = [n for n, p in task.module.named_parameters() if p.requires_grad]
    params = [p for p in task.module.parameters() if p.requires_grad]
    host, _, port = addr.rpartition(":")
    quorum = ds.quorum if ds.quorum is not None else math.ceil(learners / 2)
    budget = {"token_budget": ds.token_budget} if ds.token_budget else {"step_budget": o.steps * learners}
    log = open(out / "syncer.jsonl", "a", encoding="utf-8")

    def on_merge(f, s):
        log.write(json.dumps({"time": time.time(), "merges": s.merger.merges, "fragment": f,
                              "version": s.merger.version[f], "progress": s.progress,
                              "learner_steps": s.learner_steps, "live": s.live()}) + "\n")
        log.flush()

    syncer = Syncer(params, names, host=host, port=int(port), learners=learners, quorum=quorum,
                    fragments=ds.fragments, outer_lr=ds.outer_lr, outer_momentum=ds.outer_momentum,
                    nesterov=ds.nesterov, grace_fraction=ds.grace_fraction, checkpoint_dir=out,
                    # checkpoint.every learner steps ≈ every·F / H merges of one learner's pushes
                    checkpoint_every=max(1, cfg.checkpoint.every * ds.fragments // ds.inner_steps)
                    if cfg.checkpoint.every else 0,
                    resume=not cfg.checkpoint.overwrite, on_merge=on_merge, log=_say, **budget)
    if stopper is not None:  # a signal stops the merges; run() then checkpoints and lets the learners go
        import threading

        def watch():
            while stopper.signum is None and not syncer.stopping:
                time.sleep(0.1)
            syncer.stop()

        threading.Thread(target=watch, daemon=True).start()
    t0 = time.perf_counter()
    syncer.run()
    log.close()
    result.seconds = time.perf_counter() - t0
    result.steps = sum(syncer.learner_steps.values())
    if syncer.progress < 1.0:  # stopped by a signal: the checkpoint is written, the same command resumes
        import signal

        result.interrupted = signal.Signals(stopper.signum).name if stopper and stopper.signum else "stop"
        result.output_dir = latest_syncer_checkpoint(out) or out
        _say(f"syncer stopped at {syncer.progress:.1%} of the budget: saved {result.output_dir}; run the same "
             "command to resume")
        return result
    with torch.no_grad():
        g = syncer.global_tensors()
        for n, p in zip(names, params):
            p.copy_(g[n].to(p.dtype))
    final = out / "final"
    tmp = out / "final.tmp"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    task.save(tmp, final=True)
    ev = None
    if cfg.data.eval is not None:
        d = cfg.data
        eval_ds = ChatDataset(d.eval, task.tokenizer, task.template, task.media_ids, d.max_seq_len,
                              d.prefill_empty_thought, d.image_soft_tokens, d.skip_bad_records, train_on=d.train_on)
        es = LengthGroupedBatchSampler(eval_ds.lengths, d.batch_size, 0, True, 1 << 30, shuffle=False)
        ev = evaluate(task.loss_module, make_loader(eval_ds, es, task.pad_id, 0), torch.device("cpu"),
                      cfg.eval.max_batches)
    summary = {"merges": syncer.merger.merges, "learner_steps": syncer.learner_steps,
               "tokens": sum(syncer.learner_tokens.values()), "eval_loss": ev, "seconds": result.seconds,
               "joins": len(syncer.stats.joins), "learners_lost": len(syncer.stats.deaths)}
    (tmp / "train_report.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    os.replace(tmp, final)
    result.output_dir, result.final_eval_loss, result.tokens = final, ev, summary["tokens"]
    _say(f"done: {syncer.merger.merges} merges, {summary['tokens']:,} tokens, final checkpoint {final}"
         + (f", eval loss {ev:.4f}" if ev is not None else ""))
    return result


def _learner(cfg: TrainConfig, learners: int, lid: int, addr: str, stopper, result):
    from .loop import lr_at, make_task

    ds, d, o = cfg.distributed, cfg.data, cfg.optim
    dev = torch.device(cfg.model.device if cfg.model.device != "auto" else
                       ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed + 1 + lid)
    random.seed(cfg.seed + 1 + lid)
    task = make_task(cfg, dev)
    params = [p for p in task.module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    train_ds = ChatDataset(d.train, task.tokenizer, task.template, task.media_ids, d.max_seq_len,
                           d.prefill_empty_thought, d.image_soft_tokens, d.skip_bad_records, train_on=d.train_on)
    sampler = LengthGroupedBatchSampler(train_ds.lengths, d.batch_size, cfg.seed, d.group_by_length, d.group_size,
                                        shuffle=True, rank=lid, world_size=learners)
    loader = make_loader(train_ds, sampler, task.pad_id, d.num_workers, d.prefetch_factor, False,
                         pack_len=d.max_seq_len if d.packing else None)
    learner = DecoupledLearner(task.module, syncer=addr, learner_id=lid, inner_steps=ds.inner_steps,
                               fragments=ds.fragments, overlap_steps=ds.overlap_steps, mix=ds.mix, blocking=ds.blocking,
                               link=Link(ds.link_mbps, ds.link_latency_ms))
    step = learner.join()
    per_epoch = max(1, len(sampler))
    epoch, pos = divmod(step, per_epoch)  # a rejoining learner goes on where its data was
    sampler.set_position(epoch, pos)
    it = iter(loader)
    _say(f"learner {lid} of {learners}: joined {addr} at step {step}, progress {learner.progress:.1%}")
    task.loss_module.train()
    t_log = time.perf_counter()
    interval: list[float] = []
    try:
        while not learner.should_stop():
            if stopper is not None and stopper.signum is not None:
                import signal

                result.interrupted = signal.Signals(stopper.signum).name
                break
            micro = []
            for _ in range(o.grad_accum):
                try:
                    micro.append(next(it))
                except StopIteration:
                    epoch += 1
                    sampler.set_position(epoch, 0)
                    it = iter(loader)
                    micro.append(next(it))
            targets = max(1.0, sum(task.count(b) for b in micro))
            lr = lr_at(int(learner.progress * o.steps), o.lr, o.steps, o.warmup_steps, o.schedule, o.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            loss_sum, tokens = 0.0, 0
            for b in micro:
                s, _ = task.loss_module(to_device(b, dev))
                (s / targets).backward()
                loss_sum += float(s.detach())
                tokens += int(b["num_tokens"])
            if o.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            result.losses.append(loss_sum / targets)
            interval.append(loss_sum / targets)
            learner.after_inner_step(tokens=tokens)
            if step % cfg.log.every == 0:
                now = time.perf_counter()
                _say(f"learner {lid} step {step} | loss {sum(interval) / len(interval):.4f} | lr {lr:.2e} | "
                     f"global progress {learner.progress:.1%} | pushed {learner.pushes} | "
                     f"waited {learner.blocked_s:.1f} s | {len(interval) / max(now - t_log, 1e-9):.1f} steps/s")
                interval, t_log = [], now
    except SyncerGone as e:
        _say(f"learner {lid}: {e}")
        raise
    learner.close()
    result.steps = step
    result.bytes_sent = learner.link.bytes_sent
    _say(f"learner {lid}: stopped at step {step}" + (f" ({result.interrupted})" if result.interrupted else
                                                     " (the run's budget is merged)"))
    return result
