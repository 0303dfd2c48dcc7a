"""Tiny reference models (HF transformers 5.24.0, test-only) saved in the published checkpoint format.

Weights are randomised with non-trivial norms and layer scalars so that every term of the forward matters.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

IMG, AUD, VID, BOI, EOI, BOA, EOA = 100, 101, 102, 103, 104, 105, 106

BASE_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, sliding_window=8, final_logit_softcapping=30.0)

# name → (text_config overrides, top-level overrides, with vision/audio)
CONFIGS = {
    # k_eq_v full layers with their own head_dim and a single KV head; softcap on; tied
    "keqv": (dict(global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True), {}, True),
    # KV sharing + double-wide MLP on the reuse layers; softcap off; untied LM head
    "kvshare": (dict(num_hidden_layers=8, num_kv_shared_layers=3,
                     layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                                  "full_attention", "sliding_attention", "sliding_attention", "full_attention"], use_double_wide_mlp=True,
                     final_logit_softcapping=None, global_head_dim=32, tie_word_embeddings=False),
                dict(tie_word_embeddings=False), True),
    # no k_eq_v: full layers keep v_proj and num_key_value_heads (num_global_key_value_heads is ignored)
    "plainfull": (dict(global_head_dim=24, num_global_key_value_heads=1, attention_k_eq_v=False,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                                    "full_attention", "full_attention"]), {}, True),
    # different RoPE parameters and a wider window
    "rope": (dict(sliding_window=16, global_head_dim=32, attention_k_eq_v=True, num_global_key_value_heads=2,
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
                                   "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                                      "rope_theta": 20000.0}}), {}, True),
    # no bidirectional vision attention (purely causal images)
    "causalvision": (dict(use_bidirectional_attention=None, global_head_dim=32), {}, True),
    # text only, no vision/audio sub-configs
    "textonly": (dict(global_head_dim=32, attention_k_eq_v=True, num_global_key_value_heads=1), {}, False),
}


def reference_config(name: str):
    from transformers import Gemma4UnifiedConfig

    text_over, top_over, mm = CONFIGS[name]
    text = {**BASE_TEXT, **copy.deepcopy(text_over)}
    kw = dict(text_config=text, image_token_id=IMG, audio_token_id=AUD, video_token_id=VID, boi_token_id=BOI,
              eoi_token_id=EOI, boa_token_id=BOA, eoa_token_index=EOA, **top_over)
    if mm:
        kw["vision_config"] = dict(mm_embed_dim=48, output_proj_dims=48, mm_posemb_size=40)
        kw["audio_config"] = dict()
    return Gemma4UnifiedConfig(**kw)


def randomize(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "_ln" in n:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "pos_embedding" in n:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p.shape[-1]) ** 0.5) * 1.5)
        for n, b in model.named_buffers():
            if n.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def make_reference(name: str, path: Path, seed: int = 0, max_shard_size: str = "60KB"):
    """Build, randomise and save a reference model; returns it (eval, float32)."""
    from transformers import Gemma4UnifiedForConditionalGeneration

    torch.manual_seed(seed)
    ref = Gemma4UnifiedForConditionalGeneration(reference_config(name)).eval()
    randomize(ref, seed)
    ref.save_pretrained(str(path), max_shard_size=max_shard_size)
    return ref


# --- the family (`gemma4`, `gemma4_text`; transformers Gemma4ForConditionalGeneration / Gemma4ForCausalLM) -------
FAMILY_TEXT = dict(BASE_TEXT, hidden_size_per_layer_input=0, max_position_embeddings=512)
_SLIDE, _FULL = "sliding_attention", "full_attention"

# name → (text_config overrides, top-level overrides, with vision/audio towers, text-only ForCausalLM)
FAMILY = {
    # E2B / E4B style: per-layer input embeddings, KV sharing (double-wide MLP on the reuse layers), 4:1 layers,
    # plain full layers (no k_eq_v), towers present (skipped by unigemma)
    "e": (dict(num_hidden_layers=8, hidden_size_per_layer_input=16, vocab_size_per_layer_input=128,
               num_kv_shared_layers=3, use_double_wide_mlp=True, global_head_dim=32, num_key_value_heads=1,
               layer_types=[_SLIDE, _SLIDE, _SLIDE, _SLIDE, _FULL, _SLIDE, _SLIDE, _FULL]), {}, True, False),
    # 26B-A4B style: MoE beside the dense MLP, k_eq_v full layers with their own KV heads; text-only checkpoint
    "moe": (dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32,
                 intermediate_size=64, attention_k_eq_v=True, global_head_dim=32, num_global_key_value_heads=1,
                 use_bidirectional_attention="vision"), {}, False, True),
    # 31B style: dense, k_eq_v, untied LM head, no softcap variation (softcap on)
    "dense": (dict(attention_k_eq_v=True, global_head_dim=32, num_global_key_value_heads=2,
                   tie_word_embeddings=False), dict(tie_word_embeddings=False), False, False),
}


def family_config(name: str):
    from transformers import Gemma4Config, Gemma4TextConfig

    text_over, top_over, towers, text_only = FAMILY[name]
    text = {**FAMILY_TEXT, **copy.deepcopy(text_over)}
    if text_only:
        return Gemma4TextConfig(**text)
    kw = dict(text_config=text, image_token_id=IMG, audio_token_id=AUD, video_token_id=VID, boi_token_id=BOI,
              eoi_token_id=EOI, boa_token_id=BOA, eoa_token_index=EOA, **top_over)
    if towers:
        kw["vision_config"] = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, head_dim=16, position_embedding_size=64)
        kw["audio_config"] = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  subsampling_conv_channels=[8, 4], output_proj_dims=32)
    else:
        kw["vision_config"] = None
        kw["audio_config"] = None
    return Gemma4Config(**kw)


def make_family_reference(name: str, path: Path, seed: int = 0, max_shard_size: str = "60KB"):
    """Build, randomise and save a family reference model; returns it (eval, float32)."""
    from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = family_config(name)
    cls = Gemma4ForCausalLM if FAMILY[name][3] else Gemma4ForConditionalGeneration
    ref = cls(cfg).eval()
    randomize(ref, seed)
    ref.save_pretrained(str(path), max_shard_size=max_shard_size)
    return ref


def make_family_drafter(name: str, path: Path, seed: int = 7, num_assistant_tokens: int = 3,
                        ordered: bool = False):
    """Save a random `gemma4_assistant` MTP drafter for the family target `name`: its attention geometry mirrors
    the target's (head dims, K/V heads, k_eq_v, window), as a published drafter's does; every layer reads the
    target's K/V. ordered=True: the centroid LM head (`use_ordered_embeddings`). Returns it (eval, float32)."""
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM

    target = {**FAMILY_TEXT, **copy.deepcopy(FAMILY[name][0])}
    keep = ("vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim", "global_head_dim",
            "num_global_key_value_heads", "attention_k_eq_v", "sliding_window", "max_position_embeddings")
    tc = {k: v for k, v in target.items() if k in keep}
    tc.update(model_type="gemma4_text", num_hidden_layers=2, hidden_size=48, intermediate_size=64,
              final_logit_softcapping=None, layer_types=[_SLIDE, _FULL], num_kv_shared_layers=2,
              hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, enable_moe_block=False,
              use_double_wide_mlp=False)
    extra = dict(use_ordered_embeddings=True, num_centroids=16, centroid_intermediate_top_k=4) if ordered else {}
    torch.manual_seed(seed)
    cfg = Gemma4AssistantConfig(text_config=tc, backbone_hidden_size=target["hidden_size"], **extra)
    dr = Gemma4AssistantForCausalLM(cfg).eval()
    randomize(dr, seed)
    if ordered:  # a permutation of the vocabulary, as the published ordering is
        dr.masked_embedding.token_ordering.copy_(torch.randperm(target["vocab_size"],
                                                                generator=torch.Generator().manual_seed(seed)))
    dr.generation_config.num_assistant_tokens = num_assistant_tokens
    dr.save_pretrained(str(path))
    return dr


