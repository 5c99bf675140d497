"""Failures a long run meets: non-finite losses, an unwritable output directory (a full disk: tests/test_checkpoint_trust.py)."""
import json
import os

import paddle
import pytest
from safetensors.numpy import load_file

from conftest import ldm_args, run_script
from ldm.training import checkpoint, data_position
from ldm.data.progress import StreamProgress


def test_nonfinite_losses_skip_steps_then_stop_with_a_message(shapes, vae_dir, tmp_path):
    """A learning rate of 1e30 blows the weights up after the first step; every later loss is
    non-finite, each such step is skipped, and the third in a row stops the run cleanly."""
    out = tmp_path / "nan"
    res = run_script(ldm_args(shapes, vae_dir, out, 20, ["--learning_rate", "1e30", "--save_steps", "1", "--max_nonfinite_steps", "3",
                                                          "--image_logging_steps", "0"]))
    assert res.returncode == 1, res.stderr[-2000:]
    assert "3 optimizer steps in a row had a non-finite loss" in res.stderr
    assert "non-finite loss, skipping this optimizer step" in res.stdout + res.stderr
    # The checkpoints written so far are complete and loadable.
    last = checkpoint.latest_checkpoint(str(out))
    assert last is not None
    assert checkpoint.checkpoint_problem(last) is None
    load_file(os.path.join(last, "model.safetensors"))


def test_unwritable_output_dir_stops_at_startup(shapes, vae_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    res = run_script(ldm_args(shapes, vae_dir, blocker / "out", 2), timeout=120)
    assert res.returncode == 2
    assert "is not a writable directory" in res.stderr and len(res.stderr.strip().splitlines()[-1]) < 300


def test_a_failure_on_another_rank_stops_this_one_too(tmp_path, monkeypatch):
    """save_atomically agrees across ranks after each phase: if another rank failed (simulated
    by the all-reduce answering True), this rank raises the one-line error too, instead of waiting
    at a barrier, and no partial checkpoint is left."""
    layer = paddle.nn.Linear(3, 2)
    scheduler = paddle.optimizer.lr.LambdaDecay(1e-3, lambda s: 1.0)
    optimizer = paddle.optimizer.AdamW(learning_rate=scheduler, parameters=layer.parameters())
    progress = StreamProgress(1, 1).state_dict()
    checkpoint.save_checkpoint(str(tmp_path), 1, layer, optimizer, scheduler, progress, {})
    phases = []

    def other_rank_failed_writing(flag):  # agreements: weights finite, directory made, files written
        phases.append(flag)
        return len(phases) == 3

    monkeypatch.setattr(checkpoint, "any_rank", other_rank_failed_writing)
    with pytest.raises(checkpoint.CheckpointWriteError, match="another rank failed.*checkpoint-1 and is untouched"):
        checkpoint.save_checkpoint(str(tmp_path), 2, layer, optimizer, scheduler, progress, {})
    assert phases == [False, False, False]  # this rank's own writes succeeded
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]


def test_which_data_position_a_resume_uses(tmp_path):
    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    position = StreamProgress(1, 1).state_dict()
    (ckpt / "data_position_rank0.json").write_text(json.dumps(position))
    (ckpt / "args.json").write_text(json.dumps({"resolution": 32}))
    assert data_position.data_position_to_resume(str(ckpt), 0, 32, False) == position
    assert data_position.data_position_to_resume(str(ckpt), 0, 32, True) is None  # --ignore_data_skip
    assert data_position.data_position_to_resume(str(ckpt), 0, 64, False) is None  # a new resolution stage
