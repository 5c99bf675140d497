"""Data in object storage (issue 22): s3:// lists and parts against a real S3 API.

A moto server (S3-compatible, on 127.0.0.1) holds copies of the shapes fixture's parts; a small TCP
proxy in front of it cuts connections mid-transfer, so s3fs sees really dropped connections.
"""
import json
import logging
import os
import socket
import threading
import time

import pytest

from conftest import ldm_args, run_script
from cutting_proxy import CuttingProxy, free_port

BUCKET = "ldm-data"


@pytest.fixture(scope="session")
def s3(shapes):
    """A moto S3 server with the shapes parts under s3://ldm-data/shapes/, its filelist and file list
    list there too; the AWS environment (dummy keys, AWS_ENDPOINT_URL) points at it for this process
    and its subprocesses. {"url", "file_list" (remote), "local_file_list", "parts" {remote: local}}."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
                      AWS_DEFAULT_REGION="us-east-1")
    from ldm.data import storage

    storage._filesystems.clear()
    fs, _ = storage.filesystem("s3://x")
    fs.mkdir(BUCKET)
    local_filelist = open(shapes["file_list"]).read().split()[0]
    parts = {}
    for local in open(local_filelist).read().split():
        remote = f"s3://{BUCKET}/shapes/{os.path.basename(local)}"
        fs.put_file(local, remote[5:])
        parts[remote] = local
    fs.pipe_file(f"{BUCKET}/shapes/train.filelist", ("\n".join(parts) + "\n").encode())
    fs.pipe_file(f"{BUCKET}/shapes/train.filelist.list", f"s3://{BUCKET}/shapes/train.filelist\n".encode())
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "file_list": f"s3://{BUCKET}/shapes/train.filelist.list",
           "local_file_list": shapes["file_list"], "parts": parts}
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    storage._filesystems.clear()


@pytest.fixture
def proxy(s3, monkeypatch):
    """A cutting proxy to the S3 server, as this process's and its subprocesses' endpoint."""
    from ldm.data import storage

    cutter = CuttingProxy(s3["port"], cut_after=6000)
    monkeypatch.setenv("AWS_ENDPOINT_URL", cutter.url)
    storage._filesystems.clear()
    yield cutter
    cutter.server.close()
    storage._filesystems.clear()


def listing(stdout, parts=None):
    """The JSON lines of python -m ldm.data, remote part names mapped to the local copies."""
    rows = [json.loads(line) for line in stdout.splitlines()]
    for row in rows:
        row["part"] = (parts or {}).get(row["part"], row["part"])
    return rows


def test_remote_listing_equals_local_despite_cuts(s3, proxy):
    """python -m ldm.data over s3:// with 3 connections cut mid-transfer yields exactly the records,
    lines and order of the same parts read from disk: each once, none lost."""
    local = run_script(["-m", "ldm.data", "--file_list", s3["local_file_list"], "--resolution", "32", "--num_workers", "2"])
    assert local.returncode == 0, local.stderr[-2000:]
    proxy.cuts = 3
    t0 = time.time()
    remote = run_script(["-m", "ldm.data", "--file_list", s3["file_list"], "--resolution", "32", "--num_workers", "2"])
    assert remote.returncode == 0, remote.stderr[-2000:]
    assert proxy.cut_done == 3
    rows = listing(remote.stdout, s3["parts"])
    assert rows == listing(local.stdout) and len(rows) == 128
    retries = [line for line in remote.stderr.splitlines() if "retry" in line]
    assert retries and all("s3://" in line for line in retries), remote.stderr[-2000:]
    assert "testing" not in remote.stderr  # the (dummy) credentials are never printed
    print(f"remote listing with 3 cuts: {time.time() - t0:.1f} s; retry lines: {retries}")


def test_shard_stream_resumes_exactly_over_cut_remote_parts(s3, proxy, monkeypatch, capfd):
    """A ShardStream over remote parts, read in blocks smaller than a part and cut mid-part, stopped
    after 50 records and resumed from its state, yields the uninterrupted local order exactly."""
    from ldm.data import storage
    from ldm.data.filelists import read_file_list
    from ldm.data.shards import ShardStream

    monkeypatch.setattr(storage, "READ_BLOCK", 16 << 10)  # several blocks per part: a cut lands mid-part
    monkeypatch.setattr(storage, "FIRST_BLOCK", 16 << 10)
    local = [(os.path.basename(r.part), r.line) for r in ShardStream(read_file_list(s3["local_file_list"]), 0, 1, 3, 16, passes=1)]
    entries = read_file_list(s3["file_list"])
    assert [e.sizes for e in entries] == [[os.path.getsize(p) for p in s3["parts"].values()]]
    proxy.cut_at_match, proxy.cut_after, proxy.cuts = b"content-range: bytes 16384-", 2000, 2  # in the second block of a part
    first = ShardStream(entries, 0, 1, 3, 16, passes=1)
    it = iter(first)
    head = [next(it) for _ in range(50)]
    state = first.state.copy()
    rest = list(ShardStream(read_file_list(s3["file_list"]), 0, 1, 3, 16, state=state, passes=1))
    assert proxy.cut_done == 2
    assert [(os.path.basename(r.part), r.line) for r in head + rest] == local and len(local) == 128
    assert not first.skips
    assert "at byte 16384" in capfd.readouterr().err  # the retry re-opened the object where the reader stood


def test_part_failing_every_retry_is_skipped_and_counted(s3, proxy, monkeypatch, capfd):
    """A part whose downloads fail past its first block, every retry, is skipped as unreadable_part
    (its key in the log line): the records before stand, nothing raises, the next part reads whole."""
    from ldm.data import storage
    from ldm.data.filelists import Unit, iter_unit_lines
    from ldm.data.records import SkipCounter

    monkeypatch.setattr(storage, "RETRIES", 2)
    monkeypatch.setattr(storage, "BACKOFF_FIRST_S", 0.01)
    monkeypatch.setattr(storage, "READ_BLOCK", 16 << 10)
    monkeypatch.setattr(storage, "FIRST_BLOCK", 16 << 10)
    bad, good = list(s3["parts"])
    proxy.cut_at_match, proxy.cut_after, proxy.cuts = b"content-range: bytes 16384-", 2000, 1000
    skips = SkipCounter()
    lines = list(iter_unit_lines(Unit(bad, 0, 1), skips))
    assert 0 < len(lines) < 64 and [n for n, _ in lines] == list(range(1, len(lines) + 1))
    assert skips == {"unreadable_part": 1}
    err = capfd.readouterr().err
    assert f"skipped (unreadable_part) {bad} line {len(lines)}" in err and "retry 2/2" in err, err
    proxy.cuts = 0
    assert len(list(iter_unit_lines(Unit(good, 0, 1), skips))) == 64


def run_data(file_list, capfd):
    """python -m ldm.data in this process: (exit code, stdout, stderr)."""
    from ldm.data import __main__ as data

    capfd.readouterr()
    code = data.main(["--file_list", file_list, "--resolution", "32"])
    out, err = capfd.readouterr()
    return code, out, err


def test_startup_errors_are_one_line(s3, tmp_path, capfd, monkeypatch):
    """A missing bucket, a missing filelist and bad credentials stop python -m ldm.data at start-up
    with exit 2 and one line; a missing part is counted (missing_part), not fatal."""
    from ldm.data import storage

    code, _, err = run_data("s3://no-such-bucket/train.filelist.list", capfd)
    assert code == 2
    assert err.strip().splitlines()[-1] == f"error: s3://no-such-bucket/train.filelist.list: bucket 'no-such-bucket' does not exist (endpoint: {s3['url']})"

    fs, _ = storage.filesystem(s3["file_list"])
    fs.pipe_file(f"{BUCKET}/broken/a.list", f"s3://{BUCKET}/broken/none.filelist\n".encode())
    code, _, err = run_data(f"s3://{BUCKET}/broken/a.list", capfd)
    assert code == 2
    assert err.strip().splitlines()[-1] == f"error: s3://{BUCKET}/broken/none.filelist: no such object"

    fs.pipe_file(f"{BUCKET}/broken/b.filelist", ("\n".join([*s3["parts"], f"s3://{BUCKET}/shapes/part-99999.gz"]) + "\n").encode())
    fs.pipe_file(f"{BUCKET}/broken/b.list", f"s3://{BUCKET}/broken/b.filelist\n".encode())
    missing_part = run_script(["-m", "ldm.data", "--file_list", f"s3://{BUCKET}/broken/b.list", "--resolution", "32"])
    assert missing_part.returncode == 0, missing_part.stderr[-2000:]
    assert len(missing_part.stdout.splitlines()) == 128
    assert f"skipped (missing_part) s3://{BUCKET}/shapes/part-99999.gz" in missing_part.stderr

    # A store that checks credentials (moto with authentication on) refuses the dummy keys.
    port = free_port()
    import subprocess
    import sys

    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.1)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "a-secret-never-printed")
        storage._filesystems.clear()
        code, out, err = run_data(s3["file_list"], capfd)
    finally:
        server.terminate()
        server.wait()
        storage._filesystems.clear()
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"error: {s3['file_list']}: access denied by the object store"), err[-2000:]
    assert "a-secret-never-printed" not in out + err


def test_part_cache_is_bounded_lru(s3, tmp_path, monkeypatch):
    """--cache_dir keeps whole parts, least recently used out once over the bound; a hit is read
    from disk (the server is not asked again)."""
    from ldm.data import storage
    from ldm.data.filelists import Unit, iter_unit_lines
    from ldm.data.records import SkipCounter

    parts = list(s3["parts"])
    size = os.path.getsize(s3["parts"][parts[0]])
    monkeypatch.setattr(storage, "_cache", storage.PartCache())
    storage.use_part_cache(str(tmp_path / "cache"), max_gb=1.5 * size / (1 << 30))  # room for one part and a half
    skips = SkipCounter()
    for part in (parts[0], parts[1], parts[0]):
        assert len(list(iter_unit_lines(Unit(part, 0, 1), skips))) == 64
    kept = sorted(os.listdir(tmp_path / "cache"))
    assert kept == [os.path.basename(storage._cache.path_for(parts[0]))]
    # Read again with the server unreachable: only the cache can answer.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    storage._filesystems.clear()
    assert len(list(iter_unit_lines(Unit(parts[0], 0, 1), skips))) == 64
    storage._filesystems.clear()
    assert not skips


def test_part_cache_removes_orphaned_downloads_at_start(tmp_path, capfd):
    """A process killed mid-download leaves its temporary file; the next start-up with the same
    --cache_dir removes it once it is older than a live download can be idle, and nothing else."""
    from ldm.data import storage

    cache = tmp_path / "cache"
    cache.mkdir()
    old = time.time() - storage.ORPHAN_AGE_S - 60
    (cache / ".part-orphan").write_bytes(b"x" * 1000)
    os.utime(cache / ".part-orphan", (old, old))
    (cache / ".part-live").write_bytes(b"x" * 1000)  # another process's download in progress
    (cache / "0123456789abcdef-part-00000.gz").write_bytes(b"x" * 1000)  # a complete part, least recently used
    os.utime(cache / "0123456789abcdef-part-00000.gz", (old, old))
    storage.PartCache().configure(str(cache), 1 << 30)
    assert sorted(os.listdir(cache)) == [".part-live", "0123456789abcdef-part-00000.gz"]
    assert "removed .part-orphan" in capfd.readouterr().err


def test_part_cache_downloads_a_part_once(s3, proxy, tmp_path, monkeypatch):
    """--cache_dir: the prefetch of the next group and a reader that catches up with it download
    the part once (the reader waits for it); a part that cannot be fetched is counted by the
    reader, with no traceback from the prefetch thread, and no lock file is left behind."""
    from ldm.data import storage
    from ldm.data.filelists import Unit, iter_unit_lines
    from ldm.data.records import SkipCounter

    cache = tmp_path / "cache"
    monkeypatch.setattr(storage, "_cache", storage.PartCache())
    storage.use_part_cache(str(cache), max_gb=1.0)
    proxy.latency_s = 0.3  # a distant store: the reader asks while the prefetch is still downloading
    parts, skips = list(s3["parts"]), SkipCounter()

    def gets(part):
        return sum(r.split("?")[0] == "GET /" + part[len("s3://"):] for r in proxy.requests)

    assert len(list(iter_unit_lines(Unit(parts[0], 0, 1), skips))) == 64
    one_download = gets(parts[0])
    assert one_download >= 1
    storage.prefetch_parts([parts[1]])
    assert len(list(iter_unit_lines(Unit(parts[1], 0, 1), skips))) == 64
    assert gets(parts[1]) == one_download

    missing = f"s3://{BUCKET}/shapes/part-99998.gz"
    raised = []
    monkeypatch.setattr(threading, "excepthook", raised.append)  # what a thread would print as a traceback
    storage.prefetch_parts([missing])
    assert list(iter_unit_lines(Unit(missing, 0, 1), skips)) == []
    assert dict(skips) == {"missing_part": 1}
    time.sleep(1.5)  # the prefetch thread has given up too
    assert raised == []
    assert not [n for n in os.listdir(cache) if n.startswith(".")]


def test_resumed_bucketed_stream_names_a_cut_remote_part_truncated(s3, tmp_path):
    """A bucketed checkpoint's queued records re-read from S3 after their part was cut short: each
    is counted as truncated_part (the part is there, the line is not), not as missing_part."""
    from test_data_guards import bucketed, elongated_data, state_with_carry

    from ldm.data import storage
    from ldm.data.records import SKIP_REASONS

    _, local_parts = elongated_data(tmp_path)
    fs, _ = storage.filesystem("s3://x")
    remote_parts = [f"s3://{BUCKET}/elongated/{os.path.basename(p)}" for p in local_parts]
    for local, remote in zip(local_parts, remote_parts):
        fs.put_file(local, remote[5:])
    fs.pipe_file(f"{BUCKET}/elongated/a.filelist", ("\n".join(remote_parts) + "\n").encode())
    fs.pipe_file(f"{BUCKET}/elongated/a.list", f"s3://{BUCKET}/elongated/a.filelist\n".encode())
    file_list = f"s3://{BUCKET}/elongated/a.list"

    state, carry = state_with_carry(file_list)
    part = carry[0][0]
    with open(local_parts[remote_parts.index(part)], "rb") as f:
        fs.pipe_file(part[5:], f.read()[:50])  # the part cut short: its header and no whole record
    resumed = bucketed(file_list, 3.5)
    resumed.resume(state, 0)
    skips = dict(zip(SKIP_REASONS, next(iter(resumed))["skips"].tolist()))
    assert skips["truncated_part"] >= 1 and skips["missing_part"] == 0, skips


def test_trainer_trains_two_steps_from_s3(s3, shapes, vae_dir, tmp_path):
    """The Trainer script trains from an s3:// --file_list with a data worker reading through
    --cache_dir, which then holds the parts."""
    out = tmp_path / "run"
    extra = ["--image_logging_steps", "0", "--save_steps", "2", "--cache_dir", str(tmp_path / "cache")]
    args = [a if a != shapes["file_list"] else s3["file_list"] for a in ldm_args(shapes, vae_dir, out, 2, extra)]
    res = run_script(args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "checkpoint-2").is_dir()
    assert sorted(n.split("-", 1)[1] for n in os.listdir(tmp_path / "cache")) == sorted(os.path.basename(p) for p in s3["parts"])
    assert "testing" not in res.stdout + res.stderr


def test_prepare_writes_complete_parts_to_s3_and_resumes(s3, proxy, tmp_path, capsys):
    """ldm.prepare --output_dir s3://...: parts, counts and lists land in the bucket, nothing
    half-written; a re-run after losing a part rewrites that one alone; the result reads back.
    The summary GETs only the counts of parts an earlier run wrote (at LAION scale, 60,000 parts:
    reading every part's counts back one at a time took half an hour)."""
    from test_prepare import make_folder

    from ldm.data import prepare, storage

    def counts_gets():
        return sorted(r.split("/counts/")[1] for r in proxy.requests if r.startswith(f"GET /{BUCKET}/prepared/counts/"))

    folder, expect = make_folder(tmp_path / "folder")
    out = f"s3://{BUCKET}/prepared"
    args = [folder, "--output_dir", out, "--records_per_part", "4", "--num_workers", "0"]
    assert prepare.main(args) == 0
    assert counts_gets() == []  # this run's counts come from its workers
    fs, _ = storage.filesystem(out)
    names = sorted(p.split("/prepared/", 1)[1] for p in fs.find(f"{BUCKET}/prepared"))
    assert names == ["counts/part-00000.json", "counts/part-00001.json", "counts/part-00002.json", "part-00000.gz", "part-00001.gz",
                     "part-00002.gz", "parts.filelist", "prepare.json", "train.filelist.list"]
    first_list = fs.cat_file(f"{BUCKET}/prepared/parts.filelist")
    fs.rm(f"{BUCKET}/prepared/part-00001.gz")  # as a run killed before that part's upload completed
    capsys.readouterr()
    proxy.requests.clear()
    assert prepare.main(args) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["parts_reused"] == 2 and summary["written"] == len(expect.captions)
    assert counts_gets() == ["part-00000.json", "part-00002.json"]  # the reused parts' alone
    assert fs.cat_file(f"{BUCKET}/prepared/parts.filelist") == first_list
    read = run_script(["-m", "ldm.data", "--file_list", f"{out}/train.filelist.list", "--resolution", "16"])
    assert read.returncode == 0, read.stderr[-2000:]
    assert sorted(json.loads(line)["caption"] for line in read.stdout.splitlines()) == sorted(expect.captions)


def test_data_tools_read_remote_lists(s3, vae_dir, tmp_path, monkeypatch):
    """ldm.split, ldm.report and ldm.cache_latents take an s3:// --file_list; python -m ldm.data
    reads through --cache_dir as the training scripts do."""
    from ldm.data import report, split, storage
    from ldm.data.__main__ import main as list_records

    monkeypatch.setattr(storage, "_cache", storage.PartCache())  # the cache is this test's alone
    assert list_records(["--file_list", s3["file_list"], "--resolution", "32", "--cache_dir", str(tmp_path / "cache")]) == 0
    assert sorted(n.split("-", 1)[1] for n in os.listdir(tmp_path / "cache")) == sorted(os.path.basename(p) for p in s3["parts"])

    paths, counts = split.split_file_list(s3["file_list"], str(tmp_path / "split"))
    assert counts == {"train": 1, "eval": 1}
    assert open(paths["eval"]).read().split()[0].endswith(".filelist")
    held_out = open(open(paths["eval"]).read().split()[0]).read().split()
    assert held_out == [list(s3["parts"])[-1]]  # remote part paths kept as they are

    assert report.main(["--file_list", s3["file_list"], "--output_dir", str(tmp_path / "report"), "--resolution", "32",
                        "--num_samples", "4", "--num_workers", "0"]) == 0
    summary = json.load(open(tmp_path / "report" / "summary.json"))
    assert summary["records"] == 128, summary

    res = run_script(["-m", "ldm.cache_latents", "--file_list", s3["file_list"], "--vae_name_or_path", str(vae_dir),
                      "--resolution", "32", "--output_dir", str(tmp_path / "cached"), "--batch_size", "16"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "cached 128 records in 2 parts" in res.stderr


def _count_lines(part, out):
    from ldm.data.filelists import Unit, iter_unit_lines
    from ldm.data.records import SkipCounter

    out.put(len(list(iter_unit_lines(Unit(part, 0, 1), SkipCounter()))))


def test_forked_data_worker_reads_remote_parts(s3):
    """A dataloader worker forked after this process used fsspec's event loop reads remote parts
    (it inherits the loop without its thread: without a reset it would wait forever)."""
    import multiprocessing as mp

    from ldm.data.filelists import read_file_list

    read_file_list(s3["file_list"])  # the parent's loop is in use, as in a training script
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_count_lines, args=(list(s3["parts"])[0], out))
    child.start()
    child.join(30)
    hung = child.is_alive()
    child.kill()
    assert not hung, "the forked worker hung on its first remote read"
    assert out.get(timeout=5) == 64


def test_part_left_midway_stops_its_reader(s3, monkeypatch):
    """Closing a remote part read only in part stops its background reader (no thread per
    abandoned part piling up over a weeks-long run)."""
    import threading

    from ldm.data import storage
    from ldm.data.filelists import open_part

    monkeypatch.setattr(storage, "READ_BLOCK", 4 << 10)
    monkeypatch.setattr(storage, "FIRST_BLOCK", 4 << 10)
    part = list(s3["parts"])[0]
    for _ in range(3):
        with open_part(part) as f:
            f.readline()
    deadline = time.time() + 5
    while any(t.name == f"read {part}" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(t.name == f"read {part}" for t in threading.enumerate())


def test_http_lists_and_parts(shapes, tmp_path, monkeypatch):
    """http(s):// lists and parts (any web server; here Python's, which serves no byte ranges: read
    as one stream) read as their local copies."""
    import functools
    import http.server
    import shutil
    import threading

    from ldm.data import storage
    from ldm.data.filelists import Unit, iter_unit_lines, read_file_list
    from ldm.data.records import SkipCounter

    monkeypatch.setattr(storage, "READ_BLOCK", 4 << 10)  # parts of several blocks: a ranged read is tried first
    monkeypatch.setattr(storage, "FIRST_BLOCK", 4 << 10)

    local_parts = open(open(shapes["file_list"]).read().split()[0]).read().split()
    for p in local_parts:
        shutil.copy(p, tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    (tmp_path / "a.filelist").write_text("".join(f"{url}/{os.path.basename(p)}\n" for p in local_parts))
    (tmp_path / "t.list").write_text(f"{url}/a.filelist\n")
    try:
        entries = read_file_list(f"{url}/t.list")
        assert entries[0].sizes == [os.path.getsize(p) for p in local_parts]
        skips = SkipCounter()
        for remote, local in zip(entries[0].parts, local_parts):
            assert list(iter_unit_lines(Unit(remote, 0, 1), skips)) == list(iter_unit_lines(Unit(local, 0, 1), skips))
        assert not skips
    finally:
        server.shutdown()
