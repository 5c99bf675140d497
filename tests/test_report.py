"""ldm.report: counts, skips at a resolution, caption and size statistics, and the HTML page."""
import json

from PIL import Image

from conftest import jpeg_b64, run_script, write_lists, write_part
from ldm.data import report

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "on", "mat"]


def make_data(tmp_path):
    """Two parts with known captions and sizes, and records training skips at 32 px."""
    a = [f"{' '.join(['red cat'] * (i + 1))}\t_\t{jpeg_b64((48, 40))}" for i in range(6)]  # 2, 4, ... 12 words
    a += [f"a tiny cat\t_\t{jpeg_b64((20, 20))}"] * 2  # too small at 32 px
    a += ["bad base64\t_\t!!!not base64!!!", "a short line"]
    b = [f"a cat on a mat xyzzy\t_\t{jpeg_b64((64, 32))}"] * 5  # 6 words; 'xyzzy' is one [UNK]
    write_part(str(tmp_path / "part-00000.gz"), a)
    write_part(str(tmp_path / "part-00001.gz"), b)
    vocab = tmp_path / "tokenizer"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return write_lists(tmp_path, [tmp_path / "part-00000.gz", tmp_path / "part-00001.gz"]), str(vocab)


def test_report_counts_skips_histograms_and_samples(tmp_path):
    file_list, vocab = make_data(tmp_path)
    out = tmp_path / "report"
    res = run_script(["-m", "ldm.report", "--file_list", file_list, "--output_dir", str(out), "--resolution", "32",
                      "--tokenizer", vocab, "--model_max_length", "12", "--num_workers", "2", "--num_samples", "8"])
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.splitlines()[0])
    assert summary["records"] == 15 and summary["usable"] == 11
    assert summary["skipped"] == {"too_small": 2, "bad_base64": 1, "short_line": 1}
    assert summary["caption_words"]["min"] == 2 and summary["caption_words"]["max"] == 12
    # [CLS] + words + [SEP]: 4 .. 14 tokens; only 'red cat' x6 (14) is over 12, x5 (12) fits.
    assert summary["caption_tokens"]["min"] == 4 and summary["caption_tokens"]["max"] == 14
    assert summary["captions_over_model_max_length"] == 1
    assert summary["image_shorter_side"]["min"] == 20 and summary["image_shorter_side"]["max"] == 40
    assert summary["aspect_ratio"]["max"] == 2.0
    page = (out / "index.html").read_text()
    for png in ("caption_words.png", "caption_tokens.png", "image_sides.png", "aspect_ratios.png"):
        assert f'src="{png}"' in page
        assert Image.open(out / png).size[0] > 100
    thumbs = sorted((out / "samples").glob("*.jpg"))
    assert len(thumbs) == 8 and page.count('<img src="samples/') == 8
    assert "a cat on a mat xyzzy" in page and "too_small" in page
    assert f"report: {out / 'index.html'}" in res.stdout


def test_parallel_reading_gives_the_same_report_and_max_records_stops(tmp_path, capsys):
    file_list, vocab = make_data(tmp_path)

    def run(*extra):
        assert report.main(["--file_list", file_list, "--output_dir", str(tmp_path / "r"), "--resolution", "32", *extra]) == 0
        summary = json.loads(capsys.readouterr().out.splitlines()[0])
        summary.pop("seconds")
        return summary, sorted(p.read_bytes() for p in (tmp_path / "r" / "samples").glob("*.jpg"))

    one, three = run("--num_workers", "0"), run("--num_workers", "3")  # 3 workers: parts split by line stride
    assert one == three
    capped, _ = run("--num_workers", "0", "--max_records", "7")
    assert capped["records"] == 7 and capped["usable"] == 6 and capped["skipped"] == {"too_small": 1}
    elongated, _ = run("--num_workers", "0", "--max_aspect_ratio", "1.5")  # the 64x32 images, as training would skip them
    assert elongated["usable"] == 6 and elongated["skipped"]["extreme_aspect_ratio"] == 5
