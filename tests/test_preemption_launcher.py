"""Preemption as schedulers do it: SIGTERM to the launcher (alone, or to its whole process group)
while two ranks train with a data worker each, mid-way through an accumulation cycle of 8
micro-batches. Every rank saves, and re-running the same command ends with the weights of an
uninterrupted run. `ldm.launch` (Paddle's launcher with SIGTERM passed on) then exits 0; Paddle's
own launcher exits 15 whatever its ranks did (ldm/launch.py says why), but its ranks save too."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, ldm_args

STEPS = 4


def trainer_args(shapes, vae, out):
    # The reported failure: 8 micro-batches per step, one data worker per rank.
    return ldm_args(shapes, vae, out, STEPS, ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "8",
                                              "--dataloader_num_workers", "1", "--save_steps", "100", "--logging_steps", "1",
                                              "--image_logging_steps", "0", "--num_threads", "1"])


def no_trainer_args(shapes, vae, out):
    return ["train_txt2img_laion400m_no_trainer.py", "--output_dir", str(out), "--train_batch_size", "2",
            "--gradient_accumulation_steps", "8", "--learning_rate", "1e-3", "--max_train_steps", str(STEPS),
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--logging_steps", "1", "--save_steps", "100", "--seed", "23",
            "--num_workers", "1", "--vae_name_or_path", str(vae), "--text_encoder_config_file", "config/tiny/ldmbert.json",
            "--unet_config_file", "config/tiny/unet.json", "--file_list", shapes["file_list"], "--model_max_length", "16",
            "--tokenizer_name", shapes["tokenizer"], "--resolution", "32", "--image_logging_steps", "0", "--num_threads", "1"]


SCRIPTS = {"trainer": trainer_args, "no_trainer": no_trainer_args}


def start_launcher(args, log_dir, launcher="ldm.launch"):
    """The real launcher, as a scheduler starts it: a process group of its own."""
    cmd = [sys.executable, "-m", launcher, "--nproc_per_node", "2", "--log_dir", str(log_dir), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def worker_log(log_dir, rank):
    path = os.path.join(log_dir, f"workerlog.{rank}")
    return open(path, errors="replace").read() if os.path.isfile(path) else ""


def wait_for_training(proc, log_dir, timeout=300):
    """Until rank 0's progress bar shows a first optimizer step done (and the second under way)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if re.search(r"\b1/%d \[" % STEPS, worker_log(log_dir, 0)):
            return
        time.sleep(0.05)
    raise AssertionError("training never started:\n" + worker_log(log_dir, 0)[-3000:])


