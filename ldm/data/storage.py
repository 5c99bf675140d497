"""Data in object storage: `s3://bucket/key` and `http(s)://` paths beside local ones (SPEC section 2).

Everything remote goes through fsspec (s3fs for S3). Credentials and the endpoint come from the
standard AWS environment and config files (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE,
~/.aws/config, AWS_ENDPOINT_URL for an S3-compatible store such as MinIO, Ceph or BOS); this module
never reads, logs or stores them, and the errors it words name only the path.

How a remote part is read (streaming, not copying):
    * `RemoteReader` fetches the object READ_BLOCK bytes at a time (one ranged GET each) in a
      background thread, at most READ_AHEAD_BLOCKS ahead of the consumer: decompression of one
      block overlaps the download of the next, and memory stays bounded per open part;
    * a dropped connection is retried with capped exponential backoff and re-opened at the byte
      the consumer had reached (an HTTP Range request). The reader sits below the gzip decoder, so
      the decoder never notices: the same lines follow, each once, and a cut costs one block
      re-fetched at most (plus the backoff). A part that still fails after RETRIES is given up:
      `PartUnreadable`, counted by ldm.data.filelists as `unreadable_part` (records read before stand);
    * `prefetch_parts` starts the reads of the next group of parts while the current one is read;
    * with `--cache_dir` (`use_part_cache`) a part is instead downloaded once whole into a bounded
      LRU cache directory shared by the node's processes, and read from there.

This module belongs to the data layer: it imports nothing of ldm's models or training.
"""
import collections
import fcntl
import hashlib
import io
import os
import queue
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

REMOTE_PREFIXES = ("s3://", "http://", "https://")

# Bytes of one ranged GET in steady state. 4 MiB: large enough that request latency (~10-50 ms on
# S3) is small against transfer time, small enough that a cut re-fetches little (half a block on
# average). A part's first GET is FIRST_BLOCK and each next one twice the last, up to READ_BLOCK,
# so its first lines are there after one small request, not after 4 MiB.
READ_BLOCK = 4 << 20
FIRST_BLOCK = 256 << 10
# Blocks fetched ahead of the consumer per open part: memory per open part is at most
# READ_AHEAD_BLOCKS * READ_BLOCK (8 MiB). A worker reads --parts_per_window parts side by side and
# prefetches as many more, so 4 + 4 parts = 64 MiB per data worker at most.
READ_AHEAD_BLOCKS = 2
# Parts whose reads may be started ahead of use (prefetch_parts); older ones are closed.
MAX_PREFETCHED = 8
# Attempts after a failed read of one block before the part is given up (unreadable_part). With
# the backoff below, a part survives an outage of up to ~1 min (0.5+1+2+4+8+16+30 s) per cut.
RETRIES = 7
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
# Concurrent metadata requests where a store has no listing (HTTP: one HEAD per part).
METADATA_THREADS = 32
# A --cache_dir download not written to for this long belongs to a process that was killed.
ORPHAN_AGE_S = 600


def log(message: str) -> None:
    print(f"[ldm.data.storage] {message}", file=sys.stderr, flush=True)


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_PREFIXES)


class StorageError(ValueError):
    """A remote list or bucket that cannot be read at start-up: one line that says what to fix."""


class PartUnreadable(Exception):
    """A remote part whose reads kept failing after the retries (not an OSError on purpose: a
    truncated gzip stream is another reason, `truncated_part`)."""


class PartMissing(Exception):
    """A remote part that does not exist, or is not an object (ldm.data.filelists: `missing_part`)."""


# ---------------------------------------------------------------------------
# File systems, one per protocol and process
# ---------------------------------------------------------------------------

_filesystems: Dict[str, object] = {}


