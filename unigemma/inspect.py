"""`unigemma inspect`: architecture, parameters by component, weight bytes, KV-cache bytes — from config alone.

Parameters are counted on a meta-device build of the real modules (exact, instant, no memory), so the figures
cannot drift from the model code. Weight bytes come from the safetensors headers when the folder has weights,
otherwise from the requested / checkpoint dtype.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from .config import (FAMILY_NAMES, FULL, SLIDING, AssistantConfig, UnifiedConfig, gemma4_12b_config,
                     gemma4_family_config, load_config)

_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
CONTEXTS = {"8K": 8192, "32K": 32768, "128K": 131072, "256K": 262144}


def _component(name: str) -> str:
    if "per_layer" in name:  # PLE: the per-layer token table, the context projection, per-layer gate/proj/norms
        return "per_layer_embeddings" if "embed_tokens_per_layer" in name else "per_layer_inputs"
    if ".experts." in name:
        return "experts"
    if ".router." in name:
        return "router"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embeddings"
    if "vision_embedder" in name or "embed_vision" in name:
        return "vision"
    if "embed_audio" in name:
        return "audio"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if "projection" in name or "masked_embedding" in name:
        return "drafter_head"
    return "norms"


def count_parameters(cfg: UnifiedConfig | AssistantConfig) -> dict[str, int]:
    from .model.assistant import Gemma4Assistant
    from .model.unified import Gemma4Unified

    with torch.device("meta"):
        model = Gemma4Assistant(cfg) if isinstance(cfg, AssistantConfig) else Gemma4Unified(cfg)
    out: dict[str, int] = {}
    for name, p in model.named_parameters():  # tied parameters are yielded once
        c = _component(name)
        out[c] = out.get(c, 0) + p.numel()
    return out


def safetensors_bytes(path: Path) -> dict[str, int] | None:
    """Bytes per dtype, read from the safetensors headers only (no tensor data is touched)."""
    from .checkpoint import CheckpointError, weight_files

    try:
        files = weight_files(path)
    except CheckpointError:
        return None
    out: dict[str, int] = {}
    for f in files:
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k == "__metadata__":
                continue
            a, b = v["data_offsets"]
            out[v["dtype"]] = out.get(v["dtype"], 0) + (b - a)
    return out


def kv_bytes(cfg, context: int, bytes_per_el: float = 2.0) -> int:
    """KV-cache bytes for one sequence of `context` tokens: the tensors `make_cache` allocates (built on the meta
    device, so nothing is allocated), i.e. full layers hold `context` entries and sliding layers a ring buffer
    bounded by the window. The one accounting behind every KV figure `inspect` prints."""
    from .model.cache import make_cache

    dtype = {1: getattr(torch, "float8_e4m3fn", torch.int8), 2: torch.bfloat16, 4: torch.float32}[int(bytes_per_el)]
    return int(make_cache(cfg.text, 1, context, dtype, "meta").nbytes())


def inspect_config(cfg: UnifiedConfig | AssistantConfig, path: Path | None = None, dtype: str = "bfloat16") -> dict:
    t = cfg.text
    params = count_parameters(cfg)
    total = sum(params.values())
    el = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    # Per token, a MoE layer runs top_k of its experts; PLE's per-layer table is a lookup (read one row per
    # layer), not a product: "active" counts what a token's forward multiplies through.
    experts = params.get("experts", 0)
    active = total - experts - params.get("per_layer_embeddings", 0)
    if getattr(t, "enable_moe_block", False):
        active += experts * t.top_k_experts // t.num_experts
    on_disk = safetensors_bytes(path) if path is not None else None
    weight_bytes = sum(on_disk.values()) if on_disk else total * el
    n_full = t.layer_types.count(FULL)
    per_token = {lt: sum(2 * t.layer_kv_heads[i] * t.layer_head_dim[i] * el
                         for i, (x, m) in enumerate(zip(t.layer_types, t.kv_sharing_modes)) if x == lt and m != "reuse")
                 for lt in (SLIDING, FULL)}
    info = {
        "model_type": cfg.model_type,
        "path": str(path) if path else None,
        "layers": t.num_hidden_layers,
        "sliding_layers": t.num_hidden_layers - n_full,
        "full_layers": n_full,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "heads": t.num_attention_heads,
        "kv_heads": {"sliding": t.num_key_value_heads,
                     "full": t.layer_kv_heads[t.layer_types.index(FULL)]},
        "head_dim": {"sliding": t.head_dim, "full": t.layer_head_dim[t.layer_types.index(FULL)]},
        "attention_k_eq_v": t.attention_k_eq_v,
        "num_kv_shared_layers": t.num_kv_shared_layers,
        "sliding_window": t.sliding_window,
        "vocab_size": t.vocab_size,
        "final_logit_softcapping": t.final_logit_softcapping,
        "vision": getattr(cfg, "vision", None) is not None,
        "audio": getattr(cfg, "audio", None) is not None,
        "parameters": total,
        "active_parameters": active,
        "experts": ({"num_experts": t.num_experts, "top_k": t.top_k_experts,
                     "moe_intermediate_size": t.moe_intermediate_size} if t.enable_moe_block else None),
        "hidden_size_per_layer_input": t.hidden_size_per_layer_input,
        "parameters_by_component": params,
        "dtype": dtype if not on_disk else None,
        "weight_bytes": int(weight_bytes),
        "weight_bytes_by_dtype": on_disk or {dtype: int(weight_bytes)},
        "kv_bytes_per_token": {"sliding": per_token[SLIDING], "full": per_token[FULL],
                               "note": "sliding layers hold at most sliding_window tokens"},
        "kv_bytes_at_context": {k: kv_bytes(cfg, n, el) for k, n in CONTEXTS.items()},
    }
    if not isinstance(cfg, AssistantConfig):
        info["weight_bytes_by_format"] = weight_bytes_by_format(cfg, el)
    if getattr(cfg, "skipped_towers", ()):
        info["skipped_towers"] = list(cfg.skipped_towers)
    return info


def weight_bytes_by_format(cfg: UnifiedConfig, el: int = 2) -> dict[str, int]:
    """Weight bytes as unigemma would hold the model: float (el bytes per value), `--quantize int8` and `int4`
    (decoder linears and MoE experts quantized, embeddings int8; the per-layer tables stay float)."""
    from .quant import quantized_weight_bytes

    float_name = {4: "float32", 2: "bf16"}[el]
    out = {float_name: int(sum(count_parameters(cfg).values()) * el)}
    for q in ("int8", "int4"):
        out[q] = int(quantized_weight_bytes(cfg, q, el)["total"])
    return out


def resolve(target: str | None) -> tuple[UnifiedConfig | AssistantConfig, Path | None]:
    """A checkpoint folder, a config.json file, or a published geometry by name (no weights): gemma4-12b, and the
    family's gemma4-e2b, -e4b, -26b-a4b, -31b (text stacks; `e2b` etc. also accepted)."""
    if target in ("gemma4-12b", "12b", "gemma-4-12b"):
        return gemma4_12b_config(), None
    if target is not None and target.lower().removeprefix("gemma-4-").removeprefix("gemma4-") in FAMILY_NAMES:
        return gemma4_family_config(target), None
    if target is None:
        from .api import demo_model_path

        target = str(demo_model_path())
    p = Path(target)
    cfg = load_config(p)
    return cfg, (p if p.is_dir() else None)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def format_report(info: dict) -> str:
    lines = [
        f"model_type     {info['model_type']}" + (f"   ({info['path']})" if info["path"] else ""),
        f"layers         {info['layers']} ({info['sliding_layers']} sliding, {info['full_layers']} full), "
        f"window {info['sliding_window']}",
        f"hidden         {info['hidden_size']}, MLP {info['intermediate_size']}, heads {info['heads']}, "
        f"kv heads {info['kv_heads']['sliding']}/{info['kv_heads']['full']} (sliding/full), "
        f"head dim {info['head_dim']['sliding']}/{info['head_dim']['full']}",
        f"k_eq_v         {info['attention_k_eq_v']}, kv-shared layers {info['num_kv_shared_layers']}, "
        f"vocab {info['vocab_size']}, softcap {info['final_logit_softcapping']}",
        f"vision/audio   {info['vision']}/{info['audio']}",
        f"parameters     {info['parameters']:,} ({info['parameters'] / 1e9:.2f} B), active per token "
        f"{info['active_parameters']:,} ({info['active_parameters'] / 1e9:.2f} B)",
    ]
    if info.get("experts"):
        x = info["experts"]
        lines.insert(-1, f"experts        {x['num_experts']} x {x['moe_intermediate_size']}, "
                         f"top-{x['top_k']} per token, beside the dense MLP")
    if info.get("hidden_size_per_layer_input"):
        lines.insert(-1, f"per-layer in   {info['hidden_size_per_layer_input']} per layer and token (PLE)")
    if info.get("skipped_towers"):
        lines.insert(-1, f"not built      {', '.join(info['skipped_towers'])} (not supported yet: inputs refused)")
    for k, v in sorted(info["parameters_by_component"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {k:<13}{v:>16,}")
    lines.append(f"weights        {human(info['weight_bytes'])}  "
                 + ", ".join(f"{k}: {human(v)}" for k, v in info["weight_bytes_by_dtype"].items()))
    if info.get("weight_bytes_by_format"):
        lines.append("by format      " + ", ".join(f"{k} {human(v)}" for k, v in info["weight_bytes_by_format"].items())
                     + "  (int8/int4: decoder linears and experts; PLE tables stay float)")
    kv = info["kv_bytes_per_token"]
    lines.append(f"KV per token   sliding {human(kv['sliding'])} (bounded by the window), full {human(kv['full'])}")
    lines.append("KV at context  " + ", ".join(f"{k}: {human(v)}" for k, v in info["kv_bytes_at_context"].items()))
    return "\n".join(lines)


# --- planning a run: quantized weights + KV cache at a context + prefill activations (issue 6) ---------------------
_KV_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4, "fp8": 1}


def activation_bytes(cfg, context: int, chunk: int, el: int) -> int:
    """Estimated peak activation bytes of one prefill chunk of `chunk` tokens at the end of a `context`-token
    prompt (batch 1): the widest layer's temporaries on top of the residual stream, plus one row of logits.

    attention: queries; K/V read from the cache, upcast and expanded to all query heads (GQA); float32 scores
    and a boolean mask over every visible key (the math path — fused attention kernels need less);
    MLP: gate, up and their product. An upper-bound style estimate, not a measurement.
    """
    t = cfg.text
    C = max(1, min(chunk, context))
    H, nh = t.hidden_size, t.num_attention_heads
    peak = 0
    for i, lt in enumerate(t.layer_types):
        d = t.layer_head_dim[i]
        # full layers see every cached key; sliding layers see the ring plus this chunk
        S = context if lt == FULL else min(context, t.sliding_window + C)
        attn = C * nh * d * el + 2 * nh * S * d * el + nh * C * S * 4 + C * S
        mlp = 3 * C * t.layer_intermediate_size(i) * el
        peak = max(peak, 4 * C * H * el + max(attn, mlp))
    return int(peak + t.vocab_size * 4)


def plan_memory(info: dict, cfg, path: Path | None, dtype: str = "bfloat16", quantize=None,
                context: int | None = None, kv_dtype: str | None = None, chunk: int = 512) -> dict:
    """Extend an `inspect_config` report for a planned run: `weight_bytes` becomes the quantized size when
    `quantize` is given ("int8" | "int4" | QuantConfig), and `plan` holds KV bytes at `context` (sliding layers
    bounded by the window: the cache the model really allocates), an activation estimate and the total."""
    from .quant import QuantConfig, quantized_weight_bytes, stored_quantization

    el = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    qc = QuantConfig.parse(quantize)
    if qc is not None:
        stored = stored_quantization(path) if path is not None else None
        if stored is not None:
            raise ValueError(f"{path} is already quantized (int{stored['bits']}); its weight bytes are the files' "
                             "own: drop --quantize")
        parts = quantized_weight_bytes(cfg, qc, el)
        info["quantization"] = qc.to_json()
        info["weight_bytes"] = parts["total"]
        info["weight_bytes_by_part"] = parts
        emb = "int8" if qc.embeddings == "int8" else dtype
        info["weight_bytes_by_dtype"] = {
            f"int{qc.bits} linears + scales": parts["linear_weights"] + parts["linear_scales"],
            f"{emb} embeddings": parts["embeddings"], f"{dtype} other": parts["other"]}
    if context is not None:
        if context < 1:
            raise ValueError(f"--context {context}: expected a positive number of tokens")
        kv_name = kv_dtype or dtype
        if kv_name not in _KV_BYTES:
            raise ValueError(f"--kv-dtype {kv_name!r} is not supported (accepted: bf16, fp16, fp32, fp8)")
        kv_el = _KV_BYTES[kv_name]
        kv = kv_bytes(cfg, context, kv_el)
        act = activation_bytes(cfg, context, chunk, el)
        info["plan"] = {"context": context, "kv_dtype": kv_name, "kv_bytes": kv, "prefill_chunk": chunk,
                        "activation_bytes": act, "weight_bytes": info["weight_bytes"],
                        "total_bytes": info["weight_bytes"] + kv + act}
    return info


def format_plan(info: dict) -> str:
    lines = []
    if "quantization" in info:
        q = info["quantization"]
        g = f", group {q['group_size']}{', zero-point' if q['zero_point'] else ''}" if q["bits"] == 4 else ""
        lines.append(f"quantized      int{q['bits']}{g}, embeddings {q['embeddings']}: "
                     + ", ".join(f"{k} {human(v)}" for k, v in info["weight_bytes_by_part"].items()))
    p = info.get("plan")
    if p:
        lines.append(f"plan           context {p['context']:,} tokens, KV {p['kv_dtype']}: weights "
                     f"{human(p['weight_bytes'])} + KV {human(p['kv_bytes'])} + activations "
                     f"{human(p['activation_bytes'])} (prefill chunk {p['prefill_chunk']}) = {human(p['total_bytes'])}")
    return "\n".join(lines)
