"""DiLoCo vs DDP on CPU workers: bytes communicated, final evaluation loss, and wall-clock over a slow link.

    python benchmarks/diloco.py                      # 4 gloo workers: ddp, diloco-h50, diloco-h100 (1000 steps),
                                                     # then ddp and diloco-h50 over a simulated 20 Mbit/s link
    python benchmarks/diloco.py --impls ddp,diloco-h50,diloco-h50-int8,diloco-h50-int4-stream --slow-link-mbps 0
    python benchmarks/diloco.py --order 2            # a harder source (needs attention; see the note below)
    python benchmarks/diloco.py --scenario straggler # DDP vs synchronous vs decoupled DiLoCo, one learner 3× slower,
                                                     # a WAN-like link; then decoupled with a learner SIGKILLed at
                                                     # 30% of the budget and restarted at 60% (see straggler_main)

Every implementation trains the same tiny Gemma 4 model (unigemma's own text decoder, random init, seed 0) on the
same data — each worker draws its own stream of sequences from one fixed Markov source — for the same number of
steps and tokens, with the same inner optimizer (AdamW, warm-up + cosine). DDP all-reduces gradients every step
(torch's DistributedDataParallel); DiLoCo syncs pseudo-gradients every H steps (outer SGD Nesterov, lr 0.7,
momentum 0.9). The evaluation loss is measured on held-out sequences of the same source with the final (global)
weights; its floor is the source's entropy, printed as impl "limit".

Output: one JSON object per line (DESIGN.md §6), bench "diloco", metrics bytes_sent (per worker, ring-algorithm
payload model, see unigemma/train/diloco.py), eval_loss, wall_clock (seconds of the training loop) and, for DiLoCo,
bytes_reduction (DDP bytes ÷ this impl's bytes). The slow-link runs sleep in proportion to the bytes of each
collective (DDP's sleep runs in the all-reduce future's callback, so its overlap with backward is kept).

Note: DiLoCo needs enough outer steps. With 1000 steps (20 / 10 outer steps) it ends close to DDP; on the
order-2 source at 600 steps, still on the plateau before attention learns the pair statistics, DDP's 4× larger
synchronous batch escaped it much earlier than DiLoCo did.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unigemma.config import UnifiedConfig  # noqa: E402
from unigemma.model.unified import Gemma4Unified  # noqa: E402
from unigemma.train.diloco import DiLoCo, Link, ddp_comm_hook  # noqa: E402
from unigemma.train.loop import init_weights, lr_at  # noqa: E402


class MarkovSource:
    """A fixed Markov chain over `vocab` tokens (order 1: context = previous token, order 2: the previous two);
    each context has `branch` likely successors."""

    def __init__(self, vocab: int, branch: int = 4, seed: int = 1234, order: int = 2):
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.order = order
        self.succ = torch.randint(0, vocab, (vocab, vocab, branch), generator=g)
        w = torch.rand(vocab, vocab, branch, generator=g) + 0.2
        self.probs = w / w.sum(-1, keepdim=True)
        if order == 1:  # the first token of the context is ignored: every row equals row 0
            self.succ[:] = self.succ[0:1]
            self.probs[:] = self.probs[0:1]

    def entropy(self) -> float:
        """Per-token entropy in nats (contexts equally likely: an estimate of the loss floor)."""
        p = self.probs
        return float(-(p * p.log()).sum(-1).mean())

    def sample(self, batch: int, seq: int, g: torch.Generator) -> torch.Tensor:
        x = torch.empty(batch, seq, dtype=torch.long)
        x[:, :2] = torch.randint(0, self.vocab, (batch, 2), generator=g)
        for t in range(2, seq):
            a, b = x[:, t - 2], x[:, t - 1]
            if self.order == 1:
                a = torch.zeros_like(a)
            choice = torch.multinomial(self.probs[a, b], 1, generator=g).squeeze(1)
            x[:, t] = self.succ[a, b, choice]
        return x


def model_config(vocab: int, hidden: int, layers: int) -> UnifiedConfig:
    types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    return UnifiedConfig.from_dict({
        "model_type": "gemma4_unified_text", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": 2 * hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": hidden // 4, "global_head_dim": hidden // 4, "sliding_window": 32,
        "layer_types": types, "final_logit_softcapping": 30.0, "pad_token_id": 0, "eos_token_id": [1]})


class LMLoss(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))


def parse_impl(impl: str) -> dict:
    if impl == "ddp":
        return {"kind": "ddp"}
    parts = impl.split("-")
    if parts[0] != "diloco" or len(parts) < 2 or not parts[1].startswith("h"):
        raise ValueError(f"impl {impl!r}: expected ddp or diloco-hN[-int8|-int4|-bf16][-stream]")
    spec = {"kind": "diloco", "H": int(parts[1][1:]), "compression": "none", "fragments": 1, "overlap": 0}
    for p in parts[2:]:
        if p in ("bf16", "int8", "int4"):
            spec["compression"] = p
        elif p == "stream":
            spec["fragments"], spec["overlap"] = 2, 1
        else:
            raise ValueError(f"impl {impl!r}: unknown option {p!r}")
    return spec


def run_one(impl: str, rank: int, world: int, args, src: MarkovSource, data: torch.Tensor, steps: int,
            link_mbps: float | None) -> dict:
    """Train one implementation for `steps` steps on this worker's `data` (steps, batch, seq+1)."""
    spec = parse_impl(impl)
    cfg = model_config(args.vocab, args.hidden, args.layers)
    torch.manual_seed(0)
    model = Gemma4Unified(cfg)
    init_weights(model, 0.02)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    link = Link(link_mbps, args.link_latency_ms)
    loss_mod: torch.nn.Module = LMLoss(model)
    diloco = None
    if spec["kind"] == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        loss_mod = DDP(loss_mod)
        loss_mod.register_comm_hook(None, ddp_comm_hook(link))
    else:
        diloco = DiLoCo(model, inner_steps=spec["H"], compression=spec["compression"], fragments=spec["fragments"],
                        overlap_steps=spec["overlap"], link=link)
    dist.barrier()
    t0 = time.perf_counter()
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, args.lr, steps, args.warmup, "cosine", 0.1)
        loss = loss_mod(data[step])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if diloco is not None:
            diloco.after_inner_step()
    if diloco is not None:
        diloco.flush()
    wall = time.perf_counter() - t0
    dist.barrier()
    result = {"bytes_sent": link.bytes_sent, "wall_clock": wall, "collectives": link.collectives}
    if rank == 0:
        ge = torch.Generator().manual_seed(99)
        ev = src.sample(args.eval_batches * args.batch, args.seq + 1, ge)
        model.eval()
        with torch.no_grad(), (diloco.global_weights() if diloco is not None else _null()):
            inner = loss_mod.module if spec["kind"] == "ddp" else loss_mod
            losses = [float(inner(ev[i:i + args.batch])) for i in range(0, ev.shape[0], args.batch)]
        result["eval_loss"] = sum(losses) / len(losses)
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    src = MarkovSource(args.vocab, order=args.order)
    g = torch.Generator().manual_seed(10_000 + rank)  # each worker its own stream, the same for every impl
    data = src.sample(args.steps * args.batch, args.seq + 1, g).view(args.steps, args.batch, args.seq + 1)
    n_params = None
    common = {"bench": "diloco", "device": "cpu", "workers": world, "steps": args.steps,
              "tokens": args.steps * args.batch * args.seq * world,
              "config": {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers, "batch": args.batch,
                         "seq": args.seq, "lr": args.lr, "order": args.order, "link_mbps": args.link_mbps}}
    ddp_bytes = None
    try:
        if rank == 0:
            print(json.dumps({**common, "impl": "limit", "metric": "eval_loss", "value": round(src.entropy(), 4),
                              "unit": "nats/token", "note": "entropy of the data source"}), flush=True)
        runs = [(impl, args.steps, args.link_mbps) for impl in args.impls.split(",")]
        if args.slow_link_mbps:
            runs += [(impl, min(args.slow_steps, args.steps), args.slow_link_mbps) for impl in ("ddp", "diloco-h50")]
        for impl, steps, mbps in runs:
            r = run_one(impl, rank, world, args, src, data, steps, mbps)
            if rank == 0:
                if mbps != args.link_mbps:  # the slow-link runs: wall-clock is what they show
                    line = {**common, "impl": impl, "steps": steps, "tokens": steps * args.batch * args.seq * world,
                            "config": {**common["config"], "link_mbps": mbps}}
                    print(json.dumps({**line, "metric": "wall_clock", "value": round(r["wall_clock"], 2),
                                      "unit": "s", "bytes_sent": r["bytes_sent"],
                                      "note": f"simulated {mbps:g} Mbit/s link"}), flush=True)
                    continue
                if n_params is None:
                    n_params = sum(p.numel() for p in Gemma4Unified(model_config(args.vocab, args.hidden,
                                                                                 args.layers)).parameters())
                    common["config"]["params"] = n_params
                base = {**common, "impl": impl}
                print(json.dumps({**base, "metric": "bytes_sent", "value": r["bytes_sent"], "unit": "bytes",
                                  "collectives": r["collectives"]}), flush=True)
                print(json.dumps({**base, "metric": "eval_loss", "value": round(r["eval_loss"], 4),
                                  "unit": "nats/token"}), flush=True)
                print(json.dumps({**base, "metric": "wall_clock", "value": round(r["wall_clock"], 2),
                                  "unit": "s"}), flush=True)
                if impl == "ddp":
                    ddp_bytes = r["bytes_sent"]
                elif ddp_bytes:
                    print(json.dumps({**base, "metric": "bytes_reduction", "value":
                                      round(ddp_bytes / max(r["bytes_sent"], 1), 1), "unit": "x vs ddp"}),
                          flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if "--scenario" in argv:
        i = argv.index("--scenario")
        if argv[i + 1:i + 2] != ["straggler"]:
            raise SystemExit("--scenario: the one scenario is 'straggler'")
        from diloco_straggler import straggler_main

        return straggler_main(argv[:i] + argv[i + 2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--impls", default="ddp,diloco-h50,diloco-h100")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per worker (same for every impl)")
    p.add_argument("--batch", type=int, default=8, help="sequences per worker per step")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--order", type=int, default=1, choices=[1, 2], help="Markov order of the data source")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--link-mbps", type=float, default=None,
                   help="simulate a link of this bandwidth (Mbit/s) in the main runs")
    p.add_argument("--slow-link-mbps", type=float, default=20.0,
                   help="after the main runs, time ddp and diloco-h50 over a simulated link this slow (0: skip)")
    p.add_argument("--slow-steps", type=int, default=100, help="steps of the slow-link runs")
    p.add_argument("--link-latency-ms", type=float, default=0.0)
    args = p.parse_args(argv)
    for impl in args.impls.split(","):
        parse_impl(impl)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.workers, port, args), nprocs=args.workers, join=True)


if __name__ == "__main__":
    main()
