"""unigemma: Gemma 4 encoder-free multimodal models (gemma4_unified) on your own machine."""

__version__ = "0.1.0"
