"""Records/s of the data path against the bare loop over the same parts it cannot beat (the limit).

    python bench/data_throughput.py [--records 400] [--parts P] [--resolution 256] [--workers 1 2] [--repeats 3]

Writes photo-like JPEGs of LAION-typical sizes (sides 300-1000 px) into gzipped parts (by
default twice the lcm of the worker counts: as on LAION, whose parts far outnumber the
workers, every worker reads whole parts, so each record is gunzipped once; with fewer parts
than workers each worker would gunzip every line of a shared part to keep its share), then,
for each worker count K, measures records/s in steady state (median of --repeats runs, ours and
the limit taking turns in the same process on the same parts):
  * ours:  the full per-record path through paddle.io.DataLoader(K worker processes of one
           thread each, ldm.data.init_worker; the consuming process with the cores they leave,
           as the training scripts set them) over ldm.data.TextImageStream: read, gunzip,
           base64, decode (JPEG draft mode), resize/crop, tokenize, collate into batches, hand
           over to the consuming process; timed from the K-th batch on (the start-up a run pays
           once, forking the workers and their first batch, is reported in its own column);
  * limit: K processes each running a bare loop over its share of the same gzipped parts
           (part k, k+K, ...) that only opens and gunzips them (ISA-L's igzip, the reader ours
           uses), splits the lines and finds the base64 column (without copying it, as ours),
           base64-decodes (ours' decoder), decodes with the same Pillow settings (JPEG draft
           mode) and resizes/crops; all records over the slowest loop's time (each process
           times its own loop, so forking them is left out, as ours' start-up is).
The limit is the floor of this data path, not of image decoding alone: the seed's format
stores records as lines of gzipped parts, so any reader of it must read and gunzip every part
it takes records from (~10% of the limit's time a record) before it can decode a single image.
It does nothing else: no tokenization, batching, shuffling, skip checks or hand-over.
The last lines read `data_throughput: ours N rec/s, limit M rec/s, ratio R`, one per K.

With --source s3 the same parts are also uploaded to a local S3-compatible server (moto, on
127.0.0.1, in its own process) and ours is measured reading them from there and from disk, taking
turns: the last lines read `data_throughput: remote N rec/s, local M rec/s, ratio R` (remote /
local), one per K. It then reads every part once more through a proxy that cuts connections
mid-transfer and prints what a cut costs (bytes fetched again, seconds).
"""
import argparse
import base64
import gzip
import io
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from isal import igzip

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ldm.data.records import b64decode  # noqa: E402  (the limit decodes base64 as ours does


def photo_like(rng, w, h):
    """Smooth colour gradients, a few blurred blobs and sensor-like noise: compresses like a photo."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 60 * np.sin(a * x / 90 + b * y / 70 + p * 6)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 150)
        mask = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - mask) + rng.uniform(0, 255, 3) * mask
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_parts(directory, n, parts, seed=0):
    """n records dealt in turn into `parts` gzipped parts; returns the parts' paths."""
    rng = np.random.default_rng(seed)
    files = [gzip.open(os.path.join(directory, f"part-{p:05d}.gz"), "wt", encoding="utf-8") for p in range(parts)]
    for i in range(n):
        w, h = int(rng.integers(300, 1001)), int(rng.integers(300, 1001))
        buf = io.BytesIO()
        photo_like(rng, w, h).save(buf, format="JPEG", quality=90)
        b64 = base64.b64encode(buf.getvalue()).decode()
        caption = f"a photo number {i} of a scene with {w} by {h} pixels"
        files[i % parts].write(f"{caption}\t_\t{b64}\n")
    for f in files:
        f.close()
    return [f.name for f in files]


def bare_loop(parts, resolution):
    """The limit: read and gunzip the parts (ISA-L, as ours), find each line's base64 column,
    base64 (the decoder ours uses) + the same Pillow decode/draft/resize/crop as ours, nothing else."""
    n = 0
    start = time.perf_counter()
    for path in parts:
        with igzip.open(path, "rb") as f:
            for raw in f:
                # The third column, as a view (ours does not copy the ~160 KB column either).
                tab = raw.index(b"\t", raw.index(b"\t") + 1)
                end = len(raw) - 1 if raw.endswith(b"\n") else len(raw)
                image = Image.open(io.BytesIO(b64decode(memoryview(raw)[tab + 1 : end])))
                w, h = image.size
                scale = resolution / min(w, h)
                image.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
                if image.mode != "RGB":  # as ours: a JPEG drafted to RGB is not copied
                    image = image.convert("RGB")
                w, h = image.size
                scale = resolution / min(w, h)
                new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
                left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
                image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=3.0).crop((left, top, left + resolution, top + resolution)).load()
                n += 1
    return n, time.perf_counter() - start


