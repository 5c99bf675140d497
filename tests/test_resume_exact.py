"""Stopping and re-running ends with the same weights as one uninterrupted run (CPU, same seed, workers on)."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, ldm_args, run_script


def no_trainer_args(shapes, vae, out, steps, extra=()):
    return ["train_txt2img_laion400m_no_trainer.py", "--output_dir", str(out), "--train_batch_size", "4",
            "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--max_train_steps", str(steps),
            "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--logging_steps", "1", "--save_steps", "1",
            "--save_total_limit", "2", "--seed", "23", "--num_workers", "2", "--shuffle_buffer", "16",
            "--vae_name_or_path", str(vae), "--text_encoder_config_file", "config/tiny/ldmbert.json",
            "--unet_config_file", "config/tiny/unet.json", "--file_list", shapes["file_list"], "--model_max_length", "16",
            "--tokenizer_name", shapes["tokenizer"], "--resolution", "32", "--image_logging_steps", "0", "--use_ema",
            "--ema_decay", "0.9", *extra]


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


def straight_and_interrupted(make_args, out_root, sig):
    straight, split = out_root / "straight", out_root / "split"
    res = run_script(make_args(straight))
    assert res.returncode == 0, res.stderr[-3000:]
    code, output = interrupt_after(make_args(split), split, "checkpoint-2", sig)
    if sig == signal.SIGTERM:
        assert code == 0, output[-3000:]
        assert "Preempted: saved checkpoint-" in output
    else:
        assert code != 0  # killed
    assert not (split / "checkpoint-8").is_dir(), "the run finished before it could be interrupted"
    res = run_script(make_args(split))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Resuming from" in res.stdout + res.stderr
    return straight, split


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_no_trainer_interrupted_run_matches_straight_run(shapes, vae_dir, tmp_path, sig):
    straight, split = straight_and_interrupted(lambda out: no_trainer_args(shapes, vae_dir, out, 8), tmp_path, sig)
    for name in ("model.safetensors", "ema.safetensors"):
        diff = max_diff(weights(straight / "checkpoint-8" / name), weights(split / "checkpoint-8" / name))
        print(f"no-trainer {name}: max abs difference {diff:.3e}")
        assert diff <= 1e-6


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_trainer_interrupted_run_matches_straight_run(shapes, vae_dir, tmp_path, sig):
    extra = ["--dataloader_num_workers", "2", "--image_logging_steps", "0", "--save_steps", "1", "--shuffle_buffer", "16",
             "--lr_scheduler_type", "cosine", "--warmup_steps", "2", "--use_ema", "--ema_decay", "0.9"]
    straight, split = straight_and_interrupted(lambda out: ldm_args(shapes, vae_dir, out, 8, extra), tmp_path, sig)

    diff = max_diff(weights(straight / "checkpoint-8" / "model.safetensors"), weights(split / "checkpoint-8" / "model.safetensors"))
    print(f"Trainer: max abs difference {diff:.3e}")
    assert diff <= 1e-6
    diff = max_diff(weights(straight / "checkpoint-8" / "ema.safetensors"), weights(split / "checkpoint-8" / "ema.safetensors"))
    assert diff <= 1e-6
