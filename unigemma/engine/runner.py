"""The model runner: one KV cache, prefill chunks into a slot, batched decode / verification steps.

    scheduler ──(slot, prompt chunk)──► prefill_chunk ─► model.run(B=1, slots=[s], logits of the last token)
              ──(tokens, positions)───► decode ────────► forward over rows 0..B−1 of the cache (zero-copy views)
                                          │ CUDA: replay a captured graph for (batch bucket, T, kv_len bucket)
                                          ▼
                                   logits (B, T, V), post-norm hidden (B, T, H)

The runner owns the cache (`model.make_cache`) and knows tensors only: no requests, no sampling, no stop rules.
Rows of a decode step are cache slots 0..B−1, so the scheduler keeps its running sequences compacted there; a
row it has nothing for carries position −1 (a padding token: neither attended nor cached).

Chunk boundaries never split a bidirectional vision block (a run of image / video placeholders): the block's
first tokens must see its last ones, which only happens when they are in the same forward.

CUDA path: q/k/v and gate/up weights are fused into one product each and the element-wise pieces between the
products run compiled (model/fusion.py; `fuse=False` keeps the eager model). Decode steps have static shapes once
the batch is rounded up to a bucket and the attention length of the full layers to a power of two, so each (batch
bucket, T, kv bucket) is captured once as a CUDA graph and replayed: no Python or kernel-launch overhead per layer.
Capture runs on padding positions, which touch only the cache's scratch entries, so capturing never disturbs live
sequences. The CPU path runs eagerly, one-token products through MKL (column-major weights), products of several
tokens (verification, batches, prefill) through oneDNN copies of the large weights packed once (PackedLinear),
which keep a verify step of 1 + k tokens close to the cost of a plain step.
"""

from __future__ import annotations

import torch

from ..model import fusion
from ..model.cache import KVCache
from ..model.layers import softcap


def _is_unified(model) -> bool:
    # The real model exposes its pieces, which lets decode skip work that only prompts need (media, vision
    # blocks); scripted test models only offer `run`.
    return hasattr(model, "language_model") and hasattr(model, "logits_from_hidden")


