"""LoRA adapters: the wrapper layer, and adapter folders in PEFT's layout (write, read, apply, merge).

    LoRALinear(base):  y = base(x) + (dropout(x) · Aᵀ · Bᵀ) · scale      A (r, in), B (out, r), scale = alpha / r
    merged weight:     W' = W + scale · B · A     (float32 sum, stored in W's dtype)

An adapter folder is what PEFT writes and reads (`PeftModel.from_pretrained(reference_model, DIR)`):

    adapter_config.json          {"peft_type": "LORA", "r", "lora_alpha", "target_modules", "modules_to_save", ...}
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight (r, in)   .lora_B.weight (out, r)
                                 base_model.model.<module>.weight                  (a module trained in full)

Module paths are the checkpoint's own (`model.language_model.layers.0.self_attn.q_proj`), which are the
reference model's, so the same file serves both. `apply_adapter` puts an adapter onto a loaded model: merged
into float weights (no cost at inference), or kept as a side branch on int8 / int4 layers (which cannot hold the
sum). This module knows nothing of training; `unigemma.train` builds on it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class LoRALinear(nn.Module):
    """A frozen linear layer (nn.Linear, or an int8 / int4 QuantLinear: QLoRA) plus a trainable rank-r update."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, scale: float | None = None):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be > 0, got {rank}")
        self.base = base
        self.rank = rank
        self.scale = alpha / rank if scale is None else scale
        for p in base.parameters():
            p.requires_grad_(False)
        dev = next(iter([*base.parameters(), *base.buffers()])).device
        # Adapters live in float32 even under bf16 / quantized weights: they are small and their updates are tiny.
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=torch.float32))
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
        if not isinstance(self.base, nn.Linear):
            raise ValueError("an adapter on an int8 / int4 layer cannot be merged into it; merge onto the float "
                             "checkpoint (unigemma train export --merge --base FLOAT_DIR)")
        w = self.base.weight
        return (w.float() + self.delta()).to(w.dtype)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def adapters(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear over an nn.Linear by that nn.Linear holding the merged weight (in place)."""
    for name in adapters(model):
        merge_adapters_one(model, name)
    return model


# --- PEFT's files ---------------------------------------------------------------------------------------------

def peft_tensors(model: nn.Module, modules_to_save: list[str] | tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names: LoRA pairs, and the full weights of `modules_to_save` (module
    paths)."""
    out = {}
    for name, mod in adapters(model).items():
        out[f"{PREFIX}{name}.lora_A.weight"] = mod.lora_A.detach().float().contiguous().cpu()
        out[f"{PREFIX}{name}.lora_B.weight"] = mod.lora_B.detach().float().contiguous().cpu()
    for name in modules_to_save:
        for k, v in model.get_submodule(name).state_dict().items():
            out[f"{PREFIX}{name}.{k}"] = v.detach().contiguous().cpu()
        if _tied_embedding(model, name):  # PEFT keeps a tied head by loading it too (ensure_weight_tying)
            out[f"{PREFIX}lm_head.weight"] = model.lm_head.weight.detach().cpu().clone()
    return out


def save_adapter(model: nn.Module, path: str | Path, *, rank: int, alpha: float, dropout: float = 0.0,
                 base: str | None = None, modules_to_save: list[str] | tuple[str, ...] = ()) -> Path:
    """Write adapter_config.json + adapter_model.safetensors for the LoRA layers of `model`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    targets = sorted(adapters(model))
    if not targets:
        raise ValueError("the model has no LoRA layers: nothing to save as an adapter")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none", "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        # full module paths: PEFT matches a name that equals (or ends with) an entry, so these pick exactly the
        # layers trained here and nothing else with the same leaf name
        "target_modules": targets, "modules_to_save": list(modules_to_save) or None,
        "rank_pattern": {}, "alpha_pattern": {},
        # a trained embedding that the LM head shares: PEFT must keep the two tied, as this model does
        "ensure_weight_tying": any(_tied_embedding(model, n) for n in modules_to_save),
    }
    save_file(peft_tensors(model, modules_to_save), str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def _tied_embedding(model: nn.Module, name: str) -> bool:
    head = getattr(model, "lm_head", None)
    own = getattr(model.get_submodule(name), "weight", None)
    return head is not None and own is not None and head.weight is own


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_adapter(path: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(adapter_config, {module: {"A": (r, in), "B": (out, r)}}, {module.param: full tensor}) from a PEFT folder."""
    path = Path(path)
    cfile, wfile = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfile.is_file():
        raise FileNotFoundError(f"{path}: not an adapter folder (no {CONFIG_FILE}; expected PEFT's layout: "
                                f"{CONFIG_FILE} + {WEIGHTS_FILE})")
    try:
        config = json.loads(cfile.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfile}: invalid JSON ({e.msg} at line {e.lineno})") from None
    for key, want in (("peft_type", "LORA"), ("bias", "none"), ("use_dora", False), ("fan_in_fan_out", False)):
        if config.get(key, want) != want:
            raise ValueError(f"{cfile}: {key} = {config[key]!r} is not supported (accepted: {want!r})")
    if not wfile.is_file():
        raise FileNotFoundError(f"{path}: {WEIGHTS_FILE} is missing")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for key, t in load_file(str(wfile)).items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        else:
            full[name.replace(".modules_to_save.default.", ".")] = t
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]:
            raise ValueError(f"{wfile}: {name} needs lora_A (r, in) and lora_B (out, r) with one rank, got "
                             f"{ {k: tuple(v.shape) for k, v in ab.items()} }")
    return config, pairs, full


