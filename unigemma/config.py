"""Configs: dataclasses built from a checkpoint's `config.json`, validated at load.

Model types understood (spec/unified-model.md §2, spec/mtp-drafting.md §1.1, spec/family.md):
  gemma4_unified            the multimodal model: text decoder + optional vision / audio embedders
  gemma4_unified_text       the text decoder alone (`Gemma4UnifiedForCausalLM` checkpoints)
  gemma4_unified_assistant  the MTP drafter
  gemma4                    the family (E2B, E4B, 26B-A4B, 31B): text decoder + vision / audio encoders (the
                            audio encoder is not implemented yet: its tensors are skipped, audio is refused)
  gemma4_text               the family's text decoder alone (`Gemma4ForCausalLM` checkpoints)
  gemma4_assistant          the family's MTP drafters (the same model as gemma4_unified_assistant)
  diffusion_gemma           DiffusionGemma: the same decoder run as a causal encoder over the prompt and as a
                            bidirectional denoiser of `canvas_length`-token canvases (model/diffusion.py); its
                            vision encoder is not built (tensors skipped, text runs)

The family's text stack is the same decoder with more switches: per-layer input embeddings
(`hidden_size_per_layer_input`) and the mixture-of-experts block (`enable_moe_block`).

Only fields that change what the model computes are kept. Defaults are the reference's *code* defaults (not the
12B values), because a config.json written by transformers omits nothing but a hand-written one may.
Inconsistent configs raise `ConfigError` (a ValueError) naming the field and what would be accepted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"
_LAYER_TYPES = (SLIDING, FULL)
_ROPE_TYPES = ("default", "proportional")


class ConfigError(ValueError):
    """A config.json field is missing, malformed or inconsistent."""


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


def _int(d: dict, key: str, default: Any, where: str, minimum: int | None = None) -> int:
    v = d.get(key, default)
    _check(isinstance(v, int) and not isinstance(v, bool), where,
           f"field {key!r} must be an integer, got {v!r}")
    if minimum is not None:
        _check(v >= minimum, where, f"field {key!r} must be >= {minimum}, got {v}")
    return v


def _float(d: dict, key: str, default: Any, where: str) -> float:
    v = d.get(key, default)
    _check(isinstance(v, (int, float)) and not isinstance(v, bool), where,
           f"field {key!r} must be a number, got {v!r}")
    return float(v)


@dataclass
class RopeParams:
    rope_type: str = "default"
    rope_theta: float = 10_000.0
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclass
class TextConfig:
    """The decoder (`gemma4_unified_text`). Per-layer geometry lives in `layer_head_dim` / `layer_kv_heads`."""

    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    layer_types: list[str] = field(default_factory=list)
    layer_head_dim: list[int] = field(default_factory=list)
    layer_kv_heads: list[int] = field(default_factory=list)
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    hidden_size_per_layer_input: int = 0       # per-layer input embeddings (E2B / E4B); 0: none
    vocab_size_per_layer_input: int = 262_144
    enable_moe_block: bool = False             # router + experts beside the dense MLP (26B-A4B)
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    rope_parameters: dict[str, RopeParams] = field(default_factory=dict)
    sliding_window: int = 1024
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    use_bidirectional_attention: str | None = "vision"
    # How image blocks combine with the layer masks. Unified: (causal ∧ window) ∨ same block, on every layer.
    # Family (transformers `create_masks_for_vision_model`): full layers stay causal; sliding layers see
    # (causal ∨ same block) ∧ k > q − W — a block's later tokens, but never past the window behind the query.
    family_vision_mask: bool = False
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    max_position_embeddings: int = 262_144
    pad_token_id: int = 0
    bos_token_id: int | None = 2
    eos_token_id: list[int] = field(default_factory=lambda: [1])

    # --- derived ----------------------------------------------------------------------------------
    @property
    def kv_sharing_modes(self) -> list[str | None]:
        """Per layer: None, "store" (last non-reuse layer of its type) or "reuse" (reads the store layer's K/V)."""
        n, shared = self.num_hidden_layers, self.num_kv_shared_layers
        if shared == n:
            return ["reuse"] * n
        first = n - shared
        modes: list[str | None] = [None if i < first else "reuse" for i in range(n)]
        for t in set(self.layer_types):
            idx = max(i for i in range(first) if self.layer_types[i] == t)
            modes[idx] = "store"
        return modes

    def store_layer(self, layer_type: str) -> int:
        """Index of the layer whose K/V reuse layers (and MTP drafters) read for `layer_type`."""
        modes = self.kv_sharing_modes
        return max(i for i, t in enumerate(self.layer_types) if t == layer_type and modes[i] == "store")

    def layer_intermediate_size(self, i: int) -> int:
        double = self.use_double_wide_mlp and self.kv_sharing_modes[i] == "reuse"
        return self.intermediate_size * (2 if double else 1)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    # --- parsing ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, where: str = "text_config", family: bool = False) -> "TextConfig":
        """family: a `gemma4_text` config (the family's code defaults differ from the unified model's: window
        512, no bidirectional vision attention, per-layer inputs of 256, context 131,072)."""
        _check(isinstance(d, dict), where, f"must be an object, got {type(d).__name__}")
        c = cls()
        if family:
            c.sliding_window, c.use_bidirectional_attention = 512, None
            c.family_vision_mask = True
            c.max_position_embeddings, c.hidden_size_per_layer_input = 131_072, 256
        c.vocab_size = _int(d, "vocab_size", c.vocab_size, where, 1)
        c.hidden_size = _int(d, "hidden_size", c.hidden_size, where, 1)
        c.intermediate_size = _int(d, "intermediate_size", c.intermediate_size, where, 1)
        c.num_hidden_layers = _int(d, "num_hidden_layers", c.num_hidden_layers, where, 1)
        c.num_attention_heads = _int(d, "num_attention_heads", c.num_attention_heads, where, 1)
        c.num_key_value_heads = _int(d, "num_key_value_heads", c.num_key_value_heads, where, 1)
        c.head_dim = _int(d, "head_dim", c.head_dim, where, 2)
        c.sliding_window = _int(d, "sliding_window", c.sliding_window, where, 1)
        c.num_kv_shared_layers = _int(d, "num_kv_shared_layers", 0, where, 0) if d.get(
            "num_kv_shared_layers") is not None else 0
        c.attention_k_eq_v = bool(d.get("attention_k_eq_v", False))
        c.use_double_wide_mlp = bool(d.get("use_double_wide_mlp", False))
        c.tie_word_embeddings = bool(d.get("tie_word_embeddings", True))
        c.attention_bias = bool(d.get("attention_bias", False))
        c.rms_norm_eps = _float(d, "rms_norm_eps", 1e-6, where)
        c.max_position_embeddings = _int(d, "max_position_embeddings", c.max_position_embeddings, where, 1)
        c.pad_token_id = d.get("pad_token_id", 0) if d.get("pad_token_id") is not None else 0
        c.bos_token_id = d.get("bos_token_id", 2)
        eos = d.get("eos_token_id", 1)
        c.eos_token_id = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

        cap = d.get("final_logit_softcapping")
        _check(cap is None or (isinstance(cap, (int, float)) and cap > 0), where,
               f"field 'final_logit_softcapping' must be null or a positive number, got {cap!r}")
        c.final_logit_softcapping = None if cap is None else float(cap)

        act = d.get("hidden_activation", "gelu_pytorch_tanh")
        _check(act in ("gelu_pytorch_tanh",), where,
               f"field 'hidden_activation' = {act!r} is not supported (accepted: 'gelu_pytorch_tanh')")
        c.hidden_activation = act

        bidi = d.get("use_bidirectional_attention", c.use_bidirectional_attention)
        _check(bidi in ("vision", None), where,
               f"field 'use_bidirectional_attention' = {bidi!r} is not supported for generation "
               "(accepted: 'vision' or null; 'all' turns the decoder into a non-causal encoder)")
        c.use_bidirectional_attention = bidi
        _check(not c.attention_bias, where, "field 'attention_bias' = true is not supported (accepted: false)")

        # Per-layer input embeddings and the mixture-of-experts block (fields of the family's text config).
        if d.get("hidden_size_per_layer_input", c.hidden_size_per_layer_input) is None:
            c.hidden_size_per_layer_input = 0
        else:
            c.hidden_size_per_layer_input = _int(d, "hidden_size_per_layer_input", c.hidden_size_per_layer_input,
                                                 where, 0)
        if c.hidden_size_per_layer_input:
            c.vocab_size_per_layer_input = _int(d, "vocab_size_per_layer_input", c.vocab_size_per_layer_input,
                                                where, 1)
        c.enable_moe_block = bool(d.get("enable_moe_block", False))
        if c.enable_moe_block:
            for key in ("num_experts", "top_k_experts", "moe_intermediate_size"):
                _check(isinstance(d.get(key), int) and not isinstance(d.get(key), bool) and d[key] >= 1, where,
                       f"enable_moe_block is true, so field {key!r} must be a positive integer, got {d.get(key)!r}")
                setattr(c, key, d[key])
            _check(c.top_k_experts <= c.num_experts, where,
                   f"top_k_experts ({c.top_k_experts}) must be <= num_experts ({c.num_experts})")

        # Layer types: explicit list, or the 5:1 rule; the last layer is always full (as the reference forces).
        lt = d.get("layer_types")
        if lt is None:
            lt = [SLIDING if (i + 1) % 6 else FULL for i in range(c.num_hidden_layers)]
        _check(isinstance(lt, list) and len(lt) == c.num_hidden_layers, where,
               f"field 'layer_types' must list one type per layer ({c.num_hidden_layers}), got "
               f"{len(lt) if isinstance(lt, list) else lt!r}")
        for i, t in enumerate(lt):
            _check(t in _LAYER_TYPES, where, f"layer_types[{i}] = {t!r}; accepted: {list(_LAYER_TYPES)}")
        lt = list(lt)
        lt[-1] = FULL
        c.layer_types = lt

        # Per-layer geometry. transformers writes a sparse `per_layer_config`; the published 12B config has
        # `global_head_dim` / `num_global_key_value_heads` instead. The kv-head override only applies with k_eq_v.
        head = [c.head_dim] * c.num_hidden_layers
        kvh = [c.num_key_value_heads] * c.num_hidden_layers
        plc = d.get("per_layer_config")
        if plc is not None:
            _check(isinstance(plc, dict), where, "field 'per_layer_config' must be an object {layer index: {...}}")
            for k, ov in plc.items():
                _check(str(k).isdigit() and int(k) < c.num_hidden_layers, where,
                       f"per_layer_config key {k!r} is not a layer index < {c.num_hidden_layers}")
                _check(isinstance(ov, dict), where, f"per_layer_config[{k}] must be an object")
                if ov.get("head_dim") is not None:
                    head[int(k)] = _int(ov, "head_dim", None, f"{where}.per_layer_config[{k}]", 2)
                if ov.get("num_key_value_heads") is not None:
                    kvh[int(k)] = _int(ov, "num_key_value_heads", None, f"{where}.per_layer_config[{k}]", 1)
        else:
            g_head = d.get("global_head_dim")
            g_head = 512 if g_head is None else g_head
            _check(isinstance(g_head, int) and g_head >= 2, where, "field 'global_head_dim' must be an integer >= 2")
            g_kv = d.get("num_global_key_value_heads")
            for i, t in enumerate(lt):
                if t == FULL:
                    head[i] = g_head
                    if c.attention_k_eq_v and g_kv is not None:
                        kvh[i] = int(g_kv)
        for i in range(c.num_hidden_layers):
            _check(c.num_attention_heads % kvh[i] == 0, where,
                   f"layer {i}: num_attention_heads ({c.num_attention_heads}) must be a multiple of its "
                   f"key/value heads ({kvh[i]})")
            _check(head[i] % 2 == 0, where, f"layer {i}: head_dim {head[i]} must be even (RoPE rotates pairs)")
        c.layer_head_dim, c.layer_kv_heads = head, kvh

        _check(c.num_kv_shared_layers <= c.num_hidden_layers, where,
               f"num_kv_shared_layers ({c.num_kv_shared_layers}) exceeds num_hidden_layers ({c.num_hidden_layers})")
        if 0 < c.num_kv_shared_layers < c.num_hidden_layers:
            first = c.num_hidden_layers - c.num_kv_shared_layers
            _check(set(lt[:first]) == set(lt), where,
                   f"num_kv_shared_layers={c.num_kv_shared_layers}: the shared layers use a layer type that no "
                   f"earlier layer produces (types before layer {first}: {sorted(set(lt[:first]))})")
            # A reuse layer reads its store layer's K/V, so their geometries must agree.
            for i in range(first, c.num_hidden_layers):
                s = c.store_layer(lt[i])
                _check(head[i] == head[s], where,
                       f"layer {i} reuses layer {s}'s K/V but its head_dim {head[i]} != {head[s]}")
                kvh[i] = kvh[s]

        rp = d.get("rope_parameters")
        defaults = {SLIDING: RopeParams("default", 10_000.0), FULL: RopeParams("proportional", 1_000_000.0, 0.25)}
        if rp is None:
            c.rope_parameters = defaults
        else:
            _check(isinstance(rp, dict), where, "field 'rope_parameters' must be an object keyed by layer type")
            c.rope_parameters = {}
            for t in _LAYER_TYPES:
                p = rp.get(t)
                if p is None:
                    c.rope_parameters[t] = defaults[t]
                    continue
                _check(isinstance(p, dict), where, f"rope_parameters[{t!r}] must be an object")
                rt = p.get("rope_type", "default")
                _check(rt in _ROPE_TYPES, where,
                       f"rope_parameters[{t!r}].rope_type = {rt!r}; accepted: {list(_ROPE_TYPES)}")
                prf = float(p.get("partial_rotary_factor", 1.0 if rt == "default" else 1.0))
                _check(0.0 < prf <= 1.0, where, f"rope_parameters[{t!r}].partial_rotary_factor must be in (0, 1]")
                _check(rt == "proportional" or prf == 1.0, where,
                       f"rope_parameters[{t!r}]: partial_rotary_factor needs rope_type 'proportional'")
                c.rope_parameters[t] = RopeParams(rt, float(p.get("rope_theta", 10_000.0)), prf,
                                                  float(p.get("factor", 1.0) or 1.0))
        return c


@dataclass
class VisionConfig:
    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    rms_norm_eps: float = 1e-6
    output_proj_dims: int = 3840

    @property
    def model_patch_size(self) -> int:
        return self.patch_size * self.pooling_kernel_size

    @property
    def patch_dim(self) -> int:
        return self.model_patch_size ** 2 * 3

    @classmethod
    def from_dict(cls, d: dict, where: str = "vision_config") -> "VisionConfig":
        _check(isinstance(d, dict), where, "must be an object")
        c = cls()
        c.patch_size = _int(d, "patch_size", c.patch_size, where, 1)
        c.pooling_kernel_size = _int(d, "pooling_kernel_size", c.pooling_kernel_size, where, 1)
        c.mm_embed_dim = _int(d, "mm_embed_dim", c.mm_embed_dim, where, 1)
        c.mm_posemb_size = _int(d, "mm_posemb_size", c.mm_posemb_size, where, 1)
        c.rms_norm_eps = _float(d, "rms_norm_eps", 1e-6, where)
        c.output_proj_dims = _int(d, "output_proj_dims", c.output_proj_dims, where, 1)
        _check(c.output_proj_dims == c.mm_embed_dim, where,
               f"output_proj_dims ({c.output_proj_dims}) must equal mm_embed_dim ({c.mm_embed_dim}): the final "
               "projection reads the patch embedding")
        return c


@dataclass
class AudioConfig:
    audio_embed_dim: int = 640
    rms_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, d: dict, where: str = "audio_config") -> "AudioConfig":
        _check(isinstance(d, dict), where, "must be an object")
        c = cls()
        c.audio_embed_dim = _int(d, "audio_embed_dim", d.get("hidden_size", 640), where, 1)
        c.rms_norm_eps = _float(d, "rms_norm_eps", 1e-6, where)
        return c


