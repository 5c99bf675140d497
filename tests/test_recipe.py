"""The training recipe: v-prediction, min-SNR, zero terminal SNR, offset noise, resolution stages."""
import json
import math

import numpy as np
import paddle
import pytest
from ppdiffusers import DDPMScheduler

from conftest import ldm_args, run_script
from ldm.models.recipe import Recipe, min_snr_weights, sample_noise, snr, training_target


def alphas_cumprod(recipe=None):
    return DDPMScheduler(**(recipe or Recipe()).schedule()).alphas_cumprod


def test_v_target_matches_its_definition():
    scheduler = DDPMScheduler(**Recipe("v_prediction").schedule())
    paddle.seed(0)
    x0, eps = paddle.randn([3, 4, 8, 8]), paddle.randn([3, 4, 8, 8])
    t = paddle.to_tensor([0, 500, 999], dtype="int64")
    v = training_target(scheduler, x0, eps, t, "v_prediction").numpy()
    a = scheduler.alphas_cumprod.numpy()[[0, 500, 999]].astype(np.float64).reshape(3, 1, 1, 1)
    expected = np.sqrt(a) * eps.numpy() - np.sqrt(1 - a) * x0.numpy()  # Salimans & Ho 2022, section 4
    assert np.abs(v - expected).max() < 1e-5
    assert training_target(scheduler, x0, eps, t, "epsilon") is eps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_by_hand(prediction_type):
    """gamma = 5: at t = 0 the SNR is huge (weight gamma/SNR or gamma/(SNR+1)); late, SNR < 5
    and the weight is 1 (epsilon) or SNR/(SNR+1) (v)."""
    a = alphas_cumprod().numpy().astype(np.float64)
    t = [0, 100, 500, 999]
    snr_t = snr(alphas_cumprod(), paddle.to_tensor(t, dtype="int64"))
    weights = min_snr_weights(snr_t, 5.0, prediction_type).numpy()
    for k, step in enumerate(t):
        s = a[step] / (1 - a[step])
        expected = min(s, 5.0) / (s if prediction_type == "epsilon" else s + 1)
        assert math.isclose(weights[k], expected, rel_tol=1e-4), (step, weights[k], expected)
    assert a[0] / (1 - a[0]) > 5 > a[999] / (1 - a[999])  # the hand values cover both sides of gamma


def test_zero_terminal_snr_rescales_the_last_step_to_pure_noise():
    plain = alphas_cumprod().numpy()
    rescaled = alphas_cumprod(Recipe("v_prediction", zero_terminal_snr=True)).numpy()
    assert plain[-1] > 0.004  # the LDM schedule leaves ~0.5% of the signal at t = 999
    assert rescaled[-1] == 0.0
    assert abs(rescaled[0] - plain[0]) < 1e-6  # the first step is kept
    # With SNR = 0 the v weight is taken as 1, never 0 or NaN.
    w = min_snr_weights(snr(paddle.to_tensor(rescaled), paddle.to_tensor([999], dtype="int64")), 5.0, "v_prediction")
    assert float(w[0]) == 1.0


def test_offset_noise_adds_one_constant_per_image_and_channel():
    paddle.seed(3)
    plain = sample_noise([2, 4, 8, 8], "float32").numpy()
    paddle.seed(3)
    offset = sample_noise([2, 4, 8, 8], "float32", 0.1).numpy()
    delta = offset - plain
    assert np.abs(delta - delta[:, :, :1, :1]).max() < 1e-6  # constant over the image
    assert np.abs(delta).max() > 1e-3 and len(np.unique(delta[:, :, 0, 0].round(6))) == 8  # differs per (image, channel)