class ModelRunner:
    """Forward passes over a cache of `max_slots` sequences of up to `max_model_len` tokens."""

    def __init__(self, model, max_slots: int, max_model_len: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, spare: int = 32, cuda_graphs: bool | None = None,
                 cpu_column_major: bool = True, cpu_packed: bool | None = None, fuse: bool | None = None):
        if max_slots < 1:
            raise ValueError(f"max_slots={max_slots}: expected an integer >= 1")
        if max_model_len < 2:
            raise ValueError(f"max_model_len={max_model_len}: expected an integer >= 2")
        self.model = model
        param = next(iter(model.parameters()))
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = dtype or param.dtype
        self.max_slots = max_slots
        self.max_len = max_model_len
        self.cache: KVCache = model.make_cache(max_slots, max_model_len, dtype=self.dtype, device=self.device,
                                               spare=spare)
        cfg = model.config
        self.vocab_size = cfg.text.vocab_size
        self.vision_ids = {cfg.image_token_id, cfg.video_token_id}
        self.media_ids = {cfg.image_token_id, cfg.video_token_id, cfg.audio_token_id}
        self.direct = _is_unified(model)
        if self.direct:
            self._mm_ids = sorted(self.media_ids)
            self._pad_id = cfg.text.pad_token_id
        # CPU decode is a chain of matrix-vector products, and on x86 BLAS streams a weight stored (in, out)
        # ("column-major" for nn.Linear's (out, in) shape) about 1.5x faster than the same weight stored (out, in)
        # (measured: 15-17 vs 10-11 GB/s over the 50m model's matrices, 19 vs 10 GB/s for a 32768 x 512 LM
        # head). Re-laying the Linear weights out in place keeps their values, shapes and memory; products
        # differ only in summation order (~1e-7 relative). The tied LM head then also yields a contiguous
        # (hidden, vocab) view for the logits at no cost.
        self._head_t = None
        if self.direct and self.device.type == "cpu" and cpu_column_major:
            relayout_linear_weights(model)
            w = getattr(model.lm_head, "weight", None)  # a quantized head has its own kernels: leave it be
            if isinstance(model.lm_head, torch.nn.Linear) and w is not None and w.t().is_contiguous():
                self._head_t = w.detach().t()
                self._softcap = model.config.text.final_logit_softcapping
        # Verification steps (T = 1 + k tokens) are small-M matrix products, which MKL's sgemm runs 2-3x slower
        # than the matrix-vector product of a plain step (it repacks the whole weight on every call): a verify
        # step of 5 tokens cost 1.6 plain steps on the demo model. A oneDNN copy of each large weight, packed once
        # for small batches, costs about one matrix-vector product for 2 to 8 rows (PackedLinear); one-row
        # products (plain decode) keep MKL. The copies cost memory: by default only weights of at least
        # PACKED_AUTO_MIN elements, and only when all copies together take at most PACKED_AUTO_BYTES.
        self.packed = 0
        if self.direct and self.device.type == "cpu" and cpu_packed is not False:
            auto = cpu_packed is None  # True: every float32 Linear, whatever the size and memory
            self.packed = pack_linear_weights(model, max_bytes=PACKED_AUTO_BYTES if auto else None,
                                              min_size=PACKED_AUTO_MIN if auto else 0)
            if self.packed and isinstance(model.lm_head, PackedLinear):
                self._head_t = None  # the packed head is faster than the column-major product
        # GPU decode is bound by weight reads plus one launch gap per kernel: fused q/k/v and gate/up products and
        # compiled element-wise pieces (model/fusion.py) take a layer from ~48 kernels to ~15. Default: on CUDA.
        self.fused = 0
        self.compiled = False
        if self.direct and (self.device.type == "cuda" if fuse is None else fuse):
            self.fused = fusion.fuse_projections(model)
            fusion.configure()
            self.compiled = True
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if use_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, the runner is on {self.device}")
        self.graphs = _GraphCache(self) if use_graphs and self.direct else None

    # --- prefill -----------------------------------------------------------------------------------------
    def chunk_end(self, ids: list[int], start: int, chunk: int) -> int:
        """End of the prefill chunk that starts at `start`: start + chunk, pushed past any vision block it
        would cut in two."""
        end = min(len(ids), start + max(1, chunk))
        while end < len(ids) and ids[end] in self.vision_ids and ids[end - 1] == ids[end]:
            end += 1
        return end

    def prefill_chunk(self, slot: int, ids: list[int], start: int, end: int,
                      embeds: torch.Tensor | None = None, need_logits: bool = True):
        """Run prompt tokens [start, end) of one sequence into cache slot `slot`; returns the model output with
        logits of the last token only (or none). `embeds` (T_prompt, H): the whole prompt's embeddings with
        soft tokens already in place (media prompts), sliced here."""
        x = torch.tensor([ids[start:end]], dtype=torch.long, device=self.device)
        pos = torch.arange(start, end, device=self.device)[None]
        kw = {}
        if embeds is not None:
            kw["inputs_embeds"] = embeds[start:end][None]
        with fusion.active(self.compiled):
                return self.model.run(x, position_ids=pos, cache=self.cache,
                                  slots=torch.tensor([slot], device=self.device), kv_len=end, logits_to_keep=1,
                                  compute_logits=need_logits, **kw)

    # --- decode ------------------------------------------------------------------------------------------
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int):
        """One step for rows 0..B−1: tokens / positions (B, T) (position −1 = padding). kv_len: 1 + the largest
        position (host-known, so no sync). Returns (logits (B, T, V), hidden (B, T, H))."""
        if kv_len > self.max_len:
            raise ValueError(f"position {kv_len - 1} is beyond the context of {self.max_len} tokens")
        if self.graphs is not None:
            return self.graphs.run(tokens, positions, kv_len)
        return self.forward(tokens, positions, kv_len)

    def warm_up(self, rows: int, steps: tuple[int, ...], kv_len: int) -> None:
        """Capture the CUDA graphs for `rows` rows, each T in `steps`, attention length kv_len, ahead of time
        (capturing costs a few forwards; a server does it before taking requests). No-op without graphs."""
        if self.graphs is not None:
            for T in steps:
                self.graphs.prepare(rows, T, kv_len)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int):
        with fusion.active(self.compiled):
            return self._forward(tokens, positions, kv_len)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int):
        if not self.direct:
            out = self.model.run(tokens, position_ids=positions, cache=self.cache, kv_len=kv_len)
            return out.logits, out.hidden
        # Decode tokens are generated text: no media to splice and no vision blocks (a generated placeholder id
        # is causal, exactly as one-token-at-a-time decoding treats it), so the language model runs directly.
        m = self.model
        is_mm = tokens == self._mm_ids[0]
        for tid in self._mm_ids[1:]:
            is_mm = is_mm | (tokens == tid)
        ids = torch.where(is_mm, self._pad_id, tokens)
        x = m.language_model.embed(ids)
        hidden = m.language_model(x, positions, cache=self.cache, kv_len=kv_len, input_ids=ids)
        if self._head_t is None:
            return m.logits_from_hidden(hidden), hidden
        return softcap(hidden @ self._head_t, self._softcap), hidden


