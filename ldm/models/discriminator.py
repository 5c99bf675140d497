"""The adversarial part of stage 1: CompVis' patch-GAN discriminator, its hinge loss and the
adaptive weight of the generator's term (taming-transformers, `taming/modules/discriminator/model.py`
and `taming/modules/losses/vqperceptual.py`; latent-diffusion's `LPIPSWithDiscriminator`, which
the LDM paper's KL autoencoders were trained with). Without it the autoencoder learns blurry
reconstructions (an L1 loss is minimised by the median of what the latent leaves undecided),
and the blur caps how sharp stage 2's samples can be.
"""
import contextlib

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from ppdiffusers.utils.initializer_utils import normal_, reset_initialized_parameter, zeros_


class NLayerDiscriminator(nn.Layer):
    """PatchGAN discriminator as in pix2pix and taming (`NLayerDiscriminator`, batch norm):
    4x4 convolutions, `num_layers` of them with stride 2, then two with stride 1; its output is
    one logit per overlapping patch (70x70 pixels for 3 layers), so it judges local texture.
    CompVis' autoencoders use in_channels 3, channels 64, 3 layers (2.8M weights)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2D(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1
            # No bias before batch norm (it would be cancelled by the mean subtraction).
            layers += [nn.Conv2D(channels * prev, channels * mult, 4, stride=stride, padding=1, bias_attr=False),
                       nn.BatchNorm2D(channels * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2D(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        init_like_taming(self)

    def forward(self, images: paddle.Tensor) -> paddle.Tensor:
        return self.main(images)


@paddle.no_grad()
def init_like_taming(disc: nn.Layer) -> None:
    """taming's `weights_init`: conv weights N(0, 0.02), batch-norm scale N(1, 0.02) and shift 0;
    the two conv biases keep torch's default U(+-1/sqrt(fan_in)) (ppdiffusers' reset does that)."""
    reset_initialized_parameter(disc)
    for _, layer in disc.named_sublayers():
        if isinstance(layer, nn.Conv2D):
            normal_(layer.weight, 0.0, 0.02)
        elif isinstance(layer, nn.BatchNorm2D):
            normal_(layer.weight, 1.0, 0.02)
            zeros_(layer.bias)


def hinge_d_loss(logits_real: paddle.Tensor, logits_fake: paddle.Tensor) -> paddle.Tensor:
    """The discriminator's hinge loss: push real logits above 1 and fake ones below -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


@contextlib.contextmanager
def frozen(layer: nn.Layer):
    """Inside the block, ops record no gradient for the layer's weights (inputs still get theirs):
    the generator's loss goes through the discriminator without training it, as Lightning's
    `toggle_optimizer` does for CompVis. Paddle decides at op-recording time, so the weights
    are trainable again for the next call."""
    params = [p for p in layer.parameters() if not p.stop_gradient]
    for p in params:
        p.stop_gradient = True
    try:
        yield layer
    finally:
        for p in params:
            p.stop_gradient = False


def adaptive_weight(rec_loss: paddle.Tensor, g_loss: paddle.Tensor, last_layer: paddle.Tensor, max_weight: float = 1e4) -> paddle.Tensor:
    """||grad rec_loss|| / ||grad g_loss|| at the decoder's last layer (Esser et al. 2021, eq. 7;
    taming's `calculate_adaptive_weight`): the generator's adversarial term gets the same gradient
    scale as the reconstruction term, whatever the two losses' magnitudes. A constant (detached)."""
    rec_grad = paddle.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = paddle.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clip(0.0, max_weight).detach()
