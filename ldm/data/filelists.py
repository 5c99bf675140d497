"""The lists (--file_list, filelists, parts), the data-order fingerprint, how parts are cut into
units and dealt to shards, and reading a part's lines.
"""
import hashlib
import io
import math
import os
import stat
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence, Tuple, Iterable

import numpy as np
from isal import igzip, isal_zlib

from ldm.data.records import Skip, SkipCounter
from ldm.data.storage import PartMissing, PartUnreadable, is_remote, open_remote_part, read_text, remote_sizes


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
    """part_size of each part; remote ones from their store's listing (ldm.data.storage.remote_sizes)."""
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
    for line in _list_lines(file_list):  # a remote list that cannot be read: ldm.data.storage.StorageError, a ValueError
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
    """open_part for s3:// and http(s):// parts (streamed by ldm.data.storage: read ahead, resumed after a cut)."""
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
            # A remote part whose downloads kept failing (ldm.data.storage retried them): as a truncated
            # part, records already yielded stand and the rest of it is lost, counted once.
            count("unreadable_part", line_no, f"{e} (after line {line_no})", n)
            return
        except (EOFError, OSError, zlib.error, isal_zlib.error) as e:
            # Records already yielded stand; the rest of this part is lost and counted once.
            count("truncated_part", line_no, f"{type(e).__name__}: {e} (after line {line_no})", n)
            return
        if line_no == 0:
            count("empty_part", 0, "no lines", 0)


def read_lines(wanted: Iterable[Tuple[str, int]]) -> Dict[Tuple[str, int], bytes]:
    """Raw lines by (part, line number), each part read once (how a resumed worker refills its carry)."""
    by_part: Dict[str, set] = {}
    for part, line in wanted:
        by_part.setdefault(part, set()).add(int(line))
    found = {}
    for part, lines in by_part.items():
        try:
            f = open_part(part)
        except Skip:
            continue
        with f:
            last = max(lines)
            try:
                for n, raw in enumerate(f, start=1):
                    if n in lines:
                        found[(part, n)] = raw
                    if n >= last:
                        break
            except (PartUnreadable, EOFError, OSError, zlib.error, isal_zlib.error):
                pass  # unreadable or cut short since: the lines not found are skipped and counted by the caller
    return found
