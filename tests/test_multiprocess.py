"""Both training scripts under `paddle.distributed.launch --nproc_per_node 2` on the CPU (gloo).

`no_trainer_args` stays here for test_host_syncs."""
import json
import os
import re
import shutil

import pytest

from conftest import dp_loop_args, dp_trainer_args, launch
from ldm.data.shards import ShardStream
from ldm.data.filelists import read_file_list


def checksums(logs):
    return [re.findall(r"rank \d: parameter checksum (\S+)", log)[-1] for log in logs]


def no_trainer_args(shapes, vae, out, steps):
    return ["train_txt2img_laion400m_no_trainer.py", "--output_dir", str(out), "--train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--adam_weight_decay", "0.02",
            "--max_train_steps", str(steps), "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--logging_steps", "1",
            "--save_steps", "2", "--seed", "23", "--num_workers", "1", "--vae_name_or_path", str(vae),
            "--text_encoder_config_file", "config/tiny/ldmbert.json", "--unet_config_file", "config/tiny/unet.json",
            "--file_list", shapes["file_list"], "--num_inference_steps", "2", "--model_max_length", "16",
            "--tokenizer_name", shapes["tokenizer"], "--resolution", "32", "--image_logging_steps", "2", "--num_threads", "1"]


def logged_speed(out, kind):
    """The speed fields of every logged interval: the Trainer's log history, the loop's VisualDL scalars."""
    fields = ("images_per_second", "images_per_second_per_device", "tflops_per_device")
    if kind == "trainer":
        history = json.load(open(out / "checkpoint-4" / "trainer_state.json"))["log_history"]
        return [{f: h[f] for f in fields} for h in history if "images_per_second" in h]
    from visualdl import LogReader

    path = next(os.path.join(d, f) for d, _, files in os.walk(out / "runs") for f in files if f.startswith("vdlrecords"))
    series = {f: [r.value for r in LogReader(file_path=path).get_data("scalar", f)] for f in fields}
    return [dict(zip(fields, values)) for values in zip(*series.values())]


@pytest.mark.parametrize("kind", ["no_trainer", "trainer"])
def test_two_processes_train_in_sync_and_resume(shapes, vae_dir, same_records, two_process_runs, tmp_path, kind):
    """The session's 4-step run of each script on 2 processes (conftest.two_process_runs), then a
    re-run to step 6 on a copy of its output."""
    make = dp_loop_args if kind == "no_trainer" else dp_trainer_args
    logs = two_process_runs[kind]["logs"]
    out = tmp_path / "out"
    shutil.copytree(two_process_runs[kind]["out"], out)

    # Gradients were averaged: both ranks end with the same weights.
    a, b = checksums(logs)
    assert a == b
    # Each rank trained on its own records: it says which shard it reads, and replaying each
    # rank's shard up to its saved position gives disjoint records.
    assert "this rank reads shards 0..0" in logs[0] and "this rank reads shards 1..1" in logs[1]
    ckpt = out / "checkpoint-4"
    pos = [json.load(open(ckpt / f"data_position_rank{r}.json")) for r in (0, 1)]
    assert all(p["world_size"] == 2 and p["batches"] > 0 for p in pos)
    entries = read_file_list(same_records)
    seen = []
    for rank, p in enumerate(pos):
        draws = p["workers"]["0"]["position"][0]
        stream = ShardStream(entries, rank, 2, seed=23, window=1000)
        seen.append({(rec.part, rec.line) for _, rec in zip(range(draws), stream)})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    # Only rank 0 wrote the final model and the VisualDL logs.
    assert (out / "model_index.json").is_file() and (out / "unet").is_dir()
    vdl_files = [f for _, _, files in os.walk(out / "runs") for f in files if f.startswith("vdlrecords")]
    assert vdl_files and "Saved LDMTextToImagePipeline" in logs[0] and "Saved LDMTextToImagePipeline" not in logs[1]
    # Rank 0 wrote the model card alone, from the run's last checkpoint (no collective once the
    # other ranks have left).
    assert "model card not written" not in logs[0]
    card = (out / "README.md").read_text()
    assert "- Steps: 4 (checkpoint checkpoint-4)" in card and "x 2 process(es)" in card, card
    # Speed per device is each device's share (two here), and the achieved TFLOP/s is logged beside it.
    speed = logged_speed(out, kind)
    assert speed and all(abs(s["images_per_second_per_device"] - s["images_per_second"] / 2) < 1e-3 * s["images_per_second"] and
                         s["images_per_second"] > 0 and s["tflops_per_device"] > 0 for s in speed), speed

    # Re-running continues from checkpoint-4.
    logs = launch(make(shapes, vae_dir, same_records, out, 6), tmp_path / "logs2")
    assert "Resuming from" in logs[0] and "checkpoint-4" in logs[0]
    assert (out / "checkpoint-6").is_dir()
    a, b = checksums(logs)
    assert a == b
