"""CLI front ends over `llm.chat` / `llm.generate`: `unigemma chat` (REPL), `generate` (one shot) and `bench`.

The REPL streams answers, shows reasoning dimmed and apart from the answer, and takes commands:
    /image PATH   attach an image to the next message      /audio PATH   attach an audio file
    /think on|off thinking mode                            /reset        forget the conversation
    /save FILE    write the conversation as JSON           /quit         leave (also Ctrl-D)
Ctrl-C stops the answer being generated, not the session.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


DRAFTER_HELP = ("MTP drafter checkpoint folder, or a smaller checkpoint sharing the tokenizer as draft model (default: "
                "the bundled demo drafter with the bundled model, none otherwise); 'none' turns speculative "
                "drafting with a drafter off")


def drafter_arg(value: str | None):
    """--drafter → load(drafter=...): a folder, None (the default), or False for 'none' / 'off'."""
    if value is not None and value.strip().lower() in ("none", "off"):
        return False
    return value


ADAPTER_HELP = "a LoRA adapter folder (PEFT layout: adapter_config.json + adapter_model.safetensors) trained on --model; merged on load"


def add_model_flags(s) -> None:
    s.add_argument("--model", default=None, help="checkpoint folder (default: the bundled demo model)")
    s.add_argument("--drafter", default=None, help=DRAFTER_HELP)
    s.add_argument("--adapter", default=None, help=ADAPTER_HELP)
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"])
    s.add_argument("--quantize", default=None, choices=["int8", "int4"])
    s.add_argument("--kv-dtype", default=None, choices=["bf16", "fp16", "fp32", "fp8"])


def load_from_args(args):
    import unigemma

    kw = {}
    if getattr(args, "kv_dtype", None):
        kw["kv_dtype"] = args.kv_dtype
    bar = LoadProgress("quantizing weights" if args.quantize else "loading weights")
    try:
        return unigemma.load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                             drafter=drafter_arg(args.drafter), progress=bar,
                             adapter=getattr(args, "adapter", None), **kw)
    finally:
        bar.close()


def _user_message(text: str, images: list[str], audios: list[str]) -> dict:
    if not images and not audios:
        return {"role": "user", "content": text}
    parts: list[dict] = [{"type": "image", "image": str(Path(p).expanduser())} for p in images]
    parts += [{"type": "audio", "audio": str(Path(p).expanduser())} for p in audios]
    if text:
        parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


# --- generate -------------------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    llm = load_from_args(args)
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    for name in ("max_denoising_steps", "t_min", "t_max", "entropy_bound"):  # DiffusionGemma options, when set
        if getattr(args, name, None) is not None:
            sampling[name] = getattr(args, name)
    if args.raw:
        if args.image or args.audio or args.json_schema:
            raise ValueError("--raw takes a plain text prompt: no --image / --audio / --json-schema")
        res = llm.generate(args.prompt, **sampling)
        out = {"text": res.text, "finish_reason": res.finish_reason, "usage": vars(res.usage)}
        print(json.dumps(out, ensure_ascii=False) if args.json else res.text)
        return 0
    rf = None
    if args.json_schema:
        schema = json.loads(Path(args.json_schema).read_text(encoding="utf-8"))
        rf = {"type": "json_schema", "json_schema": {"name": Path(args.json_schema).stem, "schema": schema,
                                                     "strict": True}}
    msgs = [_user_message(args.prompt, args.image or [], args.audio or [])]
    res = llm.chat(msgs, response_format=rf, enable_thinking=args.think, **sampling)
    if args.json:
        print(json.dumps({"content": res.content, "reasoning": res.reasoning, "tool_calls": res.tool_calls,
                          "finish_reason": res.finish_reason, "usage": vars(res.usage) if res.usage else None},
                         ensure_ascii=False))
    else:
        if res.reasoning:
            print(f"[reasoning] {res.reasoning}", file=sys.stderr)
        print(res.content)
    return 0


# --- chat -----------------------------------------------------------------------------------------------------
class Repl:
    def __init__(self, llm, args, inp=input, out=sys.stdout):
        self.llm, self.args, self.input, self.out = llm, args, inp, out
        self.messages: list[dict] = []
        self.images: list[str] = []
        self.audios: list[str] = []
        self.think = bool(getattr(args, "think", False))
        self.color = out.isatty()

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def dim(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.color else text

    def command(self, line: str) -> bool:
        """Handle a /command; False to quit."""
        cmd, _, rest = line.partition(" ")
        rest = rest.strip()
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/image":
            if not Path(rest).expanduser().is_file():
                self.say(f"no such file: {rest}")
            else:
                self.images.append(rest)
                self.say(f"(image attached: {rest})")
        elif cmd == "/audio":
            if not Path(rest).expanduser().is_file():
                self.say(f"no such file: {rest}")
            else:
                self.audios.append(rest)
                self.say(f"(audio attached: {rest})")
        elif cmd == "/think":
            if rest not in ("on", "off"):
                self.say("usage: /think on|off")
            else:
                self.think = rest == "on"
                self.say(f"(thinking {rest})")
        elif cmd == "/reset":
            self.messages, self.images, self.audios = [], [], []
            self.say("(conversation cleared)")
        elif cmd == "/save":
            Path(rest).write_text(json.dumps(self.messages, indent=2, ensure_ascii=False), encoding="utf-8")
            self.say(f"(saved {len(self.messages)} messages to {rest})")
        else:
            self.say("commands: /image PATH, /audio PATH, /think on|off, /reset, /save FILE, /quit")
        return True

    def answer(self, text: str) -> None:
        msg = _user_message(text, self.images, self.audios)
        self.images, self.audios = [], []
        content, reasoning = [], []
        stream = self.llm.chat(self.messages + [msg], enable_thinking=self.think, stream=True,
                               max_tokens=self.args.max_tokens, temperature=self.args.temperature)
        in_reasoning = False
        try:
            for ch in stream:
                if ch.reasoning:
                    if not in_reasoning:
                        self.say(self.dim("[thinking] "), end="")
                        in_reasoning = True
                    reasoning.append(ch.reasoning)
                    self.say(self.dim(ch.reasoning), end="")
                if ch.content:
                    if in_reasoning:
                        self.say()
                        in_reasoning = False
                    content.append(ch.content)
                    self.say(ch.content, end="")
                for tc in ch.tool_calls:
                    if "id" in tc:
                        self.say(self.dim(f"\n[tool call] {tc['function']['name']}"), end="")
        except KeyboardInterrupt:
            self.say(self.dim(" [stopped]"), end="")
        finally:
            close = getattr(stream, "close", None)
            if close:
                close()
        self.say()
        self.messages.append(msg)
        reply = {"role": "assistant", "content": "".join(content)}
        if reasoning:
            reply["reasoning_content"] = "".join(reasoning)
        self.messages.append(reply)

    def run(self) -> int:
        self.say(f"unigemma chat — {self.llm.path.name}. /image PATH, /audio PATH, /think on|off, /reset, "
                 "/save FILE, /quit")
        while True:
            try:
                line = self.input("> ")
            except EOFError:
                self.say()
                return 0
            except KeyboardInterrupt:
                self.say()
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return 0
                continue
            try:
                self.answer(line)
            except ValueError as e:  # bad media, too long a prompt: say it, keep the session
                self.say(f"error: {e}")
            except KeyboardInterrupt:  # Ctrl-C before the first token: drop this turn, keep the session
                self.say(self.dim(" [stopped]"))


def cmd_chat(args) -> int:
    return Repl(load_from_args(args), args).run()


# --- bench ----------------------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    """Prefill: one forward of the prompt into a fresh cache (the second of two: the first pays one-time costs).
    Decode: a greedy run streamed token by token, timed from its first token to its last, so neither the prefill
    nor a prefix-cache hit is counted in it."""
    import resource

    import torch

    from .inspect import human

    if args.prompt_tokens < 1 or args.new_tokens < 2:
        raise ValueError(f"--prompt-tokens must be >= 1 and --new-tokens >= 2, got {args.prompt_tokens} and "
                         f"{args.new_tokens}")
    llm = load_from_args(args)
    V = llm.config.text.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, V, (args.prompt_tokens,), generator=g).tolist()
    dev = llm.device
    with torch.inference_mode():
        cache = llm.model.make_cache(slots=1, max_len=args.prompt_tokens + args.new_tokens + 8)
        ids = torch.tensor([prompt], device=dev)
        pos = torch.arange(len(prompt), device=dev)[None]
        for _ in range(2):  # the first call pays one-time costs (allocations, kernel selection)
            t = time.perf_counter()
            llm.model.run(ids, position_ids=pos, cache=cache, logits_to_keep=1)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            prefill = time.perf_counter() - t
    opts = dict(max_tokens=args.new_tokens, temperature=0, ignore_eos=True, speculative=False)
    llm.generate(prompt, **opts)  # warm-up
    stamps: list[tuple[float, int]] = []  # (time a chunk arrived, tokens so far)
    n = 0
    for chunk in llm.generate(prompt, stream=True, **opts):
        n += len(chunk.token_ids)
        stamps.append((time.perf_counter(), n))
    (t_first, n_first), (t_last, n_last) = stamps[0], stamps[-1]
    decode_tokens, decode_s = n_last - n_first, t_last - t_first
    if decode_tokens < 1 or decode_s <= 0:
        raise ValueError(f"decode produced {n_last} tokens in one step: nothing to time (raise --new-tokens)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = [
        {"bench": "prefill", "impl": "unigemma", "metric": "tokens_per_s", "value": len(prompt) / prefill,
         "unit": "tok/s", "prompt_tokens": len(prompt), "seconds": prefill},
        {"bench": "decode", "impl": "unigemma", "metric": "tokens_per_s", "value": decode_tokens / decode_s,
         "unit": "tok/s", "batch": 1, "prompt_tokens": len(prompt), "new_tokens": decode_tokens, "seconds": decode_s},
        {"bench": "memory", "impl": "unigemma", "metric": "peak_rss_bytes", "value": peak, "unit": "B"},
    ]
    for r in rows:
        r.update(device=str(dev), config=llm.path.name)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    pre, dec = rows[0], rows[1]
    print(f"prefill  {pre['value']:>10,.1f} tok/s   {pre['prompt_tokens']} tokens in {_secs(prefill)}")
    print(f"decode   {dec['value']:>10,.1f} tok/s   {decode_tokens} tokens in {_secs(decode_s)} "
          f"({_secs(decode_s / decode_tokens)} per token, batch 1)")
    print(f"memory   {human(peak):>16}   peak resident (RSS) on {dev}")
    return 0


def _secs(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


class LoadProgress:
    """A progress bar (rich) on stderr while tensors are read / quantized; silent when stderr is not a terminal."""

    def __init__(self, label: str = "loading weights"):
        self.label = label
        self.bar = None
        self.task = None

    def __call__(self, done: int, total: int) -> None:
        if not sys.stderr.isatty():
            return
        if self.bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=total)
        self.bar.update(self.task, completed=done, total=total)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
