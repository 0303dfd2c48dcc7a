"""`POST /v1/audio/transcriptions`: OpenAI's (Whisper's) speech-to-text endpoint, answered by the model's own
audio understanding.

    multipart form ─► file (WAV / FLAC / OGG / MP3 ...), model, language, prompt, response_format, temperature
                   ─► decoded to 16 kHz, cut at pauses into utterances of at most 30 s (energy VAD)
                   ─► per utterance one chat turn: [audio, "Transcribe the audio."] (+ the prompt as context),
                      greedy by default, through the path /v1/chat/completions takes (limits, admission, engine)
                   ─► json {"text", "usage"} | text | verbose_json | srt | vtt

The model gives no timestamps: a segment is an utterance, its times are where the VAD found speech (padded by
0.2 s), its `avg_logprob` the mean log-probability of the generated tokens and `compression_ratio` the text's zlib
ratio (as Whisper reports them); `no_speech_prob` is null (nothing here estimates it). A file with no speech found
is one segment. `language` (ISO-639-1) is passed on to the instruction and echoed; nothing detects it.

What this module does not do: audio decoding (inputs/audio.py), limits (media.py), generation (service.py).
"""

from __future__ import annotations

import base64
import io
import re
import zlib
from pathlib import PurePath
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from .protocol import APIError, ChatCompletionRequest, parse_request

INSTRUCTION = "Transcribe the audio."  # also one of the demo model's trained phrasings
FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
FIELDS = {"file", "model", "language", "prompt", "response_format", "temperature", "timestamp_granularities[]",
          "timestamp_granularities", "stream", "include[]", "chunking_strategy"}
MAX_TOKENS_PER_30S = 448  # Whisper's decoder length: ample for 30 s of speech
RATE = 16000
PAD_S = 0.2           # kept around each utterance: the VAD cuts at the last loud frame
MAX_SEGMENT_S = 30.0  # the model's audio segment length


def speech_segments(wave) -> list[tuple[int, int]]:
    """(start, end) sample spans of the utterances in a 16 kHz waveform: the energy VAD's speech, padded, merged
    where the padding overlaps, cut into pieces of at most 30 s; the whole file when no speech is found."""
    import numpy as np

    from unigemma.realtime import EnergyVAD

    vad = EnergyVAD(hangover_ms=400)
    # trailing silence ends an utterance still open at the end of the file
    events = vad.feed(wave) + vad.feed(np.zeros(RATE, dtype=np.float32))
    spans, start = [], None
    for e in events:
        if e.kind == "speech_started":
            start = e.sample
        elif start is not None:
            spans.append((start, e.sample))
            start = None
    pad, n = int(PAD_S * RATE), len(wave)
    merged: list[list[int]] = []
    for a, b in spans:
        a, b = max(0, a - pad), min(n, b + pad)
        if a >= b:
            continue
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    if not merged:
        merged = [[0, n]]
    step = int(MAX_SEGMENT_S * RATE)
    return [(a, min(b, a + step)) for a0, b in merged for a in range(a0, b, step)]


def wav_bytes(wave) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def instruction(language: str | None, prompt: str | None) -> str:
    text = INSTRUCTION if not language else f"{INSTRUCTION[:-1]} (language: {language})."
    if prompt:
        text += f"\nContext (earlier text or spellings to follow): {prompt}"
    return text


