"""`POST /v1/embeddings` from the loaded generative model.

    input (string | strings | token ids | lists of token ids)
      ─► limits (inputs per request, tokens per input and per request) checked before any forward
      ─► token ids: text gets BOS and its format-token look-alikes neutralised (text never becomes control tokens)
      ─► model.run(ids, attention_mask, compute_logits=False).hidden   (B, T, H): final-norm hidden states
      ─► mean over each input's tokens ─► L2-normalised ─► optional `dimensions`: first d, renormalised
      ─► float lists, or base64 of little-endian float32 (what the OpenAI SDKs decode)

The pooling is the one llama-server uses for generative models without a pooling head: the mean of the final
hidden states over the input's tokens, then unit length. Honest note (README): these are a generative model's
states, not a retrieval model's; they cluster topics but were never trained with a contrastive objective, so
for search prefer a model trained for embeddings. `dimensions` keeps the first d components and renormalises
(the cut a Matryoshka-trained model expects; this model was not trained for it, so it is a plain truncation).

The forward runs in a worker thread beside the engine (no KV cache, no slot taken), one embedding request at a
time; it reads the weights only, so it cannot disturb the sequences the engine is decoding.

What this module does not do: the model forward itself (model/), chat or sampling (service.py).
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Request
from pydantic import Field, model_validator
from starlette.concurrency import run_in_threadpool

from .protocol import APIError, _Strict, parse_request


class EmbeddingRequest(_Strict):
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None   # ignored

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_default(cls, v: Any) -> Any:
        return {k: x for k, x in v.items() if x is not None} if isinstance(v, dict) else v

    def ignored_fields(self) -> list[str]:
        return ["user"] if "user" in self.model_fields_set else []

    def inputs(self) -> list[str | list[int]]:
        x = self.input
        if isinstance(x, str):
            return [x]
        if x and all(isinstance(t, int) for t in x):
            return [list(x)]
        return list(x)


class Embedder:
    """Pooled, normalised final hidden states of `llm.model` for token-id sequences."""

    # sequences × padded length per forward: bounds the activation memory of one forward
    TOKENS_PER_FORWARD = 8192

    def __init__(self, llm):
        self.model = llm.model
        self.hidden_size = llm.config.text.hidden_size
        self.pad_id = llm.tokenizer.pad_token_id or 0
        self.device = next(self.model.parameters()).device

    @torch.inference_mode()
    def __call__(self, seqs: list[list[int]]) -> np.ndarray:
        out = np.zeros((len(seqs), self.hidden_size), dtype=np.float32)
        # similar lengths share a forward (less padding); results go back to their input's row
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and len(seqs[order[end]]) * (end - start + 1) <= self.TOKENS_PER_FORWARD:
                end += 1
            rows = order[start:end]
            T = max(len(seqs[i]) for i in rows)
            ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), T), dtype=torch.bool)
            for r, i in enumerate(rows):
                ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
                mask[r, :len(seqs[i])] = True
            hidden = self.model.run(ids.to(self.device), attention_mask=mask.to(self.device),
                                    compute_logits=False).hidden.float()               # (B, T, H)
            m = mask.to(hidden.device)[..., None].float()                                # (B, T, 1)
            pooled = (hidden * m).sum(1) / m.sum(1)                                      # (B, H) mean over tokens
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out[rows] = pooled.cpu().numpy()
            start = end
        return out


def shorten(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """The first `dimensions` components of unit vectors, renormalised to unit length."""
    v = vectors[:, :dimensions]
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(norms, 1e-12)


def install_embeddings(app: FastAPI) -> None:
    """Add POST /v1/embeddings to an app made by create_app (its service, settings and limits)."""
    from unigemma.inputs.template import neutralize

    from .app import ignored_header

    service, settings = app.state.service, app.state.settings
    lock = asyncio.Lock()
    embedder: list[Embedder] = []

    def tokens(req: EmbeddingRequest) -> list[list[int]]:
        vocab = service.llm.config.text.vocab_size
        seqs, total = [], 0
        for i, x in enumerate(req.inputs()):
            where = f"input[{i}]" if not isinstance(req.input, str) else "input"
            if isinstance(x, str):
                if not x:
                    raise APIError(400, f"{where} is an empty string; every input needs text", param="input")
                ids = service.tok.encode(neutralize(x), add_bos=True)
            else:
                if not x:
                    raise APIError(400, f"{where} is an empty list of token ids", param="input")
                if any(not 0 <= t < vocab for t in x):
                    raise APIError(400, f"{where}: token ids must be in [0, {vocab - 1}]", param="input")
                ids = list(x)
            if len(ids) > service.max_model_len:
                raise APIError(400, f"{where} is {len(ids)} tokens, over this server's context of "
                                    f"{service.max_model_len} tokens; shorten it", param="input",
                               code="context_length_exceeded")
            total += len(ids)
            if total > settings.max_embedding_tokens:
                raise APIError(400, f"the inputs hold more than {settings.max_embedding_tokens} tokens, over the "
                                    "limit per request (--max-embedding-tokens); send fewer or shorter inputs",
                               param="input", code="too_many_tokens")
            seqs.append(ids)
        return seqs

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        req = parse_request(EmbeddingRequest, await app.state.read_json(request))
        service.check_model(req.model)
        if not hasattr(service.llm.model, "run"):
            raise APIError(400, "this model has no hidden-state forward to take embeddings from", param="model")
        hidden = service.llm.config.text.hidden_size
        if req.dimensions is not None and not 1 <= req.dimensions <= hidden:
            raise APIError(400, f"dimensions is {req.dimensions}; this model's embeddings have {hidden} "
                                f"dimensions, so it must be between 1 and {hidden}", param="dimensions")
        inputs = req.inputs()
        if not inputs:
            raise APIError(400, "input is an empty list; send a string or a list of strings / token ids",
                           param="input")
        if len(inputs) > settings.max_embedding_inputs:
            raise APIError(400, f"input holds {len(inputs)} items, over the limit of {settings.max_embedding_inputs} "
                                "per request (--max-embedding-inputs)", param="input", code="too_many_inputs")
        chars = sum(len(x) for x in inputs if isinstance(x, str))
        if chars > settings.max_prompt_chars:   # before tokenizing, as for chat
            raise APIError(400, f"the inputs hold {chars} characters, over this server's limit of "
                                f"{settings.max_prompt_chars} (--max-prompt-chars)", param="input",
                           code="prompt_too_long")
        seqs = await run_in_threadpool(tokens, req)
        if not embedder:
            embedder.append(Embedder(service.llm))
        async with lock:   # one embedding forward at a time beside the engine
            vectors = await run_in_threadpool(embedder[0], seqs)
        if req.dimensions is not None and req.dimensions < hidden:
            vectors = shorten(vectors, req.dimensions)
        data = []
        for i, v in enumerate(vectors):
            emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64" \
                else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(len(s) for s in seqs)
        from fastapi.responses import JSONResponse
        return JSONResponse({"object": "list", "data": data, "model": settings.model_name,
                             "usage": {"prompt_tokens": n, "total_tokens": n}}, headers=ignored_header(req))
