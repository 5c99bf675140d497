"""The LAION-400M-style text-image stream (SPEC section 2).

Layout of the input:
    --file_list  ->  filelists (optionally weighted)  ->  parts  ->  lines
    line = caption \t placeholder \t base64(image) [\t ignored ...]

How the stream is cut into shards (STYLE 7: one visible, deterministic rule):
    * the shards are the (rank, dataloader worker) pairs, S = world_size * num_workers;
    * each filelist's parts are split into "units": when a filelist has fewer parts
      than shards, every part is split by line stride into ceil(S / parts) units
      (unit j of a part reads lines j, j+m, j+2m, ...), so no shard is ever empty;
    * every pass, the units are permuted with a seed shared by all shards, then dealt
      by stride: shard s reads units s, s+S, s+2S, ...  Every unit belongs to exactly
      one shard, so every readable record is read exactly once per pass.
Within a shard each filelist is an endless sequence of passes. The shard's units of a pass
are read --parts_per_window at a time, side by side: a shuffle window of --shuffle_buffer
lines takes the next slice of each open unit and is permuted before it is decoded, so a
batch mixes several parts (LAION parts are in crawl order: runs of one site, near-duplicates).
The filelists are interleaved by weight. Every random choice is a pure function of
(seed, pass, rank, worker), so two runs with the same settings see the same stream, and
the position in it is a few integers that checkpoints save (exact resume).

Bad data never stops the stream: each skipped record or part is counted by reason
(SKIP_REASONS), and the first of each reason is logged with its part, line and why.
A shard whose passes hold no usable record (BARREN_UNITS) cannot make progress; it then
yields sentinel samples (`data_error` 1) that tell every rank's training loop to stop
with one line naming the skips (StreamProgress.fatal), instead of spinning silently.
"""
import argparse
import binascii
import collections
import io
import itertools
import hashlib
import json
import math
import os
import stat
import sys
import time
import traceback
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pybase64
from isal import igzip, isal_zlib
from PIL import Image, ImageOps

from ldm.buckets import BucketBatcher, choose_bucket, make_buckets, read_lines, stack
from ldm.storage import PartMissing, PartUnreadable, is_remote, open_remote_part, prefetch_parts, read_text, remote_sizes

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
    "unreadable_part",  # a remote part whose reads kept failing after the retries (ldm.storage); records read before stand
)

# Caption-dropout draws made at a time (TextImageStream._caption_dropped).
DROPOUT_BLOCK = 64
# Default of --parts_per_window: units read side by side into each shuffle window.
PARTS_PER_WINDOW = 4
# A shard that has skipped this many records without yielding one says so (early hint).
EARLY_WARNING_SKIPS = 1000
# A filelist is barren for a shard once this many of its units (or all, if it has fewer) were
# read in whole passes without one usable record. Passes reshuffle the units, so one bad part
# (say, a shard's only unit of a small dataset) never stops a run; 32 bad in a row is no luck.
BARREN_UNITS = 32


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


# ---------------------------------------------------------------------------
# Reading the lists
# ---------------------------------------------------------------------------


@dataclass
class FileListEntry:
    path: str
    weight: float
    parts: List[str]
    # Bytes of each part at start-up, -1 for one that is missing or not a regular file: the
    # data-order fingerprint checkpoints save (a part that grew moves every later window).
    sizes: List[int] = field(default_factory=list)


def _list_lines(path: str) -> List[str]:
    """Non-blank, non-comment lines of a list file (local, s3:// or http(s)://)."""
    if is_remote(path):
        lines = read_text(path).splitlines()
    else:
        with open(path, "r", encoding="utf-8") as f:
            lines = f.readlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def part_size(path: str) -> int:
    """Bytes of a part, or -1 if it is missing or not a regular file (a FIFO, device, socket or
    directory is never opened: see open_part). One os.stat: 60,000 local parts take ~170 ms."""
    try:
        st = os.stat(path)
    except OSError:
        return -1
    return st.st_size if stat.S_ISREG(st.st_mode) else -1


def part_sizes(parts: Sequence[str]) -> List[int]:
    """part_size of each part; remote ones from their store's listing (ldm.storage.remote_sizes)."""
    remote = [p for p in parts if is_remote(p)]
    known = dict(zip(remote, remote_sizes(remote))) if remote else {}
    return [known[p] if p in known else part_size(p) for p in parts]


def read_file_list(file_list: str, allow_missing_parts: bool = True) -> List[FileListEntry]:
    """Parse a --file_list; raise ValueError with one line that says what to fix. Without
    `allow_missing_parts` (training), a filelist none of whose parts exists is such an error: its
    weight would silently go to the others (a mistyped mount point, a listing of another machine)."""
    if not is_remote(file_list) and not os.path.isfile(file_list):
        raise ValueError(f"--file_list {file_list!r} does not exist; pass a file that lists one filelist path per line")
    entries = []
    for line in _list_lines(file_list):  # a remote list that cannot be read: ldm.storage.StorageError, a ValueError
        fields = line.split()
        path = fields[0]
        weight = 1.0
        if len(fields) > 1:
            try:
                weight = float(fields[1])
            except ValueError:
                raise ValueError(f"{file_list}: weight {fields[1]!r} of {path!r} is not a number") from None
            if not weight > 0:
                raise ValueError(f"{file_list}: weight of {path!r} must be > 0, got {weight}")
        if not is_remote(path) and not os.path.isfile(path):
            raise ValueError(f"{file_list}: filelist {path!r} does not exist (relative paths resolve against {os.getcwd()})")
        parts = _list_lines(path)
        if parts:
            entries.append(FileListEntry(path=path, weight=weight, parts=parts, sizes=part_sizes(parts)))
    if not entries:
        raise ValueError(f"--file_list {file_list!r} lists no filelist with any part")
    if all(size < 0 for e in entries for size in e.sizes):
        raise ValueError(f"--file_list {file_list!r}: none of its parts exists (first: {entries[0].parts[0]!r})")
    if not allow_missing_parts:
        for e in entries:
            if all(size < 0 for size in e.sizes):
                raise ValueError(f"{file_list}: none of the {len(e.parts)} parts of filelist {e.path} exists as a file (first: {e.parts[0]!r}); "
                                 "fix the paths, or pass --allow_missing_parts to train on the other filelists alone")
    return entries


def describe_parts(entries: List[FileListEntry]) -> str:
    """'a.filelist: 2 of 3 parts found, 1 missing (first: x.gz); b.filelist: ...' for the start-up log."""
    said = []
    for e in entries:
        missing = [p for p, size in zip(e.parts, e.sizes) if size < 0]
        said.append(f"{e.path}: {len(e.parts) - len(missing)} of {len(e.parts)} parts found"
                    + (f", {len(missing)} missing (first: {missing[0]})" if missing else ""))
    return "; ".join(said)


# ---------------------------------------------------------------------------
# The data-order fingerprint: what a saved position means (checked on resume)
# ---------------------------------------------------------------------------


