"""Realtime voice / multimodal turns: a user turn that is prefilled while it is still being spoken.

    Session(llm, system=…, enable_thinking=…)
        .append_audio(chunk)   16 kHz mono chunks; every complete 640-sample frame becomes one <|audio|> soft token
        .append_text(str)      prefilled as it arrives, but for its last few tokens (see IncrementalPrompt)
        .append_image(img)     a PIL image / path / data URI (camera frames too): BOI + N × IMAGE + EOI
        .commit() → ChatChunk stream (or ChatResult with stream=False); the turn joins `messages`
        .cancel()

    IncrementalPrompt   the token side: the chat template rendered around a sentinel gives the text before and after
                        the user's content; appended parts become `Piece`s (token ids + media kwargs for their
                        placeholders) whose concatenation equals `llm.build_prompt(messages + [message()])`
    EnergyVAD           end-of-turn detection: frame RMS against an adaptive noise floor, with a hang-over

Audio framing follows the one-shot path (inputs/prompt.py): BOA + n × AUDIO + EOA per 30-s segment, the last frame
zero-padded. The KV cache holds everything appended so far (engine/session.py → Scheduler.extend), so commit only
prefills the closing tokens (EOA, `<turn|>`, the generation prompt).

What this module does not do: HTTP / WebSocket framing (server/realtime_ws.py), the forward pass or sampling.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .inputs.audio import FRAME_SAMPLES, SAMPLE_RATE, SEGMENT_FRAMES
from .inputs.media import MediaError
from .inputs.prompt import _SPLIT
from .inputs.template import neutralize

__all__ = ["EnergyVAD", "IncrementalPrompt", "Piece", "Session", "VADEvent", "pcm16_to_float"]

# Private-use code points: the template passes them through untouched, and no user text contains them by accident.
_SENTINEL = "\ue000unigemma-live-turn\ue001"


@dataclass
class Piece:
    """Prompt tokens to append, with the model's media kwargs for the placeholders among them (None: text)."""

    ids: list[int]
    media: dict[str, Any] | None = None
    rewind: int = 0   # drop this many of the prompt's last tokens first (text re-tokenized as more arrived)


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Little-endian signed 16-bit PCM bytes → float32 samples in [−1, 1)."""
    if len(data) % 2:
        raise ValueError(f"PCM16 audio must have an even number of bytes, got {len(data)}")
    return (np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0)


class IncrementalPrompt:
    """The token ids of one user turn, built part by part (see the module docstring).

    `head()` gives the prompt before the turn (system prompt, history); each append returns the pieces that
    became final with it; `close()` returns the last ones. Tokenization is not additive, so the text between two
    media parts ends up tokenized in one go, as build_prompt does: early pieces of it that turn out different are
    rewound (Piece.rewind) before the final tokens are appended.
    """

    def __init__(self, llm, messages: list[dict] | None = None, *, system: str | None = None,
                 tools: list[dict] | None = None, enable_thinking: bool = False, max_audio_seconds: float = 600.0,
                 resolve=None, text_holdback: int | None = 4):
        if llm.tokenizer is None:
            raise ValueError(f"{llm.path} has no tokenizer.json: a realtime session needs the tokenizer")
        self.llm = llm
        self.tok = llm.tokenizer
        self.cfg = llm.config
        msgs = list(messages or [])
        if system is not None and not (msgs and msgs[0].get("role") in ("system", "developer")):
            msgs.insert(0, {"role": "system", "content": system})
        self.history = msgs
        self.tools = tools
        self.enable_thinking = enable_thinking
        self.max_audio_samples = int(max_audio_seconds * SAMPLE_RATE)
        probe = msgs + [{"role": "user", "content": _SENTINEL}]
        # resolve(kind, source): the caller's media policy for the history's media (see inputs/prompt.py)
        p = llm.build_prompt(probe, tools=tools, enable_thinking=enable_thinking, resolve=resolve)
        pieces = _SPLIT.split(p.text)
        last = pieces[-1]
        if last.count(_SENTINEL) != 1:
            raise ValueError("the chat template did not render the user turn's content verbatim; realtime "
                             "sessions need a template that writes user text as given")
        before, self.after = last.split(_SENTINEL)
        self.rendered = p.text   # with the sentinel in place of the turn's content: its tail sets the parser state
        # everything up to the last media placeholder of the history is final already; the rest is buffered text
        n_last = len(self.tok.encode(last)) if len(pieces) > 1 else len(p.input_ids)
        self.device = next(llm.model.parameters()).device
        self._head = Piece(p.input_ids[: len(p.input_ids) - n_last], self._on_device(p.media))
        self._tpl = before
        self._text = ""
        # Typed text is prefilled as it arrives, all but its last `text_holdback` tokens (None: only at the next
        # media part / commit). Tokenization is not additive, so when the segment is final it is tokenized again
        # and any emitted tail that differs is rewound (Piece.rewind) before the rest is appended.
        self.text_holdback = text_holdback
        self._eager: list[int] = []
        self.parts: list[dict] = []
        self.ids: list[int] = list(self._head.ids)
        self._audio_open = False
        self._left = np.zeros(0, dtype=np.float32)   # samples short of a full frame
        self._stream = self._mel = None  # the family's audio: encoder and mel streams of the open 30-s item
        self._seg_frames = 0
        self._audio_samples = 0
        self.closed = False

    # --- the pieces ----------------------------------------------------------------------------------------
    def head(self) -> Piece:
        return self._head

    def _emit(self, ids: list[int], media: dict | None = None, rewind: int = 0) -> Piece:
        if rewind:
            del self.ids[len(self.ids) - rewind:]
        self.ids += ids
        return Piece(ids, self._on_device(media), rewind)

    def _settle(self, s: str) -> list[Piece]:
        """The final tokens of a text segment, given what was emitted of it early."""
        ids = self.tok.encode(s) if s else []
        early, self._eager = self._eager, []
        c = 0
        while c < min(len(early), len(ids)) and early[c] == ids[c]:
            c += 1
        if c == len(ids) and c == len(early):
            return []
        return [self._emit(ids[c:], rewind=len(early) - c)]

    def _on_device(self, media: dict | None) -> dict | None:
        # media tensors go where the model is (the engine embeds them as they arrive)
        if not media:
            return None
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in media.items()}

    def _flush_text(self) -> list[Piece]:
        text = self._text.strip()  # the template trims text parts
        if text:
            self.parts.append({"type": "text", "text": text})
        s = self._tpl + neutralize(text)
        self._tpl, self._text = "", ""
        return self._settle(s)

    def _frames_piece(self, frames: np.ndarray) -> Piece | None:
        if frames.shape[0] == 0:
            return None
        c = self.cfg
        ids: list[int] = []
        for _ in range(frames.shape[0]):
            if self._seg_frames == SEGMENT_FRAMES:  # one audio item holds at most 30 s, as in build_prompt
                ids += [c.eoa_token_id, c.boa_token_id]
                self._seg_frames = 0
            ids.append(c.audio_token_id)
            self._seg_frames += 1
        feats = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))[None]  # (1, F, 640)
        return self._emit(ids, {"input_features": feats, "input_features_mask": torch.ones(feats.shape[:2],
                                                                                           dtype=torch.bool)})

    # --- the family's audio encoder: mel frames and encoder rows as the samples arrive ----------------------------
    def _family_audio(self, wave: np.ndarray) -> list[Piece]:
        """Feed samples to the mel and encoder streams; emit the soft tokens that became final (one audio item
        per 30 s, as build_prompt cuts it)."""
        out: list[Piece] = []
        seg = SEGMENT_FRAMES * FRAME_SAMPLES
        while wave.size:
            if self._stream is None:
                from .inputs.mel import MelStream
                from .model.encoders.audio import AudioStream

                self._mel = MelStream(getattr(self.llm, "mel_settings", None))
                self._stream = AudioStream(self.llm.model.model.audio_tower)
            take = min(wave.size, seg - self._mel.n)
            with torch.no_grad():
                rows = self._stream.push(torch.from_numpy(self._mel.push(wave[:take])).to(self.device))
            out += self._rows_piece(rows)
            wave = wave[take:]
            if self._mel.n == seg:  # a full 30-s item: close it, the next samples open a new one
                out += self._finish_stream()
                out.append(self._emit([self.cfg.eoa_token_id, self.cfg.boa_token_id]))
        return out

    def _rows_piece(self, rows: torch.Tensor) -> list[Piece]:
        if rows.shape[0] == 0:
            return []
        return [self._emit([self.cfg.audio_token_id] * rows.shape[0], {"audio_encoder_outputs": rows})]

    def _finish_stream(self) -> list[Piece]:
        if self._stream is None:
            return []
        feats, mask = self._mel.finish()
        with torch.no_grad():
            rows, valid = self._stream.finish(torch.from_numpy(feats).to(self.device),
                                              torch.from_numpy(mask).to(self.device))
        self._stream = self._mel = None
        return self._rows_piece(rows[valid])

    def _close_audio(self) -> list[Piece]:
        if not self._audio_open:
            return []
        if getattr(self.cfg, "audio_tower", None) is not None:
            out = self._finish_stream()
            out.append(self._emit([self.cfg.eoa_token_id]))
            self._audio_open = False
            return out
        out = []
        if self._left.size:
            frame = np.zeros((1, FRAME_SAMPLES), dtype=np.float32)
            frame[0, : self._left.size] = self._left
            out.append(self._frames_piece(frame))
            self._left = np.zeros(0, dtype=np.float32)
        out.append(self._emit([self.cfg.eoa_token_id]))
        self._audio_open = False
        return out

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("this turn is committed: start a new one")

    def append_text(self, text: str) -> list[Piece]:
        self._check_open()
        if not isinstance(text, str):
            raise TypeError(f"append_text needs a str, got {type(text).__name__}")
        out = self._close_audio()
        self._text += text
        if self.text_holdback is not None:
            # user text is neutralised as the chat template does it on every other path (`<turn|>` typed by the
            # user must not become a control token); a tail that changes once more text arrives is rewound
            ids = self.tok.encode(self._tpl + neutralize(self._text.lstrip()))
            ready = ids[: max(0, len(ids) - self.text_holdback)]
            early = self._eager
            c = 0
            while c < min(len(early), len(ready)) and early[c] == ready[c]:
                c += 1
            if len(ready) > c:  # new tokens (after rewinding an early tail that tokenizes differently now)
                out.append(self._emit(ready[c:], rewind=len(early) - c))
                self._eager = ready
        return out

    def append_audio(self, chunk) -> list[Piece]:
        """A chunk of 16 kHz mono float samples in [−1, 1] (or int16 PCM)."""
        self._check_open()
        if self.cfg.audio is None and getattr(self.cfg, "audio_tower", None) is None:
            raise ValueError("this model has no audio_config: it cannot take audio")
        wave = np.asarray(chunk)
        if wave.dtype == np.int16:
            wave = wave.astype(np.float32) / 32768.0
        if wave.ndim != 1 or wave.dtype.kind != "f":
            raise MediaError(f"audio chunk must be 1-D float32 (or int16) samples, got shape {wave.shape} "
                             f"dtype {wave.dtype}")
        wave = wave.astype(np.float32, copy=False)
        if not np.isfinite(wave).all():
            raise MediaError("audio chunk contains NaN or infinite samples")
        if wave.size == 0:
            return []
        if self._audio_samples + wave.size > self.max_audio_samples:
            raise MediaError(f"audio of this turn would exceed {self.max_audio_samples / SAMPLE_RATE:g} s")
        out: list[Piece] = []
        if not self._audio_open:
            out += self._flush_text()
            out.append(self._emit([self.cfg.boa_token_id]))
            self.parts.append({"type": "audio", "chunks": []})
            self._audio_open = True
            self._seg_frames = 0
        self.parts[-1]["chunks"].append(wave.copy())
        self._audio_samples += wave.size
        if getattr(self.cfg, "audio_tower", None) is not None:
            return out + self._family_audio(wave)
        buf = np.concatenate([self._left, wave]) if self._left.size else wave
        n = buf.size // FRAME_SAMPLES
        piece = self._frames_piece(buf[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES))
        self._left = buf[n * FRAME_SAMPLES:].copy()
        if piece is not None:
            out.append(piece)
        return out

    def append_image(self, image, max_soft_tokens: int | None = None) -> list[Piece]:
        """A PIL image / path / bytes / data URI; max_soft_tokens: the image's token budget (default: the model's,
        `llm.default_image_tokens`, 280 unless its processor config says otherwise)."""
        from .inputs.image import (DEFAULT_MAX_SOFT_TOKENS, check_budget, check_positions, model_image_spec,
                                   preprocess_image)

        self._check_open()
        patch_size, table = model_image_spec(self.cfg)  # unified 48-px or family 16-px patches; refuses no vision
        budget = check_budget(int(max_soft_tokens or getattr(self.llm, "default_image_tokens", DEFAULT_MAX_SOFT_TOKENS)))
        feats = preprocess_image(image, budget, patch_size=patch_size)
        check_positions(feats, table)
        out = self._close_audio() + self._flush_text()
        c = self.cfg
        ids = [c.boi_token_id] + [c.image_token_id] * feats.num_tokens + [c.eoi_token_id]
        out.append(self._emit(ids, {"pixel_values": feats.pixel_values[None],
                                    "image_position_ids": feats.position_ids[None]}))
        self.parts.append({"type": "image", "image": image, "max_soft_tokens": budget})
        return out

    def close(self) -> list[Piece]:
        """The closing pieces: the open audio item's last frame and EOA, buffered text, end of turn, generation
        prompt."""
        self._check_open()
        out = self._close_audio()
        text = self._text.strip()
        if text:
            self.parts.append({"type": "text", "text": text})
        out += self._settle(self._tpl + neutralize(text) + self.after)
        self._tpl = self._text = ""
        self.closed = True
        return [p for p in out if p.ids or p.rewind]

    def message(self) -> dict:
        """The user message this turn amounts to (OpenAI shape; audio as (waveform, 16000))."""
        content = []
        for p in self.parts:
            if p["type"] == "audio":
                content.append({"type": "audio", "audio": (np.concatenate(p["chunks"]), SAMPLE_RATE)})
            else:
                content.append(dict(p))
        if self.closed and not self._text and not content:
            content = ""
        return {"role": "user", "content": content}


# ------------------------------------------------------------------------------------------------------------
# Voice activity detection
# ------------------------------------------------------------------------------------------------------------

@dataclass
class VADEvent:
    kind: str          # "speech_started" | "speech_stopped"
    sample: int        # offset in the stream where it happened (start of the first / end of the last voiced frame)

    @property
    def seconds(self) -> float:
        return self.sample / SAMPLE_RATE


class EnergyVAD:
    """Energy-based voice activity detection on 20-ms frames.

    A frame is voiced when its RMS is `ratio` times above the noise floor (and above `min_rms`, so digital
    silence is never speech). The floor follows unvoiced frames quickly downwards and slowly upwards, so steady
    background noise is learned while a loud burst does not raise it (steady noise loud enough to pass for
    speech at first is learned within a few seconds). Speech starts after `start_ms` of voiced
    frames and stops after `hangover_ms` without any (pauses between words must not end the turn).
    """

    def __init__(self, *, frame_ms: float = 20.0, ratio: float = 3.0, min_rms: float = 0.01,
                 start_ms: float = 60.0, hangover_ms: float = 500.0, initial_floor: float = 0.001):
        if ratio <= 1 or frame_ms <= 0 or hangover_ms < 0 or start_ms < 0:
            raise ValueError(f"EnergyVAD: need ratio > 1, frame_ms > 0, start_ms, hangover_ms >= 0 (got ratio={ratio}, "
                             f"frame_ms={frame_ms}, start_ms={start_ms}, hangover_ms={hangover_ms})")
        self.frame = int(SAMPLE_RATE * frame_ms / 1000)
        self.ratio = ratio
        self.min_rms = min_rms
        self.start_frames = max(1, math.ceil(start_ms / frame_ms))
        self.hang_frames = max(1, math.ceil(hangover_ms / frame_ms))
        self.floor = initial_floor
        self.speaking = False
        self._buf = np.zeros(0, dtype=np.float32)
        self._pos = 0           # samples consumed into frames
        self._run = 0           # consecutive voiced frames (before start)
        self._run_start = 0
        self._quiet = 0         # consecutive unvoiced frames (while speaking)
        self._last_voiced_end = 0

    def feed(self, chunk) -> list[VADEvent]:
        wave = np.asarray(chunk, dtype=np.float32).reshape(-1)
        buf = np.concatenate([self._buf, wave]) if self._buf.size else wave
        n = buf.size // self.frame
        events: list[VADEvent] = []
        if n:
            rms = np.sqrt(np.mean(buf[: n * self.frame].reshape(n, self.frame).astype(np.float64) ** 2, axis=1))
            for r in rms:
                events += self._frame(float(r))
        self._buf = buf[n * self.frame:].copy()
        return events

    def _frame(self, rms: float) -> list[VADEvent]:
        start = self._pos
        self._pos += self.frame
        voiced = rms > max(self.min_rms, self.floor * self.ratio)
        # fast down, slow up: steady noise is learnt within ~1 s, a single loud frame barely moves it; voiced frames
        # pull the floor up very slowly, so a steady loud noise that started out "voiced" is learnt too (~4 s)
        # while a few seconds of speech barely move it
        a = (0.5 if rms < self.floor else 0.05) if not voiced else 0.002
        self.floor = max(1e-5, (1 - a) * self.floor + a * rms)
        if not self.speaking:
            if voiced:
                if self._run == 0:
                    self._run_start = start
                self._run += 1
                if self._run >= self.start_frames:
                    self.speaking, self._quiet = True, 0
                    self._last_voiced_end = self._pos
                    return [VADEvent("speech_started", self._run_start)]
            else:
                self._run = 0
            return []
        if voiced:
            self._quiet = 0
            self._last_voiced_end = self._pos
            return []
        self._quiet += 1
        if self._quiet >= self.hang_frames:
            self.speaking, self._run = False, 0
            return [VADEvent("speech_stopped", self._last_voiced_end)]
        return []


# ------------------------------------------------------------------------------------------------------------
# The Python session
# ------------------------------------------------------------------------------------------------------------

def _session_engine(llm, max_model_len: int):
    """A one-slot engine from the LLM's pool (a live request holds its slot for the whole turn, so it cannot
    share the engine llm.chat uses)."""
    from .engine.generate import Engine

    pool = llm.__dict__.setdefault("_session_engines", [])
    for eng in pool:
        if eng.runner.max_len >= max_model_len:
            pool.remove(eng)
            return eng
    return Engine(llm.model, llm.tokenizer, llm.eos_token_ids, getattr(llm, "drafter", None), max_slots=1,
                  max_model_len=max_model_len, device=getattr(llm, "device", None))


@dataclass
class _Turn:
    prompt: IncrementalPrompt
    live: Any = None  # engine.session.LiveRequest, once the first piece exists
    pending: list[Piece] = field(default_factory=list)


class Session:
    """A conversation whose user turns are prefilled as they arrive (see the module docstring).

    messages: earlier turns (OpenAI shape); system: a system prompt when messages has none. Sampling options
    (temperature, top_p, top_k, seed, max_tokens, ...) are those of llm.chat. `vad`: an EnergyVAD (or True for
    the default one) that watches appended audio; `append_audio` returns its events and `end_of_turn` turns True
    when speech stopped — the caller then commits. The session holds a one-slot engine (its own KV cache of
    `max_model_len` tokens) until `close()`.
    """

    def __init__(self, llm, messages: list[dict] | None = None, *, system: str | None = None,
                 tools: list[dict] | None = None, enable_thinking: bool = False, max_tokens: int | None = 512,
                 max_model_len: int = 4096, vad: EnergyVAD | bool | None = None, **sampling):
        from .engine.generate import sampling_params

        self.llm = llm
        self.messages: list[dict] = list(messages or [])
        self.system = system
        self.tools = tools
        self.enable_thinking = enable_thinking
        self.max_tokens = max_tokens
        self.params = sampling_params(llm, max_tokens=max_tokens, **sampling)  # validates the options now
        self.sampling = sampling
        # never more context than the model has positions for (the demo model has 2,048)
        max_model_len = min(max_model_len, llm.config.text.max_position_embeddings)
        self.engine = _session_engine(llm, max_model_len)
        self.vad = EnergyVAD() if vad is True else (vad or None)
        self.end_of_turn = False
        self._turn: _Turn | None = None

    # --- the turn ------------------------------------------------------------------------------------------
    @property
    def turn(self) -> _Turn:
        if self.engine is None:
            raise ValueError("this session is closed")
        if self._turn is None:
            p = IncrementalPrompt(self.llm, self.messages, system=self.system, tools=self.tools,
                                  enable_thinking=self.enable_thinking)
            self._turn = _Turn(p, pending=[p.head()] if p.head().ids else [])
        return self._turn

    @property
    def prompt_ids(self) -> list[int]:
        """The current turn's prompt ids so far (history + appended parts)."""
        return list(self.turn.prompt.ids)

    @property
    def prefilled(self) -> int:
        """How many of those are in the KV cache."""
        t = self.turn
        return t.live.computed if t.live is not None else 0

    def _apply(self, pieces: list[Piece], close: bool = False):
        from .engine.session import LiveRequest

        t = self.turn
        pieces = t.pending + [p for p in pieces if p.ids or p.rewind]
        t.pending = []
        if t.live is None:
            if not pieces:
                return None
            first, pieces = pieces[0], pieces[1:]
            assert not first.rewind, "nothing was sent that could be rewound"
            t.live = LiveRequest(self.engine, first.ids, self.params, first.media, prefill=not close)
        last = pieces.pop() if close and pieces else Piece([])
        for p in pieces:
            t.live.rewind(p.rewind)
            t.live.extend(p.ids, p.media, prefill=not close)
        if close:
            t.live.rewind(last.rewind)
            return t.live.close(last.ids, last.media)
        return None

    def append_text(self, text: str) -> None:
        self._apply(self.turn.prompt.append_text(text))

    def append_audio(self, chunk, sample_rate: int = SAMPLE_RATE) -> list[VADEvent]:
        """Append 16 kHz mono samples (float32 in [−1, 1], or int16); other rates are resampled."""
        if sample_rate != SAMPLE_RATE:
            from .inputs.audio import waveform_from_array

            chunk = waveform_from_array(np.asarray(chunk), sample_rate)
        self._apply(self.turn.prompt.append_audio(chunk))
        events = self.vad.feed(np.asarray(chunk, dtype=np.float32)) if self.vad is not None else []
        if any(e.kind == "speech_stopped" for e in events):
            self.end_of_turn = True
        return events

    def append_image(self, image, max_soft_tokens: int | None = None) -> None:
        self._apply(self.turn.prompt.append_image(image, max_soft_tokens))

    def commit(self, stream: bool = True):
        """End the user turn and answer it: ChatChunk stream (stream=True) or ChatResult. The turn and the answer
        are added to `messages` once the answer is complete."""
        from .chat import ChatResult, _finish_reason, _fold, _stream
        from .outputs.parser import ResponseParser, start_state_for_prompt

        t = self.turn
        prompt = t.prompt
        events = self._apply(prompt.close(), close=True)
        names = [x.get("function", {}).get("name") for x in (self.tools or []) if isinstance(x, dict)]
        parser = ResponseParser(start_state_for_prompt(prompt.rendered), tool_names=names or None)
        user = prompt.message()
        self._turn = None
        self.end_of_turn = False
        if self.vad is not None:
            self.vad = EnergyVAD()

        def remember(content: str, reasoning: str, tool_calls: list[dict]) -> None:
            msg: dict[str, Any] = {"role": "assistant", "content": content}
            if tool_calls:
                msg["tool_calls"] = tool_calls
            self.messages += [user, msg]

        if stream:
            def gen() -> Iterator:
                content, reasoning, complete = [], [], False
                try:
                    for ch in _stream(events, parser):
                        content.append(ch.content)
                        reasoning.append(ch.reasoning)
                        if ch.finish_reason is not None:
                            complete = True
                        yield ch
                finally:
                    if complete:
                        remember("".join(content), "".join(reasoning), [])
            return gen()
        content, reasoning, warnings, ids, calls, last = [], [], [], [], {}, None
        for ev in events:
            last = ev
            if ev.token_id is not None:
                ids.append(ev.token_id)
            for pe in parser.feed(ev.text):
                _fold(pe, content, reasoning, calls, warnings)
        for pe in parser.finish():
            _fold(pe, content, reasoning, calls, warnings)
        tool_calls = [calls[i] for i in sorted(calls) if calls[i]["function"]["arguments"] is not None]
        remember("".join(content), "".join(reasoning), tool_calls)
        return ChatResult("".join(content), "".join(reasoning), tool_calls,
                          _finish_reason(last.finish_reason if last else None, len(tool_calls)),
                          last.usage if last else None, warnings, ids)

    def cancel(self) -> None:
        """Drop the current turn (what was appended and prefilled) and free the cache slot."""
        t = self._turn
        if t is not None and t.live is not None:
            t.live.cancel()
        self._turn = None
        self.end_of_turn = False

    def close(self) -> None:
        """Cancel any open turn and hand the engine back to the LLM's pool."""
        if self.engine is None:
            return
        self.cancel()
        self.llm.__dict__.setdefault("_session_engines", []).append(self.engine)
        self.engine = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
