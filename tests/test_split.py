"""Holding out parts for validation: python -m ldm.split."""
import json

from conftest import make_parts, run_script, write_lists


def test_split_holds_out_whole_parts_and_training_never_reads_them(tmp_path):
    parts = make_parts(tmp_path, 4, 3)
    file_list = write_lists(tmp_path, parts, weights=2)
    res = run_script(["-m", "ldm.split", "--file_list", file_list, "--output_dir", str(tmp_path / "split"), "--eval_parts", "1"])
    assert res.returncode == 0, res.stderr
    assert "(3 parts)" in res.stdout and "(1 parts)" in res.stdout

    def records(which):
        res = run_script(["-m", "ldm.data", "--file_list", str(tmp_path / "split" / f"{which}.filelist.list"), "--resolution", "32"])
        assert res.returncode == 0, res.stderr
        return {(r["part"], r["line"]) for r in map(json.loads, res.stdout.splitlines())}

    train, held_out = records("train"), records("eval")
    assert len(train) == 9 and len(held_out) == 3 and not train & held_out
    assert {p for p, _ in held_out} == {parts[-1]}
    assert (tmp_path / "split" / "train.filelist.list").read_text().split()[-1] == "2"  # the weight is kept
    res = run_script(["-m", "ldm.split", "--file_list", file_list, "--output_dir", str(tmp_path / "s2"), "--eval_parts", "4"])
    assert res.returncode == 2 and "would leave none to train on" in res.stderr
