"""The data stream: list parsing, exactly-once sharding, bad records, image modes."""
import base64
import binascii
import io
import itertools
import json
import os
import re
import time

import numpy as np
import pytest
from PIL import Image

from conftest import jpeg_b64, ldm_args, make_parts, run_script, write_lists, write_part
import ldm.data.stream
from ldm.data.shards import CURSOR_FIELDS, ShardStream
from ldm.data.records import SKIP_REASONS, decode_image, explain_barren, load_image, parse_line, skips_from_vector, to_rgb
from ldm.data.progress import StreamProgress, as_paddle_dataset
from ldm.data.stream import TextImageStream
from ldm.data.filelists import read_file_list


def inspect(file_list, world_size, num_workers, resolution=32, seed=0, extra=(), logs=None):
    """Records of one pass over all ranks via the real CLI, plus each rank's summary (and stderr in `logs`)."""
    records, summaries = [], []
    for rank in range(world_size):
        res = run_script(["-m", "ldm.data", "--file_list", file_list, "--resolution", str(resolution), "--rank", str(rank),
                          "--world_size", str(world_size), "--num_workers", str(num_workers), "--seed", str(seed), "--buffer_size", "8", *extra])
        assert res.returncode == 0, res.stderr
        rows = [json.loads(line) for line in res.stdout.splitlines()]
        for row in rows:
            row["rank"] = rank
        records += rows
        summaries.append(json.loads(res.stderr.strip().splitlines()[-1]))
        if logs is not None:
            logs.append(res.stderr)
    return records, summaries


@pytest.mark.parametrize("num_parts,world_size,num_workers,parts_per_window",
                         [(3, 1, 0, 4), (5, 2, 2, 4), (10, 4, 4, 4), (1, 2, 3, 4), (8, 1, 0, 3), (9, 2, 1, 2), (4, 1, 1, 1)])
def test_every_record_exactly_once(tmp_path, num_parts, world_size, num_workers, parts_per_window):
    parts = make_parts(tmp_path, num_parts, 7)
    records, summaries = inspect(write_lists(tmp_path, parts), world_size, num_workers, extra=["--parts_per_window", str(parts_per_window)])
    keys = [(r["part"], r["line"]) for r in records]
    expected = {(p, n) for p in parts for n in range(1, 8)}
    assert len(keys) == len(set(keys)), "a record was yielded twice"
    assert set(keys) == expected, "a record was never yielded"
    shards = {(r["rank"], r["worker"]) for r in records}
    assert len(shards) == world_size * max(1, num_workers), "some shard got no records"
    assert sum(s["read"] for s in summaries) == len(expected)
    # Caption text matches the line it came from.
    for r in records:
        p = parts.index(r["part"])
        assert r["caption"] == f"part {p} record {r['line'] - 1}"
        assert r["width"] == r["height"] == 32


def test_stream_is_deterministic_and_reshuffled_per_pass(tmp_path):
    parts = make_parts(tmp_path, 2, 10)
    file_list = write_lists(tmp_path, parts)

    def first(n, seed):
        stream = TextImageStream(file_list, 32, seed=seed, buffer_size=4, rank=0, world_size=1)
        out = []
        for rec in stream.records(stream.shard_stream(0, 1)):
            out.append((rec["part"], rec["line"], rec["pass"]))
            if len(out) == n:
                return out

    a, b = first(40, 0), first(40, 0)
    assert a == b
    assert first(40, 1) != a
    pass0 = [k[:2] for k in a if k[2] == 0]
    pass1 = [k[:2] for k in a if k[2] == 1]
    assert sorted(pass0) == sorted(pass1) and pass0 != pass1