def relayout_linear_weights(model: torch.nn.Module) -> int:
    """Store every nn.Linear weight of `model` column-major (a transposed view of a contiguous (in, out)
    tensor), in place; returns how many were changed. Values and shapes are unchanged; tied weights (the
    LM head and the token embedding) stay tied because the Parameter object is kept."""
    n = 0
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight
                if w.dim() == 2 and w.is_contiguous() and w.shape[0] > 1 and w.shape[1] > 1:
                    w.data = w.data.t().contiguous().t()
                    n += 1
    return n


PACKED_AUTO_BYTES = 512 * 2 ** 20  # packed copies added by default (cpu_packed=None): at most this many bytes
PACKED_AUTO_MIN = 2 ** 17  # ... and only of weights with at least this many elements (see PackedLinear)
PACK_ROWS = 8  # oneDNN picks the packed layout for this many rows; measured best for 1..8 (decode, verify k ≤ 7)


class PackedLinear(torch.nn.Linear):
    """An nn.Linear that also holds a oneDNN-packed copy of its weight, used for inference on the CPU.

        x (…, in) ──► 2+ rows, no grad, float32 on the CPU ──► mkldnn linear over the packed copy
                  └─► one row (plain decode: MKL's matrix-vector product is faster there), training, another
                      dtype or device ─────────────────────► F.linear over the weight itself

    Measured on a 2-core AMD EPYC, 1 thread, 1024 x 256 weight: 1 row 27 µs (MKL gemv) / 31 µs (packed); 5 rows
    91 µs (MKL sgemm) / 37 µs (packed). oneDNN adds ~9 µs per call, so small weights (256 x 256: 15 vs 13 µs at 5
    rows) gain little and are left unpacked by default (PACKED_AUTO_MIN).
    The weight Parameter is kept as it is (state dicts, tied embeddings, training, quantization see a plain
    nn.Linear). The copy is made again when the weight changed since packing (its version counter, storage or
    strides) and is left out of copies and pickles of the module (rebuilt on first use).
    """

    _packed: torch.Tensor | None = None
    _packed_key: tuple = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.numel() > x.shape[-1] and x.dtype == torch.float32 and w.dtype == torch.float32 \
                and x.device.type == "cpu" and w.device.type == "cpu" and not torch.is_grad_enabled():
            if self._packed is None or _weight_key(w) != self._packed_key:
                self.repack()
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return torch.nn.functional.linear(x, w, self.bias)

    def repack(self) -> None:
        with torch.no_grad():
            w = self.weight.detach()
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_ROWS)
            # The key of the Parameter itself, as forward computes it: a detached view made under inference mode
            # is an inference tensor with no version counter, whose key never matched (a repack every call).
            self._packed_key = _weight_key(self.weight)

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop("_packed", None)  # an opaque oneDNN tensor: neither deep-copyable nor picklable
        state.pop("_packed_key", None)
        return state


