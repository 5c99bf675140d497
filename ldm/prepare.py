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
import csv
import glob
import io
import json
import multiprocessing
import os
import signal
import sys
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from isal import igzip
from PIL import ExifTags, Image, ImageOps

from ldm.data import Skip, looks_cut, open_image, to_rgb
from ldm.storage import is_remote, read_text, remote_sizes, upload, write_text

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

# Why a record (or a whole source file) was not written.
PREPARE_SKIPS = (
    "no_caption",  # no .txt / metadata / caption field, or a caption that is empty after cleaning
    "no_image",  # a tar sample or table row without an image
    "missing_image",  # an image path (folder, CSV) that cannot be read
    "undecodable_image",
    "truncated_image",  # the image's bytes end early (Pillow: "image file is truncated")
    "too_small",  # shorter side below --min_side
    "too_many_pixels",  # over Pillow's decompression-bomb limit
    "unreadable_member",  # a tar member or parquet rows that cannot be read (lost records counted each)
    "truncated_shard",  # a tar shard that ends mid-way (the records after the cut are unknown; counted once)
    "unreadable_source",  # a tar/parquet/CSV file that cannot be opened at all (counted once)
)

CAPTION_FIELDS = ("caption", "text")  # default caption column of tables, tar .json and metadata.jsonl
IMAGE_FIELDS = ("file_name", "image", "image_path", "path", "filepath", "filename")  # default image column of tables
JPEG_QUALITY = 95  # for re-encoded (downscaled) JPEGs; img2dataset's default too


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
# Sources: what was given, scanned into a numbered sequence of input records
# ---------------------------------------------------------------------------


@dataclass
class Source:
    """One input file (or one image folder) and how many input records it holds.

    Folders and tables are listed up front (`items`: (image path, caption or None for a
    sidecar .txt)); tar and parquet files are read by record range in the workers.
    """

    kind: str  # "folder", "table", "tar", "parquet"
    path: str
    records: int = 0
    items: Optional[List[Tuple[Optional[str], Optional[str]]]] = None
    image_column: Optional[str] = None
    caption_column: Optional[str] = None
    skips: Counter = field(default_factory=Counter)  # found while scanning (unreadable or truncated files)

    def describe(self) -> dict:
        size = os.path.getsize(self.path) if os.path.isfile(self.path) else None
        return {"kind": self.kind, "path": self.path, "records": self.records, "bytes": size}


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower().lstrip(".")


def _walk(root: str) -> List[str]:
    """Every file under root, in sorted path order (os.walk's order is not stable). Symlinked
    folders are followed, but each real folder is read once: a link to a parent folder (a loop)
    would otherwise repeat every image ~40 times, until the OS refuses the path (ELOOP)."""
    found, seen = [], set()
    for d, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(d)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []  # a folder reached again through a link: neither its files nor its subfolders
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()  # the first path to a folder reached twice is the same every run
        found += [os.path.join(d, f) for f in files]
    return sorted(found)


