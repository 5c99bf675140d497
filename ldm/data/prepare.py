"""python -m ldm.prepare: image folders, webdataset tar shards, parquet shards or CSV/TSV
tables -> the seed's parts (SPEC sections 2 and 7), a filelist and DIR/train.filelist.list.

How input records become parts, so that a re-run resumes without duplicates:
  1. The sources are taken in the order given; inside each, files in sorted path order and
     records in file order. That numbers every input record 0, 1, 2, ... the same way on
     every run. Numbering only needs cheap scans: folder listings, CSV rows, parquet
     metadata, tar headers (a shard is read in place, never unpacked to disk).
  2. Part k holds input records k*N .. (k+1)*N - 1 (N = --records_per_part). A skipped
     record leaves its part shorter; it never shifts a record into another part.
  3. A worker writes part k to a temporary file and renames it to part-k.gz when complete,
     after its counts (counts/part-k.json). A re-run with the same sources and options
     (DIR/prepare.json) keeps every part-k.gz and redoes the rest; a part cut off mid-write
     has no part-k.gz, so it is redone whole. With several worker processes an
     interruption can leave any set of parts complete: each is kept or redone on its own.

Bad input never stops a run: each skipped record is counted by reason, and a source file
that cannot be read at all is counted once (with its path printed).
"""
import argparse
import base64
import glob
import io
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from isal import igzip
from PIL import ExifTags, Image, ImageOps

from ldm.data.records import Skip, looks_cut, open_image, to_rgb
from ldm.data.sources import JPEG_QUALITY, PREPARE_SKIPS, Record, Source, read_items, read_parquet, read_tar, resolve_sources
from ldm.data.storage import METADATA_THREADS, is_remote, read_text, remote_sizes, upload, write_text


# ---------------------------------------------------------------------------
# Records: clean the caption, check and downscale the image, format the line
# ---------------------------------------------------------------------------


def clean_caption(caption) -> str:
    """One line of text: every run of whitespace (tabs and newlines too) becomes one space."""
    return " ".join(str(caption).split()) if caption is not None else ""


