"""Continuing a model keeps what it was trained with (README "Continuing a model"): the prediction
type and noise schedule in its scheduler/scheduler_config.json are adopted when the command line
does not give them, and a flag that contradicts them stops the run at start-up."""
import json
import shutil

import pytest

from conftest import ldm_args, run_script


@pytest.fixture(scope="module")
def vzero_dir(stock_pipeline_dir, tmp_path_factory):
    """The stock-written tiny pipeline with the scheduler of a v-prediction, zero-terminal-SNR model
    (saved by stock ppdiffusers, as a diffusers-trained model would carry it)."""
    from ppdiffusers import DDIMScheduler

    out = tmp_path_factory.mktemp("vzero") / "pipeline"
    shutil.copytree(stock_pipeline_dir, out)
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                  prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing").save_pretrained(str(out / "scheduler"))
    return out


def trainer_continuing(shapes, model_dir, out, *extra):
    # The from-scratch flags of ldm_args are ignored once --model_name_or_path is given; the
    # stock model has an f=2 autoencoder and 8x8 latents: 16 px.
    return ldm_args(shapes, model_dir / "vqvae", out, 1, ["--model_name_or_path", str(model_dir), "--resolution", "16", "--image_logging_steps", "0",
                                              "--per_device_train_batch_size", "2", "--num_threads", "1", *extra])


def loop_continuing(shapes, model_dir, out, *extra):
    return ["train_txt2img_laion400m_no_trainer.py", "--output_dir", str(out), "--pretrained_model_name_or_path", str(model_dir),
            "--train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_train_steps", "1", "--save_steps", "1",
            "--logging_steps", "1", "--num_workers", "0", "--file_list", shapes["file_list"], "--model_max_length", "16",
            "--resolution", "16", "--image_logging_steps", "0", "--num_threads", "1", *extra]


def exported_schedule(out):
    return json.load(open(out / "scheduler" / "scheduler_config.json"))


@pytest.mark.parametrize("script", ["trainer", "no_trainer"])
def test_settings_not_given_are_adopted_from_the_directory(shapes, vzero_dir, tmp_path, script):
    """--prediction_type v_prediction alone (the Trainer) or no recipe flag at all (the loop): the
    run trains and exports zero terminal SNR and "trailing" spacing, and says so once."""
    out = tmp_path / "out"
    if script == "trainer":
        res = run_script(trainer_continuing(shapes, vzero_dir, out, "--prediction_type", "v_prediction"))
    else:
        res = run_script(loop_continuing(shapes, vzero_dir, out))
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    adopted = [line for line in log.splitlines() if f"Continuing {vzero_dir} as it was trained" in line]
    assert len(adopted) == 1 and "rescale_betas_zero_snr=True" in adopted[0] and "timestep_spacing='trailing'" in adopted[0], adopted
    config = exported_schedule(out)
    assert (config["prediction_type"], config["rescale_betas_zero_snr"], config["timestep_spacing"]) == ("v_prediction", True, "trailing")
    # args.json says what was trained, so checkpoint-1 rebuilds (and samples) the same model.
    saved = json.load(open(out / "checkpoint-1" / "args.json"))
    assert (saved["prediction_type"], saved["zero_terminal_snr"]) == ("v_prediction", True)
    from ldm.evaluation.loading import model_from_checkpoint

    model, _ = model_from_checkpoint(str(out / "checkpoint-1"))
    assert float(model.noise_scheduler.alphas_cumprod[-1]) == 0.0  # SNR(T) = 0, as trained


def one_line_error(res):
    assert res.returncode == 2, res.stderr[-3000:]
    return res.stderr.strip().splitlines()[-1]


def test_flags_that_contradict_the_directory_stop_at_startup(shapes, vzero_dir, stock_pipeline_dir, tmp_path):
    # Trainer: an explicit --prediction_type epsilon (the default's value, but given) on a v model.
    err = one_line_error(run_script(trainer_continuing(shapes, vzero_dir, tmp_path / "a", "--prediction_type", "epsilon")))
    assert err.startswith("error: ") and "trained with prediction_type v_prediction" in err and "pass --prediction_type v_prediction" in err
    # The loop, an abbreviated flag turning zero terminal SNR off.
    err = one_line_error(run_script(loop_continuing(shapes, vzero_dir, tmp_path / "b", "--zero_terminal", "false")))
    assert "trained with zero terminal SNR" in err and "--zero_terminal_snr false was given" in err
    # The other way round: an epsilon model (stock defaults) continued as v-prediction used to
    # train v on it with a warning.
    err = one_line_error(run_script(loop_continuing(shapes, stock_pipeline_dir, tmp_path / "c", "--prediction_type", "v_prediction")))
    assert "trained with prediction_type epsilon" in err and "pass --prediction_type epsilon" in err
    assert not (tmp_path / "c" / "checkpoint-1").exists()
