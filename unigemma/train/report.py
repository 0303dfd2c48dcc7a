"""Watching a run: log records (stderr line + metrics.jsonl + TensorBoard / W&B), a progress bar with ETA, peak
memory, and generated answers to a few eval prompts.

    Reporter(record, line)  ─► stderr (the line; above the bar when one is drawn)
                            ─► output_dir/metrics.jsonl (every record)
                            ─► TensorBoard scalars / text (log.report_to: [tensorboard]), W&B (wandb, if installed)

Only the main process reports. What this module does not do: decide when to log (the loop does) or train.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(peak MiB, what was measured): CUDA's peak allocated memory, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_allocated"
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return (kb / 2**20 if sys.platform == "darwin" else kb / 1024), "rss"
    except ImportError:  # pragma: no cover - Windows
        return 0.0, "unknown"


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Reporter:
    """One place for everything a run reports; `close()` flushes the writers and ends the bar."""

    def __init__(self, out: Path, enabled: bool, total_steps: int, start_step: int = 0, progress: str = "auto",
                 report_to: tuple[str, ...] | list[str] = (), config: dict | None = None,
                 wandb_project: str = "unigemma"):
        self.enabled = enabled
        self.path = out / "metrics.jsonl" if enabled else None
        self.total, self.start = total_steps, start_step
        self.t0 = time.perf_counter()
        self.tb = self.wandb = self.bar = None
        if not enabled:
            return
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # torch's writer needs the tensorboard package
                raise ValueError(f"log.report_to: tensorboard needs the tensorboard package ({e}); pip install "
                                 "'unigemma[train]'") from None
            self.tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise ValueError("log.report_to: wandb is not installed (pip install wandb), or drop it from "
                                 "log.report_to") from None
            self.wandb = wandb.init(project=wandb_project, dir=str(out), config=config or {}, resume="allow")
        if progress == "bar" or (progress == "auto" and sys.stderr.isatty()):
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                transient=False, console=Console(stderr=True))
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, info="")
            self.bar.start()

    def eta_s(self, step: int) -> float | None:
        """Seconds left at the mean pace of the steps this process has run (None before the first)."""
        done = step - self.start
        if done <= 0:
            return None
        return (time.perf_counter() - self.t0) / done * (self.total - step)

    def step(self, step: int, info: str = "") -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)

    def __call__(self, record: dict, line: str | None = None) -> None:
        if not self.enabled:
            return
        if line:
            if self.bar is not None:
                self.bar.console.print(line, highlight=False, markup=False)
            else:
                print(line, file=sys.stderr, flush=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        step = record.get("step")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "step"}
        if self.tb is not None and step is not None:
            group = "eval" if any(k.startswith("eval") for k in scalars) else "train"
            for k, v in scalars.items():
                self.tb.add_scalar(f"{group}/{k}", v, step)
            for i, g in enumerate(record.get("generations", [])):
                self.tb.add_text(f"eval/generation_{i}", f"**prompt** {g['prompt']}\n\n**expected** "
                                 f"{g['expected']}\n\n**generated** {g['generated']}", step)
        if self.wandb is not None and step is not None:
            self.wandb.log(scalars, step=step)

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


# --- generation samples at eval -------------------------------------------------------------------------------

def eval_prompts(path: str | Path, template, tokenizer, limit: int) -> list[dict]:
    """The first `limit` conversations of a chat JSONL as {"prompt_ids", "prompt", "expected"}: rendered up to (not
    including) the last assistant message, with the generation prompt; the expected answer is that message."""
    from ..inputs.template import normalize_messages
    from .data import DataError, read_jsonl

    out = []
    for rec in read_jsonl(path, extra_keys="ignore", limit=limit):
        last = max(i for i, m in enumerate(rec.messages) if isinstance(m, dict) and m.get("role") == "assistant")
        msgs = rec.messages[:last]
        if any(isinstance(m.get("content"), list) and any(isinstance(p, dict) and p.get("type") not in ("text",)
                                                            for p in m["content"]) for m in msgs):
            raise DataError(f"{rec.where}: eval.prompts are text conversations (generation samples take no media)")
        text = template.render(normalize_messages(msgs), tools=rec.tools, add_generation_prompt=True,
                               enable_thinking=rec.enable_thinking)
        expected = rec.messages[last].get("content")
        if isinstance(expected, list):
            expected = "".join(p.get("text", "") for p in expected if isinstance(p, dict))
        user = next((m.get("content") for m in reversed(msgs) if m.get("role") == "user"), "")
        out.append({"prompt_ids": tokenizer.backend.encode(text, add_special_tokens=False).ids,
                    "prompt": user if isinstance(user, str) else str(user), "expected": expected or ""})
    return out


@torch.no_grad()
def generate_samples(model, prompts: list[dict], tokenizer, eos_ids, max_new_tokens: int) -> list[dict]:
    """Greedy answers of the model being trained (LoRA unmerged, eval mode) to `prompts`."""
    from .drafter import greedy_generate

    was = model.training
    model.eval()
    try:
        out = []
        for p in prompts:
            new = greedy_generate(model, p["prompt_ids"], max_new_tokens, tuple(eos_ids))
            if new and new[-1] in eos_ids:
                new = new[:-1]
            out.append({"prompt": p["prompt"], "expected": p["expected"],
                        "generated": tokenizer.decode(new, skip_special_tokens=True)})
        return out
    finally:
        model.train(was)
