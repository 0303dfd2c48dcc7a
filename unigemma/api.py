"""The public Python API (DESIGN.md §4): `unigemma.load(...)` → `LLM`.

`LLM` ties a checkpoint's pieces together: `.config`, `.tokenizer`, `.model` (inputs → logits). Generation and chat
are added by the engine and inputs layers; this module only loads and wires.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import build_model
from .config import AssistantConfig, DiffusionConfig, load_config


def demo_model_path() -> Path:
    """Folder of the bundled demo model (unigemma/demo/model)."""
    return Path(__file__).resolve().parent / "demo" / "model"


def demo_drafter_path() -> Path:
    """Folder of the bundled demo model's MTP drafter (unigemma/demo/drafter; `load(None)` uses it when present)."""
    return Path(__file__).resolve().parent / "demo" / "drafter"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not valid (accepted: 'auto', 'cpu', 'cuda', 'cuda:N', 'mps')") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available on this machine")
    return dev


class LLM:
    """A loaded checkpoint: `.config`, `.tokenizer`, `.model`, and (optionally) `.drafter`."""

    def __init__(self, model, config, tokenizer, path: Path, device: torch.device, drafter=None):
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.path = path
        self.device = device
        self.drafter = drafter
        self.generation_config = _read_generation_config(path)
        self.default_image_tokens = read_default_image_tokens(path)
        self.mel_settings = None  # the family's audio front end, with the checkpoint's own settings
        if getattr(config, "audio_tower", None) is not None:
            from .inputs.mel import MelSettings

            self.mel_settings = MelSettings.from_checkpoint(path)

    # --- prompts ----------------------------------------------------------------------------------------------
    @property
    def template(self):
        """The checkpoint's chat template (tokenizer files), or unigemma's bundled Gemma 4 template if it has none."""
        if getattr(self, "_template", None) is None:
            from .inputs.template import ChatTemplate

            if self.tokenizer is None:
                raise ValueError(f"{self.path} has no tokenizer.json: chat needs a tokenizer")
            self._template = (ChatTemplate.from_tokenizer(self.tokenizer) if self.tokenizer.chat_template
                              else ChatTemplate.bundled(self.tokenizer.specials))
        return self._template

    def render(self, messages, tools=None, enable_thinking: bool = False, add_generation_prompt: bool = True,
               **template_kwargs) -> str:
        """The prompt text the checkpoint's chat template makes of `messages` (OpenAI shape)."""
        from .inputs.template import normalize_messages

        return self.template.render(normalize_messages(messages), tools=tools, enable_thinking=enable_thinking,
                                    add_generation_prompt=add_generation_prompt, **template_kwargs)

    def build_prompt(self, messages, tools=None, enable_thinking: bool = False, add_generation_prompt: bool = True,
                     resolve=None, limits=None, **template_kwargs):
        """Messages (with images / audio / video parts) → `Prompt` (token ids + the model's media tensors)."""
        from .inputs.prompt import MediaLimits, build_prompt

        if limits is None:
            limits = MediaLimits(default_image_tokens=self.default_image_tokens)
        return build_prompt(messages, self.tokenizer, self.template, self.config, tools=tools,
                            enable_thinking=enable_thinking, add_generation_prompt=add_generation_prompt,
                            resolve=resolve, limits=limits, mel=self.mel_settings, **template_kwargs)

    # --- generation ---------------------------------------------------------------------------------------
    def generate(self, prompt, max_tokens: int | None = 256, temperature: float | None = None, top_p=None,
                 top_k=None, seed: int | None = None, stop=None, stream: bool = False, **options):
        """Raw-prompt generation (no chat template): text (BOS added) or token ids → result / chunk iterator.
        See unigemma.engine.generate.generate for every option."""
        from .engine.generate import generate

        return generate(self, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                        seed=seed, stop=stop, stream=stream, **options)

    def chat(self, messages, tools=None, tool_choice=None, response_format=None, enable_thinking: bool = False,
             stream: bool = False, **sampling):
        """Chat with OpenAI-style messages → ChatResult(.content, .reasoning, .tool_calls, .usage) or chunks."""
        from .chat import chat

        return chat(self, messages, tools=tools, tool_choice=tool_choice, response_format=response_format,
                    enable_thinking=enable_thinking, stream=stream, **sampling)

    def session(self, **kw):
        """A live voice / text turn whose prompt is prefilled while it grows (unigemma.realtime.Session)."""
        from .realtime import Session

        return Session(self, **kw)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.generation_config.get("eos_token_id", self.config.text.eos_token_id)
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        return ids

    def __repr__(self) -> str:
        return f"LLM(path={str(self.path)!r}, device={self.device}, dtype={next(self.model.parameters()).dtype})"


def _read_json_dict(f: Path) -> dict:
    """A checkpoint folder's optional JSON file as a dict ({} when absent or not an object); bad JSON names the file."""
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: invalid JSON ({e})") from None
    return d if isinstance(d, dict) else {}


