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
Within a shard each filelist is an endless sequence of passes, and records go
through a shuffle buffer (raw lines, so decoding happens after the shuffle); the
filelists are interleaved by weight. Every random choice is a pure function of
(seed, pass, rank, worker), so two runs with the same settings see the same stream.

Bad data never stops the stream: each skipped record or part is counted by reason.
"""
import argparse
import base64
import binascii
import gzip
import io
import json
import math
import os
import sys
import traceback
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

# Pillow's decompression-bomb guard stays at its default (~89M pixels): an image
# larger than that is skipped and counted, never decoded. (The seed raised it to 2.3G.)
MAX_PIXELS = Image.MAX_IMAGE_PIXELS

SKIP_REASONS = (
    "short_line",  # fewer than 3 tab-separated columns, or not UTF-8
    "bad_base64",
    "undecodable_image",
    "too_small",  # shorter side below --resolution
    "too_many_pixels",  # over Pillow's decompression-bomb limit
    "missing_part",  # a part path that cannot be opened
    "truncated_part",  # a gzip stream that ends early or is corrupt (unread records are lost)
)


class SkipCounter(Counter):
    """Counts of skipped records (or parts) by reason."""

    def as_vector(self) -> np.ndarray:
        return np.array([self.get(r, 0) for r in SKIP_REASONS], dtype="int64")


# ---------------------------------------------------------------------------
# Reading the lists
# ---------------------------------------------------------------------------


@dataclass
class FileListEntry:
    path: str
    weight: float
    parts: List[str]


def _list_lines(path: str) -> List[str]:
    """Non-blank, non-comment lines of a list file."""
    with open(path, "r", encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.strip().startswith("#")]


def read_file_list(file_list: str) -> List[FileListEntry]:
    """Parse a --file_list; raise ValueError with one line that says what to fix."""
    if not os.path.isfile(file_list):
        raise ValueError(f"--file_list {file_list!r} does not exist; pass a file that lists one filelist path per line")
    entries = []
    for line in _list_lines(file_list):
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
        if not os.path.isfile(path):
            raise ValueError(f"{file_list}: filelist {path!r} does not exist (relative paths resolve against {os.getcwd()})")
        parts = _list_lines(path)
        if parts:
            entries.append(FileListEntry(path=path, weight=weight, parts=parts))
    if not entries:
        raise ValueError(f"--file_list {file_list!r} lists no filelist with any part")
    if not any(os.path.isfile(p) for e in entries for p in e.parts):
        raise ValueError(f"--file_list {file_list!r}: none of its parts exists (first: {entries[0].parts[0]!r})")
    return entries


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


def iter_unit_lines(unit: Unit, skips: SkipCounter) -> Iterator[Tuple[int, bytes]]:
    """Yield (line number, raw line) of a unit; a missing or truncated part is counted, not raised."""
    opener = gzip.open if unit.part.endswith(".gz") else open
    try:
        f = opener(unit.part, "rb")
    except OSError:
        skips["missing_part"] += 1
        return
    with f:
        line_no = 0
        try:
            for raw in f:
                line_no += 1
                if (line_no - 1) % unit.stride == unit.offset:
                    yield line_no, raw
        except (EOFError, OSError, zlib.error):
            # Records already yielded stand; the rest of this part is lost and counted once.
            skips["truncated_part"] += 1


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


def load_image(data: bytes, resolution: int) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """Decode, resize the shorter side to `resolution`, centre-crop; CHW float32 in [-1, 1]."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        w, h = image.size
        if w * h > MAX_PIXELS:
            return None, "too_many_pixels"
        if min(w, h) < resolution:
            return None, "too_small"
        # JPEG draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is
        # much smaller than the image; Pillow keeps the result >= the requested size.
        scale = resolution / min(w, h)
        image.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        image = to_rgb(image)
    except Image.DecompressionBombError:
        return None, "too_many_pixels"
    except Exception:  # Pillow raises many types for corrupt data; all mean "undecodable"
        return None, "undecodable_image"
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=3.0)
    image = image.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(image, dtype=np.float32)
    return (arr.transpose(2, 0, 1) / 127.5 - 1.0).astype(np.float32), None


def parse_line(raw: bytes) -> Tuple[Optional[str], Optional[bytes], Optional[str]]:
    """Split a raw line into (caption, image bytes); or the skip reason."""
    try:
        fields = raw.decode("utf-8").rstrip("\r\n").split("\t")
    except UnicodeDecodeError:
        return None, None, "short_line"
    if len(fields) < 3:
        return None, None, "short_line"
    try:
        data = base64.b64decode(fields[2], validate=True)
    except (binascii.Error, ValueError):
        return None, None, "bad_base64"
    if not data:
        return None, None, "bad_base64"
    return fields[0], data, None


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


def shuffle_buffer(items: Iterator[RawRecord], size: int, rng: np.random.Generator) -> Iterator[RawRecord]:
    """Classic reservoir-style shuffle buffer; flushes in random order at the end."""
    buffer: List[RawRecord] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


