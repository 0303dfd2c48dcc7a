"""LoRA: low-rank adapters on the model's nn.Linear layers, and merging them back into plain weights.

    LoRALinear(base):  y = base(x) + (dropout(x) · Aᵀ · Bᵀ) · alpha / rank    A (r, in) random, B (out, r) zeros
    merge:             W' = W + (alpha / rank) · B · A     (computed in float32, stored in W's dtype)

Why our own ~150 lines rather than peft: every projection in unigemma is a bias-free `nn.Linear` with the
checkpoint's name (`q_proj`, `gate_proj`, ...), so wrapping is trivial, and what we need beyond the forward is
(1) merging into exactly the state-dict names `unigemma.load` reads and (2) adapter tensors we can save with
safetensors for exact resume. peft would add a dependency (with its own transformers-oriented conventions,
`base_model.model.` prefixes) to do the same. Nothing here is Gemma-specific.

Only the adapters are trainable after `apply_lora`; every other parameter is frozen. The tied LM head
(`lm_head.weight` ≡ the embedding) is never wrapped.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable rank-r update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be > 0, got {rank}")
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        w = base.weight
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        # Adapters live in float32 even under bf16 weights: they are small and their updates are tiny.
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # B = 0: the wrapped layer starts as the base
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.t()
        return y + ((a @ self.lora_B.t()) * self.scale).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """(out, in) float32: the update this adapter adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scale

    def merged_weight(self) -> torch.Tensor:
        w = self.base.weight
        return (w.float() + self.delta()).to(w.dtype)


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               targets: list[str] | tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"),
               under: str = "model.language_model") -> list[str]:
    """Freeze `model` and wrap every nn.Linear under `under` whose own name is in `targets`.

    Returns the wrapped module names; raises ValueError if none matched (a typo in `targets`).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    root = model.get_submodule(under) if under else model
    wrapped = []
    for name, mod in list(root.named_modules()):
        leaf = name.rpartition(".")[2]
        if leaf in targets and isinstance(mod, nn.Linear):
            parent = root.get_submodule(name.rpartition(".")[0]) if "." in name else root
            setattr(parent, leaf, LoRALinear(mod, rank, alpha, dropout))
            wrapped.append(f"{under}.{name}" if under else name)
    if not wrapped:
        raise ValueError(f"lora.targets {list(targets)} matched no nn.Linear under {under!r} (layer names are "
                         "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
    return wrapped


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (`...q_proj.lora_A`, `...q_proj.lora_B`)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every adapter folded into its base weight, under the plain layer names
    (`...q_proj.weight`): what `save_model` writes and `unigemma.load` reads. The model is not modified."""
    wrappers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        mod, _, attr = k.rpartition(".")
        if attr in ("lora_A", "lora_B"):
            continue
        if mod.endswith(".base") and mod[: -len(".base")] in wrappers:
            owner = mod[: -len(".base")]
            if attr == "weight":
                with torch.no_grad():
                    v = wrappers[owner].merged_weight()
            out[f"{owner}.{attr}"] = v
        else:
            out[k] = v
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding the merged weight (in place); returns model."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoRALinear):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            base = mod.base
            with torch.no_grad():
                base.weight.copy_(mod.merged_weight())
            setattr(parent, leaf, base)
    return model
