"""Filelist weights hold: a filelist that runs out leaves the others their mutual ratio, and a
filelist whose parts are all missing stops the run at start-up unless --allow_missing_parts."""
import collections

import pytest

from conftest import make_parts, run_script, write_part
from ldm.data.shards import ShardStream
from ldm.data.stream import TextImageStream
from ldm.data.filelists import read_file_list


def weighted_lists(tmp_path, sizes):
    """A --file_list of one-part filelists {name: (weight, lines)}; raw lines, never decoded here."""
    rows = []
    for name, (weight, lines) in sizes.items():
        part = str(tmp_path / f"{name}.gz")
        write_part(part, [f"{name} {i}\t_\tAAAA" for i in range(lines)])
        (tmp_path / f"{name}.filelist").write_text(part + "\n")
        rows.append(f"{tmp_path / (name + '.filelist')} {weight}")
    (tmp_path / "w.list").write_text("\n".join(rows) + "\n")
    return read_file_list(str(tmp_path / "w.list"))


def test_the_others_keep_their_ratio_after_one_filelist_runs_out(tmp_path):
    entries = weighted_lists(tmp_path, {"big": (8, 2000), "small": (1, 20), "other": (1, 2000)})
    drawn = [rec.list_index for rec in ShardStream(entries, 0, 1, seed=0, window=64, passes=1)]
    assert collections.Counter(drawn) == {0: 2000, 1: 20, 2: 2000}, "one pass reads every line once"
    after = drawn[max(i for i, d in enumerate(drawn) if d == 1) + 1 :][:1500]
    share_other = after.count(2) / len(after)
    assert 0.085 < share_other < 0.14, f"big:other should stay 8:1 (share 0.11), got share {share_other:.3f}"


@pytest.mark.parametrize("sizes", [{"big": (8, 150), "small": (1, 10), "other": (1, 150)},
                                   {"first": (8, 40), "b": (1, 150), "c": (1, 150)}])
def test_draws_after_a_filelist_ran_out_resume_exactly(tmp_path, sizes):
    """Resumed before or after a filelist ran out: a resumed stream learns that it ended only
    when it draws it (the first draws after the resume), and must still draw what the
    uninterrupted stream draws. Every 3rd cut, so that those first draws cover many values."""
    entries = weighted_lists(tmp_path, sizes)

    def stream(state=None):
        return ShardStream(entries, 0, 1, seed=4, window=16, state=state, passes=1)

    full = [(r.list_index, r.line) for r in stream()]
    for cut in range(1, len(full), 3):
        head = stream()
        first = [(r.list_index, r.line) for _, r in zip(range(cut), head)]
        rest = [(r.list_index, r.line) for r in stream(head.state.copy())]
        assert first + rest == full, f"resumed after {cut} records"


def test_a_filelist_without_any_part_stops_the_start_up_naming_it(tmp_path, capfd):
    (tmp_path / "a").mkdir()
    good = make_parts(tmp_path / "a", 2, 3)
    (tmp_path / "a.filelist").write_text("\n".join(good + [str(tmp_path / "gone-1.gz")]) + "\n")
    (tmp_path / "b.filelist").write_text(f"{tmp_path / 'gone-2.gz'}\n{tmp_path / 'gone-3.gz'}\n")
    (tmp_path / "w.list").write_text(f"{tmp_path / 'a.filelist'} 9\n{tmp_path / 'b.filelist'}\n")
    with pytest.raises(ValueError) as e:
        TextImageStream(str(tmp_path / "w.list"), 32, rank=0, world_size=1)
    message = str(e.value)
    assert "\n" not in message and "b.filelist" in message and "--allow_missing_parts" in message, message
    capfd.readouterr()
    stream = TextImageStream(str(tmp_path / "w.list"), 32, rank=0, world_size=1, allow_missing_parts=True)
    err = capfd.readouterr().err
    assert "a.filelist: 2 of 3 parts found, 1 missing" in err and "b.filelist: 0 of 2 parts found, 2 missing" in err, err
    assert len(list(stream.records(stream.shard_stream(0, 1, passes=1)))) == 6
    # The CLI and the training scripts take the flag.
    res = run_script(["-m", "ldm.data", "--file_list", str(tmp_path / "w.list"), "--resolution", "32"])
    assert res.returncode == 2 and "b.filelist" in res.stderr
    res = run_script(["-m", "ldm.data", "--file_list", str(tmp_path / "w.list"), "--resolution", "32", "--allow_missing_parts"])
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 6


def test_the_training_script_stops_on_a_filelist_without_parts(shapes, vae_dir, tmp_path):
    from conftest import ldm_args

    (tmp_path / "b.filelist").write_text(f"{tmp_path / 'gone.gz'}\n")
    with open(shapes["file_list"]) as f:
        listed = f.read()
    (tmp_path / "w.list").write_text(listed + f"{tmp_path / 'b.filelist'}\n")
    args = ldm_args(shapes, vae_dir, tmp_path / "out", 1)
    args[args.index("--file_list") + 1] = str(tmp_path / "w.list")
    res = run_script(args)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "b.filelist" in res.stderr and "--allow_missing_parts" in res.stderr
