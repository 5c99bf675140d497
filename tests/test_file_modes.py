"""Files a run writes are readable as the umask allows, like any file the user writes.

The safetensors writer creates 0600 files whatever the umask; on a cluster a teammate could not
read the run's checkpoints or exported model, nor a job resumed under another uid its own
checkpoint. The runs here are the suite's shared ones (conftest), started with the test's umask.
"""
import os
import stat

import pytest


def umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def modes(directory):
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, directory)] = stat.S_IMODE(os.stat(path).st_mode)
    return found


@pytest.mark.parametrize("run", ["straight_trainer_run", "straight_loop_run", "vae_dir"])
def test_every_file_of_a_run_has_the_umask_mode(run, request):
    if umask() & 0o044 == 0o044:
        pytest.skip("this umask gives nobody else read access: nothing to tell apart")
    directory = request.getfixturevalue(run)
    found = modes(directory)
    safetensors = [p for p in found if p.endswith(".safetensors")]
    assert safetensors, f"no safetensors file under {directory}: {sorted(found)}"
    expected = 0o666 & ~umask()
    wrong = {p: oct(m) for p, m in found.items() if m & 0o666 != expected}
    assert not wrong, f"files not at the umask's mode {oct(expected)}: {wrong}"
