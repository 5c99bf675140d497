"""Aspect-ratio buckets: sizes, choice, the crop, one bucket per batch, exactly once, exact resume."""
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_script, write_lists, write_part
from ldm.data.progress import StreamProgress, pack_bookkeeping
from ldm.data.stream import TextImageStream
from ldm.data.records import decode_image
from ldm.data.buckets import choose_bucket, make_buckets

SHAPES = [(64, 32), (32, 64), (48, 48), (60, 40), (40, 60), (90, 30)]  # landscape, portrait, square, 3:2, 2:3, 3:1


def test_buckets_for_ldm_32l_and_the_tiny_preset():
    for resolution, step in [(256, 64), (512, 64), (32, 8)]:
        buckets = make_buckets(resolution, step)
        assert (resolution, resolution) in buckets
        for w, h in buckets:
            assert w % step == 0 and h % step == 0
            assert w * h <= resolution**2 and max(w, h) <= 2 * min(w, h)
            assert w * h >= 0.75 * resolution**2  # "about --resolution^2 pixels"
    assert len(make_buckets(512, 64)) >= 5
    assert make_buckets(32, 8, max_ratio=3.0)[0][0] * 3 >= make_buckets(32, 8, max_ratio=3.0)[0][1]


def test_the_nearest_ratio_is_chosen():
    buckets = make_buckets(512, 64)
    assert choose_bucket(1000, 1000, buckets) == (512, 512)
    widest = max(buckets, key=lambda b: b[0] / b[1])
    assert choose_bucket(1200, 600, buckets) == widest  # 2:1 is beyond the widest (640x384) at 64 px steps
    assert choose_bucket(600, 1200, buckets) == widest[::-1]
    assert choose_bucket(1100, 1000, buckets) == (512, 512)


