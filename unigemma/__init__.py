"""unigemma: Gemma 4 encoder-free multimodal models (gemma4_unified) on your own machine.

    import unigemma
    llm = unigemma.load("path/to/checkpoint")      # None: the bundled demo model
    logits = llm.model(input_ids)                  # (batch, seq, vocab)
"""

__version__ = "0.1.0"

from .api import LLM, load  # noqa: E402

__all__ = ["LLM", "load", "__version__"]
