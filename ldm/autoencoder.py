"""Stage 1: the image autoencoder (AutoencoderKL) that stage 2 trains on top of, frozen.

Loss as in the LDM paper's KL autoencoders, without the perceptual and adversarial
terms: L1 reconstruction + kl_weight * KL(q(z|x) || N(0, I)), both per pixel.
After training, `scaling_factor` is set to 1 / std of the latents so stage 2's diffusion
sees unit-variance latents (the LDM paper, section 4.3.2 and appendix D.1; 0.18215 for KL-f8).
"""
import paddle
import paddle.nn as nn
from ppdiffusers import AutoencoderKL
from ppdiffusers.utils.initializer_utils import reset_initialized_parameter

from ldm.model import evaluating, read_config, to_model_range, to_uint8


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


class AutoencoderTrainingModel(nn.Layer):
    def __init__(self, vae: AutoencoderKL, kl_weight: float = 1e-6):
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight

    def forward(self, pixel_values=None, **kwargs):
        pixel_values = to_model_range(pixel_values)
        posterior = self.vae.encode(pixel_values).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        rec_loss = (reconstruction - pixel_values).abs().mean()
        pixels_per_image = pixel_values[0].numel().astype("float32")
        kl_loss = posterior.kl().mean() / pixels_per_image
        return rec_loss + self.kl_weight * kl_loss

    @paddle.no_grad()
    def log_images(self, batch, num_inference_steps: int = 0):
        images = to_model_range(batch["pixel_values"])
        with evaluating(self):
            out = self.vae(images, sample_posterior=False).sample
        return {"reconstruction": to_uint8(out), "input": to_uint8(images)}

    @paddle.no_grad()
    def measure_scaling_factor(self, batches) -> float:
        """1 / std of posterior samples over the given image batches."""
        with evaluating(self):
            latents = [self.vae.encode(to_model_range(b)).latent_dist.sample() for b in batches]
        std = float(paddle.concat(latents).std())
        return 1.0 / max(std, 1e-8)
