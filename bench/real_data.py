"""Calibration and evaluation data for bench/real_models.py, made here from a seed (nothing downloaded):
text lines rendered with the DejaVu fonts, text on textured backgrounds for the detectors, drawn scenes
with figures for the YOLOv8 detector, and synthesised speech-like audio for the VAD; then each package's
own preprocessing (read from its source: sizes, mean/std, channel order, padding), with PIL's resampling
where the package calls cv2.

Every builder takes an ``np.random.Generator`` and returns the same arrays for the same seed on one
machine (PIL's text rasteriser and the fonts on disk are part of that machine).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
SAMPLE_RATE = 16000
VAD_CHUNK = 512  # the package's chunk at 16 kHz
VAD_CONTEXT = 64  # samples of the previous chunk it prepends

WORDS = ("the", "of", "and", "time", "people", "water", "light", "house", "number", "world", "river",
         "green", "market", "station", "open", "north", "winter", "garden", "paper", "street", "table",
         "signal", "quantize", "model", "orange", "silver", "window", "camera", "engine", "planet", "music",
         "Total", "Price", "Road", "Hotel", "Exit", "Bank", "Coffee", "Museum", "Airport", "London", "Paris")
CAPTCHA_CHARS = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def fonts() -> list[Path]:
    """The DejaVu text faces on this machine (the TeX math face has no Latin text metrics)."""
    found = sorted(p for p in FONT_DIR.glob("DejaVu*.ttf") if "Math" not in p.name)
    if not found:
        raise SystemExit(f"no DejaVu fonts in {FONT_DIR}: install fonts-dejavu-core")
    return found


def random_text(rng: np.random.Generator) -> str:
    """A short line: words, a number, or both (a price, a date, a code)."""
    kind = rng.integers(5)
    if kind == 0:
        return " ".join(rng.choice(WORDS, rng.integers(1, 4)))
    if kind == 1:
        return str(rng.integers(0, 10 ** int(rng.integers(2, 9))))
    if kind == 2:
        return f"{rng.choice(WORDS)} {rng.integers(1, 1000)}"
    if kind == 3:
        return f"{rng.integers(1990, 2030)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
    return f"{rng.choice(WORDS)}.{rng.integers(10, 100)}"


def captcha_text(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(CAPTCHA_CHARS), rng.integers(4, 7)))


def render_line(text: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """[height, width, 3] uint8 RGB: ``text`` in a random face and colours, fitted into the box, with noise."""
    from PIL import Image, ImageDraw, ImageFont

    faces = fonts()
    face = str(faces[rng.integers(len(faces))])
    bg = tuple(int(v) for v in rng.integers(160, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 90, 3))
    image = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(image)
    size = int(height * rng.uniform(0.6, 0.85))
    while True:
        font = ImageFont.truetype(face, size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        if (right - left <= 0.96 * width and bottom - top <= 0.92 * height) or size <= 8:
            break
        size -= 1
    x = rng.uniform(0, max(width - (right - left), 0)) - left
    y = (height - (bottom - top)) / 2 - top + rng.uniform(-0.04, 0.04) * height
    draw.text((x, y), text, fill=fg, font=font)
    return _noisy(np.asarray(image, np.float32), rng)


def _noisy(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(0.0, rng.uniform(0.0, 10.0), pixels.shape)
    return np.clip(pixels + noise, 0, 255).astype(np.uint8)


def _resize(pixels: np.ndarray, width: int, height: int, resample: str = "BILINEAR") -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(pixels).resize((width, height), getattr(Image.Resampling, resample)))


def line_width(text: str, height: int, rng: np.random.Generator, cap: float) -> int:
    """A box width for ``text`` at ``height`` (about 0.6 em per character), at most ``cap`` x height."""
    return int(min(max(len(text) * 0.6 * height * rng.uniform(0.9, 1.4), height), cap * height))


# --- each package's preprocessing --------------------------------------------------------------------


def ppocr_line_input(bgr: np.ndarray, height: int, width: int) -> np.ndarray:
    """rapidocr's recogniser/classifier input [3, height, width]: resized to ``height`` keeping the aspect
    (at most ``width`` wide), scaled to [-1, 1] ((x/255 - 0.5) / 0.5), zero-padded on the right."""
    h, w = bgr.shape[:2]
    resized_w = min(width, int(math.ceil(height * w / h)))
    chw = _resize(bgr, resized_w, height).astype(np.float32).transpose(2, 0, 1) / 255
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :resized_w] = (chw - 0.5) / 0.5
    return out


def ppocr_det_input(bgr: np.ndarray, limit_side_len: int = 736) -> np.ndarray:
    """rapidocr's detector input [3, H', W']: the shorter side brought up to ``limit_side_len`` (its
    limit_type "min"), both sides rounded to multiples of 32, (x/255 - 0.5) / 0.5."""
    h, w = bgr.shape[:2]
    ratio = limit_side_len / min(h, w) if min(h, w) < limit_side_len else 1.0
    rh, rw = (int(round(int(s * ratio) / 32) * 32) for s in (h, w))
    return ((_resize(bgr, rw, rh).astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)


def ddddocr_ocr_input(rgb: np.ndarray) -> np.ndarray:
    """ddddocr's OCR input [1, 64, W]: resized to height 64 keeping the aspect (LANCZOS), grey, x/255."""
    from PIL import Image

    h, w = rgb.shape[:2]
    grey = Image.fromarray(_resize(rgb, int(w * 64 / h), 64, "LANCZOS")).convert("L")
    return (np.asarray(grey, np.float32) / 255)[None]


