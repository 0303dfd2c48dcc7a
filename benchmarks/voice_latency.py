"""End-of-speech → first-token latency: streaming prefill (audio prefilled while it arrives) vs one-shot prefill.

    python benchmarks/voice_latency.py [--model DIR] [--config demo|tiny|family] [--seconds 5] [--chunk-ms 200]
                                       [--reps 3]

Model: --model, else the bundled demo model when it is installed (unless --config family), else a random model
built on the spot with the tiny test tokenizer: gemma4_unified ("demo": hidden 512, 8 layers; "tiny": hidden 128,
4 layers), or "family": a `gemma4` E2B/E4B-style model (hidden 512, 8 layers, per-layer inputs, KV sharing) with
its audio conformer (hidden 256, 4 layers, 128 mel bins) and vision encoder — there the streaming impl runs the mel
front end and the encoder chunk by chunk (AudioStream), the one-shot impl runs the encoder over the whole clip
inside the prefill (its mel features are computed before the clock starts, which favours it slightly).
Both impls run on the same one-slot engine without the prefix cache (which would otherwise serve the repeated
audio from memory and hide the prefill):

    unigemma          the turn (system prompt, user text, S seconds of audio in chunk-ms chunks) is appended to a
                      live request chunk by chunk, each chunk prefilled on arrival; the clock starts at commit
    unigemma-oneshot  the same message through build_prompt → one request; the clock starts when it is added

One JSON line per measurement (DESIGN.md §6): bench "voice_latency", metric "first_token_ms" (median of --reps),
plus "chunk_prefill_ms" for the streaming impl (the median time one chunk takes to frame / encode and prefill:
below chunk-ms means it keeps up with speech) and "speedup" (one-shot ÷ streaming). The streaming clock starts
before the turn is closed, so the last partial frame (and for the family the encoder's tail) is counted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SIZES = {
    "demo": {"hidden": 512, "layers": 8, "heads": 8, "kv": 4, "head_dim": 64, "vocab": 4096},
    "tiny": {"hidden": 128, "layers": 4, "heads": 4, "kv": 2, "head_dim": 32, "vocab": 1024},
}


def emit(**kw):
    print(json.dumps(kw), flush=True)


def build_random(size: str, root: Path) -> Path:
    """A random gemma4_unified checkpoint with audio (and vision) plus the tiny Gemma-4 tokenizer."""
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    from unigemma.testing import write_tiny_tokenizer

    s = SIZES[size]
    ids = write_tiny_tokenizer(root)
    vocab = max(s["vocab"], len(json.loads((root / "tokenizer.json").read_text())["model"]["vocab"]) + 1)
    text = dict(vocab_size=vocab, hidden_size=s["hidden"], intermediate_size=4 * s["hidden"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                head_dim=s["head_dim"], global_head_dim=2 * s["head_dim"], num_global_key_value_heads=1,
                attention_k_eq_v=True, sliding_window=128, final_logit_softcapping=30.0,
                max_position_embeddings=8192, pad_token_id=ids["pad_token"], bos_token_id=ids["bos_token"],
                eos_token_id=[ids["eos_token"], ids["eot_token"]],
                layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * (s["layers"] // 4))
    cfg = Gemma4UnifiedConfig(text_config=text, image_token_id=ids["image_token"], audio_token_id=ids["audio_token"],
                              video_token_id=ids["video_token"], boi_token_id=ids["boi_token"],
                              eoi_token_id=ids["eoi_token"], boa_token_id=ids["boa_token"],
                              eoa_token_index=ids["eoa_token"], audio_config={},
                              vision_config=dict(mm_embed_dim=48, output_proj_dims=48, mm_posemb_size=64))
    torch.manual_seed(0)
    Gemma4UnifiedForConditionalGeneration(cfg).eval().save_pretrained(str(root))
    return root


def build_random_family(root: Path) -> Path:
    """A random `gemma4` checkpoint, E-model style (per-layer inputs, KV sharing), with audio and vision encoders."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    from unigemma.testing import write_tiny_tokenizer

    s = SIZES["demo"]
    ids = write_tiny_tokenizer(root)
    vocab = max(s["vocab"], len(json.loads((root / "tokenizer.json").read_text())["model"]["vocab"]) + 1)
    text = dict(vocab_size=vocab, vocab_size_per_layer_input=vocab, hidden_size=s["hidden"],
                intermediate_size=4 * s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                num_key_value_heads=1, head_dim=s["head_dim"], global_head_dim=2 * s["head_dim"],
                hidden_size_per_layer_input=64, num_kv_shared_layers=3, sliding_window=128,
                final_logit_softcapping=30.0, max_position_embeddings=8192, pad_token_id=ids["pad_token"],
                bos_token_id=ids["bos_token"], eos_token_id=[ids["eos_token"], ids["eot_token"]],
                layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * (s["layers"] // 4))
    cfg = Gemma4Config(text_config=text, image_token_id=ids["image_token"], audio_token_id=ids["audio_token"],
                       video_token_id=ids["video_token"], boi_token_id=ids["boi_token"], eoi_token_id=ids["eoi_token"],
                       boa_token_id=ids["boa_token"], eoa_token_index=ids["eoa_token"],
                       audio_config=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                         output_proj_dims=256),
                       vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, head_dim=64))
    torch.manual_seed(0)
    Gemma4ForConditionalGeneration(cfg).eval().save_pretrained(str(root))
    return root


