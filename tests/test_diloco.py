"""DiLoCo on torch.distributed (gloo, processes started with torch.multiprocessing.spawn).

- 2 and 4 workers: the global weights are bit-identical on every worker after every outer step, for plain,
  compressed (int8/int4/bf16) and streaming (fragments + overlapped exchange) variants;
- H = 1, outer lr 1, no momentum: the global weights are the average of the workers' weights after their inner
  step, and with plain SGD inside they equal torch DDP's weights step for step;
- the byte accounting; compression round trips; the training loop (`train`) under DDP and DiLoCo workers.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unigemma.train.diloco import (DiLoCo, Link, allreduce_bytes, decode, encode, encoded_size,
                                   split_fragments)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 4))


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(6, 8, generator=g)
    return x, torch.sin(x[:, :4] * 2)


def _gathered(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in ts])


def _identical_globals(rank: int, **kw) -> None:
    model = _mlp(seed=rank)  # different on purpose: DiLoCo starts everyone from rank 0's weights
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    di = DiLoCo(model, inner_steps=4, **kw)
    syncs = 0
    for step in range(12):
        x, y = _batch(rank, step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if step == 0:  # workers really diverge between syncs
            locals_ = _gathered(_flat(model.parameters()))
            assert not torch.equal(locals_[0], locals_[1])
        done = di.after_inner_step()
        if done:
            syncs += len(done)
            g = _gathered(_flat(di.global_params))
            assert all(torch.equal(g[0], gi) for gi in g), f"global weights differ across workers ({kw})"
            if kw.get("overlap_steps", 0) == 0:
                for f in done:
                    for i in di.fragments[f]:
                        assert torch.equal(di.params[i].detach(), di.global_params[i])
    di.flush()
    assert syncs >= 12 // 4 * len(di.fragments) - len(di.fragments)


def _h1_is_averaging(rank: int) -> None:
    model = _mlp(seed=rank)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    di = DiLoCo(model, inner_steps=1, outer_lr=1.0, outer_momentum=0.0)
    W = dist.get_world_size()
    for step in range(4):
        x, y = _batch(rank, step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        mean = torch.stack(_gathered(_flat(model.parameters()))).sum(0) / W
        assert di.after_inner_step() == [0]
        torch.testing.assert_close(_flat(di.global_params), mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(_flat(model.parameters()), mean, atol=1e-6, rtol=0)


def _h1_sgd_equals_ddp(rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _mlp(seed=rank)
    di = DiLoCo(model, inner_steps=1, outer_lr=1.0, outer_momentum=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    ref = DDP(_mlp(seed=0), bucket_cap_mb=1)  # DDP averages gradients; it starts from rank 0's weights, as DiLoCo does
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    for step in range(5):
        x, y = _batch(rank, step)
        for m, o in ((model, opt), (ref, ref_opt)):
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
            o.zero_grad()
        di.after_inner_step()
        torch.testing.assert_close(_flat(di.global_params), _flat(ref.parameters()), atol=1e-6, rtol=0)


def _bytes(rank: int) -> None:
    W = dist.get_world_size()
    model = _mlp(0)
    n = sum(p.numel() for p in model.parameters())
    di = DiLoCo(model, inner_steps=2)
    for _ in range(4):
        di.after_inner_step()
    assert di.bytes_sent == 2 * allreduce_bytes(4 * n, W)
    q = DiLoCo(_mlp(0), inner_steps=2, compression="int8", quant_block=64)
    q.after_inner_step()
    q.after_inner_step()
    chunk = -(-n // (W * 64)) * 64
    per = encoded_size(chunk, "int8", 64)
    assert q.bytes_sent == (W - 1) * per * 2  # all-to-all of W chunks ((W−1)/W of W·per) + all-gather
    assert q.bytes_sent < 0.35 * allreduce_bytes(4 * n, W)  # ~4× less than one fp32 all-reduce


def _worker(rank: int, world: int, port: int, root: str | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    faulthandler.enable(all_threads=True)  # a native abort in a worker shows where Python was
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if root is not None:  # the training loop under DDP and DiLoCo (one spawn saves a second start-up)
            _train_loop(rank, Path(root))
        _identical_globals(rank)
        _identical_globals(rank, compression="int8", quant_block=32)
        _identical_globals(rank, compression="int4", quant_block=32, fragments=2, overlap_steps=1)
        _identical_globals(rank, compression="bf16", fragments=3, overlap_steps=0)
        _h1_is_averaging(rank)
        _h1_sgd_equals_ddp(rank)
        _bytes(rank)
        dist.barrier()  # nobody tears down gloo's connections while a peer still finishes its last transfer
    finally:
        # DDP reducers and pending Work objects hold the process group; collected here, the group is torn down
        # while the interpreter is whole, not during its finalization (where gloo's threads can abort the worker)
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def test_diloco_four_workers():
    mp.spawn(_worker, args=(4, _free_port(), None), nprocs=4, join=True)


def test_diloco_two_workers_and_train_loop(tmp_path):
    """The same checks with 2 workers, plus `train` itself under DDP and DiLoCo (torchrun-style environment)."""
    from safetensors.torch import load_file

    from test_train import arithmetic_jsonl, make_checkpoint, tiny_config

    make_checkpoint(tmp_path / "base", tiny_config())
    arithmetic_jsonl(tmp_path / "train.jsonl", 16)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    res = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(2)]
    # workers see different data shards
    assert res[0]["ddp"]["losses"] != res[1]["ddp"]["losses"]
    # DDP talks every step, DiLoCo only at the two outer steps (and int8-compressed)
    assert res[0]["diloco"]["bytes"] < res[0]["ddp"]["bytes"] / 4
    for strategy in ("ddp", "diloco"):
        final = tmp_path / strategy / "final"
        assert (final / "rank0.safetensors").is_file() and (final / "rank1.safetensors").is_file()
    # the DiLoCo checkpoint holds the global weights, the same in both ranks' saved state
    w = load_file(str(tmp_path / "diloco" / "final" / "model.safetensors"))
    s0 = load_file(str(tmp_path / "diloco" / "final" / "rank0.safetensors"))
    s1 = load_file(str(tmp_path / "diloco" / "final" / "rank1.safetensors"))
    checked = 0
    for k, v in w.items():
        if f"diloco.global.{k}" in s0:
            assert torch.equal(s0[f"diloco.global.{k}"], s1[f"diloco.global.{k}"])
            assert torch.equal(s0[f"diloco.global.{k}"].to(v.dtype), v)
            checked += 1
    assert checked == len([k for k in w if not k.endswith("layer_scalar")])  # every parameter (buffers aside)


# --- single-process pieces ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,tol", [("bf16", 2 ** -8), ("int8", 1 / 127), ("int4", 1 / 7)])
def test_compression_round_trip(kind, tol):
    torch.manual_seed(0)
    x = torch.randn(4 * 256) * torch.linspace(0.01, 10, 4 * 256)
    b = encode(x, kind, 256)
    assert b.dtype == torch.uint8 and b.numel() == encoded_size(x.numel(), kind, 256)
    y = decode(b, x.numel(), kind, 256)
    # error within half a quantization step of each block's absmax (bf16: relative)
    err = (y - x).abs().view(4, 256)
    bound = x.abs().view(4, 256).amax(1, keepdim=True) * tol * (1 if kind == "bf16" else 0.5) + 1e-7
    assert (err <= bound).all()
    assert torch.equal(decode(encode(torch.zeros(512), kind, 256), 512, kind, 256), torch.zeros(512))


def test_fragments_and_link():
    params = [torch.zeros(n) for n in (10, 10, 40, 10, 30)]
    frags = split_fragments(params, 2)
    assert sorted(i for f in frags for i in f) == list(range(5)) and len(frags) == 2
    assert [i for f in frags for i in f] == list(range(5))  # contiguous, in order
    link = Link(mbps=8.0, latency_ms=0.0)  # 1 MB/s
    import time

    t0 = time.perf_counter()
    done = link.charge(20_000)  # 20 ms on the simulated wire
    link.wait_until(done)
    assert 0.018 < time.perf_counter() - t0 < 0.5 and link.bytes_sent == 20_000


def test_single_process_diloco_is_lookahead():
    """W = 1: the outer step moves the global weights by outer_lr · (global − local)."""
    model = _mlp(0)
    start = _flat(model.parameters()).clone()
    di = DiLoCo(model, inner_steps=2, outer_lr=0.5, outer_momentum=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    di.after_inner_step()
    di.after_inner_step()
    torch.testing.assert_close(_flat(di.global_params), start + 0.5)


# --- the training loop with several workers -------------------------------------------------------------------

def _train_loop(rank: int, root: Path) -> None:
    from unigemma.train import config as tc
    from unigemma.train.loop import train

    results = {}
    for strategy in ("ddp", "diloco"):
        cfg = tc.from_dict({"output_dir": str(root / strategy), "model": {"checkpoint": str(root / "base")},
                            "data": {"train": str(root / "train.jsonl"), "batch_size": 2, "num_workers": 0},
                            "optim": {"steps": 4, "lr": 3e-3}, "log": {"every": 2},
                            "distributed": {"strategy": strategy, "inner_steps": 2, "compression": "int8"}})
        r = train(cfg)
        results[strategy] = {"losses": r.losses, "bytes": r.bytes_sent}
    (root / f"result{rank}.json").write_text(json.dumps(results))