class ShardStream:
    """The endless record stream of one shard (one rank's one dataloader worker)."""

    def __init__(self, entries: List[FileListEntry], shard: int, num_shards: int, seed: int, buffer_size: int):
        self.entries = entries
        self.shard = shard
        self.num_shards = num_shards
        self.seed = seed
        self.buffer_size = buffer_size
        self.skips = SkipCounter()
        self.units = [make_units(e.parts, num_shards) for e in entries]
        weights = np.array([e.weight for e in entries], dtype=np.float64)
        self.cum_weights = np.cumsum(weights / weights.sum())

    def one_pass(self, list_index: int, pass_index: int) -> Iterator[RawRecord]:
        units = shard_units(self.units[list_index], self.num_shards, self.shard, self.seed, list_index, pass_index)

        def lines():
            for unit in units:
                for line_no, raw in iter_unit_lines(unit, self.skips):
                    yield RawRecord(unit.part, line_no, raw, pass_index, list_index)

        rng = np.random.default_rng([self.seed, list_index, pass_index, self.shard, 1])
        return shuffle_buffer(lines(), self.buffer_size, rng)

    def endless(self, list_index: int) -> Iterator[RawRecord]:
        pass_index = 0
        while True:
            got_any = False
            for rec in self.one_pass(list_index, pass_index):
                got_any = True
                yield rec
            if not got_any:
                return  # nothing readable for this shard in this filelist: end it, never spin
            pass_index += 1

    def __iter__(self) -> Iterator[RawRecord]:
        """Interleave the filelists' endless streams, drawing a filelist by weight."""
        streams = [self.endless(i) for i in range(len(self.entries))]
        alive = list(range(len(streams)))
        rng = np.random.default_rng([self.seed, self.shard, 2])
        while alive:
            if len(alive) == len(streams):
                i = int(np.searchsorted(self.cum_weights, rng.random(), side="right"))
                i = min(i, len(streams) - 1)
            else:
                i = alive[int(rng.integers(len(alive)))]
            try:
                yield next(streams[i])
            except StopIteration:
                alive.remove(i)


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
    """IterableDataset of {"pixel_values", "input_ids", "skips", "worker"} for training.

    `skips` carries this worker's cumulative skip counts (by SKIP_REASONS) so the
    training loop can sum them across workers and ranks and log them.
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
    ):
        self.entries = read_file_list(file_list)
        self.resolution = resolution
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.caption_dropout = caption_dropout
        self.buffer_size = buffer_size
        self.seed = seed
        if rank is None or world_size is None:
            rank, world_size = current_rank_and_world()
        self.rank, self.world_size = rank, world_size

    def shard_stream(self, worker: int, num_workers: int) -> ShardStream:
        shard = self.rank * num_workers + worker
        return ShardStream(self.entries, shard, self.world_size * num_workers, self.seed, self.buffer_size)

    def records(self, stream: ShardStream) -> Iterator[dict]:
        """Decoded records of one shard: dicts with part, line, caption and image."""
        for rec in stream:
            caption, data, reason = parse_line(rec.raw)
            if reason is None:
                pixels, reason = load_image(data, self.resolution)
            if reason is not None:
                stream.skips[reason] += 1
                continue
            yield {"part": rec.part, "line": rec.line, "pass": rec.pass_index, "list": rec.list_index, "caption": caption, "pixel_values": pixels}

    def tokenize(self, caption: str) -> np.ndarray:
        ids = self.tokenizer(caption, padding="max_length", truncation=True, max_length=self.max_length)["input_ids"]
        return np.asarray(ids, dtype="int64")

    def __iter__(self):
        worker, num_workers = _worker()
        stream = self.shard_stream(worker, num_workers)
        # Caption dropout for classifier-free guidance, seeded per shard like everything else.
        rng = np.random.default_rng([self.seed, stream.shard, 3])
        for rec in self.records(stream):
            sample = {"pixel_values": rec["pixel_values"], "skips": stream.skips.as_vector(), "worker": np.int64(worker)}
            if self.tokenizer is not None:
                caption = "" if rng.random() < self.caption_dropout else rec["caption"]
                sample["input_ids"] = self.tokenize(caption)
            yield sample


def as_paddle_dataset(stream: TextImageStream):
    """Wrap as a paddle.io.IterableDataset (kept apart so this module imports without paddle)."""
    from paddle.io import IterableDataset

    class _Dataset(IterableDataset):
        def __init__(self):
            super().__init__()
            self.stream = stream

        def __iter__(self):
            try:
                yield from self.stream
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


def inspect_pass(file_list, resolution, rank, world_size, num_workers, seed=0, buffer_size=1000, out=sys.stdout):
    """Print the pass-0 records of each of the rank's workers; return summed skip counts."""
    stream = TextImageStream(file_list, resolution, seed=seed, buffer_size=buffer_size, rank=rank, world_size=world_size)
    total = SkipCounter()
    read = 0
    for worker in range(num_workers):
        shard = stream.shard_stream(worker, num_workers)
        finished = set()  # filelists that have started their second pass
        for rec in stream.records(shard):
            if rec["pass"] > 0:
                finished.add(rec["list"])
                if len(finished) == len(stream.entries):
                    break
                continue
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
    parser.add_argument("--seed", type=int, default=0, help="Seed of the part order and shuffle buffer.")
    parser.add_argument("--buffer_size", type=int, default=1000, help="Records held in the shuffle buffer.")
    args = parser.parse_args(argv)
    if not 0 <= args.rank < args.world_size:
        parser.error(f"--rank must be in [0, {args.world_size}), got {args.rank}")
    try:
        read, skips = inspect_pass(args.file_list, args.resolution, args.rank, args.world_size, max(1, args.num_workers), args.seed, args.buffer_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {"read": read, "skipped": {r: skips.get(r, 0) for r in SKIP_REASONS}}
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