def order_fingerprint(entries: List[FileListEntry], settings: Dict[str, object], listing: bool) -> dict:
    """What defines the order of the stream, saved with every checkpoint's data position: the
    settings (seed, --shuffle_buffer, ...) and, per filelist, its path, weight and a digest of its
    parts and their sizes. With `listing` (rank 0's file) the parts and sizes themselves too, so a
    change can be named part by part (60,000 parts: ~3 MB of JSON in one file per checkpoint)."""
    lists = []
    for e in entries:
        digest = hashlib.sha1("\n".join(f"{p}\t{n}" for p, n in zip(e.parts, e.sizes)).encode()).hexdigest()
        entry = {"path": e.path, "weight": e.weight, "parts": len(e.parts), "digest": digest}
        if listing:
            entry["listing"] = [[p, n] for p, n in zip(e.parts, e.sizes)]
        lists.append(entry)
    return {"settings": dict(settings), "filelists": lists}


def _listing_change(old: dict, new: dict) -> str:
    """How one filelist's parts changed: 'parts added: 1 (first: p), resized: 2 (first: q 10 -> 12 bytes)'."""
    if "listing" not in old or "listing" not in new:
        return f"its parts or their sizes changed ({old['parts']} -> {new['parts']} parts)"
    before, after = dict(map(tuple, old["listing"])), dict(map(tuple, new["listing"]))
    added = [p for p in after if p not in before]
    removed = [p for p in before if p not in after]
    resized = [p for p in after if p in before and after[p] != before[p]]
    said = [f"{what}: {len(paths)} (first: {paths[0]}{f' {before[paths[0]]} -> {after[paths[0]]} bytes' if what == 'resized' else ''})"
            for what, paths in (("parts added", added), ("parts removed", removed), ("resized", resized)) if paths]
    if not said and [p for p, _ in old["listing"]] != [p for p, _ in new["listing"]]:
        said = ["its parts were reordered"]
    return ", ".join(said) or "its parts changed"


def fingerprint_changes(old: dict, new: dict) -> List[str]:
    """What differs between two order fingerprints, one item per setting or filelist ('--seed 1 -> 2')."""
    changes = []
    for name, value in new["settings"].items():
        if name in old["settings"] and old["settings"][name] != value:
            changes.append(f"--{name} {old['settings'][name]} -> {value}")
    old_lists = {f["path"]: f for f in old["filelists"]}
    new_lists = {f["path"]: f for f in new["filelists"]}
    for path, f in old_lists.items():
        if path not in new_lists:
            changes.append(f"filelist {path} removed")
    for path, f in new_lists.items():
        if path not in old_lists:
            changes.append(f"filelist {path} added")
            continue
        before = old_lists[path]
        if before["weight"] != f["weight"]:
            changes.append(f"weight of filelist {path} {before['weight']:g} -> {f['weight']:g}")
        if before["digest"] != f["digest"]:
            changes.append(f"filelist {path}: {_listing_change(before, f)}")
    if not changes and [f["path"] for f in old["filelists"]] != [f["path"] for f in new["filelists"]]:
        changes.append("the filelists' order in --file_list")
    return changes


# ---------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """Lines offset+1, offset+1+stride, ... of one part (line numbers count from 1)."""

    part: str
    offset: int
    stride: int


def make_units(parts: Sequence[str], num_shards: int) -> List[Unit]:
    split = max(1, math.ceil(num_shards / len(parts)))
    return [Unit(p, j, split) for p in parts for j in range(split)]


def shard_units(units: Sequence[Unit], num_shards: int, shard: int, seed: int, list_index: int, pass_index: int) -> List[Unit]:
    """The units shard `shard` reads in this pass: a shared permutation, dealt by stride."""
    order = np.random.default_rng([seed, list_index, pass_index]).permutation(len(units))
    return [units[i] for i in order[shard::num_shards]]


# ---------------------------------------------------------------------------
# Reading parts and decoding records
# ---------------------------------------------------------------------------


def open_part(path: str):
    """A part opened for reading lines; raise Skip for a part that is missing, not a regular file,
    empty or not gzip."""
    if is_remote(path):
        return _open_remote_part(path)
    try:
        # Looked at before it is opened: opening a FIFO blocks until a writer comes (a worker
        # hung for good), and a device or directory is no part either.
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device or other special file"
            raise Skip("not_a_file", f"{kind}, not a regular file")
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as e:
        raise Skip("missing_part", e.strerror or str(e)) from None
    if not magic:
        raise Skip("empty_part", "0 bytes")
    if path.endswith(".gz"):
        if magic != b"\x1f\x8b":
            raise Skip("not_gzip", f"starts with {magic!r}, not gzip's 1f 8b")
        # ISA-L's gzip reader (same format, same errors) decompresses ~2x faster than zlib's.
        return igzip.open(path, "rb")
    return open(path, "rb")


def _open_remote_part(path: str):
    """open_part for s3:// and http(s):// parts (streamed by ldm.storage: read ahead, resumed after a cut)."""
    f = None
    try:
        f = open_remote_part(path)
        magic = f.peek(2)[:2]
    except (PartMissing, PartUnreadable) as e:
        if f is not None:
            f.close()
        raise Skip("missing_part" if isinstance(e, PartMissing) else "unreadable_part", str(e)) from None
    if not magic:
        f.close()
        raise Skip("empty_part", "0 bytes")
    if path.endswith(".gz"):
        if magic != b"\x1f\x8b":
            f.close()
            raise Skip("not_gzip", f"starts with {magic!r}, not gzip's 1f 8b")
        g = igzip.open(f, "rb")
        # GzipFile closes `myfileobj` (a file it opened itself) when closed, never a fileobj it was
        # given: hand it ours, so a part left mid-way stops its background reader too.
        g.myfileobj = f
        return g
    return f if isinstance(f, io.BufferedReader) else io.BufferedReader(f)


def iter_unit_lines(unit: Unit, skips: SkipCounter, catch_up: int = 0) -> Iterator[Tuple[int, bytes]]:
    """Yield (line number, raw line) of a unit; a missing, empty, non-gzip or truncated part is
    counted, not raised. A part is counted once a pass (by its unit at offset 0, however many
    units it is split into), and not again for lines a resumed stream re-reads (`catch_up`)."""

    def count(reason, line, detail, at):
        if unit.offset == 0 and at >= catch_up:
            skips.skip(reason, unit.part, line, detail)

    try:
        f = open_part(unit.part)
    except Skip as e:
        count(e.reason, 0, str(e), 0)
        return
    with f:
        line_no = n = 0
        try:
            for raw in f:
                line_no += 1
                if (line_no - 1) % unit.stride == unit.offset:
                    n += 1
                    yield line_no, raw
        except PartUnreadable as e:
            # A remote part whose downloads kept failing (ldm.storage retried them): as a truncated
            # part, records already yielded stand and the rest of it is lost, counted once.
            count("unreadable_part", line_no, f"{e} (after line {line_no})", n)
            return
        except (EOFError, OSError, zlib.error, isal_zlib.error) as e:
            # Records already yielded stand; the rest of this part is lost and counted once.
            count("truncated_part", line_no, f"{type(e).__name__}: {e} (after line {line_no})", n)
            return
        if line_no == 0:
            count("empty_part", 0, "no lines", 0)


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


