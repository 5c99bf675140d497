"""The stage-1 autoencoder (AutoencoderKL) built from a preset and initialised as PyTorch does;
its training is ldm.training.stage1.
"""
import paddle
import paddle.nn as nn
from ppdiffusers import AutoencoderKL
from ppdiffusers.utils.initializer_utils import reset_initialized_parameter

from ldm.models.ldm import read_config


def build_autoencoder(config_file: str) -> AutoencoderKL:
    vae = AutoencoderKL(**read_config(config_file, "--vae_config_file", AutoencoderKL))
    init_like_torch(vae)
    return vae


def init_like_torch(vae: AutoencoderKL) -> None:
    """CompVis trains its autoencoders in PyTorch with the framework's default init; Paddle's
    default differs (Kaiming-normal conv weights and zero biases: 2.45x torch's std, measured).
    ppdiffusers' `reset_initialized_parameter` sets every Conv2D and Linear to torch's
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (weights and biases); GroupNorm's defaults (1, 0)
    already agree and are set again here so that nothing depends on Paddle's defaults."""
    reset_initialized_parameter(vae)
    with paddle.no_grad():
        for _, layer in vae.named_sublayers():
            if isinstance(layer, (nn.GroupNorm, nn.LayerNorm)):
                if layer.weight is not None:
                    layer.weight.set_value(paddle.ones_like(layer.weight))
                if layer.bias is not None:
                    layer.bias.set_value(paddle.zeros_like(layer.bias))
