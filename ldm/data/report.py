"""python -m ldm.report: look at a data set before spending GPU days on it.

Reads the parts of a --file_list (SPEC section 2) in parallel, decodes every record the way
training does at --resolution (ldm.data.parse_line and load_image, so the skip counts are the
ones training would log), and writes DIR/index.html: record and skip counts, histograms of
caption length (words, and tokens with --tokenizer) and of image sides and aspect ratios
(PNG, matplotlib), and a page of sample thumbnails with their captions.

The histograms cover every record whose caption and image size could be read, including
those training would skip (an image below --resolution still shows in the side histogram).
Samples are drawn from the records training would use, by a hash of (part, line): the same
data gives the same samples, whatever the number of workers.
"""
import argparse
import html
import heapq
import io
import json
import os
import sys
import time
import warnings
import zlib
from collections import Counter
from typing import List, Optional

import numpy as np
from PIL import ExifTags, Image, ImageOps

from ldm.data.records import SKIP_REASONS, SkipCounter, load_image, parse_line, to_rgb
from ldm.data.filelists import iter_unit_lines, make_units, read_file_list
from ldm.data.prepare import Workers, default_workers

THUMB_SIDE = 192  # longer side of a sample thumbnail, pixels


def header_size(data: bytes):
    """(width, height) as the image is meant to be seen (EXIF quarter turns applied), or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8):
                w, h = h, w
        return w, h
    except Exception:  # not an image: counted by load_image's verdict
        return None


class TokenCounter:
    """Tokens per caption (with [CLS] and [SEP], before truncation) for a BERT WordPiece directory:
    HF `tokenizers`' implementation of the same algorithm the paddlenlp BertTokenizer runs."""

    def __init__(self, tokenizer_dir: str):
        from tokenizers import BertWordPieceTokenizer

        config_path = os.path.join(tokenizer_dir, "tokenizer_config.json")
        lower = True
        if os.path.isfile(config_path):
            with open(config_path) as f:
                lower = bool(json.load(f).get("do_lower_case", True))
        self.tokenizer = BertWordPieceTokenizer(os.path.join(tokenizer_dir, "vocab.txt"), lowercase=lower)

    def __call__(self, captions: List[str]) -> List[int]:
        return [len(e.ids) for e in self.tokenizer.encode_batch(captions)]


