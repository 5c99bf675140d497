"""`python -m ldm.data` takes the training scripts' flag names, so a run's flags can be pasted."""
import json

from conftest import make_parts, run_script, write_lists


def order(file_list, *flags):
    res = run_script(["-m", "ldm.data", "--file_list", file_list, "--resolution", "32", *flags])
    assert res.returncode == 0, res.stderr
    return [(row["part"], row["line"]) for row in map(json.loads, res.stdout.splitlines())]


def test_shuffle_buffer_is_the_training_scripts_flag_and_buffer_size_its_old_name(tmp_path):
    file_list = write_lists(tmp_path, make_parts(tmp_path, 2, 12))
    small = order(file_list, "--shuffle_buffer", "3")
    assert order(file_list, "--buffer_size", "3") == small
    # The flag is read, not ignored: the whole pass in one buffer is shuffled differently.
    whole = order(file_list, "--shuffle_buffer", "1000")
    assert sorted(whole) == sorted(small) and whole != small
    res = run_script(["-m", "ldm.data", "--file_list", file_list, "--shuffle_buffer", "0"])
    assert res.returncode == 2 and "--shuffle_buffer must be > 0" in res.stderr
