"""Incremental detokenization: token ids in, text deltas out, one token at a time in O(1).

Decoding token by token and concatenating the pieces is wrong in two ways: byte-level BPE pieces can end in
the middle of a UTF-8 character (decoded alone they give U+FFFD), and some decoders change text at the edges
of what they are given (a SentencePiece-style decoder strips the leading space of its input). Decoding the
whole sequence every step is right but O(length) per token.

The prefix-offset / read-offset technique does both right in O(1) per token::

    ids:   ... | prefix_offset ........ read_offset | new ids ... |
                 └ already emitted, kept ┘           └ not yet ┘
                   as left context

    prefix_text = decode(ids[prefix_offset:read_offset])
    new_text    = decode(ids[prefix_offset:])
    delta       = new_text[len(prefix_text):]      unless new_text ends in U+FFFD (a character still incomplete)

After an emission the window slides: prefix_offset ← read_offset, read_offset ← len(ids). Windows always start
where the previous emission ended cleanly (on a character boundary), so decoding from there gives the same
text as decoding from the start, and the deltas join to `tokenizer.decode(ids)` once `finish()` has flushed
the held-back tail (which is where a genuinely invalid byte sequence shows up, as U+FFFD, exactly as the full
decode shows it).

What this module does not do: stop strings (engine/stopping.py), splitting text into reasoning / content /
tool calls (outputs/parser.py).
"""

from __future__ import annotations

from typing import Iterable, Protocol, Sequence

REPLACEMENT_CHAR = "\ufffd"
# Tokens of prompt context decoded together with the first generated tokens, so that edge effects of the
# decoder (e.g. leading-space handling) match what a full decode of prompt + output gives.
PROMPT_CONTEXT_TOKENS = 5


class _Decoder(Protocol):
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Streams the text of generated tokens.

    `add(token_id)` / `add_many(ids)` return the newly printable text (possibly ""); `finish()` returns what is
    still held back. Without `prompt_ids`, ''.join(all returned pieces) == tokenizer.decode(generated ids,
    skip_special_tokens). With `prompt_ids`, the pieces are the text that the generated ids append to the
    prompt's text (the last few prompt tokens serve as decoding context only; none of their text is emitted).
    """

    def __init__(self, tokenizer: _Decoder, skip_special_tokens: bool = False,
                 prompt_ids: Sequence[int] | None = None):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids or [])[-PROMPT_CONTEXT_TOKENS:]
        # Only a short tail of the prompt is kept: it is context for the first window, never emitted.
        # A tail that starts mid-character decodes to a leading U+FFFD in both prefix_text and new_text,
        # so it cancels out of the difference.
        self._ids: list[int] = context
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._text_parts: list[str] = []

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, force: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if not force:
            if new_text.endswith(REPLACEMENT_CHAR):
                # The last character is incomplete: keep the window and try again with the next token.
                return ""
            if len(new_text) <= len(prefix_text):
                # Complete but empty (e.g. a skipped special token): mark the tokens as read, keeping the
                # left context where it is, so the next window does not re-decode them as new text.
                self._read_offset = len(self._ids)
                return ""
        delta = new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if delta:
            self._text_parts.append(delta)
        return delta

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes (may be "")."""
        self._ids.append(int(token_id))
        return self._emit(force=False)

    def add_many(self, token_ids: Iterable[int]) -> str:
        """Append several tokens (e.g. accepted speculative drafts) and decode them in one window."""
        self._ids.extend(int(t) for t in token_ids)
        return self._emit(force=False)

    def finish(self) -> str:
        """Flush the held-back tail (an incomplete character shows up as U+FFFD, as in the full decode)."""
        return self._emit(force=True)

    @property
    def token_ids(self) -> list[int]:
        """The generated ids (without prompt context)."""
        return self._ids[self._num_context:]

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._text_parts)
