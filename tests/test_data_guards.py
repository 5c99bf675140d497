"""The last data guards: records re-read from a bucketed checkpoint's queues go through the skip
guard, a part path naming a FIFO (or any non-file) is skipped without being opened, and
ldm.prepare does not follow a symlink loop."""
import base64
import json
import os

from PIL import Image

from conftest import make_parts, run_script, write_lists, write_part
from ldm.data.records import SKIP_REASONS
from ldm.data.progress import StreamProgress, pack_bookkeeping
from ldm.data.stream import TextImageStream
from test_buckets import SHAPES, halves_png


def elongated_data(tmp_path):
    """60 records of the SHAPES (2:1, 1:2, 1:1, 3:2, 2:3, 3:1) in 3 parts; record i is line i % 20 + 1 of part i // 20."""
    lines = [f"record {i}\t_\t{base64.b64encode(halves_png(*SHAPES[i % len(SHAPES)])).decode()}" for i in range(60)]
    parts = []
    for p in range(3):
        path = str(tmp_path / f"part-{p:05d}.gz")
        write_part(path, lines[p * 20 : (p + 1) * 20])
        parts.append(path)
    return write_lists(tmp_path, parts), parts


def bucketed(file_list, max_aspect_ratio):
    return TextImageStream(file_list, 32, seed=5, buffer_size=16, rank=0, world_size=1, aspect_ratio_buckets=True,
                                bucket_step=8, batch_size=4, max_aspect_ratio=max_aspect_ratio)


def test_carried_records_that_no_longer_decode_are_skipped_and_counted(tmp_path):
    file_list, parts = elongated_data(tmp_path)

    def ratio(part, line):
        w, h = SHAPES[(parts.index(part) * 20 + line - 1) % len(SHAPES)]
        return max(w, h) / min(w, h)

    # A checkpoint whose bucket queues hold records more elongated than 1.4:1.
    progress = StreamProgress(1, 0)
    for batch in bucketed(file_list, 3.5):
        progress.update(pack_bookkeeping(batch))
        carry = progress.state_dict()["workers"]["0"].get("carry", [])
        if sum(ratio(p, n) > 1.4 for p, n, _ in carry) >= 2:
            break
    state = json.loads(json.dumps(progress.state_dict()))
    elongated = sum(ratio(p, n) > 1.4 for p, n, _ in carry)
    before = state["workers"]["0"]["skips"][SKIP_REASONS.index("extreme_aspect_ratio")]

    resumed = bucketed(file_list, 1.4)
    resumed.resume(state, 0)
    batches = [b for _, b in zip(range(3), resumed)]
    assert all(b["data_error"] == 0 for b in batches)
    assert all(max(b["pixel_values"].shape[2:]) <= 1.4 * min(b["pixel_values"].shape[2:]) for b in batches)
    counted = batches[0]["skips"][SKIP_REASONS.index("extreme_aspect_ratio")] - before
    assert counted >= elongated, f"{elongated} carried records over 1.4:1, {counted} counted"


def state_with_carry(file_list):
    """(a bucketed run's checkpoint state as saved, its worker's carry): taken at the first batch
    after which the worker's bucket queues hold records."""
    progress = StreamProgress(1, 0)
    for batch in bucketed(file_list, 3.5):
        progress.update(pack_bookkeeping(batch))
        carry = progress.state_dict()["workers"]["0"].get("carry", [])
        if carry:
            return json.loads(json.dumps(progress.state_dict())), carry
    raise AssertionError("no batch left records in the bucket queues")


def test_carried_records_of_a_part_cut_since_are_counted_not_a_crash(tmp_path):
    """A part cut short after the checkpoint (its gzip stream ends early): the resumed worker counts
    the queued records it held as truncated_part; it used to die on the EOFError, on every re-run."""
    file_list, parts = elongated_data(tmp_path)
    state, carry = state_with_carry(file_list)
    with open(carry[0][0], "r+b") as f:
        f.truncate(50)
    resumed = bucketed(file_list, 3.5)
    resumed.resume(state, 0)
    skips = dict(zip(SKIP_REASONS, next(iter(resumed))["skips"].tolist()))
    held = sum(part == carry[0][0] for part, _, _ in carry)
    assert skips["truncated_part"] >= held and skips["missing_part"] == 0, skips


def test_a_fifo_a_device_or_a_folder_listed_as_a_part_is_skipped_not_opened(tmp_path):
    parts = make_parts(tmp_path, 2, 3)
    fifo = str(tmp_path / "part-fifo.gz")
    os.mkfifo(fifo)  # nobody writes to it: opening it to read would block for ever
    folder = str(tmp_path / "part-folder.gz")
    os.mkdir(folder)
    res = run_script(["-m", "ldm.data", "--file_list", write_lists(tmp_path, [parts[0], fifo, "/dev/null", folder, parts[1]]),
                      "--resolution", "32"], timeout=60)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 6
    summary = json.loads(res.stderr.strip().splitlines()[-1])
    assert summary["skipped"]["not_a_file"] == 3 and summary["skipped"]["missing_part"] == 0
    assert "not a regular file" in res.stderr  # (the first not_a_file skip is logged with why)
    assert SKIP_REASONS[12] == "not_a_file", "new reasons go at the end: checkpoints save the counts in this order"


def test_prepare_reads_each_image_once_through_a_symlink_loop(tmp_path):
    images = tmp_path / "images" / "sub"
    images.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 32), (60 * i, 20, 20)).save(images / f"img{i}.jpg")
        (images / f"img{i}.txt").write_text(f"caption {i}")
    os.symlink("..", images / "up")  # images/sub/up -> images: a loop
    os.symlink(str(images), tmp_path / "images" / "again")  # and the same folder twice
    # (Two links make a loop that is walked ~2^40 ways when followed blindly: hence the timeout.)
    res = run_script(["-m", "ldm.prepare", str(tmp_path / "images"), "--output_dir", str(tmp_path / "out"), "--num_workers", "0"], timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.splitlines()[0])["written"] == 3, res.stdout
