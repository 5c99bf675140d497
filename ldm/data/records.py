"""One record of the seed's format (SPEC section 2): the caption and base64 image columns of a line,
image opening and decoding, and the skips a bad record or part is counted under.
"""
import binascii
import io
import math
import sys
import warnings
from collections import Counter
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pybase64
from PIL import Image, ImageOps

from ldm.data.buckets import choose_bucket


# Pillow's decompression-bomb guard stays at its default (~89M pixels): an image
# larger than that is skipped and counted, never decoded. (The seed raised it to 2.3G.)
MAX_PIXELS = Image.MAX_IMAGE_PIXELS

# The order defines the skip-count vector saved in checkpoints: append new reasons only
# (a shorter saved vector is read as zeros for the reasons added since).
SKIP_REASONS = (
    "short_line",  # fewer than 3 tab-separated columns, or not UTF-8
    "bad_base64",  # column 3 is not base64, or is empty
    "undecodable_image",  # the bytes are not an image Pillow can decode
    "too_small",  # shorter side below --resolution
    "too_many_pixels",  # over Pillow's decompression-bomb limit
    "missing_part",  # a part path that cannot be opened
    "truncated_part",  # a gzip stream that ends early or is corrupt (unread records are lost)
    "truncated_image",  # an image whose bytes end early (a half-downloaded file)
    "empty_part",  # a part with no line at all (0 bytes, or an empty gzip)
    "not_gzip",  # a part named .gz whose bytes are not gzip
    "extreme_aspect_ratio",  # longer side over --max_aspect_ratio times the shorter
    "not_cached",  # training from cached latents, and column 4 holds none for this autoencoder and resolution
    "not_a_file",  # a part path naming a FIFO, device, socket or directory (never opened: a FIFO would block)
    "unreadable_part",  # a remote part whose reads kept failing after the retries (ldm.data.storage); records read before stand
)



def log(message: str) -> None:
    """One line on stderr (data workers have no logger of their own; launch logs keep stderr)."""
    print(f"[ldm.data] {message}", file=sys.stderr, flush=True)


class Skip(Exception):
    """A record (or part) that cannot be used: `reason` is one of SKIP_REASONS, the message says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail)
        self.reason = reason


class SkipCounter(Counter):
    """Counts of skipped records (or parts) by reason. The first skip of each reason is logged
    with where and why, so a bug of ours cannot hide among the counted skips."""

    where = ""  # who skips, e.g. "rank 0 worker 1"; set by the stream that owns the counter

    def skip(self, reason: str, part: str, line: int, detail: str) -> None:
        self[reason] += 1
        logged = self.__dict__.setdefault("_logged", set())
        if reason not in logged:
            logged.add(reason)
            at = f"{part} line {line}" if line else part
            log(f"skipped ({reason}) {at}: {detail} [first {reason} skip{' of ' + self.where if self.where else ''}; further ones are only counted]")

    def as_vector(self) -> np.ndarray:
        return np.array([self.get(r, 0) for r in SKIP_REASONS], dtype="int64")


def skips_from_vector(vector: Sequence[int]) -> Dict[str, int]:
    """Skip counts by reason from a saved vector (an older, shorter one leaves the new reasons at 0)."""
    return {r: int(v) for r, v in zip(SKIP_REASONS, vector)}


# What a shard that skipped every record of a pass most likely suffers from, by the reason
# it skipped most. "{resolution}" is filled in when known.
LIKELY_CAUSES = {
    "short_line": "its lines lack the 3 tab-separated columns caption, placeholder, base64 image (or are not UTF-8)",
    "bad_base64": "column 3 of its lines is not base64",
    "undecodable_image": "its images do not decode (not an image format Pillow reads)",
    "truncated_image": "its images are cut off (half-downloaded files)",
    "too_small": "every image was smaller than --resolution{resolution}: lower --resolution or use larger images",
    "too_many_pixels": "its images are over Pillow's decompression-bomb limit",
    "missing_part": "its parts cannot be opened: check the paths in the filelists",
    "truncated_part": "its gzip parts are corrupt or cut off",
    "empty_part": "its parts are empty",
    "not_gzip": "its parts named .gz are not gzip files",
    "extreme_aspect_ratio": "every image was more elongated than --max_aspect_ratio",
    "not_cached": "its parts carry no moments of this autoencoder at this --resolution: re-run python -m ldm.cache_latents on them",
    "not_a_file": "its part paths name FIFOs, devices, sockets or directories, not files: check the paths in the filelists",
    "unreadable_part": "its remote parts kept failing to download: check the object store and the network",
}


def format_skips(skips: Dict[str, int]) -> str:
    """'too_small: 60, missing_part: 1': the non-zero counts, largest first."""
    counts = sorted(((r, int(skips.get(r, 0))) for r in SKIP_REASONS if skips.get(r, 0)), key=lambda kv: -kv[1])
    return ", ".join(f"{r}: {n}" for r, n in counts) or "none"


def explain_barren(skips: Dict[str, int], resolution: Optional[int] = None) -> str:
    """One line: the skip counts of a shard that found nothing to yield, and their likely cause."""
    counts = {r: int(skips.get(r, 0)) for r in SKIP_REASONS}
    if not any(counts.values()):
        return "it holds no record at all"
    cause = LIKELY_CAUSES[max(counts, key=counts.get)].format(resolution=f" {resolution}" if resolution else "")
    return f"every record was skipped ({format_skips(skips)}); likely cause: {cause}"



def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB correctly: alpha over white, 16-bit scaled down."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def looks_cut(data: bytes, error: Exception) -> bool:
    """Whether a decode error comes from an image whose bytes end early (a half-downloaded file)."""
    if "truncated" in str(error).lower():  # Pillow's messages for JPEG, PNG, GIF, ... ("Truncated File Read" in a JPEG header)
        return True
    # libwebp only says "could not create decoder object"; a RIFF header states the file's size.
    return data[:4] == b"RIFF" and len(data) < int.from_bytes(data[4:8], "little") + 8


def open_image(data: bytes) -> Image.Image:
    """Pillow's lazy open (header only), refusing an image over the decompression-bomb limit (Skip)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
    w, h = image.size
    if w * h > MAX_PIXELS:
        raise Skip("too_many_pixels", f"{w}x{h} pixels, over Pillow's limit of {MAX_PIXELS}")
    return image


