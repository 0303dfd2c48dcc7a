#!/usr/bin/env python3
"""The demo model's dataset: deterministic, offline chat conversations over images, audio, text, tools and JSON.

    python scripts/demo/make_data.py --out data/demo --train 20000 --val 1000 --test 2000 --seed 0

writes, under --out,

    train.jsonl  val.jsonl  test.jsonl     one conversation per line (format below)
    train/ val/ test/                      000123.png (96×96-ish RGB) and 000123.wav (16 kHz mono PCM-16)
    manifest.json                          counts per task, voices and fonts (seen / held out), settings

One JSONL line (the shape `unigemma train` reads; media paths are relative to the JSONL file):

    {"id": "test-000007", "split": "test", "task": "shape", "answer": "circle", "held_out": false,
     "enable_thinking": false,
     "messages": [{"role": "user", "content": [
         {"type": "image", "image": "test/000007.png", "max_soft_tokens": 70},
         {"type": "text", "text": "What shape is this?"}]},
         {"role": "assistant", "content": "circle"}],
     "tools": [...]            (tool task only: OpenAI function schemas)
     "response_format": {...}  (json task only: {"type": "json_schema", "json_schema": {name, schema, strict}})
     "meta": {...}}            (what was drawn or spoken: shape, colour, centre, voice, font, expected calls, ...)

Tasks: image `shape`, `colour`, `describe` ("a red circle"; half of them asked as a compound question, "What
shape and colour is this?"), `count`, `text` (1–2 characters in a font); audio
(espeak-ng) `digit` ("which number was said?" → "7"), `number` (10–99 → "42"), `transcribe` (→ "forty two",
"seven", "left"); text `arithmetic` (2-digit + and −, a short carry-by-carry trace in `reasoning_content` when
thinking is on), `tool` (2–3 declared tools among get_weather, get_time, add, convert_units: calls, tool
results, final answer), `json` (extraction to a json_schema, from a sentence or an image).

Determinism: every example is drawn from its own `random.Random(f"{seed}:{split}:{index}")`, so the files are
byte-identical for the same seed, however many worker processes draw them; the three splits use different
seed streams. Held out of train and val: some espeak-ng voices and variants and some fonts; the test split mixes
seen and held-out ones (`"held_out": true` marks the latter). 2-digit arithmetic problems are partitioned: the
val/test ones never occur in train.

Audio files are clean (no noise, peak 0.5): augmentation is drawn fresh per batch at training time
(scripts/demo/augment.py).

`training_segments(record, template)` shows how each assistant message becomes a (prompt, completion) pair
exactly as inference sees it (thinking-off prompts carry an empty thought channel that history renders omit).

What this script does not do: train the tokenizer (make_tokenizer.py), augment audio (augment.py), train.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from random import Random
from typing import Any, Callable

import numpy as np
import soundfile as sf
import soxr
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from a checkout: use the checkout's unigemma
    sys.path.insert(0, str(REPO))

from unigemma.inputs.template import ChatTemplate, normalize_messages  # noqa: E402

SPLITS = ("train", "val", "test")
SAMPLE_RATE = 16_000
MAX_SOFT_TOKENS = 70  # the smallest image budget: a 96×96 image becomes 8×8 = 64 soft tokens
IMAGE_SIZES = [(96, 96)] * 4 + [(96, 128), (128, 96)]  # (height, width); some non-square grids
SUPERSAMPLE = 4  # shapes are drawn 4× larger and downsampled: smooth edges, exact fill in the middle

# --- what can be drawn / spoken -----------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 80, 220), "yellow": (240, 200, 20),
    "orange": (245, 130, 20), "purple": (130, 40, 170), "pink": (240, 110, 180), "black": (25, 25, 25),
}
TEXT_COLOURS = ("red", "green", "blue", "purple", "black", "orange")  # readable on a light background
TEXT_CHARS = "0123456789ABCDEFGHJKLMNPRSTUVWXYZ"  # no I/O/Q: too close to 1/0 in some fonts

# Font files from the Debian packages fonts-dejavu-core and fonts-liberation.
TRAIN_FONTS = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSerif", "DejaVuSansMono", "LiberationSans-Regular",
               "LiberationSans-Bold", "LiberationMono-Regular", "LiberationSerif-Bold")
HELD_OUT_FONTS = ("DejaVuSansMono-Bold", "LiberationSerif-Regular")
FONT_DIRS = ("/usr/share/fonts/truetype", "/usr/share/fonts", "/usr/local/share/fonts")
FONT_PACKAGES = ("fonts-dejavu-core", "fonts-liberation")
DEFAULT_FONT = "PIL-default"

# espeak-ng voices (its own, not mbrola) and voice variants.
TRAIN_VOICES = ("en", "en-us", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")
HELD_OUT_VOICES = ("en-gb-scotland", "en-us-nyc")
TRAIN_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "f5")
HELD_OUT_VARIANTS = ("m7", "f4")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEEN_WORDS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
              "eighteen", "nineteen")
TENS_WORDS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
SHORT_WORDS = ("yes", "no", "up", "down", "left", "right", "stop", "go", "on", "off", "red", "green", "blue",
               "cat", "dog", "hello", "house", "water", "apple", "sun", "moon", "tree", "fish", "bird")

# Share of each task in every split (rounded to whole examples, largest remainder first).
TASK_WEIGHTS: dict[str, float] = {
    "shape": 0.09, "colour": 0.09, "describe": 0.05, "count": 0.08, "text": 0.08,
    "digit": 0.14, "number": 0.04, "transcribe": 0.12,
    "arithmetic": 0.12, "tool": 0.13, "json": 0.06,
}
HOLDABLE = {"text", "digit", "number", "transcribe"}  # tasks whose font / voice can be held out
HELD_OUT_SHARE = 0.5  # in the test split

SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly.", "You are a small demo model. Be concise.")
SYSTEM_SHARE = 0.12


def number_words(n: int) -> str:
    """0..99 in words, as espeak-ng should say them and as transcripts are written: 42 → 'forty two'."""
    if not 0 <= n <= 99:
        raise ValueError(f"number_words takes 0..99, got {n}")
    if n < 10:
        return DIGIT_WORDS[n]
    if n < 20:
        return TEEN_WORDS[n - 10]
    tens, ones = divmod(n, 10)
    return TENS_WORDS[tens] + ("" if ones == 0 else " " + DIGIT_WORDS[ones])


# --- system requirements: fonts and espeak-ng ------------------------------------------------------------------

def _apt_install(packages: tuple[str, ...]) -> bool:
    """apt-get update && apt-get install -y PACKAGES when we can (root, apt-get present); True on success."""
    if shutil.which("apt-get") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    print(f"installing {' '.join(packages)} with apt-get ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
            return False
    return True


def find_espeak(install: bool = True) -> str:
    """Path of espeak-ng; installs the Debian package when missing and `install` is set, else ValueError."""
    exe = shutil.which("espeak-ng")
    if exe is None and install and _apt_install(("espeak-ng",)):
        exe = shutil.which("espeak-ng")
    if exe is None:
        raise ValueError("espeak-ng is not installed and could not be installed; the audio tasks need it: "
                         "run `apt-get update && apt-get install -y espeak-ng` (Debian/Ubuntu) and retry")
    return exe


def _font_index() -> dict[str, str]:
    found: dict[str, str] = {}
    for root in FONT_DIRS:
        if os.path.isdir(root):
            for dirpath, _, files in sorted(os.walk(root)):
                for f in sorted(files):
                    if f.endswith(".ttf"):
                        found.setdefault(f[:-4], os.path.join(dirpath, f))
    return found


def find_fonts(install: bool = True) -> dict[str, str]:
    """{font name: .ttf path} for the fonts this script knows; installs the packages when none is found.

    Returns {} when no font file can be had: text images then use PIL's built-in font (with a warning) and the
    test split has no held-out fonts.
    """
    wanted = TRAIN_FONTS + HELD_OUT_FONTS
    index = _font_index()
    if not any(n in index for n in wanted) and install and _apt_install(FONT_PACKAGES):
        index = _font_index()
    fonts = {n: index[n] for n in wanted if n in index}
    missing = [n for n in wanted if n not in fonts]
    if not fonts:
        warnings.warn("no TrueType fonts found (apt-get install -y fonts-dejavu-core fonts-liberation); text "
                      "images use PIL's default font and no font is held out", stacklevel=2)
    elif missing:
        warnings.warn(f"fonts not found, left out: {', '.join(missing)}", stacklevel=2)
    return fonts


@dataclass
class Resources:
    """What the generators need from the machine, resolved once in the parent process."""

    espeak: str | None
    fonts: dict[str, str] = field(default_factory=dict)

    def font_names(self, held_out: bool) -> list[str]:
        names = [n for n in (HELD_OUT_FONTS if held_out else TRAIN_FONTS) if n in self.fonts]
        if not names and not held_out:
            names = [DEFAULT_FONT]
        return names


def load_font(res: Resources, name: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if name == DEFAULT_FONT:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(res.fonts[name], size=size)


# --- images ---------------------------------------------------------------------------------------------------

def _polygon(cx: float, cy: float, r: float, n: int, start_deg: float, rot: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(math.radians(start_deg + rot + 360 * k / n)),
             cy + r * math.sin(math.radians(start_deg + rot + 360 * k / n))) for k in range(n)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int],
               rot: float = 0.0) -> None:
    """One filled shape centred on (cx, cy) with outer radius r; the centre pixel is always inside the fill."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r, 4, 45, rot), fill=fill)
    elif shape == "diamond":
        # A rhombus taller than wide, so it never reads as a turned square.
        pts = [(0, -r), (0.62 * r, 0), (0, r), (-0.62 * r, 0)]
        c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
        draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=fill)
    elif shape == "triangle":
        # Centred on its centroid, not its circumcentre, so it fills the box evenly.
        draw.polygon(_polygon(cx, cy + 0.15 * r, r, 3, -90, rot), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, 0, rot), fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = math.radians(-90 + rot + 36 * k)
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        draw.polygon(pts, fill=fill)
    elif shape == "cross":
        w = 0.34 * r
        arms = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
                (-r, -w), (-w, -w)]
        c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
        draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in arms], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def _background(rng: Random) -> tuple[int, int, int]:
    if rng.random() < 0.5:
        return (255, 255, 255)
    return tuple(rng.randint(225, 255) for _ in range(3))  # type: ignore[return-value]