def speech(seconds: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.2 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
            + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--config", default="demo", choices=sorted(SIZES) + ["family"])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--chunk-ms", type=float, default=200.0)
    ap.add_argument("--reps", type=int, default=3)
    # one thread by default: on a shared 2-core machine a 2-thread parallel region stalls on whichever core is
    # busy with someone else, which turns 2-ms forwards into 100s of ms of noise
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    import unigemma
    from unigemma.api import demo_model_path
    from unigemma.engine.generate import Engine, sampling_params
    from unigemma.engine.scheduler import Request
    from unigemma.engine.session import LiveRequest
    from unigemma.realtime import IncrementalPrompt

    tmp = None
    if a.model:
        path, label = Path(a.model), Path(a.model).name
    elif a.config == "family":
        tmp = tempfile.TemporaryDirectory()
        path, label = build_random_family(Path(tmp.name)), "random-family"
    elif (demo_model_path() / "config.json").is_file():
        path, label = demo_model_path(), "demo"
    else:
        tmp = tempfile.TemporaryDirectory()
        path, label = build_random(a.config, Path(tmp.name)), f"random-{a.config}"
    llm = unigemma.load(path, device=a.device, dtype="float32" if a.device == "cpu" else "bfloat16")
    params = sampling_params(llm, max_tokens=1, temperature=0)
    eng = Engine(llm.model, llm.tokenizer, llm.eos_token_ids, None, max_slots=1, max_model_len=min(4096, llm.config.text.max_position_embeddings),
                 prefix_cache=False, speculative=None, device=llm.device)
    wave = speech(a.seconds)
    step = int(16000 * a.chunk_ms / 1000)
    system, question = "You are a helpful voice assistant.", "Answer the question in the recording."
    sync = (lambda: torch.cuda.synchronize()) if llm.device.type == "cuda" else (lambda: None)

    def streaming() -> tuple[float, list[float], int]:
        p = IncrementalPrompt(llm, system=system)
        pieces = [p.head()] if p.head().ids else []
        pieces += p.append_text(question)
        live, chunk_times = None, []
        for i in range(0, wave.size, step):
            t = time.perf_counter()
            pieces += p.append_audio(wave[i:i + step])
            for pc in pieces:
                if live is None:
                    live = LiveRequest(eng, pc.ids, params, pc.media)
                else:
                    live.rewind(pc.rewind)
                    live.extend(pc.ids, pc.media)
            sync()
            chunk_times.append(time.perf_counter() - t)
            pieces = []
        t0 = time.perf_counter()
        closing = p.close()  # the last partial frame, the encoder's tail and tokenizing the text are measured
        for pc in closing[:-1]:
            live.rewind(pc.rewind)
            live.extend(pc.ids, pc.media, prefill=False)
        live.rewind(closing[-1].rewind)
        events = live.close(closing[-1].ids, closing[-1].media)
        next(iter(events))
        sync()
        dt = time.perf_counter() - t0
        events.close()
        return dt, chunk_times, len(p.ids)

    def oneshot() -> tuple[float, int]:
        msgs = [{"role": "system", "content": system},
                {"role": "user", "content": [{"type": "text", "text": question},
                                             {"type": "audio", "audio": (wave, 16000)}]}]
        prompt = llm.build_prompt(msgs)
        t0 = time.perf_counter()
        it = eng.generate_stream(Request(prompt.input_ids, params, media=prompt.media))
        next(it)
        sync()
        dt = time.perf_counter() - t0
        it.close()
        return dt, len(prompt)

    streaming(), oneshot()  # warm-up
    s_times, c_times, o_times = [], [], []
    for _ in range(a.reps):
        dt, ct, n_stream = streaming()
        s_times.append(dt)
        c_times += ct
        dt, n_one = oneshot()
        o_times.append(dt)
    assert n_stream == n_one, (n_stream, n_one)
    dev = torch.cuda.get_device_name() if llm.device.type == "cuda" else (platform.processor() or platform.machine())
    common = {"bench": "voice_latency", "device": dev, "config": label, "audio_seconds": a.seconds,
              "chunk_ms": a.chunk_ms, "prompt_tokens": n_one, "threads": torch.get_num_threads(), "reps": a.reps}
    s_ms, o_ms = 1000 * statistics.median(s_times), 1000 * statistics.median(o_times)
    emit(impl="unigemma", metric="first_token_ms", value=round(s_ms, 2), unit="ms", **common)
    emit(impl="unigemma-oneshot", metric="first_token_ms", value=round(o_ms, 2), unit="ms", **common)
    emit(impl="unigemma", metric="chunk_prefill_ms", value=round(1000 * statistics.median(c_times), 2), unit="ms",
         **common)
    emit(impl="unigemma", metric="speedup", value=round(o_ms / s_ms, 2), unit="x", **common)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