def thumbnail(data: bytes) -> Optional[bytes]:
    """A small upright JPEG of a record training accepted; None in the unlikely case it fails (one sample fewer)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (THUMB_SIDE, THUMB_SIDE))
        image = to_rgb(ImageOps.exif_transpose(image))
        image.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
        return out.getvalue()
    except Exception:
        return None


def analyse_unit(task) -> dict:
    """Read one unit (a part, or a line-stride slice of one): per-record arrays in line order."""
    unit, resolution, max_aspect_ratio, limit, num_samples, tokenizer_dir = task
    skips = SkipCounter()  # part-level: missing, truncated, ... parts
    reasons, words, sides, captions = [], [], [], []
    candidates = []  # heap of (-priority, record index, line, caption, image bytes): the num_samples lowest priorities
    for line_no, raw in iter_unit_lines(unit, skips):
        if len(reasons) >= limit:
            break
        caption, data, reason = parse_line(raw)
        size = None
        if reason is None:
            size = header_size(data)
            _, reason = load_image(data, resolution, max_aspect_ratio)
        reasons.append(reason)
        words.append(len(caption.split()) if caption is not None else -1)
        sides.append(size or (-1, -1))
        captions.append(caption if caption is not None else "")
        if reason is None:
            priority = zlib.crc32(f"{unit.part}:{line_no}".encode())
            item = (-priority, len(reasons) - 1, line_no, caption, data)
            if len(candidates) < num_samples:
                heapq.heappush(candidates, item)
            elif item > candidates[0]:
                heapq.heapreplace(candidates, item)
    tokens = TokenCounter(tokenizer_dir)(captions) if tokenizer_dir and captions else []
    tokens = [t if w >= 0 else -1 for t, w in zip(tokens, words)]
    samples = [{"priority": -c[0], "index": c[1], "part": unit.part, "line": c[2], "caption": c[3], "thumb": thumbnail(c[4])} for c in candidates]
    samples = [s for s in samples if s["thumb"] is not None]
    return {"reasons": reasons, "words": words, "tokens": tokens, "sides": sides, "part_skips": dict(skips), "samples": samples}


def gather(units, args) -> dict:
    """Run analyse_unit over the units (in worker processes), in unit order, up to --max_records."""
    limit = args.max_records or sys.maxsize
    tasks = [(u, args.resolution, args.max_aspect_ratio, limit, args.num_samples, args.tokenizer) for u in units]
    total = {"reasons": [], "words": [], "tokens": [], "sides": [], "part_skips": Counter(), "samples": []}

    def take(result):
        room = limit - len(total["reasons"])
        for key in ("reasons", "words", "tokens", "sides"):
            total[key] += result[key][:room]
        total["part_skips"].update(result["part_skips"])
        total["samples"] += [s for s in result["samples"] if s["index"] < room]
        return len(total["reasons"]) >= limit

    from tqdm import tqdm

    bar = tqdm(total=len(tasks), unit="part", desc="report", file=sys.stderr, dynamic_ncols=True)
    with Workers(args.num_workers) as workers:
        for result in workers.map(analyse_unit, tasks):  # in unit order, so --max_records cuts the same records every run
            bar.update()
            if take(result):
                break  # leaving the with-block stops the workers still reading
    bar.close()
    total["samples"] = sorted(total["samples"], key=lambda s: s["priority"])[: args.num_samples]
    return total


def percentiles(values) -> dict:
    if len(values) == 0:
        return {}
    q = np.percentile(values, [0, 5, 50, 95, 100])
    return dict(zip(("min", "p5", "median", "p95", "max"), (round(float(v), 2) for v in q)))


def plot_histograms(stats, args, out_dir) -> List[str]:
    """One PNG per histogram; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    names = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=90)
        plt.close(fig)
        names.append(name)

    def count_bins(values):  # one bar per count while that stays readable
        return np.arange(0, max(values) + 2) - 0.5 if max(values) < 120 else 60

    words = stats["words"]
    if len(words):
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.hist(words, bins=count_bins(words), color="#4c72b0")
        ax.set(title="Caption length (words)", xlabel="words", ylabel="records")
        save(fig, "caption_words.png")
    tokens = stats["tokens"]
    if len(tokens):
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.hist(tokens, bins=count_bins(tokens), color="#55a868")
        ax.axvline(args.model_max_length, color="#c44e52", linestyle="--", label=f"--model_max_length {args.model_max_length}")
        ax.set(title="Caption length (tokens, with [CLS] and [SEP])", xlabel="tokens", ylabel="records")
        ax.legend()
        save(fig, "caption_tokens.png")
    short, long_ = stats["short"], stats["long"]
    if len(short):
        fig, ax = plt.subplots(figsize=(6, 3.2))
        top = max(long_)
        bins = np.linspace(0, top + 1, 60)
        ax.hist(short, bins=bins, alpha=0.7, label="shorter side", color="#4c72b0")
        ax.hist(long_, bins=bins, alpha=0.5, label="longer side", color="#dd8452")
        ax.axvline(args.resolution, color="#c44e52", linestyle="--", label=f"--resolution {args.resolution}")
        ax.set(title="Image sides", xlabel="pixels", ylabel="records")
        ax.legend()
        save(fig, "image_sides.png")
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ratios = np.clip(stats["aspect"], 1 / 4, 4)
        ax.hist(ratios, bins=np.geomspace(1 / 4, 4, 49), color="#8172b3")
        if args.max_aspect_ratio:
            for r in (1 / args.max_aspect_ratio, args.max_aspect_ratio):
                ax.axvline(r, color="#c44e52", linestyle="--", label=f"--max_aspect_ratio {args.max_aspect_ratio:g}" if r > 1 else None)
            ax.legend()
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([0.25, 0.5, 0.75, 1, 4 / 3, 2, 4], ["1:4", "1:2", "3:4", "1:1", "4:3", "2:1", "4:1"])
        ax.set(title="Aspect ratio (width : height; clipped to 1:4 .. 4:1)", xlabel="width / height", ylabel="records")
        save(fig, "aspect_ratios.png")
    return names


def summarise(total, args) -> dict:
    reasons = total["reasons"]
    words = np.array([w for w in total["words"] if w >= 0])
    tokens = np.array([t for t in total["tokens"] if t >= 0])
    sides = np.array([s for s in total["sides"] if s[0] > 0], dtype=np.float64).reshape(-1, 2)
    skips = Counter(r for r in reasons if r is not None)
    skips.update(total["part_skips"])
    stats = {"words": words, "tokens": tokens, "short": sides.min(axis=1) if len(sides) else [],
             "long": sides.max(axis=1) if len(sides) else [], "aspect": sides[:, 0] / sides[:, 1] if len(sides) else []}
    summary = {
        "records": len(reasons),
        "usable": sum(r is None for r in reasons),
        "resolution": args.resolution,
        "skipped": {r: skips[r] for r in list(SKIP_REASONS) + sorted(set(skips) - set(SKIP_REASONS)) if skips[r]},
        "caption_words": percentiles(words),
        "image_shorter_side": percentiles(stats["short"]),
        "aspect_ratio": percentiles(stats["aspect"]),
    }
    if len(tokens):
        summary["caption_tokens"] = percentiles(tokens)
        summary["captions_over_model_max_length"] = int((tokens > args.model_max_length).sum())
    return summary, stats


