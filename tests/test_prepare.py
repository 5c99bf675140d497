"""ldm.prepare: every input kind, built here with broken members, into parts the stream and the
reference example's reader both read; interrupted runs resume without duplicates."""
import base64
import csv
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import ROOT, run_script
from ldm.data import prepare


def image_bytes(i, size=(40, 32), fmt="JPEG", exif_orientation=None):
    image = Image.new("RGB", size, ((37 * i) % 256, (91 * i) % 256, 120))
    buf = io.BytesIO()
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(buf, format=fmt, exif=exif)
    else:
        image.save(buf, format=fmt)
    return buf.getvalue()


def truncated_jpeg(i):
    data = image_bytes(i, size=(64, 64))
    return data[: len(data) // 2]  # Pillow opens it (header intact) but cannot decode it


NOT_AN_IMAGE = b"this is not an image"


class Expect:
    """What a source should turn into: the captions written, and the skips by reason."""

    def __init__(self):
        self.captions, self.skips = [], {}

    def ok(self, caption):
        self.captions.append(" ".join(caption.split()))

    def skip(self, reason):
        self.skips[reason] = self.skips.get(reason, 0) + 1


def make_folder(root, kind="folder"):
    """Images in nested folders: .txt captions in one, metadata.jsonl in the other."""
    expect = Expect()
    (root / "txt" / "deeper").mkdir(parents=True)
    (root / "meta").mkdir()
    for i in range(5):
        sub = root / "txt" / ("deeper" if i % 2 else "")
        (sub / f"img{i}.jpg").write_bytes(image_bytes(i))
        caption = f"{kind} txt {i}\twith a tab\nand a newline"
        (sub / f"img{i}.txt").write_text(caption)
        expect.ok(caption)
    rows = []
    for i in range(4):
        (root / "meta" / f"m{i}.png").write_bytes(image_bytes(i, fmt="PNG"))
        rows.append({"file_name": f"m{i}.png", "text": f"{kind} metadata {i}"})
        expect.ok(f"{kind} metadata {i}")
    (root / "meta" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "txt" / "broken.jpg").write_bytes(NOT_AN_IMAGE)
    (root / "txt" / "broken.txt").write_text("never written")
    expect.skip("undecodable_image")
    (root / "txt" / "cut.jpg").write_bytes(truncated_jpeg(9))
    (root / "txt" / "cut.txt").write_text("never written either")
    expect.skip("truncated_image")
    (root / "txt" / "uncaptioned.jpg").write_bytes(image_bytes(7))
    expect.skip("no_caption")
    return str(root), expect


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_tar(path, kind="tar", first=0, n=6):
    """An img2dataset-style webdataset shard: KEY.jpg with KEY.txt or KEY.json (and KEY.json besides)."""
    expect = Expect()
    with tarfile.open(path, "w") as tar:
        for i in range(first, first + n):
            key = f"{i:09d}"
            add_member(tar, f"{key}.jpg" if i % 3 else f"{key}.webp", image_bytes(i, fmt="JPEG" if i % 3 else "WEBP"))
            caption = f"{kind} sample {i}"
            if i % 2:
                add_member(tar, f"{key}.txt", caption.encode())
            else:
                add_member(tar, f"{key}.json", json.dumps({"caption": caption, "url": "http://x"}).encode())
            expect.ok(caption)
        add_member(tar, "broken.jpg", NOT_AN_IMAGE)
        add_member(tar, "broken.txt", b"never written")
        expect.skip("undecodable_image")
        add_member(tar, "nocaption.png", image_bytes(1, fmt="PNG"))
        expect.skip("no_caption")
        add_member(tar, "noimage.txt", b"a caption without its image")
        expect.skip("no_image")
    return str(path), expect


def make_parquet(path, kind="parquet"):
    """An img2dataset parquet shard: image bytes in `jpg`, caption in `caption`; two row groups."""
    expect = Expect()
    images, captions = [], []
    for i in range(7):
        images.append(image_bytes(i))
        captions.append(f"{kind} row {i}")
        expect.ok(f"{kind} row {i}")
    images += [None, NOT_AN_IMAGE, image_bytes(3)]
    captions += ["an empty image cell", "bad bytes", None]
    expect.skip("no_image"), expect.skip("undecodable_image"), expect.skip("no_caption")
    table = pa.table({"key": [str(i) for i in range(len(images))], "jpg": pa.array(images, pa.binary()), "caption": captions})
    pq.write_table(table, path, row_group_size=4)
    return str(path), expect


def make_table(root, kind="csv"):
    """A CSV of image paths (relative to the CSV) and captions."""
    expect = Expect()
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(5):
        (root / "images" / f"{i}.jpg").write_bytes(image_bytes(i))
        rows.append({"file_name": f"images/{i}.jpg", "caption": f"{kind}, row {i}"})
        expect.ok(f"{kind}, row {i}")
    rows.append({"file_name": "images/missing.jpg", "caption": "a file that is not there"})
    expect.skip("missing_image")
    (root / "images" / "bad.jpg").write_bytes(NOT_AN_IMAGE)
    rows.append({"file_name": "images/bad.jpg", "caption": "bad bytes"})
    expect.skip("undecodable_image")
    path = root / "list.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file_name", "caption"])
        w.writeheader()
        w.writerows(rows)
    return str(path), expect


