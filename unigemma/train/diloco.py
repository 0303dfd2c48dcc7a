"""Data-parallel training on torch.distributed: a DDP baseline and DiLoCo (low-communication outer steps).

    DDP      every step: all-reduce the gradients (torch's DistributedDataParallel; `ddp_comm_hook` counts bytes)
    DiLoCo   every H inner steps (each worker: AdamW on its own data, optimizer state local):
               Δ = θ_global − θ_local                           (fp32 pseudo-gradient)
               Δ̄ = all_reduce_SUM(Δ) / W                        (sum then divide: gloo and NCCL both do SUM)
               θ_global ← OuterSGD(θ_global, grad = Δ̄)         (Nesterov, lr 0.7, momentum 0.9 by default)
               θ_local  ← θ_global
    options  streaming fragments: the parameters are cut into F fragments (in layer order); fragment f syncs at
               steps ≡ (f+1)·H/F (mod H), so the bandwidth is spread over the H steps;
             overlap: a fragment's exchange is started with async work handles and waited for `overlap_steps`
               inner steps later (compute continues meanwhile); the local fragment then becomes
               mix·θ_local + (1−mix)·θ_global, keeping part of the steps taken during the exchange;
             compression of Δ (bf16, int8, int4): each worker encodes its W chunks (per-block absmax scales),
               all_to_all sends chunk r to rank r, rank r decodes and sums them in fp32, re-encodes the sum and
               all_gather returns every summed chunk: every rank decodes the same bytes, so the global weights
               stay identical everywhere, and no sum is ever formed in low precision.

`bytes_sent` counts the payload each worker transmits under ring algorithms (all-reduce 2(W−1)/W·n, all-to-all and
all-gather (W−1)/W·n for a total of n): a model of the traffic, the same for DDP and DiLoCo. The one-time
initial broadcast is not counted (DDP's is not either). `Link` can also simulate a slow network: every transfer
occupies the link for latency + bytes/bandwidth, and waiting for it sleeps until then.

Launch with `torchrun --nproc-per-node N` (env:// rendezvous; `--nnodes`/`--rdzv-endpoint` for several machines)
or `torch.multiprocessing.spawn` with MASTER_ADDR/MASTER_PORT set. What this module does not do: data sharding
(data.py's sampler) or the training loop (loop.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

# --- process group ----------------------------------------------------------------------------------------


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str = "auto", device: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    A single process (no WORLD_SIZE, or 1) gets a context without a process group. `backend` auto picks nccl
    when the device is CUDA and gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        dev = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistContext(0, 1, 0, dev, None)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError(f"distributed.backend 'nccl' needs CUDA devices, but the device is {dev}; use gloo")
    if not dist.is_initialized():
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is None:
            dist.init_process_group(backend=backend)
        else:
            # torchrun keeps one key-value store across the restarts of a worker group, and a new process group
            # publishes its addresses under the same keys every time: a restarted worker could read a dead
            # worker's address from the attempt before ("Gloo connectFullMesh failed ... Connection refused").
            # Keys under a per-attempt prefix cannot be stale.
            store, rank, size = next(dist.rendezvous("env://"))
            dist.init_process_group(backend=backend, store=dist.PrefixStore(f"unigemma/attempt{attempt}/", store),
                                    rank=rank, world_size=size)
    return DistContext(dist.get_rank(), dist.get_world_size(), local, dev, backend)


# --- traffic accounting and a simulated link --------------------------------------------------------------

def allreduce_bytes(nbytes: int, world: int) -> int:
    return int(2 * (world - 1) * nbytes / world)


def alltoall_bytes(nbytes: int, world: int) -> int:
    """Bytes a rank sends in an all-to-all of `nbytes` total input (its own chunk stays home)."""
    return int((world - 1) * nbytes / world)


def allgather_bytes(per_rank: int, world: int) -> int:
    return (world - 1) * per_rank


class Link:
    """Counts the bytes this worker sends; with `mbps`, also simulates a slow link.

    A transfer starts when the link is free, occupies it for latency + bytes·8 / (mbps·10⁶) seconds, and
    `wait_until(done)` sleeps until the simulated completion (compute done meanwhile is overlap).
    """

    def __init__(self, mbps: float | None = None, latency_ms: float = 0.0):
        self.mbps = mbps
        self.latency = latency_ms / 1000.0
        self.bytes_sent = 0
        self.collectives = 0
        self.busy_until = 0.0
        self.waited = 0.0

    def charge(self, nbytes: int) -> float:
        self.bytes_sent += int(nbytes)
        self.collectives += 1
        if self.mbps is None:
            return 0.0
        start = max(time.perf_counter(), self.busy_until)
        self.busy_until = start + self.latency + nbytes * 8 / (self.mbps * 1e6)
        return self.busy_until

    def wait_until(self, t: float) -> None:
        dt = t - time.perf_counter()
        if dt > 0:
            time.sleep(dt)
            self.waited += dt


def ddp_comm_hook(link: Link, group=None):
    """A DDP communication hook: the default averaging all-reduce, plus byte counting and the simulated link
    (the delay runs in the future's callback, so DDP's overlap of communication with backward is kept)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    world = dist.get_world_size(group)

    def hook(state, bucket):
        buf = bucket.buffer()
        done = link.charge(allreduce_bytes(buf.numel() * buf.element_size(), world))
        fut = allreduce_hook(group, bucket)

        def delayed(f):
            link.wait_until(done)
            return f.value()

        return fut.then(delayed) if link.mbps is not None else fut

    return hook