def read_metadata(files: Sequence[str], caption_column: Optional[str], skips: Counter) -> Dict[str, str]:
    """Captions from the folder's metadata.jsonl files (Hugging Face imagefolder: `file_name`
    relative to the metadata file's directory, caption in `text`)."""
    captions = {}
    for meta in files:
        base = os.path.dirname(meta)
        with open(meta, "r", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    name = row["file_name"]
                    text = row[caption_column] if caption_column else next(row[k] for k in CAPTION_FIELDS if k in row)
                except (ValueError, KeyError, StopIteration, TypeError):
                    skips["no_caption"] += 1  # a line naming no image or no caption
                    continue
                captions[os.path.normpath(os.path.join(base, name))] = text
    return captions


def scan_folder(root: str, files: List[str], caption_column: Optional[str]) -> Source:
    source = Source("folder", root)
    metadata = [f for f in files if os.path.basename(f) == "metadata.jsonl"]
    captions = read_metadata(metadata, caption_column, source.skips)
    # A caption from metadata.jsonl wins; otherwise the worker reads the image's sidecar .txt.
    source.items = [(p, captions.get(os.path.normpath(p))) for p in files if _ext(p) in IMAGE_EXTENSIONS]
    source.records = len(source.items)
    return source


def scan_table(path: str, image_column: Optional[str], caption_column: Optional[str]) -> Source:
    """A .csv/.tsv with a header row; image paths relative to the table's own directory."""
    source = Source("table", path)
    base = os.path.dirname(os.path.abspath(path))
    with open(path, "r", encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if _ext(path) == "tsv" else ",")
        columns = reader.fieldnames or []
        image_col = image_column or next((c for c in IMAGE_FIELDS if c in columns), None)
        caption_col = caption_column or next((c for c in CAPTION_FIELDS if c in columns), None)
        if image_col not in columns or caption_col not in columns:
            raise ValueError(f"{path}: needs an image path column and a caption column in its header row, has {columns}; "
                             f"pass --image_column and --caption_column (defaults: one of {IMAGE_FIELDS}, one of {CAPTION_FIELDS})")
        source.items = []
        for row in reader:
            image = (row.get(image_col) or "").strip()
            if image.startswith(("http://", "https://")):
                raise ValueError(f"{path}: column {image_col!r} holds URLs ({image[:60]}); fetch the images first "
                                 f"(img2dataset, see the README's 'Preparing data') and prepare its output")
            source.items.append((os.path.join(base, image) if image else None, row.get(caption_col) or ""))
    source.records = len(source.items)
    return source


def tar_samples(tar: tarfile.TarFile) -> Iterator[Tuple[str, Dict[str, tarfile.TarInfo]]]:
    """webdataset samples: consecutive members sharing a key (path up to the basename's first
    dot), as (key, {extension: member}). Raises tarfile.ReadError where the shard is cut or
    garbled, after the samples before that point."""
    key, members = None, {}
    while True:
        try:
            member = tar.next()
        except (tarfile.ReadError, EOFError, OSError):
            if key is not None:
                yield key, members
            raise tarfile.ReadError("shard ends mid-way")
        if member is None:
            # tarfile ends quietly at a cut or garbled header; a complete shard ends with a zero block.
            tar.fileobj.seek(tar.offset)
            if tar.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
                if key is not None:
                    yield key, members
                raise tarfile.ReadError("shard ends mid-way")
            break
        if not member.isfile():
            continue
        directory, name = os.path.split(member.name)
        stem, dot, ext = name.partition(".")
        if not dot:
            continue
        k = os.path.join(directory, stem)
        if k != key:
            if key is not None:
                yield key, members
            key, members = k, {}
        members[ext.lower()] = member
    if key is not None:
        yield key, members


def scan_tar(path: str) -> Source:
    source = Source("tar", path)
    try:
        with tarfile.open(path, "r:*") as tar:
            try:
                for _ in tar_samples(tar):
                    source.records += 1
            except tarfile.ReadError:
                source.skips["truncated_shard"] += 1
                print(f"warning: {path}: the shard ends mid-way; {source.records} samples before the cut are kept", file=sys.stderr)
    except (tarfile.TarError, OSError) as e:
        source.skips["unreadable_source"] += 1
        print(f"warning: {path}: not a readable tar ({e}); skipped", file=sys.stderr)
    return source


def scan_parquet(path: str, image_column: Optional[str], caption_column: Optional[str]) -> Source:
    import pyarrow.parquet as pq

    source = Source("parquet", path, image_column=image_column or "jpg", caption_column=caption_column or "caption")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a file it cannot read
        source.skips["unreadable_source"] += 1
        print(f"warning: {path}: not a readable parquet file ({e}); skipped", file=sys.stderr)
        return source
    columns = pf.schema_arrow.names
    for flag, col in (("--image_column", source.image_column), ("--caption_column", source.caption_column)):
        if col not in columns:
            raise ValueError(f"{path}: no column {col!r} (columns: {columns}); pass {flag}. (img2dataset's webdataset "
                             f"output also writes .parquet files of metadata only: prepare its .tar shards instead)")
    source.records = pf.metadata.num_rows
    return source


def scan_shard(shard: tuple) -> Source:
    kind, path, image_column, caption_column = shard
    return scan_tar(path) if kind == "tar" else scan_parquet(path, image_column, caption_column)


def resolve_sources(paths: Sequence[str], image_column: Optional[str], caption_column: Optional[str], workers: Optional["Workers"] = None) -> List[Source]:
    """Recognise each SOURCE by what it is and scan it; raise ValueError with one line on anything unusable.
    Tar headers and parquet metadata of many shards are scanned by the worker processes."""
    found: list = []  # Source, or a shard (kind, path, ...) still to scan
    for given in paths:
        path = os.path.abspath(given)
        if os.path.isdir(path):
            files = _walk(path)
            tars = [f for f in files if f.endswith((".tar", ".tar.gz", ".tgz"))]
            images = [f for f in files if _ext(f) in IMAGE_EXTENSIONS]
            parquets = [f for f in files if _ext(f) == "parquet"]
            # img2dataset's output folders: webdataset (.tar shards, plus metadata-only .parquet),
            # files (images with .txt/.json beside them), parquet (.parquet with the image bytes).
            if tars:
                found += [("tar", f, image_column, caption_column) for f in tars]
            elif images:
                found.append(scan_folder(path, files, caption_column))
            elif parquets:
                found += [("parquet", f, image_column, caption_column) for f in parquets]
            else:
                raise ValueError(f"{given}: a folder with no images ({', '.join(IMAGE_EXTENSIONS)}), .tar or .parquet files in it")
        elif os.path.isfile(path):
            if path.endswith((".tar", ".tar.gz", ".tgz")):
                found.append(("tar", path, image_column, caption_column))
            elif _ext(path) == "parquet":
                found.append(("parquet", path, image_column, caption_column))
            elif _ext(path) in ("csv", "tsv"):
                found.append(scan_table(path, image_column, caption_column))
            else:
                raise ValueError(f"{given}: not a folder, .tar, .parquet, .csv or .tsv")
        else:
            raise ValueError(f"{given}: no such file or folder")
    shards = [f for f in found if isinstance(f, tuple)]
    # A shard's scan takes well under a second (~20 us a tar member): worker start-up pays off only for many.
    scanned = (workers or Workers(0)).map(scan_shard, shards, min_items=8)
    sources = [next(scanned) if isinstance(f, tuple) else f for f in found]
    seen = set()
    for s in sources:
        if s.path in seen:
            raise ValueError(f"{s.path} is given twice (its records would be written twice)")
        seen.add(s.path)
    return sources


# ---------------------------------------------------------------------------
# Reading a range of a source's records: (caption, image bytes, skip reason) each
# ---------------------------------------------------------------------------

Record = Tuple[Optional[str], Optional[bytes], Optional[str]]


def read_items(items: Sequence[Tuple[Optional[str], Optional[str]]]) -> Iterator[Record]:
    for image_path, caption in items:
        if image_path is None:
            yield None, None, "no_image"
            continue
        if caption is None:  # a folder image without metadata: its sidecar .txt
            try:
                with open(os.path.splitext(image_path)[0] + ".txt", "r", encoding="utf-8", errors="replace") as f:
                    caption = f.read()
            except OSError:
                yield None, None, "no_caption"
                continue
        try:
            with open(image_path, "rb") as f:
                data = f.read()
        except OSError:
            yield None, None, "missing_image"
            continue
        yield caption, data, None


def tar_caption(tar: tarfile.TarFile, members: Dict[str, tarfile.TarInfo], caption_column: Optional[str]) -> Optional[str]:
    if "txt" in members:
        return tar.extractfile(members["txt"]).read().decode("utf-8", errors="replace")
    if "json" in members:
        meta = json.loads(tar.extractfile(members["json"]).read())
        keys = (caption_column,) if caption_column else CAPTION_FIELDS
        return next((meta[k] for k in keys if isinstance(meta, dict) and meta.get(k) is not None), None)
    return None


def read_tar(path: str, start: int, stop: int, caption_column: Optional[str]) -> Iterator[Record]:
    with tarfile.open(path, "r:*") as tar:
        samples = tar_samples(tar)
        index = 0
        try:
            for _, members in samples:
                if index >= stop:
                    break
                index += 1
                if index <= start:
                    continue
                image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
                if image is None:
                    yield None, None, "no_image"
                    continue
                try:
                    caption = tar_caption(tar, members, caption_column)
                    data = tar.extractfile(image).read()
                except (tarfile.TarError, OSError, ValueError, EOFError):
                    yield None, None, "unreadable_member"
                    continue
                yield caption, data, (None if caption is not None else "no_caption")
        except tarfile.ReadError:
            pass  # the cut was counted once by scan_tar; records before it were read


def image_bytes(value) -> Optional[bytes]:
    """A parquet image cell: bytes (img2dataset) or a Hugging Face datasets Image struct {bytes, path}."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value or None


def read_parquet(path: str, start: int, stop: int, image_column: str, caption_column: str) -> Iterator[Record]:
    """Rows start .. stop-1, row group by row group, so a corrupt group loses (and counts) only its own rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException):
        yield from [(None, None, "unreadable_member")] * (stop - start)
        return
    first = 0  # number of the group's first row
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        lo, hi = max(start, first), min(stop, first + n)
        if lo < hi:
            row, done = first, 0
            try:
                for batch in pf.iter_batches(batch_size=256, row_groups=[g], columns=[image_column, caption_column]):
                    for image, caption in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                        if lo <= row < hi:
                            done += 1
                            yield caption, image_bytes(image), None
                        row += 1
                    if row >= hi:
                        break
            except (OSError, pa.ArrowException):  # a corrupt page or column chunk
                yield from [(None, None, "unreadable_member")] * (hi - lo - done)
        first += n


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

    # Write the pending parts:
    bar = tqdm(total=sum(t.records for t in pending), unit="rec", desc="prepare", file=sys.stderr, dynamic_ncols=True)
    try:
        for c in workers.map(write_part, pending, ordered=False):
            bar.update(c["records"])
    except KeyboardInterrupt:
        bar.close()
        print("interrupted: complete parts are kept; run the same command again to finish", file=sys.stderr)
        return 130
    bar.close()

    # Lists and summary, over every part (this run's and earlier runs'):
    counts = {}
    for t in tasks:
        counts[t.index] = read_json(counts_path(t.path))
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