def test_timestep_bias_draws_the_biased_end_more_often():
    from ldm.models.recipe import sample_timesteps

    paddle.seed(0)
    later = Recipe("v_prediction", timestep_bias_strategy="later", timestep_bias_multiplier=4, timestep_bias_portion=0.3)
    weights = later.timestep_weights(1000)
    assert np.isclose(weights.sum(), 1) and np.isclose(weights[-1] / weights[0], 4) and np.isclose(weights[699], weights[0])
    drawn = sample_timesteps(20000, 1000, later).numpy()
    assert drawn.min() >= 0 and drawn.max() <= 999
    assert abs((drawn >= 700).mean() - 1.2 / 1.9) < 0.02  # 0.3 x 4 of 0.7 + 0.3 x 4
    earlier = sample_timesteps(20000, 1000, Recipe(timestep_bias_strategy="earlier", timestep_bias_multiplier=4, timestep_bias_portion=0.3)).numpy()
    assert abs((earlier < 300).mean() - 1.2 / 1.9) < 0.02
    uniform = sample_timesteps(20000, 1000, Recipe()).numpy()
    assert abs((uniform >= 700).mean() - 0.3) < 0.02
    with pytest.raises(ValueError, match="none, later or earlier"):
        Recipe(timestep_bias_strategy="late").check()


def test_bad_recipes_stop_at_startup(shapes, vae_dir, tmp_path):
    res = run_script(ldm_args(shapes, vae_dir, tmp_path / "o", 1, ["--zero_terminal_snr"]), timeout=120)
    assert res.returncode == 2 and "--zero_terminal_snr needs --prediction_type v_prediction" in res.stderr.strip().splitlines()[-1]
    with pytest.raises(ValueError, match="epsilon or v_prediction"):
        Recipe("sample").check()


