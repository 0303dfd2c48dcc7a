"""The Gemma 4 unified model and its MTP drafter, as plain torch modules (inputs + cache → logits)."""

from .cache import KVCache, make_cache
from .unified import Gemma4Unified, ModelOutput

__all__ = ["Gemma4Unified", "ModelOutput", "KVCache", "make_cache"]