def _canvas(rng: Random) -> tuple[Image.Image, ImageDraw.ImageDraw, int, int]:
    h, w = rng.choice(IMAGE_SIZES)
    img = Image.new("RGB", (w * SUPERSAMPLE, h * SUPERSAMPLE), _background(rng))
    return img, ImageDraw.Draw(img), h, w


def _finish(img: Image.Image, h: int, w: int) -> Image.Image:
    return img.resize((w, h), Image.Resampling.LANCZOS)


def shape_image(rng: Random) -> tuple[Image.Image, dict]:
    """One shape of one colour; meta holds shape, colour, centre (x, y) and radius in output pixels."""
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    img, draw, h, w = _canvas(rng)
    r = rng.uniform(16, min(h, w) * 0.42)
    cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
    rot = rng.uniform(-12, 12)
    s = SUPERSAMPLE
    draw_shape(draw, shape, cx * s, cy * s, r * s, COLOURS[colour], rot)
    return _finish(img, h, w), {"shape": shape, "colour": colour, "centre": [round(cx, 2), round(cy, 2)],
                                "radius": round(r, 2), "size": [h, w]}


def count_image(rng: Random) -> tuple[Image.Image, dict]:
    """1–6 small non-overlapping shapes of any kind and colour; meta lists each one."""
    n = rng.randint(1, 6)
    img, draw, h, w = _canvas(rng)
    objects: list[dict] = []
    tries = 0
    while len(objects) < n:
        tries += 1
        assert tries < 10_000, "could not place the shapes"
        r = rng.uniform(7, 12)
        cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
        if any(math.hypot(cx - o["centre"][0], cy - o["centre"][1]) < r + o["radius"] + 3 for o in objects):
            continue
        objects.append({"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)),
                        "centre": [round(cx, 2), round(cy, 2)], "radius": round(r, 2)})
    s = SUPERSAMPLE
    for o in objects:
        draw_shape(draw, o["shape"], o["centre"][0] * s, o["centre"][1] * s, o["radius"] * s,
                   COLOURS[o["colour"]], rng.uniform(-12, 12))
    return _finish(img, h, w), {"count": n, "objects": objects, "size": [h, w]}


