"""--resume_from_checkpoint of an older checkpoint is a rollback: the later checkpoints (the
abandoned branch) are moved to OUTPUT_DIR/abandoned/, none deleted, and the next plain re-run
continues the new branch."""
import os
import re

import pytest

from conftest import ldm_args, run_script
from test_preemption_launcher import no_trainer_args, run_launcher, worker_log


def trainer_args(shapes, vae, out, steps, extra=()):
    return ldm_args(shapes, vae, out, steps, ["--per_device_train_batch_size", "2", "--save_steps", "1", "--save_total_limit", "10",
                                              "--image_logging_steps", "0", "--logging_steps", "1", "--num_threads", "1", *extra])


def loop_args(shapes, vae, out, steps, extra=()):
    args = no_trainer_args(shapes, vae, out)
    for flag, value in (("--max_train_steps", str(steps)), ("--save_steps", "1"), ("--gradient_accumulation_steps", "1")):
        args[args.index(flag) + 1] = value
    return args + list(extra)


def run_ranks(kind, args, log_dir):
    """The Trainer script in one process, the explicit loop under the launcher with two ranks; returns rank 0's log."""
    if kind == "trainer":
        res = run_script(args, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout + res.stderr
    code, output = run_launcher(args, log_dir)
    logs = [worker_log(log_dir, r) for r in (0, 1)]
    assert code == 0, output[-2000:] + logs[0][-3000:] + logs[1][-3000:]
    return logs[0] + logs[1]


def checkpoints(out):
    return sorted(int(m.group(1)) for d in os.listdir(out) if (m := re.match(r"checkpoint-(\d+)$", d)))


@pytest.mark.parametrize("kind", ["trainer", "no_trainer"])
def test_resuming_an_older_checkpoint_moves_the_later_ones_aside(shapes, vae_dir, tmp_path, kind):
    make = trainer_args if kind == "trainer" else loop_args
    out = tmp_path / "out"
    run_ranks(kind, make(shapes, vae_dir, out, 4), tmp_path / "logs1")
    assert checkpoints(out) == [1, 2, 3, 4]
    old = {n: sorted(os.listdir(out / f"checkpoint-{n}")) for n in (3, 4)}

    # Roll back to step 2 and train a new step 3 (e.g. with another learning rate):
    log = run_ranks(kind, make(shapes, vae_dir, out, 3, ["--resume_from_checkpoint", str(out / "checkpoint-2")]), tmp_path / "logs2")
    assert len(re.findall(r"Rolled back to checkpoint-2: moved 2 later checkpoint\(s\)", log)) == 1, log[-3000:]  # rank 0 alone
    abandoned = sorted(os.listdir(out / "abandoned"))
    assert [re.sub(r"-\d{8}T\d{6}Z$", "", d) for d in abandoned] == ["checkpoint-3", "checkpoint-4"], abandoned
    for name in abandoned:  # moved whole, nothing deleted
        assert sorted(os.listdir(out / "abandoned" / name)) == old[int(name.split("-")[1])]
    assert checkpoints(out) == [1, 2, 3]

    # The next plain re-run continues the new branch, on every rank.
    log = run_ranks(kind, make(shapes, vae_dir, out, 4), tmp_path / "logs3")
    assert f"Resuming from {out / 'checkpoint-3'}" in log
    if kind == "no_trainer":
        assert log.count(f"Resuming from {out / 'checkpoint-3'}") == 2
    assert checkpoints(out) == [1, 2, 3, 4] and len(os.listdir(out / "abandoned")) == 2