def test_bad_records_are_skipped_and_counted(tmp_path):
    good = jpeg_b64((40, 40))
    lines = [
        f"ok one\t_\t{good}",
        "only two\tcolumns",
        "bad base64\t_\t@@@not-base64@@@",
        f"undecodable\t_\t{base64.b64encode(b'not an image at all').decode()}",
        f"too small\t_\t{jpeg_b64((20, 20))}",
        f"bomb\t_\t{bomb_b64()}",
        f"banner 1:6\t_\t{jpeg_b64((240, 40))}",
        f"ok two\t_\t{good}\textra\tcolumns",
    ]
    part = str(tmp_path / "part-00000.gz")
    write_part(part, lines)
    # A truncated gzip: the first records survive, the cut-off tail is counted once.
    truncated = str(tmp_path / "part-00001.gz")
    write_part(truncated, [f"t{i}\t_\t{good}" for i in range(200)])
    raw = open(truncated, "rb").read()
    open(truncated, "wb").write(raw[: len(raw) // 2])
    missing = str(tmp_path / "part-00002.gz")
    zero_bytes = tmp_path / "part-00003.gz"
    zero_bytes.write_bytes(b"")
    empty_gzip = str(tmp_path / "part-00004.gz")
    write_part(empty_gzip, [])
    plain_named_gz = tmp_path / "part-00005.gz"
    plain_named_gz.write_text(f"plain\t_\t{good}\n")
    plain = str(tmp_path / "part-00006.txt")  # not named .gz: read as plain text (SPEC 2)
    write_part(plain, [f"plain text part\t_\t{good}"])
    file_list = write_lists(tmp_path, [part, truncated, missing, str(zero_bytes), empty_gzip, str(plain_named_gz), plain])
    logs = []
    records, summaries = inspect(file_list, 1, 0, extra=["--max_aspect_ratio", "4"], logs=logs)
    captions = {r["caption"] for r in records}
    assert {"ok one", "ok two", "plain text part"} <= captions
    assert any(c.startswith("t") for c in captions)
    skipped = summaries[0]["skipped"]
    assert skipped["short_line"] == 1
    assert skipped["bad_base64"] == 1
    assert skipped["undecodable_image"] == 1
    assert skipped["too_small"] == 1
    assert skipped["too_many_pixels"] == 1
    assert skipped["extreme_aspect_ratio"] == 1
    assert skipped["missing_part"] == 1
    assert skipped["truncated_part"] == 1
    assert skipped["empty_part"] == 2
    assert skipped["not_gzip"] == 1
    assert skipped["truncated_image"] == 0
    # The first skip of each reason is logged once, with where and why.
    assert re.search(rf"skipped \(undecodable_image\) {re.escape(part)} line 4: UnidentifiedImageError", logs[0])
    assert re.search(rf"skipped \(not_gzip\) {re.escape(str(plain_named_gz))}: starts with b'pl'", logs[0])
    assert re.search(r"skipped \(too_small\) .* line 5: 20x20 pixels", logs[0])
    assert logs[0].count("skipped (empty_part)") == 1
    # Without --max_aspect_ratio the banner is kept (centre-cropped), as the seed does.
    records, _ = inspect(file_list, 1, 0)
    assert "banner 1:6" in {r["caption"] for r in records}


def cut_image_b64(fmt, **save_args):
    """A noisy 64 x 64 image encoded as `fmt`, cut at half its bytes (a half-downloaded file)."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    buf = io.BytesIO()
    image.convert("P" if fmt == "GIF" else "RGB").save(buf, format=fmt, **save_args)
    raw = buf.getvalue()
    return base64.b64encode(raw[: len(raw) // 2]).decode()


CUT_IMAGES = {"png": ("PNG", {}), "jpeg": ("JPEG", {}), "progressive_jpeg": ("JPEG", {"progressive": True}),
              "webp": ("WEBP", {}), "gif": ("GIF", {})}


@pytest.mark.parametrize("name", sorted(CUT_IMAGES))
def test_cut_image_is_a_truncated_image_skip(name):
    fmt, save_args = CUT_IMAGES[name]
    pixels, reason = load_image(base64.b64decode(cut_image_b64(fmt, **save_args)), 32)
    assert pixels is None and reason == "truncated_image"


def test_cut_images_never_stop_the_stream(tmp_path):
    """Pillow opens lazily: a cut file fails only when its pixels are decoded, which must be inside the guard."""
    good = jpeg_b64((40, 40))
    lines = [f"cut {name}\t_\t{cut_image_b64(fmt, **args)}" for name, (fmt, args) in sorted(CUT_IMAGES.items())]
    part = str(tmp_path / "part-00000.gz")
    write_part(part, [f"ok\t_\t{good}", *lines, f"ok again\t_\t{good}"])
    logs = []
    records, summaries = inspect(write_lists(tmp_path, [part]), 1, 0, logs=logs)
    assert sorted(r["caption"] for r in records) == ["ok", "ok again"]
    assert summaries[0]["skipped"]["truncated_image"] == len(CUT_IMAGES)
    assert summaries[0]["skipped"]["undecodable_image"] == 0
    assert len(re.findall(rf"skipped \(truncated_image\) {re.escape(part)} line [2-6]: OSError", logs[0])) == 1


def bomb_b64():
    """A PNG declaring 10000 x 9000 pixels (over Pillow's ~89.5M guard) that compresses to ~90 KB."""
    image = Image.new("L", (10000, 9000))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_decompression_bomb_is_skipped_not_decoded():
    pixels, reason = load_image(base64.b64decode(bomb_b64()), 32)
    assert pixels is None and reason == "too_many_pixels"


@pytest.mark.parametrize(
    "mode,value,expected",
    [
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent -> white
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("LA", (0, 0), (255, 255, 255)),
        ("L", 128, (128, 128, 128)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 32768, (128, 128, 128)),
    ],
)
def test_image_modes_convert_correctly(mode, value, expected):
    rgb = np.asarray(to_rgb(Image.new(mode, (4, 4), value)))
    assert rgb.shape == (4, 4, 3)
    assert np.abs(rgb[0, 0].astype(int) - np.array(expected)).max() <= 1


def test_palette_image_converts():
    image = Image.new("P", (4, 4))
    image.putpalette([0, 0, 255] * 256)
    assert tuple(np.asarray(to_rgb(image))[0, 0]) == (0, 0, 255)


def text_rule(raw):
    """SPEC 2's rule for a line, on its decoded text: (caption, image bytes, skip reason)."""
    try:
        fields = raw.decode("utf-8").rstrip("\r\n").split("\t")
    except UnicodeDecodeError:
        return None, None, "short_line"
    if len(fields) < 3:
        return None, None, "short_line"
    try:
        data = binascii.a2b_base64(fields[2], strict_mode=True)
    except (binascii.Error, ValueError):
        return None, None, "bad_base64"
    return (fields[0], data, None) if data else (None, None, "bad_base64")


def test_lines_split_as_bytes_get_the_verdicts_of_the_decoded_text():
    image = jpeg_b64((40, 40)).encode()
    lines = [b"cap\t_\t" + image + b"\n", "caf\u00e9 \U0001f600\t_\t".encode() + image + b"\r\n", b"cap\t_\t" + image + b"\textra\tcols\n",
             b"cap\t_\tQUJD=\n", b"cap\t_\tQUJD\n", b"cap\t_\tQUJ\n", b"cap\t_\t=QUJD\n", b"cap\t_\tQU JD\n", b"cap\t_\t\n", b"two\tcolumns\n",
             b"\xff\xfe bad caption\t_\t" + image + b"\n", b"cap\t\xff\t" + image + b"\n", b"cap\t_\t" + image + b"\t\xc3(\n",
             b"cap\t_\tQU\xffJD\n", "cap\t_\tQU\u00e9D\n".encode(), b"", b"\n", b"cap\t_\t" + image, b"cap\t_\t" + image + b"\t\r\n",
             b"a\tb\t\n", b"\t\t\r\n", b"cap\t_\t" + image + b"\n\r\n", b"cap\t_\t" + image + b"\r\n\t"]
    for raw in lines:
        assert parse_line(raw) == text_rule(raw), raw[:40]


def test_pixels_are_channels_first_in_rgb_order():
    # Lossless, and at --resolution 64 a 64 x 64 image is neither scaled nor cropped.
    hwc = np.zeros((64, 64, 3), np.uint8)
    hwc[..., 0] = np.arange(64)[None, :] * 4  # red grows left to right
    hwc[..., 1] = np.arange(64)[:, None] * 4  # green grows top to bottom
    hwc[..., 2] = 77
    buf = io.BytesIO()
    Image.fromarray(hwc).save(buf, format="PNG")
    pixels = decode_image(buf.getvalue(), 64)
    assert pixels.shape == (3, 64, 64) and pixels.flags.writeable
    np.testing.assert_array_equal(pixels, hwc.transpose(2, 0, 1))


def test_pixels_are_resized_and_cropped():
    pixels, reason = load_image(base64.b64decode(jpeg_b64((64, 48), (255, 255, 255))), 32)
    assert reason is None and pixels.shape == (3, 32, 32) and pixels.dtype == np.uint8
    assert pixels.min() >= 250  # white stays white through resize and crop


def test_list_errors_are_one_line(tmp_path):
    res = run_script(["-m", "ldm.data", "--file_list", str(tmp_path / "nope.list")])
    assert res.returncode == 2 and "does not exist" in res.stderr
    bad = tmp_path / "bad.list"
    bad.write_text(f"{tmp_path / 'missing.filelist'}\n")
    with pytest.raises(ValueError, match="does not exist"):
        read_file_list(str(bad))
    weighted = tmp_path / "w.list"
    weighted.write_text(f"{bad} abc\n")
    with pytest.raises(ValueError, match="not a number"):
        read_file_list(str(weighted))


def test_lists_skip_comments_and_resolve_relative_paths(tmp_path, monkeypatch):
    parts = make_parts(tmp_path, 2, 1)
    (tmp_path / "rel.filelist").write_text("# a comment\n\n" + "\n".join(os.path.basename(p) for p in parts) + "\n")
    (tmp_path / "rel.list").write_text("# lists\n./rel.filelist 2.5\n")
    monkeypatch.chdir(tmp_path)
    entries = read_file_list("rel.list")
    assert len(entries) == 1 and entries[0].weight == 2.5 and len(entries[0].parts) == 2


def test_weighted_filelists_are_drawn_by_weight(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = make_parts(tmp_path / "a", 1, 50)
    b = make_parts(tmp_path / "b", 1, 50)
    (tmp_path / "a.filelist").write_text(a[0] + "\n")
    (tmp_path / "b.filelist").write_text(b[0] + "\n")
    (tmp_path / "w.list").write_text(f"{tmp_path / 'a.filelist'} 3\n{tmp_path / 'b.filelist'} 1\n")
    stream = ShardStream(read_file_list(str(tmp_path / "w.list")), 0, 1, seed=0, window=4)
    drawn = [rec.list_index for _, rec in zip(range(400), stream)]
    share_a = drawn.count(0) / len(drawn)
    assert 0.68 < share_a < 0.82


@pytest.mark.parametrize("parts_per_window", [1, 2, 4])
@pytest.mark.parametrize("cut", [0, 1, 5, 13, 29, 57])
def test_stream_resumes_exactly_from_a_saved_position(tmp_path, cut, parts_per_window):
    """Restarting a shard from the position after record `cut` yields what the uninterrupted stream yields next."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = make_parts(tmp_path / "a", 3, 7), make_parts(tmp_path / "b", 2, 5)
    (tmp_path / "a.filelist").write_text("\n".join(a) + "\n")
    (tmp_path / "b.filelist").write_text("\n".join(b) + "\n")
    (tmp_path / "w.list").write_text(f"{tmp_path / 'a.filelist'} 2\n{tmp_path / 'b.filelist'}\n")
    entries = read_file_list(str(tmp_path / "w.list"))

    def take(stream, n):
        out = []
        for rec in stream:
            out.append((rec.part, rec.line, rec.pass_index))
            if len(out) == n:
                return out, stream.state.copy()

    def stream(state=None):
        return ShardStream(entries, 1, 2, seed=3, window=3, state=state, parts_per_window=parts_per_window)

    full, _ = take(stream(), 80)
    head, state = take(stream(), cut) if cut else ([], None)
    tail, _ = take(stream(state), 80 - cut)
    assert head + tail == full


def test_a_batch_mixes_several_parts(tmp_path):
    """LAION parts are in crawl order: a worker reads --parts_per_window parts side by side into each window."""
    parts = [str(tmp_path / f"part-{p:05d}.gz") for p in range(8)]
    for p, path in enumerate(parts):
        write_part(path, [f"part {p} line {n}\t_\tAAAA" for n in range(192)])  # raw records: never decoded here
    entries = read_file_list(write_lists(tmp_path, parts))

    def parts_per_batch(parts_per_window):
        stream = ShardStream(entries, 0, 1, seed=0, window=64, parts_per_window=parts_per_window)
        records = [rec.part for _, rec in zip(range(8 * 192), stream)]
        assert sorted(records) == sorted(p for p in parts for _ in range(192)), "one pass reads every record once"
        return np.mean([len(set(records[i : i + 16])) for i in range(0, len(records), 16)])

    assert parts_per_batch(1) == 1.0  # the seed's way: every batch from one part
    assert parts_per_batch(4) > 3.5


def test_exif_orientation_is_applied_before_the_crop():
    """A phone photo stores its pixels sideways plus an EXIF orientation; the model must see it upright."""
    upright = Image.new("RGB", (64, 32), (255, 0, 0))
    upright.paste((0, 0, 255), (32, 0, 64, 32))  # left half red, right half blue
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 32 x 64, as the camera wrote it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    pixels, reason = load_image(buf.getvalue(), 32)
    assert reason is None and pixels.shape == (3, 32, 32)
    left, right = pixels[:, :, :8].reshape(3, -1).mean(1), pixels[:, :, -8:].reshape(3, -1).mean(1)
    assert left[0] > 200 and left[2] < 60, "left of the crop should be red"
    assert right[2] > 200 and right[0] < 60, "right of the crop should be blue"


def test_max_aspect_ratio_skips_elongated_images():
    banner = base64.b64decode(jpeg_b64((240, 40)))
    assert load_image(banner, 32)[1] is None  # kept by default, as the seed does
    assert load_image(banner, 32, max_aspect_ratio=6.0)[1] is None
    assert load_image(banner, 32, max_aspect_ratio=5.9) == (None, "extreme_aspect_ratio")
    tall = base64.b64decode(jpeg_b64((40, 240)))
    assert load_image(tall, 32, max_aspect_ratio=3.0) == (None, "extreme_aspect_ratio")


def collated(stream, batches, batch_size=4):
    """The first `batches` batches of a stream through paddle's DataLoader (as training reads it)."""
    from paddle.io import DataLoader

    loader = DataLoader(as_paddle_dataset(stream), batch_size=batch_size, num_workers=0)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == batches:
            return out


def test_caption_dropout_is_drawn_per_record_from_its_place_in_the_stream(shapes):
    """A record's caption is dropped iff default_rng([seed, shard, draw, 3]).random() < p, read
    from the start or resumed at a draw that is not a multiple of the draws made at a time."""
    from paddlenlp.transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(shapes["tokenizer"])
    stream = TextImageStream(shapes["file_list"], 32, tokenizer, 16, 0.3, buffer_size=16, seed=7, rank=0, world_size=1)
    empty = stream.encode_caption("")
    samples = list(itertools.islice(stream, 128))
    dropped = [bool((s["input_ids"] == empty).all()) for s in samples]
    expected = [np.random.default_rng([7, 0, int(s["position"][0]), 3]).random() < 0.3 for s in samples]
    assert dropped == expected and 20 < sum(dropped) < 60
    stream.resume({"world_size": 1, "num_workers": 1, "batches": 37, "workers": {"0": {"position": samples[36]["position"].tolist(), "skips": [0]}}}, 0)
    resumed = [bool((s["input_ids"] == empty).all()) for s in itertools.islice(stream, 128 - 37)]
    assert resumed == dropped[37:]


def test_a_pass_with_every_record_skipped_stops_the_run(tmp_path, shapes):
    """40 px images at --resolution 64: the stream must not spin; it sends sentinels that set progress.fatal."""
    from paddlenlp.transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(shapes["tokenizer"])
    parts = make_parts(tmp_path, 3, 30, size=(40, 36))
    stream = TextImageStream(write_lists(tmp_path, parts), 64, tokenizer, 16, seed=0, rank=0, world_size=1, buffer_size=8)
    start = time.time()
    progress = StreamProgress(1, 0)
    for batch in collated(stream, 3):
        assert batch["pixel_values"].shape == [4, 3, 64, 64] and batch["input_ids"].shape == [4, 16]
        progress.update(batch)
        assert set(batch) == {"pixel_values", "input_ids"}, "bookkeeping (data_error included) is popped"
    assert time.time() - start < 30
    assert progress.fatal is not None and "\n" not in progress.fatal
    assert "too_small: 90" in progress.fatal and "smaller than --resolution 64" in progress.fatal


def test_real_samples_carry_no_data_error_and_fatal_stays_unset(tmp_path):
    stream = TextImageStream(write_lists(tmp_path, make_parts(tmp_path, 2, 6)), 32, seed=0, rank=0, world_size=1, buffer_size=4)
    progress = StreamProgress(1, 0)
    for batch in collated(stream, 6):  # 24 samples: two passes over 12 records
        progress.update(batch)
    assert progress.fatal is None


def test_one_barren_filelist_does_not_stop_the_others(tmp_path):
    (tmp_path / "small").mkdir()
    good = make_parts(tmp_path, 1, 5, size=(40, 36))
    small = make_parts(tmp_path / "small", 1, 5, size=(20, 20))
    (tmp_path / "good.filelist").write_text(good[0] + "\n")
    (tmp_path / "small.filelist").write_text(small[0] + "\n")
    (tmp_path / "w.list").write_text(f"{tmp_path / 'good.filelist'}\n{tmp_path / 'small.filelist'}\n")
    stream = TextImageStream(str(tmp_path / "w.list"), 32, seed=0, rank=0, world_size=1, buffer_size=4)
    samples = [s for _, s in zip(range(40), stream)]  # 8 passes of the good filelist
    assert all(s["data_error"] == 0 for s in samples)
    assert samples[-1]["skips"][SKIP_REASONS.index("too_small")] >= 20


def test_one_bad_part_never_stops_a_shard_that_reads_one_part_a_pass(tmp_path):
    """4 parts over 4 shards: each pass a shard may get only the bad part, but later passes bring good ones."""
    parts = make_parts(tmp_path, 3, 4)
    bad = tmp_path / "part-00003.gz"
    bad.write_text("plain text, not gzip\n")
    stream = TextImageStream(write_lists(tmp_path, parts + [str(bad)]), 32, seed=0, rank=0, world_size=1, buffer_size=4)
    for worker in range(4):
        shard = stream.shard_stream(worker, 4)
        got = [rec for _, rec in zip(range(30), stream.records(shard))]
        assert len(got) == 30 and not shard.barren
        assert shard.skips["not_gzip"] > 0, "the bad part came up at least once"


def test_parts_that_cannot_be_read_at_all_stop_the_run_with_their_reason(tmp_path):
    parts = []
    for p in range(3):
        path = tmp_path / f"part-{p:05d}.gz"
        path.write_text("a part saved as plain text\n")
        parts.append(str(path))
    stream = TextImageStream(write_lists(tmp_path, parts), 32, seed=0, rank=0, world_size=1)
    sample = next(iter(stream))
    assert sample["data_error"] == 1
    assert "likely cause: its parts named .gz are not gzip files" in explain_barren(skips_from_vector(sample["skips"]))


def test_early_hint_when_the_first_records_are_all_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ldm.data.stream, "EARLY_WARNING_SKIPS", 5)
    stream = TextImageStream(write_lists(tmp_path, make_parts(tmp_path, 1, 8)), 64, seed=0, rank=0, world_size=1)
    list(stream.records(stream.shard_stream(0, 1)))
    err = capsys.readouterr().err
    assert "no usable record among the first 5 read" in err and "too_small: 5" in err


def test_inspect_ends_a_barren_pass_and_says_why(tmp_path):
    res = run_script(["-m", "ldm.data", "--file_list", write_lists(tmp_path, make_parts(tmp_path, 2, 4)), "--resolution", "64"])
    assert res.returncode == 0
    assert res.stdout == ""
    assert "every image was smaller than --resolution 64" in res.stderr
    assert json.loads(res.stderr.strip().splitlines()[-1])["skipped"]["too_small"] == 8


def test_resumed_skip_counts_from_an_older_checkpoint_are_padded(tmp_path):
    stream = TextImageStream(write_lists(tmp_path, make_parts(tmp_path, 1, 3)), 32, seed=0, rank=0, world_size=1)
    old = {"position": [0] * (1 + CURSOR_FIELDS), "skips": [1, 2, 3, 4, 5, 6, 7]}  # before truncated_image etc.
    stream.resume({"world_size": 1, "num_workers": 1, "batches": 0, "workers": {"0": old}}, 0)
    vector = stream.shard_stream(0, 1).skips.as_vector()
    assert vector.tolist() == [1, 2, 3, 4, 5, 6, 7] + [0] * (len(SKIP_REASONS) - 7)


def test_fast_caption_encoder_gives_the_paddlenlp_ids(shapes):
    from paddlenlp.transformers import BertTokenizer

    from ldm.data.tokenizer import CaptionEncoder

    encoder = CaptionEncoder(BertTokenizer.from_pretrained(shapes["tokenizer"]), 16)
    assert encoder.fast is not None, "the fast twin was rejected on the probes"
    for caption in ["a green square on a red background, on the right", "UNSEEN words, Ünïcödé & 中文", "", "a " * 40]:
        ids = encoder(caption)
        assert ids.dtype == np.int64 and ids.shape == (16,)
        assert ids.tolist() == list(encoder.slow_ids(caption))


def test_model_maps_stream_pixels_to_minus_one_one():
    import paddle

    from ldm.models.ldm import to_model_range

    x = paddle.to_tensor(np.array([[[0, 255], [128, 64]]], dtype=np.uint8))
    y = to_model_range(x).numpy()
    assert y.dtype == np.float32 and y.min() == -1.0 and y.max() == 1.0


def test_tokenizer_learns_subwords_from_the_caption_column_only(tmp_path):
    """python -m ldm.tokenizer: a WordPiece vocabulary of at most --vocab_size tokens, learnt from
    column 1 alone (a record with a broken image still lends its caption), loaded by paddlenlp."""
    from paddlenlp.transformers import BertTokenizer

    from ldm.data.tokenizer import CaptionEncoder

    words = ["sun", "flower", "sunlight", "flowers", "garden", "gardener", "photo", "painting", "red", "yellow"]
    rng = np.random.default_rng(0)
    captions = [" ".join(rng.choice(words, 6)) for _ in range(300)]
    part = str(tmp_path / "part-00000.gz")
    write_part(part, [f"{c}\t_\t@@@ not an image @@@" for c in captions] + ["zqxjv\tonly two columns"])
    out = tmp_path / "tok"
    res = run_script(["-m", "ldm.tokenizer", "--file_list", write_lists(tmp_path, [part]), "--output_dir", str(out),
                      "--vocab_size", "60", "--model_max_length", "16"])
    assert res.returncode == 0, res.stderr
    vocab = (out / "vocab.txt").read_text().splitlines()
    assert len(vocab) <= 60 and vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert "z" not in vocab and "q" not in vocab, "a line without 3 columns is not a caption"
    assert any(t.startswith("##") and len(t) > 3 for t in vocab), "learnt multi-character continuation pieces"
    tokenizer = BertTokenizer.from_pretrained(str(out))
    # An unseen word made of seen pieces costs a few tokens, not one per character.
    pieces = tokenizer.tokenize("sunflowers")
    assert "[UNK]" not in pieces and len(pieces) <= 5, pieces  # the old builder: one per character, 10
    # The fast twin (HF tokenizers, same vocab) gives paddlenlp's ids exactly.
    encoder = CaptionEncoder(tokenizer, 16)
    assert encoder.fast is not None
    for caption in captions[:50] + ["Sunflowers in the GARDEN, painting!", "naïve café 中文"]:
        assert encoder(caption).tolist() == list(encoder.slow_ids(caption))


@pytest.mark.parametrize("script", ["trainer", "no_trainer"])
def test_training_on_data_with_nothing_usable_stops_with_the_reason(shapes, vae_dir, tmp_path, script):
    """The built-in 40 px sample images at --resolution 64: every record is skipped. The run must
    stop (exit 1) within seconds with one line naming the skips and the cause, never spin."""
    args = ldm_args(shapes, vae_dir, tmp_path / "out", 10, ["--resolution", "64", "--image_logging_steps", "0"])
    if script == "no_trainer":
        args = ["train_txt2img_laion400m_no_trainer.py", "--output_dir", str(tmp_path / "out"), "--train_batch_size", "4",
                "--max_train_steps", "10", "--num_workers", "1", "--vae_name_or_path", str(vae_dir), "--file_list", shapes["file_list"],
                "--text_encoder_config_file", "config/tiny/ldmbert.json", "--unet_config_file", "config/tiny/unet.json",
                "--tokenizer_name", shapes["tokenizer"], "--model_max_length", "16", "--resolution", "64", "--image_logging_steps", "0"]
    start = time.time()
    res = run_script(args, timeout=180)
    assert res.returncode == 1, res.stderr[-3000:]
    assert time.time() - start < 90
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert errors[0].startswith("error: nothing to train on") and "too_small: 128" in errors[0] and "smaller than --resolution 64" in errors[0]
