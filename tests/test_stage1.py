"""Stage 1: the discriminator's training and resume, the held-out PSNR, and diffusers-format directories."""
import os
import re
import shutil

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file

from conftest import ROOT, run_script
from ldm.training.checkpoint_io import read_state


def vae_args(file_list, out, max_steps, extra=()):
    return ["train_vae.py", "--do_train", "--file_list", file_list, "--output_dir", str(out), "--resolution", "32",
            "--max_steps", str(max_steps), "--vae_config_file", "config/tiny/vae.json", "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--save_steps", "2", "--image_logging_steps", "0",
            "--scaling_batches", "1", "--seed", "23", "--dataloader_num_workers", "1", "--disc_channels", "8", *extra]


def tiny_model(disc_start):
    from ldm.training.stage1 import AutoencoderTrainingModel
    from ldm.models.autoencoder import build_autoencoder
    from ldm.models.discriminator import NLayerDiscriminator

    paddle.seed(0)
    return AutoencoderTrainingModel(build_autoencoder(os.path.join(ROOT, "config/tiny/vae.json")), 1e-6,
                                    NLayerDiscriminator(3, 8, 3), disc_start=disc_start, disc_weight=0.5)


def grads(layer):
    return {n: p.grad.numpy().copy() for n, p in layer.named_parameters() if not p.stop_gradient}


def test_the_discriminator_is_zero_weighted_before_disc_start_and_trains_after():
    model = tiny_model(disc_start=3)
    images = paddle.to_tensor(np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32)).astype("uint8"))

    # Step 2 (< 3): L1 + KL only; every discriminator weight gets an exact zero gradient
    # (so DataParallel still all-reduces it and Adam leaves it unchanged).
    model.global_step = 2
    paddle.seed(1)
    model(pixel_values=images).backward()
    before = grads(model.discriminator)
    assert all(not g.any() for g in before.values())
    vae_before = grads(model.vae)
    terms = model.loss_terms.pop_means()
    assert terms["disc_loss"] == 0 and terms["d_weight"] == 0 and "g_loss" not in terms
    model.clear_gradients()

    # Step 3: the adversarial term is in: the discriminator learns (hinge loss only: its
    # gradients equal those of the hinge loss alone) and the autoencoder's gradients change.
    model.global_step = 3
    paddle.seed(1)
    model(pixel_values=images).backward()
    after, vae_after = grads(model.discriminator), grads(model.vae)
    terms = model.loss_terms.pop_means()
    assert terms["d_weight"] > 0 and terms["disc_loss"] > 0
    assert any(g.any() for g in after.values())
    assert any(not np.allclose(vae_before[n], vae_after[n]) for n in vae_before)
    from ldm.models.discriminator import hinge_d_loss
    from ldm.models.ldm import to_model_range

    model.clear_gradients()
    paddle.seed(1)
    x = to_model_range(images)
    with paddle.no_grad():
        rec = model.vae.decode(model.vae.encode(x).latent_dist.sample()).sample
    hinge_d_loss(model.discriminator(x), model.discriminator(rec)).backward()
    hinge_only = grads(model.discriminator)
    for name in after:
        np.testing.assert_allclose(after[name], hinge_only[name], rtol=1e-4, atol=1e-7)


def test_psnr_in_db():
    from ldm.training.stage1 import psnr

    a = np.zeros((2, 4, 4, 3), dtype="uint8")
    b = a.copy()
    b[1] += 1  # MSE 1: 20 log10(255) = 48.13 dB
    np.testing.assert_allclose(psnr(b, a), [100.0, 48.1308], atol=1e-3)


