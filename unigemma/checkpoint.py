"""Checkpoint folders: find safetensors (single file or sharded index), build on the meta device, assign tensors.

Loading never unpickles (safetensors only) and never materialises the model twice: modules are built on the
`meta` device (no memory), then each tensor is read from its memory-mapped shard, cast to the requested dtype,
moved to the requested device, and assigned in place of the meta parameter. Peak host memory stays near the
model's own size.

Name map (spec/unified-model.md §12): the on-disk names written by transformers are the module names here; the
in-memory spellings of the reference (`model.embed_vision.patch_*`, `...multimodal_embedder.embedding_projection`)
and text-only checkpoints (`model.*` instead of `model.language_model.*`) are accepted too.

Errors name the file and the tensor: missing, unexpected or wrongly shaped tensors, truncated or corrupt files.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from .config import AssistantConfig, DiffusionConfig, load_config


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or its tensors do not match the config."""


_VISION_PARTS = ("patch_ln1", "patch_dense", "patch_ln2", "pos_embedding", "pos_norm")


def canonical_name(key: str, text_only: bool = False) -> str:
    """Map any accepted spelling of a tensor name to this package's module path."""
    if text_only and key.startswith("model.") and not key.startswith("model.language_model."):
        return "model.language_model." + key[len("model."):]
    if key.startswith("model.embed_vision.multimodal_embedder."):
        return "model.embed_vision." + key[len("model.embed_vision.multimodal_embedder."):]
    for part in _VISION_PARTS:
        if key.startswith(f"model.embed_vision.{part}"):
            return "model.vision_embedder." + key[len("model.embed_vision."):]
    return key


_TOWERS = {"vision_config": ("model.vision_tower.", "model.embed_vision."),
           "audio_config": ("model.audio_tower.", "model.embed_audio.")}
_SHARED_KV = re.compile(r"^model\.language_model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")


_DIFFUSION_TOWERS = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
_DIFFUSION_SHARED = re.compile(r"^model\.encoder\.language_model\.(?!layers\.\d+\.layer_scalar$)")


def diffusion_name(key: str) -> str:
    """DiffusionGemma: the encoder's copy of a shared weight (any but its layer scalars) → the decoder's name,
    where this package keeps the one copy (transformers ties them and writes the decoder's)."""
    return _DIFFUSION_SHARED.sub("model.decoder.", key)


def skipped_tensor(name: str, config) -> bool:
    """Tensors a checkpoint may hold that this package does not build: encoders a config names in
    `skipped_towers` (DiffusionGemma's vision tower) and the K/V projections of KV-sharing reuse layers (unused;
    the reference ignores them too). `name` is canonical."""
    for tower in getattr(config, "skipped_towers", ()):
        extra = _DIFFUSION_TOWERS if tower == "vision_config" else ()
        if name.startswith(_TOWERS[tower] + extra):
            return True
    m = _SHARED_KV.match(name)
    text = getattr(config, "text", None)
    return bool(m and text is not None and int(m.group(1)) < text.num_hidden_layers
                and text.kv_sharing_modes[int(m.group(1))] == "reuse")


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, in index order; clear errors when none are usable."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder (expected a directory with config.json and "
                              "model.safetensors or model.safetensors.index.json)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            wm = data["weight_map"]
            assert isinstance(wm, dict)
        except (json.JSONDecodeError, KeyError, AssertionError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object): {e}") from None
        files = []
        for name in dict.fromkeys(wm.values()):
            f = path / name
            if not f.is_file():
                raise CheckpointError(f"{index}: names shard {name!r}, which is missing from {path}")
            files.append(f)
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise CheckpointError(f"{path}: only pickle weights (.bin/.pt) found; unigemma loads safetensors only "
                              "(never unpickles). Convert with safetensors first.")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)