def _after_fork_in_child() -> None:
    """A forked data worker inherits fsspec's event loop without its thread: every call would wait
    for it forever. Start afresh (fsspec's own advice: reset_lock "on the init of a forked process")."""
    import fsspec.asyn

    fsspec.asyn.reset_lock()
    _filesystems.clear()
    _prefetched.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def filesystem(path: str):
    """(fsspec file system, path as it understands it) for a remote path."""
    import fsspec

    protocol = path.split("://", 1)[0]
    fs = _filesystems.get(protocol)
    if fs is None:
        if protocol == "s3":
            # Our own instance: s3fs would otherwise retry a cut read 5 times silently; we retry
            # (RemoteReader, with_retries) so that every retry is logged with its key.
            fs = fsspec.filesystem("s3", skip_instance_cache=True)
            fs.retries = 1
        else:
            fs = fsspec.filesystem(protocol)
        _filesystems[protocol] = fs
    return fs, fs._strip_protocol(path) if protocol == "s3" else path


def with_retries(what: str, call):
    """call() retried like a part's block reads (transient errors only; a missing object or a denied
    access is not transient and is raised at once)."""
    for attempt in range(RETRIES + 1):
        try:
            return call()
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except Exception as e:  # a dropped connection shows as many types (aiohttp, botocore, socket)
            if attempt == RETRIES:
                raise
            wait = backoff(attempt + 1)
            log(f"retry {attempt + 1}/{RETRIES} of {what} in {wait:.1f} s: {type(e).__name__}: {e}")
            time.sleep(wait)


def backoff(failures: int) -> float:
    return min(BACKOFF_FIRST_S * 2 ** (failures - 1), BACKOFF_MAX_S)


def endpoint() -> str:
    """The S3 endpoint in use, for messages: AWS_ENDPOINT_URL without any user:password@ in it."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return url.split("://", 1)[0] + "://" + url.split("://", 1)[-1].rsplit("@", 1)[-1] if url else "AWS default"


def access_problem(path: str, error: Exception) -> str:
    """One line naming what is wrong with a remote path (never a credential)."""
    text = str(error)
    if isinstance(error, PermissionError) or "AccessDenied" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return (f"{path}: access denied by the object store ({type(error).__name__}); check the credentials "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws) and the bucket's policy")
    if "NoSuchBucket" in text or "bucket does not exist" in text:
        return f"{path}: bucket {path.split('/')[2]!r} does not exist (endpoint: {endpoint()})"
    if isinstance(error, FileNotFoundError):
        return f"{path}: no such object"
    return f"{path}: cannot read from the object store: {type(error).__name__}: {text.splitlines()[0] if text else ''}"


# ---------------------------------------------------------------------------
# Lists and sizes
# ---------------------------------------------------------------------------


def read_text(path: str) -> str:
    """A small remote text file (a filelist or file list list) whole; StorageError if it cannot be read."""
    fs, p = filesystem(path)
    try:
        return with_retries(f"reading {path}", lambda: fs.cat_file(p)).decode("utf-8")
    except Exception as e:
        raise StorageError(access_problem(path, e)) from None


def remote_sizes(paths: Sequence[str]) -> List[int]:
    """Bytes of each remote part, -1 for one that does not exist. S3: one listing per directory
    (a page of 1,000 keys per request: 60,000 parts in one prefix are 60 requests, not 60,000
    HEADs); HTTP has no listing: one HEAD per part, METADATA_THREADS at a time."""
    sizes = {}
    by_dir = collections.defaultdict(list)
    for path in paths:
        by_dir[path.rsplit("/", 1)[0]].append(path)
    for directory, members in by_dir.items():
        if directory.startswith("s3://"):
            fs, p = filesystem(directory)
            try:
                listing = with_retries(f"listing {directory}", lambda: fs.ls(p, detail=True, refresh=True))
            except FileNotFoundError:
                listing = []
            except Exception as e:
                raise StorageError(access_problem(directory, e)) from None
            found = {"s3://" + o["name"]: int(o["size"]) for o in listing if o.get("type") == "file"}
            sizes.update({m: found.get(m, -1) for m in members})
        else:
            with ThreadPoolExecutor(METADATA_THREADS) as pool:
                sizes.update(zip(members, pool.map(_http_size, members)))
    return [sizes[p] for p in paths]


def _http_size(path: str) -> int:
    fs, p = filesystem(path)
    try:
        # A server that sends no Content-Length: there, size unknown (0 in the fingerprint), not missing.
        return int(with_retries(f"HEAD {path}", lambda: fs.info(p)).get("size") or 0)
    except (FileNotFoundError, PermissionError):
        return -1


def check_access(path: str) -> None:
    """Stop at start-up with one line if a remote path's bucket is missing or its access denied."""
    fs, p = filesystem(path)
    try:
        with_retries(f"checking {path}", lambda: fs.info(p))
    except Exception as e:
        raise StorageError(access_problem(path, e)) from None