def limit_rate(part_paths, resolution, workers):
    """Records/s of K bare loops side by side, loop k over parts k, k+K, ...: all records over
    the slowest loop's time (each process times its own loop, so forking the processes is left
    out, as ours' start-up is)."""
    shares = [(part_paths[k::workers], resolution) for k in range(workers)]
    if workers == 1:
        loops = [bare_loop(*shares[0])]
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            loops = pool.starmap(bare_loop, shares)
    return sum(n for n, _ in loops) / max(t for _, t in loops)


def ours_rate(file_list, tokenizer, resolution, workers, n):
    """(records/s in steady state, start-up seconds) of the training data path with K workers.

    Steady state: from the K-th batch (by then every worker has started and handed over its
    first batch; the DataLoader takes the workers' batches in turn) to the last, counting the
    records in between. Start-up (forking the workers, their first window and batch) is paid
    once a run and reported apart."""
    from paddle.io import DataLoader

    from ldm.data.stream import TextImageStream
    from ldm.data.progress import as_paddle_dataset, init_worker
    from ldm.training.runtime import set_cpu_threads

    # As the training scripts set them up: K worker processes of one thread each, and the
    # consuming process with the cores they leave.
    set_cpu_threads(0, workers)
    stream = TextImageStream(file_list, resolution, tokenizer, 77, 0.1, buffer_size=64, seed=0, rank=0, world_size=1)
    loader = DataLoader(as_paddle_dataset(stream), batch_size=8, num_workers=workers, worker_init_fn=init_worker)
    seen = batches = 0
    start = time.perf_counter()
    for batch in loader:
        seen += batch["pixel_values"].shape[0]
        batches += 1
        if batches == workers:
            steady_start, steady_seen = time.perf_counter(), seen
        if seen >= n:
            break
    return (seen - steady_seen) / (time.perf_counter() - steady_start), steady_start - start


def serve_s3(part_paths):
    """A moto S3 server in its own process holding the parts; the AWS environment (dummy keys,
    AWS_ENDPOINT_URL) of this process and the data workers it forks points at it. Returns
    (server process, its port, the remote file list)."""
    import subprocess
    import socket

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from cutting_proxy import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    from ldm.data import storage

    storage._filesystems.clear()
    fs, _ = storage.filesystem("s3://bench")
    fs.mkdir("bench")
    remote = [f"s3://bench/{os.path.basename(p)}" for p in part_paths]
    for local, r in zip(part_paths, remote):
        fs.put_file(local, r[5:])
    fs.pipe_file("bench/a.filelist", "".join(r + "\n" for r in remote).encode())
    fs.pipe_file("bench/train.filelist.list", b"s3://bench/a.filelist\n")
    return server, port, "s3://bench/train.filelist.list"