@dataclass
class VisionTowerConfig:
    """The family's vision *encoder* (`gemma4` `vision_config`, model_type `gemma4_vision`): a ViT over 16-px
    patches with 2-D rotary positions, pooled k×k into soft tokens. Not the unified model's `VisionConfig`."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size ** 2

    @classmethod
    def from_dict(cls, d: dict, where: str = "vision_config") -> "VisionTowerConfig":
        _check(isinstance(d, dict), where, "must be an object")
        c = cls()
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "pooling_kernel_size", "patch_size",
                     "position_embedding_size"):
            setattr(c, name, _int(d, name, getattr(c, name), where, 1))
        c.rms_norm_eps = _float(d, "rms_norm_eps", c.rms_norm_eps, where)
        for name in ("use_clipped_linears", "standardize"):
            v = d.get(name, getattr(c, name))
            _check(isinstance(v, bool), where, f"field {name!r} must be true or false, got {v!r}")
            setattr(c, name, v)
        act = d.get("hidden_activation", "gelu_pytorch_tanh")
        _check(act == "gelu_pytorch_tanh", where, f"hidden_activation {act!r} is not supported "
               "(accepted: 'gelu_pytorch_tanh')")
        rp = d.get("rope_parameters") or {}
        _check(isinstance(rp, dict), where, "rope_parameters must be an object")
        _check(rp.get("rope_type", "axial") == "axial", where,
               f"rope_parameters.rope_type = {rp.get('rope_type')!r}; the vision encoder accepts only 'axial'")
        c.rope_theta = _float(rp, "rope_theta", c.rope_theta, f"{where}: rope_parameters")
        _check(c.head_dim % 4 == 0, where, f"head_dim ({c.head_dim}) must be a multiple of 4: each of the two "
               "position axes rotates half of it in pairs")
        _check(c.num_attention_heads % c.num_key_value_heads == 0, where,
               f"num_attention_heads ({c.num_attention_heads}) must be a multiple of num_key_value_heads "
               f"({c.num_key_value_heads})")
        return c


@dataclass
class AudioTowerConfig:
    """The family's audio *encoder* (`gemma4` `audio_config`, model_type `gemma4_audio`): a conformer over mel
    features with chunked local attention. Not the unified model's raw-frame `AudioConfig`."""

    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    subsampling_conv_channels: tuple[int, int] = (128, 32)
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536

    @classmethod
    def from_dict(cls, d: dict, where: str = "audio_config") -> "AudioTowerConfig":
        _check(isinstance(d, dict), where, "must be an object")
        c = cls()
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "conv_kernel_size",
                     "attention_chunk_size", "attention_context_left", "output_proj_dims"):
            setattr(c, name, _int(d, name, getattr(c, name), where, 1))
        c.attention_context_right = _int(d, "attention_context_right", c.attention_context_right, where, 0)
        for name in ("residual_weight", "attention_logit_cap", "attention_invalid_logits_value", "rms_norm_eps",
                     "gradient_clipping"):
            setattr(c, name, _float(d, name, getattr(c, name), where))
        v = d.get("use_clipped_linears", c.use_clipped_linears)
        _check(isinstance(v, bool), where, f"field 'use_clipped_linears' must be true or false, got {v!r}")
        c.use_clipped_linears = v
        ch = d.get("subsampling_conv_channels", list(c.subsampling_conv_channels))
        _check(isinstance(ch, (list, tuple)) and len(ch) == 2 and all(isinstance(x, int) and x > 0 for x in ch),
               where, f"subsampling_conv_channels must be two positive integers, got {ch!r}")
        c.subsampling_conv_channels = (int(ch[0]), int(ch[1]))
        act = d.get("hidden_act", "silu")
        _check(act == "silu", where, f"hidden_act {act!r} is not supported (accepted: 'silu')")
        _check(c.hidden_size % c.num_attention_heads == 0, where,
               f"hidden_size ({c.hidden_size}) must be a multiple of num_attention_heads ({c.num_attention_heads})")
        _check(c.attention_logit_cap > 0, where, "attention_logit_cap must be positive")
        return c