# ---------------------------------------------------------------------------
# Reading a part: a bounded read-ahead that resumes at the byte reached
# ---------------------------------------------------------------------------


class RemoteReader(io.RawIOBase):
    """The bytes of one remote object, fetched ahead in a background thread (see the module doc)."""

    def __init__(self, path: str):
        self.path = path
        self._blocks = queue.Queue(maxsize=READ_AHEAD_BLOCKS)
        self._pending = memoryview(b"")
        self._stop = threading.Event()
        self._ended = False
        self.retries = 0  # reads retried so far (for the benchmark and tests)
        self._thread = threading.Thread(target=self._fetch, name=f"read {path}", daemon=True)
        self._thread.start()

    def readable(self) -> bool:
        return True

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._blocks.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _fetch(self) -> None:
        fs, p = filesystem(self.path)
        offset, failures, f, size = 0, 0, None, None
        block = min(FIRST_BLOCK, READ_BLOCK)
        streaming = False  # a web server without byte ranges: one GET from the start, read in order
        try:
            while not self._stop.is_set():
                try:
                    if f is None:
                        f, size = self._open(fs, p, offset, size, streaming)
                    if size is not None and offset >= size:
                        self._put(b"")
                        return
                    data = f.read(block if size is None else min(block, size - offset))
                    if not data:
                        if size is None:
                            self._put(b"")
                            return
                        raise ConnectionError(f"the object ended at byte {offset} of {size}")
                except (FileNotFoundError, PermissionError, IsADirectoryError, PartUnreadable) as e:
                    self._put(e)  # not transient: said once, by the consumer
                    return
                except Exception as e:  # a dropped connection shows as many types (aiohttp, botocore, socket)
                    if isinstance(e, ValueError) and "range requests" in str(e) and not streaming:
                        # fsspec's HTTP file: "The HTTP server doesn't appear to support range requests".
                        # Read it as one stream instead; a retry then fetches again up to the byte reached.
                        streaming, f = True, _close_quietly(f)
                        continue
                    failures += 1
                    self.retries += 1
                    f = _close_quietly(f)
                    if failures > RETRIES:
                        self._put(PartUnreadable(f"{failures - 1} retries failed at byte {offset}: {type(e).__name__}: {e}"))
                        return
                    wait = backoff(failures)
                    log(f"retry {failures}/{RETRIES} of {self.path} at byte {offset} in {wait:.1f} s: {type(e).__name__}: {e}")
                    if self._stop.wait(wait):
                        return
                    continue
                failures = 0
                offset += len(data)
                block = min(2 * block, READ_BLOCK)
                if not self._put(data):
                    return
        finally:
            _close_quietly(f)

    @staticmethod
    def _open(fs, p: str, offset: int, size: Optional[int], streaming: bool):
        """(the object opened at byte `offset`, its size): a ranged read where the store allows it."""
        if not streaming:
            f = fs.open(p, "rb", block_size=READ_BLOCK, cache_type="none")
            if size is not None and f.size != size:
                raise PartUnreadable(f"the object changed while it was read ({size} -> {f.size} bytes)")
            f.seek(offset)
            return f, f.size
        f = fs.open(p, "rb", block_size=0)
        left = offset
        while left:
            skipped = f.read(min(left, READ_BLOCK))
            if not skipped:
                raise ConnectionError(f"the stream ended at byte {offset - left}, before byte {offset} reached earlier")
            left -= len(skipped)
        return f, size

    def _fill(self) -> None:
        """Wait for the next block unless one is pending (or the object ended)."""
        if not self._pending and not self._ended:
            item = self._blocks.get()
            if isinstance(item, (FileNotFoundError, PermissionError, IsADirectoryError)):
                self._ended = True
                raise PartMissing(access_problem(self.path, item))
            if isinstance(item, Exception):
                self._ended = True
                raise item if isinstance(item, PartUnreadable) else PartUnreadable(str(item))
            if not item:
                self._ended = True
            self._pending = memoryview(item)

    def peek(self, n: int) -> bytes:
        """The next bytes without consuming them (at most one block's; empty at the end)."""
        self._fill()
        return bytes(self._pending[:n])

    def readinto(self, buffer) -> int:
        # As much as one block holds, not more: the gzip reader gets each block as it arrives
        # (a blocking read of its 128 KiB would hold back lines a later failed block never frees).
        self._fill()
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._stop.set()
        super().close()