def fit_image(data: bytes, min_side: int, max_side: int) -> Tuple[Optional[bytes], Optional[str]]:
    """Check that the image decodes whole; downscale it if its shorter side is above max_side.

    Returns (bytes to store, None) or (None, skip reason). An image that needs no
    downscaling is stored as it came (EXIF and all); a downscaled one is turned upright
    (EXIF orientation applied) and re-encoded in its own format: JPEG stays JPEG.
    """
    try:
        image = open_image(data)
        w, h = image.size
        short = min(w, h)
        if short < min_side:
            return None, "too_small"
        fmt = image.format
        if not max_side or short <= max_side:
            # Decode fully to catch truncated or corrupt data now rather than in training;
            # libjpeg at 1/8 scale still reads every byte, at a fraction of the cost.
            image.draft(None, (max(1, w // 8), max(1, h // 8)))
            image.load()
            return data, None
        scale = max_side / short
        size = (max(max_side, round(w * scale)), max(max_side, round(h * scale)))
        turned = image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)  # a quarter turn to be upright
        image.draft(None, size)  # JPEG: let libjpeg decode at 1/2..1/8 scale, never below `size`
        image = ImageOps.exif_transpose(image)
        if turned:
            size = size[::-1]
        image = image if image.mode == "L" else to_rgb(image)
        image = image.resize(size, Image.LANCZOS, reducing_gap=3.0)
        out = io.BytesIO()
        if fmt in ("JPEG", "MPO"):
            image.save(out, format="JPEG", quality=JPEG_QUALITY, icc_profile=image.info.get("icc_profile"))
        elif fmt == "WEBP":
            image.save(out, format="WEBP", quality=JPEG_QUALITY)
        else:  # PNG, and lossless PNG for the rest (GIF, BMP, TIFF)
            image.save(out, format="PNG")
        return out.getvalue(), None
    except Skip as e:
        return None, e.reason
    except Image.DecompressionBombError:
        return None, "too_many_pixels"
    except Exception as e:  # Pillow raises many types for corrupt data
        return None, "truncated_image" if looks_cut(data, e) else "undecodable_image"


def record_line(caption, data: Optional[bytes], min_side: int, max_side: int) -> Tuple[Optional[str], Optional[str]]:
    """The seed's line `caption \\t _ \\t base64(image)\\n`, or the skip reason."""
    caption = clean_caption(caption)
    if not caption:
        return None, "no_caption"
    if not data:
        return None, "no_image"
    data, reason = fit_image(data, min_side, max_side)
    if reason is not None:
        return None, reason
    return f"{caption}\t_\t{base64.b64encode(data).decode('ascii')}\n", None



# ---------------------------------------------------------------------------
# Parts: the plan, and one worker's job
# ---------------------------------------------------------------------------


@dataclass
class PartTask:
    index: int
    path: str  # DIR/part-NNNNN.gz
    slices: List[tuple]  # ("items", items) | ("tar", path, start, stop, caption_column) | ("parquet", path, start, stop, image_col, caption_col)
    records: int
    min_side: int
    max_side: int


def plan_parts(sources: Sequence[Source], records_per_part: int, output_dir: str, min_side: int, max_side: int) -> List[PartTask]:
    """Cut the numbered input records into parts of records_per_part (see the module doc)."""
    tasks: List[PartTask] = []
    current: List[tuple] = []
    room = records_per_part

    def close():
        nonlocal current, room
        k = len(tasks)
        tasks.append(PartTask(k, os.path.join(output_dir, f"part-{k:05d}.gz"), current, records_per_part - room, min_side, max_side))
        current, room = [], records_per_part

    for s in sources:
        start = 0
        while start < s.records:
            stop = min(s.records, start + room)
            if s.kind in ("folder", "table"):
                current.append(("items", s.items[start:stop]))
            elif s.kind == "tar":
                current.append(("tar", s.path, start, stop, s.caption_column))
            else:
                current.append(("parquet", s.path, start, stop, s.image_column, s.caption_column))
            room -= stop - start
            start = stop
            if room == 0:
                close()
    if room < records_per_part:
        close()
    return tasks


def iter_slice(sl: tuple) -> Iterator[Record]:
    if sl[0] == "items":
        return read_items(sl[1])
    if sl[0] == "tar":
        return read_tar(*sl[1:])
    return read_parquet(*sl[1:])


def counts_path(part_path: str) -> str:
    return os.path.join(os.path.dirname(part_path), "counts", os.path.basename(part_path).replace(".gz", ".json"))


def write_part(task: PartTask) -> dict:
    """Write one part; return its counts. Complete parts appear only by rename (in object storage:
    written locally, then uploaded, counts first; an object appears only once its upload is complete)."""
    skips: Counter = Counter()
    written = 0
    remote = is_remote(task.path)
    tmp = os.path.join(tempfile.gettempdir(), f"ldm-prepare-{os.getpid()}-{os.path.basename(task.path)}") if remote else f"{task.path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as raw:
        with igzip.open(raw, "wb") as f:  # ISA-L's gzip: a standard gzip stream, written ~3x faster than zlib's
            for sl in task.slices:
                for caption, data, reason in iter_slice(sl):
                    line = None
                    if reason is None:
                        line, reason = record_line(caption, data, task.min_side, task.max_side)
                    if reason is not None:
                        skips[reason] += 1
                        continue
                    f.write(line.encode("utf-8"))
                    written += 1
        raw.flush()
        os.fsync(raw.fileno())
    counts = {"part": os.path.basename(task.path), "records": task.records, "written": written, "skipped": dict(skips)}
    cpath = counts_path(task.path)
    if remote:
        write_text(cpath, json.dumps(counts))
        upload(tmp, task.path)
        os.remove(tmp)
        return counts
    with open(cpath + ".tmp", "w") as f:
        json.dump(counts, f)
    os.replace(cpath + ".tmp", cpath)
    os.replace(tmp, task.path)
    return counts


def is_complete(task: PartTask) -> bool:
    return os.path.isfile(task.path) and os.path.isfile(counts_path(task.path))


def complete_remote_tasks(tasks: Sequence[PartTask]) -> set:
    """Indices of the tasks whose part and counts are in object storage: one listing of the output
    prefix and one of counts/ (not two HEADs per part)."""
    paths = [p for t in tasks for p in (t.path, counts_path(t.path))]
    sizes = dict(zip(paths, remote_sizes(paths)))
    return {t.index for t in tasks if sizes[t.path] >= 0 and sizes[counts_path(t.path)] >= 0}


def read_json(path: str):
    if is_remote(path):
        return json.loads(read_text(path))
    with open(path) as f:
        return json.load(f)


def read_counts(tasks: Sequence[PartTask]) -> Dict[int, dict]:
    """The counts earlier runs wrote for `tasks`' parts, by task index. In object storage each is
    a GET: METADATA_THREADS at a time (60,000 parts one after the other at ~30 ms would take half
    an hour)."""
    paths = [counts_path(t.path) for t in tasks]
    if paths and is_remote(paths[0]):
        with ThreadPoolExecutor(METADATA_THREADS) as pool:
            found = list(pool.map(read_json, paths))
    else:
        found = [read_json(p) for p in paths]
    return {t.index: c for t, c in zip(tasks, found)}


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


def manifest(sources: Sequence[Source], args) -> dict:
    """What DIR is made from: a re-run must match it to reuse the parts already there."""
    return {"sources": [s.describe() for s in sources], "records_per_part": args.records_per_part,
            "min_side": args.min_side, "max_side": args.max_side,
            "image_column": args.image_column, "caption_column": args.caption_column}


def check_manifest(output_dir: str, wanted: dict) -> bool:
    """True if DIR holds an earlier run of the same job; raise if it holds another job's parts."""
    path = os.path.join(output_dir, "prepare.json")
    if not (remote_sizes([path])[0] >= 0 if is_remote(path) else os.path.isfile(path)):
        if not is_remote(path) and glob.glob(os.path.join(output_dir, "part-*.gz")):
            raise ValueError(f"{output_dir} already holds part files not written by ldm.prepare; use an empty --output_dir")
        return False
    had = read_json(path)
    if had != wanted:
        diff = [k for k in wanted if had.get(k) != wanted[k]]
        raise ValueError(f"{output_dir} holds parts prepared from other sources or options (differs in: {', '.join(diff)}; "
                         f"see {path}); use another --output_dir, or delete it to start over")
    return True


def write_lists(output_dir: str, tasks: Sequence[PartTask], counts: Dict[int, dict]) -> str:
    """DIR/parts.filelist (absolute paths of the non-empty parts) and DIR/train.filelist.list."""
    filelist = os.path.join(output_dir, "parts.filelist")
    write_text(filelist, "".join(t.path + "\n" for t in tasks if counts[t.index]["written"] > 0))
    file_list = os.path.join(output_dir, "train.filelist.list")
    write_text(file_list, filelist + "\n")
    return file_list


KIND_NAMES = {"folder": "image folder", "table": "CSV/TSV table", "tar": "tar shard", "parquet": "parquet file"}


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Workers:
    """Worker processes for `map`, started on first use: a job with one shard or one part never
    pays their start-up. They leave Ctrl-C to the parent, which stops them all on leaving the
    with-block. spawn, not fork: the parent may hold pyarrow's thread pools, which a fork can deadlock."""

    def __init__(self, processes: int):
        self.processes = processes
        self.pool = None

    def map(self, fn, items: Sequence, ordered: bool = True, min_items: int = 2) -> Iterator:
        """fn over items, in item order (or as finished); in this process with 0 workers or fewer than min_items."""
        if self.processes <= 0 or len(items) < min_items:
            return map(fn, items)
        if self.pool is None:
            self.pool = multiprocessing.get_context("spawn").Pool(self.processes, initializer=_ignore_sigint)
        return self.pool.imap(fn, items) if ordered else self.pool.imap_unordered(fn, items)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ldm.prepare", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Turn image folders, webdataset .tar shards, parquet shards or CSV/TSV tables into the\n"
                                            "seed's parts, a filelist and DIR/train.filelist.list. Re-running on the same DIR resumes.",
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="An image folder (searched recursively; captions in same-named .txt files or metadata.jsonl with "
                        "file_name and text), webdataset .tar shards (KEY.jpg|png|webp with KEY.txt or KEY.json), img2dataset "
                        "parquet shards, a .csv/.tsv of image paths and captions, or a folder of img2dataset output.")
    p.add_argument("--output_dir", required=True, metavar="DIR", help="Where part-NNNNN.gz, parts.filelist and train.filelist.list go; re-running on it resumes.")
    p.add_argument("--records_per_part", type=int, metavar="N", default=1000, help="Input records per part (skipped ones leave their part shorter).")
    p.add_argument("--min_side", type=int, metavar="PX", default=0, help="Skip images whose shorter side is below this many pixels (set it to your --resolution).")
    p.add_argument("--max_side", type=int, metavar="PX", default=0,
                   help="Downscale images whose shorter side is above this many pixels to that shorter side, re-encoded in their "
                        "own format (JPEG stays JPEG); training crops from the shorter side, so keep it >= --resolution. 0 keeps every image as it is.")
    p.add_argument("--image_column", default=None, metavar="NAME", help="Image column of parquet (default jpg) or CSV/TSV files (default: the first of file_name, image, image_path, path, filepath, filename).")
    p.add_argument("--caption_column", default=None, metavar="NAME", help="Caption column or field of parquet (default caption), CSV/TSV, metadata.jsonl and tar .json files (default: caption, else text).")
    p.add_argument("--num_workers", type=int, metavar="K", default=default_workers(), help="Processes writing parts in parallel (0: this process); default: one per CPU core.")
    args = p.parse_args(argv)
    if args.records_per_part < 1:
        p.error("--records_per_part must be >= 1")
    if args.max_side and args.max_side < args.min_side:
        p.error(f"--max_side {args.max_side} is below --min_side {args.min_side}: every image would be skipped")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # The same worker processes scan the shards and write the parts (0 workers: this process).
    with Workers(args.num_workers) as workers:
        return prepare(args, workers)


def prepare(args, workers: Workers) -> int:
    from tqdm import tqdm

    t0 = time.time()
    output_dir = args.output_dir.rstrip("/") if is_remote(args.output_dir) else os.path.abspath(args.output_dir)
    # Scan the sources and number their records:
    try:
        sources = resolve_sources(args.sources, args.image_column, args.caption_column, workers)
        if not is_remote(output_dir):
            os.makedirs(os.path.join(output_dir, "counts"), exist_ok=True)
        resumed = check_manifest(output_dir, manifest(sources, args))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted while reading the sources; nothing written", file=sys.stderr)
        return 130
    kinds = Counter(s.kind for s in sources)
    total = sum(s.records for s in sources)
    print(f"sources: {', '.join(plural(n, KIND_NAMES[k]) for k, n in kinds.items())}; {total} input records", file=sys.stderr)
    write_text(os.path.join(output_dir, "prepare.json"), json.dumps(manifest(sources, args), indent=1))

    # Plan the parts; keep the complete ones, clear what an interrupted run left half-written:
    tasks = plan_parts(sources, args.records_per_part, output_dir, args.min_side, args.max_side)
    for stale in glob.glob(os.path.join(output_dir, "part-*.gz.tmp.*")) + glob.glob(os.path.join(output_dir, "counts", "*.tmp")):
        os.remove(stale)
    done = complete_remote_tasks(tasks) if is_remote(output_dir) else {t.index for t in tasks if is_complete(t)}
    pending = [t for t in tasks if t.index not in done]
    if resumed:
        print(f"resuming: {len(tasks) - len(pending)} of {len(tasks)} parts already complete", file=sys.stderr)

    # Write the pending parts (their counts come back from the workers, not read back from DIR):
    counts = {}
    index_of = {os.path.basename(t.path): t.index for t in pending}
    bar = tqdm(total=sum(t.records for t in pending), unit="rec", desc="prepare", file=sys.stderr, dynamic_ncols=True)
    try:
        for c in workers.map(write_part, pending, ordered=False):
            counts[index_of[c["part"]]] = c
            bar.update(c["records"])
    except KeyboardInterrupt:
        bar.close()
        print("interrupted: complete parts are kept; run the same command again to finish", file=sys.stderr)
        return 130
    bar.close()

    # Lists and summary, over every part (this run's and earlier runs'):
    counts.update(read_counts([t for t in tasks if t.index not in counts]))
    counts = {t.index: counts[t.index] for t in tasks}  # in part order
    skips = Counter()
    for s in sources:
        skips.update(s.skips)
    for c in counts.values():
        skips.update(c["skipped"])
    written = sum(c["written"] for c in counts.values())
    summary = {"written": written, "skipped": {r: skips[r] for r in PREPARE_SKIPS if skips[r]}, "parts": len(tasks),
               "parts_reused": len(tasks) - len(pending), "seconds": round(time.time() - t0, 1)}
    if written == 0:
        print(json.dumps(summary), file=sys.stderr)
        print(f"error: no record was written (see the skip counts above); nothing to train on in {output_dir}", file=sys.stderr)
        return 1
    file_list = write_lists(output_dir, tasks, counts)
    print(json.dumps(summary))
    print(f"wrote {plural(written, 'record')} to {plural(len([c for c in counts.values() if c['written']]), 'part')}; train with --file_list {file_list}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
