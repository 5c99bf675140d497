"""Every training step runs the trained modules in train mode (LDMBert's dropout on) and the frozen
autoencoder in eval mode, in both scripts, whatever --image_logging_steps; sampling runs in eval
mode and leaves train mode behind. Observed from inside the real forward passes with hooks."""
import signal
import sys

import paddle
import pytest

import train_txt2img_laion400m_no_trainer
import train_txt2img_laion400m_trainer
from conftest import ROOT


def own_sublayers(model, layer):
    """`layer` and its sublayers but those it shares with the frozen autoencoder: ppdiffusers hands
    out one instance of each activation (e.g. a SiLU) to every model that asks, and those
    stateless layers follow the autoencoder's mode."""
    shared = {id(sub) for sub in model.vae.sublayers(include_self=True)}
    return [sub for sub in layer.sublayers(include_self=True) if id(sub) not in shared]


def record_modes(model, seen):
    """At every LDMBert and UNet forward: whether gradients were on (a training step; the start-up
    FLOP count and sampling run without), whether every sublayer of the module was in train mode,
    and whether the autoencoder was."""
    def hook(name):
        def pre_hook(layer, inputs):
            own = own_sublayers(model, layer)
            seen.append((name, paddle.is_grad_enabled(), all(sub.training for sub in own), model.vae.training))
        return pre_hook

    model.text_encoder.register_forward_pre_hook(hook("text_encoder"))
    model.unet.register_forward_pre_hook(hook("unet"))


SCRIPTS = {
    "no_trainer": (train_txt2img_laion400m_no_trainer,
                   ["--pretrained_model_name_or_path", "{model}", "--train_batch_size", "2", "--max_train_steps", "2",
                    "--gradient_accumulation_steps", "1", "--num_workers", "0", "--save_steps", "2", "--logging_steps", "1"]),
    "trainer": (train_txt2img_laion400m_trainer,
                ["--do_train", "--model_name_or_path", "{model}", "--per_device_train_batch_size", "2", "--max_steps", "2",
                 "--dataloader_num_workers", "0", "--save_steps", "2", "--logging_steps", "1"]),
}


@pytest.mark.parametrize("script", ["no_trainer", "trainer"])
def test_continued_model_trains_in_train_mode(stock_pipeline_dir, shapes, tmp_path, monkeypatch, script):
    """The stock-written pipeline's LDMBert has dropout 0.1 and from_pretrained returns it in eval
    mode; a continuation with --image_logging_steps 0 never samples, so nothing else turns it on."""
    from ppdiffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig

    assert LDMBertConfig.from_pretrained(str(stock_pipeline_dir / "bert")).dropout == 0.1
    module, flags = SCRIPTS[script]
    seen = []
    real_create_model = module.create_model

    def create_and_watch(*args, **kwargs):
        model = real_create_model(*args, **kwargs)
        record_modes(model, seen)
        return model

    monkeypatch.setattr(module, "create_model", create_and_watch)  # the real model, only watched
    monkeypatch.chdir(ROOT)
    argv = [module.__file__, *[f.format(model=stock_pipeline_dir) for f in flags], "--output_dir", str(tmp_path / "out"),
            "--file_list", shapes["file_list"], "--resolution", "16", "--model_max_length", "16", "--image_logging_steps", "0",
            "--num_threads", "1", "--learning_rate", "1e-4"]
    monkeypatch.setattr(sys, "argv", argv)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        module.main()
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # the script's preemption handler must not outlive it in pytest
    assert (tmp_path / "out" / "model_index.json").is_file()
    # 2 steps x (LDMBert + UNet), all in train mode, the autoencoder never.
    steps = [s for s in seen if s[1]]
    assert len(steps) == 4, seen
    assert all(trained and not vae_training for _, _, trained, vae_training in steps), seen


def test_sampling_runs_in_eval_mode_and_leaves_train_mode(stock_pipeline_dir, shapes):
    from ldm.models.ldm import LatentDiffusionModel
    from ldm.training.validation import fixed_log_batch

    model = LatentDiffusionModel.from_pipeline_dir(str(stock_pipeline_dir), 16)
    batch = fixed_log_batch(shapes["file_list"], 16, 2, model.tokenizer, 16)
    model.train()
    assert not model.vae.training  # frozen: eval even when the model is told to train
    seen = []
    record_modes(model, seen)
    model.log_images(batch, 2)
    assert seen and not any(grad or trained for _, grad, trained, _ in seen), seen
    assert all(sub.training for m in (model.text_encoder, model.unet) for sub in own_sublayers(model, m))
    assert not model.vae.training
