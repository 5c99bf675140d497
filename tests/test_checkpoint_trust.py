"""Checkpoints that load without pickle and that a resume can trust, under real faults: a
filesystem that fills up (RLIMIT_FSIZE, on one rank of two under the real launcher), truncated,
deleted and corrupted files, crafted pickles. Fault set-up: tests/fault_wrapper.py."""
import json
import os
import pickle
import shutil
import time

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file

from conftest import ROOT, ldm_args, run_script
from ldm.training import checkpoint
from ldm.training.checkpoint_io import decode, read_state
from ldm.data.progress import StreamProgress

WRAPPER = os.path.join(ROOT, "tests", "fault_wrapper.py")
EXTRA = ["--image_logging_steps", "0", "--save_steps", "2", "--save_total_limit", "3", "--use_ema", "--ema_decay", "0.9"]


def trainer_args(shapes, vae_dir, out, steps, extra=()):
    return ldm_args(shapes, vae_dir, out, steps, [*EXTRA, *extra])


def loop_args(shapes, vae_dir, out, steps):
    return ["train_txt2img_laion400m_no_trainer.py", "--output_dir", str(out), "--train_batch_size", "4", "--learning_rate", "1e-3",
            "--max_train_steps", str(steps), "--lr_scheduler", "constant", "--logging_steps", "2", "--save_steps", "2", "--seed", "23",
            "--num_workers", "1", "--vae_name_or_path", str(vae_dir), "--text_encoder_config_file", "config/tiny/ldmbert.json",
            "--unet_config_file", "config/tiny/unet.json", "--file_list", shapes["file_list"], "--model_max_length", "16",
            "--tokenizer_name", shapes["tokenizer"], "--resolution", "32", "--image_logging_steps", "0", "--use_ema", "--ema_decay", "0.9"]


def wrapped(args, **faults):
    """Run `args` (a training script and its flags) under tests/fault_wrapper.py with `faults` as its environment."""
    return run_script([WRAPPER, *args], env={k: str(v) for k, v in faults.items()})


def output(res):
    return res.stdout + res.stderr


def last_line(res):
    return res.stderr.strip().splitlines()[-1]


def error_line(text):
    """The run's one `error:` line (the progress bar may be redrawn after it)."""
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def trainer_run(shapes, vae_dir, tmp_path_factory):
    """4 steps of the Trainer script: checkpoint-2 and checkpoint-4."""
    out = tmp_path_factory.mktemp("trainer") / "out"
    res = run_script(trainer_args(shapes, vae_dir, out, 4))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def loop_run(shapes, vae_dir, tmp_path_factory):
    """4 steps of the explicit loop: checkpoint-2 and checkpoint-4."""
    out = tmp_path_factory.mktemp("loop") / "out"
    res = run_script(loop_args(shapes, vae_dir, out, 4))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def copy_run(src, dst, keep=None):
    shutil.copytree(src, dst)
    if keep is not None:
        for path in checkpoint.checkpoint_dirs(str(dst)):
            if os.path.basename(path) not in keep:
                shutil.rmtree(path)
    return dst


def truncate(path, fraction=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * fraction))


def test_both_scripts_write_no_pickle_and_a_manifest_of_every_file(trainer_run, loop_run):
    keys = {}
    for name, run in (("trainer", trainer_run), ("loop", loop_run)):
        for ckpt in ("checkpoint-2", "checkpoint-4"):
            path = run / ckpt
            files = sorted(os.listdir(path))
            assert not [f for f in files if f.endswith((".pdparams", ".pdopt", ".pth", ".bin", ".pkl"))], files
            manifest = json.load(open(path / "manifest.json"))["files"]
            assert sorted(manifest) == [f for f in files if f != "manifest.json"]
            for f, entry in manifest.items():
                assert os.path.getsize(path / f) == entry["size"]
            assert checkpoint.checkpoint_problem(str(path)) is None
            assert {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
                    "rng_state_rank0.json", "data_position_rank0.json", "trainer_state.json", "args.json"} <= set(files)
        keys[name] = set(load_file(str(run / "checkpoint-4" / "model.safetensors")))
        # The optimizer state came back as the tensors AdamW holds (moments, beta powers) and the scheduler's entry.
        state = read_state(str(run / "checkpoint-4"), "optimizer")
        assert "LR_Scheduler" in state and any(k.endswith("_moment1_0") and isinstance(v, paddle.Tensor) for k, v in state.items())
    assert keys["trainer"] == keys["loop"] and any(k.startswith("unet.") for k in keys["loop"]) and not any(k.startswith("vae.") for k in keys["loop"])