def _close_quietly(f):
    if f is not None:
        try:
            f.close()
        except Exception:
            pass
    return None


_prefetched: "collections.OrderedDict[str, object]" = collections.OrderedDict()


def open_remote_part(path: str):
    """A remote part as a binary file with `peek` (a RemoteReader; wrap it in io.BufferedReader to
    read lines), or the local copy in the LRU cache when --cache_dir is set. A read that keeps
    failing raises PartUnreadable, a missing object PartMissing (at the first read)."""
    if _cache.directory:
        return open(_cache.local_copy(path), "rb")
    reader = _prefetched.pop(path, None)
    return reader if reader is not None else RemoteReader(path)


def prefetch_parts(paths: Sequence[str]) -> None:
    """Start reading the remote parts among `paths` (the next group a shard will read) in the
    background, so their first blocks are there when the current group ends. Bounded: at most
    MAX_PREFETCHED parts, each READ_AHEAD_BLOCKS blocks; the oldest are closed beyond that."""
    for path in paths:
        if not is_remote(path) or path in _prefetched:
            continue
        if _cache.directory:
            threading.Thread(target=_cache.prefetch, args=(path,), daemon=True).start()
            continue
        _prefetched[path] = RemoteReader(path)
        while len(_prefetched) > MAX_PREFETCHED:
            _prefetched.popitem(last=False)[1].close()


# ---------------------------------------------------------------------------
# The LRU cache of whole parts (--cache_dir)
# ---------------------------------------------------------------------------