# --- compression --------------------------------------------------------------------------------------------

_QMAX = {"int8": 127, "int4": 7}


def encoded_size(n: int, compression: str, block: int) -> int:
    """Bytes of one encoded chunk of n elements (n a multiple of block)."""
    if compression == "bf16":
        return 2 * n
    scales = 4 * (n // block)
    return scales + (n if compression == "int8" else n // 2)


def encode(x: torch.Tensor, compression: str, block: int) -> torch.Tensor:
    """1-D float32 (length a multiple of block) → uint8 bytes: payload, then float32 per-block scales."""
    if compression == "bf16":
        return x.to(torch.bfloat16).view(torch.uint8)
    qmax = _QMAX[compression]
    xb = x.view(-1, block)
    scale = xb.abs().amax(dim=1) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xb / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8).view(-1)
    if compression == "int8":
        payload = q.view(torch.uint8)
    else:  # two 4-bit values per byte, offset by 8 so they are unsigned
        u = (q + 8).to(torch.uint8).view(-1, 2)
        payload = u[:, 0] | (u[:, 1] << 4)
    return torch.cat([payload, scale.float().view(torch.uint8)])


def decode(b: torch.Tensor, n: int, compression: str, block: int) -> torch.Tensor:
    """Inverse of `encode`: uint8 bytes → float32 (n,)."""
    if compression == "bf16":
        return b.view(torch.bfloat16).float()
    nblocks = n // block
    scale = b[b.numel() - 4 * nblocks:].contiguous().view(torch.float32)
    payload = b[: b.numel() - 4 * nblocks]
    if compression == "int8":
        q = payload.contiguous().view(torch.int8).float()
    else:
        lo = (payload & 0x0F).to(torch.int16) - 8
        hi = (payload >> 4).to(torch.int16) - 8
        q = torch.stack([lo, hi], dim=1).view(-1).float()
    return (q.view(nblocks, block) * scale[:, None]).view(-1)


# --- DiLoCo -------------------------------------------------------------------------------------------------

@dataclass
class _Pending:
    fragment: int
    due: int                      # inner step at which the exchange is finished
    work: object | None           # async work handle of the (first) collective
    buf: torch.Tensor             # all-reduce buffer, or the received all-to-all bytes
    n: int                        # elements of the fragment (before padding)
    chunk: int                    # elements per chunk (compressed path)
    done_at: float                # simulated link completion time


def split_fragments(params: list[torch.Tensor], fragments: int) -> list[list[int]]:
    """Cut the parameter list (module order ≈ layer order) into `fragments` contiguous groups of ~equal size."""
    total = sum(p.numel() for p in params)
    groups: list[list[int]] = [[] for _ in range(fragments)]
    acc = 0
    for i, p in enumerate(params):
        f = min(fragments - 1, int(acc * fragments / max(total, 1)))
        groups[f].append(i)
        acc += p.numel()
    return [g for g in groups if g] or [list(range(len(params)))]


class DiLoCo:
    """Outer optimisation over a model trained by any local (inner) optimizer.

        diloco = DiLoCo(model, inner_steps=50)
        for batch in data:
            loss(batch).backward(); inner_opt.step(); inner_opt.zero_grad()
            diloco.after_inner_step()          # syncs the fragments that are due

    `global_params` (fp32) are the shared model: identical on every rank after each completed sync.
    """

    def __init__(self, model: nn.Module, *, inner_steps: int = 50, outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, nesterov: bool = True, fragments: int = 1, overlap_steps: int = 0,
                 mix: float = 0.5, compression: str = "none", quant_block: int = 1024, group=None,
                 link: Link | None = None):
        if compression not in ("none", "bf16", "int8", "int4"):
            raise ValueError(f"compression {compression!r} is not supported (accepted: none, bf16, int8, int4)")
        if quant_block <= 0 or quant_block % 2:
            raise ValueError(f"quant_block must be a positive even number, got {quant_block}")
        if not 0 <= overlap_steps < inner_steps:
            raise ValueError(f"overlap_steps must be in [0, inner_steps={inner_steps}), got {overlap_steps}")
        self.group = group
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.H = inner_steps
        self.overlap = overlap_steps
        self.mix = mix
        self.compression = compression
        self.block = quant_block
        self.link = link or Link()
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        if dist.is_initialized():  # start from identical weights (rank 0's)
            with torch.no_grad():
                for p in self.params:
                    dist.broadcast(p.data, src=0, group=group)
        self.global_params = [p.detach().float().clone() for p in self.params]
        use_nesterov = nesterov and outer_momentum > 0
        self.outer = torch.optim.SGD(self.global_params, lr=outer_lr, momentum=outer_momentum, nesterov=use_nesterov)
        self.fragments = split_fragments(self.params, fragments)
        F = len(self.fragments)
        self.offsets = [((f + 1) * self.H // F) % self.H for f in range(F)]
        self.step_count = 0
        self.syncs = 0
        self.pending: list[_Pending] = []

    # -- public ------------------------------------------------------------------------------------------
    @property
    def bytes_sent(self) -> int:
        return self.link.bytes_sent

    @property
    def idle(self) -> bool:
        """No exchange in flight (a checkpoint taken now is exact)."""
        return not self.pending

    def after_inner_step(self) -> list[int]:
        """Count one inner step; finish the exchanges due now, start the ones scheduled. Returns the fragments
        whose global weights were updated at this step."""
        self.step_count += 1
        finished = []
        for pend in [p for p in self.pending if p.due == self.step_count]:
            self._finish(pend)
            self.pending.remove(pend)
            finished.append(pend.fragment)
        for f, off in enumerate(self.offsets):
            if self.step_count % self.H == off:
                pend = self._start(f)
                if self.overlap == 0:
                    self._finish(pend)
                    finished.append(f)
                else:
                    self.pending.append(pend)
        self.syncs += len(finished)
        return finished

    @property
    def outer_steps(self) -> int:
        """Completed outer steps (one = every fragment synced once)."""
        return self.syncs // len(self.fragments)

    def flush(self) -> None:
        """Finish every exchange in flight now (end of training)."""
        for pend in self.pending:
            self._finish(pend)
            self.syncs += 1
        self.pending.clear()

    @contextlib.contextmanager
    def global_weights(self):
        """Temporarily load the global weights into the model (evaluation, saving); local ones are restored."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, g in zip(self.params, self.global_params):
                p.copy_(g)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.pending:
            raise RuntimeError("DiLoCo state saved with an exchange in flight; save when `idle`")
        out = {f"global.{n}": g for n, g in zip(self.names, self.global_params)}
        for n, g in zip(self.names, self.global_params):
            buf = self.outer.state.get(g, {}).get("momentum_buffer")
            if buf is not None:
                out[f"momentum.{n}"] = buf
        out["step_count"] = torch.tensor([self.step_count, self.syncs], dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, g in zip(self.names, self.global_params):
                if f"global.{n}" not in state:
                    raise ValueError(f"DiLoCo state lacks global weights for parameter {n!r}")
                g.copy_(state[f"global.{n}"])
                if f"momentum.{n}" in state:
                    self.outer.state[g]["momentum_buffer"] = state[f"momentum.{n}"].clone().to(g.device)
        self.step_count, self.syncs = (int(x) for x in state["step_count"].tolist())

    # -- the exchange ------------------------------------------------------------------------------------
    def _flat_delta(self, f: int) -> torch.Tensor:
        idx = self.fragments[f]
        return torch.cat([(self.global_params[i] - self.params[i].detach().float()).reshape(-1) for i in idx])

    def _start(self, f: int) -> _Pending:
        delta = self._flat_delta(f)
        n = delta.numel()
        W = self.world
        if self.compression == "none":
            done = self.link.charge(allreduce_bytes(4 * n, W))
            work = dist.all_reduce(delta, op=dist.ReduceOp.SUM, group=self.group, async_op=True) if W > 1 else None
            return _Pending(f, self.step_count + self.overlap, work, delta, n, 0, done)
        chunk = math.ceil(n / (W * self.block)) * self.block
        padded = torch.zeros(W * chunk, dtype=torch.float32, device=delta.device)
        padded[:n] = delta
        send = torch.cat([encode(padded[r * chunk:(r + 1) * chunk], self.compression, self.block)
                          for r in range(W)])
        recv = torch.empty_like(send)
        done = self.link.charge(alltoall_bytes(send.numel(), W))
        work = None
        if W > 1:
            work = dist.all_to_all_single(recv, send, group=self.group, async_op=True)
        else:
            recv.copy_(send)
        return _Pending(f, self.step_count + self.overlap, work, recv, n, chunk, done)

    def _finish(self, pend: _Pending) -> None:
        W = self.world
        if pend.work is not None:
            pend.work.wait()
        self.link.wait_until(pend.done_at)
        if self.compression == "none":
            avg = pend.buf / W
        else:
            E = encoded_size(pend.chunk, self.compression, self.block)
            mine = torch.zeros(pend.chunk, dtype=torch.float32, device=pend.buf.device)
            for r in range(W):  # fp32 accumulation, in rank order (the same on every rank)
                mine += decode(pend.buf[r * E:(r + 1) * E], pend.chunk, self.compression, self.block)
            mine /= W
            enc = encode(mine, self.compression, self.block)
            done = self.link.charge(allgather_bytes(enc.numel(), W))
            if W > 1:
                parts = [torch.empty_like(enc) for _ in range(W)]
                dist.all_gather(parts, enc, group=self.group)
            else:
                parts = [enc]
            self.link.wait_until(done)
            avg = torch.cat([decode(p, pend.chunk, self.compression, self.block) for p in parts])[: pend.n]
        self._outer_update(pend.fragment, avg)

    def _outer_update(self, f: int, avg: torch.Tensor) -> None:
        idx = self.fragments[f]
        for g in self.global_params:
            g.grad = None
        off = 0
        for i in idx:
            g = self.global_params[i]
            g.grad = avg[off:off + g.numel()].view_as(g).to(g.device)
            off += g.numel()
        self.outer.step()  # parameters without .grad (other fragments) are skipped, momentum included
        with torch.no_grad():
            for i in idx:
                g, p = self.global_params[i], self.params[i]
                g.grad = None
                if self.overlap > 0 and self.mix > 0:
                    p.copy_((self.mix * p.float() + (1 - self.mix) * g).to(p.dtype))
                else:
                    p.copy_(g.to(p.dtype))