def write_html(summary, pngs, samples, args, out_dir) -> str:
    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
    cells = []
    for i, s in enumerate(samples):
        name = f"samples/{i:03d}.jpg"
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(s["thumb"])
        where = f"{os.path.basename(s['part'])}:{s['line']}"
        cells.append(f'<figure><img src="{name}" loading="lazy"><figcaption>{html.escape(s["caption"])}'
                     f'<br><small>{html.escape(where)}</small></figcaption></figure>')
    rows = "".join(f"<tr><td>{html.escape(r)}</td><td>{n}</td></tr>" for r, n in summary["skipped"].items()) or "<tr><td>none</td><td>0</td></tr>"
    dists = "".join(f"<tr><td>{k.replace('_', ' ')}</td>" + "".join(f"<td>{v}</td>" for v in summary[k].values()) + "</tr>"
                    for k in ("caption_words", "caption_tokens", "image_shorter_side", "aspect_ratio") if summary.get(k))
    over = ""
    if "captions_over_model_max_length" in summary:
        over = f"<p>{summary['captions_over_model_max_length']} captions are longer than {args.model_max_length} tokens and would be truncated.</p>"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Data report: {html.escape(args.file_list)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1400px}} table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}} td:first-child{{text-align:left}}
.grid{{display:flex;flex-wrap:wrap;gap:10px}} figure{{width:{THUMB_SIDE}px;margin:0}} figure img{{max-width:{THUMB_SIDE}px;max-height:{THUMB_SIDE}px}}
figcaption{{font-size:12px}} .plots img{{margin:4px}}</style></head><body>
<h1>Data report</h1>
<p><code>{html.escape(args.file_list)}</code>: {summary['records']} records read{' (stopped at --max_records)' if args.max_records and summary['records'] >= args.max_records else ''};
<b>{summary['usable']}</b> usable at --resolution {args.resolution}.</p>
<h2>Skipped at --resolution {args.resolution}{f' --max_aspect_ratio {args.max_aspect_ratio:g}' if args.max_aspect_ratio else ''}</h2><table><tr><th>reason</th><th>records</th></tr>{rows}</table>
<h2>Distributions</h2><table><tr><th></th><th>min</th><th>5%</th><th>median</th><th>95%</th><th>max</th></tr>{dists}</table>{over}
<div class="plots">{''.join(f'<img src="{p}">' for p in pngs)}</div>
<h2>Samples ({len(samples)} usable records, picked by a hash of part and line)</h2><div class="grid">{''.join(cells)}</div>
</body></html>
"""
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldm.report", description=__doc__.splitlines()[0])
    p.add_argument("--file_list", required=True, metavar="F", help="The file list list to look at (as given to training).")
    p.add_argument("--output_dir", required=True, metavar="DIR", help="Where index.html, the histogram PNGs and samples/ go.")
    p.add_argument("--resolution", type=int, metavar="PX", default=256, help="Training image side, pixels: records training would skip at it are counted by reason.")
    p.add_argument("--max_aspect_ratio", type=float, default=None, metavar="R",
                   help="As in training: records whose longer side is over R times the shorter are counted as skipped (extreme_aspect_ratio).")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="A tokenizer directory with a BERT vocab.txt (as python -m ldm.tokenizer writes): adds a token-count histogram.")
    p.add_argument("--model_max_length", type=int, metavar="N", default=77, help="Tokens per caption in training: captions longer than this are counted (they get truncated).")
    p.add_argument("--max_records", type=int, metavar="N", default=0, help="Stop after this many records (lines), in part order; 0 reads everything.")
    p.add_argument("--num_samples", type=int, metavar="N", default=48, help="Sample thumbnails with captions on the page.")
    p.add_argument("--num_workers", type=int, metavar="K", default=default_workers(), help="Processes reading parts in parallel (0: this process); default: one per CPU core.")
    args = p.parse_args(argv)
    if args.tokenizer and not os.path.isfile(os.path.join(args.tokenizer, "vocab.txt")):
        p.error(f"--tokenizer {args.tokenizer!r} has no vocab.txt (python -m ldm.tokenizer writes one)")
    t0 = time.time()
    try:
        entries = read_file_list(args.file_list)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parts = [part for e in entries for part in e.parts]
    # One unit a part; with fewer parts than workers, parts are split by line stride so every worker has some.
    units = make_units(parts, max(1, args.num_workers))
    try:
        total = gather(units, args)
    except KeyboardInterrupt:
        print("interrupted: no report written", file=sys.stderr)
        return 130
    summary, stats = summarise(total, args)
    os.makedirs(args.output_dir, exist_ok=True)
    pngs = plot_histograms(stats, args, args.output_dir)
    page = write_html(summary, pngs, total["samples"], args, args.output_dir)
    summary["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary))
    print(f"report: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