@pytest.fixture(scope="module")
def held_out(shapes, tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    res = run_script(["-m", "ldm.split", "--file_list", shapes["file_list"], "--output_dir", str(root), "--eval_parts", "1"])
    assert res.returncode == 0, res.stderr[-2000:]
    return str(root / "train.filelist.list"), str(root / "eval.filelist.list")


def test_gan_training_resumes_the_discriminator_and_its_optimizer_and_prints_the_psnr(held_out, tmp_path):
    train, evaluation = held_out
    extra = ["--disc_start", "1", "--eval_file_list", evaluation, "--eval_records", "6", "--use_ema", "--ema_decay", "0.9"]
    straight = tmp_path / "straight"
    res = run_script(vae_args(train, straight, 3, extra))
    assert res.returncode == 0, res.stderr[-3000:]
    # The last line compares autoencoders: PSNR on the held-out images (not trained on), of the
    # exported autoencoder (the EMA), as computed here from its reconstructions of those images.
    printed = re.search(r"reconstruction PSNR on 6 held-out images: (\d+\.\d\d) dB", res.stdout.strip().splitlines()[-1])
    assert printed, res.stdout[-500:]
    from ldm.training.validation import fixed_log_batch
    from ppdiffusers import AutoencoderKL

    images = fixed_log_batch(evaluation, 32, 6, seed=23)["pixel_values"]  # the run's first 6 held-out records (--seed 23)
    assert abs(float(printed.group(1)) - reconstruction_psnr(AutoencoderKL.from_pretrained(str(straight)), images).mean()) < 0.01
    assert "disc_loss" in res.stderr and "logits_fake" in res.stderr

    # Resume from checkpoint-2 in another directory: the last step must come out as in the
    # uninterrupted run, which needs the discriminator's weights and Adam moments restored.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    res = run_script(vae_args(train, resumed, 3, extra))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "checkpoint-2" in res.stderr
    weights = [load_file(str(d / "checkpoint-3" / "model.safetensors")) for d in (straight, resumed)]
    disc = [k for k in weights[0] if k.startswith("discriminator.")]
    assert disc
    start = load_file(str(straight / "checkpoint-2" / "model.safetensors"))
    assert any(not np.array_equal(start[k], weights[0][k]) for k in disc)  # the discriminator trained in step 3
    for k in weights[0]:
        np.testing.assert_allclose(weights[0][k], weights[1][k], rtol=1e-5, atol=1e-7, err_msg=k)
    # The EMA (what is exported) averages the autoencoder only.
    ema = load_file(str(straight / "checkpoint-3" / "ema.safetensors"))
    assert any(k.startswith("vae.") for k in ema) and not any(k.startswith("discriminator.") for k in ema)
    ema_resumed = load_file(str(resumed / "checkpoint-3" / "ema.safetensors"))
    for k in ema:
        np.testing.assert_allclose(ema[k], ema_resumed[k], rtol=1e-5, atol=1e-7, err_msg=k)
    moments = [read_state(str(d / "checkpoint-3"), "optimizer") for d in (straight, resumed)]
    assert len(moments[0]) == len(moments[1])
    for k, v in moments[0].items():
        if isinstance(v, paddle.Tensor):
            np.testing.assert_allclose(v.numpy(), moments[1][k].numpy(), rtol=1e-5, atol=1e-7, err_msg=k)


def test_diffusers_format_autoencoder_loads_and_reconstructs_like_the_original(tmp_path):
    from ldm.models.autoencoder import build_autoencoder
    from ldm.models.ldm import load_autoencoder

    paddle.seed(3)
    vae = build_autoencoder(os.path.join(ROOT, "config/tiny/vae.json"))
    vae.save_pretrained(str(tmp_path / "paddle"))
    vae.save_pretrained(str(tmp_path / "diffusers"), to_diffusers=True)
    assert os.path.isfile(tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors")
    images = paddle.to_tensor(np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)).astype("float32"))
    out = []
    for kind in ("paddle", "diffusers"):
        loaded = load_autoencoder(str(tmp_path / kind))
        loaded.eval()
        with paddle.no_grad():
            out.append(loaded(images, sample_posterior=False).sample.numpy())
    np.testing.assert_array_equal(out[0], out[1])

    os.remove(tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="has no weights"):
        load_autoencoder(str(tmp_path / "diffusers"))