TEXT_ONLY_TYPES = ("gemma4_unified_text", "gemma4_text")
FAMILY_TYPES = ("gemma4", "gemma4_text")
MODEL_TYPES = ("gemma4_unified", "gemma4_unified_text", "gemma4", "gemma4_text")


@dataclass
class UnifiedConfig:
    """A Gemma 4 language model: `gemma4_unified` (multimodal), `gemma4_unified_text` (text only: vision/audio
    None), or the family's `gemma4` / `gemma4_text` (same decoder, its own switches).

    For `gemma4`, the encoders are `vision_tower` / `audio_tower` (`vision` / `audio` stay None: those are the
    unified model's encoder-free embedders). `skipped_towers` names encoders a checkpoint holds that are not built
    (none for `gemma4`); their tensors are skipped on load and their inputs refused.
    """

    model_type: str
    text: TextConfig
    vision: VisionConfig | None = None
    audio: AudioConfig | None = None
    image_token_id: int = 258_880
    audio_token_id: int = 258_881
    video_token_id: int = 258_884
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    boa_token_id: int = 256_000
    eoa_token_id: int = 258_883
    tie_word_embeddings: bool = True
    vision_tower: VisionTowerConfig | None = None   # the family's vision encoder (`gemma4` only)
    audio_tower: AudioTowerConfig | None = None     # the family's audio encoder (`gemma4` only)
    skipped_towers: tuple[str, ...] = ()
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def is_text_only(self) -> bool:
        return self.model_type in TEXT_ONLY_TYPES

    @property
    def is_family(self) -> bool:
        return self.model_type in FAMILY_TYPES

    @property
    def placeholder_ids(self) -> tuple[int, int, int]:
        return self.image_token_id, self.video_token_id, self.audio_token_id

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> "UnifiedConfig":
        mt = d.get("model_type")
        if mt in TEXT_ONLY_TYPES:
            text = TextConfig.from_dict(d, where, family=mt == "gemma4_text")
            return cls(model_type=mt, text=text, tie_word_embeddings=text.tie_word_embeddings, raw=d)
        _check(mt in MODEL_TYPES, where,
               f"model_type {mt!r} is not supported (accepted: {', '.join(repr(t) for t in MODEL_TYPES)}, "
               "'diffusion_gemma', and the drafters 'gemma4_unified_assistant', 'gemma4_assistant')")
        tc = d.get("text_config")
        family = mt == "gemma4"
        text = TextConfig.from_dict(tc if tc is not None else {}, f"{where}: text_config", family=family)
        c = cls(model_type=mt, text=text, raw=d)
        if family:
            if d.get("vision_config") is not None:
                c.vision_tower = VisionTowerConfig.from_dict(d["vision_config"], f"{where}: vision_config")
            if d.get("audio_config") is not None:
                c.audio_tower = AudioTowerConfig.from_dict(d["audio_config"], f"{where}: audio_config")
        else:
            if d.get("vision_config") is not None:
                c.vision = VisionConfig.from_dict(d["vision_config"], f"{where}: vision_config")
            if d.get("audio_config") is not None:
                c.audio = AudioConfig.from_dict(d["audio_config"], f"{where}: audio_config")
        for name, key in (("image_token_id", "image_token_id"), ("audio_token_id", "audio_token_id"),
                          ("video_token_id", "video_token_id"), ("boi_token_id", "boi_token_id"),
                          ("eoi_token_id", "eoi_token_id"), ("boa_token_id", "boa_token_id"),
                          ("eoa_token_id", "eoa_token_index")):
            if d.get(key) is not None:
                setattr(c, name, _int(d, key, None, where, 0))
        c.tie_word_embeddings = bool(d.get("tie_word_embeddings", text.tie_word_embeddings))
        text.tie_word_embeddings = c.tie_word_embeddings
        if c.vision is not None:
            _check(c.vision.output_proj_dims == c.vision.mm_embed_dim, where, "vision dims inconsistent")
        return c