def _timestamp(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def subtitles(segments: list[dict], kind: str) -> str:
    """The segments as SubRip (srt) or WebVTT (vtt) cues."""
    sep = "," if kind == "srt" else "."
    cues = [(f"{i + 1}\n" if kind == "srt" else "")
            + f"{_timestamp(s['start'], sep)} --> {_timestamp(s['end'], sep)}\n{s['text']}\n\n"
            for i, s in enumerate(segments) if s["text"]]
    return ("" if kind == "srt" else "WEBVTT\n\n") + "".join(cues)


def compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def _field(form, name: str) -> str | None:
    v = form.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise APIError(400, f"'{name}' must be a text field, not a file", param=name)
    return v.strip() or None


def install_transcriptions(app: FastAPI) -> None:
    """Add POST /v1/audio/transcriptions to an app made by create_app (its service, settings and limits)."""
    from .app import _until_disconnect

    service, settings = app.state.service, app.state.settings

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise APIError(400, "send the audio as multipart/form-data with a 'file' field (and 'model'), as "
                                f"OpenAI's transcription API takes it; got content type {ctype or 'none'!r}",
                           code="invalid_content_type")
        try:
            form = await request.form(max_files=1, max_fields=len(FIELDS) + 4)
        except APIError:
            raise
        except Exception as e:  # malformed multipart bodies raise parser-specific errors
            raise APIError(400, f"the multipart form could not be read: {e}", code="invalid_body") from None
        try:
            return await _transcribe(request, form)
        finally:
            await form.close()

    async def _transcribe(request: Request, form) -> Any:
        unknown = sorted(set(form.keys()) - FIELDS)
        if unknown:
            raise APIError(400, f"unknown field(s) {unknown}; accepted: file, model, language, prompt, "
                                "response_format, temperature", param=unknown[0])
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "'file' is required: the audio file (WAV, FLAC, OGG, MP3, ...)", param="file")
        model = _field(form, "model")
        if model is None:
            raise APIError(400, "'model' is required", param="model")
        service.check_model(model)
        fmt = _field(form, "response_format") or "json"
        if fmt not in FORMATS:
            raise APIError(400, f"response_format {fmt!r} is not supported (accepted: {', '.join(FORMATS)})",
                           param="response_format")
        language = _field(form, "language")
        if language is not None and not re.fullmatch(r"[a-z]{2,3}", language):
            raise APIError(400, f"language {language!r}: expected an ISO-639-1 code such as 'en'", param="language")
        for name in ("timestamp_granularities[]", "timestamp_granularities"):
            for g in form.getlist(name):
                if g != "segment":
                    raise APIError(400, f"timestamp granularity {g!r} is not available: this model gives no "
                                        "word timestamps (accepted: segment)", param="timestamp_granularities")
        if (_field(form, "stream") or "false").lower() not in ("false", "0"):
            raise APIError(400, "stream is not supported on this endpoint; send stream=false", param="stream")
        temperature = _field(form, "temperature")
        try:
            temperature = 0.0 if temperature is None else float(temperature)
        except ValueError:
            raise APIError(400, f"temperature {temperature!r} is not a number", param="temperature") from None
        data = await upload.read()
        if not data:
            raise APIError(400, "'file' is empty", param="file")
        suffix = PurePath(upload.filename or "").suffix.lower().lstrip(".") or None

        def decode():
            from unigemma.inputs.audio import load_audio
            from unigemma.inputs.media import MediaError

            try:
                wave = load_audio(data, max_seconds=service.policy.max_audio_seconds, format=suffix)
            except (MediaError, ValueError) as e:
                raise APIError(400, f"file: {e}", param="file", code="invalid_media") from None
            return wave, [(a, b, wav_bytes(wave[a:b])) for a, b in speech_segments(wave)]

        wave, pieces = await run_in_threadpool(decode)
        seconds = len(wave) / RATE
        text_prompt = instruction(language, _field(form, "prompt"))
        segments, prompt_tokens, completion_tokens = [], 0, 0
        for i, (a, b, wav) in enumerate(pieces):  # one at a time: a long file must not fill the admission queue
            req = parse_request(ChatCompletionRequest, {
                "model": settings.model_name, "temperature": temperature, "logprobs": True,
                "max_tokens": MAX_TOKENS_PER_30S,
                "messages": [{"role": "user", "content": [
                    {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
                    {"type": "text", "text": text_prompt}]}]})
            service.admit(1)
            try:
                prep = await run_in_threadpool(service.prepare_chat, req)
                result = await _until_disconnect(request, service.chat(req, prep))
            except APIError as e:
                if e.param and e.param.startswith("messages"):  # the audio part is the uploaded file
                    e.param = "file"
                raise
            finally:
                service.release(1)
            choice = result["choices"][0]
            text = (choice["message"].get("content") or "").strip()
            prompt_tokens += result["usage"]["prompt_tokens"]
            completion_tokens += result["usage"]["completion_tokens"]
            lps = [e["logprob"] for e in (choice.get("logprobs") or {}).get("content") or []]
            segments.append({"id": i, "seek": a * 100 // RATE, "start": round(a / RATE, 3), "end": round(b / RATE, 3),
                             "text": text, "tokens": service.tok.encode(text), "temperature": temperature,
                             "avg_logprob": sum(lps) / len(lps) if lps else None,
                             "compression_ratio": compression_ratio(text), "no_speech_prob": None})
        text = " ".join(s["text"] for s in segments if s["text"])
        if fmt == "text":
            return PlainTextResponse(text + "\n")
        if fmt in ("srt", "vtt"):
            return PlainTextResponse(subtitles(segments, fmt),
                                     media_type="text/vtt" if fmt == "vtt" else "application/x-subrip")
        if fmt == "json":
            return JSONResponse({"text": text, "usage": {
                "type": "tokens", "input_tokens": prompt_tokens, "output_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}})
        return JSONResponse({"task": "transcribe", "language": language or "unknown", "duration": round(seconds, 3),
                             "text": text, "segments": segments,
                             "usage": {"type": "duration", "seconds": round(seconds, 3)}})
