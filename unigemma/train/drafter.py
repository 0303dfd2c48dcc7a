"""MTP drafter distillation: train a `gemma4_unified_assistant` (or, for a family target, a `gemma4_assistant`)
against a frozen target, as decoding uses it.

At decode time (spec/mtp-drafting.md §4, engine/speculative.py) the drafter drafts from position p, the position
of the last accepted token x_p:

    step 1:  [embed_target(x_p),      h_{p−1}]  → d_1 (guess for x_{p+1}), g_1      h = target post-norm hidden
    step j:  [embed_target(d_{j−1}),  g_{j−1}]  → d_j (guess for x_{p+j}), g_j      g = drafter post_projection
    every step: position id p; keys = the target's store-layer K/V at positions < p (full layers) and
    p−W−1 … p−1 (sliding layers: W+1 entries).

Training runs that for every p of a sequence at once (one query per p, masks per query), for k chained steps.
Only a chain whose earlier drafts were accepted matters, and then d_{j−1} = x_{p+j−1}, so the inputs of step j
are the sequence's own tokens (teacher forcing is exact here) and the chained g is the drafter's own output
(gradients flow through the chain). The target of step j is the target model's distribution at p+j−1 (loss
"kl") or its argmax ("ce"): acceptance is judged against the target, not against the data.

    target.run(ids) ─► H (B,T,H_t), store K/V, embed(ids)        (frozen, no grad)
    query i = p−1:  x = [E[i+j], g] ─► pre_projection ─► layers(q from x; K/V of the target, masked per query)
                    ─► norm ─► h ─┬─► drafter logits  vs  target logits at i+j
                                  └─► post_projection ─► g for step j+1

`measure_acceptance` runs greedy speculative decoding (drafts vs the target's greedy tokens) on held-out
prompts with the same K/V convention, and reports the acceptance rate; its output equals plain greedy decoding.

What this module does not do: serve the drafter (engine/speculative.py) or build vocabulary clusters for the
centroid head (an existing `token_ordering` is kept; a new drafter gets the identity ordering).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FULL, SLIDING, AssistantConfig
from ..model.attention import AttentionPlan
from .data import IGNORE, MediaIds, build_example, chat_template_for, model_inputs
from .loop import init_weights, load_weights, precision_dtype


def check_geometry(target_cfg, drafter_cfg: AssistantConfig) -> None:
    """The drafter reads the target's K/V: its head geometry must mirror the target's store layers."""
    t, d = target_cfg.text, drafter_cfg.text
    if drafter_cfg.backbone_hidden_size != t.hidden_size:
        raise ValueError(f"drafter backbone_hidden_size {drafter_cfg.backbone_hidden_size} != target hidden_size "
                         f"{t.hidden_size}")
    if d.vocab_size != t.vocab_size:
        raise ValueError(f"drafter vocab_size {d.vocab_size} != target vocab_size {t.vocab_size}")
    for i, lt in enumerate(d.layer_types):
        if lt not in t.layer_types:
            raise ValueError(f"drafter layer {i} is {lt} but the target has no such layer to read K/V from")
        s = t.store_layer(lt)
        if d.layer_head_dim[i] != t.layer_head_dim[s]:
            raise ValueError(f"drafter layer {i} ({lt}) has head_dim {d.layer_head_dim[i]}, the target's store "
                             f"layer {s} has {t.layer_head_dim[s]}; they must be equal")
        if d.num_attention_heads % t.layer_kv_heads[s]:
            raise ValueError(f"drafter num_attention_heads {d.num_attention_heads} is not a multiple of the "
                             f"target's {t.layer_kv_heads[s]} key/value heads on {lt} layers")


def query_masks(types: list[str], T: int, window: int, key_valid: torch.Tensor | None,
                device: torch.device) -> dict[str, torch.Tensor]:
    """(B or 1, 1, T−1, T) masks: query i (drafter position p = i+1) sees keys ≤ i; sliding: i−W … i."""
    q = torch.arange(T - 1, device=device)[:, None]
    k = torch.arange(T, device=device)[None, :]
    out = {}
    for t in types:
        vis = k <= q
        if t == SLIDING:
            vis = vis & (k >= q - window)
        vis = vis[None, None]
        if key_valid is not None:
            vis = vis & key_valid.bool()[:, None, None, :]
        # A padding query can be left with no visible key; its softmax would be NaN and 0·NaN would poison the
        # weight gradients even though the row is never trained. Such rows see every key instead.
        out[t] = vis | ~vis.any(dim=-1, keepdim=True)
    return out


def drafter_hidden(drafter: nn.Module, x: torch.Tensor, positions: torch.Tensor,
                   shared: dict[str, tuple[torch.Tensor, torch.Tensor]], masks: dict[str, torch.Tensor],
                   checkpointing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The drafter's forward for many queries at once, with per-query masks: (h (B,Q,H_a), g (B,Q,H_target)).

    Same modules and order as `Gemma4Assistant.forward` (which takes one query per row and per-row masks)."""
    x = drafter.pre_projection(x.to(drafter.pre_projection.weight.dtype))
    types = set(drafter.config.text.layer_types)
    cos_sin = {t: drafter.model.rotary_emb(positions, t, x.dtype) for t in types}
    plan = AttentionPlan(cos_sin, masks, shared=dict(shared))
    for layer in drafter.model.layers:
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(layer, x, plan, use_reentrant=False)
        else:
            x = layer(x, plan)
    h = drafter.model.norm(x)
    return h, drafter.post_projection(h)


