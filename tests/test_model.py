"""Model construction: reference initialisation, preset sizes, local-only loading."""
import json
import math
import os

import numpy as np
import paddle
import pytest

from conftest import ROOT, run_script
from ldm.models.ldm import build_text_encoder, build_unet, init_like_reference, require_local


def tiny_models():
    paddle.seed(0)
    text_encoder = build_text_encoder(os.path.join(ROOT, "config/tiny/ldmbert.json"), 100, 16)
    unet = build_unet(os.path.join(ROOT, "config/tiny/unet.json"))
    init_like_reference(text_encoder, unet)
    return text_encoder, unet


def test_linear_and_conv_init_match_torch_defaults():
    """torch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), so std = 1/sqrt(3 fan_in)."""
    text_encoder, unet = tiny_models()
    fc1 = text_encoder.model.layers[0].fc1  # paddle Linear weight is [in, out]
    expected = 1 / math.sqrt(3 * fc1.weight.shape[0])
    assert abs(float(fc1.weight.std()) - expected) / expected < 0.10
    conv = unet.down_blocks[0].resnets[0].conv1
    fan_in = conv.weight.shape[1] * conv.weight.shape[2] * conv.weight.shape[3]
    expected = 1 / math.sqrt(3 * fan_in)
    assert abs(float(conv.weight.std()) - expected) / expected < 0.10


def test_reference_zero_inits_and_embedding_std():
    text_encoder, unet = tiny_models()
    assert float(unet.conv_out.weight.abs().max()) == 0.0
    assert float(unet.down_blocks[0].resnets[0].conv2.weight.abs().max()) == 0.0
    assert float(unet.down_blocks[0].attentions[0].proj_out.weight.abs().max()) == 0.0
    std = float(text_encoder.model.embed_tokens.weight.std())
    assert abs(std - 0.02) / 0.02 < 0.10


def config(preset, name):
    with open(os.path.join(ROOT, "config", preset, name)) as f:
        return json.load(f)


def test_ldm_32l_counts_1_45b_parameters():
    """The published LAION-400M model: LDMBert 32 x 1280 + UNet 320-640-1280-1280 = 1.45B."""
    text_encoder = build_text_encoder(os.path.join(ROOT, "config/ldm_32l/ldmbert.json"), 30522, 77)
    n_text = sum(p.size for p in text_encoder.parameters())
    del text_encoder
    unet = build_unet(os.path.join(ROOT, "config/ldm_32l/unet.json"))
    n_unet = sum(p.size for p in unet.parameters())
    del unet
    assert abs((n_text + n_unet) / 1.45e9 - 1) < 0.01, (n_text, n_unet)


def test_preset_shapes_agree():
    for preset in ("ldm_32l", "ldm_12l", "tiny"):
        bert, unet, vae = config(preset, "ldmbert.json"), config(preset, "unet.json"), config(preset, "vae.json")
        assert unet["cross_attention_dim"] == bert["d_model"], preset
        assert unet["in_channels"] == vae["latent_channels"], preset
    assert config("ldm_12l", "ldmbert.json")["encoder_layers"] == 12 and config("ldm_12l", "ldmbert.json")["d_model"] == 768
    assert config("ldm_32l", "vae.json")["block_out_channels"] == [128, 256, 512, 512]


def test_hub_name_fails_fast_with_one_line(tmp_path):
    with pytest.raises(ValueError, match="not a local directory"):
        require_local("CompVis/stable-diffusion-v1-4/vae", "--vae_name_or_path")
    res = run_script(["train_txt2img_laion400m_trainer.py", "--do_train", "--output_dir", str(tmp_path / "o"),
                      "--model_name_or_path", "CompVis/ldm_laion400M_pretrain", "--max_steps", "1"], timeout=120)
    assert res.returncode == 2
    assert "not a local directory" in res.stderr and "--model_name_or_path" in res.stderr


def test_text_encoder_embedding_std_keeps_each_word_its_own(shapes, vae_dir):
    """At the reference's 0.02 a fresh LDMBert's output at a word's position barely depends on
    that word (attention's shared mixture is ~15x the embedding), so the UNet cannot tell where
    "left" and "right" differ; at 1.0 (--text_encoder_embedding_std, the demo's) it does."""
    from ldm.models.ldm import LatentDiffusionModel
    from ldm.data.sample_data import caption_for

    own_vs_rest = {}
    for std in (0.02, 1.0):
        model = LatentDiffusionModel.from_scratch(str(vae_dir), "config/tiny/ldmbert.json", "config/tiny/unet.json", shapes["tokenizer"], 16,
                                                  seed=0, token_embedding_std=std)
        model.eval()
        assert abs(float(model.text_encoder.model.embed_tokens.weight.std()) - std) < 0.05 * std
        tokenizer = model.tokenizer
        ids = [tokenizer(caption_for("circle", "red", "blue", where), padding="max_length", max_length=16)["input_ids"] for where in ("on the left", "on the right")]
        differs = [i for i, (a, b) in enumerate(zip(*ids)) if a != b]
        assert len(differs) == 1, ids
        with paddle.no_grad():
            left, right = (model.text_encoder(paddle.to_tensor([x]))[0][0] for x in ids)
        change = (left - right).abs().mean(axis=1).numpy()
        own_vs_rest[std] = change[differs[0]] / np.delete(change, differs[0]).mean()
    assert own_vs_rest[0.02] < 4 and own_vs_rest[1.0] > 10, own_vs_rest
