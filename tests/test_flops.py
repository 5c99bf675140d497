"""The FLOP counter (ldm.flops) against a hand count and against Paddle's own paddle.flops, and
bench/gpu_step.py's measurement run on the CPU (what a GPU user runs, so it keeps working)."""
import re

import paddle
import paddle.nn as nn
from paddle.hapi.dynamic_flops import count_linear

from conftest import run_script
from ldm.models.flops import Counter, count_forward


def test_counter_counts_a_convolution_as_by_hand_and_as_paddle_flops():
    conv = nn.Conv2D(8, 16, 3, padding=1, bias_attr=False)
    counter = Counter(conv)
    with paddle.no_grad():
        conv(paddle.zeros([1, 8, 10, 10]))
    counter.remove()
    by_hand = 16 * 10 * 10 * (8 * 3 * 3)  # one multiply-add per output element per input tap
    assert counter.macs == by_hand and counter.flops == 2 * by_hand
    assert paddle.flops(nn.Sequential(conv), [1, 8, 10, 10]) == by_hand  # (it sums sublayers only)


def test_counter_agrees_with_paddle_flops_on_the_tiny_unet():
    """paddle.flops hooks Conv2D and Linear too (plus one add per output for a conv's bias, left
    out here) and does not see attention's matmuls, which are not layers: the rest must agree."""
    from bench.gpu_step import preset_models

    vae, text_encoder, unet = preset_models("tiny", 32)
    count = count_forward(vae, text_encoder, unet, 32, 77)
    hidden = text_encoder(paddle.zeros([1, 77], dtype="int64"))[0]

    class UNetOnLatents(nn.Layer):  # paddle.flops feeds one tensor
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, x):
            return self.unet(x, paddle.to_tensor([500]), hidden).sample

    def conv_without_bias(m, x, y):
        m.total_ops += int(y.numel()) * int(m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3])

    # paddle.flops picks its counter by exact class, and ppdiffusers' layers are subclasses
    # (LoRACompatibleConv, LoRACompatibleLinear): name them, with paddle's own Linear counter.
    custom = {type(m): conv_without_bias for m in unet.sublayers() if isinstance(m, nn.Conv2D)}
    custom.update({type(m): count_linear for m in unet.sublayers() if isinstance(m, nn.Linear)})
    with paddle.no_grad():
        theirs = paddle.flops(UNetOnLatents(), [1, 4, 8, 8], custom_ops=custom)
    assert count.unet.attention_macs > 0
    assert count.unet.macs - count.unet.attention_macs == theirs
    # Counting removed its hooks: the model runs as before.
    assert all(not layer._forward_post_hooks for layer in unet.sublayers(include_self=True))


def layer_macs(layer, input_size, forward=None):
    """Multiply-adds of every Conv2D (without bias) and Linear in one forward, by paddle.flops."""

    def conv_without_bias(m, x, y):
        m.total_ops += int(y.numel()) * int(m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3])

    custom = {type(m): conv_without_bias for m in layer.sublayers() if isinstance(m, nn.Conv2D)}
    custom.update({type(m): count_linear for m in layer.sublayers() if isinstance(m, nn.Linear)})

    class Wrapped(nn.Layer):  # paddle.flops feeds one float tensor
        def __init__(self):
            super().__init__()
            self.inner = layer

        def forward(self, x):
            return forward(x) if forward else self.inner(x)

    with paddle.no_grad():
        return paddle.flops(Wrapped(), input_size, custom_ops=custom)


def test_training_flops_from_independent_counts():
    """The FLOPs of one training image at 32 px, rebuilt without ldm.flops: paddle.flops for every
    convolution and linear layer, attention's two matrix products counted by hand from the tiny
    preset's shapes, and backward counted by hand for one layer: y = x W (N x in x out multiply-adds)
    needs dx = dy W^T and dW = x^T dy, the same N x in x out each, so forward + backward is 3 x the
    forward's. The frozen encoder runs forward only; --recompute runs the trained forward again."""
    from bench.gpu_step import preset_models

    vae, text_encoder, unet = preset_models("tiny", 32)
    count = count_forward(vae, text_encoder, unet, 32, 77)
    hidden = text_encoder(paddle.zeros([1, 77], dtype="int64"))[0]

    # Attention by hand: QK^T and probabilities x V, each queries x keys x inner_dim multiply-adds.
    # LDMBert: 2 layers of self-attention over 77 tokens, 2 heads x 32 = 64 wide.
    bert_attention = 2 * (2 * 77 * 77 * 64)
    # UNet (8x8 latents; channels 32, 64): one transformer at 8x8 in the down block, one at 4x4 in the
    # middle, two at 8x8 in the up block; each self-attention over its pixels and cross-attention
    # over the 77 tokens, as wide as its channels.
    def transformer(pixels, width):
        return 2 * pixels * pixels * width + 2 * pixels * 77 * width

    unet_attention = transformer(64, 32) + transformer(16, 64) + 2 * transformer(64, 32)
    bert = layer_macs(text_encoder, [1, 77], lambda x: text_encoder(paddle.zeros([1, 77], dtype="int64"))[0]) + bert_attention
    unet_macs = layer_macs(unet, [1, 4, 8, 8], lambda x: unet(x, paddle.to_tensor([500]), hidden).sample) + unet_attention
    # The encoder (f=4: 8x8 at its middle, 32 wide) has one self-attention over its 64 pixels.
    # (Its 1x1 quant_conv, 4096 multiply-adds, is outside vae.encoder and not counted by ldm.flops.)
    encoder = layer_macs(vae.encoder, [1, 3, 32, 32]) + 2 * 64 * 64 * 32
    trained_flops = 2 * (bert + unet_macs)  # 2 FLOPs per multiply-add
    assert count.training_flops(cached=True) == 3 * trained_flops
    assert count.training_flops(cached=False) == 3 * trained_flops + 2 * encoder
    assert count.training_flops(cached=False, recompute=True) == 4 * trained_flops + 2 * encoder


def test_gpu_step_measures_on_the_cpu():
    res = run_script(["bench/gpu_step.py", "--preset", "tiny", "--resolution", "32", "--batch_size", "2", "--configs", "fp32",
                      "fp32+recompute", "fp32+cached", "--steps", "2", "--warmup", "1", "--allow_cpu"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| config | step (ms) | images/s | TFLOP/s | peak memory (GiB) |" in res.stdout
    rows = [line.split("|")[1:-1] for line in res.stdout.splitlines() if re.match(r"\| tiny 32px b2 ", line)]
    assert [r[0].split()[-1] for r in rows] == ["fp32", "fp32+recompute", "fp32+cached"], res.stdout
    for name, ms, images, tflops, memory in rows:
        assert float(ms) > 0 and float(images) > 0 and float(tflops) > 0 and float(memory) > 0, res.stdout
    # Same step, fewer FLOPs counted: no encoder with cached latents, one more forward with recompute.
    rates = {r[0].split()[-1]: float(r[3]) / float(r[2]) for r in rows}  # TFLOP per image
    assert rates["fp32+cached"] < rates["fp32"] < rates["fp32+recompute"]