def _read_generation_config(path: Path) -> dict:
    return _read_json_dict(Path(path) / "generation_config.json")


def read_default_image_tokens(path: Path) -> int:
    """The image soft-token budget a checkpoint's processor uses when a request names none: `max_soft_tokens` of
    processor_config.json's "image_processor" (or of preprocessor_config.json); 280 when neither file sets it."""
    from .inputs.image import DEFAULT_MAX_SOFT_TOKENS, SOFT_TOKEN_BUDGETS

    for name, keys in (("processor_config.json", ("image_processor", "max_soft_tokens")),
                       ("preprocessor_config.json", ("max_soft_tokens",))):
        f = Path(path) / name
        value = _read_json_dict(f)
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        if value is None:
            continue
        if isinstance(value, bool) or value not in SOFT_TOKEN_BUDGETS:
            raise ValueError(f"{f}: {'.'.join(keys)} must be one of {SOFT_TOKEN_BUDGETS}, got {value!r}")
        return int(value)
    return DEFAULT_MAX_SOFT_TOKENS


MODEL_FOLDER = ("a checkpoint folder: config.json, tokenizer.json and model.safetensors (or sharded "
                "model-*.safetensors with model.safetensors.index.json), as published on the Hub")
DRAFTER_FOLDER = ("an MTP drafter checkpoint folder (gemma4_unified_assistant or gemma4_assistant): config.json and "
                  "model.safetensors")
DRAFTER_OFF = ("none", "off")  # the spellings of "no drafter" (also the CLI's --drafter none)


def check_model_folder(path: Path, what: str = "model") -> None:
    """A clear error when `path` is not a folder holding config.json (a file, a missing path, an empty folder)."""
    form = MODEL_FOLDER if what == "model" else DRAFTER_FOLDER + "; or 'none' for no drafter"
    if path.is_file():
        raise ValueError(f"{what} {str(path)!r} is a file, not a {what}: the {what} is {form}")
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r}: no such folder; the {what} is {form}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} has no config.json: the {what} is {form}")


def _check_draft_model(dpath: Path, dcfg, path: Path, cfg) -> None:
    """A draft model proposes token ids the target verifies: both must read and write the same vocabulary."""
    if dcfg.text.vocab_size != cfg.text.vocab_size:
        raise ValueError(f"drafter {dpath}: vocab_size {dcfg.text.vocab_size} != the target's {cfg.text.vocab_size}; "
                         "a draft model must share the target's tokenizer")
    a, b = dpath / "tokenizer.json", path / "tokenizer.json"
    if a.is_file() and b.is_file():
        va = json.loads(a.read_text(encoding="utf-8")).get("model", {}).get("vocab")
        vb = json.loads(b.read_text(encoding="utf-8")).get("model", {}).get("vocab")
        if va != vb:
            raise ValueError(f"drafter {dpath}: its tokenizer.json vocabulary differs from the target's ({b}); a "
                             "draft model must share the target's tokenizer")


SHIPPED_DRAFTER_DIRS = ("assistant", "drafter")  # a checkpoint folder that ships its MTP drafter beside it


def shipped_drafter(path: Path) -> Path | None:
    """The MTP drafter a checkpoint folder ships in a subfolder (`assistant/` or `drafter/`), else None."""
    from .config import ASSISTANT_TYPES, read_config_json

    for name in SHIPPED_DRAFTER_DIRS:
        cfg = path / name / "config.json"
        if cfg.is_file():
            try:
                if read_config_json(cfg).get("model_type") in ASSISTANT_TYPES:
                    return path / name
            except ValueError:
                return None
    return None