def test_a_truncated_newest_checkpoint_is_skipped_and_the_resume_is_exact(shapes, vae_dir, trainer_run, tmp_path):
    """checkpoint-4's weights cut in half: the re-run warns once naming it, resumes from checkpoint-2
    without unpickling anything (paddle.load raises), and ends with checkpoint-4's weights exactly."""
    out = copy_run(trainer_run, tmp_path / "out")
    truncate(out / "checkpoint-4" / "model.safetensors")
    res = wrapped(trainer_args(shapes, vae_dir, out, 4), FORBID_PADDLE_LOAD=1)
    assert res.returncode == 0, res.stderr[-3000:]
    skipped = [line for line in output(res).splitlines() if "Skipping" in line]
    assert len(skipped) == 1 and "checkpoint-4: model.safetensors is" in skipped[0] and "its manifest says" in skipped[0], skipped
    assert f"Resuming from {out / 'checkpoint-2'}" in output(res)
    assert checkpoint.checkpoint_problem(str(out / "checkpoint-4")) is None
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(trainer_run / "checkpoint-4" / name)), load_file(str(out / "checkpoint-4" / name))
        assert max(float(np.abs(a[k] - b[k]).max()) for k in a) == 0.0


def test_the_explicit_loop_skips_a_truncated_optimizer_file(shapes, vae_dir, loop_run, tmp_path):
    out = copy_run(loop_run, tmp_path / "out")
    truncate(out / "checkpoint-4" / "optimizer.safetensors", 0.9)
    res = wrapped(loop_args(shapes, vae_dir, out, 4), FORBID_PADDLE_LOAD=1)
    assert res.returncode == 0, res.stderr[-3000:]
    skipped = [line for line in output(res).splitlines() if "Skipping" in line]
    assert len(skipped) == 1 and "checkpoint-4: optimizer.safetensors is" in skipped[0], skipped
    assert f"Resuming from {out / 'checkpoint-2'}" in output(res)
    a, b = load_file(str(loop_run / "checkpoint-4" / "model.safetensors")), load_file(str(out / "checkpoint-4" / "model.safetensors"))
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) == 0.0


def flip_a_data_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def corrupt_header(path):
    """Same size, but the header's JSON is garbage."""
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"#" * 16)