def decode_image(data: bytes, resolution: int, max_aspect_ratio: Optional[float] = None, buckets=None) -> np.ndarray:
    """Decode, apply the EXIF orientation, resize to cover the target and centre-crop the excess;
    CHW uint8 (0..255). The target is the square `resolution` x `resolution`, or with `buckets`
    (ldm.buckets) the bucket nearest the image's aspect ratio; an image that does not cover its
    target without upscaling is skipped (too_small). Any failure raises Skip, pixel decoding
    included: Pillow opens lazily and a cut file only fails when its pixels are read (in the
    resize), so all of it is guarded here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = open_image(data)
            w, h = image.size
            if max_aspect_ratio and max(w, h) > max_aspect_ratio * min(w, h):
                raise Skip("extreme_aspect_ratio", f"{w}x{h} pixels, more elongated than --max_aspect_ratio {max_aspect_ratio}")
            # Phone photos store their pixels sideways plus an EXIF orientation (5-8: a quarter
            # turn): the target is chosen for the upright image.
            upright = (h, w) if image.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)
            tw, th = choose_bucket(*upright, buckets) if buckets else (resolution, resolution)
            if upright[0] < tw or upright[1] < th:
                raise Skip("too_small", f"{w}x{h} pixels, smaller than the {tw}x{th} crop at --resolution {resolution}")
            # JPEG draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is
            # much smaller than the image; Pillow keeps the result >= the requested size.
            scale = max(tw / upright[0], th / upright[1])
            image.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
            ImageOps.exif_transpose(image, in_place=True)  # upright before the crop
            image = to_rgb(image)
            w, h = image.size
            scale = max(tw / w, th / h)
            new_w, new_h = max(tw, round(w * scale)), max(th, round(h * scale))
            left, top = (new_w - tw) // 2, (new_h - th) // 2
            image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=3.0)
            image = image.crop((left, top, left + tw, top + th))
            # uint8 CHW: a quarter of float32's bytes through the workers' shared memory and the
            # collation; the model maps it to [-1, 1] on its device (ldm.model.to_model_range).
            # Pillow's raw packer writes one band at a time ("R", "G", "B"): a third of the time of
            # numpy's strided HWC -> CHW copy, and of Image.split + numpy (~0.1 ms a record).
            pixels = np.empty((3, th, tw), np.uint8)
            for c, band in enumerate("RGB"):
                pixels[c] = np.frombuffer(image.tobytes("raw", band), np.uint8).reshape(th, tw)
            return pixels
    except Skip:
        raise
    except Image.DecompressionBombError as e:
        raise Skip("too_many_pixels", str(e)) from None
    except Exception as e:  # Pillow raises many types for corrupt data; all mean "cannot decode"
        raise Skip("truncated_image" if looks_cut(data, e) else "undecodable_image", f"{type(e).__name__}: {e}") from None


def load_image(data: bytes, resolution: int, max_aspect_ratio: Optional[float] = None) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """decode_image as (pixels, None), or (None, skip reason)."""
    try:
        return decode_image(data, resolution, max_aspect_ratio), None
    except Skip as e:
        return None, e.reason


def b64decode(data) -> bytes:
    """Strict base64 of bytes or a memoryview, by binascii's strict_mode rules (binascii.Error otherwise). pybase64's SIMD
    decoder takes ~1/25 of binascii's time on a 160 KB image (binascii: ~6% of a worker's time
    per record); what pybase64 accepts, binascii accepts with the same bytes, and what it refuses
    is handed to binascii, so every verdict is binascii's (which also takes e.g. 'QUJD=')."""
    try:
        return pybase64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return binascii.a2b_base64(data, strict_mode=True)


def parse_line(raw: bytes) -> Tuple[Optional[str], Optional[bytes], Optional[str]]:
    """Split a raw line into (caption, image bytes); or the skip reason.

    The verdicts are those of the decoded text (a line that is not UTF-8 is a short_line), but
    the ~160 KB base64 column is never copied (no str, no split; ~50 us a record): tab, CR and LF
    are ASCII, so the columns are found in the bytes, and a column 3 that base64 accepts is ASCII."""
    end = len(raw)
    while end and raw[end - 1] in b"\r\n":
        end -= 1
    tab1 = raw.find(b"\t", 0, end)
    tab2 = raw.find(b"\t", tab1 + 1, end) if tab1 >= 0 else -1
    if tab2 < 0:
        return None, None, "short_line"
    tab3 = raw.find(b"\t", tab2 + 1, end)
    tab3 = end if tab3 < 0 else tab3
    line = memoryview(raw)[:end]
    try:
        caption = str(line[:tab1], "utf-8")
        for other in (line[tab1 + 1 : tab2], line[tab3:]):  # the columns besides the base64 one
            str(other, "utf-8")
    except UnicodeDecodeError:
        return None, None, "short_line"
    column = line[tab2 + 1 : tab3]
    try:
        data = b64decode(column)
    except (binascii.Error, ValueError):
        try:
            str(column, "utf-8")
        except UnicodeDecodeError:
            return None, None, "short_line"
        return None, None, "bad_base64"
    if not data:
        return None, None, "bad_base64"
    return caption, data, None