def test_diffusers_format_pipeline_loads_as_the_original(shapes, vae_dir, tmp_path):
    from ldm.models.ldm import LatentDiffusionModel

    model = LatentDiffusionModel.from_scratch(str(vae_dir), os.path.join(ROOT, "config/tiny/ldmbert.json"),
                                              os.path.join(ROOT, "config/tiny/unet.json"), shapes["tokenizer"], 16, seed=5)
    model.save_pipeline(str(tmp_path / "paddle"))
    model.to_pipeline().save_pretrained(str(tmp_path / "diffusers"), to_diffusers=True)
    assert os.path.isfile(tmp_path / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors")
    loaded = [LatentDiffusionModel.from_pipeline_dir(str(tmp_path / kind), 16) for kind in ("paddle", "diffusers")]
    states = [m.state_dict() for m in loaded]
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        np.testing.assert_array_equal(states[0][k].numpy(), states[1][k].numpy(), err_msg=k)


# -- The session's autoencoder (conftest.vae_dir: 6 steps, batch 4, EMA) on images it never saw --

def reconstruction_psnr(vae, images):
    """Per image, 10 log10(255^2 / MSE) between uint8 images and the uint8 decoding of their
    posterior means, written out here rather than taken from ldm.autoencoder."""
    vae.eval()
    with paddle.no_grad():
        decoded = vae(images.astype("float32") / 127.5 - 1.0, sample_posterior=False).sample.numpy()
    decoded = np.round(np.clip(decoded / 2 + 0.5, 0, 1) * 255)
    mse = ((decoded - images.numpy().astype(np.float64)) ** 2).reshape(len(decoded), -1).mean(axis=1)
    return 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def unseen_images(tmp_path_factory):
    """32 images from the session data's generator with another seed: never trained on."""
    from ldm.data.sample_data import write_sample_dataset
    from ldm.training.validation import fixed_log_batch

    file_list = write_sample_dataset(str(tmp_path_factory.mktemp("unseen")), num_parts=1, records_per_part=32, size=40, seed=7)
    return fixed_log_batch(file_list, 32, 32)["pixel_values"]


def test_scaling_factor_gives_unit_std_latents_on_unseen_images(vae_dir, unseen_images):
    """Stage 2's noise schedule assumes unit-variance latents (LDM paper, section G): the measured
    scaling_factor must bring the posterior samples of new images to std ~1."""
    from ppdiffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(vae_dir))
    vae.eval()
    paddle.seed(0)
    with paddle.no_grad():
        latents = vae.encode(unseen_images.astype("float32") / 127.5 - 1.0).latent_dist.sample()
    std = float(latents.std()) * vae.config.scaling_factor
    assert 0.9 <= std <= 1.1, (std, vae.config.scaling_factor)


def test_trained_autoencoder_reconstructs_unseen_images_better_than_untrained_ones(vae_dir, unseen_images):
    """6 steps at batch 4 are all the session affords: measured, the exported autoencoder reaches
    7.99 dB on these 32 images where fresh ones (seeds 0, 1, 2, 42) reach 7.66-7.76 dB. The bar is
    0.15 dB above the best untrained one: what 6 real steps clear and the initial weights do not."""
    from ppdiffusers import AutoencoderKL

    from ldm.models.autoencoder import build_autoencoder

    untrained = []
    for seed in (0, 1, 2):
        paddle.seed(seed)
        untrained.append(reconstruction_psnr(build_autoencoder(os.path.join(ROOT, "config/tiny/vae.json")), unseen_images).mean())
    trained = reconstruction_psnr(AutoencoderKL.from_pretrained(str(vae_dir)), unseen_images).mean()
    print(f"held-out PSNR: trained {trained:.2f} dB, untrained {', '.join(f'{u:.2f}' for u in untrained)} dB")
    assert trained > max(untrained) + 0.15, (trained, untrained)