def load(path: str | Path | None = None, device: str | torch.device = "auto", dtype=None, quantize=None,
         drafter: str | Path | bool | None = None, progress=None, kv_dtype=None,
         adapter: str | Path | None = None) -> LLM:
    """Load a Gemma 4 checkpoint folder (None: the bundled demo model): `gemma4_unified` / `gemma4_unified_text`,
    or the family's `gemma4` / `gemma4_text` (E2B, E4B, 26B-A4B, 31B, with their vision / audio encoders).

    drafter: an MTP drafter folder (`gemma4_unified_assistant`, or `gemma4_assistant` for the family), or a smaller
    checkpoint that shares the target's tokenizer as a draft model (E2B drafting for 31B; stored quantized, or
    quantized as the target when `quantize` is given) → `llm.drafter`, which generation uses for speculative
    decoding; None: the bundled demo drafter when `path` is
    None and unigemma/demo/drafter exists, the MTP drafter the folder ships in `assistant/` or `drafter/`, else
    none; False, "none" or "off" (the CLI's spellings): no drafter.
    The drafter's generation_config.json (num_assistant_tokens) becomes `llm.drafter.generation_config`, the
    engine's draft length.

    quantize: None | "int8" | "int4" | `unigemma.quant.QuantConfig` — weight-only quantization of the decoder
    linears and MoE experts (and, by default, the embedding / LM head table as int8), applied while tensors stream
    from disk. A checkpoint written by `unigemma quantize` (or a compressed-tensors pack-quantized one) loads
    quantized without it. kv_dtype: None (the model's dtype) | "bf16" | "fp16" | "fp32" | "fp8" → `llm.kv_dtype`, the
    storage dtype the engine gives the KV cache.

    adapter: a LoRA adapter folder in PEFT's layout (adapter_config.json + adapter_model.safetensors, as
    `unigemma train` and PEFT write them) trained on `path`. It is merged into float weights (no cost per token);
    with `quantize`, it is merged first and the sum quantized; on a checkpoint stored as int8 / int4 it stays a
    small float side branch. `llm.adapter` is the folder.
    """
    from . import quant
    from .adapters import apply_adapter, read_adapter
    from .inputs.tokenizer import Tokenizer

    if isinstance(drafter, str) and drafter.strip().lower() in DRAFTER_OFF:
        drafter = False
    if drafter is True:
        raise ValueError("drafter=True is ambiguous: pass a drafter folder, None (the bundled demo drafter with the "
                         "bundled model) or False (no drafter)")
    if path is None:
        if drafter is None and (demo_drafter_path() / "config.json").is_file():
            drafter = demo_drafter_path()
        path = demo_model_path()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"no bundled demo model at {path}: this build of unigemma does not ship one yet; pass the folder "
                "of a gemma4_unified checkpoint (config.json, safetensors, tokenizer.json)")
    path = Path(path)
    check_model_folder(path)
    if isinstance(load_config(path), DiffusionConfig):
        given = [n for n, v in (("quantize", quantize), ("adapter", adapter), ("kv_dtype", kv_dtype)) if v is not None]
        if drafter not in (None, False):
            given.append("drafter")
        if given:
            raise ValueError(f"{path} is a DiffusionGemma checkpoint (diffusion_gemma): {given} are not supported "
                             "for it yet (block diffusion needs no drafter); load it without them")
        drafter = False
    if drafter is None:
        drafter = shipped_drafter(path)
    if drafter is not None and drafter is not False:
        check_model_folder(Path(drafter), "drafter")
    qcfg = quant.QuantConfig.parse(quantize)
    if adapter is not None:
        read_adapter(adapter)  # a wrong folder fails before the (long) model load
    dev = resolve_device(device)
    kv = quant.resolve_kv_dtype(kv_dtype, None, dev)  # validated before the (long) load
    stored = quant.stored_quantization(path)
    if stored is not None:
        if qcfg is not None and qcfg.bits != stored["bits"]:
            raise ValueError(f"quantize={quantize!r}, but {path} is already quantized to int{stored['bits']}; pass "
                             f"quantize=None (or 'int{stored['bits']}') to load it, or quantize its float checkpoint")
        model, cfg = quant.load_quantized(path, dtype=dtype, device=dev, progress=progress)
        if adapter is not None:
            apply_adapter(model, adapter, merge=True)  # int layers keep a side branch
    elif qcfg is not None and adapter is None:
        model, cfg = quant.build_quantized(path, qcfg, dtype=dtype, device=dev, progress=progress)
    else:
        model, cfg = build_model(path, dtype=dtype, device=dev, progress=progress)
        if adapter is not None:
            apply_adapter(model, adapter, merge=True)
            if qcfg is not None:  # quantize the merged weights, not the base
                quant.quantize_model(model, qcfg)
    if isinstance(cfg, AssistantConfig):
        raise ValueError(f"{path} holds an MTP drafter ({cfg.model_type}); pass it as drafter=..., and the "
                         "target model's folder as the path")
    tok = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    draft = None
    if drafter is not None and drafter is not False:
        dpath = Path(drafter)
        ddtype = next(model.parameters()).dtype
        is_model = not isinstance(load_config(dpath), AssistantConfig)
        if is_model:  # a smaller model of the family as draft model: checked before its weights are read
            _check_draft_model(dpath, load_config(dpath), path, cfg)
        if quant.stored_quantization(dpath) is not None:  # a draft model stored quantized
            draft, dcfg = quant.load_quantized(dpath, dtype=ddtype, device=dev)
        elif qcfg is not None and is_model:
            draft, dcfg = quant.build_quantized(dpath, qcfg, dtype=ddtype, device=dev)  # quantized as the target
        else:
            draft, dcfg = build_model(dpath, dtype=ddtype, device=dev)
        if isinstance(dcfg, AssistantConfig) and dcfg.backbone_hidden_size != cfg.text.hidden_size:
            raise ValueError(f"drafter backbone_hidden_size {dcfg.backbone_hidden_size} != target hidden_size "
                             f"{cfg.text.hidden_size}")
        draft.generation_config = _read_generation_config(dpath)
    llm = LLM(model, cfg, tok, path, dev, draft)
    llm.quantization = stored or (qcfg.to_json() if qcfg is not None else None)  # None: float weights
    llm.adapter = Path(adapter) if adapter is not None else None
    llm.kv_dtype = kv or next(model.parameters()).dtype
    return llm
