"""LoRA for training: wrapping a model's linear layers (float, or int8 / int4 for QLoRA), optional modules trained
in full (`modules_to_save`), and the merged state dict a full checkpoint holds.

    LoRALinear(base):  y = base(x) + (dropout(x) · Aᵀ · Bᵀ) · alpha / rank    A (r, in) random, B (out, r) zeros
    merge:             W' = W + (alpha / rank) · B · A     (computed in float32, stored in W's dtype)

The layer itself and the adapter files (PEFT's layout, so PEFT and `unigemma.load(base, adapter=DIR)` read what
training writes) are in `unigemma.adapters`; our own small implementation rather than a peft dependency, since
every projection is a bias-free linear layer under the checkpoint's own name. Nothing here is Gemma-specific.

Only the adapters (and modules_to_save) are trainable after `apply_lora`; every other parameter is frozen. The
tied LM head (`lm_head.weight` ≡ the embedding) is never wrapped.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import LoRALinear, merge_adapters, save_adapter  # noqa: F401  (re-exported)


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
        if leaf in targets and (isinstance(mod, nn.Linear) or _is_quant_linear(mod)):
            parent = root.get_submodule(name.rpartition(".")[0]) if "." in name else root
            setattr(parent, leaf, LoRALinear(mod, rank, alpha, dropout))
            wrapped.append(f"{under}.{name}" if under else name)
    if not wrapped:
        raise ValueError(f"lora.targets {list(targets)} matched no nn.Linear under {under!r} (layer names are "
                         "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
    return wrapped


def _is_quant_linear(mod: nn.Module) -> bool:
    from ..quant import QuantLinear

    return isinstance(mod, QuantLinear)


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
    return merge_adapters(model)