DIFFUSION_TYPES = ("diffusion_gemma",)


@dataclass
class DiffusionConfig(UnifiedConfig):
    """`diffusion_gemma` (transformers `DiffusionGemmaForBlockDiffusion`): a Gemma 4 text stack whose every layer
    has the MoE block beside the dense MLP and whose full layers are k_eq_v, plus a self-conditioning MLP for the
    denoiser. `canvas_length`: tokens denoised together (one block of block diffusion)."""

    canvas_length: int = 256

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> "DiffusionConfig":
        mt = d.get("model_type")
        _check(mt in DIFFUSION_TYPES, where, f"model_type {mt!r} is not a DiffusionGemma model (accepted: "
               f"{', '.join(repr(t) for t in DIFFUSION_TYPES)})")
        tc = d.get("text_config")
        tc = {} if tc is None else tc
        _check(isinstance(tc, dict), f"{where}: text_config", f"must be an object, got {type(tc).__name__}")
        _check(not tc.get("hidden_size_per_layer_input"), f"{where}: text_config",
               "field 'hidden_size_per_layer_input' is not part of a diffusion_gemma text config (expected absent "
               "or 0)")
        # The reference's DiffusionGemma text stack has no switches for these: every layer carries the MoE block
        # and full layers have no v_proj (V is the raw K); the final softcap is a class constant (30), not a field.
        tc = dict(tc, enable_moe_block=True, attention_k_eq_v=True, hidden_size_per_layer_input=0,
                  num_kv_shared_layers=0, use_double_wide_mlp=False)
        if tc.get("final_logit_softcapping") is None:
            tc["final_logit_softcapping"] = 30.0
        text = TextConfig.from_dict(tc, f"{where}: text_config", family=True)
        c = cls(model_type=mt, text=text, raw=d)
        c.canvas_length = _int(d, "canvas_length", 256, where, 1)
        c.skipped_towers = ("vision_config",) if d.get("vision_config") is not None else ()
        for key in ("image_token_id", "boi_token_id", "eoi_token_id"):
            if d.get(key) is not None:
                setattr(c, key, _int(d, key, None, where, 0))
        c.tie_word_embeddings = bool(d.get("tie_word_embeddings", True))
        _check(c.tie_word_embeddings, where, "field 'tie_word_embeddings' = false is not supported for "
               "diffusion_gemma (the reference ties lm_head to the embeddings; accepted: true)")
        text.tie_word_embeddings = True
        return c


