"""At most one host sync per optimizer step in both loops (issue: every device read drains the GPU queue).

tests/count_host_syncs.py counts the device-to-host reads made by our code and the Trainer's loop;
runs of 2 and 5 steps differ only in the 3 extra steps, so the difference is the per-step count."""
import json

import pytest

from conftest import ldm_args, run_script
from test_multiprocess import no_trainer_args


def host_syncs(args):
    res = run_script(["tests/count_host_syncs.py", *args])
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1][len("host_syncs "):])


@pytest.mark.parametrize("kind", ["no_trainer", "trainer"])
def test_one_host_sync_per_optimizer_step(shapes, vae_dir, tmp_path, kind):
    def args(steps):
        out = tmp_path / f"{kind}{steps}"
        if kind == "trainer":
            return ldm_args(shapes, vae_dir, out, steps, ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                                                          "--logging_steps", "100", "--save_steps", "100", "--image_logging_steps", "0"])
        base = no_trainer_args(shapes, vae_dir, out, steps)
        for flag, value in (("--logging_steps", "100"), ("--save_steps", "100"), ("--image_logging_steps", "0")):
            base[base.index(flag) + 1] = value
        return base

    short, long = host_syncs(args(2)), host_syncs(args(5))
    per_step = {where: (long.get(where, 0) - short.get(where, 0)) / 3 for where in set(short) | set(long)}
    per_step = {where: n for where, n in per_step.items() if n}
    print(kind, "reads per extra step:", per_step)
    assert sum(per_step.values()) <= 1, per_step