def cut_cost(remote_list, port, cuts=3):
    """Read every part once through a proxy, without and with up to `cuts` connections cut
    mid-transfer, each cut's retry left alone: (cuts made, bytes fetched again per cut, seconds
    lost per cut, records read each time)."""
    from cutting_proxy import CuttingProxy

    from ldm.data import storage
    from ldm.data.filelists import Unit, iter_unit_lines, read_file_list
    from ldm.data.records import SkipCounter

    parts = [p for e in read_file_list(remote_list) for p in e.parts]
    proxy = CuttingProxy(port, cut_after=storage.READ_BLOCK // 2)
    proxy.cut_at_match = b"content-range: bytes"  # half a steady-state block into a GET's response
    proxy.quiet_s = 3 * storage.BACKOFF_FIRST_S
    os.environ["AWS_ENDPOINT_URL"] = proxy.url
    runs = []
    for k in (0, cuts):
        storage._filesystems.clear()
        proxy.cuts, proxy.cut_done, proxy.forwarded = k, 0, 0
        skips, records, start = SkipCounter(), 0, time.perf_counter()
        for part in parts:
            records += sum(1 for _ in iter_unit_lines(Unit(part, 0, 1), skips))
        runs.append((proxy.forwarded, time.perf_counter() - start, records, proxy.cut_done, dict(skips)))
    proxy.server.close()
    (b0, t0, r0, _, _), (b1, t1, r1, done, skipped) = runs
    assert r0 == r1 and not skipped, (runs, "a cut lost or repeated records")
    return done, (b1 - b0) / max(done, 1), (t1 - t0) / max(done, 1), r1


def compare_remote(file_list, remote_list, tokenizer, args):
    """Ours over the remote copy and over the local parts, taking turns: rows of (K, remote, local)."""
    rows = []
    for k in args.workers:
        n = args.records - args.records % (8 * k)
        remote, local = [], []
        for r in range(args.repeats):
            for which in ((0, 1) if r % 2 == 0 else (1, 0)):
                if which == 0:
                    remote.append(ours_rate(remote_list, tokenizer, args.resolution, k, n)[0])
                else:
                    local.append(ours_rate(file_list, tokenizer, args.resolution, k, n)[0])
        rows.append((k, statistics.median(remote), statistics.median(local)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=400, help="Records in the generated parts.")
    parser.add_argument("--parts", type=int, default=None,
                        help="Gzipped parts the records are dealt into (default: twice the lcm of --workers, so every worker reads whole parts).")
    parser.add_argument("--resolution", type=int, default=256, help="Training crop side in pixels.")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Worker counts to measure.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per figure; the median is reported.")
    parser.add_argument("--source", choices=["local", "s3"], default="local",
                        help="local: ours against the bare loop on disk; s3: ours reading the parts from a local S3-compatible server against ours reading them from disk.")
    args = parser.parse_args()
    parts = args.parts or 2 * math.lcm(*args.workers)

    from ldm.data.tokenizer import build_vocab, write_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        print(f"writing {args.records} photo-like JPEGs (300-1000 px sides) into {parts} parts ...", flush=True)
        part_paths = write_parts(tmp, args.records, parts)
        with open(os.path.join(tmp, "a.filelist"), "w") as f:
            f.write("".join(p + "\n" for p in part_paths))
        file_list = os.path.join(tmp, "train.filelist.list")
        with open(file_list, "w") as f:
            f.write(os.path.join(tmp, "a.filelist") + "\n")
        from paddlenlp.transformers import BertTokenizer

        tok_dir = write_tokenizer(build_vocab(lambda: (f"a photo number {i} of a scene with pixels by" for i in range(10))), os.path.join(tmp, "tok"))
        tokenizer = BertTokenizer.from_pretrained(tok_dir)

        if args.source == "s3":
            server, port, remote_list = serve_s3(part_paths)
            try:
                rows = compare_remote(file_list, remote_list, tokenizer, args)
                cuts, per_cut_bytes, per_cut_s, records = cut_cost(remote_list, port)
            finally:
                server.terminate()
                server.wait()
            print("\n| workers | remote (rec/s) | local (rec/s) | ratio |")
            print("|---|---|---|---|")
            for k, remote, local in rows:
                print(f"| {k} | {remote:.1f} | {local:.1f} | {remote / local:.2f} |")
            if cuts:
                print(f"a cut connection cost {per_cut_bytes / 1e6:.2f} MB fetched again and {per_cut_s:.2f} s "
                      f"(mean of {cuts} cuts in one pass over {records} records, every record read once)")
            else:
                print("no connection was cut: the parts are smaller than the blocks the cut waits for (use more --records)")
            for k, remote, local in rows:
                print(f"data_throughput: remote {remote:.1f} rec/s, local {local:.1f} rec/s, ratio {remote / local:.2f}")
            return

        rows = []
        for k in args.workers:
            # Ours needs whole batches from every worker; measure a pass's worth of records.
            n = args.records - args.records % (8 * k)
            # Ours and the limit take turns (the order alternating), so both see the same load
            # on a shared machine (and the parts in the page cache).
            ours, limit, startups = [], [], []
            for r in range(args.repeats):
                for which in ((0, 1) if r % 2 == 0 else (1, 0)):
                    if which == 0:
                        rate, startup = ours_rate(file_list, tokenizer, args.resolution, k, n)
                        ours.append(rate)
                        startups.append(startup)
                    else:
                        limit.append(limit_rate(part_paths, args.resolution, k))
            rows.append((k, statistics.median(ours), statistics.median(limit), statistics.median(startups)))
        print("\n| workers | ours (rec/s) | limit (rec/s) | ratio | ours per worker | ours start-up (s) |")
        print("|---|---|---|---|---|---|")
        for k, ours, limit, startup in rows:
            print(f"| {k} | {ours:.1f} | {limit:.1f} | {ours / limit:.2f} | {ours / k:.1f} | {startup:.2f} |")
        for k, ours, limit, _ in rows:  # SPEC 9: one line per worker count; the worst ratio counts
            print(f"data_throughput: ours {ours:.1f} rec/s, limit {limit:.1f} rec/s, ratio {ours / limit:.2f}")


if __name__ == "__main__":
    main()
