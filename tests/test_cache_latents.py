"""Latent caching (python -m ldm.cache_latents): the same training signal without running the encoder."""
import gzip
import itertools

import numpy as np
import paddle
import pytest

from conftest import ROOT, ldm_args, run_script


@pytest.fixture(scope="module")
def cache_32(shapes, vae_dir, tmp_path_factory):
    """The shapes data cached at 32 px by the fixture autoencoder."""
    from ldm.training import cache_latents

    out = tmp_path_factory.mktemp("cache32")
    assert cache_latents.main(["--file_list", shapes["file_list"], "--vae_name_or_path", str(vae_dir), "--resolution", "32",
                               "--output_dir", str(out), "--batch_size", "16"]) == 0
    return str(out / "train.filelist.list")


def tiny_model(shapes, vae_dir):
    from ldm.training.args import ModelArguments
    from ldm.models.recipe import Recipe
    from ldm.training.build import create_model

    model_args = ModelArguments(vae_name_or_path=str(vae_dir), tokenizer_name=shapes["tokenizer"], model_max_length=16,
                                text_encoder_config_file=f"{ROOT}/config/tiny/ldmbert.json", unet_config_file=f"{ROOT}/config/tiny/unet.json")
    # v-prediction: its target depends on the latents (with epsilon and the reference's zero-initialised
    # output conv the first loss would be mean(noise^2), whatever the latents).
    model = create_model(model_args, 32, seed=3, recipe=Recipe(prediction_type="v_prediction"))
    return model


def first_batch(file_list, model, cache=None, count=4):
    from ldm.data.stream import TextImageStream

    stream = TextImageStream(file_list, 32, model.tokenizer, 16, 0.0, buffer_size=16, seed=5, rank=0, world_size=1, latent_cache=cache)
    samples = list(itertools.islice(iter(stream), count))
    return {k: paddle.to_tensor(np.stack([s[k] for s in samples])) for k in samples[0] if k in ("input_ids", "pixel_values", "latent_moments")}


def test_cached_parts_keep_the_seed_columns(shapes, cache_32):
    """Every record keeps columns 1-3 byte for byte, in the same order; column 4 holds the moments."""
    from ldm.data.filelists import read_file_list

    source = [p for e in read_file_list(shapes["file_list"]) for p in e.parts]
    cached = [p for e in read_file_list(cache_32) for p in e.parts]
    assert len(source) == len(cached) == 2
    for a, b in zip(source, cached):
        with gzip.open(a, "rt") as fa, gzip.open(b, "rt") as fb:
            la, lb = fa.read().splitlines(), fb.read().splitlines()
        assert len(la) == len(lb) == 64
        for x, y in zip(la, lb):
            assert y.split("\t")[:3] == x.split("\t")[:3]
            assert len(y.split("\t")) == 4


def test_same_loss_with_and_without_the_cache(shapes, vae_dir, cache_32):
    """Same records, same RNG state: the cached moments (float16) give the loss of encoding the images."""
    from ldm.training.cache_latents import probe_cache

    cache, message, warning = probe_cache(cache_32, str(vae_dir), 32)
    assert cache is not None and not warning, message
    model = tiny_model(shapes, vae_dir)
    with paddle.no_grad():
        # a UNet whose output depends on its input (the reference zero-initialises the output conv)
        model.unet.conv_out.weight.set_value(paddle.randn(model.unet.conv_out.weight.shape) * 0.1)
    encoded = first_batch(shapes["file_list"], model)
    cached = first_batch(cache_32, model, cache)
    assert "pixel_values" not in cached and cached["latent_moments"].dtype == paddle.float16
    assert np.array_equal(encoded["input_ids"].numpy(), cached["input_ids"].numpy())  # the same records in the same order
    losses = []
    for batch, seed in ((encoded, 7), (cached, 7), (encoded, 8)):
        paddle.seed(seed)
        with paddle.no_grad():
            losses.append(float(model(**batch)))
    with_encoder, with_cache, other_noise = losses
    assert abs(with_cache - with_encoder) <= 2e-3 * abs(with_encoder)
    # the tolerance is far below what a different draw of noise, timesteps and posterior sample changes
    assert abs(other_noise - with_encoder) > 10 * abs(with_cache - with_encoder)


def test_cache_of_another_resolution_falls_back_with_a_warning(shapes, vae_dir, cache_32, tmp_path):
    """A run at 40 px on parts cached at 32 px encodes as before and says why; at 32 px it uses the cache."""
    out = tmp_path / "run40"
    args = ldm_args(shapes, vae_dir, out, 2, ["--file_list", cache_32, "--resolution", "40", "--image_logging_steps", "0", "--save_steps", "2"])
    res = run_script(args)
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert "WARNING" in log and "Latents: encoded by the autoencoder every step" in log and "32px-centre" in log

    out = tmp_path / "run32"
    args = ["train_txt2img_laion400m_no_trainer.py", "--output_dir", str(out), "--train_batch_size", "4", "--gradient_accumulation_steps", "1",
            "--max_train_steps", "2", "--logging_steps", "1", "--save_steps", "2", "--num_workers", "1", "--image_logging_steps", "0",
            "--vae_name_or_path", str(vae_dir), "--text_encoder_config_file", "config/tiny/ldmbert.json",
            "--unet_config_file", "config/tiny/unet.json", "--tokenizer_name", shapes["tokenizer"], "--model_max_length", "16",
            "--file_list", cache_32, "--resolution", "32"]
    res = run_script(args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Latents: sampled from the moments cached in column 4" in res.stdout + res.stderr


def test_two_processes_write_the_same_cache(shapes, vae_dir, cache_32, tmp_path):
    """Under paddle.distributed.launch each process caches its stride of the parts; together they
    write what one process writes, and a re-run keeps the finished parts."""
    from ldm.data.filelists import read_file_list

    out = tmp_path / "cache2"

    def launch(log_dir):
        res = run_script(["-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir), "ldm/cache_latents.py",
                          "--file_list", shapes["file_list"], "--vae_name_or_path", str(vae_dir), "--resolution", "32",
                          "--output_dir", str(out)], timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        return "".join(p.read_text() for p in log_dir.glob("workerlog.*"))

    logs = launch(tmp_path / "log")
    assert "rank 0: cached 64 records in 1 parts" in logs and "rank 1: cached 64 records in 1 parts" in logs
    one = [p for e in read_file_list(cache_32) for p in e.parts]
    two = [p for e in read_file_list(str(out / "train.filelist.list")) for p in e.parts]
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        with gzip.open(a, "rb") as fa, gzip.open(b, "rb") as fb:
            assert fa.read() == fb.read()
    assert "(1 already done)" in launch(tmp_path / "log2")