DAMAGE = {
    "truncated optimizer": (lambda c: truncate(c / "optimizer.safetensors"), "optimizer.safetensors is"),
    "deleted RNG state": (lambda c: os.remove(c / "rng_state_rank0.json"), "rng_state_rank0.json is missing"),
    "corrupt header": (lambda c: corrupt_header(c / "model.safetensors"), "model.safetensors: unreadable safetensors header"),
    "flipped bit": (lambda c: flip_a_data_byte(c / "ema.safetensors"), "ema.safetensors fails its CRC32C checksum"),
    "no manifest": (lambda c: os.remove(c / "manifest.json"), "no manifest.json"),
    "truncated manifest": (lambda c: truncate(c / "manifest.json"), "manifest.json is unreadable"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_each_kind_of_damage_is_named_and_skipped(trainer_run, tmp_path, damage):
    out = copy_run(trainer_run, tmp_path / "out")
    break_it, reason = DAMAGE[damage]
    break_it(out / "checkpoint-4")
    assert reason in checkpoint.checkpoint_problem(str(out / "checkpoint-4"))
    assert checkpoint.latest_checkpoint(str(out)) == str(out / "checkpoint-2")


def test_resume_from_a_damaged_checkpoint_by_flag_stops_at_startup(shapes, vae_dir, trainer_run, tmp_path):
    out = copy_run(trainer_run, tmp_path / "out")
    flip_a_data_byte(out / "checkpoint-4" / "optimizer.safetensors")
    res = run_script(trainer_args(shapes, vae_dir, out, 6, ["--resume_from_checkpoint", str(out / "checkpoint-4")]))
    assert res.returncode == 2, res.stderr[-3000:]
    assert last_line(res) == (f"error: checkpoint {out / 'checkpoint-4'} cannot be resumed from: optimizer.safetensors fails its CRC32C "
                              "checksum (corrupted); pass an older checkpoint to --resume_from_checkpoint, or none to take the newest good one")


def assert_untouched(out, ckpt, before):
    assert checkpoint.checkpoint_problem(str(out / ckpt)) is None
    assert json.load(open(out / ckpt / "manifest.json")) == before


def test_a_full_disk_during_a_save_stops_with_one_line_and_no_half_checkpoint(shapes, vae_dir, trainer_run, tmp_path):
    """Resume from checkpoint-2 with every file capped at 64 KB (the weights are larger): the save
    of checkpoint-4 fails inside safetensors (SafetensorError, not OSError), on the optimizer state written first."""
    out = copy_run(trainer_run, tmp_path / "out", keep={"checkpoint-2"})
    before = json.load(open(out / "checkpoint-2" / "manifest.json"))
    assert before["files"]["model.safetensors"]["size"] > 65536
    res = wrapped(trainer_args(shapes, vae_dir, out, 4), FSIZE_LIMIT=65536)
    assert res.returncode == 1, res.stderr[-3000:]
    line = error_line(res.stderr)
    assert line.startswith(f"error: could not write checkpoint-4 in {out}: writing optimizer.safetensors: SafetensorError: ") and "File too large" in line, line
    assert line.endswith(f"the newest complete checkpoint is {out / 'checkpoint-2'} and is untouched. Free space or fix the directory, then re-run")
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-2"]
    assert_untouched(out, "checkpoint-2", before)


def launch(args, log_dir, **faults):
    env = {k: str(v) for k, v in faults.items()}
    return run_script(["-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir), WRAPPER, *args], env=env, timeout=900)


def test_a_full_disk_on_one_rank_of_two_stops_both(shapes, vae_dir, tmp_path):
    """Under the real launcher, rank 1's files are capped at 28 KB, rank 0 writes freely: both ranks
    stop at the save with the one line, promptly, and checkpoint-2 stays the newest. (The cap also
    holds for rank 1's workerlog, which rank 1 itself writes: ~16 KB here, while its RNG state file is 34 KB.)"""
    out = tmp_path / "out"
    # No data workers: a worker hands batches over in /dev/shm files, which the cap would hit before any checkpoint.
    args = lambda steps: trainer_args(shapes, vae_dir, out, steps, ["--per_device_train_batch_size", "2", "--num_threads", "1",
                                                                     "--dataloader_num_workers", "0"])
    res = launch(args(2), tmp_path / "logs1")
    assert res.returncode == 0, res.stderr[-2000:]
    before = json.load(open(out / "checkpoint-2" / "manifest.json"))
    start = time.time()
    res = launch(args(4), tmp_path / "logs2", FSIZE_LIMIT=28 * 1024, FSIZE_LIMIT_RANK=1)
    elapsed = time.time() - start
    logs = [open(tmp_path / "logs2" / f"workerlog.{r}").read() for r in (0, 1)]
    assert res.returncode != 0
    expected_end = f"the newest complete checkpoint is {out / 'checkpoint-2'} and is untouched. Free space or fix the directory, then re-run"
    errors = [[line for line in log.splitlines() if line.startswith("error: could not write checkpoint-4")] for log in logs]
    assert len(errors[1]) == 1 and "writing rng_state_rank1.json: File too large" in errors[1][0] and errors[1][0].endswith(expected_end), logs[1][-2000:]
    assert len(errors[0]) == 1 and "another rank failed to write its files" in errors[0][0] and errors[0][0].endswith(expected_end), logs[0][-2000:]
    assert elapsed < 300, elapsed  # not the collective's timeout
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-2"]
    assert_untouched(out, "checkpoint-2", before)


class Evil:
    """Unpickling this writes a file: what a crafted checkpoint could do with any code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_evil_checkpoint(ckpt, marker):
    ckpt.mkdir(parents=True)
    for name in ("model_state.pdparams", "optimizer.pdopt"):
        with open(ckpt / name, "wb") as f:
            pickle.dump({"weights": Evil(str(marker))}, f)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (ckpt / "data_position_rank0.json").write_text(json.dumps(StreamProgress(1, 1).state_dict()))


def test_crafted_pickles_are_refused_without_trust_pickle(shapes, vae_dir, tmp_path):
    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    write_evil_checkpoint(out / "checkpoint-2", marker)
    res = run_script(trainer_args(shapes, vae_dir, out, 4))
    assert res.returncode == 2, res.stderr[-3000:]
    assert last_line(res) == (f"error: {out / 'checkpoint-2' / 'model_state.pdparams'} is an old-format checkpoint's Paddle pickle, which can "
                              "run code while it loads; refusing to read it (pass --trust_pickle only if you wrote it yourself or trust whoever did)")
    assert not marker.exists()
    # The explicit loop's loader refuses the same directory before reading anything.
    layer = paddle.nn.Linear(3, 2)
    optimizer = paddle.optimizer.AdamW(parameters=layer.parameters())
    with pytest.raises(ValueError, match="refusing to read it"):
        checkpoint.load_checkpoint(str(out / "checkpoint-2"), layer, optimizer, paddle.optimizer.lr.LambdaDecay(1e-3, lambda s: 1.0))
    assert not marker.exists()
    # The pickles are live: loading one is all it takes.
    with open(out / "checkpoint-2" / "optimizer.pdopt", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def to_old_trainer_format(ckpt):
    """Rewrite a checkpoint as the Trainer script wrote it before this layout (Paddle pickles, no manifest)."""
    from ldm.training.checkpoint_io import _generator_from_json

    paddle.save({k: paddle.to_tensor(v) for k, v in load_file(str(ckpt / "model.safetensors")).items()}, str(ckpt / "model_state.pdparams"))
    paddle.save(read_state(str(ckpt), "optimizer"), str(ckpt / "optimizer.pdopt"))
    paddle.save(decode(json.load(open(ckpt / "scheduler.json"))), str(ckpt / "scheduler.pdparams"))
    rng = json.load(open(ckpt / "rng_state_rank0.json"))
    paddle.save({"python": decode(rng["python"]), "numpy": decode(rng["numpy"]), "cuda": [_generator_from_json(s) for s in rng["paddle"]],
                 "cpu": _generator_from_json(rng["cpu"])}, str(ckpt / "rng_state.pth"))
    for name in ("model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "rng_state_rank0.json", "manifest.json"):
        os.remove(ckpt / name)


def test_an_old_pickled_checkpoint_resumes_exactly_with_trust_pickle_only(shapes, vae_dir, trainer_run, tmp_path):
    out = copy_run(trainer_run, tmp_path / "out", keep={"checkpoint-2"})
    to_old_trainer_format(out / "checkpoint-2")
    res = run_script(trainer_args(shapes, vae_dir, out, 4))
    assert res.returncode == 2 and "model_state.pdparams is an old-format checkpoint's Paddle pickle" in last_line(res), res.stderr[-3000:]
    res = run_script(trainer_args(shapes, vae_dir, out, 4, ["--trust_pickle"]))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"Resuming from {out / 'checkpoint-2'}" in output(res)
    a, b = load_file(str(trainer_run / "checkpoint-4" / "model.safetensors")), load_file(str(out / "checkpoint-4" / "model.safetensors"))
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) == 0.0


def to_old_loop_format(ckpt):
    """Rewrite an explicit-loop checkpoint as that loop wrote it before this layout (optimizer and RNG pickled, no manifest)."""
    from ldm.training.checkpoint_io import _generator_from_json

    paddle.save(read_state(str(ckpt), "optimizer"), str(ckpt / "optimizer.pdopt"))
    rng = json.load(open(ckpt / "rng_state_rank0.json"))
    paddle.save({"paddle": [_generator_from_json(s) for s in rng["paddle"]], "numpy": decode(rng["numpy"]), "python": decode(rng["python"])},
                str(ckpt / "rng_state_rank0.pdparams"))
    for name in ("optimizer.safetensors", "optimizer.json", "rng_state_rank0.json", "manifest.json"):
        os.remove(ckpt / name)


def test_an_old_explicit_loop_checkpoint_resumes_exactly_with_trust_pickle_only(shapes, vae_dir, loop_run, tmp_path):
    out = copy_run(loop_run, tmp_path / "out", keep={"checkpoint-2"})
    to_old_loop_format(out / "checkpoint-2")
    res = run_script(loop_args(shapes, vae_dir, out, 4))
    assert res.returncode == 2 and "optimizer.pdopt is an old-format checkpoint's Paddle pickle" in last_line(res), res.stderr[-3000:]
    res = run_script(loop_args(shapes, vae_dir, out, 4) + ["--trust_pickle"])
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(loop_run / "checkpoint-4" / name)), load_file(str(out / "checkpoint-4" / name))
        assert max(float(np.abs(a[k] - b[k]).max()) for k in a) == 0.0


def tiny_training(tmp_path):
    layer = paddle.nn.Linear(3, 2)
    scheduler = paddle.optimizer.lr.LambdaDecay(1e-3, lambda s: 1.0)
    optimizer = paddle.optimizer.AdamW(learning_rate=scheduler, parameters=layer.parameters())
    layer(paddle.ones([1, 3])).sum().backward()
    optimizer.step()
    save = lambda step, limit=None: checkpoint.save_checkpoint(str(tmp_path), step, layer, optimizer, scheduler, StreamProgress(1, 1).state_dict(),
                                                               {}, save_total_limit=limit)
    return layer, save


def test_rotation_never_counts_a_broken_checkpoint(tmp_path):
    """checkpoint-3 lost its manifest: with --save_total_limit 1 the newest good one (2) must stay."""
    _, save = tiny_training(tmp_path)
    save(1)
    save(2)
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / "checkpoint-3")
    os.remove(tmp_path / "checkpoint-3" / "manifest.json")
    checkpoint.rotate_checkpoints(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3"]
    save(4, limit=1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4"]  # everything older than the oldest kept good one goes, broken or not
    assert checkpoint.latest_checkpoint(str(tmp_path)).endswith("checkpoint-4")


def test_non_finite_weights_are_not_saved(tmp_path):
    layer, save = tiny_training(tmp_path)
    save(1)
    with paddle.no_grad():
        layer.bias.set_value(paddle.to_tensor([0.0, float("nan")]))
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"refusing to write checkpoint-2: weight bias is NaN or inf; the newest complete checkpoint is .*checkpoint-1"):
        save(2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]
