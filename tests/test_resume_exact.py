"""Stopping and re-running ends with the same weights as one uninterrupted run (CPU, same seed, workers on)."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import RESUME_STEPS, ROOT, loop_resume_args, run_script, trainer_resume_args


def weights(path):
    from safetensors.numpy import load_file

    return load_file(path)


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in a)


def start_script(args):
    full_env = dict(os.environ, PYTHONPATH=ROOT)
    # A session of its own, so SIGKILL can take the data workers down with the trainer.
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def interrupt_after(args, out, checkpoint, sig, timeout=300):
    """Start a run, wait until `checkpoint` exists in `out`, send `sig`; return (exit code, output)."""
    proc = start_script(args)
    deadline = time.time() + timeout
    while not (out / checkpoint).is_dir():
        if proc.poll() is not None or time.time() > deadline:
            break
        time.sleep(0.02)
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(sig)
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


def interrupted_and_resumed(make_args, split, sig):
    """Interrupt a run at checkpoint-2 with `sig`, then re-run the same command to the end."""
    code, output = interrupt_after(make_args(split), split, "checkpoint-2", sig)
    if sig == signal.SIGTERM:
        assert code == 0, output[-3000:]
        assert "Preempted: saved checkpoint-" in output
    else:
        assert code != 0  # killed
    assert not (split / f"checkpoint-{RESUME_STEPS}").is_dir(), "the run finished before it could be interrupted"
    res = run_script(make_args(split))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Resuming from" in res.stdout + res.stderr
    return split


# The straight runs are session fixtures (conftest): run once, shared by both signals here and by
# test_train_e2e / test_generate, which read them.
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_no_trainer_interrupted_run_matches_straight_run(shapes, vae_dir, straight_loop_run, tmp_path, sig):
    straight = straight_loop_run
    split = interrupted_and_resumed(lambda out: loop_resume_args(shapes, vae_dir, out, RESUME_STEPS), tmp_path / "split", sig)
    last = f"checkpoint-{RESUME_STEPS}"
    for name in ("model.safetensors", "ema.safetensors"):
        diff = max_diff(weights(straight / last / name), weights(split / last / name))
        print(f"no-trainer {name}: max abs difference {diff:.3e}")
        assert diff <= 1e-6


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_trainer_interrupted_run_matches_straight_run(shapes, vae_dir, straight_trainer_run, tmp_path, sig):
    straight = straight_trainer_run
    split = interrupted_and_resumed(lambda out: trainer_resume_args(shapes, vae_dir, out, RESUME_STEPS), tmp_path / "split", sig)
    last = f"checkpoint-{RESUME_STEPS}"

    diff = max_diff(weights(straight / last / "model.safetensors"), weights(split / last / "model.safetensors"))
    print(f"Trainer: max abs difference {diff:.3e}")
    assert diff <= 1e-6
    diff = max_diff(weights(straight / last / "ema.safetensors"), weights(split / last / "ema.safetensors"))
    assert diff <= 1e-6
