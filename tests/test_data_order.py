"""A resume never changes the data order silently: the order's fingerprint is saved with every
checkpoint, and a changed setting or file list stops the resume at start-up, naming it."""
import json
import os

import pytest

from conftest import make_parts, run_script, write_lists
from conftest import loop_resume_args as no_trainer_args
from ldm.training import checkpoint, data_position
from ldm.data.progress import StreamProgress, pack_bookkeeping
from ldm.data.stream import TextImageStream


def make_data(tmp_path, num_parts=4, records=6):
    (tmp_path / "parts").mkdir(exist_ok=True)
    parts = make_parts(tmp_path / "parts", num_parts, records)
    (tmp_path / "a.filelist").write_text("\n".join(parts[:-1]) + "\n")
    (tmp_path / "b.filelist").write_text(parts[-1] + "\n")
    (tmp_path / "w.list").write_text(f"{tmp_path / 'a.filelist'} 3\n{tmp_path / 'b.filelist'}\n")
    return str(tmp_path / "w.list"), parts


def stream_of(file_list, resolution=32, seed=0, buffer_size=8, parts_per_window=4):
    return TextImageStream(file_list, resolution, seed=seed, buffer_size=buffer_size, parts_per_window=parts_per_window, rank=0, world_size=1)


def save_position(stream, ckpt, records=5, resolution=32):
    """A checkpoint directory with the data position after `records` records, as the training loops write it."""
    progress = StreamProgress(1, 0, stream=stream)
    for sample in (s for _, s in zip(range(records), stream)):
        progress.update(pack_bookkeeping(sample))
    os.makedirs(ckpt, exist_ok=True)
    with open(data_position.data_position_file(str(ckpt), 0), "w") as f:
        json.dump(progress.state_dict(), f)
    with open(os.path.join(ckpt, "args.json"), "w") as f:
        json.dump({"resolution": resolution, "aspect_ratio_buckets": False}, f)
    return progress.state_dict()


def resume(stream, ckpt, ignore_data_skip=False):
    return data_position.resume_data_stream(stream, str(ckpt), 0, 0, ignore_data_skip)


@pytest.mark.parametrize("change,expected", [
    ("seed", "--seed 0 -> 1"),
    ("buffer_size", "--shuffle_buffer 8 -> 16"),
    ("parts_per_window", "--parts_per_window 4 -> 2"),
    ("append_part", "a.filelist: parts added: 1 (first: "),
    ("remove_part", "a.filelist: parts removed: 1 (first: "),
    ("resize_part", "a.filelist: resized: 1 (first: "),
    ("weight", "weight of filelist "),
    ("add_filelist", "c.filelist added"),
])
def test_a_changed_order_stops_the_resume_naming_what_changed(tmp_path, change, expected):
    file_list, parts = make_data(tmp_path)
    save_position(stream_of(file_list), tmp_path / "checkpoint-4")
    kw = {}
    if change == "seed":
        kw["seed"] = 1
    elif change == "buffer_size":
        kw["buffer_size"] = 16
    elif change == "parts_per_window":
        kw["parts_per_window"] = 2
    elif change == "append_part":
        extra = make_parts(tmp_path, 1, 3)[0]
        with open(tmp_path / "a.filelist", "a") as f:
            f.write(extra + "\n")
    elif change == "remove_part":
        (tmp_path / "a.filelist").write_text("\n".join(parts[:2]) + "\n")
    elif change == "resize_part":
        with open(parts[1], "ab") as f:  # a part re-downloaded with more lines: every later window moves
            f.write(open(parts[0], "rb").read())
    elif change == "weight":
        (tmp_path / "w.list").write_text(f"{tmp_path / 'a.filelist'} 2\n{tmp_path / 'b.filelist'}\n")
    elif change == "add_filelist":
        (tmp_path / "c.filelist").write_text(parts[0] + "\n")
        with open(tmp_path / "w.list", "a") as f:
            f.write(f"{tmp_path / 'c.filelist'}\n")
    with pytest.raises(ValueError) as e:
        resume(stream_of(file_list, **kw), tmp_path / "checkpoint-4")
    message = str(e.value)
    assert "\n" not in message and expected in message, message
    assert "Put the setting back" in message and "--ignore_data_skip" in message and "--output_dir" in message
    # --ignore_data_skip takes the new settings for a new pass instead.
    assert resume(stream_of(file_list, **kw), tmp_path / "checkpoint-4", ignore_data_skip=True) is None