def test_full_recipe_trains_and_the_stock_pipeline_samples_it(shapes, vae_dir, tmp_path):
    """Every option on, a few steps of the explicit loop (images logged too), then the exported
    scheduler/ carries what sampling needs and the stock pipeline generates. (That each option
    changes the loss as it should is checked in-process below, one option at a time.)"""
    from ppdiffusers import LDMTextToImagePipeline

    out = tmp_path / "v"
    args = ["train_txt2img_laion400m_no_trainer.py", "--output_dir", str(out), "--train_batch_size", "4",
            "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3", "--max_train_steps", "3", "--logging_steps", "1",
            "--save_steps", "3", "--num_workers", "0", "--vae_name_or_path", str(vae_dir),
            "--text_encoder_config_file", "config/tiny/ldmbert.json", "--unet_config_file", "config/tiny/unet.json",
            "--file_list", shapes["file_list"], "--model_max_length", "16", "--tokenizer_name", shapes["tokenizer"],
            "--resolution", "32", "--image_logging_steps", "3", "--num_inference_steps", "2",
            "--prediction_type", "v_prediction", "--snr_gamma", "5", "--zero_terminal_snr", "--noise_offset", "0.1", "--timestep_bias_strategy", "later", "--timestep_bias_multiplier", "2",
            "--input_perturbation", "0.1"]
    res = run_script(args)
    assert res.returncode == 0, res.stderr[-3000:]
    config = json.load(open(out / "scheduler" / "scheduler_config.json"))
    assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"] is True
    assert config["timestep_spacing"] == "trailing"
    pipe = LDMTextToImagePipeline.from_pretrained(str(out))
    assert float(pipe.scheduler.alphas_cumprod[-1]) == 0.0
    latent = pipe.unet.config.sample_size
    image = pipe(["a red circle on a blue background, in the middle"], height=latent * 8, width=latent * 8, num_inference_steps=3,
                 generator=paddle.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def adam_names(shapes, vae_dir):
    """{structured weight name: paddle parameter name} of the trained weights, as the training
    script's process names them (the optimizer state is keyed by the latter): the same build in a
    fresh name scope."""
    from ldm.training.args import ModelArguments
    from ldm.training.build import create_model

    model_args = ModelArguments(vae_name_or_path=str(vae_dir), tokenizer_name=shapes["tokenizer"], model_max_length=16,
                                text_encoder_config_file="config/tiny/ldmbert.json", unet_config_file="config/tiny/unet.json")
    with paddle.utils.unique_name.guard():
        model = create_model(model_args, 32, seed=23)
    return {n: (p.name, tuple(p.shape)) for n, p in model.named_parameters() if not p.stop_gradient}


def test_resolution_stages_continue_the_run_at_the_new_size(vae_dir, tmp_path, shapes):
    """32 px for 2 steps, then the same command at 64 px for one more: the first 64 px step starts
    from the 32 px stage's weights and Adam moments. Checked on the saved tensors: Adam's moments
    after step 3 are those of step 2 moved by one gradient g (m3 = b1 m2 + (1 - b1) g,
    v3 = b2 v2 + (1 - b2) g^2), and the step-3 weights are the step-2 weights moved by Adam's step
    from m3 and v3 (no weight decay here). A fresh optimizer (m2 = v2 = 0) or fresh weights fail it.
    EMA and step continue, the data starts a new pass, the exported UNet samples at the new size."""
    from safetensors.numpy import load_file

    from ldm.data.sample_data import write_sample_dataset

    file_list = write_sample_dataset(str(tmp_path / "data64"), num_parts=1, records_per_part=24, size=64, seed=2)
    out = tmp_path / "stages"

    def stage(resolution, steps):
        args = ldm_args(shapes, vae_dir, out, steps, ["--save_steps", "1", "--image_logging_steps", "0", "--use_ema", "--ema_decay", "0.9",
                                                      "--weight_decay", "0.0"])
        args[args.index("--file_list") + 1] = file_list
        args[args.index("--resolution") + 1] = str(resolution)
        res = run_script(args)
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout + res.stderr

    stage(32, 2)
    log = stage(64, 3)
    assert "New resolution stage" in log and "trains at 64" in log
    assert "Resuming from" in log and "checkpoint-2" in log

    names = adam_names(shapes, vae_dir)
    from safetensors.numpy import load_file

    opt = [load_file(str(out / f"checkpoint-{s}" / "optimizer.safetensors")) for s in (2, 3)]  # tensors keyed as the optimizer's state
    weights = [load_file(str(out / f"checkpoint-{s}" / "model.safetensors")) for s in (2, 3)]
    b1, b2, lr, eps = 0.9, 0.999, 1e-3, 1e-8  # the Trainer's AdamW defaults; --learning_rate 1e-3 constant
    moved = 0
    for name, (pname, shape) in names.items():
        m2, m3 = (o[f"{pname}_moment1_0"].astype(np.float64) for o in opt)
        v2, v3 = (o[f"{pname}_moment2_0"].astype(np.float64) for o in opt)
        assert m3.shape == shape, (name, pname)  # the name scope maps each weight to its own moments
        g = (m3 - b1 * m2) / (1 - b1)
        np.testing.assert_allclose(v3, b2 * v2 + (1 - b2) * g**2, rtol=1e-3, atol=1e-6 * float(np.abs(v3).max()) + 1e-30, err_msg=name)
        # Paddle's Adam: lr_t = lr sqrt(1 - b2^t) / (1 - b1^t); w -= lr_t m / (sqrt(v) + eps sqrt(1 - b2^t)), t = 3.
        lr_t = lr * math.sqrt(1 - b2**3) / (1 - b1**3)
        w2, w3 = (w[name].astype(np.float64) for w in weights)
        np.testing.assert_allclose(w3, w2 - lr_t * m3 / (np.sqrt(v3) + eps * math.sqrt(1 - b2**3)), rtol=0, atol=1e-6, err_msg=name)
        moved += int(np.abs(w3 - w2).max() > 1e-5)
    assert moved > len(names) // 2  # most weights really took a step (the check above is not trivial)

    state = json.load(open(out / "checkpoint-3" / "trainer_state.json"))
    assert state["global_step"] == 3
    assert int(load_file(str(out / "checkpoint-3" / "ema.safetensors"))["__ema_num_updates__"][0]) == 3
    assert json.load(open(out / "unet" / "config.json"))["sample_size"] == 64 // 4
    assert json.load(open(out / "checkpoint-3" / "args.json"))["resolution"] == 64


# -- Each recipe flag changes the first step's loss as its paper says ----------------------
# One tiny model (built once), one fixed batch, one RNG seed. A forward hook on the UNet keeps
# what it was given (the noisy latents x_t and the timesteps) and what it predicted; the test
# then rebuilds the target and the loss from x_t with a noise schedule written here (not the
# scheduler's), so a flag that is parsed but never reaches the loss, or a wrong target or weight,
# fails. The recipes come from the command-line flags through RecipeArguments, as both scripts do.

def recipe_from_flags(*flags):
    from paddlenlp.trainer import PdArgumentParser

    from ldm.training.args import RecipeArguments

    (args,) = PdArgumentParser([RecipeArguments]).parse_args_into_dataclasses(args=list(flags))
    return args.recipe()


def alphas_bar(zero_terminal_snr=False):
    """The LDM schedule ("scaled_linear": betas evenly spaced in sqrt between 0.00085 and 0.012),
    and with zero terminal SNR rescaled as Lin et al. 2024, Algorithm 1: sqrt(alpha_bar) shifted
    and scaled so it keeps its first value and ends at 0."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    a = np.cumprod(1.0 - betas)
    if zero_terminal_snr:
        s = np.sqrt(a)
        s = (s - s[-1]) * s[0] / (s[0] - s[-1])
        a = s**2
    return a


@pytest.fixture(scope="module")
def recipe_bench(shapes, vae_dir):
    """The tiny model with random (not zero) output layers, and 8 records of the shapes data."""
    from test_cache_latents import first_batch, tiny_model

    model = tiny_model(shapes, vae_dir)
    model.eval()
    with paddle.no_grad():
        # The reference's zero-initialised output convs would make every prediction 0.
        for p in model.trainable_parameters():
            if not p.abs().max():
                p.set_value(paddle.randn(p.shape) * 0.05)
    return model, first_batch(shapes["file_list"], model, count=8)


def first_step(bench, *flags, seed=11):
    """The loss of one seeded step under the recipe of `flags`, with what the UNet saw and said,
    and the clean latents x0 of that step (the posterior sample is the step's first draw)."""
    from ldm.models.ldm import LatentDiffusionModel

    base, batch = bench
    model = LatentDiffusionModel(base.vae, base.text_encoder, base.unet, base.tokenizer, recipe_from_flags(*flags))
    seen = {}

    def keep(layer, inputs, output):
        seen.update(x_t=inputs[0].numpy().astype(np.float64), t=inputs[1].numpy(), pred=output.sample.numpy().astype(np.float64))

    hook = model.unet.register_forward_post_hook(keep)
    try:
        paddle.seed(seed)
        with paddle.no_grad():
            loss = float(model(**batch))
    finally:
        hook.remove()
    paddle.seed(seed)
    with paddle.no_grad():
        seen["x0"] = model.encode_latents(batch["pixel_values"]).numpy().astype(np.float64)
    return loss, seen


def noise_of(seen, a):
    """The noise in x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, solved for eps."""
    at = a[seen["t"]].reshape(-1, 1, 1, 1)
    return (seen["x_t"] - np.sqrt(at) * seen["x0"]) / np.sqrt(1 - at)


def mse(pred, target, weights=None):
    per_sample = ((pred - target) ** 2).mean(axis=(1, 2, 3))
    return float((per_sample if weights is None else per_sample * weights).mean())


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-4)


def test_epsilon_loss_is_the_mse_to_the_noise(recipe_bench):
    loss, seen = first_step(recipe_bench)
    eps = noise_of(seen, alphas_bar())
    assert abs(eps.std() - 1) < 0.1  # x_t really is the schedule's noising of x0
    assert close(loss, mse(seen["pred"], eps)), (loss, mse(seen["pred"], eps))


def test_v_prediction_learns_v(recipe_bench):
    plain, _ = first_step(recipe_bench)
    loss, seen = first_step(recipe_bench, "--prediction_type", "v_prediction")
    a = alphas_bar()
    at = a[seen["t"]].reshape(-1, 1, 1, 1)
    v = np.sqrt(at) * noise_of(seen, a) - np.sqrt(1 - at) * seen["x0"]  # Salimans & Ho 2022, section 4
    assert not close(loss, plain)
    assert close(loss, mse(seen["pred"], v)), (loss, mse(seen["pred"], v))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_snr_gamma_weights_each_sample_by_min_snr(recipe_bench, prediction_type):
    """Hang et al. 2023: the x0-loss weight min(SNR, gamma), which is min(SNR, gamma) / SNR in the
    epsilon loss and min(SNR, gamma) / (SNR + 1) in the v loss."""
    gamma = 1.0
    plain, _ = first_step(recipe_bench, "--prediction_type", prediction_type)
    loss, seen = first_step(recipe_bench, "--prediction_type", prediction_type, "--snr_gamma", str(gamma))
    a = alphas_bar()
    at = a[seen["t"]]
    snr_t = at / (1 - at)
    assert (snr_t > gamma).any() and (snr_t < gamma).any(), seen["t"]  # this seed's timesteps fall on both sides of gamma
    eps = noise_of(seen, a)
    if prediction_type == "epsilon":
        target, weights = eps, np.minimum(snr_t, gamma) / snr_t
    else:
        at4 = at.reshape(-1, 1, 1, 1)
        target, weights = np.sqrt(at4) * eps - np.sqrt(1 - at4) * seen["x0"], np.minimum(snr_t, gamma) / (snr_t + 1)
    assert not close(loss, plain)
    assert close(loss, mse(seen["pred"], target, weights)), (loss, mse(seen["pred"], target, weights))


def test_noise_offset_shifts_the_noise_by_a_constant_per_image_and_channel(recipe_bench):
    _, plain = first_step(recipe_bench)
    loss, seen = first_step(recipe_bench, "--noise_offset", "0.1")
    a = alphas_bar()
    eps, eps_plain = noise_of(seen, a), noise_of(plain, a)
    shift = eps - eps_plain  # the same first Gaussian draw, plus the offset
    per_channel = shift.mean(axis=(2, 3), keepdims=True)
    assert np.abs(shift - per_channel).max() < 1e-3
    assert 0.03 < per_channel.std() < 0.3  # 0.1 x a standard normal per (image, channel)
    assert close(loss, mse(seen["pred"], eps)) and not close(loss, mse(plain["pred"], eps_plain))


def test_input_perturbation_noises_the_input_but_not_the_target(recipe_bench):
    """Ning et al. 2023: x_t = sqrt(a) x0 + sqrt(1 - a) (eps + 0.1 xi), and the target stays eps."""
    plain_loss, plain = first_step(recipe_bench)
    loss, seen = first_step(recipe_bench, "--input_perturbation", "0.1")
    assert np.array_equal(seen["t"], plain["t"])
    a = alphas_bar()
    eps = noise_of(plain, a)  # the unperturbed noise of the same draw
    extra = noise_of(seen, a) - eps
    assert 0.07 < extra.std() < 0.13
    assert not close(loss, plain_loss)
    assert close(loss, mse(seen["pred"], eps)), (loss, mse(seen["pred"], eps))


def test_timestep_bias_moves_the_drawn_timesteps(recipe_bench):
    _, plain = first_step(recipe_bench)
    loss, seen = first_step(recipe_bench, "--timestep_bias_strategy", "later", "--timestep_bias_multiplier", "1e6",
                            "--timestep_bias_portion", "0.1")
    assert (plain["t"] < 900).any()
    assert (seen["t"] >= 900).all(), seen["t"]  # 99.99% of the draws' weight is on the last 100 timesteps
    assert close(loss, mse(seen["pred"], noise_of(seen, alphas_bar())))


def test_zero_terminal_snr_trains_on_the_rescaled_schedule(recipe_bench):
    plain, _ = first_step(recipe_bench, "--prediction_type", "v_prediction")
    loss, seen = first_step(recipe_bench, "--prediction_type", "v_prediction", "--zero_terminal_snr")
    assert not close(loss, plain)

    def v_loss(a):
        at = a[seen["t"]].reshape(-1, 1, 1, 1)
        return mse(seen["pred"], np.sqrt(at) * noise_of(seen, a) - np.sqrt(1 - at) * seen["x0"])

    assert close(loss, v_loss(alphas_bar(zero_terminal_snr=True))), (loss, v_loss(alphas_bar(True)))
    assert not close(loss, v_loss(alphas_bar()))