def make_source(kind, tmp_path):
    if kind == "folder":
        return make_folder(tmp_path / "folder")
    if kind == "tar":
        return make_tar(tmp_path / "shard.tar")
    if kind == "parquet":
        return make_parquet(tmp_path / "shard.parquet")
    return make_table(tmp_path / "table")


def read_back(file_list, resolution=16):
    """Captions of one pass of `python -m ldm.data` over the prepared file list."""
    res = run_script(["-m", "ldm.data", "--file_list", file_list, "--resolution", str(resolution)])
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    return [r["caption"] for r in rows], json.loads(res.stderr.strip().splitlines()[-1])


def run_prepare(sources, out, *extra, capsys=None):
    code = prepare.main([*sources, "--output_dir", str(out), "--num_workers", "0", *extra])
    assert code == 0
    return json.loads(capsys.readouterr().out.splitlines()[0]) if capsys else None


@pytest.mark.parametrize("kind", ["folder", "tar", "parquet", "csv"])
def test_each_source_kind_round_trips_through_the_stream(tmp_path, capsys, kind):
    source, expect = make_source(kind, tmp_path)
    summary = run_prepare([source], tmp_path / "out", "--records_per_part", "4", capsys=capsys)
    assert summary["written"] == len(expect.captions)
    assert summary["skipped"] == expect.skips
    captions, stream_summary = read_back(str(tmp_path / "out" / "train.filelist.list"))
    assert sorted(captions) == sorted(expect.captions), "every valid record exactly once, with its caption"
    assert not any(stream_summary["skipped"].values()), "the stream skips nothing prepare wrote"


def reference_parse_line(line, filename):
    """The reference example's reader, reproduced (PaddleMIX ppdiffusers/examples/text_to_image_laion400m/
    ldm/text_image_pair_dataset.py, `parse_line` and `sample_loader`): only paths with "laion400m"
    are its format; `line.strip().split("\\t")`, `caption, _, img_b64 = vec[:3]`, base64 + Pillow."""
    if "laion400m" not in filename:
        raise NotImplementedError(f"Unkown data source, {filename}")
    vec = line.strip().split("\t")
    caption, _, img_b64 = vec[:3]
    image = Image.open(io.BytesIO(base64.b64decode(img_b64))).convert("RGB")
    return dict(image=image, caption=caption)


def test_parts_are_the_seed_format_the_reference_reader_reads(tmp_path, capsys):
    folder, e1 = make_folder(tmp_path / "folder")
    shard, e2 = make_tar(tmp_path / "shard.tar")
    out = tmp_path / "laion400m"  # the reference reader only accepts parts whose path says laion400m
    run_prepare([folder, shard], out, "--records_per_part", "5", capsys=capsys)
    parts = (out / "parts.filelist").read_text().split()
    assert parts == sorted(parts) and len(parts) >= 3
    captions = []
    for filename in parts:
        with gzip.open(filename, "rb") as f:  # as the reference's sample_loader reads a .gz part
            for raw in f:
                line = raw.decode("utf-8")
                assert line.count("\t") == 2 and line.endswith("\n") and line.count("\n") == 1
                record = reference_parse_line(line, filename)
                assert record["image"].size in ((40, 32), (32, 40))
                captions.append(record["caption"])
    assert sorted(captions) == sorted(e1.captions + e2.captions)
    assert (out / "train.filelist.list").read_text().strip() == str(out / "parts.filelist")


