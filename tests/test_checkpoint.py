"""Loader, config and inspect tests: every error names the file / tensor / field; memory stays near model size."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import unigemma
from unigemma.checkpoint import CheckpointError
from unigemma.config import ConfigError, load_config
from refmodels import make_reference


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "keqv"
    make_reference("keqv", path, seed=5, max_shard_size="60KB")
    return path


def clone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shards(path: Path) -> list[Path]:
    return sorted(path.glob("model-*.safetensors"))


def test_loads_sharded_and_single(ckpt, tmp_path):
    llm = unigemma.load(ckpt, device="cpu", dtype="float32")
    assert len(shards(ckpt)) > 3
    ids = torch.tensor([[2, 5, 9, 11]])
    sd = {}
    for f in shards(ckpt):
        sd.update(load_file(str(f)))
    single = tmp_path / "single"
    single.mkdir()
    save_file(sd, str(single / "model.safetensors"))
    shutil.copy(ckpt / "config.json", single / "config.json")
    llm2 = unigemma.load(single, device="cpu", dtype="float32")
    assert torch.equal(llm.model(ids), llm2.model(ids))
    # tied: the LM head is the embedding tensor itself
    m = llm.model
    assert m.lm_head.weight is m.model.language_model.embed_tokens.weight
    assert m.lm_head.weight.dtype == torch.float32


def test_dtype_cast(ckpt):
    llm = unigemma.load(ckpt, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in llm.model.parameters()} == {torch.bfloat16}
    assert llm.model.model.language_model.layers[0].layer_scalar.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        unigemma.load(ckpt, device="cpu", dtype="float8")


def _rewrite(path: Path, fn):
    """Apply fn(dict of tensors) -> dict to the shard holding the first key fn cares about."""
    for f in shards(path):
        sd = load_file(str(f))
        new = fn(dict(sd))
        if new is not None:
            save_file(new, str(f))
            return f
    raise AssertionError("no shard changed")


def test_missing_tensor(ckpt, tmp_path):
    p = clone(ckpt, tmp_path / "m")
    key = "model.language_model.layers.2.self_attn.q_proj.weight"

    def drop(sd):
        if key in sd:
            del sd[key]
            return sd
    _rewrite(p, drop)
    idx = json.loads((p / "model.safetensors.index.json").read_text())
    del idx["weight_map"][key]
    (p / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"missing tensors.*layers\.2\.self_attn\.q_proj\.weight"):
        unigemma.load(p, device="cpu")


def test_unexpected_tensor(ckpt, tmp_path):
    p = clone(ckpt, tmp_path / "u")

    def add(sd):
        sd["model.language_model.layers.0.self_attn.bogus.weight"] = torch.zeros(2)
        return sd
    f = _rewrite(p, add)
    with pytest.raises(CheckpointError, match=rf"{f.name}.*unexpected tensor 'model\.language_model\.layers\.0\.self_attn\.bogus\.weight'"):
        unigemma.load(p, device="cpu")


def test_wrong_shape(ckpt, tmp_path):
    p = clone(ckpt, tmp_path / "s")
    key = "model.language_model.norm.weight"

    def bad(sd):
        if key in sd:
            sd[key] = torch.ones(7)
            return sd
    f = _rewrite(p, bad)
    with pytest.raises(CheckpointError, match=rf"{f.name}.*'model\.language_model\.norm\.weight' has shape \(7,\).*\(64,\)"):
        unigemma.load(p, device="cpu")


def test_truncated_file(ckpt, tmp_path):
    p = clone(ckpt, tmp_path / "t")
    f = shards(p)[1]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f.name):
        unigemma.load(p, device="cpu")


def test_corrupt_header(ckpt, tmp_path):
    p = clone(ckpt, tmp_path / "c")
    f = shards(p)[0]
    data = bytearray(f.read_bytes())
    data[8:40] = b"{" * 32
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f.name):
        unigemma.load(p, device="cpu")


def test_missing_config_and_weights(ckpt, tmp_path):
    p = clone(ckpt, tmp_path / "nc")
    (p / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        unigemma.load(p, device="cpu")
    q = tmp_path / "nw"
    q.mkdir()
    shutil.copy(ckpt / "config.json", q / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        unigemma.load(q, device="cpu")
    # pickle weights are refused, never unpickled
    torch.save({"x": torch.zeros(1)}, q / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        unigemma.load(q, device="cpu")


def test_missing_shard(ckpt, tmp_path):
    p = clone(ckpt, tmp_path / "ms")
    victim = shards(p)[2]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        unigemma.load(p, device="cpu")


@pytest.mark.parametrize("field,value,match", [
    ("model_type", "llama", "model_type 'llama' is not supported"),
    ("text_config.num_attention_heads", 3, "multiple of its key/value heads"),
    ("text_config.layer_types", ["sliding_attention"], "layer_types"),
    ("text_config.hidden_activation", "relu", "hidden_activation"),
    ("text_config.use_bidirectional_attention", "all", "use_bidirectional_attention"),
    ("text_config.rope_parameters", {"full_attention": {"rope_type": "yarn"}}, "rope_type"),
    ("text_config.final_logit_softcapping", -1, "final_logit_softcapping"),
    ("vision_config.output_proj_dims", 7, "output_proj_dims"),
    ("text_config.hidden_size", "big", "hidden_size"),
])
def test_config_errors_name_the_field(ckpt, tmp_path, field, value, match):
    cfg = json.loads((ckpt / "config.json").read_text())
    d = cfg
    *parents, last = field.split(".")
    for k in parents:
        d = d[k]
    d[last] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path)


def test_config_12b_style_fields(tmp_path):
    """The published config uses global_head_dim / num_global_key_value_heads instead of per_layer_config."""
    from unigemma.config import gemma4_12b_config

    c = gemma4_12b_config().text
    assert c.layer_types.count("full_attention") == 8 and c.layer_types[5] == "full_attention"
    assert c.layer_head_dim[5] == 512 and c.layer_kv_heads[5] == 1 and c.layer_kv_heads[4] == 8
    assert c.kv_sharing_modes[46] == "store" and c.kv_sharing_modes[47] == "store"
    # trap: without k_eq_v the global kv-head override is ignored
    cfg = {"model_type": "gemma4_unified_text", "num_hidden_layers": 6, "global_head_dim": 64,
           "num_global_key_value_heads": 1, "attention_k_eq_v": False, "num_key_value_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    t = load_config(tmp_path).text
    assert t.layer_head_dim[5] == 64 and t.layer_kv_heads[5] == 4


def test_inspect_12b_geometry():
    out = subprocess.run([sys.executable, "-m", "unigemma.cli", "inspect", "gemma4-12b", "--json"],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info["parameters"] == 11_959_730_176
    assert info["weight_bytes"] == 11_959_730_176 * 2
    comp = info["parameters_by_component"]
    assert comp["embeddings"] == 1_006_632_960 and comp["vision"] == 49_922_304 and comp["audio"] == 2_457_600
    # KV: full layers 8 × 2 × 1 × 512 × 2 B = 16 KiB/token; sliding 40 × 2 × 8 × 256 × 2 B = 320 KiB/token (≤ window)
    assert info["kv_bytes_per_token"]["full"] == 16384 and info["kv_bytes_per_token"]["sliding"] == 327680
    # at a context: what the cache really allocates — every position in full layers, a ring of the window plus
    # spare entries (speculative rollback) in sliding ones, and the ring's int64 positions
    for name, n in (("8K", 8192), ("256K", 262144)):
        at = info["kv_bytes_at_context"][name]
        assert 16384 * n + 327680 * 1024 < at < 16384 * n + 327680 * (1024 + 64) + 10 ** 6, (name, at)


def test_inspect_kv_is_one_figure():
    """The table's KV at 32K and the --context 32768 plan line are the same accounting (they differed by the
    sliding layers' spare ring entries: 832.0 vs 842.0 MiB)."""
    args = [sys.executable, "-m", "unigemma.cli", "inspect", "gemma4-12b", "--context", "32768"]
    text = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    table = re.search(r"^KV at context .*\b32K: ([\d.]+ \w+)", text, re.M)
    plan = re.search(r"^plan .* \+ KV ([\d.]+ \w+) \+", text, re.M)
    assert table and plan and table.group(1) == plan.group(1), text
    info = json.loads(subprocess.run(args + ["--json"], capture_output=True, text=True, check=True).stdout)
    assert info["kv_bytes_at_context"]["32K"] == info["plan"]["kv_bytes"]


