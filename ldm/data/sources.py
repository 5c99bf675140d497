"""The inputs of python -m ldm.prepare, by kind: image folders (.txt captions or metadata.jsonl),
CSV/TSV tables, webdataset .tar shards and img2dataset parquet files; each scanned into a
numbered sequence of records and read back by record range.
"""
import csv
import json
import os
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple


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