# ---------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------


@dataclass
class RawRecord:
    part: str
    line: int
    raw: bytes
    pass_index: int
    list_index: int


# A shard's position in one filelist: (pass, group of units in the pass, window of the group,
# records of the window already yielded). Four integers, so it travels with every sample and
# a checkpoint can store exactly where each worker's stream stood.
CURSOR_FIELDS = 4
# The pass field of a shard still finishing old shards' passes after a layout change (ShardStream.tail_stream).
TAIL_PASS = -1


def group_windows(units: Sequence[Unit], window: int, skips: SkipCounter, first_window: int = 0) -> Iterator[List[Tuple[str, int, bytes]]]:
    """Windows of (part, line number, raw line) read from a group of units side by side.

    Window w holds lines [w*c, (w+1)*c) of each unit, c = ceil(window / len(units)); a unit
    that has run out adds nothing, and the group ends when all have. Lines of windows before
    `first_window` are read past without being kept (how a resumed stream catches up)."""
    chunk = max(1, math.ceil(window / len(units)))
    readers = []
    for unit in units:
        lines = iter_unit_lines(unit, skips, catch_up=first_window * chunk)
        collections.deque(itertools.islice(lines, first_window * chunk), maxlen=0)
        readers.append((unit.part, lines))
    while True:
        batch = [(part, line_no, raw) for part, lines in readers for line_no, raw in itertools.islice(lines, chunk)]
        if not batch:
            return
        yield batch


