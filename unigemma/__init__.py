"""unigemma: Gemma 4 encoder-free multimodal models (gemma4_unified) on your own machine.

    import unigemma
    llm = unigemma.load("path/to/checkpoint")      # None: the bundled demo model
    logits = llm.model(input_ids)                  # (batch, seq, vocab)

`load` and `LLM` are imported on first use, so `import unigemma` (and the CLI's start-up) does not pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "load", "__version__"]

if TYPE_CHECKING:
    from .api import LLM, load


def __getattr__(name: str):
    if name in ("LLM", "load"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'unigemma' has no attribute {name!r}")