ASSISTANT_TYPES = ("gemma4_unified_assistant", "gemma4_assistant")


@dataclass
class AssistantConfig:
    """An MTP drafter: `gemma4_unified_assistant` (for the unified 12B) or `gemma4_assistant` (for the family's
    E2B / E4B / 26B-A4B / 31B). The same model: every decoder layer reuses the target's K/V; a `gemma4_assistant`
    text stack is a plain `gemma4_text` one (no per-layer inputs, no experts, no double-wide MLP)."""

    text: TextConfig
    backbone_hidden_size: int = 3840
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    tie_word_embeddings: bool = True
    model_type: str = "gemma4_unified_assistant"
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> "AssistantConfig":
        mt = d.get("model_type")
        _check(mt in ASSISTANT_TYPES, where, f"model_type {mt!r} is not an MTP drafter (accepted: "
               f"{', '.join(repr(t) for t in ASSISTANT_TYPES)})")
        family = mt == "gemma4_assistant"
        tc = dict(d.get("text_config") or {})
        n = tc.get("num_hidden_layers", TextConfig.num_hidden_layers)
        if family:  # the published drafters state it; the reference refuses anything else
            for key, plain in (("hidden_size_per_layer_input", 0), ("vocab_size_per_layer_input", 0),
                               ("enable_moe_block", False), ("use_double_wide_mlp", False)):
                _check(tc.get(key, plain) in (plain, None), f"{where}: text_config",
                       f"{key}={tc.get(key)!r}: a gemma4_assistant drafter needs {plain!r}")
            _check(tc.get("num_kv_shared_layers", n) == n, f"{where}: text_config",
                   f"num_kv_shared_layers={tc.get('num_kv_shared_layers')!r}: every layer of a drafter reuses the "
                   f"target's K/V, so it must equal num_hidden_layers ({n})")
            tc.setdefault("hidden_size_per_layer_input", 0)
        # The drafter has no K/V of its own: every layer is a reuse layer (the reference sets this on build).
        if not tc.get("num_kv_shared_layers"):
            tc["num_kv_shared_layers"] = n
        text = TextConfig.from_dict(tc, f"{where}: text_config", family=family)
        c = cls(text=text, model_type=mt, raw=d)
        c.backbone_hidden_size = _int(d, "backbone_hidden_size", 1536 if family else 3840, where, 1)
        c.use_ordered_embeddings = bool(d.get("use_ordered_embeddings", False))
        c.num_centroids = _int(d, "num_centroids", 2048, where, 1)
        c.centroid_intermediate_top_k = _int(d, "centroid_intermediate_top_k", 32, where, 1)
        c.tie_word_embeddings = bool(d.get("tie_word_embeddings", True))
        if c.use_ordered_embeddings:
            _check(text.vocab_size % c.num_centroids == 0, where,
                   f"vocab_size ({text.vocab_size}) must be divisible by num_centroids ({c.num_centroids})")
            _check(c.centroid_intermediate_top_k <= c.num_centroids, where,
                   "centroid_intermediate_top_k must be <= num_centroids")
        return c


