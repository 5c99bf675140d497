"""generate.py on models written by our training (the final pipeline directory and its
checkpoints) and by stock ppdiffusers; what a user checks: files, sizes, seeds, weights, errors."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import generate
from conftest import RESUME_STEPS, run_script

PROMPTS = ["a red circle on a blue background, in the middle", "a green square on a white background, on the left"]


@pytest.fixture(scope="module")
def run_dir(straight_loop_run):
    """The session's 8-step explicit-loop run at 32 px (f=4 autoencoder) with EMA (conftest,
    shared with test_resume_exact): checkpoint-7, checkpoint-8 and the final pipeline directory,
    which holds the EMA weights of step 8."""
    return straight_loop_run


@pytest.fixture(scope="module")
def trainer_run_dir(straight_trainer_run):
    """The same with train_txt2img_laion400m_trainer.py."""
    return straight_trainer_run


LAST = f"checkpoint-{RESUME_STEPS}"


def run(model_dir, out, *extra, prompts=PROMPTS):
    args = ["--model_dir", str(model_dir), "--output", str(out), "--num_inference_steps", "2", "--num_threads", "1"]
    for p in prompts:
        args += ["--prompt", p]
    assert generate.main(args + [str(a) for a in extra]) == 0
    return out


def images(out):
    files = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    return files, np.stack([np.asarray(Image.open(os.path.join(out, f)).convert("RGB"), dtype=np.int16) for f in files])


def test_final_pipeline_writes_one_png_per_image_at_the_trained_size(run_dir, tmp_path):
    out = run(run_dir, tmp_path / "out", "--num_images_per_prompt", 2, "--batch_size", 3)
    files, pixels = images(out)
    # Trained at 32 px through an f=4 autoencoder; the stock pipeline's own default would be 64.
    assert pixels.shape == (4, 32, 32, 3)
    assert files[0].startswith("0000-00-a-red-circle") and files[3].startswith("0001-01-a-green-square")
    record = json.load(open(out / "generation.json"))
    assert [r["prompt"] for r in record["images"]] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert (record["height"], record["width"], record["weights"]) == (32, 32, "pipeline")
    # Two images of one prompt start from different noise.
    assert np.abs(pixels[0] - pixels[1]).max() > 0


def test_same_seed_same_images_whatever_the_batch_size(run_dir, tmp_path):
    _, one = images(run(run_dir, tmp_path / "b1", "--num_images_per_prompt", 2, "--batch_size", 1, "--seed", 5))
    _, three = images(run(run_dir, tmp_path / "b3", "--num_images_per_prompt", 2, "--batch_size", 3, "--seed", 5))
    _, other = images(run(run_dir, tmp_path / "s6", "--num_images_per_prompt", 2, "--batch_size", 3, "--seed", 6))
    assert np.array_equal(one, three)
    assert np.abs(other - three).max() > 0


def pipeline_weights(pipe, names):
    """The pipeline's values of the training model's parameter names (unet.*, text_encoder.*)."""
    parts = {"unet": pipe.unet.state_dict(), "text_encoder": pipe.bert.state_dict()}
    return {n: parts[n.split(".", 1)[0]][n.split(".", 1)[1]].numpy() for n in names}


@pytest.mark.parametrize("script", ["no_trainer", "trainer"])
def test_checkpoint_uses_ema_weights_unless_told(request, tmp_path, script):
    import paddle
    from safetensors.numpy import load_file

    from ldm.evaluation.loading import load_pipeline
    from ppdiffusers import LDMTextToImagePipeline

    run_dir = request.getfixturevalue("run_dir" if script == "no_trainer" else "trainer_run_dir")
    ckpt = run_dir / LAST
    ema = load_file(str(ckpt / "ema.safetensors"))
    raw = load_file(str(ckpt / "model.safetensors"))  # both scripts write it
    ema = {n: v for n, v in ema.items() if n.startswith(("unet.", "text_encoder."))}  # not its update counter
    assert any(not np.array_equal(ema[n], raw[n]) for n in ema)
    # An old-format Trainer checkpoint (model_state.pdparams) is a pickle: read only when trusted.
    trust = not os.path.isfile(ckpt / "model.safetensors")
    pipe, which = load_pipeline(str(ckpt), trust_pickle=trust)
    assert which == "EMA" and all(np.array_equal(v, ema[n]) for n, v in pipeline_weights(pipe, ema).items())
    pipe, which = load_pipeline(str(ckpt), use_ema=False, trust_pickle=trust)
    assert which == "raw (--no_ema)" and all(np.array_equal(v, raw[n]) for n, v in pipeline_weights(pipe, ema).items())
    # The final directory was exported with the EMA weights of the last step, and draws the same
    # images as that checkpoint rebuilt from its args.json.
    final = LDMTextToImagePipeline.from_pretrained(str(run_dir))
    assert all(np.array_equal(v, ema[n]) for n, v in pipeline_weights(final, ema).items())
    _, from_final = images(run(run_dir, tmp_path / "final"))
    _, from_ckpt = images(run(ckpt, tmp_path / "ckpt", *(["--trust_pickle"] if trust else [])))
    assert np.abs(from_ckpt - from_final).max() <= 1
    assert json.load(open(tmp_path / "ckpt" / "generation.json"))["weights"] == "EMA"


@pytest.mark.parametrize("scheduler", ["pndm", "dpm"])
def test_other_samplers(run_dir, tmp_path, scheduler):
    _, ddim = images(run(run_dir, tmp_path / "ddim", prompts=PROMPTS[:1]))
    _, other = images(run(run_dir, tmp_path / scheduler, "--scheduler", scheduler, prompts=PROMPTS[:1]))
    assert other.shape == ddim.shape and np.abs(other - ddim).max() > 0


def test_zero_terminal_snr_models_only_sample_with_ddim(stock_pipeline_dir):
    from ldm.evaluation.loading import load_pipeline, set_scheduler
    from ppdiffusers import DDIMScheduler

    pipe, _ = load_pipeline(str(stock_pipeline_dir))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    for name in ("pndm", "dpm"):
        with pytest.raises(ValueError, match="zero terminal SNR"):
            set_scheduler(pipe, name)
    set_scheduler(pipe, "ddim")
    assert pipe.scheduler.config.rescale_betas_zero_snr and float(pipe.scheduler.alphas_cumprod[-1]) == 0.0


def test_stock_written_model_sizes_and_grid(stock_pipeline_dir, tmp_path):
    # f=2 autoencoder, 8x8 latents: 16 px by default; other sizes in real pixels.
    _, pixels = images(run(stock_pipeline_dir, tmp_path / "default"))
    assert pixels.shape == (2, 16, 16, 3)
    _, pixels = images(run(stock_pipeline_dir, tmp_path / "sized", "--height", 24, "--width", 16))
    assert pixels.shape == (2, 24, 16, 3)
    grid = tmp_path / "grid.png"
    run(stock_pipeline_dir, grid, "--grid", "--num_images_per_prompt", 3, "--prompt_file", write(tmp_path / "p.txt", "# two more\n\nthird prompt\nfourth\n"))
    width, height = Image.open(grid).size
    assert height == 4 * (96 + 14)  # a row (label + 96 px cells) per prompt: 2 flags + 2 file lines
    assert width == max(3 * 96, 360)


def write(path, text):
    path.write_text(text)
    return path


def one_line_error(capsys, model_dir, *extra):
    with pytest.raises(SystemExit) as e:
        generate.main(["--model_dir", str(model_dir), "--prompt", "x", "--output", "/tmp/unused-generate-out", *map(str, extra)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ")
    return err[-1]


def test_wrong_directories_get_one_line_naming_what_is_missing(run_dir, stock_pipeline_dir, tmp_path, capsys):
    assert "neither model_index.json" in one_line_error(capsys, tmp_path)
    assert "not a directory" in one_line_error(capsys, tmp_path / "nowhere")
    # A run that has not finished: points at its newest checkpoint.
    unfinished = tmp_path / "unfinished"
    for step in (3, 5, 7):
        os.makedirs(unfinished / f"checkpoint-{step}")
        if step < 7:  # checkpoint-7's save was cut off: no manifest, so the newest complete one is checkpoint-5
            (unfinished / f"checkpoint-{step}" / "manifest.json").write_text('{"files": {}}')
    assert "checkpoint-5" in one_line_error(capsys, unfinished)
    bare = tmp_path / "bare"
    os.makedirs(bare)
    (bare / "model.safetensors").write_text("")
    assert "without args.json" in one_line_error(capsys, bare)
    partial = tmp_path / "partial"
    os.makedirs(partial)
    (partial / "model_index.json").write_text("{}")
    assert "no vqvae/" in one_line_error(capsys, partial)
    assert "--no_ema needs a checkpoint" in one_line_error(capsys, stock_pipeline_dir, "--no_ema")
    assert "multiples of the autoencoder's downsampling factor 2" in one_line_error(capsys, stock_pipeline_dir, "--height", 15)


def test_cli_runs_as_a_script(stock_pipeline_dir, tmp_path):
    res = run_script(["generate.py", "--model_dir", str(stock_pipeline_dir), "--prompt", "a red circle", "--output", str(tmp_path / "o"),
                      "--num_inference_steps", "1", "--num_threads", "1"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "o")) == ["0000-00-a-red-circle.png", "generation.json"]


@pytest.mark.parametrize("source", ["stock", "ours"])
def test_validation_loss_of_written_models(request, shapes, source):
    """The fixed validation loss (ldm.validation) runs on any written model, and for our run the
    exported pipeline and the checkpoint it came from (its EMA weights) measure the same loss."""
    from ldm.evaluation.loading import model_from_checkpoint
    from ldm.models.ldm import LatentDiffusionModel
    from ldm.training.validation import Validator

    model_dir = request.getfixturevalue("stock_pipeline_dir" if source == "stock" else "run_dir")
    resolution = 16 if source == "stock" else 32
    exported = LatentDiffusionModel.from_pipeline_dir(str(model_dir), 16)
    first = Validator(exported, shapes["file_list"], 4, resolution, 2).losses()
    assert sorted(first) == ["validation/loss"] + [f"validation/loss_q{q}" for q in (1, 2, 3, 4)]
    assert all(np.isfinite(v) and v > 0 for v in first.values())
    assert Validator(exported, shapes["file_list"], 4, resolution, 2).losses() == first
    if source == "ours":
        checkpoint, which = model_from_checkpoint(str(model_dir / LAST))
        assert which == "EMA"
        again = Validator(checkpoint, shapes["file_list"], 4, resolution, 2).losses()
        assert again == pytest.approx(first, rel=1e-5)
        raw, _ = model_from_checkpoint(str(model_dir / LAST), use_ema=False)
        assert Validator(raw, shapes["file_list"], 4, resolution, 2).losses() != first


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "dpm"])
def test_checkpoint_and_exported_directory_sample_the_same_images(run_dir, tmp_path, scheduler):
    """The last checkpoint (rebuilt from its args.json, EMA weights) and the directory exported from the
    same weights are one model: every sampler must take the same settings (timestep spacing
    included) from both, so the same seed gives the same pixels."""
    _, from_final = images(run(run_dir, tmp_path / "final", "--scheduler", scheduler, prompts=PROMPTS[:1]))
    _, from_ckpt = images(run(run_dir / LAST, tmp_path / "ckpt", "--scheduler", scheduler, prompts=PROMPTS[:1]))
    assert np.abs(from_ckpt - from_final).max() == 0