class PartCache:
    """Whole remote parts kept in a local directory, least recently used first out once they pass
    `max_bytes`. The node's processes share it: a part appears only complete (written to a
    temporary name, then renamed), a hit touches its time, and a part evicted while another process
    reads it stays readable there until closed (POSIX unlink). A part is downloaded once however
    many ask for it at a time (the prefetch thread and the reader that catches up with it, or two
    processes): the download holds an flock on the part's lock file, and whoever waited on it finds
    the part there."""

    def __init__(self):
        self.directory: Optional[str] = None
        self.max_bytes = 0
        self._lock = threading.Lock()

    def configure(self, directory: Optional[str], max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        if directory:
            os.makedirs(directory, exist_ok=True)
            self.remove_orphans()

    def remove_orphans(self) -> None:
        """Delete the half-downloaded parts of processes killed mid-download (a preempted run leaves
        one per reading process, as large as a part, outside the bound and never read): temporary
        files not written to for ORPHAN_AGE_S. A live download writes every few seconds (its
        longest pauses: a retry's backoff, 30 s, and a read timeout), so it is never taken for one."""
        now = time.time()
        for name in os.listdir(self.directory):
            if not name.startswith(".part-"):
                continue
            full = os.path.join(self.directory, name)
            try:
                if now - os.stat(full).st_mtime > ORPHAN_AGE_S:
                    os.unlink(full)
                    log(f"--cache_dir: removed {name}, left half-downloaded by a process that stopped")
            except FileNotFoundError:
                pass  # finished or removed by another process meanwhile

    def path_for(self, path: str) -> str:
        return os.path.join(self.directory, hashlib.sha1(path.encode()).hexdigest()[:16] + "-" + path.rsplit("/", 1)[-1])

    def local_copy(self, path: str) -> str:
        local = self.path_for(path)
        if self._hit(local):
            return local
        lock = os.path.join(self.directory, ".lock-" + os.path.basename(local))
        with open(lock, "a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # released when closed, also if this process dies
            if self._hit(local):  # downloaded while we waited
                return local
            try:
                self._download(path, local)
            finally:
                # The downloader removes the lock file (one per part would pile up over a long
                # run); whoever still waits on it then finds the part (after a failure: tries itself).
                try:
                    os.unlink(lock)
                except FileNotFoundError:
                    pass
        self.evict(keep=local)
        return local

    def prefetch(self, path: str) -> None:
        """local_copy in a background thread: a part that cannot be fetched is left to the reader,
        which counts it (no traceback from the thread)."""
        try:
            self.local_copy(path)
        except Exception:
            pass

    @staticmethod
    def _hit(local: str) -> bool:
        try:
            os.utime(local)  # most recently used
            return True
        except FileNotFoundError:
            return False

    def _download(self, path: str, local: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out, io.BufferedReader(RemoteReader(path)) as src:
                while True:
                    block = src.read(READ_BLOCK)
                    if not block:
                        break
                    out.write(block)
            os.replace(tmp, local)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def evict(self, keep: str) -> None:
        """Remove least recently used parts until the cache holds at most max_bytes (the part just
        added stays, even alone over the bound)."""
        with self._lock:
            entries = []
            for name in os.listdir(self.directory):
                if name.startswith("."):  # a download in progress (.part-*) or a lock file (.lock-*)
                    continue
                full = os.path.join(self.directory, name)
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue  # evicted by another process
                entries.append((st.st_mtime, st.st_size, full))
            total = sum(size for _, size, _ in entries)
            for _, size, full in sorted(entries):
                if total <= self.max_bytes:
                    break
                if full == keep:
                    continue
                try:
                    os.unlink(full)
                except FileNotFoundError:
                    pass
                total -= size


_cache = PartCache()


def use_part_cache(directory: Optional[str], max_gb: float) -> None:
    """--cache_dir / --cache_size_gb: read remote parts from a local LRU cache of whole parts."""
    _cache.configure(directory, int(max_gb * (1 << 30)))


# ---------------------------------------------------------------------------
# Writing (ldm.prepare and other tools with a remote --output_dir)
# ---------------------------------------------------------------------------


def upload(local: str, path: str) -> None:
    """Copy a complete local file to a remote path. An S3 object appears only when its upload
    completes (PUT or multipart complete), so a reader never sees half a part."""
    fs, p = filesystem(path)
    with_retries(f"uploading {path}", lambda: fs.put_file(local, p))


def remote_exists(path: str) -> bool:
    fs, p = filesystem(path)
    return bool(with_retries(f"checking {path}", lambda: fs.exists(p)))


def write_text(path: str, text: str) -> None:
    """A small text file (a filelist, a summary), local or remote, written whole."""
    if not is_remote(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return
    fs, p = filesystem(path)
    with_retries(f"writing {path}", lambda: fs.pipe_file(p, text.encode("utf-8")))