def read_config_json(path: str | Path) -> dict:
    path = Path(path)
    f = path / "config.json" if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no config.json (a checkpoint folder needs config.json beside its weights)")
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError:  # an image, a weights file, ... given where a model is expected
        raise ConfigError(f"{f} is not a config.json (not text): give a checkpoint folder (config.json, "
                          "tokenizer.json and model.safetensors) or its config.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f}: invalid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{f}: must hold a JSON object")
    return d


def load_config(path: str | Path) -> UnifiedConfig | AssistantConfig:
    """Parse `path/config.json` (or a config file) into the dataclass for its model_type."""
    f = Path(path)
    d = read_config_json(f)
    where = str(f / "config.json" if f.is_dir() else f)
    if d.get("model_type") in ASSISTANT_TYPES:
        return AssistantConfig.from_dict(d, where)
    if d.get("model_type") in DIFFUSION_TYPES:
        return DiffusionConfig.from_dict(d, where)
    return UnifiedConfig.from_dict(d, where)


def gemma4_12b_config() -> UnifiedConfig:
    """The published 12B geometry (spec/unified-model.md §2–3), for `inspect` and benchmarks."""
    return UnifiedConfig.from_dict({
        "model_type": "gemma4_unified",
        "text_config": {
            "model_type": "gemma4_unified_text", "vocab_size": 262144, "hidden_size": 3840,
            "intermediate_size": 15360, "num_hidden_layers": 48, "num_attention_heads": 16,
            "num_key_value_heads": 8, "head_dim": 256, "global_head_dim": 512, "num_global_key_value_heads": 1,
            "attention_k_eq_v": True, "sliding_window": 1024, "final_logit_softcapping": 30.0,
            "max_position_embeddings": 262144, "eos_token_id": [1, 106],
        },
        "vision_config": {"model_type": "gemma4_unified_vision"},
        "audio_config": {"model_type": "gemma4_unified_audio"},
    }, "gemma4-12b")