# --- DiffusionGemma (`diffusion_gemma`; transformers DiffusionGemmaForBlockDiffusion) ------------------------------
DIFFUSION_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, sliding_window=8, num_experts=8, top_k_experts=2,
                      moe_intermediate_size=32, global_head_dim=32, num_global_key_value_heads=1,
                      max_position_embeddings=512, use_bidirectional_attention="vision",
                      layer_types=[_SLIDE, _FULL, _SLIDE, _FULL])
# A short schedule so tests stay fast; entropy_bound 0.5 accepts a few tokens per step on a random model.
DIFFUSION_GENERATION = {"max_denoising_steps": 6, "t_min": 0.4, "t_max": 0.8,
                        "sampler_config": {"entropy_bound": 0.5, "_cls_name": "EntropyBoundSamplerConfig"},
                        "stability_threshold": 1, "confidence_threshold": 0.005, "eos_token_id": [1],
                        "pad_token_id": 0}


def make_diffusion_reference(path: Path, seed: int = 0, canvas_length: int = 8):
    """A tiny DiffusionGemmaForBlockDiffusion, randomised like the others (self-conditioning at full scale: its
    denoising chain is chaotic, so seeded generation matches only if the forwards are bit-identical), saved with
    a generation_config.json; returns it."""
    import json

    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    cfg = DiffusionGemmaConfig(text_config=copy.deepcopy(DIFFUSION_TEXT), vision_config=None,
                               canvas_length=canvas_length)
    ref = DiffusionGemmaForBlockDiffusion(cfg).eval()
    randomize(ref, seed)
    ref.save_pretrained(str(path))
    (Path(path) / "generation_config.json").write_text(json.dumps(DIFFUSION_GENERATION))
    return DiffusionGemmaForBlockDiffusion.from_pretrained(str(path)).eval()
