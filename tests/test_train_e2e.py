"""End to end: the real scripts on the tiny preset, asserting on what they wrote."""
import json
import os
import shutil

import numpy as np
import pytest

from conftest import RESUME_STEPS, ldm_args, run_script, trainer_resume_args


def vdl_tags(logdir):
    """{tag: number of records} over every VisualDL file under logdir."""
    from visualdl import LogReader

    tags = {}
    for dirpath, _, files in os.walk(logdir):
        for name in files:
            if name.startswith("vdlrecords"):
                reader = LogReader(file_path=os.path.join(dirpath, name))
                for kind, names in reader.get_tags().items():
                    for tag in names:
                        tags[tag] = tags.get(tag, 0) + len(reader.get_data(kind, tag))
    return tags


def test_stage1_writes_a_loadable_autoencoder_with_measured_scale(vae_dir):
    from ppdiffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(vae_dir))
    scale = vae.config.scaling_factor
    assert np.isfinite(scale) and scale > 0 and abs(scale - 0.18215) > 1e-4
    assert sorted(os.listdir(vae_dir)).count("checkpoint-6") == 1
    assert any(t.startswith("reconstruction") for t in vdl_tags(str(vae_dir)))
    # With --use_ema the exported autoencoder is the EMA (as the last checkpoint saved it).
    from safetensors.numpy import load_file

    ema = load_file(str(vae_dir / "checkpoint-6" / "ema.safetensors"))
    exported = {k: v.numpy() for k, v in vae.state_dict().items()}
    assert all(np.array_equal(exported[k[len("vae."):]], v) for k, v in ema.items() if k.startswith("vae."))
    assert int(ema["__ema_num_updates__"][0]) == 6


@pytest.fixture(scope="module")
def ldm_run(shapes, vae_dir):
    out = shapes["root"] / "ldm"
    res = run_script(ldm_args(shapes, vae_dir, out, 8, ["--eval_file_list", shapes["file_list"], "--eval_records", "8", "--eval_steps", "4"]))
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_stage2_checkpoints_logs_and_pipeline(ldm_run):
    out, _ = ldm_run
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-4", "checkpoint-8"]
    tags = vdl_tags(str(out))
    assert any("loss" in t for t in tags), tags
    assert any("images_per_second" in t for t in tags), tags
    assert any("learning_rate" in t for t in tags), tags
    assert any(t.startswith("ddim-samples-7.5") for t in tags) and any(t.startswith("reconstruction") for t in tags)
    # The fixed validation loss, overall and per timestep quartile, at steps 4 and 8.
    for tag in ("validation/loss", "validation/loss_q1", "validation/loss_q2", "validation/loss_q3", "validation/loss_q4"):
        assert tags.get(tag) == 2, (tag, tags)
    # DDIM as CompVis and the reference sample it: the last step lands on t=1.
    assert json.load(open(out / "scheduler" / "scheduler_config.json"))["steps_offset"] == 1
    # Checkpoints say how to rebuild the model (generate.py reads this).
    assert json.load(open(out / "checkpoint-8" / "args.json"))["unet_config_file"] == "config/tiny/unet.json"
    state = json.load(open(out / "checkpoint-8" / "trainer_state.json"))
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert losses and all(np.isfinite(losses))
    # Speed per device (one device here: all of it) and the achieved TFLOP/s from the counted FLOPs per image.
    speed = [h for h in state["log_history"] if "images_per_second" in h]
    assert speed and all(h["images_per_second_per_device"] == h["images_per_second"] > 0 and h["tflops_per_device"] > 0 for h in speed)
    assert any("tflops_per_device" in t for t in tags), tags


def test_final_output_loads_in_stock_pipeline(ldm_run):
    import paddle
    from ppdiffusers import LDMTextToImagePipeline

    out, _ = ldm_run
    pipe = LDMTextToImagePipeline.from_pretrained(str(out))
    latent = pipe.unet.config.sample_size
    images = pipe(["a red circle on a blue background, in the middle"], height=latent * 8, width=latent * 8,
                  num_inference_steps=3, generator=paddle.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_rerun_resumes_from_newest_checkpoint(shapes, vae_dir, ldm_run, tmp_path):
    # On a copy: the module's run stays as it finished for the other tests.
    out = tmp_path / "ldm"
    shutil.copytree(ldm_run[0], out)
    res = run_script(ldm_args(shapes, vae_dir, out, 10))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"Resuming from {out / 'checkpoint-8'}" in res.stdout + res.stderr
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-10", "checkpoint-8"]
    state = json.load(open(out / "checkpoint-10" / "trainer_state.json"))
    assert state["global_step"] == 10


def test_loss_falls_over_a_short_run(shapes, vae_dir, tmp_path):
    """Zero-initialised outputs predict eps = 0, so the loss starts near E[eps^2] = 1 and must fall."""
    out = tmp_path / "learn"
    res = run_script(ldm_args(shapes, vae_dir, out, 40, ["--save_steps", "40", "--image_logging_steps", "0", "--logging_steps", "5"]))
    assert res.returncode == 0, res.stderr[-3000:]
    state = json.load(open(out / "checkpoint-40" / "trainer_state.json"))
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert 0.8 < losses[0] < 1.3, losses
    assert np.mean(losses[-2:]) < 0.75 * losses[0], losses


def test_resumed_run_reads_exactly_the_records_of_an_uninterrupted_one(shapes, vae_dir, straight_trainer_run, tmp_path):
    """Stop after 3 of 8 steps and re-run: the data positions (and skips) at step 8 match a straight
    run (the session's, shared with test_resume_exact).

    3 is odd on purpose: the resumed DataLoader must start its round-robin at the second worker."""
    split = tmp_path / "split"
    for steps in (3, RESUME_STEPS):
        res = run_script(trainer_resume_args(shapes, vae_dir, split, steps))
        assert res.returncode == 0, res.stderr[-3000:]
    assert "Data stream resumes at the position saved in" in res.stdout + res.stderr
    a = json.load(open(straight_trainer_run / "checkpoint-8" / "data_position_rank0.json"))
    b = json.load(open(split / "checkpoint-8" / "data_position_rank0.json"))
    assert a == b and a["batches"] == 8 and len(a["workers"]) == 2


def test_validation_loss_is_fixed_and_leaves_the_rng_alone(shapes, vae_dir):
    import paddle

    from ldm.models.ldm import LatentDiffusionModel
    from ldm.training.validation import Validator

    model = LatentDiffusionModel.from_scratch(str(vae_dir), "config/tiny/ldmbert.json", "config/tiny/unet.json", shapes["tokenizer"], 16, seed=0)
    validator = Validator(model, shapes["file_list"], 8, 32, 3)
    assert validator.timesteps.numpy().tolist() == [62, 187, 312, 437, 562, 687, 812, 937]
    paddle.seed(5)
    before = paddle.randn([4]).numpy()
    paddle.seed(5)
    first = validator.losses()
    second = validator.losses()
    after = paddle.randn([4]).numpy()
    assert first == second and np.isfinite(list(first.values())).all()
    assert sorted(first) == ["validation/loss"] + [f"validation/loss_q{q}" for q in (1, 2, 3, 4)]
    assert np.array_equal(before, after), "validation drew from the training RNG"