# The family's published text geometries (spec/family.md; the authority is a checkpoint's own config.json). The
# vision / audio encoders are not built by this package yet, so these describe the text stacks only.
_FAMILY_GEOMETRY = {
    "e2b": dict(hidden_size=1536, num_hidden_layers=35, num_attention_heads=8, num_key_value_heads=1,
                intermediate_size=6144, use_double_wide_mlp=True, sliding_window=512, num_kv_shared_layers=20,
                hidden_size_per_layer_input=256, attention_k_eq_v=False, max_position_embeddings=131072,
                layer_types=[FULL if (i + 1) % 5 == 0 else SLIDING for i in range(35)]),
    "e4b": dict(hidden_size=2560, num_hidden_layers=42, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=10240, sliding_window=512, num_kv_shared_layers=18,
                hidden_size_per_layer_input=256, attention_k_eq_v=False, max_position_embeddings=131072),
    "26b-a4b": dict(hidden_size=2816, num_hidden_layers=30, num_attention_heads=16, num_key_value_heads=8,
                    num_global_key_value_heads=2, intermediate_size=2112, enable_moe_block=True, num_experts=128,
                    top_k_experts=8, moe_intermediate_size=704, sliding_window=1024, hidden_size_per_layer_input=0,
                    attention_k_eq_v=True, max_position_embeddings=262144),
    "31b": dict(hidden_size=5376, num_hidden_layers=60, num_attention_heads=32, num_key_value_heads=16,
                num_global_key_value_heads=4, intermediate_size=21504, sliding_window=1024,
                hidden_size_per_layer_input=0, attention_k_eq_v=True, max_position_embeddings=262144),
}
FAMILY_NAMES = tuple(_FAMILY_GEOMETRY)


def gemma4_family_config(name: str) -> UnifiedConfig:
    """A published family geometry by name (e2b, e4b, 26b-a4b, 31b) as a `gemma4_text` config, for `inspect`
    and benchmarks."""
    key = name.lower().removeprefix("gemma-4-").removeprefix("gemma4-")
    if key not in _FAMILY_GEOMETRY:
        raise ValueError(f"unknown Gemma 4 geometry {name!r} (known: {', '.join(FAMILY_NAMES)}, 12b)")
    d = {"model_type": "gemma4_text", "vocab_size": 262144, "head_dim": 256, "global_head_dim": 512,
         "final_logit_softcapping": 30.0, "eos_token_id": [1, 106], **_FAMILY_GEOMETRY[key]}
    return UnifiedConfig.from_dict(d, f"gemma4-{key}")