def read_header(f: Path) -> tuple[dict, int]:
    """Parse and validate a safetensors header: (entries, data start). Truncation and corruption are errors here,
    before any tensor is read."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{f}: not a safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size or n > 100 << 20:
            raise CheckpointError(f"{f}: corrupt safetensors header (declared length {n}, file size {size})")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{f}: corrupt safetensors header (invalid JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{f}: corrupt safetensors header (not an object)")
    start = 8 + n
    entries = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[e["dtype"]]
            shape = [int(x) for x in e["shape"]]
            a, b = (int(x) for x in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{f}: tensor {name!r} has a malformed header entry: {e!r}") from None
        numel = 1
        for x in shape:
            numel *= x
        if b - a != numel * torch.empty((), dtype=dtype).element_size() or a < 0:
            raise CheckpointError(f"{f}: tensor {name!r}: byte range {a}..{b} does not match shape {shape}")
        if start + b > size:
            raise CheckpointError(f"{f}: truncated: tensor {name!r} ends at byte {start + b}, file has {size}")
        entries[name] = (dtype, shape, a, b)
    return entries, start


def iter_tensors(files: list[Path]) -> Iterator[tuple[Path, str, Callable[[], torch.Tensor]]]:
    """Yield (file, name, loader) for every tensor. Headers of ALL files are validated first, so a truncated last
    shard fails before anything is loaded. Tensors are read with plain file reads into fresh tensors (not
    memory-mapped), so the page cache is not charged to the process: peak memory ≈ the model itself."""
    headers = [(f, *read_header(f)) for f in files]
    for f, entries, start in headers:
        with open(f, "rb") as fh:
            for name, (dtype, shape, a, b) in entries.items():
                def load(fh=fh, dtype=dtype, shape=shape, a=a, b=b, name=name, f=f):
                    t = torch.empty(shape, dtype=dtype)
                    buf = t.view(-1).view(torch.uint8).numpy() if t.numel() else None
                    fh.seek(start + a)
                    if buf is not None and fh.readinto(memoryview(buf)) != b - a:
                        raise CheckpointError(f"{f}: tensor {name!r} cannot be read completely (truncated?)")
                    return t
                yield f, name, load


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} is not supported (accepted: float32, bfloat16, float16 or a torch.dtype)")
    return table[dtype]


def checkpoint_dtype(path: Path, cfg_raw: dict) -> torch.dtype:
    name = cfg_raw.get("dtype") or cfg_raw.get("torch_dtype") or (cfg_raw.get("text_config") or {}).get("dtype")
    try:
        return _resolve_dtype(name) or torch.float32
    except ValueError:
        return torch.float32


def load_into(model: nn.Module, path: str | Path, *, dtype: torch.dtype, device: torch.device,
              text_only: bool = False, tied: tuple[str, str] | None = None,
              transform: Callable[[str, torch.Tensor, nn.Module], nn.Module | None] | None = None,
              progress: Callable[[int, int], None] | None = None,
              skip: Callable[[str], bool] | None = None, rename: Callable[[str], str] | None = None) -> int:
    """Assign every checkpoint tensor to `model` (built on the meta device).

    tied: (alias, source) parameter names that share storage (e.g. ("lm_head.weight", embed weight)); the alias
    may be absent from the files. transform(name, tensor, module) may replace the owning Linear (quantize-on-load).
    skip(canonical name) → True: the tensor is not read (see `skipped_tensor`). Returns how many were skipped.
    """
    files = weight_files(path)
    expected = dict(model.named_parameters(remove_duplicate=False))
    expected.update(dict(model.named_buffers(remove_duplicate=False)))
    seen: dict[str, Path] = {}
    total = len(expected)
    skipped = 0
    for f, raw_name, load in iter_tensors(files):
        name = canonical_name(raw_name, text_only) if rename is None else rename(raw_name)
        if name not in expected and skip is not None and skip(name):
            skipped += 1
            continue
        if name not in expected:
            raise CheckpointError(f"{f}: unexpected tensor {raw_name!r} (no such parameter in a "
                                  f"{type(model).__name__} built from this config.json)")
        if name in seen:
            raise CheckpointError(f"{f}: tensor {raw_name!r} appears twice (also in {seen[name]})")
        t = load()
        want = expected[name]
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(f"{f}: tensor {raw_name!r} has shape {tuple(t.shape)}, but config.json implies "
                                  f"{tuple(want.shape)}")
        if t.is_floating_point():
            t = t.to(dtype)
        t = t.to(device)
        _assign(model, name, t, transform)
        seen[name] = f
        if progress is not None:
            progress(len(seen), total)
    missing = [n for n in expected if n not in seen and not (tied and n == tied[0])]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{more}")
    if tied is not None:
        alias, source = tied
        mod_name, _, attr = alias.rpartition(".")
        src_mod, _, src_attr = source.rpartition(".")
        setattr(model.get_submodule(mod_name), attr, getattr(model.get_submodule(src_mod), src_attr))
    return skipped


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, transform=None) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if transform is not None:
        replaced = transform(name, tensor, mod)
        if replaced is not None:
            parent_name, _, child = mod_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, replaced)
            return
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = tensor
    else:  # pragma: no cover - guarded by the `expected` check
        raise CheckpointError(f"cannot place tensor {name!r}")


def build_model(path: str | Path, dtype=None, device: str | torch.device = "cpu", progress=None, transform=None):
    """(model, config) for the checkpoint at `path`: a `Gemma4Unified` or an MTP drafter, in eval mode."""
    from .model.assistant import Gemma4Assistant
    from .model.diffusion import DiffusionGemma
    from .model.unified import Gemma4Unified

    path = Path(path)
    cfg = load_config(path)
    torch_dtype = _resolve_dtype(dtype) or checkpoint_dtype(path, cfg.raw)
    device = torch.device(device)
    rename = None
    with torch.device("meta"):
        if isinstance(cfg, DiffusionConfig):
            model = DiffusionGemma(cfg)
            tied = ("lm_head.weight", "model.decoder.embed_tokens.weight")
            text_only, rename = False, diffusion_name
        elif isinstance(cfg, AssistantConfig):
            model = Gemma4Assistant(cfg)
            tied = ("lm_head.weight", "model.embed_tokens.weight") if cfg.tie_word_embeddings else None
            text_only = False
        else:
            model = Gemma4Unified(cfg)
            tied = ("lm_head.weight", "model.language_model.embed_tokens.weight") if cfg.tie_word_embeddings else None
            text_only = cfg.is_text_only
    load_into(model, path, dtype=torch_dtype, device=device, text_only=text_only, tied=tied,
              transform=transform, progress=progress, skip=lambda name: skipped_tensor(name, cfg), rename=rename)
    towers = getattr(cfg, "skipped_towers", ())
    if towers:
        warnings.warn(f"{path}: this {cfg.model_type} checkpoint's {' and '.join(t.split('_')[0] for t in towers)} "
                      "encoder(s) are not supported by unigemma yet; their tensors were skipped and those inputs are "
                      "refused", UserWarning, stacklevel=2)
    model.eval()
    return model, cfg


def save_model(model: nn.Module, path: str | Path, config_dict: dict, max_shard_bytes: int = 2 << 30,
               skip: tuple[str, ...] = ("lm_head.weight",), metadata: dict | None = None) -> None:
    """Write config.json and safetensors shards (+ index when more than one) in the published layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", True)
    state = {k: v for k, v in model.state_dict().items() if not (tied and k in skip)}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v.detach().contiguous().cpu()
        size += nbytes
    for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        old.unlink()
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata=meta)
    else:
        wm = {}
        for i, sh in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(sh, str(path / name), metadata=meta)
            wm.update({k: name for k in sh})
        total = sum(v.numel() * v.element_size() for v in state.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2), encoding="utf-8")
    (path / "config.json").write_text(json.dumps(config_dict, indent=2), encoding="utf-8")