def text_image(rng: Random, res: Resources, held_out: bool) -> tuple[Image.Image, dict]:
    """1–2 characters in one font, colour, size, small rotation; meta holds text, font and colour."""
    text = "".join(rng.choice(TEXT_CHARS) for _ in range(1 if rng.random() < 0.6 else 2))
    font_name = rng.choice(res.font_names(held_out))
    colour = rng.choice(TEXT_COLOURS)
    h, w = rng.choice(IMAGE_SIZES)
    bg = _background(rng)
    size = rng.randint(40, 62) if len(text) == 1 else rng.randint(32, 44)
    font = load_font(res, font_name, size * SUPERSAMPLE)
    # Draw on a transparent layer, rotate it, then place it: the glyphs never leave the canvas.
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    pad = 4 * SUPERSAMPLE
    layer = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (0, 0, 0, 0))
    ImageDraw.Draw(layer).text((pad - left, pad - top), text, font=font, fill=COLOURS[colour] + (255,))
    layer = layer.rotate(rng.uniform(-10, 10), resample=Image.Resampling.BICUBIC, expand=True)
    canvas = Image.new("RGB", (w * SUPERSAMPLE, h * SUPERSAMPLE), bg)
    if layer.width > canvas.width or layer.height > canvas.height:  # a wide pair in a narrow image: shrink it
        k = min(canvas.width / layer.width, canvas.height / layer.height)
        layer = layer.resize((max(1, int(layer.width * k)), max(1, int(layer.height * k))),
                             Image.Resampling.LANCZOS)
    x = rng.randint(0, canvas.width - layer.width)
    y = rng.randint(0, canvas.height - layer.height)
    canvas.paste(layer, (x, y), layer)
    return _finish(canvas, h, w), {"text": text, "font": font_name, "colour": colour, "size": [h, w]}


# --- audio ----------------------------------------------------------------------------------------------------

