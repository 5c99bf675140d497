"""`make test` runs pytest-xdist with 2 workers, each a session of its own: conftest.once_per_run
must still make each shared fixture (the autoencoder, the straight runs, the 2-process runs) once
for the whole run, and a failure to make it must fail the tests of every worker that asked."""
import os
import subprocess
import sys

from conftest import ROOT

# A conftest for the inner run: once_per_run from tests/conftest.py (loaded under another module
# name, since this file is a conftest too), with a make() that counts its calls in a file and
# sleeps so that both workers ask while it runs.
INNER_CONFTEST = '''
import importlib.util, os, time
import pytest

spec = importlib.util.spec_from_file_location("suite_conftest", {conftest!r})
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)


@pytest.fixture(scope="session")
def made(tmp_path_factory):
    def make(directory):
        with open(os.environ["MAKE_CALLS"], "a") as f:
            f.write(os.environ.get("PYTEST_XDIST_WORKER", "-") + "\\n")
        time.sleep(2)
        if os.environ.get("MAKE_FAILS"):
            raise AssertionError("the training run failed")
        (directory / "weights").write_text("trained")
        return {{"directory": str(directory)}}

    return suite.once_per_run(tmp_path_factory, "thing", make)
'''

INNER_TEST = '''
import os


def test_reads_it(made):
    assert open(os.path.join(made["directory"], "weights")).read() == "trained"
    with open(os.environ["READERS"], "a") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")
'''


def run_inner(tmp_path, fails):
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text(INNER_CONFTEST.format(conftest=os.path.join(ROOT, "tests", "conftest.py")))
    for name in ("a", "b", "c", "d"):  # --dist loadfile: files spread over both workers
        (inner / f"test_{name}.py").write_text(INNER_TEST)
    calls, readers = tmp_path / "calls", tmp_path / "readers"
    calls.touch()
    readers.touch()
    env = dict(os.environ, MAKE_CALLS=str(calls), READERS=str(readers), MAKE_FAILS="1" if fails else "")
    env.pop("PYTEST_XDIST_WORKER", None)  # (set when this suite itself runs under xdist)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile",
                          "--basetemp", str(tmp_path / "base"), str(inner)], cwd=str(tmp_path), env=env, capture_output=True,
                         text=True, timeout=300)
    return res, calls.read_text().split(), readers.read_text().split()


def test_two_workers_make_a_shared_fixture_once(tmp_path):
    res, calls, readers = run_inner(tmp_path, fails=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "4 passed" in res.stdout, res.stdout[-2000:]
    assert sorted(set(readers)) == ["gw0", "gw1"], readers  # both workers read it...
    assert len(calls) == 1, calls  # ...and it was made once


def test_a_shared_fixture_that_fails_fails_every_worker_once(tmp_path):
    res, calls, _ = run_inner(tmp_path, fails=True)
    assert res.returncode == 1, res.stdout[-3000:]
    assert "4 errors" in res.stdout, res.stdout[-2000:]
    assert len(calls) == 1, calls
    assert "AssertionError: the training run failed" in res.stdout
    assert "failed on another worker: AssertionError: the training run failed" in res.stdout, res.stdout[-3000:]