def _weight_key(w: torch.Tensor) -> tuple:
    try:
        version = w._version
    except RuntimeError:  # an inference tensor has no version counter
        version = -1
    return w.data_ptr(), version, w.stride()


_PACKING_OK: bool | None = None


def packing_available() -> bool:
    """True when this torch build packs and runs oneDNN linear weights and gets F.linear's results (probed once)."""
    global _PACKING_OK
    if _PACKING_OK is None:
        try:
            g = torch.Generator().manual_seed(0)
            w = torch.randn(24, 16, generator=g)
            x = torch.randn(3, 16, generator=g)
            with torch.no_grad():
                p = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
                y = torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
            _PACKING_OK = torch.backends.mkldnn.is_available() and torch.allclose(y, x @ w.t(), atol=1e-5)
        except Exception:  # no oneDNN in this build (or no such ops): plain nn.Linear
            _PACKING_OK = False
    return _PACKING_OK


def pack_linear_weights(model: torch.nn.Module, max_bytes: int | None = None, min_size: int = 0) -> int:
    """Give every float32 nn.Linear of `model` whose weight has at least `min_size` elements a oneDNN-packed copy
    of its weight (see PackedLinear), in place; returns how many were packed (0 when packing is unavailable or the
    copies would exceed `max_bytes`). Already packed layers are repacked; the module objects and their Parameters
    stay the same."""
    if not packing_available():
        return 0
    mods = [m for m in model.modules()
            if isinstance(m, torch.nn.Linear) and type(m) in (torch.nn.Linear, PackedLinear)
            and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu" and m.weight.dim() == 2
            and m.weight.numel() >= min_size]
    seen, total = set(), 0
    for m in mods:
        if m.weight.data_ptr() not in seen:
            seen.add(m.weight.data_ptr())
            total += m.weight.numel() * m.weight.element_size()
    if not mods or (max_bytes is not None and total > max_bytes):
        return 0
    warmed = set()
    for m in mods:
        m.__class__ = PackedLinear
        m.repack()
        shape = tuple(m.weight.shape)
        if shape not in warmed:
            # oneDNN builds (JIT-compiles) a kernel the first time it sees a shape: ~2 ms per verify length on the
            # demo model, which would land in the first verify step of each length (and in the draft-length
            # controller's cost estimates). Build the 2..PACK_ROWS-row kernels now.
            warmed.add(shape)
            with torch.no_grad():
                for rows in range(2, PACK_ROWS + 1):
                    m(torch.zeros(1, rows, shape[1], dtype=m.weight.dtype))
    return len(mods)


def _bucket(n: int, cap: int, floor: int = 1) -> int:
    b = floor
    while b < n:
        b *= 2
    return min(b, cap) if n <= cap else n


class _GraphCache:
    """CUDA graphs of the decode step, captured lazily per (batch bucket, T, kv_len bucket)."""

    KV_FLOOR = 256

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int, int], tuple] = {}

    def _capture(self, B: int, T: int, kv: int):
        r = self.runner
        tok = torch.zeros(B, T, dtype=torch.long, device=r.device)
        pos = torch.full((B, T), -1, dtype=torch.long, device=r.device)  # padding: writes land in scratch slots
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lazy tables (rope, cuBLAS handles) are created outside the capture
                r.forward(tok, pos, kv)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits, hidden = r.forward(tok, pos, kv)
        return graph, tok, pos, logits, hidden

    def key(self, B: int, T: int, kv_len: int) -> tuple[int, int, int]:
        r = self.runner
        return _bucket(B, r.max_slots), T, _bucket(kv_len, r.max_len, self.KV_FLOOR)

    def prepare(self, B: int, T: int, kv_len: int) -> None:
        key = self.key(B, T, kv_len)
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int):
        B, T = tokens.shape
        key = self.key(B, T, kv_len)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(*key)
        graph, tok, pos, logits, hidden = entry
        tok[:B].copy_(tokens)
        pos[:B].copy_(positions)
        if key[0] > B:
            pos[B:].fill_(-1)
        graph.replay()
        return logits[:B], hidden[:B]