def speak(res: Resources, text: str, voice: str, variant: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng → float32 mono 16 kHz, silence trimmed to 50 ms margins, peak 0.5."""
    if res.espeak is None:
        raise ValueError("espeak-ng is needed for the audio tasks (apt-get install -y espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.wav")
        name = voice + (f"+{variant}" if variant else "")
        subprocess.run([res.espeak, "-v", name, "-s", str(speed), "-p", str(pitch), "-w", path, text],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    wave = data.mean(axis=1)
    if rate != SAMPLE_RATE:
        wave = soxr.resample(wave, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    peak = float(np.abs(wave).max())
    if peak <= 1e-4:
        raise RuntimeError(f"espeak-ng produced silence for {text!r} with voice {name}")
    loud = np.flatnonzero(np.abs(wave) > 0.02 * peak)
    margin = SAMPLE_RATE // 20
    wave = wave[max(0, loud[0] - margin): loud[-1] + margin + 1]
    return (wave * (0.5 / peak)).astype(np.float32)


def _voice(rng: Random, held_out: bool) -> tuple[str, str, int, int]:
    if held_out:
        # A held-out accent with any variant, or a seen accent with a held-out variant.
        if rng.random() < 0.7:
            voice, variant = rng.choice(HELD_OUT_VOICES), rng.choice(TRAIN_VARIANTS + HELD_OUT_VARIANTS)
        else:
            voice, variant = rng.choice(TRAIN_VOICES), rng.choice(HELD_OUT_VARIANTS)
    else:
        voice, variant = rng.choice(TRAIN_VOICES), rng.choice(TRAIN_VARIANTS)
    return voice, variant, rng.randint(120, 210), rng.randint(25, 75)


# --- records --------------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One example to make: everything a worker process needs."""

    out: str
    split: str
    seed: int
    index: int
    task: str
    res: Resources

    @property
    def rel(self) -> str:
        return f"{self.split}/{self.index:06d}"

    def rng(self) -> Random:
        return Random(f"{self.seed}:{self.split}:{self.index}")


def _save_image(job: Job, img: Image.Image) -> dict:
    rel = job.rel + ".png"
    img.save(os.path.join(job.out, rel), format="PNG")
    return {"type": "image", "image": rel, "max_soft_tokens": MAX_SOFT_TOKENS}


def _save_audio(job: Job, wave: np.ndarray) -> dict:
    rel = job.rel + ".wav"
    sf.write(os.path.join(job.out, rel), wave, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return {"type": "audio", "audio": rel}


def _user(rng: Random, media: dict | None, question: str) -> dict:
    if media is None:
        return {"role": "user", "content": question}
    parts = [media, {"type": "text", "text": question}]
    if rng.random() < 0.2:  # the question first, sometimes
        parts.reverse()
    return {"role": "user", "content": parts}


def _record(job: Job, rng: Random, task: str, answer: str, messages: list[dict], *, held_out: bool = False,
            thinking: bool = False, meta: dict | None = None, **extra: Any) -> dict:
    if rng.random() < SYSTEM_SHARE:
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + messages
    rec = {"id": f"{job.split}-{job.index:06d}", "split": job.split, "task": task, "answer": answer,
           "held_out": held_out, "enable_thinking": thinking, "messages": messages}
    rec.update(extra)
    rec["meta"] = meta or {}
    return rec


SHAPE_QUESTIONS = ("What shape is this?", "What shape is in the picture?", "Name the shape.",
                   "Which shape do you see?", "What is the shape in this image?")
COLOUR_QUESTIONS = ("What colour is the shape?", "What color is it?", "Which colour is the shape?",
                    "What color is the shape in the picture?", "Name the colour.")
DESCRIBE_QUESTIONS = ("Describe the image.", "What is in the picture?", "What do you see?",
                      "Describe the shape and its colour.")
# Questions that ask for both at once, as users type them ("What shape and colour is this?" must not get only
# "red"): the `describe` task answers them with "a red circle"; meta.question says which list a record drew from.
COMPOUND_QUESTIONS = ("What shape and colour is this?", "What colour and shape is it?",
                      "What shape and color is the object?", "Tell me the shape and the colour.", "What is this?",
                      "What color and shape is this?", "Which shape and colour do you see?",
                      "What shape and what colour is it?", "Name the shape and its colour.",
                      "What are the shape and colour of this?", "Shape and colour?", "What is the colour and shape?")
COMPOUND_SHARE = 0.5  # of the describe records, in every split
COUNT_QUESTIONS = ("How many shapes are there?", "How many objects are in the image?", "Count the shapes.",
                   "How many shapes do you see?")
TEXT_QUESTIONS = ("What is written in the image?", "Read the text.", "Which characters are shown?",
                  "What does the image say?")
TRANSCRIBE_QUESTIONS = ("What was said?", "Transcribe the audio.", "What word do you hear?",
                        "Write down what you hear.")
NUMBER_QUESTIONS = ("Which number was said?", "What number do you hear?", "Which number is spoken?",
                    "Write the spoken number as digits.")


def make_image_task(job: Job, rng: Random) -> dict:
    task = job.task
    if task == "count":
        img, meta = count_image(rng)
        return _record(job, rng, task, str(meta["count"]),
                       [_user(rng, _save_image(job, img), rng.choice(COUNT_QUESTIONS)),
                        {"role": "assistant", "content": str(meta["count"])}], meta=meta)
    if task == "text":
        held = job.split == "test" and bool(job.res.font_names(True)) and rng.random() < HELD_OUT_SHARE
        img, meta = text_image(rng, job.res, held)
        return _record(job, rng, task, meta["text"],
                       [_user(rng, _save_image(job, img), rng.choice(TEXT_QUESTIONS)),
                        {"role": "assistant", "content": meta["text"]}], held_out=held, meta=meta)
    img, meta = shape_image(rng)
    if task == "shape":
        question, answer = rng.choice(SHAPE_QUESTIONS), meta["shape"]
    elif task == "colour":
        question, answer = rng.choice(COLOUR_QUESTIONS), meta["colour"]
    else:
        compound = rng.random() < COMPOUND_SHARE
        question = rng.choice(COMPOUND_QUESTIONS if compound else DESCRIBE_QUESTIONS)
        answer = f"a {meta['colour']} {meta['shape']}"
        meta = {**meta, "question": "compound" if compound else "describe"}
    return _record(job, rng, task, answer, [_user(rng, _save_image(job, img), question),
                                            {"role": "assistant", "content": answer}], meta=meta)


def make_audio_task(job: Job, rng: Random) -> dict:
    task = job.task
    held = job.split == "test" and rng.random() < HELD_OUT_SHARE
    voice, variant, speed, pitch = _voice(rng, held)
    if task == "digit":
        n = rng.randint(0, 9)
        said, answer, question = DIGIT_WORDS[n], str(n), rng.choice(NUMBER_QUESTIONS)
    elif task == "number":
        n = rng.randint(10, 99)
        said, answer, question = number_words(n), str(n), rng.choice(NUMBER_QUESTIONS)
    else:
        kind = rng.random()
        said = (DIGIT_WORDS[rng.randint(0, 9)] if kind < 0.35 else
                number_words(rng.randint(10, 99)) if kind < 0.55 else rng.choice(SHORT_WORDS))
        answer, question = said, rng.choice(TRANSCRIBE_QUESTIONS)
    part = _save_audio(job, speak(job.res, said, voice, variant, speed, pitch))
    meta = {"said": said, "voice": voice, "variant": variant, "speed": speed, "pitch": pitch}
    return _record(job, rng, task, answer, [_user(rng, part, question), {"role": "assistant", "content": answer}],
                   held_out=held, meta=meta)


# --- arithmetic -------------------------------------------------------------------------------------------------

def eval_pool(a: int, b: int, op: str) -> bool:
    """True for the problems reserved for val/test (about 1 in 8); train never sees them."""
    return (a * 31 + b * 17 + (7 if op == "-" else 0)) % 8 == 0


def arithmetic_trace(a: int, b: int, op: str) -> tuple[str, int]:
    """A short digit-by-digit trace (ones, then tens) and the result, for a, b in 0..99."""
    a1, a0, b1, b0 = a // 10, a % 10, b // 10, b % 10
    if op == "+":
        ones = a0 + b0
        carry = ones // 10
        lines = [f"ones: {a0} + {b0} = {ones}" + (f", write {ones % 10} carry 1" if carry else "")]
        tens = a1 + b1 + carry
        lines.append(f"tens: {a1} + {b1}" + (" + 1" if carry else "") + f" = {tens}")
        result = a + b
    else:
        borrow = int(a0 < b0)
        lines = [f"ones: {a0} - {b0} needs a borrow: {a0 + 10} - {b0} = {a0 + 10 - b0}" if borrow
                 else f"ones: {a0} - {b0} = {a0 - b0}"]
        lines.append(f"tens: {a1}" + (" - 1" if borrow else "") + f" - {b1} = {a1 - borrow - b1}")
        result = a - b
    assert result == (tens * 10 + ones % 10 if op == "+" else (a1 - borrow - b1) * 10 + (a0 + 10 * borrow - b0))
    lines.append(f"{a} {op} {b} = {result}")
    return "\n".join(lines), result


ARITH_QUESTIONS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "{a}{op}{b}",
                   "Calculate {a} {op} {b}.")
ARITH_WORDED = {"+": ("What is {a} plus {b}?", "Add {a} and {b}."),
                "-": ("What is {a} minus {b}?", "Subtract {b} from {a}.")}


def make_arithmetic(job: Job, rng: Random) -> dict:
    want_eval = job.split != "train"
    while True:
        op = "+" if rng.random() < 0.75 else "-"
        small = rng.random() < 0.15  # one operand of one digit, sometimes
        a = rng.randint(0 if small else 10, 99)
        b = rng.randint(0, 9) if small else rng.randint(10, 99)
        if op == "-" and a < b:
            a, b = b, a
        if eval_pool(a, b, op) == want_eval:
            break
    trace, result = arithmetic_trace(a, b, op)
    template = rng.choice(ARITH_QUESTIONS + ARITH_WORDED[op])
    thinking = rng.random() < 0.7
    answer = str(result)
    reply: dict = {"role": "assistant", "content": answer}
    if thinking:
        reply["reasoning_content"] = trace
    return _record(job, rng, "arithmetic", answer, [_user(rng, None, template.format(a=a, b=b, op=op)), reply],
                   thinking=thinking, meta={"a": a, "b": b, "op": op})


# --- tools ------------------------------------------------------------------------------------------------------

UNITS = {("kilometers", "miles"): 0.621371, ("miles", "kilometers"): 1.609344, ("kilograms", "pounds"): 2.204623,
         ("pounds", "kilograms"): 0.453592, ("meters", "feet"): 3.280840, ("feet", "meters"): 0.3048}
UNIT_NAMES = sorted({u for pair in UNITS for u in pair} | {"celsius", "fahrenheit"})
TOOLS: dict[str, dict] = {
    "get_weather": {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"], "additionalProperties": False}}},
    "get_time": {"type": "function", "function": {
        "name": "get_time", "description": "Local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                       "required": ["city"], "additionalProperties": False}}},
    "add": {"type": "function", "function": {
        "name": "add", "description": "Add two numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                       "required": ["a", "b"], "additionalProperties": False}}},
    "convert_units": {"type": "function", "function": {
        "name": "convert_units", "description": "Convert a value between units",
        "parameters": {"type": "object", "properties": {
            "value": {"type": "number"},
            # Plain strings, not an enum of UNIT_NAMES: two 8-name enums would double the declaration's tokens.
            "from_unit": {"type": "string"}, "to_unit": {"type": "string"}},
            "required": ["value", "from_unit", "to_unit"], "additionalProperties": False}}},
}
CITIES = ("Oslo", "Paris", "Tokyo", "Lima", "Cairo", "Berlin", "Madrid", "Rome", "Lisbon", "Dublin", "Vienna",
          "Prague", "Warsaw", "Athens", "Nairobi", "Lagos", "Delhi", "Seoul", "Sydney", "Toronto", "Chicago",
          "Denver", "Boston", "Quito", "Bogota", "Santiago", "Havana", "Reykjavik", "Helsinki", "Riga", "Kyiv",
          "Istanbul", "Dubai", "Hanoi", "Manila", "Jakarta", "Perth", "Auckland", "Montreal", "Zurich")
CONDITIONS = ("sunny", "cloudy", "rainy", "snowy", "windy", "foggy")
WEATHER_QUESTIONS = ("What is the weather in {city}?", "How is the weather in {city} today?",
                     "Is it cold in {city}?", "Weather for {city}, please.", "Tell me the weather in {city}.")
WEATHER_UNIT_QUESTIONS = ("What is the weather in {city} in {unit}?", "Weather in {city}, temperature in {unit}.")
TIME_QUESTIONS = ("What time is it in {city}?", "Tell me the local time in {city}.", "Current time in {city}?")
ADD_QUESTIONS = ("Use the calculator to add {a} and {b}.", "What is {a} + {b}? Use the add tool.",
                 "Please add {a} and {b}.", "Sum {a} and {b} with the tool.")
CONVERT_QUESTIONS = ("Convert {v} {f} to {t}.", "How many {t} is {v} {f}?", "What is {v} {f} in {t}?")
CHAT_TURNS = (("Hello!", "Hello! How can I help you?"), ("Thanks!", "You're welcome!"),
              ("Who are you?", "I am a small demo assistant."), ("Good morning.", "Good morning! How can I help?"))


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else round(x, 2)


def _fmt(x: float) -> str:
    return str(_num(x))


def _plan_call(rng: Random, name: str) -> tuple[str, dict, Any, str]:
    """(question, arguments, result, final answer) for one call of tool `name`."""
    if name == "get_weather":
        city, temp, cond = rng.choice(CITIES), rng.randint(-10, 35), rng.choice(CONDITIONS)
        if rng.random() < 0.3:
            unit = rng.choice(["celsius", "fahrenheit"])
            q = rng.choice(WEATHER_UNIT_QUESTIONS).format(city=city, unit=unit)
            args: dict = {"city": city, "unit": unit}
        else:
            unit, q, args = "celsius", rng.choice(WEATHER_QUESTIONS).format(city=city), {"city": city}
        if unit == "fahrenheit":
            temp = round(temp * 9 / 5 + 32)
        result = {"temperature": temp, "unit": unit, "condition": cond}
        return q, args, result, f"It is {temp} degrees {unit} and {cond} in {city}."
    if name == "get_time":
        city, hh, mm = rng.choice(CITIES), rng.randint(0, 23), rng.randint(0, 59)
        time_s = f"{hh:02d}:{mm:02d}"
        return (rng.choice(TIME_QUESTIONS).format(city=city), {"city": city}, {"time": time_s},
                f"It is {time_s} in {city}.")
    if name == "add":
        a, b = rng.randint(100, 9999), rng.randint(100, 9999)
        return (rng.choice(ADD_QUESTIONS).format(a=a, b=b), {"a": a, "b": b}, {"result": a + b},
                f"{a} + {b} = {a + b}.")
    if name == "convert_units":
        if rng.random() < 0.25:
            f, t = rng.choice([("celsius", "fahrenheit"), ("fahrenheit", "celsius")])
            v = rng.randint(-20, 100)
            out = v * 9 / 5 + 32 if f == "celsius" else (v - 32) * 5 / 9
        else:
            (f, t), k = rng.choice(list(UNITS.items()))
            v = rng.randint(1, 500) if rng.random() < 0.7 else round(rng.uniform(0.5, 100), 1)
            out = v * k
        out = round(out, 2)
        return (rng.choice(CONVERT_QUESTIONS).format(v=_fmt(v), f=f, t=t),
                {"value": _num(v), "from_unit": f, "to_unit": t}, {"value": _num(out), "unit": t},
                f"{_fmt(v)} {f} is {_fmt(out)} {t}.")
    raise AssertionError(name)


def make_tool(job: Job, rng: Random) -> dict:
    names = list(TOOLS)
    kind = rng.random()
    need = None if kind < 0.08 else rng.choice(names)
    others = [n for n in names if n != need]
    rng.shuffle(others)
    declared = ([need] if need else []) + others[: rng.randint(1, 2) if need else rng.randint(2, 3)]
    rng.shuffle(declared)
    tools = [TOOLS[n] for n in declared]
    thinking = rng.random() < 0.25
    if need is None:  # nothing to call: a plain reply
        q, a = rng.choice(CHAT_TURNS)
        return _record(job, rng, "tool", a, [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                       thinking=False, tools=tools, meta={"calls": []})
    plans = [_plan_call(rng, need)]
    if need in ("get_weather", "get_time") and rng.random() < 0.15:  # two cities: two parallel calls
        second = _plan_call(rng, need)
        while second[1]["city"] == plans[0][1]["city"]:
            second = _plan_call(rng, need)
        plans.append(second)
        q = (f"What is the weather in {plans[0][1]['city']} and in {plans[1][1]['city']}?" if need == "get_weather"
             else f"What time is it in {plans[0][1]['city']} and in {plans[1][1]['city']}?")
    else:
        q = plans[0][0]
    calls = [{"id": f"call_{k + 1}", "type": "function",
              "function": {"name": need, "arguments": json.dumps(p[1], ensure_ascii=False)}}
             for k, p in enumerate(plans)]
    as_text = rng.random() < 0.8  # OpenAI clients send tool results as text; Python callers may pass objects
    results = [{"role": "tool", "tool_call_id": c["id"],
                "content": json.dumps(p[2], ensure_ascii=False) if as_text else p[2]} for c, p in zip(calls, plans)]
    final = " ".join(p[3] for p in plans)
    call_msg: dict = {"role": "assistant", "content": None, "tool_calls": calls}
    final_msg: dict = {"role": "assistant", "content": final}
    if thinking:
        where = " and ".join(str(p[1].get("city", "")) for p in plans) if need in ("get_weather", "get_time") else ""
        call_msg["reasoning_content"] = f"The user needs {need}" + (f" for {where}" if where else "") + \
            f". I will call {need}."
        final_msg["reasoning_content"] = " ".join(f"{need} returned {json.dumps(p[2], ensure_ascii=False)}."
                                                  for p in plans) + " I will answer with it."
    meta = {"calls": [{"name": need, "arguments": p[1]} for p in plans], "declared": declared}
    return _record(job, rng, "tool", final, [{"role": "user", "content": q}, call_msg, *results, final_msg],
                   thinking=thinking, tools=tools, meta=meta)


# --- JSON extraction --------------------------------------------------------------------------------------------

NAMES = ("Maria", "John", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Sara", "Ivan", "Nadia", "Peter",
         "Chen", "Fatima", "Lucas", "Emma", "Kofi", "Ana", "Yuki", "David")
ITEMS = ("lamp", "chair", "book", "pen", "mug", "table", "clock", "bag", "shirt", "plate")
EVENTS = ("concert", "meeting", "dinner", "match", "lecture", "party", "interview", "flight")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
SCHEMAS: dict[str, dict] = {
    "person": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                "city": {"type": "string"}},
               "required": ["name", "age", "city"], "additionalProperties": False},
    "order": {"type": "object", "properties": {"item": {"type": "string"}, "quantity": {"type": "integer"},
                                               "price": {"type": "number"}},
              "required": ["item", "quantity", "price"], "additionalProperties": False},
    "event": {"type": "object", "properties": {"event": {"type": "string"}, "day": {"type": "string", "enum": list(DAYS)},
                                               "time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}},
              "required": ["event", "day", "time"], "additionalProperties": False},
    "shape": {"type": "object", "properties": {"shape": {"type": "string", "enum": list(SHAPES)},
                                               "colour": {"type": "string", "enum": list(COLOURS)}},
              "required": ["shape", "colour"], "additionalProperties": False},
}


def make_json(job: Job, rng: Random) -> dict:
    kind = rng.choices(["person", "order", "event", "shape"], weights=[3, 3, 3, 2])[0]
    media = None
    if kind == "person":
        v = {"name": rng.choice(NAMES), "age": rng.randint(18, 90), "city": rng.choice(CITIES)}
        text = rng.choice(("{name} is {age} years old and lives in {city}.", "Meet {name}, {age}, from {city}.",
                           "{name} ({age}) moved to {city} last year.")).format(**v)
        q = f"Extract the name, age and city as JSON.\nText: {text}"
    elif kind == "order":
        v = {"item": rng.choice(ITEMS), "quantity": rng.randint(1, 12), "price": round(rng.uniform(1, 99), 2)}
        text = rng.choice(("Order {quantity} x {item} at {price} dollars each.",
                           "I want {quantity} of the {item}, price {price}.",
                           "Item: {item}. Quantity: {quantity}. Unit price: {price}.")).format(**v)
        q = f"Extract item, quantity and price as JSON.\nText: {text}"
    elif kind == "event":
        v = {"event": rng.choice(EVENTS), "day": rng.choice(DAYS),
             "time": f"{rng.randint(6, 22):02d}:{rng.choice(['00', '15', '30', '45'])}"}
        text = rng.choice(("The {event} is on {day} at {time}.", "See you at the {event}, {day} {time}.",
                           "{day}, {time}: {event}.")).format(**v)
        q = f"Extract the event, day and time as JSON.\nText: {text}"
    else:
        img, drawn = shape_image(rng)
        media = _save_image(job, img)
        v = {"shape": drawn["shape"], "colour": drawn["colour"]}
        q = rng.choice(("Describe the shape as JSON with shape and colour.",
                        "Give the shape and colour of the object as JSON."))
    answer = json.dumps(v, ensure_ascii=False, separators=(",", ":"))  # schema order, compact
    rf = {"type": "json_schema", "json_schema": {"name": kind, "schema": SCHEMAS[kind], "strict": True}}
    meta = {"schema": kind, "value": v}
    if media is not None:
        meta.update(drawn)
    return _record(job, rng, "json", answer, [_user(rng, media, q), {"role": "assistant", "content": answer}],
                   response_format=rf, meta=meta)


MAKERS: dict[str, Callable[[Job, Random], dict]] = {
    "shape": make_image_task, "colour": make_image_task, "describe": make_image_task, "count": make_image_task,
    "text": make_image_task, "digit": make_audio_task, "number": make_audio_task, "transcribe": make_audio_task,
    "arithmetic": make_arithmetic, "tool": make_tool, "json": make_json,
}


def make_example(job: Job) -> dict:
    return MAKERS[job.task](job, job.rng())


# --- splits ---------------------------------------------------------------------------------------------------

def task_counts(n: int, weights: dict[str, float] = TASK_WEIGHTS) -> dict[str, int]:
    """Whole example counts per task summing to n (largest remainder), in TASK_WEIGHTS order."""
    total = sum(weights.values())
    exact = {t: n * w / total for t, w in weights.items()}
    counts = {t: int(x) for t, x in exact.items()}
    for t in sorted(exact, key=lambda t: (-(exact[t] - counts[t]), list(weights).index(t)))[: n - sum(counts.values())]:
        counts[t] += 1
    return counts


def parse_weights(text: str) -> dict[str, float]:
    """'shape=0.2,digit=0.3,...' → a full weight table: tasks left out keep weight 0."""
    weights = {t: 0.0 for t in TASK_WEIGHTS}
    for part in filter(None, (x.strip() for x in text.split(","))):
        name, _, value = part.partition("=")
        if name not in weights:
            raise ValueError(f"--train-weights: unknown task {name!r}; tasks are {', '.join(TASK_WEIGHTS)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"--train-weights: {part!r} is not TASK=NUMBER") from None
        if weights[name] < 0:
            raise ValueError(f"--train-weights: {name} must be >= 0, got {value}")
    if sum(weights.values()) <= 0:
        raise ValueError("--train-weights: at least one task needs a weight > 0")
    return weights


def task_schedule(n: int, seed: int, split: str, weights: dict[str, float] = TASK_WEIGHTS) -> list[str]:
    tasks = [t for t, c in task_counts(n, weights).items() for _ in range(c)]
    Random(f"{seed}:{split}:order").shuffle(tasks)
    return tasks


def _clear(directory: Path) -> None:
    # Only files this script writes, so a rerun with a smaller N leaves no stale media behind.
    for p in directory.glob("*"):
        if re.fullmatch(r"\d{6}\.(png|wav)", p.name):
            p.unlink()


def generate_split(out: Path, split: str, n: int, seed: int, res: Resources, pool: Any = None,
                   weights: dict[str, float] = TASK_WEIGHTS) -> list[dict]:
    """Make `n` examples of `split` (media files + returned records, in index order)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    (out / split).mkdir(parents=True, exist_ok=True)
    _clear(out / split)
    jobs = [Job(str(out), split, seed, i, t, res) for i, t in enumerate(task_schedule(n, seed, split, weights))]
    if pool is None:
        return [make_example(j) for j in jobs]
    return list(pool.imap(make_example, jobs, chunksize=16))


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def generate(out: str | Path, sizes: dict[str, int], seed: int = 0, *, jobs: int = 1, install: bool = True,
             res: Resources | None = None, train_weights: dict[str, float] | None = None) -> dict:
    """Write every split and manifest.json under `out`; returns the manifest.

    `train_weights` changes the task mix of the train split only (a focused second training stage); val and
    test keep TASK_WEIGHTS, so they are the same files whatever the train mix.
    """
    weights = {s: (train_weights if s == "train" and train_weights else TASK_WEIGHTS) for s in SPLITS}
    out = Path(out)
    for split, n in sizes.items():
        if split not in SPLITS or not isinstance(n, int) or n < 0:
            raise ValueError(f"sizes must map {SPLITS} to counts >= 0, got {split!r}: {n!r}")
    if res is None:
        audio = any(n > 0 for n in sizes.values())
        res = Resources(espeak=find_espeak(install) if audio else None, fonts=find_fonts(install))
    out.mkdir(parents=True, exist_ok=True)
    pool = multiprocessing.get_context("fork").Pool(jobs) if jobs > 1 else None
    try:
        for split, n in sizes.items():
            write_jsonl(out / f"{split}.jsonl", generate_split(out, split, n, seed, res, pool, weights[split]))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    manifest = {
        "generator": "scripts/demo/make_data.py", "format_version": 1, "seed": seed,
        "split_seeds": {s: f"{seed}:{s}:<index>" for s in sizes},
        "counts": {s: task_counts(n, weights[s]) for s, n in sizes.items()},
        "train_weights": weights["train"],
        "sample_rate": SAMPLE_RATE, "max_soft_tokens": MAX_SOFT_TOKENS, "image_sizes": sorted(set(IMAGE_SIZES)),
        "voices": {"train": list(TRAIN_VOICES), "held_out": list(HELD_OUT_VOICES)},
        "variants": {"train": list(TRAIN_VARIANTS), "held_out": list(HELD_OUT_VARIANTS)},
        "fonts": {"train": res.font_names(False), "held_out": res.font_names(True)},
        "tools": list(TOOLS), "json_schemas": list(SCHEMAS),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


# --- how a record becomes training text ----------------------------------------------------------------------------

_EMPTY_THOUGHT = "<|channel>thought\n<channel|>"


def training_segments(record: dict, template: ChatTemplate) -> list[tuple[str, str]]:
    """One (prompt, completion) pair per assistant message, as inference sees them.

    prompt = render(messages before it, add_generation_prompt=True); completion = what the model must write
    next: [thought] [tool calls then `<|tool_response>`] [text then `<turn|>`]. Train on prompt + completion with
    the loss on the completion. Rendering the whole conversation once is not the same: with thinking off the
    generation prompt pre-fills an empty thought channel that the history render leaves out.
    """
    messages = normalize_messages(record["messages"])
    thinking = bool(record.get("enable_thinking", False))
    tools = record.get("tools")
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], tools=tools, add_generation_prompt=True, enable_thinking=thinking)
        full = template.render(messages[: i + 1], tools=tools, add_generation_prompt=False,
                               enable_thinking=thinking)
        if full.startswith(prompt):
            completion = full[len(prompt):]
        elif prompt.endswith(_EMPTY_THOUGHT) and full.startswith(prompt[: -len(_EMPTY_THOUGHT)]):
            completion = full[len(prompt) - len(_EMPTY_THOUGHT):]
        else:
            at = len(os.path.commonprefix([prompt, full]))
            raise ValueError(f"{record.get('id')}: message {i} does not continue its prompt: the prompt ends "
                             f"{prompt[at:]!r} but the conversation renders {full[at:]!r}")
        if completion.endswith("<turn|>\n"):
            completion = completion[:-1]  # generation stops at <turn|>; the newline is the next turn's
        out.append((prompt, completion))
    return out


# --- command line ---------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (JSONL files, media, manifest.json)")
    p.add_argument("--train", type=int, default=20000)
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes (the output does not depend on it)")
    p.add_argument("--no-install", action="store_true", help="never apt-get install espeak-ng / fonts")
    p.add_argument("--train-weights", default=None, metavar="TASK=W,...",
                   help="task mix of the train split only (unnamed tasks get 0); val/test keep the default mix")
    args = p.parse_args(argv)
    try:
        train_weights = parse_weights(args.train_weights) if args.train_weights else None
    except ValueError as e:
        p.error(str(e))
    start = time.perf_counter()
    manifest = generate(args.out, {"train": args.train, "val": args.val, "test": args.test}, args.seed,
                        jobs=max(1, args.jobs), install=not args.no_install, train_weights=train_weights)
    took = time.perf_counter() - start
    for split, counts in manifest["counts"].items():
        print(f"{split}: {sum(counts.values())} examples  " + " ".join(f"{t}={c}" for t, c in counts.items()))
    print(f"fonts: {manifest['fonts']}")
    print(f"wrote {args.out} in {took:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