class ShardStream:
    """The endless record stream of one shard (one rank's one dataloader worker).

    Shuffling is by window: a group of `parts_per_window` units is read side by side, `window`
    lines at a time, and each window is permuted before it is yielded, so the stream's position
    is four small integers per filelist (see CURSOR_FIELDS) and resuming re-reads at most one
    window per filelist. `passes` (default: endless) stops each filelist after that many passes.

    The consumer calls `used(list_index)` for each record it could use; a filelist whose passes
    yield none is then marked barren (see BARREN_UNITS), and `barren` holding every filelist
    means the shard can never yield a usable record.
    """

    def __init__(self, entries: List[FileListEntry], shard: int, num_shards: int, seed: int, window: int, state: Optional[np.ndarray] = None,
                 parts_per_window: int = PARTS_PER_WINDOW, passes: Optional[int] = None, tail: Optional[dict] = None):
        self.entries = entries
        # After a layout change (TextImageStream.resume): the old shards whose interrupted passes this
        # shard finishes first, {"old_shards": S, "max_pass": [per filelist], "tasks": [[old shard, position], ...]}.
        self.tail = tail
        self.shard = shard
        self.num_shards = num_shards
        self.seed = seed
        self.window = max(1, window)
        self.parts_per_window = max(1, parts_per_window)
        self.passes = passes
        self.skips = SkipCounter()
        self.barren = set()  # filelists without a usable record for this shard (see BARREN_UNITS)
        self._used = [False] * len(entries)  # a record of the filelist's current pass was usable
        self._idle = [set() for _ in entries]  # units read in whole passes since the filelist's last usable record
        self.units = [make_units(e.parts, num_shards) for e in entries]
        weights = np.array([e.weight for e in entries], dtype=np.float64)
        self.cum_weights = np.cumsum(weights / weights.sum())
        # state = [draws, cursor of filelist 0, cursor of filelist 1, ...]
        self.state = np.zeros(1 + CURSOR_FIELDS * len(entries), dtype="int64") if state is None else np.array(state, dtype="int64")
        if self.state.shape != (1 + CURSOR_FIELDS * len(entries),):
            raise ValueError(f"saved data position has {self.state.size} numbers, expected {1 + CURSOR_FIELDS * len(entries)}: the --file_list changed since the checkpoint")

    def cursor(self, list_index: int) -> np.ndarray:
        return self.state[1 + CURSOR_FIELDS * list_index : 1 + CURSOR_FIELDS * (list_index + 1)]

    def used(self, list_index: int) -> None:
        """The consumer could use a record of this filelist (called before it asks for the next)."""
        self._used[list_index] = True

    def _end_pass(self, list_index: int, units: List[Unit], whole: bool) -> None:
        """Barren bookkeeping at the end of a pass (`whole`: read from its start)."""
        idle = self._idle[list_index]
        if self._used[list_index]:
            idle.clear()
            self.barren.discard(list_index)
        elif whole:
            idle.update(units)
            if len(idle) >= min(BARREN_UNITS, len(self.units[list_index])) and list_index not in self.barren:
                self.barren.add(list_index)
                if len(self.barren) < len(self.entries):
                    log(f"{self.skips.where}: no usable record in {len(idle)} units of filelist {self.entries[list_index].path} "
                        f"(the other filelists go on); skips so far: {format_skips(self.skips)}")
        self._used[list_index] = False

    def tail_groups(self, list_index: int) -> List[Tuple[int, int, int, List[Unit], int, int]]:
        """The groups of units left to read of the old shards this shard took over at a layout
        change, in order: (pass, old shard, its group index, units, first window, records of that
        window already read). For each old shard: the rest of its pass from its saved cursor, then
        its whole passes up to the highest pass any old shard had reached (so every pass up to that
        one is read exactly once, in the old layout; later passes use the new one)."""
        old_shards = int(self.tail["old_shards"])
        units = make_units(self.entries[list_index].parts, old_shards)
        groups = []
        for old_shard, position in self.tail["tasks"]:
            start = position[1 + CURSOR_FIELDS * list_index : 1 + CURSOR_FIELDS * (list_index + 1)]
            for pass_index in range(int(start[0]), int(self.tail["max_pass"][list_index]) + 1):
                mine = shard_units(units, old_shards, int(old_shard), self.seed, list_index, pass_index)
                first = int(start[1]) if pass_index == start[0] else 0
                for g in range(first, -(-len(mine) // self.parts_per_window)):
                    at_cursor = pass_index == start[0] and g == start[1]
                    groups.append((pass_index, int(old_shard), g, mine[g * self.parts_per_window : (g + 1) * self.parts_per_window],
                                   int(start[2]) if at_cursor else 0, int(start[3]) if at_cursor else 0))
        return groups

    def tail_stream(self, list_index: int) -> Iterator[RawRecord]:
        """The old shards' records left to read (tail_groups), each window shuffled as its old shard
        did, so the records it had yielded are exactly the first ones of its window's order. The
        cursor is (TAIL_PASS, group of tail_groups, window, records of the window yielded); a shard
        that has not entered its tail has group -1."""
        cursor = self.cursor(list_index)
        groups = self.tail_groups(list_index)
        if cursor[1] < 0 and groups:
            cursor[1:] = (0, groups[0][4], groups[0][5])
        for t in range(max(0, int(cursor[1])), len(groups)):
            pass_index, old_shard, g, units, _, _ = groups[t]
            for w, window in enumerate(group_windows(units, self.window, self.skips, int(cursor[2])), start=int(cursor[2])):
                order = np.random.default_rng([self.seed, list_index, pass_index, old_shard, g, w]).permutation(len(window))
                for k in range(int(cursor[3]), len(order)):
                    part, line_no, raw = window[order[k]]
                    cursor[1:] = (t, w, k + 1)
                    yield RawRecord(part, line_no, raw, pass_index, list_index)
                cursor[2:] = (w + 1, 0)
            if t + 1 < len(groups):
                cursor[1:] = (t + 1, groups[t + 1][4], groups[t + 1][5])
        cursor[:] = (int(self.tail["max_pass"][list_index]) + 1, 0, 0, 0)  # the new layout from the next pass on

    def list_stream(self, list_index: int) -> Iterator[RawRecord]:
        """One filelist's endless stream for this shard, starting at its saved cursor."""
        cursor = self.cursor(list_index)  # a view: advancing it advances self.state
        if cursor[0] == TAIL_PASS:
            yield from self.tail_stream(list_index)
        while True:
            pass_index = int(cursor[0])
            units = shard_units(self.units[list_index], self.num_shards, self.shard, self.seed, list_index, pass_index)
            groups = [units[i : i + self.parts_per_window] for i in range(0, len(units), self.parts_per_window)]
            resumed_midway = bool(cursor[1:].any())
            got_any = False
            for g in range(int(cursor[1]), len(groups)):
                if g + 1 < len(groups):
                    prefetch_parts([u.part for u in groups[g + 1]])  # remote parts only: their first blocks arrive meanwhile
                for w, window in enumerate(group_windows(groups[g], self.window, self.skips, int(cursor[2])), start=int(cursor[2])):
                    order = np.random.default_rng([self.seed, list_index, pass_index, self.shard, g, w]).permutation(len(window))
                    for k in range(int(cursor[3]), len(order)):
                        part, line_no, raw = window[order[k]]
                        cursor[:] = (pass_index, g, w, k + 1)
                        got_any = True
                        yield RawRecord(part, line_no, raw, pass_index, list_index)
                    cursor[2:] = (w + 1, 0)
                cursor[1:] = (g + 1, 0, 0)
            self._end_pass(list_index, units, whole=not resumed_midway)
            if self.passes is not None and pass_index + 1 >= self.passes:
                return
            if not got_any and list_index in self.barren:
                return  # no line left to read for this shard: end it, never spin
            cursor[:] = (pass_index + 1, 0, 0, 0)

    def __iter__(self) -> Iterator[RawRecord]:
        """Interleave the filelists' streams, drawing a filelist by weight (draw k is seeded by k)."""
        streams = [self.list_stream(i) for i in range(len(self.entries))]
        ended = set()
        while len(ended) < len(streams):
            i = self._draw(ended)
            try:
                rec = next(streams[i])
            except StopIteration:
                ended.add(i)  # draw again (same k): the walk goes on past it
                continue
            self.state[0] += 1
            yield rec

    def _draw(self, ended: set) -> int:
        """The filelist of draw k = state[0]: the first not-ended one in a weighted order without
        replacement seeded by k (its first pick is today's searchsorted draw). Once filelists have
        ended (a --passes limit, or barren ones), the others keep their mutual ratio, 8:1 stays 8:1:
        the first of the rest in such an order is drawn by their weights alone. A filelist found
        ended only when drawn (a resumed stream learns it late) leaves the pick as it was: the walk
        passes over it whether it was known ended or not, so the draws stay a function of the position."""
        alive = [i for i in range(len(self.entries)) if i not in ended]
        if len(alive) == 1:
            return alive[0]  # nothing to draw (a seeded generator per record costs ~2% of the worker's time)
        rng = np.random.default_rng([self.seed, self.shard, 2, int(self.state[0])])
        candidates = list(range(len(self.entries)))
        cum = self.cum_weights
        while True:
            pick = candidates[min(int(np.searchsorted(cum, rng.random(), side="right")), len(candidates) - 1)]
            if pick not in ended:
                return pick
            candidates.remove(pick)
            weights = np.array([self.entries[c].weight for c in candidates], dtype=np.float64)
            cum = np.cumsum(weights / weights.sum())


def current_rank_and_world() -> Tuple[int, int]:
    """Rank and world size from paddle.distributed's launch environment."""
    try:
        import paddle.distributed as dist

        return dist.get_rank(), max(1, dist.get_world_size())
    except Exception:
        return int(os.environ.get("PADDLE_TRAINER_ID", 0)), int(os.environ.get("PADDLE_TRAINERS_NUM", 1))


def _worker():
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    from paddle.io import get_worker_info

    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TextImageStream:
    """IterableDataset of {"pixel_values", "input_ids", "skips", "worker", "position", "data_error"} for training.

    Besides the sample, each item carries its worker's cumulative skip counts (by
    SKIP_REASONS) and the worker's stream position just after it, so the training loop
    can log the skips and checkpoint exactly where every worker stood (`resume`);
    `data_error` is 1 on the sentinels a barren shard yields instead (see `__iter__`).
    """

    def __init__(
        self,
        file_list: str,
        resolution: int,
        tokenizer=None,
        max_length: int = 77,
        caption_dropout: float = 0.1,
        buffer_size: int = 1000,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        parts_per_window: int = PARTS_PER_WINDOW,
        max_aspect_ratio: Optional[float] = None,
        aspect_ratio_buckets: bool = False,
        bucket_step: int = 64,
        batch_size: int = 1,
        latent_cache=None,
        allow_missing_parts: bool = False,
    ):
        self.entries = read_file_list(file_list, allow_missing_parts)
        self.resolution = resolution
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.caption_dropout = caption_dropout
        self._dropouts: Dict[int, Tuple[int, List[bool]]] = {}  # shard -> (first draw, dropped?) of a block of draws
        self.buffer_size = buffer_size
        self.seed = seed
        self.parts_per_window = parts_per_window
        self.max_aspect_ratio = max_aspect_ratio
        # With aspect-ratio buckets (ldm.buckets) each worker yields whole batches of one bucket,
        # so the DataLoader must not batch again (`loader_batch_size`).
        self.buckets = make_buckets(resolution, bucket_step, max_aspect_ratio) if aspect_ratio_buckets else None
        self.bucket_step = bucket_step
        self.batch_size = batch_size
        # ldm.cache_latents.LatentCache: samples carry the cached moments ("latent_moments") instead of pixels
        self.latent_cache = latent_cache
        if rank is None or world_size is None:
            rank, world_size = current_rank_and_world()
        self.rank, self.world_size = rank, world_size
        if self.rank == 0:
            log(f"{file_list}: {describe_parts(self.entries)}")
        self.resume_state = None
        # The pass every shard starts at when it has no saved position: 0 for a new run; after the
        # highest pass a checkpoint reached when a resumed run starts a new pass (start_new_pass).
        self.first_pass = 0
        if tokenizer is not None:
            from ldm.tokenizer import CaptionEncoder

            self.encode_caption = CaptionEncoder(tokenizer, max_length)

    def order_settings(self) -> Dict[str, object]:
        """The flags that define the stream's order, by flag name. Without buckets, --max_aspect_ratio
        only decides which records are skipped (a skipped record still advances the position)."""
        settings = {"seed": self.seed, "shuffle_buffer": self.buffer_size, "parts_per_window": self.parts_per_window,
                    "resolution": self.resolution, "aspect_ratio_buckets": bool(self.buckets)}
        if self.buckets:  # the bucket set decides which records are batched together
            settings.update(bucket_step=self.bucket_step, max_aspect_ratio=self.max_aspect_ratio)
        return settings

    def fingerprint(self) -> dict:
        """The order fingerprint checkpoints save (see order_fingerprint); rank 0's names every part."""
        return order_fingerprint(self.entries, self.order_settings(), listing=self.rank == 0)

    def loader_batch_size(self, batch_size: int):
        """batch_size for paddle.io.DataLoader: None when the stream yields whole (bucketed) batches."""
        return None if self.buckets else batch_size

    def resume(self, state: dict, num_workers: int, all_ranks: Optional[List[dict]] = None) -> None:
        """Continue from a position saved by the trainer (see ldm.trainer.StreamProgress).

        The position is per (rank, worker) shard. With another world size or number of dataloader
        workers (elastic resume), `all_ranks` holds every old rank's saved state, in rank order, and
        the position is carried over to this layout (relayout)."""
        if state["world_size"] != self.world_size or state["num_workers"] != max(1, num_workers):
            if all_ranks is None:
                raise ValueError(f"the checkpoint's data position is for {state['world_size']} processes x {state['num_workers']} dataloader workers, "
                                 f"this run has {self.world_size} x {max(1, num_workers)}; use the same, or pass --ignore_data_skip to start a new pass")
            state = self.relayout(all_ranks, max(1, num_workers))
        self.resume_state = state
        self.first_pass = int(state.get("first_pass", 0))  # for a worker that had not yielded yet

    def relayout(self, old_ranks: List[dict], num_workers: int) -> dict:
        """This rank's resume state in a new layout (world size x workers) from every old rank's.

        Each old shard j (of S) is dealt to new shard j mod S'; a new shard first finishes the
        passes of the old shards it was dealt (ShardStream.tail_stream: the rest of each one's
        pass from its saved cursor, then its whole passes up to the highest pass any old shard had
        reached, in the old layout), then reads the next passes in the new layout. So every record
        of every pass is read once. Cost: each old shard re-reads (decompresses, does not decode)
        up to the windows it had started, as any resume; at 32 x 8 -> 24 x 8 GPUs x workers, 64 of
        the 192 new shards finish two old shards' passes, the others one: they begin the next pass
        up to one old shard's share of a pass (1/256) apart, and nothing waits on that (the stream
        is endless). Old skip counts and bucket queues go with their old shard."""
        old_world, old_workers = int(old_ranks[0]["world_size"]), int(old_ranks[0]["num_workers"])
        for state in old_ranks:
            if state.get("elastic"):
                was = state["elastic"]["from"]
                raise ValueError(f"the checkpoint's data position is itself still finishing the passes of an earlier layout change "
                                 f"({was[0]} x {was[1]} -> {old_world} x {old_workers} processes x dataloader workers); resume it on "
                                 f"{old_world} x {old_workers} until a later checkpoint, or pass --ignore_data_skip to start a new pass")
        lists = len(self.entries)
        old = []  # every old shard's saved worker state, shard j = rank * workers + worker
        for state in old_ranks:
            first = int(state.get("first_pass", 0))
            for w in range(old_workers):
                saved = state["workers"].get(str(w)) or {"position": [0] + [first, 0, 0, 0] * lists, "skips": []}
                if len(saved["position"]) != 1 + CURSOR_FIELDS * lists:
                    raise ValueError(f"saved data position has {len(saved['position'])} numbers, expected {1 + CURSOR_FIELDS * lists}: the --file_list changed since the checkpoint")
                old.append(saved)
        max_pass = [max(int(v["position"][1 + CURSOR_FIELDS * l]) for v in old) for l in range(lists)]
        num_shards = self.world_size * num_workers
        workers, tasks = {}, {}
        for w in range(num_workers):
            mine = list(range(self.rank * num_workers + w, len(old), num_shards))  # old shards j = this shard mod S'
            skips = np.zeros(len(SKIP_REASONS), "int64")
            for j in mine:
                vector = np.asarray(old[j]["skips"], "int64")[: len(SKIP_REASONS)]
                skips[: len(vector)] += vector
            position = [0]
            for l in range(lists):
                position += [TAIL_PASS, -1, 0, 0] if mine else [max_pass[l] + 1, 0, 0, 0]
            workers[str(w)] = {"position": position, "skips": skips.tolist()}
            carry = [c for j in mine for c in old[j].get("carry", [])]
            if carry:
                workers[str(w)]["carry"] = carry
            if mine:
                tasks[str(w)] = [[j, old[j]["position"]] for j in mine]
        log(f"rank {self.rank}: data position carried over from {old_world} x {old_workers} to {self.world_size} x {num_workers} processes x workers; "
            f"the old shards' passes (up to pass {max(max_pass)}) are finished first, then the new layout reads on")
        return {"world_size": self.world_size, "num_workers": num_workers, "batches": 0, "workers": workers,
                "elastic": {"from": [old_world, old_workers], "old_shards": len(old), "max_pass": max_pass, "tasks": tasks}}

    def start_new_pass(self, pass_index: int) -> None:
        """Start every shard afresh at `pass_index` (--ignore_data_skip, a resolution stage): the pass
        index seeds the part order and every window's shuffle, so a new pass is a new order, never a
        replay of pass 0's first records."""
        self.resume_state = None
        self.first_pass = pass_index

    def shard_stream(self, worker: int, num_workers: int, passes: Optional[int] = None) -> ShardStream:
        shard = self.rank * num_workers + worker
        state, skips, carry = None, None, []
        if self.first_pass:
            state = np.zeros(1 + CURSOR_FIELDS * len(self.entries), dtype="int64")
            state[1::CURSOR_FIELDS] = self.first_pass
        tail = None
        if self.resume_state is not None:
            saved = self.resume_state["workers"].get(str(worker))
            if saved is not None:
                state, skips, carry = saved["position"], saved["skips"], saved.get("carry", [])
            elastic = self.resume_state.get("elastic")
            if elastic and str(worker) in elastic["tasks"]:
                tail = {"old_shards": elastic["old_shards"], "max_pass": elastic["max_pass"], "tasks": elastic["tasks"][str(worker)]}
        stream = ShardStream(self.entries, shard, self.world_size * num_workers, self.seed, self.buffer_size, state, self.parts_per_window, passes, tail)
        stream.skips.where = f"rank {self.rank} worker {worker}"
        stream.carry = carry  # bucketed records read but not yet yielded (ldm.buckets)
        if skips is not None:
            stream.skips.update(skips_from_vector(skips))
        return stream

    def records(self, stream: ShardStream) -> Iterator[dict]:
        """Decoded records of one shard: dicts with part, line, caption and image.

        Ends when the shard is barren (ShardStream.barren holds every filelist). The stream is
        otherwise endless, and skipped lines must not count as progress, or a shard whose every
        record is skipped (e.g. every image smaller than --resolution) would spin without a word.
        """
        skipped, any_yield = 0, False
        for rec in stream:
            if len(stream.barren) == len(self.entries):
                return
            try:
                caption, key, value = self.decode(rec.raw)
            except Skip as e:
                stream.skips.skip(e.reason, rec.part, rec.line, str(e))
                skipped += 1
                if skipped == EARLY_WARNING_SKIPS and not any_yield:
                    log(f"{stream.skips.where}: no usable record among the first {skipped} read: {explain_barren(stream.skips, self.resolution)}; "
                        "the run stops if its passes yield none")
                continue
            stream.used(rec.list_index)
            any_yield = True
            yield {"part": rec.part, "line": rec.line, "pass": rec.pass_index, "list": rec.list_index, "caption": caption, key: value,
                   "draw": int(stream.state[0])}

    def decode(self, raw: bytes) -> Tuple[str, str, np.ndarray]:
        """(caption, sample key, array) of a raw line, or raise Skip: the decoded image as
        "pixel_values"; with a latent cache, the moments in column 4 as "latent_moments" (no image
        decode: ldm.cache_latents decoded and checked it, and noted its size for --max_aspect_ratio)."""
        if self.latent_cache is not None:
            from ldm.cache_latents import cached_record

            cached = cached_record(raw, self.latent_cache.prefix.encode())
            if cached is not None:
                caption, moments, (w, h) = cached
                if self.max_aspect_ratio and max(w, h) > self.max_aspect_ratio * min(w, h):
                    raise Skip("extreme_aspect_ratio", f"{w}x{h} pixels, more elongated than --max_aspect_ratio {self.max_aspect_ratio}")
                return caption, "latent_moments", moments
        caption, data, reason = parse_line(raw)
        if reason is not None:
            raise Skip(reason, "not 3 tab-separated UTF-8 columns" if reason == "short_line" else "column 3 is not base64")
        pixels = decode_image(data, self.resolution, self.max_aspect_ratio, self.buckets)
        if self.latent_cache is not None:
            # A usable image without moments: one batch cannot mix moments and pixels.
            raise Skip("not_cached", f"column 4 holds no moments starting {self.latent_cache.prefix!r}")
        return caption, "pixel_values", pixels

    def __iter__(self):
        loader_worker, num_workers = _worker()
        # After a resume the DataLoader starts its round-robin at loader worker 0, but the
        # uninterrupted run would next have read from worker (batches consumed % workers):
        # rotate the roles so the batches come in exactly the same order.
        offset = 0 if self.resume_state is None else int(self.resume_state["batches"]) % num_workers
        worker = (loader_worker + offset) % num_workers
        stream = self.shard_stream(worker, num_workers)
        if self.buckets:
            yield from self._bucketed_batches(stream, worker)
        else:
            for rec in self.records(stream):
                yield self._sample(rec, stream, worker)
        # Only a barren shard gets here (the stream is endless). Exiting this worker would leave
        # the other ranks waiting in the gradient all-reduce; instead send sentinels, which make
        # StreamProgress.fatal say why, and the training loops stop on every rank at one step.
        log(f"{stream.skips.where} has nothing to train on: {explain_barren(stream.skips, self.resolution)}; stopping the run")
        while True:
            blank = (("latent_moments", np.zeros(self.latent_cache.shape, np.float16)) if self.latent_cache is not None else
                     ("pixel_values", np.zeros((3, self.resolution, self.resolution), np.uint8)))
            sentinel = {blank[0]: blank[1], "skips": stream.skips.as_vector(),
                        "worker": np.int64(worker), "position": stream.state.copy(), "data_error": np.int64(1)}
            if self.tokenizer is not None:
                sentinel["input_ids"] = np.full(self.max_length, self.tokenizer.pad_token_id, dtype="int64")
            yield self._batch([sentinel] * self.batch_size, []) if self.buckets else sentinel

    def _sample(self, rec: dict, stream: ShardStream, worker: int) -> dict:
        """A training sample with the stream's bookkeeping as it stands after this record."""
        key = "latent_moments" if "latent_moments" in rec else "pixel_values"
        sample = {key: rec[key], "skips": stream.skips.as_vector(), "worker": np.int64(worker),
                  "position": stream.state.copy(), "data_error": np.int64(0)}
        if self.tokenizer is not None:
            drop = self._caption_dropped(stream.shard, rec["draw"])
            sample["input_ids"] = self.encode_caption("" if drop else rec["caption"])
        return sample

    def _caption_dropped(self, shard: int, draw: int) -> bool:
        """Caption dropout for classifier-free guidance, seeded by the record's place in the stream
        (its shard and draw). The draws are made DROPOUT_BLOCK at a time, the same numbers: a seeded
        generator made right after an image decode costs ~90 us (numpy's code has left the CPU
        caches), ~15 us in a row."""
        first, drops = self._dropouts.get(shard, (0, []))
        if not first <= draw < first + len(drops):
            first = draw
            drops = [np.random.default_rng([self.seed, shard, d, 3]).random() < self.caption_dropout for d in range(first, first + DROPOUT_BLOCK)]
            self._dropouts[shard] = (first, drops)
        return drops[draw - first]

    def _bucketed_batches(self, stream: ShardStream, worker: int) -> Iterator[dict]:
        """Whole batches of one aspect-ratio bucket each (ldm.buckets), with the carry in the position."""
        batcher = BucketBatcher(self.batch_size)
        # A resumed worker first refills its queues with the records it had read but not yielded
        # (a smaller --per_device_train_batch_size than before may already fill some).
        for rec in self._carried_records(stream):
            full = batcher.add(self._sample(rec, stream, worker), [rec["part"], rec["line"], rec["draw"]])
            if full is not None:
                yield self._batch(full, batcher.carry())
        for rec in self.records(stream):
            full = batcher.add(self._sample(rec, stream, worker), [rec["part"], rec["line"], rec["draw"]])
            if full is not None:
                yield self._batch(full, batcher.carry())

    def _carried_records(self, stream: ShardStream) -> Iterator[dict]:
        """The records a resumed bucketed worker had read but not yielded (its saved carry), decoded
        anew through the same guard as any record: one that no longer decodes (a part since
        deleted or cut, cached moments gone, ...) is skipped and counted, never a crash that
        would kill the worker again on every re-run."""
        lines = read_lines((part, line) for part, line, _ in stream.carry)
        for part, line, draw in stream.carry:
            raw = lines.get((part, line))
            try:
                if raw is None:
                    raise Skip("missing_part" if part_size(part) < 0 else "truncated_part", f"line {line} can no longer be read")
                caption, key, value = self.decode(raw)
            except Skip as e:
                stream.skips.skip(e.reason, part, line, f"{e} (a record the checkpoint held in its bucket queues)")
                continue
            yield {"part": part, "line": line, "caption": caption, "draw": draw, key: value}

    @staticmethod
    def _batch(samples: List[dict], carry: list) -> dict:
        """Stacked samples; the bookkeeping is the stream's after the last of them, plus the carry."""
        bookkeeping = ("skips", "worker", "position", "data_error")
        batch = stack([{k: v for k, v in s.items() if k not in bookkeeping} for s in samples])
        batch.update({k: samples[-1][k] for k in bookkeeping}, carry=carry)
        return batch


class StreamProgress:
    """Where each dataloader worker's stream stood after the last consumed sample, and its skips.

    Filled from the bookkeeping each sample carries (ldm.data.TextImageStream); saved with
    every checkpoint so a resumed run reads exactly the records the uninterrupted run would.
    `fatal` is None, or the one-line reason this rank's data cannot go on (a barren shard).
    """

    def __init__(self, world_size: int, num_workers: int, resumed: Optional[dict] = None, resolution: Optional[int] = None,
                 stream: Optional["TextImageStream"] = None):
        self.world_size = world_size
        # From the stream: what a resume checks the order against (TextImageStream.fingerprint), and
        # the pass a worker that has not yielded yet starts at (TextImageStream.start_new_pass).
        self.fingerprint = stream.fingerprint() if stream is not None else None
        self.first_pass = stream.first_pass if stream is not None else 0
        self.num_workers = max(1, num_workers)
        self.resolution = resolution
        self.batches = 0
        self.workers: Dict[int, dict] = {}
        self.fatal: Optional[str] = None
        self.elastic = None  # the old shards' passes still to finish after a layout change (TextImageStream.relayout)
        if resumed:
            self.batches = int(resumed["batches"])
            self.workers = {int(w): v for w, v in resumed["workers"].items()}
            self.elastic = resumed.get("elastic")

    def update(self, batch: dict) -> None:
        """Take the stream's bookkeeping out of a collated batch (so the model never sees it)."""
        self.batches += 1
        states = batch.pop(BOOKKEEPING_KEY)  # host strings: no device read (pack_bookkeeping)
        for state in (json.loads(s) for s in ([states] if isinstance(states, str) else states)):  # (a bucketed batch has one)
            # Within a batch and across batches a worker's position only grows; keep the last.
            self.workers[int(state["worker"])] = {"position": state["position"], "skips": state["skips"]}
            if "carry" in state:
                self.workers[int(state["worker"])]["carry"] = state["carry"]
            if state["data_error"] and self.fatal is None:
                # A sentinel's pixels are resolution x resolution, which names the flag in the message.
                resolution = self.resolution or (int(batch["pixel_values"].shape[-1]) if "pixel_values" in batch else None)
                self.fatal = (f"nothing to train on: data worker {state['worker']} of rank {max(0, current_rank_and_world()[0])} found no usable "
                              f"record in its share of --file_list: {explain_barren(skips_from_vector(state['skips']), resolution)}")

    def state_dict(self) -> dict:
        state = {"world_size": self.world_size, "num_workers": self.num_workers, "batches": self.batches,
                 "workers": {str(w): v for w, v in sorted(self.workers.items())}}
        if self.fingerprint is not None:
            state["data_order"] = self.fingerprint
        if self.first_pass:
            state["first_pass"] = self.first_pass
        if self.elastic and any(p == TAIL_PASS for v in self.workers.values() for p in v["position"][1::CURSOR_FIELDS]):
            state["elastic"] = self.elastic  # dropped once every worker of this rank has finished its old shards' passes
        return state

    def skip_totals(self) -> Dict[str, int]:
        """Skip counts summed over this rank's workers and then over all ranks."""
        import paddle
        import paddle.distributed as dist

        local = np.zeros(len(SKIP_REASONS), "int64")
        for v in self.workers.values():
            saved = np.asarray(v["skips"], dtype="int64")[: len(SKIP_REASONS)]
            local[: len(saved)] += saved  # a checkpoint from before newer reasons has a shorter vector
        total = paddle.to_tensor(local)
        if dist.get_world_size() > 1:
            dist.all_reduce(total)
        return {f"skipped_{r}": int(v) for r, v in zip(SKIP_REASONS, total.numpy())}


# The stream's per-sample bookkeeping leaves the worker as one JSON string: paddle's DataLoader
# keeps strings on the host, while arrays become tensors (on a GPU, copied to the device), and
# reading those back every micro-batch would be a host sync each time.
BOOKKEEPING_KEY = "stream_state"
BOOKKEEPING_FIELDS = ("skips", "worker", "position", "data_error")


def pack_bookkeeping(sample: dict) -> dict:
    state = {k: np.asarray(sample.pop(k)).tolist() for k in BOOKKEEPING_FIELDS}
    if "carry" in sample:  # a bucketed batch (ldm.buckets): the records waiting in its worker's queues
        state["carry"] = sample.pop("carry")
    sample[BOOKKEEPING_KEY] = json.dumps(state, separators=(",", ":"))
    return sample


def init_worker(worker_id: int) -> None:
    """`worker_init_fn` of the training DataLoaders: SIGTERM from outside is ignored; one intra-op thread.

    SIGTERM first: schedulers (SLURM, Kubernetes) and paddle.distributed.launch send it to the
    whole process group, workers included, and a worker killed by it makes Paddle's SIGCHLD
    handler raise `SystemError: DataLoader process ... is killed by signal: Terminated` in the
    training process mid-step, before it can save. So only the training process decides
    (ldm.runtime.Preemption: finish the step, save, exit 0); see `_sigterm_only_from_parent`.
    Threads: a worker runs Pillow and numpy, not Paddle kernels; the thread pool it inherits from
    the training process (ldm.runtime.set_cpu_threads) would only contend for its cores."""
    _sigterm_only_from_parent()
    import paddle

    paddle.base.core.set_num_threads(1)


def _sigterm_only_from_parent() -> None:
    """In a data worker: ignore SIGTERM; the training process ends its workers with SIGINT at exit.

    Ignoring SIGTERM alone would hang a finished run: at exit, Python's multiprocessing ends the
    daemonic workers still running with SIGTERM and then waits for them (seen with the Trainer
    script, whose DataLoader iterator outlives train()). So the training process, before that,
    sends them SIGINT (`end_workers_at_exit`), which Paddle's worker loop takes as its cue to
    clean up its shared memory and return. (Reading the sender of each SIGTERM with sigwaitinfo
    cannot work: Paddle starts a thread in the worker before this runs, and a signal that thread
    does not block is delivered to it.) SIGKILL still ends a worker.
    When the training process dies without that (SIGKILL, e.g. the launcher's after its grace),
    Paddle's ParentWatchDog is not enough: a worker blocked writing a batch nobody reads stays
    forever (seen), where before the scheduler's SIGTERM would have ended it. So on Linux the
    kernel is asked to SIGKILL the worker when its parent dies (prctl PR_SET_PDEATHSIG).
    """
    import ctypes
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() == 1:  # the parent died before the request took effect
            os._exit(1)


# How long the training process waits at exit for its data workers to take their SIGINT.
WORKER_EXIT_GRACE_S = 5.0


def end_workers_at_exit() -> None:
    """In the training process: at exit, end the data workers still running with SIGINT (see
    `_sigterm_only_from_parent`). atexit runs the newest registration first, so this runs before
    multiprocessing's own exit hook, which then only waits for them."""
    import atexit
    import multiprocessing
    import signal

    def end_workers():
        workers = [w for w in multiprocessing.active_children() if w.daemon]
        for worker in workers:
            os.kill(worker.pid, signal.SIGINT)
        # Python runs a signal's handler in the main thread, but the kernel may hand the signal to
        # another of the worker's threads (Paddle's or the queue feeder): its main thread then stays
        # blocked reading the index queue and never sees it (seen: a finished 2-rank run hung at exit).
        # So a worker still alive after a grace period is killed; its work is over anyway.
        deadline = time.monotonic() + WORKER_EXIT_GRACE_S
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGKILL)
                worker.join()

    atexit.register(end_workers)


def as_paddle_dataset(stream: TextImageStream):
    """Wrap as a paddle.io.IterableDataset (kept apart so this module imports without paddle)."""
    from paddle.io import IterableDataset

    class _Dataset(IterableDataset):
        def __init__(self):
            super().__init__()
            self.stream = stream

        def __iter__(self):
            try:
                for sample in self.stream:
                    yield pack_bookkeeping(sample)
            except Exception:
                # Paddle's single-process DataLoader runs this in a thread and waits forever
                # if it dies; a bug here must end the run loudly instead of hanging it.
                traceback.print_exc()
                sys.stderr.flush()
                os._exit(1)

    return _Dataset()


# ---------------------------------------------------------------------------
# python -m ldm.data: print what one rank's workers yield in one pass
# ---------------------------------------------------------------------------


def inspect_pass(file_list, resolution, rank, world_size, num_workers, seed=0, buffer_size=1000, out=sys.stdout,
                 parts_per_window=PARTS_PER_WINDOW, max_aspect_ratio=None, aspect_ratio_buckets=False, bucket_step=64,
                 allow_missing_parts=False):
    """Print the pass-0 records of each of the rank's workers; return the number read and summed skip counts."""
    stream = TextImageStream(file_list, resolution, seed=seed, buffer_size=buffer_size, rank=rank, world_size=world_size,
                             parts_per_window=parts_per_window, max_aspect_ratio=max_aspect_ratio,
                             aspect_ratio_buckets=aspect_ratio_buckets, bucket_step=bucket_step, allow_missing_parts=allow_missing_parts)
    total = SkipCounter()
    read = 0
    for worker in range(num_workers):
        shard = stream.shard_stream(worker, num_workers, passes=1)
        for rec in stream.records(shard):
            read += 1
            _, h, w = rec["pixel_values"].shape
            out.write(json.dumps({"part": rec["part"], "line": rec["line"], "worker": worker, "caption": rec["caption"], "width": w, "height": h}) + "\n")
        total.update(shard.skips)
    return read, total


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ldm.data", description="Print, one JSON line each, the records one rank's dataloader workers yield in one pass.")
    parser.add_argument("--file_list", required=True, help="File listing one filelist path (and optional weight) per line.")
    parser.add_argument("--resolution", type=int, default=256, help="Side of the square crop, in pixels; smaller images are skipped.")
    parser.add_argument("--rank", type=int, default=0, help="Which rank's shards to print (0 .. world_size-1).")
    parser.add_argument("--world_size", type=int, default=1, help="Number of training processes the data is sharded over.")
    parser.add_argument("--num_workers", type=int, default=0, help="Dataloader workers per rank; 0 means the main process reads (one shard).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the part order and the shuffle.")
    parser.add_argument("--buffer_size", type=int, default=1000, help="Lines read and shuffled together (--shuffle_buffer of the training scripts).")
    parser.add_argument("--parts_per_window", type=int, default=PARTS_PER_WINDOW, help="Parts each worker reads side by side into one shuffle window.")
    parser.add_argument("--max_aspect_ratio", type=float, default=None, help="Skip images whose longer side is over this many times the shorter; unset keeps all.")
    parser.add_argument("--aspect_ratio_buckets", action="store_true", help="Crop each image to the aspect-ratio bucket nearest its own (width/height report the bucket).")
    parser.add_argument("--bucket_step", type=int, default=64, help="Bucket sides are multiples of this (the autoencoder factor x the UNet's downsampling: 64 for ldm_32l).")
    parser.add_argument("--allow_missing_parts", action="store_true", help="Go on when a filelist has no existing part (as the training scripts' flag).")
    args = parser.parse_args(argv)
    if not 0 <= args.rank < args.world_size:
        parser.error(f"--rank must be in [0, {args.world_size}), got {args.rank}")
    for flag in ("resolution", "buffer_size", "parts_per_window", "bucket_step"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be > 0, got {getattr(args, flag)}")
    if args.max_aspect_ratio is not None and args.max_aspect_ratio < 1:
        parser.error(f"--max_aspect_ratio must be >= 1 (longer side over shorter), got {args.max_aspect_ratio}")
    try:
        read, skips = inspect_pass(args.file_list, args.resolution, args.rank, args.world_size, max(1, args.num_workers), args.seed,
                                   args.buffer_size, parts_per_window=args.parts_per_window, max_aspect_ratio=args.max_aspect_ratio,
                                   aspect_ratio_buckets=args.aspect_ratio_buckets, bucket_step=args.bucket_step,
                                   allow_missing_parts=args.allow_missing_parts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if read == 0:
        log(f"rank {args.rank} would train on nothing: {explain_barren(skips, args.resolution)}")
    summary = {"read": read, "skipped": {r: skips.get(r, 0) for r in SKIP_REASONS}}
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