def _scale(config: dict, name: str, rank: int) -> float:
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", name):
            alpha = value
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def apply_adapter(model: nn.Module, path: str | Path, merge: bool = True) -> list[str]:
    """Put the adapter in `path` onto `model` (built from its base checkpoint); returns the adapted module names.

    merge=True folds each pair into its float nn.Linear (the model is then a plain model); layers that cannot hold
    the sum (int8 / int4) keep a LoRALinear side branch. Full tensors (modules_to_save) replace the model's.
    """
    from .checkpoint import canonical_name

    config, pairs, full = read_adapter(path)
    names = dict(model.named_modules())
    done = []
    for raw, ab in pairs.items():
        name = raw if raw in names else canonical_name(raw, text_only=True)
        mod = names.get(name)
        if mod is None or not hasattr(mod, "in_features"):
            raise ValueError(f"{path}: adapter layer {raw!r} is not a linear layer of this model (is it the base "
                             f"the adapter was trained on? adapter_config.json says "
                             f"{config.get('base_model_name_or_path')!r})")
        if isinstance(mod, LoRALinear):
            raise ValueError(f"{path}: {name} already carries an adapter")
        r = ab["A"].shape[0]
        if tuple(ab["A"].shape) != (r, mod.in_features) or tuple(ab["B"].shape) != (mod.out_features, r):
            raise ValueError(f"{path}: {raw} has A {tuple(ab['A'].shape)}, B {tuple(ab['B'].shape)}; this model's "
                             f"layer is ({mod.out_features}, {mod.in_features})")
        lora = LoRALinear(mod, r, 1.0, scale=_scale(config, name, r))
        with torch.no_grad():
            lora.lora_A.copy_(ab["A"].float())
            lora.lora_B.copy_(ab["B"].float())
        lora.requires_grad_(False)
        _set(model, name, lora)
        done.append(name)
    if full:
        own = model.state_dict()
        for raw, t in full.items():
            name = raw if raw in own else canonical_name(raw, text_only=True)
            if name not in own or tuple(own[name].shape) != tuple(t.shape):
                raise ValueError(f"{path}: saved module tensor {raw!r} {tuple(t.shape)} does not match this model")
            with torch.no_grad():
                own[name].copy_(t.to(own[name].dtype))
    if merge:
        for name in done:
            if isinstance(names[name], nn.Linear):
                merge_adapters_one(model, name)
    return done


def merge_adapters_one(model: nn.Module, name: str) -> None:
    mod = model.get_submodule(name)
    assert isinstance(mod, LoRALinear)
    with torch.no_grad():
        mod.base.weight.copy_(mod.merged_weight())
    _set(model, name, mod.base)
