"""Elastic resume: a data position saved on W processes x K workers resumes on W' x K', and
every record of every pass is read exactly once across the change."""
import collections
import json
import os

import pytest

from conftest import make_parts, write_lists
from ldm.training import checkpoint, data_position
from ldm.data.records import SKIP_REASONS
from ldm.data.progress import StreamProgress
from ldm.data.stream import TextImageStream


def stream_for(file_list, rank, world_size):
    return TextImageStream(file_list, 32, seed=3, buffer_size=5, rank=rank, world_size=world_size, parts_per_window=2)


def run_layout(file_list, world_size, num_workers, take, resume_from=None):
    """Read `take(rank, worker)` records from every shard of a layout (after resuming from
    `resume_from` if given); return the records (part, line, pass) and every rank's saved state."""
    records, states = [], []
    for rank in range(world_size):
        stream = stream_for(file_list, rank, world_size)
        saved = data_position.resume_data_stream(stream, str(resume_from), rank, num_workers, False) if resume_from else None
        progress = StreamProgress(world_size, num_workers, saved, stream=stream)
        for worker in range(max(1, num_workers)):
            shard = stream.shard_stream(worker, max(1, num_workers))
            n = take(rank, worker)
            got = 0
            for rec in stream.records(shard):
                records.append((rec["part"], rec["line"], rec["pass"]))
                got += 1
                if (isinstance(n, int) and got == n) or (callable(n) and n(rec)):
                    break
            progress.workers[worker] = {"position": shard.state.tolist(), "skips": shard.skips.as_vector().tolist()}
        states.append(progress.state_dict())
    return records, states


def save(states, ckpt):
    os.makedirs(ckpt, exist_ok=True)
    for rank, state in enumerate(states):
        with open(data_position.data_position_file(str(ckpt), rank), "w") as f:
            json.dump(state, f)
    with open(os.path.join(ckpt, "args.json"), "w") as f:
        json.dump({"resolution": 32}, f)


def by_pass(records):
    passes = collections.defaultdict(list)
    for part, line, p in records:
        passes[p].append((part, line))
    return passes


@pytest.mark.parametrize("num_parts", [2, 7])
@pytest.mark.parametrize("old,new", [((2, 2), (1, 3)), ((1, 1), (2, 1)), ((1, 3), (2, 2))])
def test_a_layout_change_reads_every_record_of_every_pass_once(tmp_path, num_parts, old, new):
    parts = make_parts(tmp_path, num_parts, 9)
    file_list = write_lists(tmp_path, parts)
    everything = sorted((p, n) for p in parts for n in range(1, 10))
    shards = old[0] * old[1]
    share = len(everything) // shards
    # Old shards stopped at different places: early in pass 0, late in it, and one into pass 1.
    before, states = run_layout(file_list, *old, lambda r, w: [3, share - 1, share + 4][(r * old[1] + w) % 3])
    save(states, tmp_path / "checkpoint-9")
    highest = max(p for _, _, p in before)
    assert highest >= (0 if shards == 1 else 1)
    # The new layout reads until every new shard is past the pass after the highest one.
    after, new_states = run_layout(file_list, *new, lambda r, w: (lambda rec: rec["pass"] > highest + 1), tmp_path / "checkpoint-9")
    after = [r for r in after if r[2] <= highest + 1]
    passes = by_pass(before + after)
    for p in range(highest + 2):
        assert sorted(passes[p]) == everything, f"pass {p}: {len(passes[p])} reads of {len(everything)} records"


def test_a_resume_in_the_middle_of_the_old_passes_is_exact_and_a_second_change_then_is_refused(tmp_path):
    parts = make_parts(tmp_path, 3, 9)
    file_list = write_lists(tmp_path, parts)
    everything = sorted((p, n) for p in parts for n in range(1, 10))
    before, states = run_layout(file_list, 2, 2, lambda r, w: [2, 5, 8, 1][r * 2 + w])
    save(states, tmp_path / "checkpoint-1")
    # On 1 x 3: read a little (still finishing the old shards' pass 0), checkpoint, resume on 1 x 3.
    middle, states = run_layout(file_list, 1, 3, lambda r, w: 2, tmp_path / "checkpoint-1")
    assert "elastic" in states[0]
    save(states, tmp_path / "checkpoint-2")
    after, _ = run_layout(file_list, 1, 3, lambda r, w: (lambda rec: rec["pass"] > 1), tmp_path / "checkpoint-2")
    passes = by_pass(before + middle + [r for r in after if r[2] <= 1])
    assert sorted(passes[0]) == everything and sorted(passes[1]) == everything
    # Another layout change while the old passes are unfinished: one line, and what to do.
    with pytest.raises(ValueError, match="still finishing the passes of an earlier layout change.*resume it on 1 x 3"):
        data_position.resume_data_stream(stream_for(file_list, 0, 2), str(tmp_path / "checkpoint-2"), 0, 1, False)


def test_skip_counts_survive_a_layout_change(tmp_path):
    parts = make_parts(tmp_path, 2, 6)
    gone = str(tmp_path / "gone.gz")
    file_list = write_lists(tmp_path, parts + [gone])
    _, states = run_layout(file_list, 2, 1, lambda r, w: 7)
    total = sum(s["skips"][SKIP_REASONS.index("missing_part")] for st in states for s in st["workers"].values())
    assert total >= 1
    save(states, tmp_path / "checkpoint-3")
    stream = stream_for(file_list, 0, 1)
    saved = data_position.resume_data_stream(stream, str(tmp_path / "checkpoint-3"), 0, 3, False)
    assert sum(w["skips"][SKIP_REASONS.index("missing_part")] for w in saved["workers"].values()) == total


def test_the_training_script_resumes_on_more_dataloader_workers(shapes, vae_dir, tmp_path):
    from conftest import run_script
    from conftest import loop_resume_args as no_trainer_args

    out = tmp_path / "run"
    res = run_script(no_trainer_args(shapes, vae_dir, out, 2, ["--num_workers", "1", "--save_steps", "2"]))
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_script(no_trainer_args(shapes, vae_dir, out, 4, ["--num_workers", "2", "--save_steps", "2"]))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "data position carried over from 1 x 1 to 1 x 2" in res.stderr
    with open(data_position.data_position_file(str(out / "checkpoint-4"), 0)) as f:
        saved = json.load(f)
    assert saved["num_workers"] == 2 and set(saved["workers"]) == {"0", "1"}