def lab_ok(batch: dict, positions: str, media: tuple[int, ...]) -> torch.Tensor:
    """(B, T) bool: token t+1 is one the drafter should learn to draft."""
    ids, labels = batch["input_ids"], batch["labels"]
    if positions == "assistant":
        return labels != IGNORE
    ok = torch.zeros_like(ids, dtype=torch.bool)
    nxt = ids[:, 1:]
    is_text = ~torch.isin(nxt, torch.tensor(media, device=ids.device))
    ok[:, :-1] = batch["attention_mask"][:, 1:].bool() & is_text
    return ok


def chain_valid(ok: torch.Tensor, k: int) -> list[torch.Tensor]:
    """valid[j−1] (B, T−1): query i trains step j iff tokens i+1 … i+j+1 are all draftable (ok[i … i+j])."""
    B, T = ok.shape
    out = []
    cur = ok[:, :-1] & ok[:, 1:] if T > 1 else ok[:, :0]
    for j in range(1, k + 1):
        if j > 1:
            nxt = torch.zeros_like(cur)
            nxt[:, : T - j] = ok[:, j: T]
            cur = cur & nxt
        out.append(cur.clone())
    return out


def _shift(x: torch.Tensor, j: int, Q: int) -> torch.Tensor:
    """x[:, i + j] for i in 0..Q−1 (zeros past the end)."""
    out = x.new_zeros((x.shape[0], Q) + tuple(x.shape[2:]))
    n = min(Q, x.shape[1] - j)
    if n > 0:
        out[:, :n] = x[:, j: j + n]
    return out