def test_cli_mixes_sources_with_worker_processes(tmp_path):
    """The real command on every kind at once, in 2 processes: the same records as one process would write."""
    made = [make_folder(tmp_path / "folder"), make_tar(tmp_path / "shard.tar"), make_parquet(tmp_path / "shard.parquet"),
            make_table(tmp_path / "table")]
    res = run_script(["-m", "ldm.prepare", *[m[0] for m in made], "--output_dir", str(tmp_path / "out"),
                      "--records_per_part", "6", "--num_workers", "2"])
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.splitlines()[0])
    expected = sorted(c for _, e in made for c in e.captions)
    assert summary["written"] == len(expected)
    assert summary["parts"] == -(-sum(len(e.captions) + sum(e.skips.values()) for _, e in made) // 6)
    captions, _ = read_back(str(tmp_path / "out" / "train.filelist.list"))
    assert sorted(captions) == expected
    assert "sources: 1 image folder, 1 tar shard, 1 parquet file, 1 CSV/TSV table; 38 input records" in res.stderr


def test_img2dataset_output_folders_are_recognised(tmp_path, capsys):
    """A webdataset output folder holds .tar shards and metadata-only .parquet: the shards are
    read (8 of them: scanned by the worker processes too)."""
    out_dir = tmp_path / "wds"
    out_dir.mkdir()
    expected = []
    for s in range(8):
        expected += make_tar(out_dir / f"{s:05d}.tar", first=100 * s, n=2)[1].captions
        pq.write_table(pa.table({"key": ["0"], "caption": ["metadata only"]}), out_dir / f"{s:05d}.parquet")
        (out_dir / f"{s:05d}_stats.json").write_text("{}")
    assert prepare.main([str(out_dir), "--output_dir", str(tmp_path / "out"), "--num_workers", "2", "--records_per_part", "7"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["written"] == len(expected) and summary["parts"] == 6  # 8 x 5 input records
    captions, _ = read_back(str(tmp_path / "out" / "train.filelist.list"))
    assert sorted(captions) == sorted(expected)


def test_truncated_shard_keeps_the_records_before_the_cut(tmp_path, capsys):
    path, expect = make_tar(tmp_path / "shard.tar", n=8)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])  # a header cut in the middle
    summary = run_prepare([str(cut)], tmp_path / "out", capsys=capsys)
    assert summary["skipped"].get("truncated_shard") == 1
    captions, _ = read_back(str(tmp_path / "out" / "train.filelist.list"))
    assert 0 < len(captions) < len(expect.captions)
    assert set(captions) <= set(expect.captions)


def test_corrupt_parquet_row_group_loses_only_its_rows(tmp_path, capsys):
    table = pa.table({"jpg": [image_bytes(i) for i in range(12)], "caption": [f"row {i}" for i in range(12)]})
    path = tmp_path / "shard.parquet"
    pq.write_table(table, path, row_group_size=4, compression="NONE")
    data = bytearray(path.read_bytes())
    page = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data[page + 10 : page + 400] = b"\xff" * 390  # rows 4-7: a garbled page header
    path.write_bytes(bytes(data))
    summary = run_prepare([str(path)], tmp_path / "out", "--records_per_part", "5", capsys=capsys)
    assert summary["written"] == 8 and summary["skipped"] == {"unreadable_member": 4}
    captions, _ = read_back(str(tmp_path / "out" / "train.filelist.list"))
    assert sorted(captions) == sorted(f"row {i}" for i in (0, 1, 2, 3, 8, 9, 10, 11))


def test_min_and_max_side(tmp_path, capsys):
    """--min_side skips small images; --max_side downscales the shorter side, JPEG stays JPEG, turned upright."""
    folder = tmp_path / "folder"
    folder.mkdir()
    sizes = {"small": (30, 20), "big": (400, 300), "png": (300, 600), "rotated": (400, 200), "kept": (100, 80)}
    for name, size in sizes.items():
        fmt = "PNG" if name == "png" else "JPEG"
        (folder / f"{name}.img.{fmt.lower()}").write_bytes(image_bytes(1, size, fmt, exif_orientation=6 if name == "rotated" else None))
        (folder / f"{name}.img.txt").write_text(name)
    summary = run_prepare([str(folder)], tmp_path / "out", "--min_side", "32", "--max_side", "100", capsys=capsys)
    assert summary["written"] == 4 and summary["skipped"] == {"too_small": 1}
    got = {}
    with gzip.open(tmp_path / "out" / "part-00000.gz", "rt") as f:
        for line in f:
            caption, _, b64 = line.rstrip("\n").split("\t")
            image = Image.open(io.BytesIO(base64.b64decode(b64)))
            got[caption] = (image.format, image.size)
    assert got == {"big": ("JPEG", (133, 100)), "png": ("PNG", (100, 200)), "rotated": ("JPEG", (100, 200)), "kept": ("JPEG", (100, 80))}


def test_resume_after_an_interrupted_run_writes_no_duplicate(tmp_path, capsys):
    """What an interrupted multi-process run leaves: some parts complete, one half-written, the rest not begun."""
    made = [make_folder(tmp_path / "folder"), make_parquet(tmp_path / "shard.parquet")]
    sources = [m[0] for m in made]
    out = tmp_path / "out"
    first = run_prepare(sources, out, "--records_per_part", "4", capsys=capsys)
    parts = sorted(out.glob("part-*.gz"))
    assert len(parts) == 6  # 12 folder images + 10 parquet rows, 4 a part
    kept = {p.name: p.stat().st_mtime_ns for p in parts[::2]}
    for p in parts[1::2]:  # parts 1, 3, 5 were not finished
        p.unlink()
    (out / "counts" / "part-00003.json").unlink()
    (out / "part-00001.gz.tmp.12345").write_bytes(gzip.compress(b"half a record\t_\t")[:20])
    time.sleep(0.01)
    second = run_prepare(sources, out, "--records_per_part", "4", capsys=capsys)
    assert second["parts_reused"] == 3 and second["written"] == first["written"] and second["skipped"] == first["skipped"]
    assert {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("part-*.gz"))[::2]} == kept, "complete parts are kept as they were"
    assert not list(out.glob("*.tmp*"))
    captions, _ = read_back(str(out / "train.filelist.list"))
    assert sorted(captions) == sorted(c for _, e in made for c in e.captions)