def test_an_unchanged_order_resumes_and_a_new_resolution_starts_a_new_pass(tmp_path):
    file_list, _ = make_data(tmp_path)
    saved = save_position(stream_of(file_list), tmp_path / "checkpoint-4")
    stream = stream_of(file_list)
    assert resume(stream, tmp_path / "checkpoint-4") == saved and stream.resume_state == saved
    # A resolution stage (SPEC 6) with another buffer too: a new pass, not a refusal.
    assert resume(stream_of(file_list, resolution=24, buffer_size=4), tmp_path / "checkpoint-4") is None


def test_a_checkpoint_without_fingerprint_resumes_with_a_warning(tmp_path):
    import io
    import logging

    from paddlenlp.utils.log import logger

    said = io.StringIO()
    handler = logging.StreamHandler(said)  # paddlenlp's logger does not propagate: listen to it directly
    logger.logger.addHandler(handler)
    file_list, _ = make_data(tmp_path)
    saved = save_position(stream_of(file_list), tmp_path / "checkpoint-4")
    del saved["data_order"]
    with open(data_position.data_position_file(str(tmp_path / "checkpoint-4"), 0), "w") as f:
        json.dump(saved, f)
    stream = stream_of(file_list, buffer_size=16)
    assert resume(stream, tmp_path / "checkpoint-4") == saved
    logger.logger.removeHandler(handler)
    assert "has no data-order fingerprint" in said.getvalue()


def test_the_training_script_refuses_a_changed_shuffle_buffer_on_resume(shapes, vae_dir, tmp_path):
    out = tmp_path / "run"
    res = run_script(no_trainer_args(shapes, vae_dir, out, 2, ["--num_workers", "1", "--save_steps", "2"]))
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_script(no_trainer_args(shapes, vae_dir, out, 4, ["--num_workers", "1", "--save_steps", "2", "--shuffle_buffer", "8"]))
    assert res.returncode == 2, res.stderr[-3000:]
    error = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "--shuffle_buffer 16 -> 8" in error[0], res.stderr[-3000:]


# --- A new pass is a new order ------------------------------------------------------------------


def keys(records):
    return [(r["part"], r["line"]) for r in records]


def one_pass(stream, worker=0, num_workers=1):
    """The records of the shard's next whole pass (one filelist, starting at a pass boundary)."""
    shard = stream.shard_stream(worker, num_workers)
    out, first = [], None
    for rec in stream.records(shard):
        first = rec["pass"] if first is None else first
        if rec["pass"] != first:
            return first, out
        out.append(rec)


@pytest.mark.parametrize("how", ["ignore_data_skip", "resolution_stage"])
def test_a_restarted_stream_reads_a_new_pass_in_a_new_order(tmp_path, how):
    parts = make_parts(tmp_path, 4, 6)
    file_list = write_lists(tmp_path, parts)
    everything = sorted((p, n) for p in parts for n in range(1, 7))
    pass0 = keys(one_pass(stream_of(file_list))[1])
    save_position(stream_of(file_list), tmp_path / "checkpoint-4", records=10)  # mid pass 0
    stream = stream_of(file_list, resolution=24 if how == "resolution_stage" else 32)
    assert resume(stream, tmp_path / "checkpoint-4", ignore_data_skip=how == "ignore_data_skip") is None
    pass_index, records = one_pass(stream)
    assert pass_index == 1
    assert sorted(keys(records)) == everything, "the new pass reads every record exactly once"
    assert keys(records)[:8] != pass0[:8], "the new pass replays pass 0's first records"
    # A worker that has not yielded when the next checkpoint is written starts at that pass too.
    progress = StreamProgress(1, 0, stream=stream)
    assert progress.state_dict()["first_pass"] == 1
    again = stream_of(file_list)
    again.resume(progress.state_dict(), 0)
    assert one_pass(again)[0] == 1


def test_each_pass_is_a_new_order_and_reads_every_record_once(tmp_path):
    file_list, parts = make_data(tmp_path, num_parts=5, records=6)
    everything = sorted((p, n) for p in parts for n in range(1, 7))
    stream = stream_of(file_list)
    for num_workers in (1, 3):
        passes = {}
        for worker in range(num_workers):
            for rec in stream.records(stream.shard_stream(worker, num_workers, passes=2)):
                passes.setdefault(rec["pass"], []).append((rec["part"], rec["line"]))
        assert sorted(passes) == [0, 1]
        assert sorted(passes[0]) == sorted(passes[1]) == everything
        assert passes[0] != passes[1]