def test_inspect_tiny_checkpoint(ckpt):
    out = subprocess.run([sys.executable, "-m", "unigemma.cli", "inspect", str(ckpt), "--json"],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    llm = unigemma.load(ckpt, device="cpu", dtype="float32")
    assert info["parameters"] == sum(p.numel() for p in llm.model.parameters())
    # on disk: every parameter once (tied head not stored) + one float32 layer_scalar per layer
    assert info["weight_bytes_by_dtype"] == {"F32": info["parameters"] * 4 + info["layers"] * 4}
    human = subprocess.run([sys.executable, "-m", "unigemma.cli", "inspect", str(ckpt)],
                           capture_output=True, text=True, check=True).stdout
    assert "parameters" in human and "KV at context" in human
    bad = subprocess.run([sys.executable, "-m", "unigemma.cli", "inspect", "/nonexistent/dir"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "config.json" in bad.stderr


def test_peak_memory_of_loading(tmp_path):
    """Build a ~120 MB checkpoint, then load it in a fresh process: peak RSS growth ≤ 1.2 × model bytes."""
    from refmodels import BASE_TEXT
    from transformers import Gemma4UnifiedForCausalLM, Gemma4UnifiedTextConfig

    cfg = Gemma4UnifiedTextConfig(**{**BASE_TEXT, "vocab_size": 8192, "hidden_size": 768,
                                     "intermediate_size": 3072, "num_hidden_layers": 6, "head_dim": 64,
                                     "num_attention_heads": 8, "num_key_value_heads": 4}, global_head_dim=128)
    model = Gemma4UnifiedForCausalLM(cfg)
    model.save_pretrained(str(tmp_path), max_shard_size="20MB")
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    del model
    script = textwrap.dedent(f"""
        import gc, torch, unigemma
        def rss():
            for line in open('/proc/self/status'):
                if line.startswith('VmRSS'):
                    return int(line.split()[1]) * 1024
        # torch initialises ~80 MB of its own on the first module build (once per process, whatever the model
        # size): do that first so the measurement is the loader's cost alone.
        from unigemma.config import load_config
        from unigemma.model.unified import Gemma4Unified
        with torch.device('meta'):
            Gemma4Unified(load_config({str(tmp_path)!r}))
        gc.collect()
        base = rss()
        with open('/proc/self/clear_refs', 'w') as f:  # reset the peak (VmHWM) to the current RSS
            f.write('5')
        llm = unigemma.load({str(tmp_path)!r}, device='cpu', dtype='float32')
        peak = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
        print(base, peak)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    base, peak = int(out[0]), int(out[1])
    growth = peak - base
    assert growth <= 1.2 * nbytes, f"peak RSS grew {growth / 1e6:.1f} MB for a {nbytes / 1e6:.1f} MB model"
