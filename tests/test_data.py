"""The data stream: list parsing, exactly-once sharding, bad records, image modes."""
import base64
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import jpeg_b64, make_parts, run_script, write_lists, write_part
from ldm import data


def inspect(file_list, world_size, num_workers, resolution=32, seed=0):
    """Records of one pass over all ranks via the real CLI, plus each rank's summary."""
    records, summaries = [], []
    for rank in range(world_size):
        res = run_script(["-m", "ldm.data", "--file_list", file_list, "--resolution", str(resolution), "--rank", str(rank),
                          "--world_size", str(world_size), "--num_workers", str(num_workers), "--seed", str(seed), "--buffer_size", "8"])
        assert res.returncode == 0, res.stderr
        rows = [json.loads(line) for line in res.stdout.splitlines()]
        for row in rows:
            row["rank"] = rank
        records += rows
        summaries.append(json.loads(res.stderr.strip().splitlines()[-1]))
    return records, summaries


@pytest.mark.parametrize("num_parts,world_size,num_workers", [(3, 1, 0), (5, 2, 2), (10, 4, 4), (1, 2, 3)])
def test_every_record_exactly_once(tmp_path, num_parts, world_size, num_workers):
    parts = make_parts(tmp_path, num_parts, 7)
    records, summaries = inspect(write_lists(tmp_path, parts), world_size, num_workers)
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
        stream = data.TextImageStream(file_list, 32, seed=seed, buffer_size=4, rank=0, world_size=1)
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
        f"undecodable\t_\t{jpeg_b64()[:40]}",
        f"too small\t_\t{jpeg_b64((20, 20))}",
        f"bomb\t_\t{bomb_b64()}",
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
    records, summaries = inspect(write_lists(tmp_path, [part, truncated, missing]), 1, 0)
    captions = {r["caption"] for r in records}
    assert {"ok one", "ok two"} <= captions
    assert any(c.startswith("t") for c in captions)
    skipped = summaries[0]["skipped"]
    assert skipped["short_line"] == 1
    assert skipped["bad_base64"] == 1
    assert skipped["undecodable_image"] == 1
    assert skipped["too_small"] == 1
    assert skipped["too_many_pixels"] == 1
    assert skipped["missing_part"] == 1
    assert skipped["truncated_part"] == 1


def bomb_b64():
    """A PNG declaring 10000 x 9000 pixels (over Pillow's ~89.5M guard) that compresses to ~90 KB."""
    image = Image.new("L", (10000, 9000))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_decompression_bomb_is_skipped_not_decoded():
    pixels, reason = data.load_image(base64.b64decode(bomb_b64()), 32)
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
    rgb = np.asarray(data.to_rgb(Image.new(mode, (4, 4), value)))
    assert rgb.shape == (4, 4, 3)
    assert np.abs(rgb[0, 0].astype(int) - np.array(expected)).max() <= 1


def test_palette_image_converts():
    image = Image.new("P", (4, 4))
    image.putpalette([0, 0, 255] * 256)
    assert tuple(np.asarray(data.to_rgb(image))[0, 0]) == (0, 0, 255)


def test_pixels_are_resized_and_cropped():
    pixels, reason = data.load_image(base64.b64decode(jpeg_b64((64, 48), (255, 255, 255))), 32)
    assert reason is None and pixels.shape == (3, 32, 32) and pixels.dtype == np.uint8
    assert pixels.min() >= 250  # white stays white through resize and crop


def test_list_errors_are_one_line(tmp_path):
    res = run_script(["-m", "ldm.data", "--file_list", str(tmp_path / "nope.list")])
    assert res.returncode == 2 and "does not exist" in res.stderr
    bad = tmp_path / "bad.list"
    bad.write_text(f"{tmp_path / 'missing.filelist'}\n")
    with pytest.raises(ValueError, match="does not exist"):
        data.read_file_list(str(bad))
    weighted = tmp_path / "w.list"
    weighted.write_text(f"{bad} abc\n")
    with pytest.raises(ValueError, match="not a number"):
        data.read_file_list(str(weighted))


def test_lists_skip_comments_and_resolve_relative_paths(tmp_path, monkeypatch):
    parts = make_parts(tmp_path, 2, 1)
    (tmp_path / "rel.filelist").write_text("# a comment\n\n" + "\n".join(os.path.basename(p) for p in parts) + "\n")
    (tmp_path / "rel.list").write_text("# lists\n./rel.filelist 2.5\n")
    monkeypatch.chdir(tmp_path)
    entries = data.read_file_list("rel.list")
    assert len(entries) == 1 and entries[0].weight == 2.5 and len(entries[0].parts) == 2


def test_weighted_filelists_are_drawn_by_weight(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = make_parts(tmp_path / "a", 1, 50)
    b = make_parts(tmp_path / "b", 1, 50)
    (tmp_path / "a.filelist").write_text(a[0] + "\n")
    (tmp_path / "b.filelist").write_text(b[0] + "\n")
    (tmp_path / "w.list").write_text(f"{tmp_path / 'a.filelist'} 3\n{tmp_path / 'b.filelist'} 1\n")
    stream = data.ShardStream(data.read_file_list(str(tmp_path / "w.list")), 0, 1, seed=0, window=4)
    drawn = [rec.list_index for _, rec in zip(range(400), stream)]
    share_a = drawn.count(0) / len(drawn)
    assert 0.68 < share_a < 0.82


@pytest.mark.parametrize("cut", [0, 1, 5, 13, 29, 57])
def test_stream_resumes_exactly_from_a_saved_position(tmp_path, cut):
    """Restarting a shard from the position after record `cut` yields what the uninterrupted stream yields next."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = make_parts(tmp_path / "a", 3, 7), make_parts(tmp_path / "b", 2, 5)
    (tmp_path / "a.filelist").write_text("\n".join(a) + "\n")
    (tmp_path / "b.filelist").write_text("\n".join(b) + "\n")
    (tmp_path / "w.list").write_text(f"{tmp_path / 'a.filelist'} 2\n{tmp_path / 'b.filelist'}\n")
    entries = data.read_file_list(str(tmp_path / "w.list"))

    def take(stream, n):
        out = []
        for rec in stream:
            out.append((rec.part, rec.line, rec.pass_index))
            if len(out) == n:
                return out, stream.state.copy()

    full, _ = take(data.ShardStream(entries, 1, 2, seed=3, window=3), 80)
    head, state = take(data.ShardStream(entries, 1, 2, seed=3, window=3), cut) if cut else ([], None)
    tail, _ = take(data.ShardStream(entries, 1, 2, seed=3, window=3, state=state), 80 - cut)
    assert head + tail == full


def test_fast_caption_encoder_gives_the_paddlenlp_ids(shapes):
    from paddlenlp.transformers import BertTokenizer

    from ldm.tokenizer import CaptionEncoder

    encoder = CaptionEncoder(BertTokenizer.from_pretrained(shapes["tokenizer"]), 16)
    assert encoder.fast is not None, "the fast twin was rejected on the probes"
    for caption in ["a green square on a red background, on the right", "UNSEEN words, Ünïcödé & 中文", "", "a " * 40]:
        ids = encoder(caption)
        assert ids.dtype == np.int64 and ids.shape == (16,)
        assert ids.tolist() == list(encoder.slow_ids(caption))


def test_model_maps_stream_pixels_to_minus_one_one():
    import paddle

    from ldm.model import to_model_range

    x = paddle.to_tensor(np.array([[[0, 255], [128, 64]]], dtype=np.uint8))
    y = to_model_range(x).numpy()
    assert y.dtype == np.float32 and y.min() == -1.0 and y.max() == 1.0