def ddddocr_det_input(bgr: np.ndarray, size: int = 416) -> np.ndarray:
    """ddddocr's detector input [3, size, size]: resized to fit, padded with 114 at the bottom/right,
    BGR, 0-255 (no normalisation)."""
    r = min(size / bgr.shape[0], size / bgr.shape[1])
    rh, rw = int(bgr.shape[0] * r), int(bgr.shape[1] * r)
    padded = np.full((size, size, 3), 114, np.uint8)
    padded[:rh, :rw] = _resize(bgr, rw, rh)
    return padded.astype(np.float32).transpose(2, 0, 1)


def nudenet_input(rgb: np.ndarray, size: int = 320) -> np.ndarray:
    """nudenet's input [3, size, size]: padded with black to a square at the bottom/right, resized, RGB, x/255."""
    side = max(rgb.shape[:2])
    square = np.zeros((side, side, 3), np.uint8)
    square[:rgb.shape[0], :rgb.shape[1]] = rgb
    return (_resize(square, size, size).astype(np.float32) / 255).transpose(2, 0, 1)


# --- images for the detectors -----------------------------------------------------------------------


def texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """[height, width, 3] float32 0-255: smooth colour blobs, a gradient and stripes."""
    low = rng.uniform(60, 230, (height // 48 + 2, width // 48 + 2, 3)).astype(np.uint8)
    base = _resize(low, width, height, "BICUBIC").astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 40)
    stripes = 12 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    gradient = rng.uniform(-40, 40) * (yy / height - 0.5)
    return np.clip(base + (stripes + gradient)[..., None], 0, 255)


def text_scene(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """[height, width, 3] uint8 RGB: 3-8 words and numbers at random places and sizes on a texture."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(texture(height, width, rng).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    faces = fonts()
    for _ in range(rng.integers(3, 9)):
        font = ImageFont.truetype(str(faces[rng.integers(len(faces))]), int(rng.integers(height // 24, height // 8)))
        text = random_text(rng) if rng.random() < 0.7 else captcha_text(rng)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x = rng.uniform(0, max(width - (right - left), 1)) - left
        y = rng.uniform(0, max(height - (bottom - top), 1)) - top
        dark = rng.random() < 0.7
        colour = tuple(int(v) for v in (rng.integers(0, 60, 3) if dark else rng.integers(200, 256, 3)))
        draw.text((x, y), text, fill=colour, font=font)
    return _noisy(np.asarray(image, np.float32), rng)


def figure_scene(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """[height, width, 3] uint8 RGB: sky, ground and 1-3 standing figures (skin-toned head, arms and
    legs, a coloured torso) among other shapes."""
    from PIL import Image, ImageDraw

    sky, ground = rng.integers(90, 230, 3), rng.integers(40, 160, 3)
    horizon = int(height * rng.uniform(0.4, 0.7))
    pixels = np.empty((height, width, 3), np.float32)
    pixels[:horizon], pixels[horizon:] = sky, ground
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 4)):  # clutter
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        box = [x0, y0, x0 + rng.uniform(10, width / 3), y0 + rng.uniform(10, height / 3)]
        draw.rectangle(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    for _ in range(rng.integers(1, 4)):
        _figure(draw, rng, height, width)
    return _noisy(np.asarray(image, np.float32), rng)


def _figure(draw, rng: np.random.Generator, height: int, width: int) -> None:
    tall = rng.uniform(0.35, 0.9) * height
    cx, top = rng.uniform(0.15, 0.85) * width, rng.uniform(0, height - tall)
    head, skin = tall / 7.5, tuple(int(v) for v in np.array([224, 172, 140]) * rng.uniform(0.45, 1.1))
    shirt = tuple(int(v) for v in rng.integers(0, 256, 3))
    draw.ellipse([cx - head / 2, top, cx + head / 2, top + head * 1.2], fill=skin)
    body_top, hip = top + head * 1.3, top + tall * 0.55
    draw.rounded_rectangle([cx - head, body_top, cx + head, hip], radius=head / 3, fill=shirt)
    limb = max(int(head / 3), 2)
    for side in (-1, 1):
        draw.line([cx + side * head, body_top + head / 3, cx + side * 1.6 * head, hip], fill=skin, width=limb)
        draw.line([cx + side * head / 2, hip, cx + side * head / 1.5, top + tall], fill=shirt, width=limb + 1)


# --- audio for the VAD ------------------------------------------------------------------------------


def voiced(samples: int, rng: np.random.Generator) -> np.ndarray:
    """A speech-like voiced stretch: harmonics of a wavering pitch (90-250 Hz) shaped by three
    formant-like peaks, syllable-rate amplitude modulation and a little breath noise."""
    t = np.arange(samples) / SAMPLE_RATE
    f0 = rng.uniform(90, 250) * (1 + 0.04 * np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    formants = rng.uniform([300, 900, 2200], [900, 2300, 3300])
    mean_f0 = float(f0.mean())
    wave = np.zeros(samples)
    for k in range(1, int(4000 / mean_f0)):
        gain = sum(math.exp(-((k * mean_f0 - f) / (0.15 * f)) ** 2) for f in formants) + 0.02
        wave += gain / k ** 0.5 * np.sin(k * phase)
    syllables = 0.55 + 0.45 * np.sin(2 * np.pi * rng.uniform(2.5, 6) * t) ** 2
    edges = np.minimum(1, np.minimum(t, t[::-1]) / 0.03)
    wave = wave * syllables * edges / (np.abs(wave).max() + 1e-9)
    return rng.uniform(0.05, 0.5) * wave + 0.01 * rng.standard_normal(samples)


def audio_stream(samples: int, rng: np.random.Generator) -> np.ndarray:
    """``samples`` of 16 kHz audio: voiced stretches of 0.3-1.5 s between silences of 0.2-1.0 s, in
    background noise."""
    parts, total, speaking = [], 0, bool(rng.random() < 0.5)
    while total < samples:
        n = int(SAMPLE_RATE * (rng.uniform(0.3, 1.5) if speaking else rng.uniform(0.2, 1.0)))
        parts.append(voiced(n, rng) if speaking else np.zeros(n))
        total, speaking = total + n, not speaking
    noise = rng.uniform(0.001, 0.01) * rng.standard_normal(samples)
    return (np.concatenate(parts)[:samples] + noise).astype(np.float32)


def vad_chunks(streams: int, calls: int, rng: np.random.Generator) -> np.ndarray:
    """[calls, streams, 576] float32: each stream cut into 512-sample chunks, each with the 64 samples
    before it prepended (zeros before the start), as the package feeds its model call after call."""
    audio = np.stack([audio_stream(calls * VAD_CHUNK, rng) for _ in range(streams)])
    audio = np.pad(audio, ((0, 0), (VAD_CONTEXT, 0)))
    width = VAD_CHUNK + VAD_CONTEXT
    return np.stack([audio[:, k * VAD_CHUNK:k * VAD_CHUNK + width] for k in range(calls)])