class DrafterLoss(nn.Module):
    """(Σ over chain steps j and valid queries of w_j · loss, Σ w_j · #valid) for one batch."""

    def __init__(self, target: nn.Module, drafter: nn.Module, draft_steps: int = 3, loss: str = "kl",
                 positions: str = "assistant", media: tuple[int, ...] = (), step_weight_decay: float = 1.0,
                 checkpointing: bool = False, chunk: int = 2048):
        super().__init__()
        self.target = target
        self.drafter = drafter
        self.k = draft_steps
        self.kind = loss
        self.positions = positions
        self.media = media
        self.weights = [step_weight_decay ** j for j in range(draft_steps)]
        self.checkpointing = checkpointing
        self.chunk = chunk
        self.types = sorted(set(drafter.config.text.layer_types))
        me = drafter.masked_embedding
        if me is not None:  # cluster of every token, for the centroid head's own loss
            inv = torch.empty_like(me.token_ordering)
            inv[me.token_ordering.long()] = torch.arange(me.token_ordering.numel(), device=inv.device)
            self.register_buffer("cluster_of", inv // me.per_cluster, persistent=False)
        else:
            self.cluster_of = None

    def count(self, batch: dict) -> float:
        valid = chain_valid(lab_ok(batch, self.positions, self.media), self.k)
        return float(sum(w * int(v.sum()) for w, v in zip(self.weights, valid)))

    def _piece(self, h: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        """Σ loss for rows h (drafter) against the target's hidden rows th."""
        with torch.no_grad():
            tl = self.target.logits_from_hidden(th).float()
        dl = self.drafter.lm_head(h).float()  # dense over the vocabulary (the centroid head selects from these)
        if self.kind == "kl":
            tp = F.log_softmax(tl, -1)
            loss = F.kl_div(F.log_softmax(dl, -1), tp, log_target=True, reduction="sum")
        else:
            loss = F.cross_entropy(dl, tl.argmax(-1), reduction="sum")
        if self.cluster_of is not None:
            me = self.drafter.masked_embedding
            loss = loss + F.cross_entropy(me.centroids(h).float(), self.cluster_of[tl.argmax(-1)], reduction="sum")
        return loss

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        ids = batch["input_ids"]
        B, T = ids.shape
        valid = chain_valid(lab_ok(batch, self.positions, self.media), self.k)
        total = torch.zeros((), dtype=torch.float32, device=ids.device)
        count = sum(w * v.sum() for w, v in zip(self.weights, valid))
        if T < 2 or not any(bool(v.any()) for v in valid):
            # keep every trainable parameter in the graph (DDP expects a gradient for each)
            return total + sum(p.sum() * 0 for p in self.drafter.parameters() if p.requires_grad), count
        Q = T - 1
        with torch.no_grad():
            out = self.target.run(ids, compute_logits=False, **model_inputs(batch))
            H = out.hidden
            shared = {t: out.plan.shared[t] for t in self.types}
            E = self.target.language_model.embed(ids)
        masks = query_masks(self.types, T, self.drafter.config.text.sliding_window, batch.get("attention_mask"),
                            ids.device)
        pos = torch.arange(1, T, device=ids.device)[None].expand(B, Q)
        g = H[:, :Q]
        for j in range(1, self.k + 1):
            v = valid[j - 1]
            x = torch.cat([_shift(E, j, Q).to(g.dtype), g], dim=-1)
            h, g = drafter_hidden(self.drafter, x, pos, shared, masks, self.checkpointing)
            if not bool(v.any()):
                break  # later steps need these positions too
            hr, tr = h[v], _shift(H, j, Q)[v]
            step = torch.zeros((), dtype=torch.float32, device=ids.device)
            for a in range(0, hr.shape[0], self.chunk):
                hc, tc = hr[a:a + self.chunk], tr[a:a + self.chunk]
                if torch.is_grad_enabled():
                    step = step + torch.utils.checkpoint.checkpoint(self._piece, hc, tc, use_reentrant=False)
                else:
                    step = step + self._piece(hc, tc)
            total = total + self.weights[j - 1] * step
        return total, count


# --- acceptance -----------------------------------------------------------------------------------------------

def _draft_masks(types, p: int, window: int, device) -> dict[str, torch.Tensor | None]:
    out: dict[str, torch.Tensor | None] = {}
    for t in types:
        if t == FULL:
            out[t] = None
        else:
            m = torch.zeros(1, p, dtype=torch.bool, device=device)
            m[:, max(0, p - window - 1):] = True
            out[t] = m
    return out


@torch.no_grad()
def greedy_generate(target: nn.Module, prompt: list[int], max_new_tokens: int,
                    eos_ids: tuple[int, ...] = ()) -> list[int]:
    """Plain greedy decoding without a cache (the reference the speculative output must equal)."""
    dev = next(target.parameters()).device
    ids = list(prompt)
    new: list[int] = []
    while len(new) < max_new_tokens:
        tok = int(target(torch.tensor([ids], device=dev), logits_to_keep=1)[0, -1].argmax())
        ids.append(tok)
        new.append(tok)
        if tok in eos_ids:
            break
    return new


@torch.no_grad()
def measure_acceptance(target: nn.Module, drafter: nn.Module, prompts: list[list[int]], k: int = 3,
                       max_new_tokens: int = 32, eos_ids: tuple[int, ...] = ()) -> dict:
    """Greedy speculative decoding with the drafter (spec/mtp-drafting.md §4, clean K/V as in the engine).

    Each round: the drafter proposes up to k tokens from position p = len(ids)−1; the target scores
    [ids, drafts] in one forward; the leading drafts equal to the target's argmax are accepted, plus the target's
    own next token. Returns acceptance_rate (accepted / drafted), tokens_per_round (tokens per target forward)
    and the generated token lists (equal to `greedy_generate`'s).
    """
    dev = next(target.parameters()).device
    dcfg = drafter.config
    types = sorted(set(dcfg.text.layer_types))
    W = dcfg.text.sliding_window
    embed = target.language_model.embed
    drafted = accepted = rounds = produced = 0
    outputs = []
    for prompt in prompts:
        ids = list(prompt)
        out = target.run(torch.tensor([ids], device=dev), logits_to_keep=1)
        ids.append(int(out.logits[0, -1].argmax()))
        new = [ids[-1]]
        rounds += 1
        while len(new) < max_new_tokens and new[-1] not in eos_ids:
            L = len(ids)
            p = L - 1
            kk = min(k, max_new_tokens - len(new) - 1)
            drafts: list[int] = []
            if kk > 0:
                shared = {t: (out.plan.shared[t][0][:, :, :p], out.plan.shared[t][1][:, :, :p]) for t in types}
                masks = _draft_masks(types, p, W, dev)
                g = out.hidden[:, p - 1: p]
                tok = torch.tensor([[ids[-1]]], device=dev)
                pos = torch.tensor([[p]], device=dev)
                for _ in range(kk):
                    x = torch.cat([embed(tok).to(g.dtype), g], dim=-1)
                    logits, g = drafter(x, pos, shared, masks)
                    tok = logits[:, -1:].argmax(-1)
                    drafts.append(int(tok))
            out = target.run(torch.tensor([ids + drafts], device=dev))
            y = out.logits[0, L - 1: L + len(drafts)].argmax(-1).tolist()
            n = 0
            while n < len(drafts) and drafts[n] == y[n]:
                n += 1
            acc = drafts[:n] + [y[n]]
            for i, tkn in enumerate(acc):  # stop at EOS like plain decoding would
                if tkn in eos_ids:
                    acc = acc[: i + 1]
                    break
            acc = acc[: max_new_tokens - len(new)]
            drafted += len(drafts)
            accepted += n
            rounds += 1
            ids += acc
            new += acc
        produced += len(new)
        outputs.append(new)
    return {"acceptance_rate": accepted / max(drafted, 1), "tokens_per_round": produced / max(rounds, 1),
            "drafted": drafted, "accepted": accepted, "rounds": rounds, "k": k, "outputs": outputs}


def acceptance_prompts(dataset, n: int) -> list[list[int]]:
    """Up to n generation prompts from a ChatDataset: each text-only conversation cut where its first trained
    (assistant) token starts, i.e. the rendered prompt plus the generation prefill."""
    prompts = []
    for item in dataset.items:
        if len(prompts) >= n:
            break
        if item.media:
            continue
        ex = build_example(item, dataset.ids, dataset.max_seq_len)
        trained = (ex["labels"] != IGNORE).nonzero()[0]
        if len(trained):
            prompts.append(ex["input_ids"][: int(trained[0]) + 1].tolist())
    return prompts


# --- the task ------------------------------------------------------------------------------------------------

class DrafterTask:
    """Trains the drafter (all its parameters); the target is loaded frozen beside it."""

    name = "drafter"
    keeps_trainable_in_state = False

    def __init__(self, cfg, device: torch.device):
        from ..checkpoint import build_model
        from ..config import read_config_json
        from ..inputs.tokenizer import Tokenizer
        from ..model.assistant import Gemma4Assistant

        dc = cfg.drafter
        self.cfg = cfg
        dtype = precision_dtype(cfg.model.precision)
        target_dtype = torch.float32 if cfg.model.precision == "fp32" else torch.bfloat16
        self.target, self.target_config = build_model(dc.target, dtype=target_dtype, device=device)
        self.target.requires_grad_(False)
        init = Path(dc.init)
        if init.is_dir() and any(init.glob("model*.safetensors")):
            self.drafter, self.drafter_config = build_model(init, dtype=dtype, device=device)
            self.config_dict = dict(self.drafter_config.raw)
        else:
            self.config_dict = read_config_json(init)
            self.drafter_config = AssistantConfig.from_dict(self.config_dict, str(init))
            torch.manual_seed(cfg.seed)
            with torch.device(device):
                self.drafter = Gemma4Assistant(self.drafter_config)
            init_weights(self.drafter, cfg.model.init_std)
            if self.drafter.masked_embedding is not None:
                me = self.drafter.masked_embedding
                me.token_ordering.copy_(torch.arange(me.token_ordering.numel(), device=device))
            self.drafter.to(dtype)
        if not isinstance(self.drafter_config, AssistantConfig):
            raise ValueError(f"drafter.init {dc.init} is a {self.drafter_config.model_type} model, not an MTP "
                             "drafter (gemma4_unified_assistant, gemma4_assistant)")
        check_geometry(self.target_config, self.drafter_config)
        self.config_dict["dtype"] = "bfloat16" if dtype == torch.bfloat16 else "float32"
        for p in self.drafter.parameters():
            p.requires_grad_(True)
        self.drafter.train()
        self.tokenizer_dir = cfg.data.tokenizer or dc.target
        self.tokenizer = Tokenizer.from_dir(self.tokenizer_dir)
        self.template = chat_template_for(self.tokenizer)
        self.media_ids = MediaIds.from_model(self.target_config, self.tokenizer)
        self.pad_id = self.target_config.text.pad_token_id
        self.module = self.drafter
        self.loss_module = DrafterLoss(self.target, self.drafter, dc.draft_steps, dc.loss, dc.positions,
                                       self.media_ids.media_ids, dc.step_weight_decay,
                                       cfg.model.gradient_checkpointing)
        self.initial: dict = {}

    def count(self, batch: dict) -> float:
        return self.loss_module.count(batch)

    def save(self, path: Path, final: bool = False) -> None:
        from ..checkpoint import save_model

        save_model(self.drafter, path, self.config_dict, max_shard_bytes=self.cfg.checkpoint.max_shard_bytes)
        # The reference reads the draft count from the drafter's generation config (and fails without it).
        gen = {"num_assistant_tokens": self.cfg.drafter.draft_steps, "num_assistant_tokens_schedule": "constant"}
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")

    def restore(self, path: Path) -> None:
        load_weights(self.drafter, path)

    def _acceptance(self, eval_data) -> dict | None:
        dc = self.cfg.drafter
        if eval_data is None or dc.acceptance_prompts == 0:
            return None
        prompts = acceptance_prompts(eval_data, dc.acceptance_prompts)
        if not prompts:
            return None
        eos = tuple(self.target_config.text.eos_token_id) + (self.tokenizer.special_ids.get("eot_token", -1),)
        was = self.drafter.training
        self.drafter.eval()
        r = measure_acceptance(self.target, self.drafter, prompts, dc.draft_steps, dc.acceptance_new_tokens, eos)
        self.drafter.train(was)
        r.pop("outputs")
        return r

    def on_start(self, eval_data, resumed: bool) -> None:
        if not resumed:
            r = self._acceptance(eval_data)
            if r is not None:
                self.initial = {"acceptance_rate_initial": r["acceptance_rate"]}

    def report(self, eval_data) -> dict:
        r = self._acceptance(eval_data)
        return {} if r is None else {**self.initial, **r}
