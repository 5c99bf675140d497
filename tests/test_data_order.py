"""A resume never changes the data order silently: the order's fingerprint is saved with every
checkpoint, and a changed setting or file list stops the resume at start-up, naming it."""
import json
import os

import pytest

from conftest import make_parts, run_script
from test_resume_exact import no_trainer_args
from ldm import checkpoint, data


def make_data(tmp_path, num_parts=4, records=6):
    (tmp_path / "parts").mkdir(exist_ok=True)
    parts = make_parts(tmp_path / "parts", num_parts, records)
    (tmp_path / "a.filelist").write_text("\n".join(parts[:-1]) + "\n")
    (tmp_path / "b.filelist").write_text(parts[-1] + "\n")
    (tmp_path / "w.list").write_text(f"{tmp_path / 'a.filelist'} 3\n{tmp_path / 'b.filelist'}\n")
    return str(tmp_path / "w.list"), parts


def stream_of(file_list, resolution=32, seed=0, buffer_size=8, parts_per_window=4):
    return data.TextImageStream(file_list, resolution, seed=seed, buffer_size=buffer_size, parts_per_window=parts_per_window, rank=0, world_size=1)


def save_position(stream, ckpt, records=5, resolution=32):
    """A checkpoint directory with the data position after `records` records, as the training loops write it."""
    progress = data.StreamProgress(1, 0, fingerprint=stream.fingerprint())
    for sample in (s for _, s in zip(range(records), stream)):
        progress.update(data.pack_bookkeeping(sample))
    os.makedirs(ckpt, exist_ok=True)
    with open(checkpoint.data_position_file(str(ckpt), 0), "w") as f:
        json.dump(progress.state_dict(), f)
    with open(os.path.join(ckpt, "args.json"), "w") as f:
        json.dump({"resolution": resolution, "aspect_ratio_buckets": False}, f)
    return progress.state_dict()


def resume(stream, ckpt, ignore_data_skip=False):
    return checkpoint.resume_data_stream(stream, str(ckpt), 0, 0, ignore_data_skip)


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
    with open(checkpoint.data_position_file(str(tmp_path / "checkpoint-4"), 0), "w") as f:
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