def test_resume_after_sigkill(tmp_path):
    """A real interruption: kill the command (and its workers) once some part is complete, run it again."""
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(60):
        (folder / f"{i:03d}.jpg").write_bytes(image_bytes(i, size=(160, 128)))
        (folder / f"{i:03d}.txt").write_text(f"record {i}")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "ldm.prepare", str(folder), "--output_dir", str(out), "--records_per_part", "2",
            "--num_workers", "2", "--max_side", "64"]
    proc = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while not list(out.glob("part-*.gz")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    res = run_script(["-m", "ldm.prepare", str(folder), "--output_dir", str(out), "--records_per_part", "2",
                      "--num_workers", "2", "--max_side", "64"])
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.splitlines()[0])
    print("parts reused after the kill:", summary["parts_reused"], "of", summary["parts"])
    assert summary["written"] == 60 and summary["parts_reused"] >= 1
    captions, _ = read_back(str(out / "train.filelist.list"))
    assert sorted(captions) == sorted(f"record {i}" for i in range(60))


def test_bad_invocations_are_one_line_errors(tmp_path, capsys):
    source, _ = make_table(tmp_path / "table")
    out = tmp_path / "out"
    run_prepare([source], out, capsys=capsys)
    assert prepare.main([source, "--output_dir", str(out), "--num_workers", "0", "--records_per_part", "3"]) == 2
    assert "other sources or options" in capsys.readouterr().err
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttps://example.com/a.jpg,a cat\n")
    assert prepare.main([str(urls), "--output_dir", str(tmp_path / "o2"), "--image_column", "url"]) == 2
    assert "fetch the images first" in capsys.readouterr().err
    shard, _ = make_parquet(tmp_path / "shard.parquet")
    assert prepare.main([shard, "--output_dir", str(tmp_path / "o3"), "--image_column", "image"]) == 2
    assert "no column 'image'" in capsys.readouterr().err
    assert prepare.main([str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "o4")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
