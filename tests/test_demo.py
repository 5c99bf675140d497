"""demo.py's own logic (the training it runs is the scripts' tests' business): how it splits
the batch over processes and starts them."""
import sys

from conftest import run_script

import demo


def test_one_process_runs_the_script_two_go_through_paddles_launcher(tmp_path):
    assert demo.trainer(1, "train_vae.py", str(tmp_path)) == [sys.executable, "train_vae.py"]
    cmd = demo.trainer(2, "train_vae.py", str(tmp_path / "logs"))
    assert cmd[:3] == [sys.executable, "-m", "paddle.distributed.launch"] and cmd[-1] == "train_vae.py"
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and cmd[cmd.index("--log_dir") + 1] == str(tmp_path / "logs")


def test_a_batch_that_does_not_split_over_the_processes_stops_at_start_up(tmp_path):
    res = run_script(["demo.py", "--batch_size", "15", "--processes", "2", "--output_dir", str(tmp_path)], timeout=60)
    assert res.returncode == 2 and "--batch_size 15 must split evenly over --processes 2" in res.stderr
    assert not any(tmp_path.iterdir())  # nothing was started


def test_the_default_is_one_process_per_core_up_to_two_on_a_cpu():
    assert demo.default_processes() == min(2, len(demo.os.sched_getaffinity(0)))