def halves_png(w, h):
    """Left half red, right half blue: a square crop of a wide image would lose most of both."""
    image = Image.new("RGB", (w, h), (220, 20, 20))
    image.paste((20, 20, 220), (w // 2, 0, w, h))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_a_wide_image_keeps_its_width():
    buckets = make_buckets(32, 8)
    pixels = decode_image(halves_png(80, 40), 32, buckets=buckets)
    _, h, w = pixels.shape
    assert (w, h) == (40, 24) and w > h
    assert pixels[0, :, 0].min() > 200 and pixels[2, :, -1].min() > 200  # both ends survive the crop
    square = decode_image(halves_png(80, 40), 32)
    assert square.shape == (3, 32, 32)


@pytest.fixture
def varied(tmp_path):
    lines = []
    for i in range(60):
        w, h = SHAPES[i % len(SHAPES)]
        lines.append(f"record {i}\t_\t{base64.b64encode(halves_png(w, h)).decode()}")
    parts = []
    for p in range(3):
        path = str(tmp_path / f"part-{p:05d}.gz")
        write_part(path, lines[p * 20 : (p + 1) * 20])
        parts.append(path)
    return write_lists(tmp_path, parts)


def test_cli_reports_each_records_bucket_exactly_once(varied):
    res = run_script(["-m", "ldm.data", "--file_list", varied, "--resolution", "32", "--aspect_ratio_buckets", "--bucket_step", "8",
                      "--world_size", "1", "--num_workers", "2"])
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(rows) == len({(r["part"], r["line"]) for r in rows}) == 60
    sizes = {(r["width"], r["height"]) for r in rows}
    assert sizes <= set(make_buckets(32, 8)) and len(sizes) == 3
    for r in rows:  # each record in the bucket nearest its own shape
        w, h = SHAPES[int(r["caption"].split()[1]) % len(SHAPES)]
        assert (r["width"], r["height"]) == choose_bucket(w, h, make_buckets(32, 8))


def bucketed_stream(file_list, state=None):
    stream = TextImageStream(file_list, 32, seed=5, buffer_size=16, rank=0, world_size=1, aspect_ratio_buckets=True,
                                  bucket_step=8, batch_size=4)
    if state is not None:
        stream.resume(state, 0)
    original = stream._sample

    def with_id(rec, shard, worker):  # tag each sample with its record, to check exactly-once
        sample = original(rec, shard, worker)
        sample["id"] = f"{rec['part']}:{rec['line']}"
        return sample

    stream._sample = with_id
    return stream


def take(stream, n):
    progress = StreamProgress(1, 0)
    batches = []
    for batch in stream:
        batch = pack_bookkeeping(batch)
        progress.update(batch)
        batches.append(batch)
        if len(batches) == n:
            return batches, progress.state_dict()


def test_batches_share_one_bucket_and_resume_exactly(varied):
    straight, _ = take(bucketed_stream(varied), 30)
    for batch in straight:
        assert batch["pixel_values"].shape[0] == 4 and len(set(batch["id"])) == 4
    assert len({b["pixel_values"].shape for b in straight}) == 3
    # Exactly once: the first pass's 60 records, each in one batch, before any repeats.
    first = [i for b in straight[:12] for i in b["id"]]
    assert len(first) == len(set(first))
    for cut in (1, 5, 11):
        head, state = take(bucketed_stream(varied), cut)
        assert any(w.get("carry") for w in state["workers"].values()) or cut == 1
        tail, _ = take(bucketed_stream(varied, json.loads(json.dumps(state))), 30 - cut)
        for a, b in zip(head + tail, straight):
            assert a["id"] == b["id"] and np.array_equal(a["pixel_values"], b["pixel_values"])


def same_order_carry(position):
    """The position with each worker's carry in reading order (by draw). The carry is saved bucket
    by bucket, buckets in the order the worker first used them, and a resumed worker only knows the
    buckets of its carry: so a straight and a resumed run can list the same waiting records with the
    buckets in another order (seen: [(line 14, draw 9), (line 7, draw 5)] against the reverse).
    Each bucket's queue is first in, first out by draw either way, so the batches are the same."""
    for worker in position["workers"].values():
        worker["carry"] = sorted(worker.get("carry", []), key=lambda ref: ref[2])
    return position


@pytest.mark.parametrize("script", ["trainer", "no_trainer"])
def test_bucketed_run_stopped_and_rerun_equals_a_straight_one(shapes, vae_dir, varied, tmp_path, script):
    """Both loops train on bucketed batches (non-square latents through the UNet). A run stopped
    after 2 steps and re-run to 4 ends where a straight 4-step run does: the same data position
    (each worker's draws and the records waiting in its bucket queues) and the same weights."""
    from conftest import loop_resume_args, trainer_resume_args
    from test_resume_exact import max_diff

    if script == "trainer":  # resume settings (2 workers, shuffle buffer, EMA), constant LR: max_steps may change
        def args(out, steps):
            return trainer_resume_args(shapes, vae_dir, out, steps, ["--aspect_ratio_buckets", "--file_list", varied,
                                                                    "--lr_scheduler_type", "constant", "--warmup_steps", "0"])

    else:
        def args(out, steps):
            return loop_resume_args(shapes, vae_dir, out, steps, ["--aspect_ratio_buckets", "--file_list", varied,
                                                                 "--lr_scheduler", "constant", "--lr_warmup_steps", "0"])

    def weights(out):  # both scripts' checkpoints hold the trainable weights as model.safetensors
        from safetensors.numpy import load_file

        return load_file(str(out / "checkpoint-4" / "model.safetensors"))

    straight, split = tmp_path / "straight", tmp_path / "split"
    for out, steps in ((straight, 4), (split, 2), (split, 4)):
        res = run_script(args(out, steps))
        assert res.returncode == 0, res.stderr[-3000:]
    assert "Resuming from" in res.stdout + res.stderr
    a, b = (same_order_carry(json.load(open(d / "checkpoint-4" / "data_position_rank0.json"))) for d in (straight, split))
    assert any(w.get("carry") for w in a["workers"].values())  # records were waiting in the bucket queues
    assert a == b
    diff = max_diff(weights(straight), weights(split))
    print(f"{script}: max abs weight difference {diff:.3e}")
    assert diff <= 1e-6