def descendants(pid):
    """Every process started under `pid`, from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, stack = [], list(children.get(pid, []))
    while stack:
        p = stack.pop()
        out.append(p)
        stack += children.get(p, [])
    return out


def communicate(proc, timeout):
    """Wait for the launcher; if it hangs, SIGKILL it and everything it started (the ranks run in
    sessions of their own), so a failing test leaves nothing behind."""
    try:
        return proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:
            for pid in [proc.pid, *descendants(proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.communicate()


def run_launcher(args, log_dir, timeout=600):
    proc = start_launcher(args, log_dir)
    output = communicate(proc, timeout)
    return proc.returncode, output


def model_weights(checkpoint_dir):
    """The trained weights of a checkpoint of either script, whatever file holds them."""
    from safetensors.numpy import load_file

    path = os.path.join(checkpoint_dir, "model.safetensors")
    if os.path.isfile(path):
        state = load_file(path)
    else:
        import paddle

        state = paddle.load(os.path.join(checkpoint_dir, "model_state.pdparams"), return_numpy=True)
    return {k: np.asarray(v) for k, v in state.items() if not k.startswith("vae.")}


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in a)


@pytest.fixture(scope="module")
def baselines(shapes, vae_dir, tmp_path_factory):
    """One uninterrupted two-process run per script, shared by the tests below."""
    done = {}
    for kind, make in SCRIPTS.items():
        root = tmp_path_factory.mktemp(f"straight_{kind}")
        code, output = run_launcher(make(shapes, vae_dir, root / "out"), root / "logs")
        assert code == 0, output[-2000:] + worker_log(root / "logs", 0)[-3000:]
        done[kind] = root / "out" / f"checkpoint-{STEPS}"
    return done


# Targets: "launcher" (the launcher's pid alone), "group" (os.killpg of the launcher's process
# group: Paddle's launcher starts each rank in a session of its own, so that is the launcher too,
# and Paddle's launcher then signals each rank's group, data workers included), "all" (every
# process of the job, data workers included, as SLURM signals a job step's processes).
@pytest.mark.parametrize("kind,target,launcher", [("trainer", "all", "ldm.launch"), ("no_trainer", "launcher", "ldm.launch"),
                                                   ("trainer", "group", "paddle.distributed.launch")])
def test_sigterm_under_the_launcher_saves_every_rank_and_resumes_exactly(shapes, vae_dir, tmp_path, baselines, kind, target, launcher):
    make = SCRIPTS[kind]
    out, logs = tmp_path / "out", tmp_path / "logs"
    proc = start_launcher(make(shapes, vae_dir, out), logs, launcher)
    wait_for_training(proc, logs)
    if target == "launcher":
        os.kill(proc.pid, signal.SIGTERM)
    elif target == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        job = [proc.pid, *descendants(proc.pid)]
        assert len(job) == 5, job  # the launcher, two ranks, a data worker each
        for pid in job:
            os.kill(pid, signal.SIGTERM)
    output = communicate(proc, 300)
    rank_logs = [worker_log(logs, r) for r in (0, 1)]
    print(output[-1500:])
    assert proc.returncode == (0 if launcher == "ldm.launch" else 15), output[-2000:] + rank_logs[0][-3000:] + rank_logs[1][-3000:]
    assert "Traceback" not in rank_logs[0] + rank_logs[1], rank_logs[0][-3000:] + rank_logs[1][-3000:]
    saved = [re.findall(r"Preempted: saved checkpoint-(\d+)", log) for log in rank_logs]
    assert saved[0] and saved[0] == saved[1], rank_logs[0][-3000:] + rank_logs[1][-3000:]
    step = int(saved[0][-1])
    assert 1 <= step < STEPS, "the run finished before SIGTERM reached it"
    checkpoint = out / f"checkpoint-{step}"
    assert all((checkpoint / f"data_position_rank{r}.json").is_file() for r in (0, 1))

    # Re-running the same command continues and ends with the uninterrupted run's weights.
    code, output = run_launcher(make(shapes, vae_dir, out), tmp_path / "logs2")
    assert code == 0, output[-2000:] + worker_log(tmp_path / "logs2", 0)[-3000:]
    assert f"Resuming from {checkpoint}" in worker_log(tmp_path / "logs2", 0)
    diff = max_abs_diff(model_weights(baselines[kind]), model_weights(out / f"checkpoint-{STEPS}"))
    print(f"{kind}: preempted at step {step}, max abs weight difference to the uninterrupted run {diff:.3e}")
    assert diff == 0.0


WORKER_THAT_MISSES_SIGINT = '''
import multiprocessing, signal, sys, time
from ldm.data.progress import end_workers_at_exit

def worker(conn):
    # As a data worker: SIGTERM ignored; SIGINT as good as lost (the kernel may hand it to a thread
    # other than the main one, which stays blocked reading its index queue, as seen in a real run).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn.recv()

if __name__ == "__main__":
    parent_end, child_end = multiprocessing.Pipe()
    multiprocessing.Process(target=worker, args=(child_end,), daemon=True).start()
    time.sleep(1)  # the worker has set its handlers
    end_workers_at_exit()
'''


def test_a_finished_run_exits_even_if_a_worker_misses_its_sigint(tmp_path):
    """At exit the training process SIGINTs its data workers and, after a grace period, kills the
    ones still there; without the kill, Python's exit hook waits for them for ever."""
    script = tmp_path / "exit.py"
    script.write_text(WORKER_THAT_MISSES_SIGINT)
    start = time.monotonic()
    with open(tmp_path / "stderr", "w") as err:  # (a file, not a pipe: a hung worker would hold a pipe open)
        res = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL,
                             stderr=err, timeout=60)
    assert res.returncode == 0, (tmp_path / "stderr").read_text()[-2000:]
    assert time.monotonic() - start < 30
