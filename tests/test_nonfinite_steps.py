"""Non-finite updates never reach a checkpoint: the ranks agree to skip a step whose loss or
gradient norm is not finite, and a skipped step writes no checkpoint (so rotates none away)."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT, ldm_args, run_script
from test_preemption_launcher import communicate, no_trainer_args, worker_log

AGREEMENT = textwrap.dedent("""
    # Each rank: one parameter w, loss sqrt(w) summed. At w = 0 the loss is 0 (finite) and its
    # gradient 1 / (2 sqrt(0)) is inf. SKEW_RANK (or every rank, if -1) starts at w = 0.
    import json, os, sys
    import paddle
    import paddle.distributed as dist
    from ldm.training.runtime import StepAgreement

    world = dist.get_world_size()
    if world > 1:
        dist.init_parallel_env()
    rank = max(0, dist.get_rank())
    skew = int(sys.argv[1])
    w = paddle.create_parameter([3], "float32", default_initializer=paddle.nn.initializer.Constant(0.0 if skew in (-1, rank) else 1.0))
    agreement = StepAgreement(max_nonfinite=10)
    loss = paddle.sqrt(w).sum()
    loss.backward()
    agreement.observe(loss)
    agreement.observe_gradients([w])
    verdict = agreement.finish_step()
    print("verdict", json.dumps({"rank": rank, "loss": float(loss), "skip": verdict.skip, "reason": verdict.reason}))
""")


def verdicts(text):
    import json

    return [json.loads(line.split("verdict ", 1)[1]) for line in text.splitlines() if line.startswith("verdict ")]


def test_a_finite_loss_with_an_infinite_gradient_skips_the_step(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREEMENT)
    res = run_script([str(script), "-1"], timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    [v] = verdicts(res.stdout)
    assert v == {"rank": 0, "loss": 0.0, "skip": True, "reason": "gradients"}
    res = run_script([str(script), "7"], timeout=120)  # w = 1 everywhere: nothing to skip
    [v] = verdicts(res.stdout)
    assert v["skip"] is False and v["reason"] == ""


def test_one_rank_with_an_infinite_gradient_makes_every_rank_skip(tmp_path):
    """Under the launcher, only rank 1's gradient is infinite: both ranks skip the step."""
    script = tmp_path / "agree.py"
    script.write_text(AGREEMENT)
    res = run_script(["-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "logs"), str(script), "1"],
                     timeout=300)
    logs = [worker_log(tmp_path / "logs", r) for r in (0, 1)]
    assert res.returncode == 0, res.stderr[-2000:] + logs[0][-2000:] + logs[1][-2000:]
    found = sorted((v for log in logs for v in verdicts(log)), key=lambda v: v["rank"])
    assert [(v["rank"], v["skip"], v["reason"]) for v in found] == [(0, True, "gradients"), (1, True, "gradients")]


def trainer_nan_args(shapes, vae, out, extra=()):
    return ldm_args(shapes, vae, out, 20, ["--learning_rate", "1e30", "--save_steps", "1", "--save_total_limit", "2",
                                           "--max_nonfinite_steps", "3", "--image_logging_steps", "0", *extra])


def no_trainer_nan_args(shapes, vae, out, extra=()):
    args = no_trainer_args(shapes, vae, out)
    for flag, value in (("--learning_rate", "1e30"), ("--save_steps", "1"), ("--max_train_steps", "20"), ("--gradient_accumulation_steps", "1")):
        args[args.index(flag) + 1] = value
    return args + ["--save_total_limit", "2", "--max_nonfinite_steps", "3", *extra]


NAN_ARGS = {"trainer": trainer_nan_args, "no_trainer": no_trainer_nan_args}


def checkpoints(out):
    return sorted(int(m.group(1)) for d in os.listdir(out) if (m := re.match(r"checkpoint-(\d+)$", d)))


@pytest.mark.parametrize("kind", ["trainer", "no_trainer"])
def test_skipped_steps_write_no_checkpoint(shapes, vae_dir, tmp_path, kind):
    """A learning rate of 1e30 blows the weights up in step 1; steps 2, 3 and 4 are non-finite and
    skipped, and the third skip in a row stops the run. With --save_steps 1 --save_total_limit 2,
    checkpoint-1 (the last step that updated) must be the only checkpoint left."""
    out = tmp_path / "out"
    res = run_script(NAN_ARGS[kind](shapes, vae_dir, out), timeout=600)
    output = res.stdout + res.stderr
    assert res.returncode == 1, output[-3000:]
    # Steps 2 and 3 are skipped with a warning; the third non-finite step in a row (4) stops the run.
    assert re.findall(r"step (\d+): non-finite .*skipping this optimizer step", output) == ["2", "3"], output[-3000:]
    assert "3 optimizer steps in a row had a non-finite loss" in output
    assert checkpoints(out) == [1], checkpoints(out)


@pytest.mark.parametrize("kind", ["trainer", "no_trainer"])
def test_sigterm_after_a_skipped_step_still_saves(shapes, vae_dir, tmp_path, kind):
    """SIGTERM while steps are being skipped: the preemption checkpoint is still written (its
    weights are those of the last step that updated), exit 0."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, *NAN_ARGS[kind](shapes, vae_dir, out, ["--max_nonfinite_steps", "1000"])], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen = ""
    deadline = time.time() + 300
    while "skipping this optimizer step" not in seen and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    os.killpg(proc.pid, signal.SIGTERM)
    output = seen + communicate(proc, 300)
    assert proc.returncode == 0, output[-3000:]
    saved = re.findall(r"Preempted: saved checkpoint-(\d+)", output)
    assert saved and int(saved[-1]) >= 2, output[-3000:]
    assert checkpoints(out) == [1, int(saved[-1])], checkpoints(out)
