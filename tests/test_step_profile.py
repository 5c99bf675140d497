"""bench/step_profile.py: where a demo stage-2 step's time goes, by kind, and its FLOP/s."""
import os
import re

from conftest import ROOT, run_script


def test_the_step_profile_splits_the_whole_step_into_kinds_and_counts_flops_against_the_peak(tmp_path):
    res = run_script([os.path.join(ROOT, "bench", "step_profile.py"), "--steps", "2", "--warmup", "1", "--batch_size", "2"], cwd=tmp_path, timeout=300)  # run elsewhere: it writes no trace file there
    assert res.returncode == 0, res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    shares = dict(re.findall(r"(convolution|attention|linear|norm|optimizer|other ops|overhead) (\d+)%", last))
    assert len(shares) == 7, last
    assert 97 <= sum(int(v) for v in shares.values()) <= 103  # the kinds cover the profiled step (rounding aside)
    assert int(shares["convolution"]) > 0 and int(shares["attention"]) > 0 and int(shares["linear"]) > 0
    flops, of_peak = re.search(r"([0-9.]+) GFLOP/s = ([0-9.]+)% of peak", last).groups()
    assert float(flops) > 0 and 0 < float(of_peak) < 100
    assert not (tmp_path / "profiler_log").exists()
